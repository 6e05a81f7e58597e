"""`run.py --mode=compare`: a registry of methods (`METHODS`, each `method(ctx) -> list[Row]`)
and the harness that runs them: every method x ratio/BOPs point -> top-1 on the eval split and BOPs
relative to all quantized layers at W8A8 (the attention matmuls at 8 x 8 bits in every method's
count: compare.baselines.relative_bops), as JSON, a Markdown table and one Pareto plot.

Methods (config.compare.methods):
  flexiq          the configured FlexiQ pipeline, swept at config.sweep.ratios (before and, with
                  compare.finetune, after its multi-ratio finetuning)
  flexiq_naive    the same with config.quant.extraction='naive' (sub-workdir compare/flexiq_naive)
  flexiq_random   the same with config.select.channel_order='random' (compare/flexiq_random)
  flexiq_uniform, flexiq_greedy   the same with select.selector='uniform' / 'greedy' per-layer counts
  flexiq_no_bias_correction       the same with quant.bias_correction=False
  flexiq_amp      FlexiQ with per-layer ratios chosen by the mixed-precision search, at each of
                  config.select.levels, beside the evolutionary search's selection at that level
  layerwise_amp   the layer-wise mixed-precision search (layerwise package), one point per
                  compare.allowed_drops
  ptq_minmax, ptq_mse   uniform W8A8 and W4A4 post-training quantization
  adaround        uniform W4A4 post-training quantization with AdaRound weight rounding
                  (compare.adaround: Nagel et al. 2020, MSE ranges)
  lsq_qat         uniform W4A4 QAT with LSQ, FlexiQ's recipe and forward+backward passes
                  (checkpoints in compare/lsq_qat/<fingerprint of its config fields>)
  lsq_adaround    the same QAT started from AdaRound's weights (compare/lsq_adaround/...)
  switchable_qat  one network trained jointly at W8A8 and W4A4 (LSQ scales per precision),
                  switched at run time; the same recipe and passes (compare/switchable_qat/...)
  flexiq_100only  FlexiQ's quantized model finetuned at ratio 1 only, with the same passes
With finetune.lr_grid every QAT method (flexiq's finetuning, flexiq_100only, lsq_qat,
switchable_qat) chooses its learning rate from the grid on the same held-out training images
(`lr_select`); its rows carry the selection's record and compare_table.md lists it (`lr_note`).
Attention's q·kᵀ and attn·v (plan.quantized_matmuls) run at 8 bits with the calibrated scales in
every method, baselines included (their rows record it: 'attention_matmuls'), or in float in every
method with quant.attention='float'.
The ablation sub-workdirs are evaluated before finetuning only (their finetuning would cost as
much again as FlexiQ's). Every row also carries agreement with the float model's predictions,
KL(float || quantized) and the output SQNR, measured in the same evaluation pass. Each method's
rows are cached in compare/rows.json under a fingerprint of what that method reads
(`METHOD_DEPENDS`), so a rerun only computes methods whose inputs changed.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Callable

import jax.numpy as jnp
import numpy as np

from flexiq_jax import cost
from flexiq_jax import finetune as finetune_lib
from flexiq_jax import judge as judge_lib
from flexiq_jax import lr_select
from flexiq_jax import pipeline
from flexiq_jax import progress
from flexiq_jax import records
from flexiq_jax import stage_cache
from flexiq_jax import stage_options
from flexiq_jax import train as train_lib
from flexiq_jax.compare import adaround as adaround_lib
from flexiq_jax.compare import baselines
from flexiq_jax.layerwise import apply as apply_lib
from flexiq_jax.layerwise import driver
from flexiq_jax.layerwise.candidates import FLOAT_BITS
from flexiq_jax.stage_results import Calibration, FloatModel


@dataclasses.dataclass(frozen=True)
class Row:
  """One evaluated point: a method at a setting, its top-1 on the eval split and its BOPs
  relative to every quantized layer (and attention matmul) at W8A8; `extra` holds
  method-specific fields."""

  method: str
  setting: str
  top1: float
  relative_bops: float
  extra: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    number = lambda v: None if v is None else float(v)  # a failed run's row has no figures
    return {"method": self.method, "setting": self.setting, "top1": number(self.top1),
            "relative_bops": number(self.relative_bops), **self.extra}

  @classmethod
  def from_json(cls, d: dict) -> "Row":
    extra = {k: v for k, v in d.items() if k not in ("method", "setting", "top1", "relative_bops")}
    return cls(d["method"], d["setting"], d["top1"], d["relative_bops"], extra)


@dataclasses.dataclass(frozen=True)
class CompareContext:
  """What every method gets: the run, the float model, its calibration and the data."""

  run: pipeline.Run
  float_model: FloatModel
  calibration: Calibration
  calib_batches: list
  eval_data: list
  float_logits: tuple  # the float model's logits on eval_data: every row's agreement / KL / SQNR

  @property
  def config(self):
    return self.run.config

  def float_top1(self) -> float:
    """The float model's top-1 (%) on eval_data, from its stored logits (no pass over the data)."""
    sums = [train_lib.eval_sums(jnp.asarray(logits), batch) for logits, batch in zip(self.float_logits, self.eval_data)]
    return 100.0 * float(sum(s["top1"] for s in sums)) / float(sum(s["count"] for s in sums))

  def ptq_tables(self, method: str) -> dict:
    """The post-training clipping tables at 4 and 8 bits, activations and weights both with
    `method` ranges ('minmax' or 'mse'), on the calibration images (`layerwise.apply.build_tables`).

    Args:
      method: the range method.

    Returns:
      The tables `build_tables` returns.
    """
    return apply_lib.build_tables(self.float_model.model, self.calibration.plan, self.calibration.folded,
                                  self.calibration.stats, act_method=method, weight_method=method, bits=(4, 8),
                                  batches=self.calib_batches)

  @classmethod
  def build(cls, run: pipeline.Run, float_model: FloatModel, float_logits=None) -> "CompareContext":
    """Calibration (cached), the calibration and eval data, and the float model's logits on the
    eval data (one pass, unless `float_logits` from the float evaluation are given)."""
    eval_data = list(pipeline.eval_batches(run.config))
    if float_logits is None:
      logits = []
      train_lib.evaluate(lambda images, v: train_lib.float_logits(float_model.model, v, images), iter(eval_data),
                         run.mesh, desc="float reference", args=(float_model.variables,), logits_out=logits)
      float_logits = tuple(logits)
    return cls(run, float_model, pipeline.calibrate(run, float_model), pipeline.calibration_batches(run.config),
               eval_data, float_logits)


def as_list(values) -> list:
  """A config tuple; tolerates 'a,b' strings (what a --config.x=a,b override can leave).

  Args:
    values: A string, or a sequence whose strings may hold comma-separated items.

  Returns:
    A flat list; string items are split on ',' and stripped, other items kept as they are.
  """
  if isinstance(values, str):
    values = (values,)
  return [v.strip() if isinstance(v, str) else v for item in values
          for v in (item.split(",") if isinstance(item, str) else [item])]


FIDELITY = train_lib.FIDELITY_METRICS


def fidelity(metrics: dict) -> dict:
  """The distance-to-float fields of train.evaluate's metrics (present when it had the reference).

  Args:
    metrics: train.evaluate's metrics dict.

  Returns:
    A dict with those of FIDELITY's keys (agreement, KL, SQNR) that `metrics` has.
  """
  return {k: metrics[k] for k in FIDELITY if k in metrics}


def refusal(verdict: dict) -> str | None:
  """Why the QAT judge refused a baseline (`judge.judge_uniform_qat`'s verdict), or None.

  Args:
    verdict: The judge's report ('accepted', 'failed', 'images', 'before_qat', 'after_qat',
      'margins').

  Returns:
    One line with the failed checks, the figures before and after QAT and the margins; None when
    the verdict accepts.
  """
  if verdict.get("accepted", True):
    return None
  before, after, margins = verdict.get("before_qat") or {}, verdict.get("after_qat") or {}, verdict.get("margins") or {}
  return (f"worse than its PTQ start ({', '.join(verdict.get('failed') or ['judged worse'])}) on "
          f"{verdict.get('images', 'held-out images')}: top-1 {_opt(before.get('top1'), '.2f')}% -> "
          f"{_opt(after.get('top1'), '.2f')}%, KL {_opt(before.get('kl'), '.4g')} -> {_opt(after.get('kl'), '.4g')} "
          f"(margins: top-1 drop {margins.get('judge_top1_drop')}, KL rise {margins.get('judge_kl_rise')})")


def row_refusal(row: dict) -> str | None:
  """Why a result row (Row.to_json) was refused by the QAT judge, or None for an accepted row or
  one without a judgement. Refused rows are reported with the reason and left out of every
  summary: the Pareto plot, and the paper tables' averages and margins.

  Args:
    row: A row dict.

  Returns:
    The reason, or None.
  """
  if row.get("refused"):
    return row["refused"]
  return refusal(row["judge"]) if isinstance(row.get("judge"), dict) else None


def row_failure(row: dict) -> str | None:
  """Why a result row's run failed (its training diverged: the row has no figures), or None.

  Args:
    row: A row dict.

  Returns:
    The reason, or None.
  """
  return row.get("failed") or None


def _refused_note(out: dict) -> str:
  """The suffix a QAT baseline's setting gets when the judge refused it ('' when accepted)."""
  return "" if out["judge"]["accepted"] else " (refused: worse than its PTQ start on held-out images)"


def _judged(extra: dict, verdict: dict, selection: dict | None = None) -> dict:
  """A QAT baseline row's extra fields: the verdict, the refusal's reason when it refuses, and the
  learning-rate selection's record when the rate was chosen from finetune.lr_grid."""
  reason = refusal(verdict)
  return {**extra, "judge": verdict, **({"refused": reason} if reason else {}),
          **({"lr_selection": selection} if selection else {})}


def _rate_note(out: dict) -> str:
  """A QAT baseline's learning rate in its setting: as configured, or chosen on held-out images."""
  return lr_select.summary(out.get("lr_selection")) or f"lr {out['learning_rate']:g}"


def holdout_figures(judgement: dict | None) -> dict | None:
  """A finetuned model's held-out figures from its finetune judge's report (`judge.judge_finetune`):
  top-1 and KL at judge.JUDGE_RATIOS on training images kept out of its training, the figures
  a choice between finetuning variants may use (the eval split's may not).

  Args:
    judgement: the judge report, or None.

  Returns:
    {"images", "num_images", "top1@<ratio>", "kl@<ratio>"...}, or None when the model was not judged.
  """
  after = (judgement or {}).get("after_finetuning")
  if not after:
    return None
  figures = {"images": judgement.get("images"), "num_images": judgement.get("num_images")}
  for ratio, m in sorted(after.items(), key=lambda kv: float(kv[0])):
    figures[f"top1@{float(ratio):g}"], figures[f"kl@{float(ratio):g}"] = m["top1"], m["kl"]
  return figures


def method_workdir(workdir: str, method: str) -> str:
  """The sub-workdir a compare method keeps its own stages in: <workdir>/compare/<method>."""
  return os.path.join(workdir, "compare", method)


def finetune_workdir(workdir: str, method: str) -> str | None:
  """The workdir whose finetune stage made a FlexiQ-family method's finetuned rows (None for other
  methods): the run's own for flexiq, compare/<method> for the single-point and finetuned variants."""
  if method == "flexiq":
    return workdir
  if method == "flexiq_100only" or method in FINETUNED_VARIANTS:
    return method_workdir(workdir, method)
  return None


def _lacks(row: dict, key: str) -> bool:
  """Whether a cached row is a finetuned one without the figures `key` ('holdout', 'holdout_select');
  a failed row has none to have."""
  return bool(row.get("finetuned")) and key not in row and not row.get("failed")


def _lacks_selection_figures(entry: list) -> bool:
  """Whether a method's cached rows (its rows cache entry) include a finetuned row without
  'holdout_select'."""
  return any(_lacks(r, "holdout_select") for r in entry)


def _with_holdout(workdir: str, method: str, rows: list[dict]) -> list[dict]:
  """Cached finetuned rows made before rows carried held-out figures get them from the judge report
  of the finetune stage that made them (the same stage: the rows' key and the stage's fingerprint
  both come from the config); rows that have them, or whose stage has no report, are left as they are."""
  lacks = lambda r: _lacks(r, "holdout")
  where = finetune_workdir(workdir, method)
  if where is None or not any(map(lacks, rows)) or not os.path.exists(os.path.join(where, "finetune", "done.json")):
    return rows
  holdout = holdout_figures(pipeline.finetune_judgement(where))
  if holdout is None:
    return rows
  return [{**r, "holdout": holdout} if lacks(r) else r for r in rows]


def selection_figures(ctx: "CompareContext", quantized) -> dict | None:
  """A finetuned FlexiQ model's figures on the learning-rate selection's held-out images (all of
  them: `lr_select.held_out`, the images and scoring every candidate of every grid gets), at
  judge.JUDGE_RATIOS: what T3 compares finetuned variants by. None without finetune.lr_grid and
  data.holdout_split: without a holdout split the selection's images are those the configured QAT
  methods' batches do not reach, and a variant that draws other batches (another seed, more
  steps) may have trained on some of them.

  Args:
    ctx: the comparison context (its config's held-out images, its float model).
    quantized: the finetuned model.

  Returns:
    {"images", "num_images", "top1@<ratio>", "kl@<ratio>"...}, or None.
  """
  if not (ctx.config.finetune.get("lr_grid", ()) and ctx.config.data.get("holdout_split")):
    return None
  held = lr_select.held_out(ctx.config)
  scores = pipeline.held_out_scores(ctx.config, ctx.float_model, quantized, held)
  figures = {"images": held.source, "num_images": int(len(held.labels))}
  for r in judge_lib.JUDGE_RATIOS:
    figures[f"top1@{r:g}"], figures[f"kl@{r:g}"] = scores[f"ratio {r:g}"]["top1"], scores[f"ratio {r:g}"]["kl"]
  return figures


def _sweep_rows(method, ctx: "CompareContext", run, quantized, judgement: dict | None = None) -> list[Row]:
  # A finetuned model carries the record of its learning-rate selection (when a grid chose it), its
  # held-out figures (the judge's report: `judgement`, else the run's finetune stage's) and, with a
  # grid, its figures on the selection's held-out images (`selection_figures`).
  extra = {}
  if quantized.finetuned:
    selection = pipeline.lr_selection(run.workdir)
    holdout = holdout_figures(judgement if judgement is not None else pipeline.finetune_judgement(run.workdir))
    select = selection_figures(ctx, quantized)
    extra = {**({"lr_selection": selection} if selection else {}), **({"holdout": holdout} if holdout else {}),
             **({"holdout_select": select} if select else {})}
  return [Row(method, f"ratio {p.ratio:g}" + (" (finetuned)" if quantized.finetuned else ""), p.top1,
              p.relative_bops, {"ratio": p.ratio, "low_bit_mac_share": p.low_bit_mac_share,
                                "finetuned": quantized.finetuned, "agreement": p.agreement, "kl": p.kl,
                                "sqnr_db": p.sqnr_db, **extra})
          for p in pipeline.sweep(run, quantized, desc=method, float_logits=ctx.float_logits)]


def _flexiq_quantized(ctx: CompareContext):
  return pipeline.run_until(ctx.run, "quantize", float_model=ctx.float_model, evaluate=False,
                            calibration=ctx.calibration).quantized


def flexiq(ctx: CompareContext) -> list[Row]:
  """The configured FlexiQ pipeline, swept before and (compare.finetune) after finetuning.

  Args:
    ctx: The comparison context.

  Returns:
    One Row per sweep ratio, before finetuning and (with compare.finetune) after it.
  """
  quantized = _flexiq_quantized(ctx)
  rows = _sweep_rows("flexiq", ctx, ctx.run, quantized)
  if ctx.config.compare.finetune:
    rows += _sweep_rows("flexiq", ctx, ctx.run, pipeline.finetune(ctx.run, ctx.float_model, quantized))
  return rows


# The ratios the single-point FlexiQ network is swept at: its own point and what it leaves of the others.
ONLY100_RATIOS = (0.0, 0.5, 1.0)


def _one_pass_epochs(config) -> float:
  """The epochs of a one-pass-a-step finetune with exactly the passes of the configured one
  (`finetune.pass_matched_steps`): num_epochs x passes_per_step, unless rounding to whole steps
  makes that another number of steps (then the epochs of exactly that many)."""
  train_size = pipeline.train_examples(config)
  steps = finetune_lib.pass_matched_steps(config.finetune, train_size, passes=1)
  epochs = float(config.finetune.num_epochs) * finetune_lib.passes_per_step(config.finetune)
  if train_lib.total_steps_of(epochs, train_size, config.finetune.batch_size) == steps:
    return epochs
  return (steps - 0.5) * config.finetune.batch_size / train_size


def flexiq_100only_config(config):
  """The run config of `flexiq_100only`: `config` with every QAT step at ratio 1, no every-step
  ratios, the configured multi-ratio finetuning's passes as steps, and the sweep at ONLY100_RATIOS.

  Args:
    config: the configured run config.

  Returns:
    A copy of it, changed.
  """
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.finetune.levels, cfg.finetune.level_probs, cfg.finetune.uniform_prob = (1.0,), (1.0,), 0.0
    cfg.finetune.every_step_ratios, cfg.finetune.every_step_weights = (), ()
    cfg.finetune.num_epochs = _one_pass_epochs(config)
    cfg.sweep.ratios = ONLY100_RATIOS
  return cfg


def flexiq_100only(ctx: CompareContext) -> list[Row]:
  """FlexiQ's quantized model finetuned for 100 % only (LSQ's setting: one network for one point),
  in compare/flexiq_100only: every step at ratio 1, no every-step ratios, and as many
  forward+backward passes as FlexiQ's multi-ratio finetuning makes (`finetune.passes_per_step`).

  Args:
    ctx: The comparison context.

  Returns:
    One Row per ratio of ONLY100_RATIOS after this finetuning.
  """
  quantized = _flexiq_quantized(ctx)
  run = pipeline.Run(flexiq_100only_config(ctx.config), method_workdir(ctx.run.workdir, "flexiq_100only"),
                     ctx.run.mesh)
  return _sweep_rows("flexiq_100only", ctx, run, _finetune_as_defined(run, ctx, quantized))


def _variant_run(ctx: CompareContext, name: str, overrides: dict) -> pipeline.Run:
  """The run of FlexiQ with config changes (dotted field -> value), in compare/<name>."""
  cfg = copy.deepcopy(ctx.config)
  with cfg.unlocked():
    for dotted, value in overrides.items():
      section, key = dotted.split(".")
      cfg[section][key] = value
  return pipeline.Run(cfg, method_workdir(ctx.run.workdir, name), ctx.run.mesh)


def _flexiq_variant(ctx: CompareContext, name: str, overrides: dict) -> list[Row]:
  """FlexiQ with config changes, in its own sub-workdir (its stage fingerprints differ)."""
  ablation_ratios = ctx.config.compare.get("ablation_ratios", ())
  if ablation_ratios:  # the variants are compared at a few ratios; every ratio costs a pass over the eval split
    overrides = {"sweep.ratios": tuple(float(r) for r in ablation_ratios), **overrides}
  run = _variant_run(ctx, name, overrides)
  quantized = pipeline.run_until(run, "quantize", float_model=ctx.float_model, evaluate=False).quantized
  return _sweep_rows(name, ctx, run, quantized)


# The ratios the finetuned variants are swept at: the two ends and the middle.
FINETUNED_VARIANT_RATIOS = (0.0, 0.5, 1.0)


def _finetune_as_defined(run: pipeline.Run, ctx: CompareContext, quantized):
  """A compare method's own finetune (`pipeline.finetune`: a finetuned variant's, flexiq_100only's).
  Its directory belongs to the sweep: a finetune there made under an earlier definition of the
  method (other field values) is moved to compare/<method>/replaced/<time>/ (kept) and the stage
  redone, where `run.py` would refuse."""
  try:
    return pipeline.finetune(run, ctx.float_model, quantized)
  except stage_cache.StageConfigChanged as e:
    print(f"note: {os.path.relpath(run.workdir)}: the method's definition changed since its finetune ran "
          f"({e.changed}); redoing it")
    pipeline.replace_stages(run.workdir, "finetune")
    return pipeline.finetune(run, ctx.float_model, quantized)


def _flexiq_finetuned_variant(ctx: CompareContext, name: str, overrides: dict) -> list[Row]:
  """FlexiQ with config changes, finetuned, in compare/<name>, swept after finetuning at
  FINETUNED_VARIANT_RATIOS. Stages the changes leave as they are (calibration and selection for
  a finetuning change) are taken over from the main run's workdir, not recomputed. With
  finetune.lr_grid the variant trains once, at the rate the main run's finetune chose, unless it
  is one of OWN_RATE_VARIANTS: those choose their own rate from the grid, as the configured
  pipeline does."""
  main = _flexiq_quantized(ctx)  # the main run's stages first, so that the variant can share them
  if ctx.config.finetune.get("lr_grid", ()) and name not in OWN_RATE_VARIANTS:
    # One change at a time: the variant trains at the rate the configured pipeline chose.
    pipeline.finetune(ctx.run, ctx.float_model, main)
    chosen = float(pipeline.lr_selection(ctx.run.workdir)["chosen"])
    overrides = {"finetune.lr_grid": (), "finetune.learning_rate": chosen, **overrides}
  run = _variant_run(ctx, name, {"sweep.ratios": FINETUNED_VARIANT_RATIOS, **overrides})
  pipeline.seed_stages(run, [ctx.run.workdir])
  quantized = pipeline.run_until(run, "quantize", float_model=ctx.float_model, evaluate=False).quantized
  try:
    return _sweep_rows(name, ctx, run, _finetune_as_defined(run, ctx, quantized))
  except judge_lib.FinetuneRefused as e:
    # An ablation's result is reported either way: the refused model as trained, marked refused.
    refused = pipeline.refused_finetune(run, quantized)
    if refused is None:
      raise
    model, report = refused
    reason = f"refused by the finetune judge on {report.get('images')}: {report.get('summary')}"
    print(f"warning: {name}: {str(e).split('. It was not installed')[0]}; its rows are marked refused")
    return [dataclasses.replace(r, extra={**r.extra, "refused": reason})
            for r in _sweep_rows(name, ctx, run, model, judgement=report)]
  except train_lib.NonFiniteError as e:
    # A variant that diverges at the configured rate is a result too: one failed row per ratio.
    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    print(f"warning: {name}: its finetuning failed ({reason}); its rows are marked failed")
    return [Row(name, f"ratio {r:g} (finetuned)", None, None, {"ratio": r, "finetuned": True, "failed": reason})
            for r in FINETUNED_VARIANT_RATIOS]


# FlexiQ's 4-bit fixes one at a time against the configured pipeline, after finetuning (T3):
# method -> (config changes, what it tests). A callable value is computed from the configured config.
SANDWICH = (0.0, 1.0)


def _sandwich_one_pass_epochs(config) -> float:
  """The epochs of a one-ratio-a-step finetune with the passes of the sandwich variant (the
  configured finetune with every_step_ratios SANDWICH)."""
  sandwich = copy.deepcopy(config)
  with sandwich.unlocked():
    sandwich.finetune.every_step_ratios, sandwich.finetune.every_step_weights = SANDWICH, ()
  return _one_pass_epochs(sandwich)


# The weighted samplers: the share of steps at exactly ratio 1 and exactly ratio 0 among the level
# draws, and the share of steps at a continuous ratio (the configured sampler: 0.5, levels uniform,
# so 10 % of the steps at each of 0, 0.25, 0.5, 0.75 and 1). flexiq_ends weights both ends;
# flexiq_top only ratio 1, ratio 0 kept at its configured 10 % of the steps.
ENDS_LEVEL_PROBS = {1.0: 0.45, 0.0: 0.25}
TOP_LEVEL_PROBS = {1.0: 0.45, 0.0: 0.125}
ENDS_UNIFORM_PROB = 0.2


def _weighted_sampler(config, level_probs: dict) -> dict:
  """The configured sampler's levels (0 and select.levels) drawn with `level_probs` ({level:
  probability among the level draws}; the other levels share the rest equally) and fewer
  continuous ratios (ENDS_UNIFORM_PROB): one ratio a step, the configured number of steps."""
  levels = tuple(float(l) for l in config.finetune.levels) or (0.0,) + tuple(float(l) for l in config.select.levels)
  middle = [l for l in levels if l not in level_probs]
  rest = round((1.0 - sum(level_probs[l] for l in levels if l in level_probs)) / max(len(middle), 1), 12)
  return {"finetune.levels": levels, "finetune.level_probs": tuple(level_probs.get(l, rest) for l in levels),
          "finetune.uniform_prob": ENDS_UNIFORM_PROB}


def _ends_weighted_sampler(config) -> dict:
  """The sampler weighted to both ends (ENDS_LEVEL_PROBS)."""
  return _weighted_sampler(config, ENDS_LEVEL_PROBS)


def _top_weighted_sampler(config) -> dict:
  """The sampler weighted to ratio 1 only (TOP_LEVEL_PROBS)."""
  return _weighted_sampler(config, TOP_LEVEL_PROBS)


def _ends_weighted_affine(config) -> dict:
  """The sampler weighted to both ends and the ratio affine, together."""
  return {**_ends_weighted_sampler(config), "finetune.ratio_affine": True}


def _learnt_rounding(config) -> dict:
  """The learnt 4-bit rounding before the QAT, at the AdaRound baseline's iterations and images."""
  return {"finetune.rounding_iterations": int(config.compare.adaround_iterations),
          "finetune.rounding_images": int(config.compare.adaround_images)}


def _learnt_rounding_joint(config) -> dict:
  """The learnt rounding reconstructing ratios 0, 0.5 and 1 at once."""
  return {**_learnt_rounding(config), "finetune.rounding_ratios": JOINT_ROUNDING_RATIOS}


JOINT_ROUNDING_RATIOS = (0.0, 0.5, 1.0)


FINETUNED_VARIANTS = {
    "flexiq_reseed": ({"finetune.seed_offset": 1}, "the configured pipeline finetuned again at the rate it chose, "
                      "with another QAT seed (batches and ratio draws): trained, like every variant but "
                      "OWN_RATE_VARIANTS, without a rate selection on the held-out images, so T3's control for "
                      "them"),
    "flexiq_max127": ({"quant.weight_scale": "max127"}, "the 8-bit weight grid max|w|/127 (the largest weight "
                      "shrinks when lowered)"),
    "flexiq_joint": ({"quant.weight_scale": "joint"}, "the 8-bit weight scale fitted per channel for 8 and 4 bits"),
    "flexiq_sandwich": ({"finetune.every_step_ratios": SANDWICH, "finetune.every_step_weights": ()},
                        "ratios 0 and 1 trained at every step besides the sampled one (three passes per step)"),
    "flexiq_sandwich_w4": ({"finetune.every_step_ratios": SANDWICH, "finetune.every_step_weights": (1.0, 2.0)},
                           "the sandwich with the 4-bit end's loss weighted 2 (ratio 0 and the sampled ratio "
                           "weigh 1; three passes per step)"),
    "flexiq_long": ({"finetune.every_step_ratios": (), "finetune.every_step_weights": (),
                     "finetune.num_epochs": _sandwich_one_pass_epochs},
                    "one sampled ratio a step, as many steps as the sandwich's passes (the sandwich's budget "
                    "without its ends)"),
    "flexiq_ends": (_ends_weighted_sampler, "the ratio sampler weighted to the ends (ratio 1 in about 36 % of the "
                    "steps, ratio 0 in 20 %, against 10 % each configured; the same steps and passes)"),
    "flexiq_top": (_top_weighted_sampler, "the ratio sampler weighted to ratio 1 only (ratio 1 in about 36 % of "
                   "the steps, ratio 0 in its configured 10 %; the same steps and passes)"),
    "flexiq_lsq": ({"finetune.lsq": True, "finetune.lsq_weights": True, "finetune.lsq_grad_scale": "effective",
                    "finetune.lsq_weight_grad_scale": "effective", "finetune.lsq_learning_rate": 0.0},
                   "learnt activation and weight scales (LSQ: the gradient scale of each channel's own grid, "
                   "weights' included; the scales at the weights' rate, as in LSQ)"),
    "flexiq_affine": ({"finetune.ratio_affine": True}, "a learnt output gain and bias per lowerable layer and "
                      "output channel, scaled by the share of its inputs lowered at the ratio (the identity at "
                      "ratio 0): the freedom a per-precision batch norm gives a switchable network"),
    "flexiq_ends_affine": (_ends_weighted_affine, "flexiq_ends and flexiq_affine together (the same steps and "
                           "passes)"),
    "flexiq_refresh_quantized": ({"finetune.refresh_source": "quantized"}, "the refresh's bias-correction means "
                                 "from the quantized model's own layer inputs"),
    "flexiq_symmetric": ({"quant.act_grid": "symmetric"}, "signed inputs on the symmetric grid (signed codes) "
                         "everywhere, no zero point"),
    "flexiq_distill": ({"finetune.distill_weight": 1.0}, "the loss the KL to the float model only (no label "
                       "term: the quantized model follows the float one, not the training labels)"),
    "flexiq_rounding": (_learnt_rounding, "each lowerable layer's 4-bit rounding learnt before the QAT "
                        "(finetune.rounding: AdaRound's reconstruction on the extracted grid, the 8-bit codes "
                        "placed to extract to it), with the AdaRound baseline's iterations and images"),
    "flexiq_rounding_joint": (_learnt_rounding_joint, "the learnt rounding trained on the output error at "
                              "ratios 0, 0.5 and 1 at once (the 8-bit codes it moves and the half-lowered "
                              "layers counted), with the AdaRound baseline's iterations and images"),
    "flexiq_rounding_joint_lr": (_learnt_rounding_joint, "flexiq_rounding_joint with its own learning rate, "
                                 "chosen from finetune.lr_grid on the held-out images by the configured "
                                 "pipeline's criterion (the QAT from the rounded weights may want another rate "
                                 "than the QAT from the nearest rounding)"),
}
# The finetuned variants that choose their learning rate from finetune.lr_grid themselves (each
# candidate rate trains the whole budget); the others train once, at the configured pipeline's
# chosen rate, so that one change is measured at a time.
OWN_RATE_VARIANTS = ("flexiq_rounding_joint_lr",)


def resolve_variant_changes(name: str, config) -> dict:
  """The config changes of finetuned variant `name` for `config`, its callable values computed.

  Args:
    name: a key of FINETUNED_VARIANTS.
    config: the configured run config.

  Returns:
    Dotted field -> value.
  """
  changes = FINETUNED_VARIANTS[name][0]
  if callable(changes):  # the whole set of changes computed from the config
    return changes(config)
  return {k: v(config) if callable(v) else v for k, v in changes.items()}


def _finetuned_variant_method(name: str):
  _, what = FINETUNED_VARIANTS[name]

  def method(ctx: CompareContext) -> list[Row]:
    return _flexiq_finetuned_variant(ctx, name, resolve_variant_changes(name, ctx.config))

  method.__name__ = name
  method.__doc__ = (f"FlexiQ with {what}, finetuned, in compare/{name}: one row per ratio of "
                    f"FINETUNED_VARIANT_RATIOS after finetuning.")
  return method


def flexiq_naive(ctx: CompareContext) -> list[Row]:
  """FlexiQ with naive bit extraction (quant.extraction='naive'), in compare/flexiq_naive.

  Args:
    ctx: The comparison context.

  Returns:
    One Row per sweep ratio (compare.ablation_ratios when set), before finetuning.
  """
  return _flexiq_variant(ctx, "flexiq_naive", {"quant.extraction": "naive"})


def flexiq_random(ctx: CompareContext) -> list[Row]:
  """FlexiQ with random channel orders (select.channel_order='random'), in compare/flexiq_random.

  Args:
    ctx: The comparison context.

  Returns:
    One Row per sweep ratio (compare.ablation_ratios when set), before finetuning.
  """
  return _flexiq_variant(ctx, "flexiq_random", {"select.channel_order": "random"})


def flexiq_uniform(ctx: CompareContext) -> list[Row]:
  """FlexiQ with the uniform selector (select.selector='uniform'), in compare/flexiq_uniform.

  Args:
    ctx: The comparison context.

  Returns:
    One Row per sweep ratio (compare.ablation_ratios when set), before finetuning.
  """
  return _flexiq_variant(ctx, "flexiq_uniform", {"select.selector": "uniform"})


def flexiq_greedy(ctx: CompareContext) -> list[Row]:
  """FlexiQ with the greedy-by-range selector (select.selector='greedy'), in compare/flexiq_greedy.

  Args:
    ctx: The comparison context.

  Returns:
    One Row per sweep ratio (compare.ablation_ratios when set), before finetuning.
  """
  return _flexiq_variant(ctx, "flexiq_greedy", {"select.selector": "greedy"})


def flexiq_no_bias_correction(ctx: CompareContext) -> list[Row]:
  """FlexiQ without bias correction (quant.bias_correction=False), in compare/flexiq_no_bias_correction.

  Args:
    ctx: The comparison context.

  Returns:
    One Row per sweep ratio (compare.ablation_ratios when set), before finetuning.
  """
  return _flexiq_variant(ctx, "flexiq_no_bias_correction", {"quant.bias_correction": False})


def flexiq_amp(ctx: CompareContext) -> list[Row]:
  """FlexiQ with per-layer ratios from the mixed-precision search, at each select.levels value.

  Args:
    ctx: The comparison context.

  Returns:
    One Row per level the search's Pareto list reaches, with the level, the 4-bit MAC shares and
    the fidelity fields.
  """
  quantized = _flexiq_quantized(ctx)
  res = driver.flexiq_search(ctx.config, ctx.run.workdir, ctx.float_model, ctx.calibration, ctx.calib_batches,
                             quantized, ctx.run.mesh)
  qmodel = quantized.qmodel
  predict = lambda images, qv, counts: qmodel.apply_counts(qv, images, counts)
  layers, matmuls = ctx.calibration.plan.layer_infos(), ctx.calibration.plan.matmul_infos()
  rows = []
  for level, sel in res["counts_at_level"].items():
    counts = {p: jnp.int32(c) for p, c in sel["counts"].items()}
    m = train_lib.evaluate(predict, iter(ctx.eval_data), ctx.run.mesh, desc="flexiq_amp",
                           args=(quantized.qvars, counts), reference_logits=ctx.float_logits)
    rows.append(Row("flexiq_amp", f"ratio {level:g} (AMP per-layer ratios)", m["top1"],
                    cost.relative_bops(layers, sel["counts"], matmuls=matmuls),
                    {"ratio": level, "low_bit_mac_share": cost.low_bit_mac_share(layers, sel["counts"], matmuls),
                     "lowerable_share": sel["share"], **fidelity(m)}))
  return rows


def layerwise_amp(ctx: CompareContext) -> list[Row]:
  """The layer-wise mixed-precision search, one point per compare.allowed_drops. The drop is
  allowed on the score images (a validation slice of train); each row also reports the drop
  measured on the eval split against the float model.

  Args:
    ctx: The comparison context (reads compare.allowed_drops).

  Returns:
    One Row per allowed drop, with the chosen candidates, the score-split and eval-split drops and
    the search's outcome in `extra`.
  """
  rows = []
  score_data = driver.score_batches(ctx.config)
  float_eval = ctx.float_top1()
  for drop in as_list(ctx.config.compare.allowed_drops):
    res = driver.layerwise_search(ctx.config, ctx.run.workdir, ctx.float_model, ctx.calibration, ctx.calib_batches,
                                  ctx.run.mesh, allowed_drop=float(drop), score_data=score_data)
    m = _evaluate_search(ctx, res)
    top1 = m["top1"]
    s = res.summary
    rows.append(Row("layerwise_amp", f"allowed drop {float(drop):g}", m["top1"],
                    _layerwise_bops(ctx.calibration.plan, res.weight_bits, res.act_bits),
                    {"candidates": s["chosen_candidates"], "allowed_drop": float(drop),
                     "score_data_top1": s["chosen"]["score"], "score_float_top1": s["reference_score"],
                     "score_drop": s["reference_score"] - s["chosen"]["score"],
                     "float_eval_top1": float_eval, "eval_drop": float_eval - top1,
                     "search_relative_cost": s["chosen"]["relative_cost"], "baseline": s["baseline"],
                     "early_exit": s["early_exit"], "target": s["target"], "target_met": s["target_met"],
                     **fidelity(m)}))
  if ctx.config.compare.get("amp_at_4bit_budget", False):
    rows += _amp_at_4bit_budget(ctx, score_data)
  return rows


def _evaluate_search(ctx: CompareContext, res) -> dict:
  """The metrics of a layer-wise search's configuration on the eval data, against the float logits."""
  ev = driver.LayerwiseEvaluator(ctx.float_model.model, ctx.calibration.plan, ctx.calibration.folded, res.tables,
                                 ctx.run.mesh)
  return ev.metrics(ctx.eval_data, jnp.asarray(res.weight_bits), jnp.asarray(res.act_bits), ctx.float_logits)


def _layerwise_bops(plan, weight_bits, act_bits) -> float:
  """A layer-wise configuration's BOPs relative to W8A8 with the matmuls at 8 x 8 bits, as every
  other row's (the search's own cost is relative to its baseline candidate over the layers);
  width 0 is float."""
  return baselines.relative_bops(plan, {p: (int(w) or FLOAT_BITS, int(a) or FLOAT_BITS)
                                        for p, w, a in zip(plan.quantized, weight_bits, act_bits)})


def _amp_at_4bit_budget(ctx: CompareContext, score_data) -> list[Row]:
  """Layer-wise AMP's Pareto point of the largest BOPs not above uniform W4A4's (with the ends
  as compare.keep_ends keeps them: FlexiQ's 100 % point); no row where the search reached none
  that cheap (the tables then say AMP could not match)."""
  plan = ctx.calibration.plan
  budget = baselines.relative_bops(plan, baselines.uniform_bits(plan, (4, 4), ctx.config.compare.keep_ends))
  drop = float(as_list(ctx.config.compare.allowed_drops)[0])  # any drop: the Pareto front is the same
  # early_exit=False: the front is built even where the baseline step would end this drop's search.
  res = driver.layerwise_search(ctx.config, ctx.run.workdir, ctx.float_model, ctx.calibration, ctx.calib_batches,
                                ctx.run.mesh, allowed_drop=drop, score_data=score_data, early_exit=False,
                                max_cost=(lambda wb, ab: _layerwise_bops(plan, wb, ab), budget))
  if res is None:
    return []
  m, s, float_eval = _evaluate_search(ctx, res), res.summary, ctx.float_top1()
  return [Row("layerwise_amp", f"Pareto point at the 4-bit budget (relative BOPs <= {budget:.3f})", m["top1"],
              _layerwise_bops(plan, res.weight_bits, res.act_bits),
             {"candidates": s["chosen_candidates"], "budget": budget, "chosen_by": s["chosen_by"],
              "search_relative_cost": s["chosen"]["relative_cost"], "baseline": s["baseline"],
              "float_eval_top1": float_eval, "eval_drop": float_eval - m["top1"], **fidelity(m)})]


def _ptq(ctx: CompareContext, method: str) -> list[Row]:
  """Uniform W8A8 and W4A4 post-training quantization with `method` ranges."""
  plan, keep_ends = ctx.calibration.plan, ctx.config.compare.keep_ends
  tables = ctx.ptq_tables(method)
  ev = driver.LayerwiseEvaluator(ctx.float_model.model, plan, ctx.calibration.folded, tables, ctx.run.mesh)
  rows = []
  for bits in ((8, 8), (4, 4)):
    assignment = baselines.uniform_bits(plan, bits, keep_ends)
    wb, ab = apply_lib.bits_arrays(plan, assignment)
    ends = " (ends W8A8)" if keep_ends and bits != (8, 8) else ""
    m = ev.metrics(ctx.eval_data, wb, ab, ctx.float_logits)
    rows.append(Row(f"ptq_{method}", f"W{bits[0]}A{bits[1]}{ends}", m["top1"],
                    baselines.relative_bops(plan, assignment), fidelity(m)))
  return rows


def _adaround_w4a4(ctx: CompareContext):
  """AdaRound's uniform W4A4 weights on the MSE ranges (compare.keep_ends, adaround_images,
  adaround_iterations): (tables, bits, images, settings, variables, per-layer report)."""
  cc, plan = ctx.config.compare, ctx.calibration.plan
  tables = ctx.ptq_tables("mse")
  bits = baselines.uniform_bits(plan, (4, 4), cc.keep_ends)
  images = jnp.concatenate(ctx.calib_batches)[:cc.adaround_images]
  settings = adaround_lib.AdaRoundSettings(iterations=cc.adaround_iterations)
  variables, report = adaround_lib.adaround_weights(ctx.float_model.model, plan, ctx.calibration.folded, tables,
                                                    bits, images, settings, seed=ctx.config.seed)
  return tables, bits, images, settings, variables, report


def adaround(ctx: CompareContext) -> list[Row]:
  """Uniform W4A4 PTQ with AdaRound weight rounding (compare.adaround) on MSE ranges.

  Args:
    ctx: The comparison context (reads compare.keep_ends, adaround_images, adaround_iterations).

  Returns:
    A one-Row list, with the mean flipped share and the mean AdaRound / nearest reconstruction MSE
    ratio in `extra`.
  """
  cc, plan, model = ctx.config.compare, ctx.calibration.plan, ctx.float_model.model
  tables, bits, images, settings, variables, report = _adaround_w4a4(ctx)
  ev = driver.LayerwiseEvaluator(model, plan, variables, tables, ctx.run.mesh)
  m = ev.metrics(ctx.eval_data, *apply_lib.bits_arrays(plan, bits), ctx.float_logits)
  ends = " (ends W8A8)" if cc.keep_ends else ""
  mse_ratio = [r["mse_adaround"] / max(r["mse_nearest"], 1e-30) for r in report.values()]
  return [Row("adaround", f"W4A4{ends}, {settings.iterations} iterations/layer", m["top1"],
              baselines.relative_bops(plan, bits),
              {**fidelity(m), "images": int(images.shape[0]),
               "flipped_share": float(np.mean([r["flipped_share"] for r in report.values()])),
               "reconstruction_mse_vs_nearest": float(np.mean(mse_ratio))})]


def ptq_minmax(ctx: CompareContext) -> list[Row]:
  """Uniform W8A8 and W4A4 post-training quantization with min-max ranges.

  Args:
    ctx: The comparison context.

  Returns:
    Two Rows, W8A8 and W4A4.
  """
  return _ptq(ctx, "minmax")


def ptq_mse(ctx: CompareContext) -> list[Row]:
  """Uniform W8A8 and W4A4 post-training quantization with MSE-fitted ranges.

  Args:
    ctx: The comparison context.

  Returns:
    Two Rows, W8A8 and W4A4.
  """
  return _ptq(ctx, "mse")


def lsq_qat(ctx: CompareContext) -> list[Row]:
  """Uniform W4A4 QAT with LSQ, with FlexiQ's finetuning budget.

  Checkpoints go to compare/lsq_qat/<fingerprint of method_fields>, or to the directory of the
  older fingerprint of the same values when only that exists.

  Args:
    ctx: The comparison context (reads compare.lsq_init and compare.keep_ends).

  Returns:
    A one-Row list; when the judge refused the result, the setting says so and the row's
    'refused' field gives the reason (`row_refusal`).
  """
  cc, plan = ctx.config.compare, ctx.calibration.plan
  tables = ctx.ptq_tables(cc.lsq_init)
  bits = baselines.uniform_bits(plan, (4, 4), cc.keep_ends)
  # Its checkpoints sit under a fingerprint of what they depend on: a finished run of another
  # recipe (or calibration) must not be restored and evaluated as if it were this one.
  key = stage_cache.fingerprint(method_fields(ctx.config, "lsq_qat", plan))
  workdir = os.path.join(method_workdir(ctx.run.workdir, "lsq_qat"), key)
  legacy = os.path.join(method_workdir(ctx.run.workdir, "lsq_qat"), stage_cache.fingerprint(stage_options.fingerprint_fields(
      ctx.config, "finetune", "compare.lsq_init", "compare.keep_ends", "compare.lsq_learning_rate")))
  # The same values keyed the older way (a run with quantized matmuls never was: those ran them float).
  if not os.path.exists(workdir) and os.path.exists(legacy) and not apply_lib.matmul_fingerprint(plan):
    workdir = legacy
  out = baselines.lsq_qat(ctx.config, workdir, ctx.float_model.model,
                          ctx.float_model.variables, plan, ctx.calibration.folded, tables, bits, ctx.eval_data,
                          ctx.run.mesh, reference_logits=ctx.float_logits)
  ends = " (ends W8A8)" if cc.keep_ends else ""
  return [Row("lsq_qat", f"W4A4{ends}, {out['steps']} steps, {_rate_note(out)}{_refused_note(out)}", out["top1"],
              baselines.relative_bops(plan, bits), _judged(fidelity(out), out["judge"], out["lr_selection"]))]


def lsq_adaround(ctx: CompareContext) -> list[Row]:
  """Uniform W4A4 QAT with LSQ (as `lsq_qat`, the same recipe and passes) started from AdaRound's
  weights (as `adaround`, on its MSE ranges, where LSQ's scales start too): the single-point
  counterpart of FlexiQ with its learnt 4-bit rounding before the QAT (`flexiq_rounding`).

  Args:
    ctx: The comparison context (reads compare.keep_ends, adaround_images, adaround_iterations).

  Returns:
    A one-Row list, marked as in `lsq_qat` when the judge refused the result.
  """
  cc, plan, model = ctx.config.compare, ctx.calibration.plan, ctx.float_model.model
  tables, bits, _, settings, rounded, _ = _adaround_w4a4(ctx)
  workdir = os.path.join(method_workdir(ctx.run.workdir, "lsq_adaround"),
                         stage_cache.fingerprint(method_fields(ctx.config, "lsq_adaround", plan)))
  out = baselines.lsq_qat(ctx.config, workdir, model, ctx.float_model.variables, plan, rounded, tables, bits,
                          ctx.eval_data, ctx.run.mesh, reference_logits=ctx.float_logits)
  ends = " (ends W8A8)" if cc.keep_ends else ""
  return [Row("lsq_adaround", f"W4A4{ends}, AdaRound {settings.iterations} iterations/layer, then {out['steps']} "
              f"steps, {_rate_note(out)}{_refused_note(out)}", out["top1"], baselines.relative_bops(plan, bits),
              _judged(fidelity(out), out["judge"], out["lr_selection"]))]


def switchable_qat(ctx: CompareContext) -> list[Row]:
  """One network trained jointly at W8A8 and W4A4, switched at run time (Any-Precision DNN with
  LSQ scales per precision), with as many forward+backward passes as FlexiQ's finetuning.

  Args:
    ctx: The comparison context (reads compare.lsq_init and compare.keep_ends).

  Returns:
    One Row per precision of baselines.SWITCHABLE_BITS; a precision the judge refused is marked
    as in `lsq_qat`.
  """
  cc, plan = ctx.config.compare, ctx.calibration.plan
  tables = ctx.ptq_tables(cc.lsq_init)
  key = stage_cache.fingerprint(method_fields(ctx.config, "switchable_qat", plan))
  workdir = os.path.join(method_workdir(ctx.run.workdir, "switchable_qat"), key)
  outs = baselines.switchable_qat(ctx.config, workdir, ctx.float_model.model, ctx.float_model.variables, plan,
                                  ctx.calibration.folded, tables, cc.keep_ends, ctx.eval_data, ctx.run.mesh,
                                  reference_logits=ctx.float_logits)
  ends = " (ends W8A8)" if cc.keep_ends else ""
  affine = ", W4A4 output affine" if ctx.config.finetune.get("ratio_affine", False) else ""
  rows = []
  for out in outs:
    w, a = out["bits"]
    rows.append(Row("switchable_qat", f"W{w}A{a}{ends}, switchable{affine}, {out['steps']} steps, "
                    f"{_rate_note(out)}{_refused_note(out)}", out["top1"], out["relative_bops"],
                    _judged({**fidelity(out), "bits": [w, a]}, out["judge"], out["lr_selection"])))
  return rows


METHODS: dict[str, Callable[[CompareContext], list[Row]]] = {
    "flexiq": flexiq, "flexiq_naive": flexiq_naive, "flexiq_random": flexiq_random, "flexiq_uniform": flexiq_uniform,
    "flexiq_greedy": flexiq_greedy, "flexiq_no_bias_correction": flexiq_no_bias_correction, "flexiq_amp": flexiq_amp,
    "layerwise_amp": layerwise_amp, "ptq_minmax": ptq_minmax, "ptq_mse": ptq_mse, "adaround": adaround,
    "lsq_qat": lsq_qat, "lsq_adaround": lsq_adaround, "switchable_qat": switchable_qat,
    "flexiq_100only": flexiq_100only,
    **{name: _finetuned_variant_method(name) for name in FINETUNED_VARIANTS},
}
# What each method's rows depend on: the cached stage it builds on (its fingerprint fields,
# and so those of every stage before it) and config fields of its own. Besides: the eval split.
# Changing one method's knob recomputes only that method's rows.
EVAL_FIELDS = ("data.eval_split", "data.eval_examples")
_ABLATION = ("quantize", ("sweep", "compare.ablation_ratios"))
# A QAT baseline's rows: FlexiQ's recipe and pass budget (every_step_ratios sets the passes per step).
_QAT_BASELINE = (tuple(f"finetune.{k}" for k in baselines.LSQ_FINETUNE_FIELDS)
                 + ("finetune.every_step_ratios", "seed", "compare.lsq_init", "compare.keep_ends",
                    "compare.lsq_learning_rate"))
# FlexiQ finetuned for 100 % only: its quantized model and the finetune stage's fields but the ratio
# sampler's (which it sets); every_step_ratios sets its passes.
_SAMPLER_FIELDS = ("finetune.levels", "finetune.level_probs", "finetune.uniform_prob", "finetune.every_step_weights")
# The learning-rate selection's fields enter a QAT method's fingerprint only with a grid (`lr_select.config_fields`).
_LR_FIELDS = ("finetune.lr_grid", "finetune.lr_select_images", "finetune.lr_grid_extend", "data.holdout_split")
_FLEXIQ_100ONLY = ("quantize", tuple(name for name, result_free in stage_options.FinetuneOptions.config_names().items()
                                     if not result_free and name not in _SAMPLER_FIELDS + _LR_FIELDS))
# The methods whose learning rate finetune.lr_grid chooses (the finetune stage, for 'flexiq', has its own).
LR_SELECTED = ("lsq_qat", "lsq_adaround", "switchable_qat", "flexiq_100only", *OWN_RATE_VARIANTS)
# The baselines that run a plan's quantized matmuls (attention's q·kᵀ, attn·v) through the
# layer-wise or LSQ providers: where the plan quantizes any, their rows' fingerprint carries
# layerwise.apply.matmul_fingerprint (rows cached without it ran those matmuls in float); where
# the calibration put a layer on the asymmetric grid, layerwise.apply.act_grid_fingerprint (rows
# cached without it quantized that layer's input unsigned from 0).
MATMUL_BASELINES = ("layerwise_amp", "ptq_minmax", "ptq_mse", "adaround", "lsq_qat", "lsq_adaround", "switchable_qat")
METHOD_DEPENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "flexiq": ("finetune", ("sweep", "compare.finetune")),
    "flexiq_naive": _ABLATION, "flexiq_random": _ABLATION, "flexiq_uniform": _ABLATION,
    "flexiq_greedy": _ABLATION, "flexiq_no_bias_correction": _ABLATION,
    "flexiq_amp": ("quantize", ("layerwise",)),
    "layerwise_amp": ("calibrate", ("layerwise", "compare.allowed_drops", "compare.keep_ends")),
    "ptq_minmax": ("calibrate", ("compare.keep_ends",)),
    "ptq_mse": ("calibrate", ("compare.keep_ends",)),
    "adaround": ("calibrate", ("compare.keep_ends", "compare.adaround_iterations", "compare.adaround_images")),
    "lsq_qat": ("calibrate", _QAT_BASELINE),
    "switchable_qat": ("calibrate", _QAT_BASELINE),
    "lsq_adaround": ("calibrate", _QAT_BASELINE + ("compare.adaround_iterations", "compare.adaround_images")),
    "flexiq_100only": _FLEXIQ_100ONLY,
    # A finetuned variant's changes are constants or functions of the configured finetune stage's
    # fields and those before it (flexiq_long's epochs, flexiq_ends' levels), applied to those fields.
    **{name: ("finetune", ("sweep",)) for name in FINETUNED_VARIANTS},
    # ... and of the AdaRound baseline's budget, which the learnt rounding takes.
    **{name: ("finetune", ("sweep", "compare.adaround_iterations", "compare.adaround_images"))
       for name in ("flexiq_rounding", "flexiq_rounding_joint", "flexiq_rounding_joint_lr")},
}


def method_fields(config, method: str, plan=None) -> dict:
  """The fingerprint fields of `method`'s rows (a method without a declaration, e.g. one a test
  registers, depends on the finetune stage and every compare field).

  Args:
    config: The run config.
    method: A method name.
    plan: The calibration's QuantPlan: where it quantizes matmuls, the rows of MATMUL_BASELINES
      also carry `layerwise.apply.matmul_fingerprint`, and where it has layers on the asymmetric
      grid `layerwise.apply.act_grid_fingerprint`. None: a plan that quantizes no matmul and has
      no layer on the asymmetric grid.

  Returns:
    The fingerprint fields dict (stage_options.fingerprint_fields) of the method's stage, its own
    fields and the eval split fields.
  """
  stage, own = METHOD_DEPENDS.get(method, ("finetune", ("layerwise", "sweep", *_compare_fields(config))))
  if method == "flexiq_100only":  # finetune fields at their off value read as absent, as in the stage's fingerprint
    omitted = stage_options.FinetuneOptions.from_config(config).omitted_names()
    own = tuple(name for name in own if name not in omitted)
  fields = stage_options.fingerprint_fields(config, stage, *own, *EVAL_FIELDS)
  if method in MATMUL_BASELINES and plan is not None:
    fields = {**fields, **apply_lib.matmul_fingerprint(plan), **apply_lib.act_grid_fingerprint(plan)}
  if method == "switchable_qat" and config.finetune.get("ratio_affine", False):
    fields = {**fields, "finetune.ratio_affine": True}  # its W4A4 output affine; rows cached without it keep their key
  if method == "layerwise_amp" and config.compare.get("amp_at_4bit_budget", False):
    fields = {**fields, "compare.amp_at_4bit_budget": True}  # rows cached without the option keep their key
  return {**fields, **lr_select.config_fields(config)} if method in LR_SELECTED else fields


def _matmul_record(method: str, plan) -> dict:
  """How a baseline's rows ran attention's matmuls, for the tables' fairness note: {'attention_matmuls':
  'int8'} (8 bits, FlexiQ's calibrated scales) or 'float' (quant.attention='float'); {} for other
  methods and for a model without attention matmuls."""
  if method not in MATMUL_BASELINES or not getattr(plan, "matmuls", None):
    return {}
  return {"attention_matmuls": "int8" if plan.quantized_matmuls else "float"}


def _compare_fields(config) -> list[str]:
  """Every compare field except which methods run and where the reports go."""
  return [f"compare.{k}" for k in config.compare.keys() if k not in ("methods", "results_prefix")]


def _legacy_rows_fingerprint(config) -> str:
  """The one fingerprint the rows cache had for every method (the same values: its rows stay valid)."""
  return stage_cache.fingerprint(stage_options.fingerprint_fields(
      config, "finetune", "layerwise", "sweep", *_compare_fields(config), "data.eval_examples"))


ALL_METHODS = tuple(METHODS)


def run_compare(run: pipeline.Run, float_model: FloatModel, float_metrics=None, float_logits=None,
                recompute=(), after_method=None) -> dict:
  """Every method of config.compare.methods; rows cached per method in <workdir>/compare/rows.json.
  `float_logits`: the float model's logits on the eval batches (PipelineResult.float_logits);
  computed here in one pass when not given. `recompute`: methods (those of them that run) whose
  cached rows, if another commit made them, are dropped and computed again (after a code change,
  which the cache's fingerprint does not see; a killed rerun at the same commit keeps what it
  redid); for 'flexiq' the finetune stage is redone too (moved to <workdir>/replaced/ first). The results name, per
  method, the commit and date that computed its rows ('methods_made_by').

  Args:
    run: The pipeline run (config, workdir, mesh).
    float_model: The float model and its variables.
    float_metrics: Optional float metrics; their 'top1' goes into the results.
    float_logits: Optional float logits on the eval batches.
    recompute: Method names whose rows made by another commit are recomputed.
    after_method: Optional callable of a method's name, called once its rows are in
      <workdir>/compare/rows.json (e.g. to copy them somewhere durable).

  Returns:
    The results dict (run info, model, dataset, eval_examples, float_top1, rows,
    seconds_this_run, methods_made_by), also written by `write_reports`.

  Raises:
    ValueError: If compare.methods or `recompute` names an unknown method.
  """
  config = run.config
  cc = config.compare
  methods = as_list(cc.methods)
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"unknown compare.methods {unknown}; valid: {list(METHODS)}")
  unknown = [m for m in recompute if m not in METHODS]
  if unknown:
    raise ValueError(f"unknown methods to recompute {unknown}; valid: {list(METHODS)}")
  ctx = CompareContext.build(run, float_model, float_logits)  # the calibration's plan enters the fingerprints
  plan = ctx.calibration.plan
  # Each method's rows under their own fingerprint: a change to one method's knob recomputes its rows only.
  # A file of the one-fingerprint form is adopted only where no matmul is quantized (its baselines
  # ran them in float).
  cache = stage_cache.KeyedJsonCache(os.path.join(run.workdir, "compare", "rows.json"),
                                     {m: stage_cache.fingerprint(method_fields(config, m, plan)) for m in methods},
                                     legacy_fingerprint=None if apply_lib.matmul_fingerprint(plan)
                                     else _legacy_rows_fingerprint(config))
  now = records.git_commit()
  stale = [m for m in recompute if m in methods and m in cache.data and cache.made_by(m)["commit"] != now]
  if "flexiq" in stale:  # before the row is dropped: a kill in between leaves the row to drop again
    pipeline.replace_stages(run.workdir, "finetune")
  cache.drop(stale)
  # Finetuned rows cached before they carried `selection_figures` are made again: their stages are
  # reused, only the sweep and the held-out scoring run.
  lacking = [m for m in methods if m in cache.data and finetune_workdir(run.workdir, m) is not None
             and config.finetune.get("lr_grid", ()) and config.data.get("holdout_split")
             and _lacks_selection_figures(cache.data[m])]
  cache.drop(lacking)
  seconds, rows = {}, []
  bar = progress.bar(desc="compare", total=len(methods), unit="method")  # the inner stages show their own bars
  for m in methods:
    bar.set_postfix(method=m)
    t0 = time.perf_counter()
    rows += [Row.from_json(r) for r in _with_holdout(run.workdir, m, cache.get(
        m, lambda m=m: [{**r.to_json(), **_matmul_record(m, plan)} for r in METHODS[m](ctx)]))]
    seconds[m] = time.perf_counter() - t0
    print(f"compare: {m} done ({seconds[m]:.0f} s)")
    if after_method is not None:
      after_method(m)
    bar.update(1)
  bar.close()
  results = {**records.run_info(), "model": config.model.name, "dataset": config.data.name,
             "eval_examples": len(ctx.eval_data) and int(sum(float(np.sum(b.get("mask", np.ones(len(b["label"])))))
                                                             for b in ctx.eval_data)),
             "float_top1": float_metrics["top1"] if float_metrics else None, "rows": [r.to_json() for r in rows],
             "seconds_this_run": seconds, "methods_made_by": {m: cache.made_by(m) for m in methods}}
  write_reports(results, run.workdir, cc.results_prefix)
  return results


def write_reports(results: dict, workdir: str, prefix: str = "") -> str:
  """compare.json, compare_table.md, compare_pareto.png in <workdir>/compare/ (and at `prefix`
  + '.json'/'.md'/'.png' if given).

  Args:
    results: The results dict of `run_compare`.
    workdir: The run's working directory.
    prefix: Optional extra path prefix for a second copy of the files.

  Returns:
    The Markdown text.
  """
  title = f"Method comparison: {results['model']} on {results['dataset']}"
  text = f"# {title}\n\n" + records.provenance_header(results)
  reused = {m: made for m, made in (results.get("methods_made_by") or {}).items() if not made.get("this_run")}
  if reused:  # rows this command read from the workdir's cache: say which run computed them
    text += "Rows reused from the workdir's cache (computed by an earlier run): " + ", ".join(
        f"{m} (commit {str(made.get('commit') or 'not recorded')[:7]}, {made.get('date') or 'date not recorded'})"
        for m, made in reused.items()) + ".\n\n"
  if results.get("float_top1") is not None:
    text += f"Float model top-1: {results['float_top1']:.2f}% ({results['eval_examples']} eval images)\n\n"
  text += ("Relative BOPs: MACs x weight bits x activation bits of the quantized layers, against all of "
           "them at W8A8 (float = 32 x 32 bits would be 16.0). Top-1 on the eval split.\n\n")
  text += ("Against the float model on the same images: agreement = share of images with the float model's "
           "top-1 class (%), KL = mean KL(float || quantized) of the softmax outputs, SQNR = output SQNR (dB) of "
           "the logits (the layer-wise search's sensitivity measure).\n\n")
  table = [[r["method"], r["setting"], "failed" if row_failure(r) else r["top1"], _opt(r.get("agreement"), ".2f"),
            _opt(r.get("kl"), ".4f"), _opt(r.get("sqnr_db"), ".1f"), _opt(r.get("relative_bops"), ".3f")]
           for r in results["rows"]]
  text += records.markdown_table(["method", "setting", "top-1 (%)", "agreement (%)", "KL", "SQNR (dB)",
                                  "relative BOPs"], table)
  refused = [r for r in results["rows"] if row_refusal(r)]
  if refused:
    text += ("\nRefused by the QAT judge (reported above; left out of the Pareto plot and of the paper tables' "
             "averages and margins):\n\n" + "".join(f"- {r['method']} {r['setting']}: {row_refusal(r)}\n"
                                                    for r in refused))
  failed = {r["method"]: row_failure(r) for r in results["rows"] if row_failure(r)}
  if failed:
    text += "\nFailed (no figures):\n\n" + "".join(f"- {m}: {why}\n" for m, why in failed.items())
  text += lr_note(results["rows"])
  amp_rows = {r["ratio"]: r for r in results["rows"] if r["method"] == "flexiq_amp"}
  evo = {r["ratio"]: r for r in results["rows"] if r["method"] == "flexiq" and not r.get("finetuned")}
  both = [lvl for lvl in amp_rows if lvl in evo]
  if both:
    text += ("\nFlexiQ selector at the same global ratio (before finetuning): evolutionary search vs the "
             "mixed-precision search over per-layer ratios (AMP picks the first Pareto point whose 4-bit "
             "MAC share reaches the level).\n\n")
    text += records.markdown_table(
        ["ratio", "evolutionary top-1 (%)", "evolutionary rel. BOPs", "AMP top-1 (%)", "AMP rel. BOPs"],
        [[f"{lvl:g}", evo[lvl]["top1"], f"{evo[lvl]['relative_bops']:.3f}", amp_rows[lvl]["top1"],
          f"{amp_rows[lvl]['relative_bops']:.3f}"] for lvl in sorted(both)])
  lw_rows = [r for r in results["rows"] if r["method"] == "layerwise_amp" and "allowed_drop" in r]
  if lw_rows:
    text += ("\nLayer-wise AMP: the drop is allowed on the score images (a validation slice of train); "
             "the measured drop is on the eval split, against the float model.\n\n")
    text += records.markdown_table(
        ["allowed drop", "score-split drop", "measured eval drop", "target met", "early exit", "top-1 (%)"],
        [[f"{r['allowed_drop']:g}", f"{r['score_drop']:.2f}", f"{r['eval_drop']:.2f}", r["target_met"],
          r["early_exit"] or "no", r["top1"]] for r in lw_rows])
  matched = [r for r in results["rows"] if r["method"] == "layerwise_amp" and "budget" in r]
  if matched:
    r = matched[0]
    text += (f"\nLayer-wise AMP at FlexiQ's 4-bit budget: of its Pareto front, the point of the largest BOPs not "
             f"above uniform W4A4's ({r['budget']:.3f}): {r['relative_bops']:.3f} relative BOPs, top-1 {r['top1']}.\n")
  paths = [os.path.join(workdir, "compare", "compare")]
  if prefix:
    paths.append(prefix)
  for base in paths:
    records.write_json_atomic(base + ".json", results)
    with open(base + "_table.md" if base.endswith("compare") else base + ".md", "w") as f:
      f.write(text)
    plot_pareto(results, base + ("_pareto.png" if base.endswith("compare") else ".png"), title)
  return text


# The QAT methods, whose learning rate finetune.lr_grid chooses.
QAT_METHODS = ("flexiq", *LR_SELECTED)


def lr_note(rows) -> str:
  """The compare table's paragraph on the QAT methods' learning rates: each method's held-out
  scores per candidate and its chosen rate (`lr_select`), or that the rates were as configured.

  Args:
    rows: Row dicts (Row.to_json).

  Returns:
    Markdown text ('' when no QAT method ran).
  """
  qat = [r for r in rows if r["method"] in QAT_METHODS and (r["method"] != "flexiq" or r.get("finetuned"))]
  chosen = {}
  for r in qat:
    if r.get("lr_selection"):
      chosen.setdefault(r["method"], r["lr_selection"])
  configured = sorted({r["method"] for r in qat} - set(chosen))
  text = ""
  if chosen:
    first = next(iter(chosen.values()))
    rates = sorted({float(c["learning_rate"]) for sel in chosen.values() for c in sel["candidates"]})
    text += (f"\nLearning rates of the QAT methods: each trained its whole budget at every rate of its grid "
             "(the configured one, grown past an edge that won) and kept the best on "
             f"{first['num_images']} held-out training images that no QAT method's batches reach (the eval split is "
             "never read for it). Held-out top-1 (%) / KL to float per candidate, mean over the method's points "
             "(\"failed\": its training diverged or went NaN; \"-\": not tried):\n\n")

    def cell(sel, rate):
      c = next((c for c in sel["candidates"] if float(c["learning_rate"]) == rate), None)
      if c is None:
        return "-"
      return "failed" if c.get("top1") is None else f"{c['top1']:.2f} / {c['kl']:.4g}"

    text += records.markdown_table(
        ["method", "criterion", *[f"lr {g:g}" for g in rates], "chosen"],
        [[m, sel["criterion"], *[cell(sel, g) for g in rates], f"{sel['chosen']:g}"] for m, sel in chosen.items()])
  if configured:
    text += ("\nLearning rates as configured, not chosen on held-out images (finetune.lr_grid=()): "
             + ", ".join(configured) + " (FlexiQ at finetune.learning_rate, the QAT baselines at "
             "compare.lsq_learning_rate; each row's setting gives the rate).\n")
  return text


def _opt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


PARETO_METRICS = {"top1": "top-1 (%)", "agreement": "agreement with float (%)", "kl": "KL(float || quantized)",
                  "sqnr_db": "output SQNR (dB)"}


def draw_pareto(ax, rows, metric: str = "top1", float_top1=None, *, finetuned_suffix: str = " (finetuned)",
                ms: float = 4, lw=None, float_label="float") -> None:
  """One line per method (finetuned rows apart) on `ax`: `metric` vs relative BOPs, the float
  model's top-1 as a dashed line (metric 'top1'), KL on a log scale. Rows the QAT judge refused
  (`row_refusal`) are left out.

  Args:
    ax: A matplotlib Axes.
    rows: Row dicts (Row.to_json); rows without `metric` are skipped.
    metric: 'top1', 'agreement', 'kl' or 'sqnr_db'.
    float_top1: Optional float top-1 drawn as a dashed line (metric 'top1' only).
    finetuned_suffix: Suffix of the labels of finetuned rows.
    ms: Marker size.
    lw: Optional line width (also thins the float line).
    float_label: Legend label of the float line.

  Raises:
    ValueError: If `metric` is not a key of PARETO_METRICS.
  """
  if metric not in PARETO_METRICS:
    raise ValueError(f"unknown Pareto metric {metric!r}; use one of {list(PARETO_METRICS)}")
  groups: dict = {}
  for r in rows:
    if r.get(metric) is None or row_refusal(r):  # a refused QAT baseline is no point of the front
      continue
    groups.setdefault(r["method"] + (finetuned_suffix if r.get("finetuned") else ""), []).append(r)
  line = {} if lw is None else {"lw": lw}
  for label, group in groups.items():
    group = sorted(group, key=lambda r: r["relative_bops"])
    ax.plot([r["relative_bops"] for r in group], [r[metric] for r in group], "o-" if len(group) > 1 else "s", ms=ms,
            label=label, **line)
  if metric == "top1" and float_top1 is not None:
    ax.axhline(float_top1, color="gray", ls="--", label=float_label, **({} if lw is None else {"lw": 0.8}))
  if metric == "kl":
    ax.set_yscale("log")


def plot_pareto(results: dict, path: str, title: str, metric: str = "top1") -> None:
  """Every method's points: `metric` ('top1', 'agreement', 'kl' or 'sqnr_db') vs relative BOPs.

  Args:
    results: The results dict (reads 'rows' and 'float_top1').
    path: Output PNG path.
    title: Plot title.
    metric: The y-axis metric.

  Raises:
    ValueError: If `metric` is not a key of PARETO_METRICS.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  draw_pareto(ax, results["rows"], metric, results.get("float_top1"))
  ax.set_xlabel("relative BOPs (W8A8 = 1)")
  ax.set_ylabel(PARETO_METRICS[metric])
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
