"""The ratio table: top-1 at each 4-bit ratio before/after finetuning, with relative BOPs, as
results.json, a Markdown table and a PNG plot."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from flexiq_jax import records  # noqa: E402
from flexiq_jax import train as train_lib  # noqa: E402


FIDELITY = train_lib.FIDELITY_METRICS  # against the float model (stage_results.RatioPoint)


def ratio_rows(before, after=None) -> list[dict]:
  """One row per ratio of `before` (pipeline.RatioPoint list), with `after` beside it.

  Args:
    before: RatioPoint list measured before finetuning.
    after: Optional RatioPoint list measured after finetuning, matched to `before` by ratio.

  Returns:
    A list of dicts, one per ratio of `before`, with 'ratio', 'top1_before', 'top1_after',
    'top5_before', 'top5_after', 'relative_bops', 'low_bit_mac_share' and '<metric>_before' /
    '<metric>_after' for each fidelity metric (the '_after' values None without a match).
  """
  after_by_ratio = {r.ratio: r for r in after or []}
  rows = []
  for b in before:
    a = after_by_ratio.get(b.ratio)
    row = {"ratio": b.ratio, "top1_before": b.top1, "top1_after": a.top1 if a else None,
           "top5_before": b.top5, "top5_after": a.top5 if a else None,
           "relative_bops": b.relative_bops, "low_bit_mac_share": b.low_bit_mac_share}
    for name in FIDELITY:
      row[f"{name}_before"] = getattr(b, name)
      row[f"{name}_after"] = getattr(a, name) if a else None
    rows.append(row)
  return rows


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def write_ratio_report(workdir: str, rows: list[dict], float_metrics: dict | None, title: str) -> str:
  """Writes the ratio table as `ratio_table.md` and its plot as `ratio_plot.png` in `workdir`.

  The table has the fidelity columns (agreement, KL, SQNR) when any row carries them.

  Args:
    workdir: Directory the two files go to.
    rows: Rows from `ratio_rows`.
    float_metrics: Optional metrics of the float model; its 'top1' is shown in the text and plot.
    title: Title of the Markdown document and of the plot.

  Returns:
    The Markdown text written to ratio_table.md.
  """
  info = records.run_info()
  fidelity = any(r.get("kl_before") is not None for r in rows)
  headers = ["4-bit ratio", "top-1 before FT (%)", "top-1 after FT (%)"]
  if fidelity:
    headers += ["agreement before / after (%)", "KL before / after", "SQNR before / after (dB)"]
  headers += ["relative BOPs", "4-bit MAC share"]
  table = []
  for r in rows:
    line = [f"{100 * r['ratio']:.0f}%", r["top1_before"], "-" if r["top1_after"] is None else r["top1_after"]]
    if fidelity:
      line += [f"{_fmt(r['agreement_before'], '.2f')} / {_fmt(r['agreement_after'], '.2f')}",
               f"{_fmt(r['kl_before'], '.4f')} / {_fmt(r['kl_after'], '.4f')}",
               f"{_fmt(r['sqnr_db_before'], '.1f')} / {_fmt(r['sqnr_db_after'], '.1f')}"]
    table.append(line + [f"{r['relative_bops']:.3f}", f"{r['low_bit_mac_share']:.3f}"])
  text = f"# {title}\n\n" + records.provenance_header(info)
  if float_metrics:
    text += f"Float model top-1: {float_metrics['top1']:.2f}%\n\n"
  text += ("Relative BOPs: against the same model with every quantized layer and attention matmul at W8A8. "
           "The 4-bit ratio is the share of 4-bit MACs among the lowerable layers' MACs; the 4-bit MAC "
           "share column counts all quantized layers and attention matmuls (first and last layers and the "
           "matmuls stay 8-bit).\n\n")
  if fidelity:
    text += ("Against the float model on the same eval images, in the same pass: agreement = share of "
             "images whose top-1 class equals the float model's; KL = mean KL(float || quantized) of the "
             "softmax outputs (nats); SQNR = 10 log10(sum logits_float^2 / sum (logits_float - "
             "logits_quantized)^2) over all eval logits, the layer-wise search's sensitivity measure.\n\n")
  text += records.markdown_table(headers, table)
  md_path = os.path.join(workdir, "ratio_table.md")
  with open(md_path, "w") as f:
    f.write(text)

  fig, ax = plt.subplots(figsize=(5.5, 4))
  ratios = [100 * r["ratio"] for r in rows]
  ax.plot(ratios, [r["top1_before"] for r in rows], "o-", label="before finetuning")
  if any(r["top1_after"] is not None for r in rows):
    ax.plot(ratios, [r["top1_after"] for r in rows], "s-", label="after finetuning")
  if float_metrics:
    ax.axhline(float_metrics["top1"], color="gray", ls="--", label="float")
  ax.set_xlabel("4-bit channel ratio (%)")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "ratio_plot.png"), dpi=120)
  plt.close(fig)
  return text
