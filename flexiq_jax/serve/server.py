"""A real serving loop: one worker taking batches from a FIFO queue of requests on the real clock.

Requests arrive at a precomputed schedule (seconds after the start): at each step the worker
compares the schedule with time.perf_counter() to know which requests are queued, sleeps until
the next arrival when none is, asks the policy for the ratio, runs the batch (the caller's
`run_batch`, e.g. the integer path padded to a fixed batch shape) and records when it finished.
A request's wait is measured from its scheduled arrival to the end of its batch, so it includes
queueing, the policy's decision, sleep overshoot and the batch's full service time; the service
time fed to `observe` is measured around `run_batch` alone.

`count_compilations` counts XLA lowerings of any jitted function (jax.monitoring events) in a
block, e.g. to check that switching the ratio never recompiles.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import jax
import numpy as np

_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


class CompilationCounter:
  count: int = 0


@contextlib.contextmanager
def count_compilations():
  """`with count_compilations() as c: ...`; c.count = lowerings of jitted functions in the block
  (every compilation, persistent-cache hit or not, lowers first).

  Returns:
    A context manager whose value is a CompilationCounter; its `count` grows by one per lowering
    inside the block.
  """
  counter = CompilationCounter()

  def listener(name, *args, **kwargs):
    if name == _LOWERING_EVENT:
      counter.count += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def serve_realtime(run_batch: Callable[[float, np.ndarray], None], policy: Callable[[int, float], float],
                   arrivals, batch_size: int, observe: Callable[[float, float], None] | None = None,
                   clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep) -> dict:
  """Serves requests 0..n-1 arriving at the sorted times `arrivals` (s after the start) in FIFO
  batches of up to `batch_size`: ratio = policy(queued, wait of the oldest), then
  run_batch(ratio, request ids) (must return only once the results are on the host), then
  observe(ratio, measured service time) if given. Returns per-request 'arrival', 'done', 'wait'
  (done - arrival, s) and 'batch' (index of its batch); per-batch 'start', 'time' (end), 'ratio',
  'served', 'queued' (when decided), 'oldest_wait' (when decided), 'service' (measured s); and
  'elapsed' (s from the start to the last answer).

  Args:
    run_batch: Called as run_batch(ratio, request ids (m,) int); must block until the results are
      on the host.
    policy: Maps (queue length, wait of the oldest request in s) to the batch's ratio.
    arrivals: Sorted request arrival times in seconds after the start, >= 0, (n,).
    batch_size: Largest batch.
    observe: Optional callback (ratio, measured service time in s) after every batch.
    clock: Time source in seconds.
    sleep: Sleep function, called with seconds until the next arrival.

  Returns:
    A dict with the per-request and per-batch numpy arrays listed above and the float 'elapsed'.

  Raises:
    ValueError: If `arrivals` is not sorted or starts before 0.
  """
  arrivals = np.asarray(arrivals, np.float64)
  if np.any(np.diff(arrivals) < 0) or (arrivals.size and arrivals[0] < 0):
    raise ValueError("arrivals must be sorted times >= 0")
  n = len(arrivals)
  done = np.full(n, np.nan)
  batch_of = np.full(n, -1, np.int64)
  out = {k: [] for k in ("start", "time", "ratio", "served", "queued", "oldest_wait", "service")}
  head = 0
  t0 = clock()
  while head < n:
    now = clock() - t0
    if arrivals[head] > now:
      sleep(arrivals[head] - now)
      continue
    queued = int(np.searchsorted(arrivals, now, side="right")) - head
    ratio = float(policy(queued, now - arrivals[head]))
    ids = np.arange(head, head + min(batch_size, queued))
    start = clock()
    run_batch(ratio, ids)
    end = clock()
    if observe is not None:
      observe(ratio, end - start)
    done[ids] = end - t0
    batch_of[ids] = len(out["time"])
    head += len(ids)
    for k, v in (("start", start - t0), ("time", end - t0), ("ratio", ratio), ("served", len(ids)),
                 ("queued", queued), ("oldest_wait", now - arrivals[ids[0]]), ("service", end - start)):
      out[k].append(v)
  return {**{k: np.asarray(v) for k, v in out.items()}, "arrival": arrivals, "done": done,
          "wait": done - arrivals, "batch": batch_of, "elapsed": float(np.nanmax(done, initial=0.0))}
