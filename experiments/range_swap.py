r"""Which layer's clipping ranges make a uniform post-training baseline fail: one layer at a time.

  python -m experiments.range_swap --config=configs/mobilenetv2.py:fmnist \
      --workdir=workdirs/paper/mobilenetv2 [--base=mse] [--swap=minmax] [--images=2048]

Run from the repository root on a workdir whose float and calibrate stages have finished (the
sweep's `workdirs/paper/<model>`). Uniform W4A4 post-training quantization (the `ptq_<base>`
baseline of T1, its ends in W8A8 as `compare.keep_ends` says) is evaluated with the `--base`
ranges (`layerwise.apply.build_tables`), with the `--swap` ranges everywhere, and with the base
ranges except one layer's activation range, or its weight ranges, taken from `--swap`: top-1
and KL(float || quantized) on the first --images eval images. The layers whose swap recovers the
most come first.

Writes experiments/results/range_swap_<model>_<base>_to_<swap>.md and .json (command, commit,
device, date).
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from flexiq_jax import cli
from flexiq_jax import pipeline
from flexiq_jax import records

# The flags exist only when this file runs as a script: the tests import its functions in the
# same process as other scripts, whose flags would otherwise clash.
if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py[:args]).",
                                            lock_config=False)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding the float model and its calibration.")
  _BASE = flags.DEFINE_enum("base", "mse", ["mse", "minmax"], "The ranges of the baseline diagnosed.")
  _SWAP = flags.DEFINE_enum("swap", "minmax", ["mse", "minmax"], "The ranges one layer at a time is given.")
  _IMAGES = flags.DEFINE_integer("images", 2048, "Eval images (the first ones, whole batches).")
  _OUT = flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                             "Folder for the results files.")
  flags.mark_flags_as_required(["config", "workdir"])


def swap_one(base: dict, other: dict, path: str, part: str) -> dict:
  """`base` clipping tables with one layer's activation or weight ranges taken from `other`.

  Args:
    base: Tables {path: {'act_clip', 'weight_clip', ('act_zero')}} (`build_tables`).
    other: Tables of the same layers with other ranges.
    path: The layer whose ranges are swapped.
    part: 'act' (its 'act_clip' and 'act_zero' when it has one) or 'weight' ('weight_clip').

  Returns:
    A new dict; `base` and `other` are not changed.
  """
  keys = {"act": ("act_clip", "act_zero"), "weight": ("weight_clip",)}[part]
  return {**base, path: {**base[path], **{k: other[path][k] for k in keys if k in other[path]}}}


def diagnose(metrics, layers, base: dict, other: dict) -> dict:
  """Top-1 and KL of `base`, of `other`, and of `base` with each layer's activation or weight
  ranges from `other`.

  Args:
    metrics: tables -> {'top1', 'kl', ...} (the evaluation at fixed bits and images).
    layers: The quantized layers, in model order.
    base: The diagnosed tables.
    other: The tables swapped in.

  Returns:
    {'base': {...}, 'swap': {...}, 'layers': [{'layer', 'act', 'weight'}, ...]} with each entry's
    'top1' and 'kl', the layers sorted by the larger top-1 recovered, most first.
  """
  pick = lambda m: {"top1": float(m["top1"]), "kl": float(m["kl"])}
  out = {"base": pick(metrics(base)), "swap": pick(metrics(other)), "layers": []}
  for p in layers:
    out["layers"].append({"layer": p, **{part: pick(metrics(swap_one(base, other, p, part)))
                                         for part in ("act", "weight")}})
  out["layers"].sort(key=lambda r: -max(r["act"]["top1"], r["weight"]["top1"]))
  return out


def render(title: str, info: dict, result: dict, ranges: dict, base: str, swap: str, images: int, top: int = 12) -> str:
  """The Markdown report: the two uniform baselines, then the `top` layers whose swap recovers most."""
  lines = [f"Command: `{info['command']}`  ", f"Commit: `{info['commit']}`  ", f"Device: {info['device']}  ",
           f"Date: {info['date']}", "", f"# {title}", "",
           f"Uniform W4A4 post-training quantization on the first {images} eval images, every layer with "
           f"`{base}` ranges, every layer with `{swap}` ranges, and `{base}` except one layer's activation "
           f"range or weight ranges taken from `{swap}`. KL is KL(float || quantized), mean per image.", "",
           "| ranges | top-1 (%) | KL |", "|---|---|---|",
           f"| all {base} | {result['base']['top1']:.2f} | {result['base']['kl']:.4f} |",
           f"| all {swap} | {result['swap']['top1']:.2f} | {result['swap']['kl']:.4f} |", "",
           f"Layers whose swap recovers most (first {top} of {len(result['layers'])}); the 4-bit activation "
           f"clip of each ({base} / {swap}):", "",
           f"| layer | act clip at 4 bits ({base} / {swap}) | act from {swap}: top-1 | KL | weights from {swap}: top-1 | KL |",
           "|---|---|---|---|---|---|"]
  for r in result["layers"][:top]:
    a, w = r["act"], r["weight"]
    lo, hi = ranges[r["layer"]]
    lines.append(f"| {r['layer']} | {lo:.3g} / {hi:.3g} | {a['top1']:.2f} | {a['kl']:.4f} | "
                 f"{w['top1']:.2f} | {w['kl']:.4f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  from flexiq_jax.compare import baselines, harness
  from flexiq_jax.layerwise import apply as apply_lib, driver
  config = _CONFIG.value
  workdir = cli.start(argv, _WORKDIR.value)
  if _BASE.value == _SWAP.value:
    raise app.UsageError("--base and --swap name the same ranges; pick two different ones")
  info = records.run_info(records.command_argv())
  run = pipeline.Run(config, workdir)
  float_model = pipeline.run_until(run, "train").float_model
  ctx = harness.CompareContext.build(run, float_model)
  data, ref, n = [], [], 0
  for batch, logits in zip(ctx.eval_data, ctx.float_logits):
    if n >= _IMAGES.value:
      break
    data.append(batch)
    ref.append(logits)
    n += len(batch["image"])
  plan = ctx.calibration.plan
  base, other = ctx.ptq_tables(_BASE.value), ctx.ptq_tables(_SWAP.value)
  wb, ab = apply_lib.bits_arrays(plan, baselines.uniform_bits(plan, (4, 4), config.compare.keep_ends))
  ev = driver.LayerwiseEvaluator(float_model.model, plan, ctx.calibration.folded, base, run.mesh)
  metrics = lambda tables: ev.metrics(data, wb, ab, tuple(ref), tables=tables)
  result = diagnose(metrics, list(plan.quantized), base, other)
  ranges = {p: (float(base[p]["act_clip"][4]), float(other[p]["act_clip"][4])) for p in plan.quantized}
  name = f"range_swap_{config.model.name}_{_BASE.value}_to_{_SWAP.value}"
  title = f"Which layer's ranges make W4A4 PTQ ({_BASE.value}) fail: {config.model.name} on {config.data.name}"
  os.makedirs(_OUT.value, exist_ok=True)
  stem = os.path.join(_OUT.value, name)
  with open(stem + ".json", "w") as f:
    json.dump({**info, "images": n, "base": _BASE.value, "swap": _SWAP.value, "act_clip_4bit": ranges,
               "result": result}, f, indent=2)
  with open(stem + ".md", "w") as f:
    f.write(render(title, info, result, ranges, _BASE.value, _SWAP.value, n))
  print(open(stem + ".md").read())


if __name__ == "__main__":
  sys.argv = cli.resolve_config_argv(sys.argv)
  app.run(main)
