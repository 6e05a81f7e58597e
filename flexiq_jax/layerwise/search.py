"""The three phases of the practical mixed-precision algorithm (Pandey et al. 2023; AIMET AMP),
generic over what a group and a candidate are (layer bit widths, or FlexiQ per-layer ratios).

A configuration is an int array `assignment` (G,): the candidate index of each group.

Phase 1 (`sensitivity_list`): score every (group, candidate != baseline) with that group alone
  changed (`score_fn(g, k)`, e.g. SQNR of the output against float); sort least sensitive first.
  Ties are broken as AIMET breaks them: the candidate of higher `tie_rank` first (AIMET: the
  larger sum of weight and activation bits), then the larger cost reduction, then the earlier
  group in call order.
Phase 2 (`pareto_list`): from all groups at the baseline, apply the sorted entries one at a time.
  An entry that would not lower its group's cost (the group already sits at a cheaper
  candidate) is skipped — so the list is strictly decreasing in cost (AIMET applies it anyway,
  which can raise the cost). Point 0 is the baseline itself.
Phase 3 (`search`): the cheapest point whose score is >= target, by binary search (assumes the
  score falls along the list), interpolation search (same assumption, probes where a linear
  fit between the bracketing scores predicts the target), or brute force (scores every point,
  no assumption). Scores come from a callback, so evaluations can be lazy and cached.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def sensitivity_list(num_groups: int, candidates: Sequence, baseline: int, group_cost: np.ndarray,
                     score_fn: Callable[[int, int], float], allowed=None, tie_rank=None) -> list[dict]:
  """Returns [{'group', 'candidate', 'score', 'cost_reduction'}] sorted least sensitive first.

  group_cost (G, K): cost of group g at candidate k. allowed (G, K) bool: candidates a group
  supports (default all). Candidates no cheaper than the baseline are not listed. tie_rank (K,):
  see the module docstring (default: the candidate's cost summed over the groups).

  Args:
    num_groups: Number of groups G.
    candidates: The K candidates (only their count is used).
    baseline: Index of the baseline candidate.
    group_cost: (G, K) cost table.
    score_fn: Phase-1 score of (group, candidate), higher is less sensitive.
    allowed: Optional (G, K) bool mask of the candidates each group supports.
    tie_rank: Optional (K,) tie-break rank, higher first.

  Returns:
    The sorted list of entry dicts.
  """
  group_cost = np.asarray(group_cost, np.float64)
  entries = []
  for g in range(num_groups):
    for k in range(len(candidates)):
      if k == baseline or (allowed is not None and not allowed[g][k]):
        continue
      if group_cost[g, k] >= group_cost[g, baseline]:
        continue
      entries.append({"group": g, "candidate": k, "score": float(score_fn(g, k)),
                      "cost_reduction": float(group_cost[g, baseline] - group_cost[g, k])})
  return sort_sensitivity(entries, group_cost, tie_rank)


def sort_sensitivity(entries: list[dict], group_cost, tie_rank=None) -> list[dict]:
  """Sorts phase-1 entries least sensitive first, with the module docstring's tie-breaking.

  Args:
    entries: Dicts with 'group', 'candidate', 'score' and 'cost_reduction'.
    group_cost: (G, K) cost table; its column sums are the default tie rank.
    tie_rank: Optional (K,) tie-break rank per candidate, higher first.

  Returns:
    A new list: by score descending, then tie rank descending, then cost reduction descending,
    then group ascending.
  """
  rank = np.asarray(group_cost, np.float64).sum(0) if tie_rank is None else np.asarray(tie_rank, np.float64)
  return sorted(entries, key=lambda e: (e["score"], rank[e["candidate"]], e["cost_reduction"], -e["group"]),
                reverse=True)


def pareto_list(sorted_entries: list[dict], num_groups: int, baseline: int, group_cost) -> list[dict]:
  """[{'assignment': [..], 'cost', 'relative_cost', 'group', 'candidate'}], point 0 = baseline,
  strictly decreasing cost.

  Args:
    sorted_entries: Phase-1 entries, least sensitive first (`sensitivity_list`).
    num_groups: Number of groups G.
    baseline: Index of the baseline candidate.
    group_cost: (G, K) cost table.

  Returns:
    The list of Pareto point dicts; 'group' and 'candidate' name the entry applied at that point.
  """
  group_cost = np.asarray(group_cost, np.float64)
  assignment = np.full(num_groups, baseline, np.int64)
  base_cost = float(group_cost[:, baseline].sum())
  points = [{"assignment": assignment.tolist(), "cost": base_cost, "relative_cost": 1.0,
             "group": None, "candidate": None}]
  for e in sorted_entries:
    g, k = e["group"], e["candidate"]
    if group_cost[g, k] >= group_cost[g, assignment[g]]:
      continue
    assignment = assignment.copy()
    assignment[g] = k
    cost = float(group_cost[np.arange(num_groups), assignment].sum())
    points.append({"assignment": assignment.tolist(), "cost": cost, "relative_cost": cost / base_cost,
                   "group": g, "candidate": k})
  return points


def binary_search(score: Callable[[int], float], n: int, target: float) -> int:
  """Largest i in [0, n) with score(i) >= target, for scores non-increasing in i; 0 if none
  (the caller checks score(0) to see whether even the baseline meets the target).

  Args:
    score: Score of the point at an index (may evaluate lazily).
    n: Number of points, >= 1.
    target: Score to meet.

  Returns:
    The chosen index.
  """
  if score(n - 1) >= target:
    return n - 1
  lo, hi = 0, n - 1  # invariant (for lo > 0): score(lo) >= target > score(hi)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if score(mid) >= target:
      lo = mid
    else:
      hi = mid
  return lo


def interpolation_search(score: Callable[[int], float], n: int, target: float) -> int:
  """As binary_search, probing where the line through the bracket's scores crosses the target.

  Args:
    score: Score of the point at an index (may evaluate lazily).
    n: Number of points, >= 1.
    target: Score to meet.

  Returns:
    The chosen index; 0 if even score(0) misses the target.
  """
  if score(n - 1) >= target:
    return n - 1
  lo, hi = 0, n - 1
  if score(lo) < target:
    return 0
  while hi - lo > 1:
    s_lo, s_hi = score(lo), score(hi)
    if s_lo > s_hi:
      mid = lo + int(round((s_lo - target) / (s_lo - s_hi) * (hi - lo)))
    else:
      mid = (lo + hi) // 2
    mid = min(max(mid, lo + 1), hi - 1)
    if score(mid) >= target:
      lo = mid
    else:
      hi = mid
  return lo


def brute_force_search(score: Callable[[int], float], n: int, target: float) -> int:
  """The cheapest (largest) index whose score meets the target, scoring every point; 0 if none.

  Args:
    score: Score of the point at an index.
    n: Number of points.
    target: Score to meet.

  Returns:
    The chosen index.
  """
  ok = [i for i in range(n) if score(i) >= target]
  return max(ok) if ok else 0


SEARCHES = {"binary": binary_search, "interpolation": interpolation_search, "brute_force": brute_force_search}


def search(name: str, score: Callable[[int], float], n: int, target: float) -> int:
  """Runs the phase-3 search registered as `name` in SEARCHES.

  Args:
    name: 'binary', 'interpolation' or 'brute_force'.
    score: Score of the point at an index.
    n: Number of points.
    target: Score to meet.

  Returns:
    The chosen index.

  Raises:
    ValueError: If `name` is not a known search.
  """
  if name not in SEARCHES:
    raise ValueError(f"unknown phase-3 search {name!r}; valid: {sorted(SEARCHES)}")
  return SEARCHES[name](score, n, target)
