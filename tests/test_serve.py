"""Run-time ratio control: the BOPs latency model, the controller's choice, a simulated load."""

import numpy as np
import pytest

from flexiq_jax import cost
from flexiq_jax.serve import RatioController, poisson_arrivals, simulate_load

# Relative BOPs of a model whose lowerable layers are all its MACs: 1 at ratio 0, 1/4 at ratio 1.
REL_BOPS = lambda r: 1.0 - 0.75 * r


def test_bops_latency_model():
  model = cost.BopsLatencyModel(t_8bit=0.1, relative_bops=REL_BOPS, t_fixed=0.02)
  assert model(0.0) == pytest.approx(0.12) and model(1.0) == pytest.approx(0.02 + 0.025)
  assert model(0.5) == pytest.approx(0.02 + 0.1 * 0.625)
  with pytest.raises(ValueError, match="must not grow"):
    cost.BopsLatencyModel(0.1, lambda r: 1.0 + r)


def test_controller_lowers_more_as_the_queue_grows():
  latency = cost.BopsLatencyModel(t_8bit=0.1, relative_bops=REL_BOPS)
  ctl = RatioController(latency, target_s=0.2, batch_size=8)
  assert ctl.choose(0) == 0.0 and ctl.choose(8) == 0.0 and ctl.choose(16) == 0.0  # 2 batches x 0.1 s fit
  # 3 batches: each must take <= 0.0667 s -> 1 - 0.75 r <= 0.667 -> r >= 0.444 -> 0.45 on the grid.
  assert ctl.choose(24) == pytest.approx(0.45)
  choices = [ctl.choose(q) for q in range(0, 200, 4)]
  assert all(a <= b for a, b in zip(choices, choices[1:]))
  assert choices[-1] == 1.0  # nothing fits: the fastest ratio
  # 0.05 s left for one batch: 0.1 (1 - 0.75 r) <= 0.05 -> r >= 2/3 -> 0.70 on the grid.
  assert ctl.choose(8, waited=0.15) == pytest.approx(0.70)
  with pytest.raises(ValueError):
    RatioController(latency, target_s=0.0, batch_size=8)


def test_poisson_arrivals_follow_the_rate():
  rate = lambda t: 100.0 if t < 5 else 300.0
  t = poisson_arrivals(rate, 10.0, max_rate=300.0, seed=0)
  assert np.all(np.diff(t) >= 0) and t.min() >= 0 and t.max() < 10
  assert abs((t < 5).sum() - 500) < 100 and abs((t >= 5).sum() - 1500) < 150
  np.testing.assert_array_equal(t, poisson_arrivals(rate, 10.0, max_rate=300.0, seed=0))


def test_controller_follows_a_fluctuating_load():
  """Under a load that at its peak exceeds what the 8-bit model serves, the controller keeps the
  wait near the target where the fixed 8-bit server's queue runs away, and stays 8-bit off-peak."""
  latency = cost.BopsLatencyModel(t_8bit=0.1, relative_bops=REL_BOPS)
  batch = 16  # 8-bit capacity 160 req/s, all-4-bit 640 req/s
  rate = lambda t: 200.0 + 180.0 * np.sin(2 * np.pi * t / 20.0)  # 20 .. 380 req/s
  arrivals = poisson_arrivals(rate, 60.0, max_rate=380.0, seed=1)
  ctl = RatioController(latency, target_s=0.5, batch_size=batch)
  run = lambda policy: simulate_load(policy, latency, arrivals, batch)
  adaptive, fixed8, fixed4 = run(ctl.choose), run(lambda q, w: 0.0), run(lambda q, w: 1.0)
  for r in (adaptive, fixed8, fixed4):
    assert r["served"].sum() == len(arrivals) and np.all(r["wait"] > 0)
  assert fixed8["wait"].max() > 5 * adaptive["wait"].max()
  assert adaptive["wait"].max() < 2.0
  assert np.percentile(adaptive["wait"], 90) <= 0.5
  assert adaptive["ratio"].min() == 0.0 and adaptive["ratio"].max() > 0.3
  assert adaptive["ratio"].mean() < 0.5 and fixed4["ratio"].mean() == 1.0
  served = []
  simulate_load(ctl.choose, latency, arrivals[:100], batch, serve=lambda r, ids: served.append(ids))
  np.testing.assert_array_equal(np.concatenate(served), np.arange(100))  # FIFO, each request once
