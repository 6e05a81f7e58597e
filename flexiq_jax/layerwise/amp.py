"""The mixed-precision search with every phase cached in a directory (JSON), as AIMET caches its
phase results: a crashed run resumes, and a rerun with another allowed drop or another phase-3
search evaluates nothing it has evaluated before.

Files in `stage_dir` (each holds the fingerprint of what it was computed from; a mismatch
discards it):
  phase1.json   sensitivity score per (group, candidate), written as they are computed
  phase2.json   the sorted sensitivity list and the Pareto list (costs only)
  scores.json   eval score per Pareto point index (lazily filled by phase 2 / phase 3), and the
                float and uniform-candidate scores
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
  baseline: int  # candidate index every group starts at
  group_cost: np.ndarray  # (G, K) BOPs of group g at candidate k
  sensitivity_fn: Callable[[int, int], float]  # phase 1 score of (group, candidate) alone
  eval_fn: Callable[[np.ndarray], float]  # score of an assignment (G,) on evaluation data
  float_eval_fn: Callable[[], float] | None = None  # the unquantized model's score (the reference)
  allowed: np.ndarray | None = None  # (G, K) bool


def _tick(bar, value):
  bar.update(1)
  return value


def run(problem: AmpProblem, stage_dir: str, fingerprint: str, *, allowed_drop: float,
        search: str = "binary", phase2_full: bool = True, log=print) -> dict:
  """Runs phases 1-3 (reusing cached results); returns a JSON-able summary.

  allowed_drop: in the eval score's units (e.g. top-1 points) below the float score (AIMET's
  reference; without float_eval_fn the all-baseline score). phase2_full: score every Pareto
  point (for the Pareto plot) rather than only those phase 3 probes.
  """
  os.makedirs(stage_dir, exist_ok=True)
  p1_fp = stage_cache.fingerprint([fingerprint, "phase1"])
  cache1 = JsonCache(os.path.join(stage_dir, "phase1.json"), p1_fp)
  t0 = time.perf_counter()
  cost = np.asarray(problem.group_cost, np.float64)
  cheaper = cost < cost[:, problem.baseline:problem.baseline + 1]
  num_entries = int(np.sum(cheaper & (np.asarray(problem.allowed, bool) if problem.allowed is not None else True)))
  with progress.bar(desc="layer-wise phase 1 (sensitivity)", total=num_entries, unit="eval") as bar:
    sens = phases.sensitivity_list(
        len(problem.groups), problem.candidates, problem.baseline, problem.group_cost,
        lambda g, k: _tick(bar, cache1.get(f"{g}:{k}", lambda: problem.sensitivity_fn(g, k))), problem.allowed)
  t1 = time.perf_counter()
  pareto = phases.pareto_list(sens, len(problem.groups), problem.baseline, problem.group_cost)
  records.write_json_atomic(os.path.join(stage_dir, "phase2.json"), {
      "fingerprint": p1_fp, "groups": problem.groups, "candidates": problem.candidates,
      "baseline": problem.candidates[problem.baseline],
      "sensitivity": [dict(e, group_name=problem.groups[e["group"]],
                           candidate_name=problem.candidates[e["candidate"]]) for e in sens],
      "pareto": pareto})
  scores = JsonCache(os.path.join(stage_dir, "scores.json"), stage_cache.fingerprint([fingerprint, "scores"]))
  evaluations = {"count": 0}

  def score(i: int) -> float:
    def compute():
      evaluations["count"] += 1
      return float(problem.eval_fn(np.asarray(pareto[i]["assignment"])))
    return scores.get(i, compute)

  if phase2_full:
    for i in progress.bar(range(len(pareto)), desc="layer-wise phase 2 (Pareto points)", unit="point"):
      score(i)
  t2 = time.perf_counter()
  reference = (scores.get("float", problem.float_eval_fn) if problem.float_eval_fn is not None else score(0))
  target = reference - allowed_drop
  n = len(pareto)
  if score(0) < target:
    chosen, met = 0, False  # even the baseline misses the target (AIMET falls back to it too)
  else:
    with progress.bar(desc=f"layer-wise phase 3 ({search} search)", unit="eval") as bar:
      chosen = phases.search(search, lambda i: _tick(bar, score(i)), n, target)
    met = True
  t3 = time.perf_counter()
  for i, p in enumerate(pareto):
    p["score"] = scores.data.get(str(i))
  result = {
      "search": search, "allowed_drop": allowed_drop, "reference_score": reference, "target": target,
      "target_met": met, "chosen_index": chosen, "chosen": pareto[chosen],
      "chosen_candidates": {problem.groups[g]: problem.candidates[k]
                            for g, k in enumerate(pareto[chosen]["assignment"])},
      "num_points": n, "new_evaluations": evaluations["count"],
      "seconds": {"phase1": t1 - t0, "phase2": t2 - t1, "phase3": t3 - t2},
      "sensitivity": [dict(e, group_name=problem.groups[e["group"]],
                           candidate_name=problem.candidates[e["candidate"]]) for e in sens],
      "pareto": pareto,
  }
  records.write_json_atomic(os.path.join(stage_dir, f"result_{search}_drop{allowed_drop:g}.json"), result)
  log(f"mixed precision ({os.path.basename(stage_dir)}): {n} Pareto points, chose #{chosen} "
      f"(relative BOPs {pareto[chosen]['relative_cost']:.3f}, score {score(chosen):.2f}, target {target:.2f}), "
      f"{evaluations['count']} new evaluations")
  return result

