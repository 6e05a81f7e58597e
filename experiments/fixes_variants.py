"""The variants of experiments/flexiq_fixes.py and the helpers it shares with
experiments/layer_diagnosis.py (no flags here, so both scripts can import it)."""

import os

from absl import app

from flexiq_jax import pipeline
from flexiq_jax import records

_LSQ = {"finetune.lsq": True, "finetune.lsq_grad_scale": "effective", "finetune.lsq_learning_rate": "compare"}
# name -> config overrides ("compare" as a value: the LSQ baseline's compare.lsq_learning_rate).
# Each names its activation grid: symmetric unless it says otherwise (the grid these variants were
# measured on before the asymmetric grid became the configs' default).
_VARIANT_CHANGES = {
    "reference": {"quant.weight_scale": "max127"},  # the grid before max112 became the default
    "joint": {"quant.weight_scale": "joint"},
    "joint_sandwich": {"quant.weight_scale": "joint", "finetune.every_step_ratios": (0.0, 1.0)},
    "joint_sandwich_lsq": {"quant.weight_scale": "joint", "finetune.every_step_ratios": (0.0, 1.0), **_LSQ},
    "max112": {"quant.weight_scale": "max112"},
    "sandwich": {"quant.weight_scale": "max127", "finetune.every_step_ratios": (0.0, 1.0)},
    "max112_sandwich": {"quant.weight_scale": "max112", "finetune.every_step_ratios": (0.0, 1.0)},
    # FlexiQ finetuned for 100 % only (LSQ's setting): one network for one point, for the fair fight.
    "max112_only100": {"quant.weight_scale": "max112", "finetune.levels": (1.0,), "finetune.level_probs": (1.0,),
                       "finetune.uniform_prob": 0.0},
    "max112_sandwich_lsq": {"quant.weight_scale": "max112", "finetune.every_step_ratios": (0.0, 1.0), **_LSQ},
    "joint_lsq_qmax8": {"quant.weight_scale": "joint", "finetune.lsq": True, "finetune.lsq_grad_scale": "qmax8",
                        "finetune.lsq_learning_rate": "compare"},
    "joint_lsq": {"quant.weight_scale": "joint", **_LSQ},
    # Learnt activation and weight scales, as the LSQ baseline learns them.
    "max112_lsq": {"quant.weight_scale": "max112", **_LSQ, "finetune.lsq_weights": True},
    # Signed inputs (after SiLU) on an unsigned grid with a zero point that survives extraction.
    "max112_asym": {"quant.weight_scale": "max112", "quant.act_grid": "asymmetric"},
    # Cross-layer equalization of the folded weights before calibration (quant.equalize).
    "max112_cle": {"quant.weight_scale": "max112", "quant.equalize": True},
}
VARIANTS = {name: {"quant.act_grid": "symmetric", **changes} for name, changes in _VARIANT_CHANGES.items()}


def override(config, changes: dict):
  """A copy of `config` with the dotted `changes` applied."""
  config = config.copy_and_resolve_references()
  for dotted, value in changes.items():
    section, field = dotted.split(".")
    if value == "compare":
      value = float(config.compare.lsq_learning_rate)
    config[section][field] = value
  return config


def run_with_reference_selection(variant: pipeline.Run, float_model, reference_dir: str, base,
                                 finetune: bool = True):
  """calibrate -> (the reference variant's selection) -> quantize [-> finetune] in the variant's
  workdir; the reference variant must have run first (it runs its own selection)."""
  calib = pipeline.calibrate(variant, float_model)
  reference = pipeline.Run(base, reference_dir, variant.mesh)
  if variant.workdir == reference_dir:
    selection = pipeline.select(variant, float_model, calib)
  else:
    if not os.path.exists(os.path.join(reference_dir, "select", "done.json")):
      raise app.UsageError("--share_selection: run the 'reference' variant first (it makes the selection)")
    selection = pipeline.select(reference, float_model, pipeline.calibrate(reference, float_model))
    records.write_json_atomic(os.path.join(variant.workdir, "selection_from.json"),
                              {"selection": os.path.join(reference_dir, "select")})
  quantized = pipeline.quantize(variant, float_model, calib, selection)
  finetuned = pipeline.finetune(variant, float_model, quantized) if finetune else None
  return pipeline.PipelineResult(float_model, calibration=calib, selection=selection, quantized=quantized,
                                 finetuned=finetuned)


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
