"""The per-layer quantization report of a finished run: which channels are 4-bit, per layer, at
each level and at a ratio the user names, with the extraction positions, the MAC and BOPs shares
and the calibrated lowering error the channel order read.

  python run.py --config=... --mode=report --report_ratio=0.5   # <workdir>/report/
  flexiq_jax.report("workdirs/quickstart", report_ratio=0.5)

writes `report.md` (a table per layer), `report.json` (the same numbers, with provenance) and
`lowbit_share.png` (each layer's 4-bit share of its feature channels across ratios). Everything is
read from the run's files: the plan and quantized variables of `serving/` (after finetuning) or of
`quantized/` (before), the selection of `select/selection.json` and, where present, the
calibration statistics of `calibrate/stats`. All costs come from `cost` (MACs and BOPs per
example, the attention matmuls at 8 x 8 bits at every ratio).

Sensitivity. The evolutionary search scores whole selections (KL or top-1 of the quantized model
against the float model on calibration images) and records the best and mean fitness per
generation and level (`selection.json["search"]`); it measures no per-layer sensitivity. The
per-layer figure the selection did read is the calibrated lowering error of each channel
(activation + weight, `calibrate.statistics`: the squared code error of lowering it, summed over
the calibration data), which orders the channels within a layer and seeds the greedy and
evolutionary selectors; the report gives its sum over the channels lowered at the report ratio.
A per-layer sensitivity as AIMET's quant analyzer reports it would need one more measurement:
the fitness with one layer lowered at a time (the layer-wise search, `layerwise/`, measures such
a table for its own candidates).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from flexiq_jax import cost
from flexiq_jax import records
from flexiq_jax.interception import get_path

REPORT_DIR = "report"
DEFAULT_RATIOS = tuple(np.round(np.linspace(0.0, 1.0, 21), 2).tolist())
EXTRACTION_POSITIONS = 5  # e, f in {0, ..., 4}


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """A written report: its directory, the JSON document and the paths of its files."""

  directory: str
  data: dict
  files: tuple[str, ...]

  @property
  def markdown_path(self) -> str:
    return os.path.join(self.directory, "report.md")


def _histogram(positions) -> list[int]:
  return np.bincount(np.asarray(positions, np.int64).reshape(-1), minlength=EXTRACTION_POSITIONS).tolist()


def _counts_at(plan, fill: dict, ratio: float) -> dict[str, int]:
  """{lowerable path: lowered channels} at a host ratio (the host twin of the traced counts)."""
  from flexiq_jax import select
  if not plan.lowerable:
    return {}
  counts = select.counts_at_ratio_np(np.asarray(fill["layer"]), np.asarray(fill["threshold"]),
                                     len(plan.lowerable), ratio)
  return {p: int(counts[i]) for i, p in enumerate(plan.lowerable)}


def build(plan, qvars: dict, *, report_ratio: float = 0.5, ratios: Sequence[float] = DEFAULT_RATIOS,
          stats: dict | None = None, selection: dict | None = None) -> dict:
  """The report document of quantized variables (any of: as built, finetuned, int8 export).

  Args:
    plan: the run's `quantize.QuantPlan`.
    qvars: quantized variables with 'quant', 'levels' and (or able to rebuild) 'fill'.
    report_ratio: the ratio (share of the lowerable MACs in 4 bits) the per-layer columns are at.
    ratios: the ratios of the per-layer 4-bit share curves (the plot).
    stats: calibration statistics ({path: {'act_lowering_error', 'weight_lowering_error', ...}}),
      for the lowering error column; None leaves it out.
    selection: `select/selection.json` (selector name, per-level MAC ratios), if any.

  Returns:
    A JSON-serialisable dict: 'levels', 'report_ratio', 'ratios', 'totals', 'layers' (one entry
    per quantized layer, in call order), 'matmuls' and 'notes'.
  """
  from flexiq_jax.quantize.transform import add_fill_table
  from flexiq_jax.quantize.transform import check_ratio
  report_ratio = check_ratio(report_ratio)
  ratios = [check_ratio(r) for r in ratios]
  if "fill" not in qvars:
    qvars = add_fill_table(plan, qvars)
  levels = [float(l) for l in np.asarray(qvars["levels"]).reshape(-1)] if "levels" in qvars else []
  infos = plan.layer_infos()
  matmuls = plan.matmul_infos()
  all_macs = float(cost.total_macs(infos) + cost.matmul_macs(matmuls))
  lowerable_macs = float(sum(infos[p].macs for p in plan.lowerable))
  at_ratio = _counts_at(plan, qvars.get("fill", {}), report_ratio)
  curves = {r: _counts_at(plan, qvars.get("fill", {}), r) for r in ratios}
  bops_8bit = cost.channelwise_bops(infos, {}, matmuls=matmuls)
  bops_at = cost.channelwise_bops(infos, at_ratio, matmuls=matmuls)
  layers = []
  for path, info in sorted(infos.items(), key=lambda kv: kv[1].order):
    lq = get_path(qvars["quant"], path)
    n = at_ratio.get(path, 0)
    act_e, weight_e = np.asarray(lq["act_e"]).reshape(-1), np.asarray(lq["weight_e"]).reshape(-1)
    entry: dict[str, Any] = {
        "path": path, "kind": info.kind, "in_channels": int(info.in_channels), "out_channels": int(info.out_channels),
        "groups": int(info.groups), "lowerable": path in plan.lowerable, "signed_input": bool(plan.signed.get(path)),
        "macs": int(info.macs), "mac_share": info.macs / all_macs,
        "lowerable_mac_share": info.macs / lowerable_macs if path in plan.lowerable and lowerable_macs else 0.0,
        "bops_share_8bit": cost.channelwise_layer_bops(info, 0) / bops_8bit,
        "bops_share_at_ratio": cost.channelwise_layer_bops(info, n) / bops_at,
        "lowered_per_level": [int(c) for c in np.asarray(lq["counts"]).reshape(-1)] if "rank" in lq else
                             [0] * len(levels),
        "lowered_at_ratio": int(n), "lowered_share_at_ratio": n / info.in_channels,
        "lowered_share_per_ratio": [curves[r].get(path, 0) / info.in_channels for r in ratios],
        "act_e_histogram": _histogram(act_e), "weight_f_histogram": _histogram(weight_e),
    }
    if "rank" in lq:
      lowered = np.asarray(lq["rank"]).reshape(-1) < n
      entry["lowered_channels_at_ratio"] = np.flatnonzero(lowered).tolist()
      entry["act_e_histogram_lowered"] = _histogram(act_e[lowered])
      entry["weight_f_histogram_lowered"] = _histogram(weight_e[lowered])
      if stats is not None and path in stats:
        error = (np.asarray(stats[path]["act_lowering_error"], np.float64)
                 + np.asarray(stats[path]["weight_lowering_error"], np.float64)).reshape(-1)
        entry["lowering_error_lowered"] = float(error[lowered].sum())
        entry["lowering_error_all"] = float(error.sum())
    layers.append(entry)
  totals = {
      "macs": int(all_macs), "lowerable_macs": int(lowerable_macs), "matmul_macs": int(cost.matmul_macs(matmuls)),
      "lowerable_layers": len(plan.lowerable), "quantized_layers": len(plan.quantized),
      "ratio_at_report_ratio": float(cost.lowered_mac_share(
          [at_ratio[p] for p in plan.lowerable], [infos[p].in_channels for p in plan.lowerable],
          [infos[p].macs for p in plan.lowerable])) if plan.lowerable else 0.0,
      "low_bit_mac_share_at_report_ratio": cost.low_bit_mac_share(infos, at_ratio, matmuls=matmuls),
      "relative_bops_at_report_ratio": bops_at / bops_8bit,
  }
  return {
      "levels": levels, "report_ratio": report_ratio, "ratios": ratios, "totals": totals, "layers": layers,
      "matmuls": [{"path": p, "equation": m.equation, "macs": int(m.macs), "mac_share": m.macs / all_macs,
                   "bits": cost.MATMUL_BITS} for p, m in matmuls.items()],
      "selector": (selection or {}).get("selector"),
      "mac_ratio_per_level": (selection or {}).get("mac_ratio_per_level"),
      "notes": {
          "ratio": "share of the lowerable layers' MACs in 4 bits (FlexiQ's r); first/last layers and the "
                   "attention matmuls stay 8-bit",
          "mac_share": "the layer's MACs per example over all quantized MACs (attention matmuls included)",
          "bops_share": "the layer's BOPs over the model's BOPs (cost.channelwise_bops), at 8 bits and at the "
                        "report ratio",
          "extraction_positions": "histogram over e (activations) and f (weights) in 0..4: a lowered code keeps "
                                  "the 4 bits starting at bit e (docs/DESIGN.md §3.2); '_lowered' counts only "
                                  "the channels lowered at the report ratio",
          "sensitivity": "The evolutionary search scores whole selections and records no per-layer sensitivity "
                         "(selection.json 'search': best/mean fitness per generation and level); "
                         "'lowering_error_*' is the calibrated per-channel lowering error (activation + weight "
                         "squared code error over the calibration data) the channel order and the selectors' "
                         "seed read, summed over the lowered / all channels. A per-layer sensitivity needs the "
                         "fitness with one layer lowered at a time (not measured by the selection stage).",
      },
  }


def _hist_str(hist: Sequence[int]) -> str:
  return " ".join(f"{e}:{c}" for e, c in enumerate(hist) if c) or "-"


def markdown(doc: dict, title: str = "FlexiQ per-layer quantization report") -> str:
  """The report document as Markdown: provenance, totals and one table row per layer.

  Args:
    doc: The report document (`build`, optionally with 'provenance', 'source' and 'run_commit').
    title: The document's heading.

  Returns:
    The Markdown text.
  """
  t, r = doc["totals"], doc["report_ratio"]
  out = [f"# {title}\n\n"]
  if "provenance" in doc:
    out.append(records.provenance_header(doc["provenance"]))
  if doc.get("source"):
    out.append(f"Run: `{doc['source']}`" + (f" (made by commit `{doc['run_commit']}`)" if doc.get("run_commit") else "")
               + "\n\n")
  levels = ", ".join(f"{l:g}" for l in doc["levels"])
  out.append(f"Levels: {levels}; selector: {doc.get('selector') or 'unknown'}. Report ratio r = {r:g}: "
             f"{t['ratio_at_report_ratio']:.3f} of the lowerable MACs and {t['low_bit_mac_share_at_report_ratio']:.3f} "
             f"of all quantized MACs in 4 bits, relative BOPs {t['relative_bops_at_report_ratio']:.3f}. "
             f"{t['quantized_layers']} quantized layers ({t['lowerable_layers']} lowerable), "
             f"{t['macs']:,} MACs per image ({t['matmul_macs']:,} in 8-bit attention matmuls).\n\n")
  has_error = any("lowering_error_lowered" in l for l in doc["layers"])
  headers = (["layer", "kind", "C", "MAC %", "BOPs % (8b)", f"BOPs % (r={r:g})"]
             + [f"4-bit @{l:g}" for l in doc["levels"]]
             + [f"4-bit @r={r:g}", "e (lowered @r)", "f (lowered @r)"] + (["lowering err (lowered @r)"] if has_error else []))
  rows = []
  for l in doc["layers"]:
    low = l["lowerable"]
    row = [l["path"], l["kind"], l["in_channels"], f"{100 * l['mac_share']:.2f}", f"{100 * l['bops_share_8bit']:.2f}",
           f"{100 * l['bops_share_at_ratio']:.2f}"]
    row += [str(c) if low else "8-bit" for c in l["lowered_per_level"]]
    row += [f"{l['lowered_at_ratio']} ({100 * l['lowered_share_at_ratio']:.0f}%)" if low else "8-bit",
            _hist_str(l.get("act_e_histogram_lowered", [])), _hist_str(l.get("weight_f_histogram_lowered", []))]
    if has_error:
      row.append(f"{l['lowering_error_lowered']:.4g}" if "lowering_error_lowered" in l else "-")
    rows.append(row)
  out.append(records.markdown_table(headers, rows))
  if doc["matmuls"]:
    out.append("\nAttention matmuls (8-bit at every ratio):\n\n")
    out.append(records.markdown_table(["matmul", "equation", "MAC %"],
                                      [[m["path"], f"`{m['equation']}`", f"{100 * m['mac_share']:.2f}"]
                                       for m in doc["matmuls"]]))
  out.append("\nColumns: `4-bit @l` channels lowered at level l (the selection), `4-bit @r` at the report ratio "
             "(the fill table between levels); `e`/`f`: histogram `position:count` of the activation/weight "
             "extraction positions of the channels lowered at r. ")
  out.append(doc["notes"]["sensitivity"] + "\n")
  return "".join(out)


def plot(doc: dict, path: str) -> str:
  """Each lowerable layer's 4-bit share of its feature channels across the ratios, as a heatmap
  (layers down, ratios across), with the model's ratio marked; written to `path`.

  Args:
    doc: The report document (`build`).
    path: Output PNG path; its directory is created if missing.

  Returns:
    `path`.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  layers = [l for l in doc["layers"] if l["lowerable"]]
  ratios = doc["ratios"]
  fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(ratios) + 3), max(2.5, 0.28 * len(layers) + 1.5)))
  if layers:
    share = np.array([l["lowered_share_per_ratio"] for l in layers])
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                   extent=(ratios[0] - 0.025, ratios[-1] + 0.025, len(layers) - 0.5, -0.5))
    fig.colorbar(im, ax=ax, label="4-bit share of the layer's channels")
    ax.set_yticks(range(len(layers)), [l["path"] for l in layers], fontsize=7)
  ax.set_xlabel("ratio r (share of the lowerable MACs in 4 bits)")
  ax.set_title("Per-layer 4-bit share across ratios")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write(doc: dict, directory: str) -> LayerReport:
  """report.json, report.md and lowbit_share.png in `directory`.

  Args:
    doc: The report document.
    directory: Output directory, created if missing.

  Returns:
    A LayerReport for `directory`, `doc` and the three file names.
  """
  os.makedirs(directory, exist_ok=True)
  records.write_json_atomic(os.path.join(directory, "report.json"), doc)
  md = os.path.join(directory, "report.md")
  tmp = f"{md}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(markdown(doc))
  os.replace(tmp, md)
  plot(doc, os.path.join(directory, "lowbit_share.png"))
  return LayerReport(directory, doc, ("report.json", "report.md", "lowbit_share.png"))


def read_run(workdir: str) -> tuple[Any, dict, dict | None, dict | None, str]:
  """(plan, qvars, stats or None, selection or None, source) of a run's workdir: the finetuned
  serving export if the run finished finetuning, else the quantized stage. Raises
  FileNotFoundError with what is missing.

  Args:
    workdir: A run.py working directory.

  Returns:
    Tuple (plan, qvars, stats, selection, source): the QuantPlan, the quantized variables, the
    calibration statistics (None without calibrate/stats), select/selection.json's content (None
    if absent) and the source as '<workdir>/<stage>'.

  Raises:
    FileNotFoundError: If the workdir has neither serving/ nor a finished quantized/ stage.
  """
  from flexiq_jax import checkpoint
  from flexiq_jax.plan import QuantPlan
  for stage, qvars_dir in (("serving", "qvars_int8"), ("quantized", "qvars")):
    plan_path = os.path.join(workdir, stage, "plan.json")
    if os.path.exists(plan_path) and os.path.isdir(os.path.join(workdir, stage, qvars_dir)):
      if stage == "quantized" and not os.path.exists(os.path.join(workdir, stage, "done.json")):
        continue
      plan = QuantPlan.from_json(records.read_json(plan_path))
      qvars = checkpoint.load_tree(os.path.join(workdir, stage, qvars_dir))
      break
  else:
    raise FileNotFoundError(f"{workdir} holds no quantized model (neither serving/ nor a finished quantized/): "
                            "run run.py up to --mode=quantize (or the whole pipeline) first")
  stats_dir = os.path.join(workdir, "calibrate", "stats")
  stats = checkpoint.load_tree(stats_dir) if os.path.isdir(stats_dir) else None
  selection = records.read_json(os.path.join(workdir, "select", "selection.json"))
  return plan, qvars, stats, selection, f"{workdir}/{stage}"


def report(run_or_workdir: str | os.PathLike | Any, *, report_ratio: float = 0.5, ratios: Sequence[float] = DEFAULT_RATIOS,
           directory: str | None = None) -> LayerReport:
  """The per-layer report of a finished run (module docstring).

  Args:
    run_or_workdir: a run.py workdir, a `flexiq_jax.LoadedRun`, or a `(qmodel, qvars)` pair as
      `quantize_model` returns it.
    report_ratio: the ratio in [0, 1] the per-layer 4-bit counts, extraction histograms and BOPs
      shares are given at.
    ratios: the ratios of the per-layer 4-bit share plot.
    directory: where the files go (default <workdir>/report; required for a pair).

  Returns:
    The `LayerReport` (its `data` is report.json's content).

  Raises:
    ValueError: If an in-memory model is given without `directory`, or a ratio is not in [0, 1].
    FileNotFoundError: If the workdir holds no quantized model (`read_run`).
  """
  stats = selection = None
  source, run_commit = None, None
  if isinstance(run_or_workdir, (str, os.PathLike)):
    workdir = os.fspath(run_or_workdir)
    plan, qvars, stats, selection, source = read_run(workdir)
    run_commit = (records.read_json(os.path.join(workdir, "results.json")) or {}).get("commit")
    directory = directory or os.path.join(workdir, REPORT_DIR)
  else:
    if isinstance(run_or_workdir, tuple):
      qmodel, qvars = run_or_workdir
    else:  # a LoadedRun
      qmodel, qvars = run_or_workdir.qmodel, run_or_workdir.qvars
    plan = qmodel.plan
    if directory is None:
      raise ValueError("report of an in-memory model: give directory= for its files")
  doc = build(plan, qvars, report_ratio=report_ratio, ratios=ratios, stats=stats, selection=selection)
  doc = {"provenance": records.run_info(), "source": source, "run_commit": run_commit, **doc}
  return write(doc, directory)
