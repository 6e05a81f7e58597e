r"""How widely the feature channels' value ranges differ, layer by layer, in calibrated workdirs.

  python -m experiments.channel_ranges \
      --workdirs=lite0_pretrained=workdirs/efficientnet_lite0_fmnist_pretrained,b0_scratch=workdirs/efficientnet_b0_fmnist

Run from the repository root on workdirs whose calibrate stage is done (`run.py --mode=calibrate`).
FlexiQ's premise is that trained networks have feature channels of very different ranges, and
that the small-range ones lose little in 4 bits. For every quantized layer's input (per input
channel c, absmax a_c = max(|ch_min|, |ch_max|) over the calibration images; the per-tensor range
A = max_c a_c, which sets the 8-bit scale) it reports:

* `max/median`: A / median_c a_c (1 = all channels as wide as the widest);
* quantiles q10/q25/q50/q75/q90 of a_c / A;
* `<1/16`: the share of channels with a_c < A/16, whose 8-bit codes fit in 4 bits (the top four
  bits are zero: lowering them loses nothing beyond rounding);
* `dead`: the share of channels that never left 0 on the calibration images.

The first layer (the image) is left out of the summaries: its channels are the input's. Writes
experiments/results/channel_ranges.{json,md} (override with --out).
"""

from __future__ import annotations

import os
import sys

import numpy as np

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def layer_statistics(ch_min: np.ndarray, ch_max: np.ndarray) -> dict:
  """Spread of one layer's per-channel input ranges.

  Args:
    ch_min, ch_max: (C,) per-channel minimum and maximum over the calibration images.

  Returns:
    {'channels', 'max_over_median', 'quantiles' (of a_c / A), 'below_1_16', 'dead'}.
  """
  absmax = np.maximum(np.abs(np.asarray(ch_min, np.float64)), np.abs(np.asarray(ch_max, np.float64)))
  top = float(absmax.max())
  if top == 0.0:
    return dict(channels=int(absmax.size), max_over_median=float("nan"), quantiles=[float("nan")] * len(QUANTILES),
                below_1_16=1.0, dead=1.0)
  rel = absmax / top
  median = float(np.median(absmax))
  return dict(channels=int(absmax.size), max_over_median=top / median if median > 0 else float("inf"),
              quantiles=[float(q) for q in np.quantile(rel, QUANTILES)], below_1_16=float(np.mean(rel < 1 / 16)),
              dead=float(np.mean(absmax == 0.0)))


def workdir_statistics(workdir: str) -> dict:
  """Per-layer statistics of a calibrated workdir, in the network's order, and their summary."""
  from flexiq_jax import checkpoint, records

  plan = records.read_json(os.path.join(workdir, "calibrate", "plan.json"))
  done = os.path.exists(os.path.join(workdir, "calibrate", "done.json"))
  if plan is None or not done:
    raise FileNotFoundError(f"{workdir} has no finished calibrate stage: run `python run.py --config=... "
                            f"--workdir={workdir} --mode=calibrate` first")
  stats = checkpoint.load_tree(os.path.join(workdir, "calibrate", "stats"))
  config = records.read_json(os.path.join(workdir, "config.json"), {})
  layers = sorted(plan["quantized"], key=lambda p: plan["layers"][p]["order"])
  rows = []
  for path in layers:
    info = plan["layers"][path]
    s = layer_statistics(stats[path]["ch_min"], stats[path]["ch_max"])
    kind = "depthwise" if info["groups"] > 1 and info["groups"] == info["in_channels"] else info["kind"]
    rows.append(dict(layer=path, kind=kind, lowerable=path in plan["lowerable"], **s))
  inner = [r for r in rows[1:] if np.isfinite(r["max_over_median"])]  # the first layer reads the image

  def median(key, sub=None):
    values = [r[key] if sub is None else r[key][sub] for r in inner]
    return float(np.median(values)) if values else float("nan")

  summary = dict(layers=len(rows), max_over_median_median=median("max_over_median"),
                 max_over_median_max=float(max((r["max_over_median"] for r in inner), default=float("nan"))),
                 q10_median=median("quantiles", 0), q50_median=median("quantiles", 2),
                 below_1_16_median=median("below_1_16"), dead_mean=float(np.mean([r["dead"] for r in inner])))
  model = config.get("model", {}).get("name", "?")
  return dict(workdir=workdir, model=model, init_weights=config.get("init_weights", ""),
              image_size=config.get("data", {}).get("image_size"), summary=summary, layers=rows)


def main(argv=None) -> int:
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdirs", required=True,
                      help="comma-separated label=workdir pairs (calibrated), shown side by side")
  parser.add_argument("--out", default=os.path.join("experiments", "results", "channel_ranges"),
                      help="output path without extension; .json and .md are written")
  args = parser.parse_args(argv)
  pairs = []
  for item in args.workdirs.split(","):
    label, sep, path = item.partition("=")
    if not sep or not label or not path:
      print(f"error: --workdirs takes label=workdir pairs, got {item!r}", file=sys.stderr)
      return 2
    pairs.append((label, path))

  from flexiq_jax import records

  try:
    results = {label: workdir_statistics(path) for label, path in pairs}
  except (FileNotFoundError, OSError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 1
  info = records.run_info(["-m", "experiments.channel_ranges"] + list(argv if argv is not None else sys.argv[1:]))
  records.write_json_atomic(args.out + ".json", {**info, "quantiles": list(QUANTILES), "models": results})

  lines = [records.provenance_header(info), "# Spread of per-channel input ranges per layer\n\n",
           "a_c: a channel's absmax on the calibration images; A = max_c a_c (the tensor's 8-bit range). "
           "Medians over the layers after the first.\n\n"]
  lines.append(records.markdown_table(
      ["model", "workdir", "weights", "layers", "median A/median(a_c)", "max A/median(a_c)",
       "median q10(a_c/A)", "median q50(a_c/A)", "median share a_c<A/16", "mean share dead"],
      [[label, r["workdir"], r["init_weights"] or "from scratch", r["summary"]["layers"],
        round(r["summary"]["max_over_median_median"], 2), round(r["summary"]["max_over_median_max"], 1),
        round(r["summary"]["q10_median"], 3), round(r["summary"]["q50_median"], 3),
        round(r["summary"]["below_1_16_median"], 3), round(r["summary"]["dead_mean"], 3)]
       for label, r in results.items()]))
  lines.append("\nBy module name (the last part of the layer path; median A/median(a_c) over those layers, their count):\n\n")
  by_name = {label: {} for label in results}
  for label, r in results.items():
    for x in r["layers"][1:]:
      by_name[label].setdefault(x["layer"].split("/")[-1], []).append(x["max_over_median"])
  names = sorted({n for v in by_name.values() for n in v})
  lines.append(records.markdown_table(
      ["module"] + list(results),
      [[n] + [f"{np.median(by_name[label][n]):.2f} ({len(by_name[label][n])})" if n in by_name[label] else "-"
              for label in results] for n in names]))
  for label, r in results.items():
    lines.append(f"\n## {label} ({r['model']}, {r['image_size']} px)\n\n")
    lines.append(records.markdown_table(
        ["layer", "kind", "C", "A/median", "q10", "q25", "q50", "q75", "q90", "<A/16", "dead"],
        [[x["layer"], x["kind"], x["channels"], round(x["max_over_median"], 2), *[round(q, 3) for q in x["quantiles"]],
          round(x["below_1_16"], 3), round(x["dead"], 3)] for x in r["layers"]]))
  with open(args.out + ".md", "w") as f:
    f.write("".join(lines))
  print("".join(lines[:4]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
