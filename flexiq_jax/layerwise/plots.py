"""Sensitivity and Pareto plots (PNG) of a mixed-precision search summary (amp.run's dict)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_sensitivity(result: dict, path: str, title: str) -> None:
  """One bar per (group, candidate), least sensitive (highest SQNR) first.

  Args:
    result: amp.run's summary (reads 'sensitivity' with 'score', 'group_name', 'candidate_name').
    path: Output PNG path.
    title: Plot title.
  """
  entries = result["sensitivity"]
  fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * len(entries) + 2), 4))
  ax.bar(range(len(entries)), [e["score"] for e in entries], color="tab:blue")
  ax.set_xticks(range(len(entries)))
  ax.set_xticklabels([f"{e['group_name']} {e['candidate_name']}" for e in entries], rotation=90, fontsize=6)
  ax.set_ylabel("SQNR of the output vs float (dB)")
  ax.set_title(title, fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_pareto(result: dict, path: str, title: str) -> None:
  """Score vs relative BOPs of every scored Pareto point; the chosen point and target marked.

  Args:
    result: amp.run's summary (reads 'pareto', 'chosen', 'target', 'allowed_drop').
    path: Output PNG path.
    title: Plot title.
  """
  pts = [p for p in result["pareto"] if p.get("score") is not None]
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.plot([p["relative_cost"] for p in pts], [p["score"] for p in pts], "o-", ms=3, label="Pareto list")
  chosen = result["chosen"]
  if chosen.get("score") is not None:
    ax.plot([chosen["relative_cost"]], [chosen["score"]], "r*", ms=12, label="chosen")
  ax.axhline(result["target"], color="gray", ls="--", label=f"target (drop {result['allowed_drop']:g})")
  ax.set_xlabel("relative BOPs")
  ax.set_ylabel("score (top-1 %)")
  ax.set_title(title, fontsize=9)
  ax.invert_xaxis()
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
