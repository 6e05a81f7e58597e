"""A run-time ratio controller: per batch, the smallest 4-bit ratio whose modelled batch time lets
the requests waiting now be served within a latency target.

With `q` requests queued, batches of `B`, and the oldest request already waiting `w` seconds, the
queue drains after ceil(q / B) batches, so the controller needs a batch time
t(r) <= (target - w) / ceil(q / B) (conservative: every request is held to the oldest one's
deadline) and takes the smallest ratio that meets it (the most 8-bit channels, so the best
accuracy), or the largest ratio when none does. Every ratio is nested in the next, so moving along the grid only adds or removes lowered
channels. `simulate_load` runs it against a time-varying request rate.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


class RatioController:
  def __init__(self, latency_model: Callable[[float], float], target_s: float, batch_size: int,
               ratios=tuple(np.linspace(0.0, 1.0, 21))):
    if target_s <= 0 or batch_size <= 0:
      raise ValueError(f"need target_s > 0 and batch_size > 0, got {target_s}, {batch_size}")
    self.ratios = np.asarray(sorted(float(r) for r in ratios))
    if self.ratios.size == 0 or self.ratios[0] < 0 or self.ratios[-1] > 1:
      raise ValueError(f"ratios must be values in [0, 1], got {ratios}")
    self.batch_time = np.array([latency_model(r) for r in self.ratios])
    self.target_s, self.batch_size = float(target_s), int(batch_size)

  def choose(self, queued: int, waited: float = 0.0) -> float:
    """The ratio for the next batch with `queued` requests waiting (including that batch), the
    oldest for `waited` seconds."""
    batches = max(1, math.ceil(queued / self.batch_size))
    fits = np.nonzero(self.batch_time <= (self.target_s - waited) / batches)[0]
    return float(self.ratios[fits[0]] if fits.size else self.ratios[-1])


def poisson_arrivals(rate_fn: Callable[[float], float], horizon_s: float, max_rate: float, seed: int = 0):
  """Arrival times in [0, horizon_s) of a Poisson process with time-varying rate `rate_fn(t)`
  <= max_rate (requests/s), by thinning; fixed by the seed, so every policy sees the same load."""
  rng = np.random.default_rng(seed)
  n = rng.poisson(max_rate * horizon_s)
  t = np.sort(rng.uniform(0.0, horizon_s, size=n))
  keep = rng.uniform(0.0, max_rate, size=n) < np.array([rate_fn(x) for x in t])
  return t[keep]


def simulate_load(policy: Callable[[int, float], float], latency_model: Callable[[float], float],
                  arrivals, batch_size: int, serve: Callable[[float, np.ndarray], None] | None = None) -> dict:
  """One server taking batches of up to `batch_size` from a FIFO queue of requests arriving at
  the sorted times `arrivals`, until all are served. Per batch: ratio = policy(queue length, wait
  of the oldest), service time = latency_model(ratio) (the modelled time, see
  cost.BopsLatencyModel), then `serve(ratio, request indices)` if given (e.g. run the real model
  at that ratio). Returns per-batch arrays 'time' (end of the batch), 'ratio', 'queued' (left
  waiting), 'served', 'oldest_wait', and per-request 'wait' (arrival to end of its batch)."""
  arrivals = np.asarray(arrivals, np.float64)
  wait = np.zeros(len(arrivals))
  out = {k: [] for k in ("time", "ratio", "queued", "served", "oldest_wait")}
  t, head = 0.0, 0
  while head < len(arrivals):
    t = max(t, arrivals[head])  # idle until the next request
    queued = int(np.searchsorted(arrivals, t, side="right")) - head
    ratio = float(policy(queued, t - arrivals[head]))
    n = min(batch_size, queued)
    t += float(latency_model(ratio))
    ids = np.arange(head, head + n)
    if serve is not None:
      serve(ratio, ids)
    wait[ids] = t - arrivals[ids]
    head += n
    out["time"].append(t)
    out["ratio"].append(ratio)
    out["queued"].append(int(np.searchsorted(arrivals, t, side="right")) - head)
    out["served"].append(n)
    out["oldest_wait"].append(float(wait[ids[0]]))
  return {**{k: np.asarray(v) for k, v in out.items()}, "wait": wait}
