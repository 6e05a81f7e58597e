r"""Cross-layer equalization (`quant.equalize`) as a shared pre-step, measured post-training.

  python -m experiments.cle --config=configs/resnet18.py:fmnist --workdir=WORKDIR [--ratios=0,0.5,1]

Run from the repository root. Reuses (or trains) the float model in --workdir, then for
quant.equalize off and on, each in its own sub-workdir <workdir>/cle/<off|on>: calibrate ->
select (the config's selector, its own search) -> quantize, FlexiQ swept at --ratios, and the
min-max W8A8 / W4A4 PTQ baseline (`compare.harness.ptq_minmax`, which reads the same calibrated,
folded and, when on, equalized variables). A third FlexiQ row quantizes the equalized
calibration with the 'off' selection (channel orders and counts), so the equalization is seen
apart from the search's noise. Top-1 and KL(float || quantized) on the config's eval images;
nothing is tuned on them. Also reports, per equalized pair, the ratio max/min of the per-channel
weight ranges before and after, and for every layer B of a pair the share of its input's
per-tensor range the channels use (mean channel range / largest channel range, from the
calibration statistics) off and on.

Writes experiments/results/cle_<model>.md and .json (command, commit, device, date).
"""

import json
import os
import sys

from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags

from flexiq_jax import cli
from flexiq_jax import pipeline
from flexiq_jax import records
from flexiq_jax import stage_options
from flexiq_jax import stages
from flexiq_jax.compare import harness

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py[:args]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding (or to hold) the float model.")
_RATIOS = flags.DEFINE_list("ratios", ["0", "0.5", "1"], "FlexiQ 4-bit ratios swept.")
_OUT = flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                           "Folder for the results files.")
flags.mark_flags_as_required(["config", "workdir"])


def with_equalize(config, on: bool):
  """A copy of `config` with quant.equalize set."""
  config = config.copy_and_resolve_references()
  config.quant.equalize = on
  return config


def input_share(stats: dict, path: str) -> float:
  """mean over channels of the channel's input range / the largest channel range (1: every channel
  uses the whole per-tensor range)."""
  r = np.maximum(-np.asarray(stats[path]["ch_min"]), np.asarray(stats[path]["ch_max"]))
  return float(np.mean(r) / max(float(np.max(r)), 1e-30))


def point(p) -> dict:
  return {"ratio": p.ratio, "top1": p.top1, "kl": p.kl, "agreement": p.agreement}


def row(r) -> dict:
  return {"setting": r.setting, "top1": r.top1, "kl": r.extra.get("kl"), "agreement": r.extra.get("agreement"),
          "relative_bops": r.relative_bops}


def _f(v, d=2):
  return "-" if v is None else f"{v:.{d}f}"


def render(base, info, float_metrics, out: dict) -> str:
  arms = out["arms"]
  text = (f"# Cross-layer equalization (quant.equalize), post-training: {base.model.name} on {base.data.name}\n\n"
          + records.provenance_header(info)
          + f"Float top-1 {float_metrics['top1']:.2f}% on the first {float_metrics.get('num_examples', '?')} images "
            f"of the {base.data.eval_split} split. Each cell: top-1 (%) / KL(float || quantized) on those images. "
            "'off' and 'on' each calibrate and run their own selection (select.selector="
            f"'{base.select.selector}'); 'on, off's selection' quantizes the equalized calibration with the channel "
            "orders and counts the 'off' search chose. No finetuning; nothing tuned.\n\n")
  ratios = out["ratios"]
  headers = ["quant.equalize"] + [f"FlexiQ {100 * r:g}%" for r in ratios] + ["min-max PTQ W8A8", "min-max PTQ W4A4"]
  table = []
  for name, arm in arms.items():
    cells = [f"{_f(p['top1'])} / {_f(p['kl'], 4)}" for p in arm["flexiq"]]
    ptq = arm.get("ptq_minmax")
    cells += [f"{_f(r['top1'])} / {_f(r['kl'], 4)}" for r in ptq] if ptq else ["-", "-"]
    table.append([name] + cells)
  text += records.markdown_table(headers, table)
  eq = out["equalize"]
  text += (f"\n\nThe equalization: {len(eq['pairs'])} pairs taken, {len(eq['refused'])} candidates refused "
           f"(their random rescaling moved the output or another layer's input by more than the tolerance), "
           f"{eq['sweeps']} sweeps, float output deviation {eq['deviation']:.2g} (relative) on the check images.\n\n")
  prows = []
  for (key, rng), share in zip(eq["ranges"].items(), out["input_share"].values()):
    prows.append([key, f"{rng['a_before']:.2f} -> {rng['a_after']:.2f}", f"{rng['b_before']:.2f} -> {rng['b_after']:.2f}",
                  f"{share['off']:.3f} -> {share['on']:.3f}"])
  text += records.markdown_table(["pair A -> B", "A's output-channel weight range max/min",
                                  "B's input-channel weight range max/min",
                                  "B's input: mean channel range / tensor range"], prows)
  refused = sorted(eq["refused"].items(), key=lambda kv: kv[1])
  text += "\n\nRefused candidates (relative deviation under the check's random rescaling): " + ", ".join(
      f"`{k}` {v:.2g}" for k, v in refused) + ".\n"
  return text


def main(argv):
  base = _CONFIG.value
  info = records.run_info(records.command_argv())
  ratios = [float(r) for r in _RATIOS.value]
  workdir = cli.start(argv, _WORKDIR.value)
  run = pipeline.Run(base, workdir)
  result = pipeline.run_until(run, "eval")
  float_model, float_metrics, float_logits = result.float_model, result.float_metrics, result.float_logits
  out = {**info, "float": float_metrics, "ratios": ratios, "arms": {}}
  stem = os.path.join(_OUT.value, f"cle_{base.model.name}")
  os.makedirs(_OUT.value, exist_ok=True)
  done = {}
  for name, on in (("off", False), ("on", True)):
    arm = pipeline.Run(with_equalize(base, on), os.path.join(workdir, "cle", name), run.mesh)
    os.makedirs(arm.workdir, exist_ok=True)
    records.write_run_config(arm.workdir, arm.config)
    calib = pipeline.calibrate(arm, float_model)
    selection = pipeline.select(arm, float_model, calib)
    quantized = pipeline.quantize(arm, float_model, calib, selection)
    flexiq = pipeline.sweep(arm, quantized, desc=f"cle {name}", ratios=ratios, float_logits=float_logits)
    ctx = harness.CompareContext.build(arm, float_model, float_logits)
    ptq = harness.ptq_minmax(ctx)
    out["arms"][name] = {"flexiq": [point(p) for p in flexiq], "ptq_minmax": [row(r) for r in ptq]}
    done[name] = (arm, calib, selection)
    if on:  # the equalized calibration with the 'off' selection
      q = stages.quantize(float_model, calib, done["off"][2], stage_options.stage_options(arm.config, "quantize"))
      other = pipeline.Run(arm.config, os.path.join(workdir, "cle", "on_off_selection"), run.mesh)
      shared = pipeline.sweep(other, q, desc="cle on, off's selection", ratios=ratios, float_logits=float_logits)
      out["arms"]["on, off's selection"] = {"flexiq": [point(p) for p in shared], "ptq_minmax": None}
      out["equalize"] = records.read_json(os.path.join(arm.workdir, "calibrate", "equalize.json"))
      off_stats = done["off"][1].stats
      out["input_share"] = {f"{a} -> {b}": {"off": input_share(off_stats, b), "on": input_share(calib.stats, b)}
                            for a, b in out["equalize"]["pairs"]}
    with open(stem + ".json", "w") as f:
      json.dump(out, f, indent=2)
  with open(stem + ".md", "w") as f:
    f.write(render(base, info, float_metrics, out))
  print(f"cle: {stem}.md")


if __name__ == "__main__":
  sys.argv = cli.resolve_config_argv(sys.argv)
  app.run(main)
