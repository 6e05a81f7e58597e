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

from experiments.fixes_variants import VARIANTS, override, run_with_reference_selection

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
  report = records.read_json(os.path.join(workdir, "finetune", "judge.json"))
  return {k: report[k] for k in ("command", "commit", "date") if k in report} if report else None


def held_out(workdir: str) -> dict | None:
  """The finetune judge's measurements of the variant (finetune/judge.json): top-1 and KL at ratios
  0 and 1 before and after finetuning, on training images the finetune never saw. Variants are
  compared (and defaults chosen) on these, not on the test split."""
  report = records.read_json(os.path.join(workdir, "finetune", "judge.json"))
  if not report or "after_finetuning" not in report:
    return None
  return {"images": report.get("images"), "before": report["before_finetuning"], "after": report["after_finetuning"]}


def _fmt(v, digits=2):
  return "-" if v is None else f"{v:.{digits}f}"


def render(base, info, float_metrics, rows: dict, ratios, shared_selection: bool = False) -> str:
  name = base.model.name
  text = (f"# FlexiQ fixes as ablations: {name} on {base.data.name}\n\n" + records.provenance_header(info)
          + (f"Every variant lowers the channels the reference variant's selection (select.selector="
             f"'{base.select.selector}') chose (`--share_selection`): only the grid or the training differs.\n\n"
             if shared_selection else "")
          + f"Float top-1 {float_metrics['top1']:.2f}% on the first {float_metrics.get('num_examples', '?')} "
            f"images of the {base.data.eval_split} split (the sweep's images). Each variant: the config plus the "
            "overrides listed, on the same float model; top-1 (%) / KL(float || quantized) at each 4-bit ratio, "
            "before (PTQ) and after multi-ratio finetuning (FT). No hyperparameter was tuned.\n\n")
  runs = {}
  for vname, row in rows.items():
    by = row.get("made_by")
    if by:
      runs.setdefault((by.get("command"), by.get("commit"), by.get("date", "")[:10]), []).append(vname)
  if runs:
    text += "The variants as measured (each variant's own run: command, commit, date):\n\n" + "".join(
        f"- {', '.join(names)}: `{cmd}` at {str(commit)[:7]}{' (uncommitted changes)' if str(commit).endswith('-dirty') else ''}"
        f", {date}\n" for (cmd, commit, date), names in runs.items()
    ) + "\n"
  headers = ["variant", "overrides"] + [f"{w} {100 * r:g}%" for w in ("PTQ", "FT") for r in ratios] + [
      "FT 0.5 vs 0", "FT 0 vs PTQ 0", "QAT grad norm (median / max)"]
  table = []
  for vname, row in rows.items():
    before, after = row.get("before", []), row.get("after", [])
    cells = [f"{_fmt(p['top1'])} / {_fmt(p['kl'], 4)}" for p in before] + ["-"] * (len(ratios) - len(before))
    cells += [f"{_fmt(p['top1'])} / {_fmt(p['kl'], 4)}" for p in after] + ["-"] * (len(ratios) - len(after))
    at = lambda pts, r: next((p["top1"] for p in pts if abs(p["ratio"] - r) < 1e-9), None)
    gap = (at(after, 0.5) - at(after, 0.0)) if at(after, 0.5) is not None and at(after, 0.0) is not None else None
    drift = (at(after, 0.0) - at(before, 0.0)) if at(after, 0.0) is not None and at(before, 0.0) is not None else None
    g = row.get("grad_norm")
    table.append([vname, ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "(config as given)"] + cells
                 + [_fmt(gap), _fmt(drift), f"{_fmt(g['median'])} / {_fmt(g['max'])}" if g else "-"])
  text += records.markdown_table(headers, table)
  refused = {k: r["refused"] for k, r in rows.items() if r.get("refused")}
  if refused:
    text += ("\n\nRefused by the finetune judge (their rows above are empty; the model it started from was "
             "kept):\n\n" + "".join(f"- {k}: {why}\n" for k, why in refused.items()))
  held = {k: r["heldout"] for k, r in rows.items() if r.get("heldout")}
  if held:
    images = next(iter(held.values()))["images"]
    text += (f"\n\nThe same variants on {images} (the finetune judge's images; the variants are compared "
             "on these, the test split above only reports): top-1 (%) / KL at ratios 0 and 1, before and after "
             "finetuning.\n\n")
    cell = lambda d: f"{_fmt(d['top1'])} / {_fmt(d['kl'], 4)}"
    text += records.markdown_table(
        ["variant", "PTQ 0%", "PTQ 100%", "FT 0%", "FT 100%", "FT mean of 0% and 100%"],
        [[k, cell(h["before"]["0"]), cell(h["before"]["1"]), cell(h["after"]["0"]), cell(h["after"]["1"]),
          _fmt((h["after"]["0"]["top1"] + h["after"]["1"]["top1"]) / 2)] for k, h in held.items()])
  text += ("\n\nRefresh after finetuning, both ways, on the finetuned weights as trained (the last QAT checkpoint): "
           "KL(float || quantized) on the calibration images at ratios 0 / 0.5 / 1. 'float': bias-correction means "
           "from the float forward of the finetuned weights (the behaviour before `finetune.refresh_source`); "
           "'quantized': from the quantized model's own layer inputs at ratios 0.5 and 1.\n\n")
  if not any(row.get("refresh") for row in rows.values()):  # post-training only (--until=quantize)
    return text.split("\n\nRefresh after finetuning")[0] + "\n"
  rtable = []
  for vname, row in rows.items():
    rb = row.get("refresh")
    if rb:
      f = lambda d: " / ".join(_fmt(d[k], 4) for k in ("0", "0.5", "1"))
      rtable.append([vname, f(rb["as_trained"]), f(rb["refresh_float"]), f(rb["refresh_quantized"]),
                     row.get("refresh_kept", "-")])
  text += records.markdown_table(["variant", "as trained", "refresh from float", "refresh from quantized",
                                  "the pipeline kept (finetune.refresh=auto)"], rtable)
  return text + "\n"


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
