"""Plot of an evolutionary search: best and mean fitness per generation, one panel per level."""

from __future__ import annotations

import os


def plot_search_history(result, path: str) -> str:
  """Saves a PNG of `result.history` (a SearchResult or its as_dict()) to `path`; returns path.

  Uses the Agg canvas directly (no pyplot), so it works headless and leaves matplotlib's
  global backend alone. Fixed levels (0 and 1, no history) get no panel.

  Args:
    result: A SearchResult or the dict of its as_dict().
    path: Output PNG path; its directory is created if missing.

  Returns:
    `path`.
  """
  # Imported here so `import flexiq_jax.select` does not pay for matplotlib.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  get = result.get if isinstance(result, dict) else lambda key: getattr(result, key)
  levels, history = list(get("levels")), list(get("history"))
  panels = [(r, h) for r, h in zip(levels, history) if len(h["best"])]
  fig = Figure(figsize=(4 * max(1, len(panels)), 3.2), layout="constrained")
  FigureCanvasAgg(fig)
  if not panels:
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, "no searched levels", ha="center", va="center")
    ax.set_axis_off()
  for j, (r, h) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), j + 1)
    gens = range(len(h["best"]))
    ax.plot(gens, h["best"], "o-", label="best")
    ax.plot(gens, h["mean"], "s--", alpha=0.7, label="population mean")
    ax.set_title(f"ratio {float(r):g}")
    ax.set_xlabel("generation")
    if j == 0:
      ax.set_ylabel("fitness (lower is better)")
      ax.legend()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  return path
