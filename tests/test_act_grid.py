"""The asymmetric activation grid (`quant.act_grid='asymmetric'`): unsigned codes with a zero point
that survives the extraction, chosen per layer where its calibrated error is smaller; the fake,
reference-integer and serving paths agree on it, and the export states it."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexiq_jax import calibrate, layer_ops, numerics, quantize
from flexiq_jax.calibrate import statistics
from flexiq_jax.interception import LayerCall, LayerInfo
from flexiq_jax.numerics import lsq_extraction
from flexiq_jax.quantize import export, integer
from smallnet import SiluNet

RATIOS = (0.0, 0.37, 1.0)


@pytest.fixture(scope="module")
def net():
  model = SiluNet()
  images = jnp.asarray(np.random.default_rng(0).normal(size=(32, 10, 10, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(1), images[:1])
  plan = quantize.build_plan(model, variables, (10, 10, 3))
  folded = quantize.fold_batchnorm(variables, plan)
  batches = [images[:16], images[16:]]
  sym = calibrate.calibrate(model, plan, folded, batches)
  asym = calibrate.calibrate(model, plan, folded, batches, act_grid="asymmetric")
  return model, variables, plan, folded, images, sym, asym


def _qvars(plan, folded, calib):
  plan = plan.with_signedness(calib)
  orders = {p: np.argsort(np.maximum(-calib[p]["ch_min"], calib[p]["ch_max"]), kind="stable") for p in plan.lowerable}
  counts = {p: np.array([plan.layers[p].in_channels // 2, plan.layers[p].in_channels]) for p in plan.lowerable}
  return plan, quantize.build_qvars(plan, folded, calib, orders, counts, [0.5, 1.0])


@pytest.mark.parametrize("z", range(0, 256, 16))
def test_zero_point_candidates_keep_the_zero_exactly(z):
  allowed = numerics.zero_point_candidates(z)
  for e in range(5):
    kept = float(numerics.lower_codes(jnp.float32(z), e, signed=False)) == z
    assert kept == (e in allowed), (z, e)
  assert allowed  # every multiple of 16 up to 240 keeps at least e = 4


@pytest.mark.parametrize("lo,hi", [(-0.28, 5.0), (-1.0, 1.0), (-0.01, 30.0), (-3.0, 0.5)])
def test_asymmetric_grid_covers_the_range_with_a_zero_point_on_the_16_grid(lo, hi):
  grid = statistics.asymmetric_grid(lo, hi)
  if grid is None:
    assert 255 * (-lo) / (hi - lo) > 255 - 16 - 16  # only a range almost all negative is refused
    return
  scale, z = grid
  assert z % 16 == 0 and 16 <= z <= 239
  assert z >= 255 * (-lo) / (hi - lo) - 1e-6  # at or above the exact zero point
  assert -z * scale <= lo + 1e-7 and (255 - z) * scale >= hi - 1e-7  # both ends on the grid
  assert scale == pytest.approx(max(hi / (255 - z), -lo / z))


def test_asymmetric_grid_needs_a_range_around_zero():
  assert statistics.asymmetric_grid(0.0, 1.0) is None and statistics.asymmetric_grid(-1.0, 0.0) is None


def test_calibration_takes_the_grid_with_the_smaller_error(net):
  model, _, plan, _, _, sym, asym = net
  chosen = [p for p in plan.quantized if float(asym[p]["act_zero_point"]) > 0]
  assert "conv" in chosen and "dw" in chosen  # after SiLU: the short negative side
  assert "pw" not in chosen  # after ReLU: unsigned already, no candidate
  for p in plan.quantized:
    if "grid_error_asymmetric" in asym[p]:
      takes = float(asym[p]["grid_error_asymmetric"]) < float(asym[p]["grid_error_symmetric"])
      assert takes == (p in chosen), p
      assert float(asym[p]["grid_error_symmetric"]) == pytest.approx(
          statistics.grid_error(*_hist(net, p, sym), True)[0], rel=1e-6)
    if p in chosen:
      z = int(asym[p]["act_zero_point"])
      assert set(np.asarray(asym[p]["act_e"]).tolist()) <= set(numerics.zero_point_candidates(z))
      # The grid covers the calibrated range and is finer than the symmetric one.
      assert float(asym[p]["act_scale"]) < float(sym[p]["act_scale"])
    else:
      np.testing.assert_array_equal(asym[p]["act_scale"], sym[p]["act_scale"])
      np.testing.assert_array_equal(asym[p]["act_e"], sym[p]["act_e"])
  aplan = plan.with_signedness(asym)
  assert all(not aplan.signed[p] for p in chosen) and plan.with_signedness(sym).signed["conv"]
  assert "asymmetric grid" in aplan.signedness_summary()
  assert "act_zero_point" not in sym["conv"]  # the default writes nothing new


def _hist(net, p, stats):
  model, _, plan, folded, images, _, _ = net
  hist = statistics.collect(model, plan, folded, [images[:16], images[16:]],
                            statistics.CodeHistograms({q: float(stats[q]["act_scale"]) for q in plan.quantized},
                                                      {q: True for q in plan.quantized}))[p]["codes"]
  return np.asarray(hist, np.float64), float(stats[p]["act_scale"])


def test_the_asymmetric_grid_is_closer_to_float_at_4_bits(net):
  model, variables, plan, folded, images, sym, asym = net
  reference = model.apply(variables, images)
  errors = {}
  for name, calib in (("sym", sym), ("asym", asym)):
    qplan, qvars = _qvars(plan, folded, calib)
    apply = jax.jit(quantize.QuantizedModel(model, qplan, mode="fake").apply)
    errors[name] = [float(jnp.mean((apply(qvars, images, r) - reference) ** 2)) for r in (0.0, 1.0)]
  assert errors["asym"][1] < errors["sym"][1]  # at 100 % 4 bits, where the positive levels count


def test_fake_reference_and_serving_agree_on_the_asymmetric_grid(net):
  model, _, plan, folded, images, _, asym = net
  qplan, qvars = _qvars(plan, folded, asym)
  assert "act_zero" in qvars["quant"]["conv"] and "act_zero" not in qvars["quant"]["pw"]
  fake = jax.jit(quantize.QuantizedModel(model, qplan, mode="fake").apply)
  reference = jax.jit(quantize.QuantizedModel(model, qplan, mode="int_reference").apply)
  convs = tuple(p for p in qplan.quantized if qplan.layers[p].kind == "conv")
  for impls in ("auto", "int8", "int8_pad", "float32", "onednn"):
    qmodel = quantize.QuantizedModel(model, qplan, conv_impls=impls if impls in ("auto", "int8") else
                                     tuple((p, impls) for p in convs))
    svars = jax.jit(qmodel.prepare)(qvars)
    assert "zero_point" in svars["integer"]["conv"]
    for r in RATIOS:
      want = reference(qvars, images, r)
      np.testing.assert_allclose(jax.jit(qmodel.apply)(svars, images, r), want, rtol=1e-6, atol=1e-6, err_msg=impls)
      np.testing.assert_allclose(fake(qvars, images, r), want, rtol=1e-5, atol=1e-5)


def _conv_case(rng, *, c, o, kernel, strides, padding, groups=1, input_dilation=1, z=32):
  module = nn.Conv(o, kernel, strides=strides, padding=padding, feature_group_count=groups,
                   input_dilation=input_dilation)
  x = jnp.asarray(nn.silu(rng.normal(size=(2, 9, 8, c)) * 3.0), jnp.float32)
  kshape = tuple(kernel) + (c // groups, o)
  kernel8 = jnp.asarray(rng.integers(-127, 128, kshape), jnp.int8)
  y_shape = jax.eval_shape(lambda v, x: module.apply(v, x), {"params": {"kernel": jnp.zeros(kshape), "bias": jnp.zeros(o)}},
                           x).shape
  info = LayerInfo("conv", "conv", 0, c, o, groups, kshape, (1,) + x.shape[1:], (1,) + y_shape[1:], 1)
  e = jnp.asarray(rng.choice(numerics.zero_point_candidates(z), c), jnp.int32)
  lq = {"act_scale": jnp.float32(0.03), "act_zero": jnp.float32(z), "act_e": e, "weight_e": e,
        "weight_scale": jnp.asarray(rng.uniform(0.01, 0.02, o), jnp.float32),
        "rank": jnp.asarray(rng.permutation(c), jnp.int32), "mean_code": jnp.asarray(rng.uniform(-5, 50, c), jnp.float32),
        "mean_lowered": jnp.asarray(rng.uniform(-5, 50, c), jnp.float32)}
  bias = jnp.asarray(rng.normal(size=o), jnp.float32)
  params, entry = integer.prepare_layer(info, {"kernel": kernel8, "bias": bias}, lq, lowerable=True)
  return LayerCall(info, module, params["kernel"], params["bias"]), x, entry, lq, kernel8


@pytest.mark.parametrize("case", [
    dict(c=6, o=4, kernel=(3, 3), strides=1, padding="SAME"),
    dict(c=6, o=4, kernel=(3, 3), strides=2, padding=((0, 2), (1, 0)), z=16),
    dict(c=6, o=6, kernel=(5, 5), strides=1, padding="SAME", groups=6, z=48),  # depthwise
    dict(c=4, o=4, kernel=(3, 3), strides=1, padding=((2, 2), (1, 1)), input_dilation=2),  # transposed
])
def test_every_conv_impl_and_the_fake_path_agree_with_a_zero_point(case):
  rng = np.random.default_rng(len(str(case)))
  call, x, entry, lq, kernel8 = _conv_case(rng, **case)
  lowered = entry["rank"] < 3
  kernel_call = dataclasses.replace(call, kernel=kernel8)
  reference = jax.jit(lambda x: layer_ops.quantized_forward(kernel_call, x, lq, lowered, signed=False, mode="int"))(x)
  # The fake path dequantizes (q - z) * s and convolves in float, padding with the real zero.
  fake = jax.jit(lambda x: layer_ops.quantized_forward(kernel_call, x, lq, lowered, signed=False, mode="fake"))(x)
  unit = float(jnp.min(entry["scale"]))
  np.testing.assert_allclose(fake, reference, rtol=1e-5, atol=unit / 4)
  for impl in integer.CONV_IMPLS:
    out = jax.jit(lambda x, impl=impl: integer.integer_forward(call, x, entry, lowered, signed=False, conv_impl=impl))(x)
    np.testing.assert_allclose(out, reference, rtol=0, atol=unit / 8, err_msg=impl)
  # Without the zero point the outputs differ: the test sees it.
  no_zero = {k: v for k, v in lq.items() if k != "act_zero"}
  other = layer_ops.quantized_forward(kernel_call, x, no_zero, lowered, signed=False, mode="int")
  assert np.abs(np.asarray(other) - np.asarray(reference)).max() > 100 * unit


def test_lsq_with_a_zero_point_keeps_the_forward_and_gives_finite_scale_gradients():
  rng = np.random.default_rng(3)
  x = jnp.asarray(nn.silu(rng.normal(size=(4, 6)) * 3.0), jnp.float32)
  s, z = jnp.float32(0.03), 32.0
  want = numerics.fake_quant(x, s, z, 0, 255)
  np.testing.assert_array_equal(numerics.lsq_fake_quant(x, s, 0, 255, zero_point=z), want)
  g = jax.grad(lambda s: jnp.sum(numerics.lsq_fake_quant(x, s, 0, 255, zero_point=z) ** 2))(s)
  assert np.isfinite(float(g)) and float(g) != 0.0
  e = jnp.asarray(numerics.zero_point_candidates(32)[:1] * 6, jnp.int32)
  lowered = jnp.asarray([True, False] * 3)
  codes = lsq_extraction.lsq_quantize_lower(x, s, e, lowered, signed=False, features=6, zero_point=z)
  q = jnp.clip(jnp.round(x / s) + z, 0, 255)
  np.testing.assert_array_equal(codes, jnp.where(lowered, numerics.lower_codes(q, e, signed=False, axis=-1), q))
  grad = jax.grad(lambda s: jnp.sum(((lsq_extraction.lsq_quantize_lower(x, s, e, lowered, signed=False, features=6,
                                                                        zero_point=z) - z) * s) ** 2))(s)
  assert np.isfinite(float(grad))


def test_export_encodings_state_the_zero_point(net):
  model, _, plan, folded, _, _, asym = net
  qplan, qvars = _qvars(plan, folded, asym)
  qmodel = quantize.QuantizedModel(model, qplan)
  doc = export.encodings(qmodel, qvars, qmodel.prepare(qvars))
  z = int(asym["conv"]["act_zero_point"])
  enc = doc["activation_encodings"]["conv/input"][0]
  assert enc["offset"] == -z and enc["is_symmetric"] == "False"
  assert doc["flexiq"]["layers"]["conv"]["activation"]["zero_point"] == z
  assert doc["flexiq"]["layers"]["pw"]["activation"]["zero_point"] == 0
  assert doc["activation_encodings"]["pw/input"][0]["is_symmetric"] == "True"
