"""A run-time ratio controller on measured batch times: per batch, the smallest 4-bit ratio whose
predicted batch time lets the requests waiting now be served within a latency target, with the
prediction fitted online from the batch times the server observes.

Latency model (`OnlineLatencyModel`): a batch at ratio r takes

    t(r) = fixed + per_bop * relative_bops(r)

where relative_bops(r) is the cost model's BOPs at r relative to ratio 0 (e.g.
quantize.relative_bops_at; 1 at ratio 0) and `fixed` (time that lowering does not change: data
movement, unquantized ops, dispatch) and `per_bop` (time of the quantized layers at ratio 0) are
both estimated, never assumed. Each observed (ratio, seconds) goes into the bucket of the nearest
ratio on the controller's grid; every bucket keeps an exponentially weighted mean of its times,
all buckets' weights decaying by (1 - 1/window) per observation, so a weighted least-squares line
through the bucket means is exactly the exponentially weighted least-squares fit over all
observations (x is constant within a bucket). The per-BOP part used is a lower confidence bound,
max(0, slope - z * standard error) (the error from the weighted residuals, within and between
buckets; z = 0: the point estimate), and the line goes through the weighted mean observation, so
the controller only counts on a speed-up that the measurements show beyond their noise (the price:
ratios below the mean observed one are predicted up to z * se * (1 - mean relative BOPs) too
fast); fixed >= 0 as well. On hardware where lowering gives no speed-up (the lowered channels run in the int8
kernels: CPUs, Hopper GPUs) the per-BOP part is then 0 despite noisy timings, every ratio is
predicted to take as long as ratio 0, and the controller stays at ratio 0 (it cannot help there:
see experiments/load_following.py). Until the probe ratios (default 0, 0.5, 1) each have
`probe_batches` observations the controller serves at them (probing on live traffic), unless a
`prior` latency function seeds them with pseudo-observations (which fade like real ones), or
the caller observes warm-up batches first.

Decision rule (`RatioController.choose`): with `q` requests queued, batches of `B`, and the oldest
request already waiting `w` seconds, the queue drains after ceil(q / B) batches, so the controller
needs t(r) <= (target - w) / ceil(q / B) (conservative: every request is held to the oldest one's
deadline; requests arriving meanwhile are not foreseen) and takes the smallest ratio that meets it
(the most 8-bit channels, so the best accuracy), or the ratio with the smallest predicted time
(the smallest such ratio on ties) when none does. Every ratio is nested in the next, so moving
along the grid only adds or removes lowered channels.

`simulate_load` runs a policy against arrivals in virtual time with a given service-time function
(a simulation: its waits are modelled); serve.serve_realtime runs the real model on the real clock.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


class OnlineLatencyModel:
  """t(r) = fixed + per_bop * relative_bops(r), fitted by exponentially weighted least squares over
  the observed batch times, bucketed on the ratio grid `ratios` (module docstring)."""

  def __init__(self, relative_bops: Callable[[float], float], ratios, window: float = 64.0, z: float = 2.0):
    if window < 1 or z < 0:
      raise ValueError(f"need window >= 1 observation and z >= 0, got {window}, {z}")
    self.ratios = np.asarray(sorted(float(r) for r in ratios))
    if self.ratios.size == 0 or self.ratios[0] < 0 or self.ratios[-1] > 1:
      raise ValueError(f"ratios must be values in [0, 1], got {ratios}")
    self.x = np.array([float(relative_bops(float(r))) for r in self.ratios])  # tabulated once
    if np.any(np.diff(self.x) > 1e-9):
      raise ValueError("relative BOPs must not grow with the ratio")
    self.decay, self.z = 1.0 - 1.0 / float(window), float(z)
    self.mean = np.zeros(self.ratios.size)  # per bucket: exponentially weighted mean time (s)
    self.square = np.zeros(self.ratios.size)  # per bucket: exponentially weighted mean of time^2
    self.weight = np.zeros(self.ratios.size)  # per bucket: sum of the decayed observation weights
    self.weight2 = np.zeros(self.ratios.size)  # per bucket: sum of their squares (for the error)
    self.count = np.zeros(self.ratios.size, np.int64)  # per bucket: observations (undecayed)
    self._fit = None
    # Of the last fit: the point estimates (fixed, per_bop) before the bound, and per_bop's error.
    self.fixed_point, self.slope_point, self.slope_se = 0.0, 0.0, float("inf")

  def bucket(self, ratio: float) -> int:
    return int(np.argmin(np.abs(self.ratios - float(ratio))))

  def observe(self, ratio: float, seconds: float, weight: float = 1.0) -> None:
    """One batch at `ratio` took `seconds` (weight < 1: a pseudo-observation, e.g. a prior)."""
    if not seconds >= 0 or not np.isfinite(seconds):
      raise ValueError(f"a batch time must be finite and >= 0, got {seconds}")
    b = self.bucket(ratio)
    self.weight *= self.decay
    self.weight2 *= self.decay ** 2
    # Observed buckets keep a (tiny) weight: a line through stale buckets still has their slope.
    self.weight[self.count > 0] = np.maximum(self.weight[self.count > 0], 1e-9)
    self.weight[b] += weight
    self.weight2[b] += weight ** 2
    self.mean[b] += weight / self.weight[b] * (float(seconds) - self.mean[b])
    self.square[b] += weight / self.weight[b] * (float(seconds) ** 2 - self.square[b])
    self.count[b] += 1
    self._fit = None

  @property
  def observations(self) -> int:
    return int(self.count.sum())

  def fit(self) -> tuple[float, float]:
    """(fixed, per_bop) in seconds: the weighted least-squares line through the bucket means with
    its slope lowered to max(0, slope - z * standard error), through the weighted mean point;
    fixed >= 0. One observed bucket: per_bop 0 (no slope is identifiable); none: (0, 0)."""
    if self._fit is None:
      seen = self.count > 0
      w, q, x, t = self.weight[seen], self.weight2[seen], self.x[seen], self.mean[seen]
      if w.size == 0:
        self._fit, self.fixed_point, self.slope_point, self.slope_se = (0.0, 0.0), 0.0, 0.0, float("inf")
        return self._fit
      sw = w.sum()
      xm, tm = (w * x).sum() / sw, (w * t).sum() / sw
      sxx = (w * (x - xm) ** 2).sum()
      if sxx > 1e-12 * sw:
        slope = (w * (x - xm) * (t - tm)).sum() / sxx
        # Weighted residual variance of the observations (within buckets + the means' misfit),
        # corrected for the 2 fitted parameters with the effective number of observations.
        within = np.maximum(self.square[seen] - t ** 2, 0.0)
        rss = (w * (within + (t - tm - slope * (x - xm)) ** 2)).sum() / sw
        n_eff = sw ** 2 / q.sum()
        var = rss * n_eff / (n_eff - 2) if n_eff > 2 else float("inf")
        se = float(np.sqrt(var * (q * (x - xm) ** 2).sum()) / sxx) if np.isfinite(var) else float("inf")
      else:
        slope, se = 0.0, float("inf")
      self.fixed_point, self.slope_point, self.slope_se = float(tm - slope * xm), float(slope), se
      per_bop = max(slope - self.z * se if self.z > 0 else slope, 0.0)  # more BOPs are never faster
      fixed = tm - per_bop * xm
      if fixed < 0:  # through the origin
        fixed, per_bop = 0.0, max((w * x * t).sum() / (w * x * x).sum(), 0.0)
      self._fit = (float(fixed), float(per_bop))
    return self._fit

  @property
  def fixed_s(self) -> float:
    return self.fit()[0]

  @property
  def per_bop_s(self) -> float:
    return self.fit()[1]

  def predict_grid(self) -> np.ndarray:
    """Predicted batch time (s) at every grid ratio."""
    fixed, per_bop = self.fit()
    return fixed + per_bop * self.x

  def __call__(self, ratio: float) -> float:
    fixed, per_bop = self.fit()
    return fixed + per_bop * float(np.interp(ratio, self.ratios, self.x))


class RatioController:
  """The ratio per batch from the queue (module docstring). Feed it every served batch's measured
  time with `observe(ratio, seconds)`; `choose(queued, waited)` decides the next batch's ratio.

  relative_bops: ratio -> BOPs relative to ratio 0 (tabulated once on `ratios`).
  window, z: the latency fit's forgetting (observations) and confidence bound (OnlineLatencyModel).
  prior: optional ratio -> seconds, entered as `prior_weight` pseudo-observations at each probe
    ratio (they fade like real observations); without it the first batches probe.
  """

  def __init__(self, *, relative_bops: Callable[[float], float], target_s: float, batch_size: int,
               ratios=tuple(np.linspace(0.0, 1.0, 21)), window: float = 64.0, z: float = 2.0,
               probe=(0.0, 0.5, 1.0), probe_batches: int = 2,
               prior: Callable[[float], float] | None = None, prior_weight: float = 1.0):
    if target_s <= 0 or batch_size <= 0:
      raise ValueError(f"need target_s > 0 and batch_size > 0, got {target_s}, {batch_size}")
    self.model = OnlineLatencyModel(relative_bops, ratios, window, z)
    self.ratios = self.model.ratios
    self.target_s, self.batch_size = float(target_s), int(batch_size)
    self.probe_buckets = sorted({self.model.bucket(r) for r in probe})
    self.probe_batches = int(probe_batches)
    self.probed = np.zeros(self.ratios.size, np.int64)  # real and prior observations per bucket
    if prior is not None:
      for b in self.probe_buckets:
        self.model.observe(self.ratios[b], float(prior(float(self.ratios[b]))), weight=prior_weight)
        self.probed[b] = self.probe_batches

  def observe(self, ratio: float, seconds: float) -> None:
    """A served batch at `ratio` took `seconds` (measured)."""
    self.model.observe(ratio, seconds)
    self.probed[self.model.bucket(ratio)] += 1

  def probing(self) -> float | None:
    """The probe ratio still short of observations, if any."""
    for b in self.probe_buckets:
      if self.probed[b] < self.probe_batches:
        return float(self.ratios[b])
    return None

  def choose(self, queued: int, waited: float = 0.0) -> float:
    """The ratio for the next batch with `queued` requests waiting (including that batch), the
    oldest for `waited` seconds."""
    probe = self.probing()
    if probe is not None:
      return probe
    batches = max(1, math.ceil(queued / self.batch_size))
    predicted = self.model.predict_grid()
    fits = np.nonzero(predicted <= (self.target_s - waited) / batches)[0]
    return float(self.ratios[fits[0]] if fits.size else self.ratios[int(np.argmin(predicted))])


def simulate_load(policy: Callable[[int, float], float], latency_model: Callable[[float], float],
                  arrivals, batch_size: int, serve: Callable[[float, np.ndarray], None] | None = None,
                  observe: Callable[[float, float], None] | None = None) -> dict:
  """A SIMULATION in virtual time: one server taking batches of up to `batch_size` from a FIFO
  queue of requests arriving at the sorted times `arrivals`, until all are served. Per batch:
  ratio = policy(queue length, wait of the oldest), service time = latency_model(ratio) (the
  modelled time; it may be random), then `serve(ratio, request indices)` if given (e.g. run the
  real model at that ratio for its accuracy) and `observe(ratio, service time)` if given (e.g.
  RatioController.observe). Returns per-batch arrays 'time' (end of the batch), 'ratio', 'queued'
  (left waiting), 'served', 'oldest_wait', 'service', and per-request 'wait' (arrival to end of
  its batch).

  Args:
    policy: Maps (queue length, wait of the oldest request in s) to the batch's ratio.
    latency_model: Maps a ratio to the batch's service time in seconds (may be random).
    arrivals: Sorted request arrival times in seconds, (n,).
    batch_size: Largest batch.
    serve: Optional callback (ratio, request indices) run for every batch.
    observe: Optional callback (ratio, service time) run for every batch.

  Returns:
    A dict of numpy arrays: per batch 'time', 'ratio', 'queued', 'served', 'oldest_wait',
    'service'; per request 'wait' (n,).
  """
  arrivals = np.asarray(arrivals, np.float64)
  wait = np.zeros(len(arrivals))
  out = {k: [] for k in ("time", "ratio", "queued", "served", "oldest_wait", "service")}
  t, head = 0.0, 0
  while head < len(arrivals):
    t = max(t, arrivals[head])  # idle until the next request
    queued = int(np.searchsorted(arrivals, t, side="right")) - head
    ratio = float(policy(queued, t - arrivals[head]))
    n = min(batch_size, queued)
    service = float(latency_model(ratio))
    t += service
    ids = np.arange(head, head + n)
    if serve is not None:
      serve(ratio, ids)
    if observe is not None:
      observe(ratio, service)
    wait[ids] = t - arrivals[ids]
    head += n
    out["time"].append(t)
    out["ratio"].append(ratio)
    out["queued"].append(int(np.searchsorted(arrivals, t, side="right")) - head)
    out["served"].append(n)
    out["oldest_wait"].append(float(wait[ids[0]]))
    out["service"].append(service)
  return {**{k: np.asarray(v) for k, v in out.items()}, "wait": wait}
