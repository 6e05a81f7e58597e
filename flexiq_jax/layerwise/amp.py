"""The mixed-precision search with every phase cached in a directory (JSON), as AIMET caches its
phase results: a crashed run resumes, and a rerun with another allowed drop or another phase-3
search evaluates nothing it has evaluated before.

Order, as AIMET's `GreedyMixedPrecisionAlgo.run`:
  baseline   score the float model and every candidate applied to all groups ("uniform"); the
             baseline is the best-scoring uniform candidate (or `AmpProblem.baseline` if set), the
             lowest is the cheapest uniform candidate (ties: the better score).
  early exit if even the baseline misses `reference - allowed_drop`, the baseline is chosen
             (target missed); if the lowest is within the drop (strictly), it is chosen. Either
             way phases 1-3 do not run, and the result says so (`early_exit`).
  phase 1-3  sensitivity list, Pareto list, search (see `search`).

Files in `stage_dir` (each holds the fingerprint of what it was computed from; a mismatch
discards it):
  phase1.json   sensitivity score per (group, candidate), written as they are computed
  phase2.json   the sorted sensitivity list and the Pareto list (costs only)
  scores.json   eval score per Pareto point (keyed by baseline and index), the float score and
                the uniform-candidate scores
  result_<search>_drop<d>.json   the chosen point
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import numpy as np

from flexiq_jax import progress
from flexiq_jax import records
from flexiq_jax import stage_cache
from flexiq_jax.stage_cache import JsonCache
from flexiq_jax.layerwise import search as phases


@dataclasses.dataclass
class AmpProblem:
  groups: list[str]
  candidates: list[str]  # names
  group_cost: np.ndarray  # (G, K) BOPs of group g at candidate k
  sensitivity_fn: Callable[[int, int], float]  # phase 1 score of (group, candidate) alone
  eval_fn: Callable[[np.ndarray, int], float]  # score of an assignment (G,) given the baseline index
  float_eval_fn: Callable[[], float] | None = None  # the unquantized model's score (the reference)
  baseline: int | None = None  # None: automatic (the best uniform candidate), as AIMET
  tie_rank: np.ndarray | None = None  # (K,) phase-1 tie-break, see search.sort_sensitivity
  allowed: np.ndarray | None = None  # (G, K) bool


def _tick(bar, value):
  bar.update(1)
  return value


def _point(group_cost, assignment, base_cost, score=None) -> dict:
  cost = float(np.asarray(group_cost)[np.arange(len(assignment)), assignment].sum())
  return {"assignment": [int(a) for a in assignment], "cost": cost, "relative_cost": cost / base_cost,
          "group": None, "candidate": None, "score": score}


def run(problem: AmpProblem, stage_dir: str, fingerprint: str, *, allowed_drop: float,
        search: str = "binary", phase2_full: bool = True, early_exit: bool = True, log=print) -> dict:
  """Runs the baseline step, then phases 1-3 unless an early exit applies (reusing cached
  results); returns a JSON-able summary.

  allowed_drop: in the eval score's units (e.g. top-1 points) below the float score (AIMET's
  reference; without float_eval_fn the baseline's score). phase2_full: score every Pareto point
  (for the Pareto plot) rather than only those phase 3 probes. early_exit: False always runs
  phases 1-3 (a selector that needs the whole Pareto list).

  Args:
    problem: The groups, candidates, cost table and scoring callbacks.
    stage_dir: Directory of the cached phase files, created if missing.
    fingerprint: Fingerprint of the inputs; cached files with another one are discarded.
    allowed_drop: Allowed score drop below the reference.
    search: Phase-3 search name ('binary', 'interpolation' or 'brute_force').
    phase2_full: Whether to score every Pareto point.
    early_exit: Whether the baseline step may end the search.
    log: Function that prints the one-line outcome.

  Returns:
    The summary dict (also written to result_<search>_drop<d>.json): the reference score, target,
    baseline, uniform scores, early exit reason, phases run, whether the target was met, the
    chosen point and its candidates, the sensitivity and Pareto lists, the number of new
    evaluations and the seconds per phase.

  Raises:
    ValueError: If `search` is not a known phase-3 search (checked when phase 3 runs).
  """
  os.makedirs(stage_dir, exist_ok=True)
  G, K = len(problem.groups), len(problem.candidates)
  group_cost = np.asarray(problem.group_cost, np.float64)
  scores = JsonCache(os.path.join(stage_dir, "scores.json"), stage_cache.fingerprint([fingerprint, "scores"]))
  evaluations = {"count": 0}

  def cached_eval(key, assignment, baseline):
    def compute():
      evaluations["count"] += 1
      return float(problem.eval_fn(np.asarray(assignment), baseline))
    return scores.get(key, compute)

  t0 = time.perf_counter()
  uniform = [cached_eval(f"uniform:{k}", np.full(G, k), k) for k in range(K)]
  reference = (scores.get("float", problem.float_eval_fn) if problem.float_eval_fn is not None else None)
  if problem.baseline is not None:
    baseline = problem.baseline
  else:
    baseline = int(np.argmax(uniform))  # the first best, as AIMET's find_max_eval
  uniform_cost = group_cost.sum(0)
  lowest = min(range(K), key=lambda k: (uniform_cost[k], -uniform[k]))
  reference = uniform[baseline] if reference is None else reference
  target = reference - allowed_drop
  base_cost = float(uniform_cost[baseline])
  t_base = time.perf_counter()

  def names(assignment):
    return {problem.groups[g]: problem.candidates[k] for g, k in enumerate(assignment)}

  result = {"search": search, "allowed_drop": allowed_drop, "reference_score": reference, "target": target,
            "baseline": problem.candidates[baseline], "lowest": problem.candidates[lowest],
            "uniform_scores": dict(zip(problem.candidates, uniform)), "groups": problem.groups}
  early = None
  if not early_exit:
    pass
  elif reference - uniform[baseline] > allowed_drop:
    early = "baseline_misses_target"
    chosen, met = _point(group_cost, np.full(G, baseline), base_cost, uniform[baseline]), False
  elif reference - uniform[lowest] < allowed_drop:
    early = "lowest_within_drop"
    chosen, met = _point(group_cost, np.full(G, lowest), base_cost, uniform[lowest]), True
  if early is not None:
    result.update(early_exit=early, phases_run=[], target_met=met, chosen_index=None, chosen=chosen,
                  chosen_candidates=names(chosen["assignment"]), num_points=0,
                  new_evaluations=evaluations["count"], sensitivity=[], pareto=[],
                  seconds={"baseline": t_base - t0, "phase1": 0.0, "phase2": 0.0, "phase3": 0.0})
    records.write_json_atomic(os.path.join(stage_dir, f"result_{search}_drop{allowed_drop:g}.json"), result)
    log(f"mixed precision ({os.path.basename(stage_dir)}): early exit ({early}), chose uniform "
        f"{problem.candidates[chosen['assignment'][0]]} (score {chosen['score']:.2f}, target {target:.2f}), "
        f"{evaluations['count']} new evaluations")
    return result

  p1_fp = stage_cache.fingerprint([fingerprint, "phase1"])
  cache1 = JsonCache(os.path.join(stage_dir, "phase1.json"), p1_fp)
  t1 = time.perf_counter()
  cheaper = group_cost < group_cost[:, baseline:baseline + 1]
  num_entries = int(np.sum(cheaper & (np.asarray(problem.allowed, bool) if problem.allowed is not None else True)))
  with progress.bar(desc="layer-wise phase 1 (sensitivity)", total=num_entries, unit="eval") as bar:
    sens = phases.sensitivity_list(
        G, problem.candidates, baseline, group_cost,
        lambda g, k: _tick(bar, cache1.get(f"{g}:{k}", lambda: problem.sensitivity_fn(g, k))), problem.allowed,
        problem.tie_rank)
  t2 = time.perf_counter()
  pareto = phases.pareto_list(sens, G, baseline, group_cost)
  sens = [dict(e, group_name=problem.groups[e["group"]], candidate_name=problem.candidates[e["candidate"]])
          for e in sens]
  records.write_json_atomic(os.path.join(stage_dir, "phase2.json"), {
      "fingerprint": p1_fp, "groups": problem.groups, "candidates": problem.candidates,
      "baseline": problem.candidates[baseline], "sensitivity": sens, "pareto": pareto})

  def score(i: int) -> float:
    return uniform[baseline] if i == 0 else cached_eval(f"b{baseline}:{i}", pareto[i]["assignment"], baseline)

  if phase2_full:
    for i in progress.bar(range(len(pareto)), desc="layer-wise phase 2 (Pareto points)", unit="point"):
      score(i)
  t3 = time.perf_counter()
  n = len(pareto)
  met = score(0) >= target  # False only without early exits
  with progress.bar(desc=f"layer-wise phase 3 ({search} search)", unit="eval") as bar:
    chosen_index = phases.search(search, lambda i: _tick(bar, score(i)), n, target) if met else 0
  t4 = time.perf_counter()
  for i, p in enumerate(pareto):
    p["score"] = uniform[baseline] if i == 0 else scores.data.get(f"b{baseline}:{i}")
  result.update(early_exit=None, phases_run=[1, 2, 3], target_met=met, chosen_index=chosen_index,
                chosen=pareto[chosen_index], chosen_candidates=names(pareto[chosen_index]["assignment"]),
                num_points=n, new_evaluations=evaluations["count"], sensitivity=sens, pareto=pareto,
                seconds={"baseline": t_base - t0, "phase1": t2 - t1, "phase2": t3 - t2, "phase3": t4 - t3})
  records.write_json_atomic(os.path.join(stage_dir, f"result_{search}_drop{allowed_drop:g}.json"), result)
  log(f"mixed precision ({os.path.basename(stage_dir)}): {n} Pareto points, chose #{chosen_index} "
      f"(relative BOPs {pareto[chosen_index]['relative_cost']:.3f}, score {score(chosen_index):.2f}, "
      f"target {target:.2f}), {evaluations['count']} new evaluations")
  return result
