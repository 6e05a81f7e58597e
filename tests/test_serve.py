"""Run-time ratio control: the BOPs latency model, the controller's choice, a simulated load."""

import jax
import numpy as np
import pytest

from flexiq_jax import cost
from flexiq_jax import serve
from flexiq_jax.serve import (OnlineLatencyModel, RatioController, diurnal_arrivals, onoff_arrivals,
                              poisson_arrivals, serve_realtime, simulate_load)

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
  ctl = RatioController(relative_bops=REL_BOPS, target_s=0.2, batch_size=8)
  assert [ctl.choose(1000) for _ in range(2)] == [0.0, 0.0]  # unobserved: it probes 0, 0.5, 1 first
  for r in (0.0, 0.0, 0.5, 0.5, 1.0, 1.0):
    assert ctl.choose(0) == r  # still probing, whatever the queue
    ctl.observe(r, latency(r))
  assert ctl.probing() is None
  assert ctl.model.fit() == pytest.approx((0.0, 0.1), abs=1e-9)  # fitted from the probes
  assert ctl.choose(0) == 0.0 and ctl.choose(8) == 0.0 and ctl.choose(16) == 0.0  # 2 batches x 0.1 s fit
  # 3 batches: each must take <= 0.0667 s -> 1 - 0.75 r <= 0.667 -> r >= 0.444 -> 0.45 on the grid.
  assert ctl.choose(24) == pytest.approx(0.45)
  choices = [ctl.choose(q) for q in range(0, 200, 4)]
  assert all(a <= b for a, b in zip(choices, choices[1:]))
  assert choices[-1] == 1.0  # nothing fits: the fastest ratio
  # 0.05 s left for one batch: 0.1 (1 - 0.75 r) <= 0.05 -> r >= 2/3 -> 0.70 on the grid.
  assert ctl.choose(8, waited=0.15) == pytest.approx(0.70)
  # A queue that grows then drains: the ratio rises with it and returns to 0.
  rise_fall = [ctl.choose(q) for q in (4, 16, 24, 32, 200, 32, 24, 16, 4)]  # 32: 4 batches of <= 0.05 s
  assert rise_fall == pytest.approx([0.0, 0.0, 0.45, 0.70, 1.0, 0.70, 0.45, 0.0, 0.0])
  with pytest.raises(ValueError):
    RatioController(relative_bops=REL_BOPS, target_s=0.0, batch_size=8)
  with pytest.raises(TypeError):  # a latency model is no longer taken as given
    RatioController(latency, target_s=0.2, batch_size=8)  # pylint: disable=too-many-function-args


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
  ctl = RatioController(relative_bops=REL_BOPS, target_s=0.5, batch_size=batch, prior=latency)
  run = lambda policy: simulate_load(policy, latency, arrivals, batch)
  adaptive, fixed8, fixed4 = run(ctl.choose), run(lambda q, w: 0.0), run(lambda q, w: 1.0)
  # A wait runs from arrival to the end of the request's batch: at least one batch time, and
  # exactly one for a request that finds the fixed server idle.
  assert fixed8["wait"].min() == pytest.approx(0.1) and fixed4["wait"].min() == pytest.approx(0.025)
  assert adaptive["wait"].min() >= 0.025 - 1e-12
  assert fixed8["wait"].max() > 5 * adaptive["wait"].max()
  assert adaptive["wait"].max() <= ctl.target_s
  assert np.percentile(adaptive["wait"], 90) <= 0.5
  assert adaptive["ratio"].min() == 0.0 and adaptive["ratio"].max() > 0.3
  assert adaptive["ratio"].mean() < 0.5
  # Near the load's peak (t mod 20 in (3, 7): > 340 req/s, over twice the 8-bit capacity) every
  # batch is lowered; in its trough (t mod 20 in (13, 17): < 60 req/s) every batch is 8-bit.
  phase = adaptive["time"] % 20.0
  assert adaptive["ratio"][(phase > 3) & (phase < 7)].min() > 0.3
  assert adaptive["ratio"][(phase > 13) & (phase < 17)].max() == 0.0
  served = []
  simulate_load(ctl.choose, latency, arrivals[:100], batch, serve=lambda r, ids: served.append(ids))
  np.testing.assert_array_equal(np.concatenate(served), np.arange(100))  # FIFO, each request once


# -- the online latency model --------------------------------------------------------------------

def test_online_fit_recovers_fixed_and_per_bop_from_noisy_times():
  true = cost.BopsLatencyModel(t_8bit=0.07, relative_bops=REL_BOPS, t_fixed=0.03)
  rng = np.random.default_rng(0)
  model = OnlineLatencyModel(REL_BOPS, np.linspace(0, 1, 21), window=200, z=0.0)  # the point estimate
  bounded = OnlineLatencyModel(REL_BOPS, np.linspace(0, 1, 21), window=200)  # z = 2
  for r in rng.choice(np.linspace(0, 1, 21), size=400):
    t = true(r) * rng.lognormal(0.0, 0.05)
    model.observe(r, t)
    bounded.observe(r, t)
  fixed, per_bop = model.fit()
  assert fixed == pytest.approx(0.03, abs=0.003) and per_bop == pytest.approx(0.07, abs=0.004)
  assert model(1.0) == pytest.approx(true(1.0), rel=0.03)
  # The standard error matches the noise: 5% of ~0.06 s over 200 effective observations spread
  # over x in [0.25, 1] gives ~0.001 s; the bound z = 2 lowers the per-BOP part by twice that.
  assert 0.0005 < model.slope_se < 0.002
  assert bounded.fit()[1] == pytest.approx(per_bop - 2 * model.slope_se)
  # The fixed part grows (another tenant): the exponentially weighted fit follows within a few
  # windows, through the ratios it keeps observing, and keeps the per-BOP part.
  model = OnlineLatencyModel(REL_BOPS, np.linspace(0, 1, 21), window=20)
  for r in rng.choice(np.linspace(0, 1, 21), size=200):
    model.observe(r, true(r) * rng.lognormal(0.0, 0.05))
  for r in rng.choice(np.linspace(0, 1, 21), size=100):
    model.observe(r, 0.05 + true(r) * rng.lognormal(0.0, 0.05))
  assert model.fit() == pytest.approx((0.08, 0.07), abs=0.01)
  with pytest.raises(ValueError):
    model.observe(0.5, float("nan"))


def test_no_speed_up_measured_means_no_lowering():
  """Hardware where the lowered channels run in the int8 kernels (time flat in the ratio, even
  slightly slower at ratio 1): the fitted per-BOP part is 0 and the controller stays 8-bit however
  long the queue, since lowering would cost accuracy for no time."""
  rng = np.random.default_rng(1)
  ctl = RatioController(relative_bops=REL_BOPS, target_s=0.2, batch_size=8)
  for _ in range(30):
    r = ctl.choose(1000)
    ctl.observe(r, (0.1 + 0.004 * r) * rng.lognormal(0.0, 0.02))
  assert ctl.probing() is None and ctl.model.per_bop_s == 0.0
  assert ctl.model.fixed_s == pytest.approx(0.1, rel=0.05)
  assert [ctl.choose(q) for q in (1, 16, 100, 10_000)] == [0.0] * 4


def test_controller_learns_a_latency_model_it_was_not_given():
  """The simulated server's batch time (fixed part + per-BOP part + noise) is not the controller's:
  it starts with no model, probes on live traffic and fits one from the times it observes. Every
  request is answered within the target (the 8-bit server's queue runs to seconds)."""
  true = cost.BopsLatencyModel(t_8bit=0.07, relative_bops=REL_BOPS, t_fixed=0.03)
  rng = np.random.default_rng(0)
  noisy = lambda r: true(r) * rng.lognormal(0.0, 0.03)
  batch, target = 16, 0.5  # capacity 160 req/s at ratio 0, 337 req/s at ratio 1
  arrivals, _ = diurnal_arrivals(160.0, 140.0, period_s=20.0, horizon_s=40.0, seed=0)  # 20 .. 300 req/s
  ctl = RatioController(relative_bops=REL_BOPS, target_s=target, batch_size=batch)
  adaptive = simulate_load(ctl.choose, noisy, arrivals, batch, observe=ctl.observe)
  fixed8 = simulate_load(lambda q, w: 0.0, noisy, arrivals, batch)
  assert adaptive["served"].sum() == len(arrivals) > 5000
  assert adaptive["wait"].max() <= target
  assert np.mean(fixed8["wait"] > target) > 0.3 and fixed8["wait"].max() > 5.0
  assert ctl.model.slope_point == pytest.approx(0.07, rel=0.05)  # the estimate
  assert ctl.model.fit() == pytest.approx((0.03, 0.07), rel=0.1)  # with the lower bound on per-BOP
  assert list(adaptive["ratio"][:6]) == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]  # the probes
  assert np.mean(adaptive["ratio"] == 0.0) > 0.3 and adaptive["ratio"].max() >= 0.5


def test_arrival_traces_are_seeded_bounded_and_follow_their_rates():
  t, rate = onoff_arrivals(400.0, 50.0, mean_on_s=1.0, mean_off_s=2.0, horizon_s=300.0, seed=3)
  assert np.all(np.diff(t) >= 0) and t.min() >= 0 and t.max() < 300
  assert set(np.unique([rate(x) for x in t])) == {50.0, 400.0}
  on = np.array([rate(x) == 400.0 for x in np.linspace(0, 300, 30001)[:-1]])
  assert on.mean() == pytest.approx(1 / 3, abs=0.07)  # time share of the on state
  assert len(t) == pytest.approx(300 * (400 * on.mean() + 50 * (1 - on.mean())), rel=0.05)
  np.testing.assert_array_equal(t, onoff_arrivals(400.0, 50.0, 1.0, 2.0, 300.0, seed=3)[0])
  assert len(onoff_arrivals(400.0, 50.0, 1.0, 2.0, 300.0, seed=3, max_requests=100)[0]) == 100
  t, rate = diurnal_arrivals(100.0, 80.0, period_s=10.0, horizon_s=20.0, seed=0)
  assert rate(0.0) == pytest.approx(20.0) and rate(5.0) == pytest.approx(180.0)
  assert abs(((t % 10) < 2.5).sum() - 2 * (100 * 2.5 - 80 * 10 / (2 * np.pi))) < 60  # the trough
  assert abs(len(t) - 2000) < 150


# -- the real serving loop -------------------------------------------------------------------------

def test_realtime_loop_matches_the_simulation_on_a_fake_clock():
  """With a clock that advances only by the service time, the real loop is the simulation."""
  latency = cost.BopsLatencyModel(t_8bit=0.1, relative_bops=REL_BOPS, t_fixed=0.01)
  arrivals = poisson_arrivals(lambda t: 150.0 + 100 * np.sin(t), 8.0, max_rate=250.0, seed=2)
  ctl = RatioController(relative_bops=REL_BOPS, target_s=0.3, batch_size=16, prior=latency)
  now = [0.0]

  def run_batch(ratio, ids):
    now[0] += latency(ratio)

  def sleep(s):
    now[0] += s

  real = serve_realtime(run_batch, ctl.choose, arrivals, 16, clock=lambda: now[0], sleep=sleep)
  sim = simulate_load(ctl.choose, latency, arrivals, 16)
  for k in ("time", "ratio", "served", "service"):
    np.testing.assert_allclose(real[k], sim[k], atol=1e-9)
  np.testing.assert_allclose(real["wait"], sim["wait"], atol=1e-9)
  assert real["ratio"].max() > 0.3  # the load made it lower


@pytest.fixture(scope="module")
def tiny_server():
  import smallnet  # pylint: disable=g-import-not-at-top
  from flexiq_jax import quantize  # pylint: disable=g-import-not-at-top
  setup = smallnet.make_setup()
  qmodel = quantize.QuantizedModel(setup.model, setup.plan)
  return setup, qmodel, quantize.make_predict(qmodel, setup.qvars)


def test_realtime_loop_serves_each_request_once_without_recompiling(tiny_server):
  setup, qmodel, predict = tiny_server
  from flexiq_jax import quantize  # pylint: disable=g-import-not-at-top
  batch, images = 8, np.asarray(setup.images)
  rel = lambda r: quantize.relative_bops_at(qmodel, setup.qvars, r)
  buf = np.zeros((batch,) + images.shape[1:], np.float32)
  logits, ratio_of, calls = {}, {}, []

  def run_batch(ratio, ids):  # the integer path on a batch padded to a fixed shape
    buf[:len(ids)] = images[ids % len(images)]
    buf[len(ids):] = 0.0
    out = np.asarray(predict(buf, ratio))
    calls.append(ids.copy())
    for i, row in zip(ids, out):
      logits[int(i)], ratio_of[int(i)] = row, ratio

  np.asarray(predict(buf, 0.0))  # the one compilation, before serving
  rng = np.random.default_rng(0)
  arrivals = np.sort(rng.uniform(0.0, 0.3, size=120))  # bursty enough to queue a few batches
  ctl = RatioController(relative_bops=rel, target_s=0.02, batch_size=batch)
  with serve.count_compilations() as compiled:
    out = serve_realtime(run_batch, ctl.choose, arrivals, batch, observe=ctl.observe)
  assert compiled.count == 0 and len(set(out["ratio"])) >= 3  # the probes at least: 0, 0.5, 1
  np.testing.assert_array_equal(np.concatenate(calls), np.arange(len(arrivals)))  # FIFO, each once
  assert out["served"].sum() == len(arrivals) and np.all(out["served"] <= batch)
  assert sorted(logits) == list(range(len(arrivals)))
  # Each request waits at least its own batch's measured service time and is done after arriving.
  assert np.all(out["wait"] >= out["service"][out["batch"]])
  assert np.all(out["done"] >= out["arrival"]) and np.all(np.diff(out["time"]) > 0)
  assert ctl.model.observations == len(out["ratio"])
  for i in (0, len(arrivals) - 1):  # padding changed nothing: the rows are what an unpadded batch gives
    alone = np.asarray(predict(images[i % len(images)][None], ratio_of[i]))[0]
    np.testing.assert_allclose(logits[i], alone, rtol=1e-5, atol=1e-5)
  with serve.count_compilations() as compiled:
    jax.jit(lambda x: x * 3.0)(np.ones(5, np.float32))
  assert compiled.count == 1  # the counter does see a compilation
