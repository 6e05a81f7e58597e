"""The compare baselines follow `quant.act_grid` alike: a layer the calibration put on the
asymmetric grid has its input quantized by the layer-wise apply (min-max/MSE PTQ, layer-wise AMP,
AdaRound) and by LSQ on an asymmetric grid at the baseline's own width, with its zero point; with
the symmetric calibration every baseline computes exactly what it computed before."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flexiq_jax import calibrate, finetune, interception, numerics, quantize
from flexiq_jax.compare import adaround, baselines
from flexiq_jax.layerwise import apply as apply_lib
from smallnet import SiluNet


@pytest.fixture(scope="module")
def net():
  model = SiluNet(bounded_dw=True)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(32, 10, 10, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(1), images[:1])
  plan = quantize.build_plan(model, variables, (10, 10, 3))
  folded = quantize.fold_batchnorm(variables, plan)
  batches = [images[:16], images[16:]]
  calib = {grid: calibrate.calibrate(model, plan, folded, batches, act_grid=grid)
           for grid in ("symmetric", "asymmetric")}
  plans = {grid: plan.with_signedness(c) for grid, c in calib.items()}
  return types.SimpleNamespace(model=model, images=images, folded=folded, batches=batches, calib=calib, plans=plans)


def _tables(net, grid, method="minmax"):
  return apply_lib.build_tables(net.model, net.plans[grid], net.folded, net.calib[grid], act_method=method,
                                weight_method=method, bits=(4, 8), batches=net.batches)


@dataclasses.dataclass(frozen=True)
class _SymmetricLayerwise(apply_lib.LayerwiseBits):
  """The layer-wise provider with every input on the symmetric grid of plan.signed (the code path
  of a table without 'act_zero')."""

  def layer(self, call, x):
    i = self.index[call.path]
    wb, ab = self.weight_bits[i], self.act_bits[i]
    t = self.tables[call.path]
    x = jnp.where(ab > 0, numerics.fake_quant_traced_bits(x, t["act_clip"][ab], ab, self.signed[call.path]), x)
    wm = interception.kernel_matrix(call.info, call.kernel)
    wm = jnp.where(wb > 0, numerics.fake_quant_weight_traced_bits(wm, t["weight_clip"][wb], wb), wm)
    return call.float_forward(x, wm.reshape(call.kernel.shape))


def _symmetric_apply(model, plan):
  """`layerwise.apply.make_apply` with `_SymmetricLayerwise`."""
  index = {p: i for i, p in enumerate(plan.quantized)}

  def apply(variables, tables, weight_bits, act_bits, x):
    provider = _SymmetricLayerwise(tables, weight_bits, act_bits, index, plan.signed, plan.matmul_signed)
    return interception.run_with_provider(model, plan, variables, x, provider)

  return apply


class _Inputs:
  """Wraps a provider and keeps one layer's input and the input its float forward received."""

  def __init__(self, inner, path):
    self.inner, self.path, self.raw, self.quantized = inner, path, None, None

  def layer(self, call, x):
    if call.path != self.path:
      return self.inner.layer(call, x)
    self.raw = x

    def forward(xq, *kernel):
      self.quantized = xq
      return call.float_forward(xq, *kernel)

    return self.inner.layer(types.SimpleNamespace(path=call.path, info=call.info, kernel=call.kernel,
                                                  float_forward=forward), x)

  def matmul(self, call, a, b):
    return self.inner.matmul(call, a, b)


def _asymmetric_reference(x, lo, hi, b):
  """Standard asymmetric quantization (TFLite/PyTorch) of x over [lo, hi] at b bits, in float64."""
  qmax = 2 ** b - 1
  s = (hi - lo) / qmax
  z = np.round(-lo / s)
  return (np.clip(np.round(np.asarray(x, np.float64) / s) + z, 0, qmax) - z) * s, s, z


def test_the_symmetric_calibration_keeps_every_baseline_as_it_was(net):
  plan = net.plans["symmetric"]
  assert apply_lib.asymmetric_layers(plan) == () and apply_lib.act_grid_fingerprint(plan) == {}
  apply = jax.jit(apply_lib.make_apply(net.model, plan))
  symmetric = jax.jit(_symmetric_apply(net.model, plan))
  for method in ("minmax", "mse"):
    tables = _tables(net, "symmetric", method)
    assert not any("act_zero" in tables[p] for p in plan.quantized)
    for bits in ((8, 8), (4, 4), (4, 8)):
      assignment = baselines.uniform_bits(plan, bits, keep_ends=True)
      args = (net.folded, tables, *apply_lib.bits_arrays(plan, assignment), net.images)
      np.testing.assert_array_equal(apply(*args), symmetric(*args))
    bits = baselines.uniform_bits(plan, (4, 4), keep_ends=True)
    assert baselines.lsq_zero_points(plan, tables, bits) == {}
    forward = baselines.LsqForward(net.model, plan, bits, apply_lib.matmul_tables(plan, tables),
                                   baselines.lsq_zero_points(plan, tables, bits))
    before = baselines.LsqForward(net.model, plan, bits, apply_lib.matmul_tables(plan, tables))
    trainable = {"params": net.folded["params"], "scales": baselines.lsq_initial_scales(plan, tables, bits)}
    np.testing.assert_array_equal(forward(trainable, {}, net.images), before(trainable, {}, net.images))
  # The recalibration's extents give the |x| max of the calibrated ranges back, and the same tables.
  tables = _tables(net, "symmetric")
  zeros = jnp.zeros(len(plan.quantized), jnp.int32)
  extents = np.max([np.asarray(apply_lib.make_recalibrate(net.model, plan)(net.folded, tables, zeros, zeros, b))
                    for b in net.batches], axis=0)
  recalibrated = apply_lib.with_act_ranges(tables, plan, extents)
  for i, p in enumerate(plan.quantized):
    np.testing.assert_array_equal(recalibrated[p]["act_clip"],
                                  jnp.full(apply_lib.MAX_BITS + 1, max(extents[i].max(), 0.0), jnp.float32))
    np.testing.assert_allclose(recalibrated[p]["act_clip"], tables[p]["act_clip"], rtol=1e-6)


def test_an_asymmetric_layer_is_quantized_with_its_zero_point_at_8_and_4_bits(net):
  plan, calib = net.plans["asymmetric"], net.calib["asymmetric"]
  asym = apply_lib.asymmetric_layers(plan)
  assert "conv" in asym and "dw" in asym and "pw" not in asym
  assert apply_lib.act_grid_fingerprint(plan) == apply_lib.ASYMMETRIC_INPUTS
  tables = _tables(net, "asymmetric")
  assert set(p for p in plan.quantized if "act_zero" in tables[p]) == set(asym)
  index = {p: i for i, p in enumerate(plan.quantized)}
  for path in ("conv", "dw"):
    lo, hi = float(np.min(calib[path]["ch_min"])), float(np.max(calib[path]["ch_max"]))
    assert lo < 0 < hi
    for b in (8, 4):
      wb, ab = apply_lib.bits_arrays(plan, baselines.uniform_bits(plan, (b, b), keep_ends=False))
      spy = _Inputs(apply_lib.LayerwiseBits(tables, wb, ab, index, plan.signed, plan.matmul_signed), path)
      interception.run_with_provider(net.model, plan, net.folded, net.images, spy)
      want, s, z = _asymmetric_reference(spy.raw, lo, hi, b)
      assert float(tables[path]["act_zero"][b]) == z
      got = np.asarray(spy.quantized, np.float64)
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5 * s)
      if path == "dw" or b == 8:  # dw's positive side is short enough for a 4-bit zero point too
        assert 0 < z < 2 ** b - 1
        assert got.min() < -0.5 * s  # the negative values keep negative levels: nothing clipped to 0
  # conv's long positive tail leaves its 4-bit zero point at 0: -lo < half a 4-bit step.
  assert float(tables["conv"]["act_zero"][4]) == 0 and float(tables["conv"]["act_zero"][8]) > 0


def test_mse_ranges_keep_the_minimum_and_fit_the_maximum(net):
  plan, calib = net.plans["asymmetric"], net.calib["asymmetric"]
  minmax, mse = _tables(net, "asymmetric"), _tables(net, "asymmetric", "mse")
  for p in apply_lib.asymmetric_layers(plan):
    lo = float(np.min(calib[p]["ch_min"]))
    np.testing.assert_array_equal(mse[p]["act_clip"][8 + 1:], minmax[p]["act_clip"][8 + 1:])  # unfitted widths
    for b in (4, 8):
      width, z = float(mse[p]["act_clip"][b]), float(mse[p]["act_zero"][b])
      assert width <= float(minmax[p]["act_clip"][b]) + 1e-6
      s = width / (2 ** b - 1)
      assert abs(-z * s - lo) <= 0.5 * s + 1e-7  # the grid's low end is the calibrated minimum
  # A long positive tail is clipped, the negative end kept.
  counts = np.zeros(2048)
  counts[:1500] = 100.0
  counts[-1] = 1.0
  assert apply_lib.fit_high_end(counts, -0.3, 10.0, 4) < 10.0
  assert apply_lib.fit_high_end(np.ones(2048), -0.3, 10.0, 8) == pytest.approx(10.0)


def test_w8a8_ptq_keeps_the_negative_inputs(net):
  plan = net.plans["asymmetric"]
  tables = _tables(net, "asymmetric")
  reference = np.asarray(net.model.apply(net.folded, net.images), np.float64)
  apply = jax.jit(apply_lib.make_apply(net.model, plan))
  bits = apply_lib.bits_arrays(plan, baselines.uniform_bits(plan, (8, 8), keep_ends=True))
  forced = {p: (dict(t, act_zero=jnp.zeros_like(t["act_zero"])) if "act_zero" in t else t) for p, t in tables.items()}

  def errors(t):
    logits = np.asarray(apply(net.folded, t, *bits, net.images), np.float64)
    p, q = jax.nn.log_softmax(reference), jax.nn.log_softmax(logits)
    kl = float(np.mean(np.sum(np.exp(p) * (p - q), -1)))
    return float(np.max(np.abs(logits - reference))), kl

  (err, kl), (err_forced, kl_forced) = errors(tables), errors(forced)
  scale = float(np.max(np.abs(reference)))
  assert err < 0.05 * scale and kl < 1e-4
  assert err < 0.1 * err_forced and kl < 0.01 * kl_forced


def test_the_recalibration_follows_the_asymmetric_grid(net):
  plan = net.plans["asymmetric"]
  tables = _tables(net, "asymmetric")
  zeros = jnp.zeros(len(plan.quantized), jnp.int32)
  extents = np.max([np.asarray(apply_lib.make_recalibrate(net.model, plan)(net.folded, tables, zeros, zeros, b))
                    for b in net.batches], axis=0)
  recalibrated = apply_lib.with_act_ranges(tables, plan, extents)
  for p in apply_lib.asymmetric_layers(plan):  # every layer float: the calibrated ranges come back
    np.testing.assert_allclose(recalibrated[p]["act_clip"], tables[p]["act_clip"], rtol=1e-6)
    np.testing.assert_array_equal(recalibrated[p]["act_zero"], tables[p]["act_zero"])


def test_lsq_learns_the_step_with_the_zero_point_fixed(net):
  plan = net.plans["asymmetric"]
  tables = _tables(net, "asymmetric", "mse")
  bits = baselines.uniform_bits(plan, (4, 4), keep_ends=True)
  zero_points = baselines.lsq_zero_points(plan, tables, bits)
  assert set(zero_points) == set(apply_lib.asymmetric_layers(plan))
  assert all(float(z) == float(tables[p]["act_zero"][bits[p][1]]) for p, z in zero_points.items())  # head at 8 bits
  assert float(zero_points["dw"]) > 0
  forward = baselines.LsqForward(net.model, plan, bits, apply_lib.matmul_tables(plan, tables), zero_points)
  trainable = {"params": net.folded["params"], "scales": baselines.lsq_initial_scales(plan, tables, bits)}
  # LSQ starts on the PTQ grid: its first forward is the W4A4 post-training model's.
  ptq = jax.jit(apply_lib.make_apply(net.model, plan))(net.folded, tables, *apply_lib.bits_arrays(plan, bits),
                                                       net.images)
  np.testing.assert_allclose(forward(trainable, {}, net.images), ptq, rtol=1e-4, atol=1e-5)
  tx = optax.sgd(0.05)
  state = finetune.state_from_parts(trainable, {}, tx)
  batch = {"image": net.images, "label": jnp.arange(32, dtype=jnp.int32) % 5}
  new, metrics = jax.jit(lambda s, b: finetune.distill_step(s, b, logits_fn=forward, tx=tx))(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  for p in zero_points:
    before, after = float(trainable["scales"][p]["act"]), float(new.trainable["scales"][p]["act"])
    assert np.isfinite(after) and after != before  # the step moved
  assert jax.tree_util.tree_structure(new.trainable) == jax.tree_util.tree_structure(trainable)  # no offset learnt
  # The trained model still quantizes with the same zero point: the dw input's codes x / s + z
  # are integers in [0, 15] whose zero is z, with negative values on the negative codes.
  spy = _Inputs(baselines.LsqLayers(new.trainable["scales"], bits, plan.signed, {}, plan.matmul_signed, zero_points),
                "dw")
  interception.run_with_provider(net.model, plan, {"params": new.trainable["params"]}, net.images, spy)
  s, z = float(new.trainable["scales"]["dw"]["act"]), float(zero_points["dw"])
  codes = np.asarray(spy.quantized, np.float64) / s + z
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
  assert codes.min() >= -1e-3 and codes.max() <= 15 + 1e-3 and np.round(codes).min() < z


def test_adaround_reconstructs_from_the_asymmetric_inputs(net):
  plan = net.plans["asymmetric"]
  tables = _tables(net, "asymmetric", "mse")
  bits = baselines.uniform_bits(plan, (4, 4), keep_ends=True)
  settings = adaround.AdaRoundSettings(iterations=10, batch_size=8)
  _, report = adaround.adaround_weights(net.model, plan, net.folded, tables, bits, net.images, settings)
  assert "dw" in report and np.isfinite(report["dw"]["mse_adaround"])
  # Its inputs on the asymmetric grid reconstruct the float output far better than clipped at 0.
  forced = {p: (dict(t, act_zero=jnp.zeros_like(t["act_zero"])) if "act_zero" in t else t) for p, t in tables.items()}
  _, clipped = adaround.adaround_weights(net.model, plan, net.folded, forced, bits, net.images, settings)
  assert report["dw"]["mse_nearest"] < 0.5 * clipped["dw"]["mse_nearest"]


def test_only_the_baselines_rows_change_fingerprint_and_only_with_asymmetric_layers(net):
  """Rows the baselines cached when they clipped an asymmetric layer's negative inputs are not
  reused; a symmetric calibration keeps every method's fingerprint."""
  from configs import quickstart
  from flexiq_jax import stage_cache
  from flexiq_jax.compare import harness
  config = quickstart.get_config("smoke")
  fp = lambda plan: {m: stage_cache.fingerprint(harness.method_fields(config, m, plan)) for m in harness.METHODS}
  none, sym, asym = fp(None), fp(net.plans["symmetric"]), fp(net.plans["asymmetric"])
  assert sym == none
  assert {m for m in none if none[m] != asym[m]} == set(harness.MATMUL_BASELINES)
