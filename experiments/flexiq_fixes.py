r"""FlexiQ at 4 bits: the fixes to the 8-bit weight grid, the QAT budget at the ends of the ratio
range, LSQ on the lowered grid and the refresh, each measured as an ablation on one float model.

  python -m experiments.flexiq_fixes --config=configs/mobilenetv2.py:fmnist --workdir=WORKDIR \
      [--variants=reference,joint,...] [--ratios=0,0.5,1]

Run from the repository root. Reuses (or trains) the float model in --workdir, then for each
variant (`VARIANTS`, config overrides) runs calibrate -> select -> quantize -> multi-ratio
finetune -> refresh in its own sub-workdir <workdir>/fixes/<variant>, and sweeps --ratios before
and after finetuning against the float model (top-1, KL(float || quantized), agreement) on the
config's eval images. Variants that differ only in finetune fields share the calibrate, select
and quantize stages (copied from the first finished sibling with the same fingerprints; the
stage cache redoes a copied stage whose fingerprint does not match). For every variant it also
measures the refresh both ways on the finetuned weights as trained (the last QAT checkpoint):
KL on the calibration images at ratios 0 / 0.5 / 1 after a refresh from the float forward and
after one from the quantized model. Nothing is tuned on the test split: every hyperparameter
is a config default or an option's documented value (the LSQ scale rate is the LSQ baseline's
`compare.lsq_learning_rate`).

Writes experiments/results/flexiq_fixes_<model>.md and .json (command, commit, device, date),
after every variant (so a killed run leaves the variants done so far).
"""

import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from flexiq_jax import cli
from flexiq_jax import finetune as finetune_lib
from flexiq_jax import judge
from flexiq_jax import pipeline
from flexiq_jax import quantize as quantize_lib
from flexiq_jax import records
from flexiq_jax import train as train_lib

from experiments.fixes_variants import VARIANTS, override, render, run_with_reference_selection

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py[:args]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding (or to hold) the float model.")
_VARIANTS = flags.DEFINE_list("variants", None, "Variants to run, in order (default: all of VARIANTS).")
_RATIOS = flags.DEFINE_list("ratios", ["0", "0.5", "1"], "4-bit ratios swept before and after finetuning.")
_SHARE = flags.DEFINE_bool("share_selection", False, "Every variant lowers the channels the reference variant "
                            "selected (its orders and per-level counts), instead of running its own selection: the "
                            "grid or training changes alone, and one evolutionary search per model instead of one "
                            "per grid. Variant workdirs then go under <workdir>/fixes_shared/.")
_UNTIL = flags.DEFINE_enum("until", "finetune", ["quantize", "finetune"], "'quantize': post-training only (the "
                           "'before finetuning' columns), e.g. for a quick look at the weight grids.")
_TAG = flags.DEFINE_string("tag", "", "Appended to the results file names (e.g. for a run with config overrides).")
_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Only rewrite the .md from the saved .json (same flags).")
_OUT = flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                           "Folder for the results files.")
flags.mark_flags_as_required(["config"])

def points_dict(points) -> list[dict]:
  return [dataclasses.asdict(p) for p in points]


def as_trained(run: pipeline.Run, quantized: pipeline.Quantized):
  """The finetuned qvars before the refresh: the last QAT checkpoint of the variant."""
  cfg = run.config.finetune
  lsq_weights = bool(cfg.get("lsq_weights", False))
  start = (quantize_lib.add_lsq_weight_scales(quantized.qmodel.plan, quantized.qvars) if lsq_weights
           else quantized.qvars)
  tx = finetune_lib.make_optimizer(cfg, 1)
  state = finetune_lib.create_state(start, tx, cfg.lsq, lsq_weights)
  state = train_lib.restore_latest(os.path.join(run.workdir, "finetune", "checkpoints"), state)
  return finetune_lib.merge_qvars(state.trainable, state.frozen), int(state.step)


def refresh_both_ways(run: pipeline.Run, float_model, quantized: pipeline.Quantized) -> dict:
  """KL(float || quantized) on calibration images at ratios 0 / 0.5 / 1: as trained, after the
  refresh from the float forward and after the refresh from the quantized model."""
  trained, step = as_trained(run, quantized)
  batches = pipeline.calibration_batches(run.config)
  images = jnp.concatenate(batches[:run.config.select.fitness_batches])
  teacher = float_model.logits(images)
  qmodel = quantized.qmodel
  kl = jax.jit(lambda qv, r: finetune_lib.kl_divergence(teacher, qmodel.apply(qv, images, r)))
  out = {"qat_step": step, "images": int(images.shape[0])}
  states = {"as_trained": trained}
  for source in ("float", "quantized"):
    states[f"refresh_{source}"] = finetune_lib.refresh_after_finetuning(
        float_model.model, qmodel.plan, trained, batches, extraction=run.config.quant.extraction, source=source)
  for name, qv in states.items():
    out[name] = {f"{r:g}": float(kl(qv, jnp.float32(r))) for r in pipeline.REFRESH_REPORT_RATIOS}
  return out


def grad_norms(workdir: str) -> dict | None:
  """Median and max QAT gradient norm from the variant's finetune/metrics.jsonl."""
  path = os.path.join(workdir, "finetune", "metrics.jsonl")
  if not os.path.exists(path):
    return None
  values = [json.loads(l).get("grad_norm") for l in open(path) if l.strip()]
  values = [v for v in values if v is not None]
  return {"median": float(np.median(values)), "max": float(np.max(values)), "logged": len(values)} if values else None


def made_by(workdir: str) -> dict | None:
  """The command, commit and date of the run that finetuned the variant (its finetune/judge.json)."""
  report = pipeline.finetune_judgement(workdir)
  return {k: report[k] for k in ("command", "commit", "date") if k in report} if report else None


def held_out(workdir: str) -> dict | None:
  """The finetune judge's measurements of the variant (finetune/judge.json): top-1 and KL at ratios
  0 and 1 before and after finetuning, on training images the finetune never saw. Variants are
  compared (and defaults chosen) on these, not on the test split."""
  report = pipeline.finetune_judgement(workdir)
  if not report or "after_finetuning" not in report:
    return None
  return {"images": report.get("images"), "before": report["before_finetuning"], "after": report["after_finetuning"]}


def _stem(base) -> str:
  """The results files' path without extension, from the flags."""
  stem = os.path.join(_OUT.value, f"flexiq_fixes_{base.model.name}")
  stem += "_shared_selection" if _SHARE.value else ""
  stem += "_ptq" if _UNTIL.value == "quantize" else ""
  return stem + (f"_{_TAG.value}" if _TAG.value else "")


def main(argv):
  base = _CONFIG.value
  info = records.run_info(records.command_argv())
  ratios = [float(r) for r in _RATIOS.value]
  names = _VARIANTS.value or list(VARIANTS)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise app.UsageError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
  if _RENDER_ONLY.value:  # the tables again from the saved results (their own command, commit, date)
    stem = _stem(base)
    saved = json.load(open(stem + ".json"))
    if _WORKDIR.value:  # the held-out measurements of variants measured before the script read them
      subdir = "fixes_shared" if _SHARE.value else "fixes"
      for vname, row in saved["variants"].items():
        row.setdefault("heldout", held_out(os.path.join(_WORKDIR.value, subdir, vname)))
        row.setdefault("made_by", made_by(os.path.join(_WORKDIR.value, subdir, vname)))
    with open(stem + ".md", "w") as f:
      f.write(render(base, saved, saved["float"], saved["variants"], saved["ratios"], _SHARE.value)
              + f"\nThis file re-rendered from {os.path.basename(stem)}.json (the numbers' command, commit and date "
                f"above) by `{info['command']}` at {info['commit'][:7]}, {info['date']}.\n")
    return
  workdir = cli.start(argv, _WORKDIR.value)
  run = pipeline.Run(base, workdir)
  result = pipeline.run_until(run, "eval")
  float_model, float_metrics, float_logits = result.float_model, result.float_metrics, result.float_logits
  os.makedirs(_OUT.value, exist_ok=True)
  stem = _stem(base)
  rows = {}
  subdir = "fixes_shared" if _SHARE.value else "fixes"
  if os.path.exists(stem + ".json"):  # a resumed run keeps the variants already measured
    saved = json.load(open(stem + ".json"))
    rows = {k: v for k, v in saved.get("variants", {}).items() if k not in names}
  for name in names:
    changes = VARIANTS[name]
    config = override(base, changes)
    variant = pipeline.Run(config, os.path.join(workdir, subdir, name), run.mesh)
    os.makedirs(variant.workdir, exist_ok=True)
    pipeline.seed_stages(variant, [os.path.join(workdir, subdir, n) for n in VARIANTS if n != name])
    records.write_run_config(variant.workdir, config)
    ptq = _UNTIL.value == "quantize"
    overrides = {k: (list(v) if isinstance(v, tuple) else v) for k, v in changes.items()}
    try:
      if _SHARE.value:
        res = run_with_reference_selection(variant, float_model, os.path.join(workdir, subdir, "reference"), base,
                                           finetune=not ptq)
      else:
        res = pipeline.run_until(variant, _UNTIL.value, float_model=float_model, evaluate=False)
    except judge.FinetuneRefused as e:  # recorded, and the next variant runs
      rows[name] = {"overrides": overrides, "refused": str(e).splitlines()[0], "made_by": made_by(variant.workdir)}
      _save(stem, info, float_metrics, rows, ratios, base)
      print(f"flexiq_fixes: {name} refused by the finetune judge ({rows[name]['refused']}); next variant")
      continue
    before = pipeline.sweep(variant, res.quantized, desc=f"{name} before", ratios=ratios, float_logits=float_logits)
    rows[name] = {"overrides": overrides, "before": points_dict(before)}
    if not ptq:
      after = pipeline.sweep(variant, res.finetuned, desc=f"{name} after", ratios=ratios, float_logits=float_logits)
      kept = records.read_json(os.path.join(variant.workdir, "finetune", "refresh.json"), {}).get("kept")
      rows[name].update({"after": points_dict(after), "grad_norm": grad_norms(variant.workdir), "refresh_kept": kept,
                         "heldout": held_out(variant.workdir), "made_by": made_by(variant.workdir),
                         "refresh": refresh_both_ways(variant, float_model, res.quantized)})
    _save(stem, info, float_metrics, rows, ratios, base)
    print(f"flexiq_fixes: {name} done; {stem}.md")


def _save(stem, info, float_metrics, rows, ratios, base) -> None:
  with open(stem + ".json", "w") as f:
    json.dump({**info, "float": float_metrics, "ratios": ratios, "variants": rows}, f, indent=2)
  with open(stem + ".md", "w") as f:
    f.write(render(base, info, float_metrics, rows, ratios, _SHARE.value))


if __name__ == "__main__":
  sys.argv = cli.resolve_config_argv(sys.argv)
  app.run(main)
