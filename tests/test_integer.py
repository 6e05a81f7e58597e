"""The serving form of the integer path (quantize/integer.py, quantize/tuning.py): every conv
implementation gives the reference's integers, whatever the padding, stride, dilation, groups,
signedness and lowered channels; preparing is idempotent and works from an int8 export."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexiq_jax import cost, numerics, quantize
from flexiq_jax.interception import LayerCall, LayerInfo
from flexiq_jax import layer_ops
from flexiq_jax.quantize import integer

import smallnet

RATIOS = (0.0, 0.37, 1.0)


@pytest.fixture(scope="module")
def setup():
  return smallnet.make_setup()


def _all_convs(plan, impl):
  return tuple((p, impl) for p in plan.quantized if plan.layers[p].kind == "conv")


@pytest.mark.parametrize("impls", ["auto", "int8", "int8_pad", "int8_widened", "float32"])
def test_serving_form_is_bit_identical_to_the_reference(setup, impls):
  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
  reference = jax.jit(quantize.QuantizedModel(model, plan, mode="int_reference").apply)
  qmodel = quantize.QuantizedModel(model, plan, conv_impls=impls if impls in ("auto", "int8") else _all_convs(plan, impls))
  svars = jax.jit(qmodel.prepare)(qvars)
  assert integer.is_prepared(svars) and "kernel" in svars["params"]["conv"]
  assert svars["params"]["conv"]["kernel"].dtype == jnp.int8  # no float kernel is shipped
  apply = jax.jit(qmodel.apply)
  outs = []
  for r in RATIOS:
    out = apply(svars, images, r)
    np.testing.assert_array_equal(out, reference(qvars, images, r))
    outs.append(out)
  assert not np.array_equal(outs[0], outs[-1])  # lowering changes the logits: the test sees it


def test_prepare_is_idempotent_and_reads_an_int8_export(setup):
  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
  qmodel = quantize.QuantizedModel(model, plan)
  svars = qmodel.prepare(qvars)
  assert qmodel.prepare(svars) is svars
  from_export = qmodel.prepare(quantize.export_int8(qmodel, qvars))
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), svars, from_export))
  for r in RATIOS:
    # The same values; two compilations may contract the epilogue's multiply-add differently
    # (XLA:CPU forms FMAs per fusion): the last bit of a logit may differ.
    np.testing.assert_allclose(jax.jit(qmodel.apply)(from_export, images, r), jax.jit(qmodel.apply)(svars, images, r),
                               rtol=1e-6, atol=0)
  # apply on unprepared variables prepares inside the call: the same logits (up to the last bit)
  np.testing.assert_allclose(jax.jit(qmodel.apply)(qvars, images, 0.5), jax.jit(qmodel.apply)(svars, images, 0.5),
                             rtol=1e-6, atol=0)


def _conv_case(rng, *, c, o, kernel, strides, padding, dilation=1, groups=1, signed, input_dilation=1):
  module = nn.Conv(o, kernel, strides=strides, padding=padding, kernel_dilation=dilation,
                   feature_group_count=groups, input_dilation=input_dilation)
  x = jnp.asarray(rng.normal(size=(2, 9, 8, c)) * (1.0 if signed else 0.0) + rng.uniform(0, 2, (2, 9, 8, c)), jnp.float32)
  kshape = tuple(kernel) + (c // groups, o)
  kernel8 = jnp.asarray(rng.integers(-127, 128, kshape), jnp.int8)
  y_shape = jax.eval_shape(lambda v, x: module.apply(v, x), {"params": {"kernel": jnp.zeros(kshape), "bias": jnp.zeros(o)}},
                           x).shape
  info = LayerInfo("conv", "conv", 0, c, o, groups, kshape, (1,) + x.shape[1:], (1,) + y_shape[1:], 1)
  e = jnp.asarray(rng.integers(0, 5, c), jnp.int32)
  lq = {"act_scale": jnp.float32(0.01), "act_e": e, "weight_e": e, "weight_scale": jnp.asarray(rng.uniform(0.01, 0.02, o), jnp.float32),
        "rank": jnp.asarray(rng.permutation(c), jnp.int32), "mean_code": jnp.asarray(rng.uniform(0, 50, c), jnp.float32),
        "mean_lowered": jnp.asarray(rng.uniform(0, 50, c), jnp.float32)}
  bias = jnp.asarray(rng.normal(size=o), jnp.float32)
  params, entry = integer.prepare_layer(info, {"kernel": kernel8, "bias": bias}, lq, lowerable=True)
  call = LayerCall(info, module, params["kernel"], params["bias"])
  return call, x, entry, lq, kernel8, bias


@pytest.mark.parametrize("case", [
    dict(c=6, o=4, kernel=(3, 3), strides=1, padding="SAME"),
    dict(c=6, o=4, kernel=(3, 3), strides=2, padding=((0, 2), (1, 0))),  # asymmetric border
    dict(c=6, o=4, kernel=(3, 2), strides=(2, 1), padding="VALID"),
    dict(c=4, o=4, kernel=(3, 3), strides=1, padding="SAME", dilation=2),
    dict(c=6, o=6, kernel=(3, 3), strides=1, padding="SAME", groups=6),  # depthwise
    dict(c=6, o=4, kernel=(3, 3), strides=1, padding="SAME", groups=2),
    dict(c=4, o=4, kernel=(3, 3), strides=1, padding=((2, 2), (1, 1)), input_dilation=2),  # transposed
])
@pytest.mark.parametrize("signed", [False, True])
def test_every_conv_impl_gives_the_same_integers(case, signed):
  rng = np.random.default_rng(len(str(case)) + signed)
  call, x, entry, lq, kernel8, bias = _conv_case(rng, signed=signed, **case)
  lowered = entry["rank"] < 3
  reference = jax.jit(lambda x: layer_ops.quantized_forward(
      dataclasses.replace(call, kernel=kernel8), x, lq, lowered, signed=signed, mode="int"))(x)
  # One accumulator unit moves an output by its scale (>= 1e-4 here); separately compiled epilogues
  # may round the last bit differently (FMA contraction): any integer difference shows, roundoff not.
  unit = float(jnp.min(entry["scale"]))
  for impl in integer.CONV_IMPLS:
    out = jax.jit(lambda x, impl=impl: integer.integer_forward(call, x, entry, lowered, signed=signed, conv_impl=impl))(x)
    np.testing.assert_allclose(out, reference, rtol=0, atol=unit / 8, err_msg=impl)


def test_float32_convs_only_where_exact():
  info = LayerInfo("c", "conv", 0, 512, 8, 1, (3, 3, 512, 8), (1, 4, 4, 512), (1, 4, 4, 8), 1)
  assert not integer.exact_in_float32(info, signed=True)  # 4608 * 128 * 127 > 2^24
  assert integer.conv_impl_for(info, True, "float32") == "int8"
  small = dataclasses.replace(info, in_channels=64, kernel_shape=(3, 3, 64, 8))
  assert integer.exact_in_float32(small, signed=True) and not integer.exact_in_float32(
      dataclasses.replace(info, in_channels=128, kernel_shape=(3, 3, 128, 8)), signed=False)
  with pytest.raises(ValueError, match="unknown conv implementation"):
    integer.conv_impl_for(small, True, "int4")


def test_tuning_picks_a_valid_impl_per_conv_and_keeps_the_logits(setup):
  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
  qmodel = quantize.QuantizedModel(model, plan)
  tuned, times = quantize.tune_conv_impls(qmodel, qvars, images[:8], repeats=1)
  convs = [p for p in plan.quantized if plan.layers[p].kind == "conv"]
  assert sorted(times) == sorted(convs) and all(set(t) <= set(integer.CONV_IMPLS) and t for t in times.values())
  chosen = tuned.conv_impl_map()
  assert sorted(chosen) == sorted(convs)
  assert all(chosen[p] == min(times[p], key=times[p].get) for p in convs)
  np.testing.assert_array_equal(jax.jit(tuned.apply)(qvars, images, 0.5), jax.jit(qmodel.apply)(qvars, images, 0.5))


def test_make_predict_can_tune_and_keeps_the_logits(setup):
  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
  qmodel = quantize.QuantizedModel(model, plan)
  tuned = quantize.make_predict(qmodel, qvars, tune_images=images[:8])
  assert isinstance(tuned.qmodel.conv_impls, tuple)
  assert sorted(p for p, _ in tuned.qmodel.conv_impls) == sorted(p for p in plan.quantized if plan.layers[p].kind == "conv")
  np.testing.assert_allclose(tuned(images[:8], 0.5), quantize.make_predict(qmodel, qvars)(images[:8], 0.5), rtol=1e-6, atol=0)


def test_unknown_conv_impls_setting_is_an_error(setup):
  with pytest.raises(ValueError, match="conv_impls must be"):
    quantize.QuantizedModel(setup.model, setup.plan, conv_impls="fast")


def test_int4_packing_round_trips_and_halves_the_bytes():
  values = jnp.asarray(np.random.default_rng(0).integers(-8, 8, (7, 5)), jnp.int8)
  packed = numerics.pack_int4(values)
  assert packed.shape == (4, 5) and packed.dtype == jnp.int8
  np.testing.assert_array_equal(numerics.unpack_int4(packed, rows=7), values)
  # nibble order: row 2i in the low nibble, row 2i+1 in the high one
  assert int(numerics.pack_int4(jnp.asarray([[-1], [1]], jnp.int8))[0, 0]) == 0x1F


def test_roofline_fit_recovers_a_known_model():
  rng = np.random.default_rng(0)
  macs, bytes_ = rng.uniform(1e6, 1e9, 40), rng.uniform(1e5, 1e8, 40)
  seconds = 2e-5 + macs / 5e10 + bytes_ / 2e9
  model = cost.RooflineModel.fit(macs, bytes_, seconds)
  assert model.overhead_s == pytest.approx(2e-5, rel=1e-3)
  assert model.macs_per_s == pytest.approx(5e10, rel=1e-3) and model.bytes_per_s == pytest.approx(2e9, rel=1e-3)
  assert model.r2 == pytest.approx(1.0)
  info = LayerInfo("d", "dense", 0, 64, 32, 1, (64, 32), (1, 64), (1, 32), 1)
  full, half = cost.integer_layer_bytes(info, 8), cost.integer_layer_bytes(info, 8, lowered=64, low_bytes=0.5)
  assert full - half == pytest.approx(0.5 * (8 * 64 * 2 + 64 * 32))  # codes written+read and weights, halved
  # a 4-bit target: lowered MACs at twice the rate, so all-lowered is faster than none
  assert model.layer_time(info, 8, lowered=64, low_bits_speedup=2.0) < model.layer_time(info, 8)


def test_widened_conv_runs_on_32_input_channels_and_only_where_it_can():
  rng = np.random.default_rng(0)
  call, x, entry, *_ = _conv_case(rng, c=6, o=4, kernel=(3, 3), strides=1, padding="SAME", signed=False)
  jaxpr = jax.make_jaxpr(lambda x: integer.integer_forward(call, x, entry, None, signed=False,
                                                           conv_impl="int8_widened"))(x)
  convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert [(e.invars[0].aval.shape[-1], e.invars[0].aval.dtype) for e in convs] == [(32, jnp.int8)]
  wide = dataclasses.replace(call.info, in_channels=32, kernel_shape=(3, 3, 32, 4))
  grouped = dataclasses.replace(call.info, groups=2, kernel_shape=(3, 3, 3, 4))
  assert integer.conv_impl_for(call.info, False, "int8_widened") == "int8_widened"
  assert integer.conv_impl_for(wide, False, "int8_widened") == "int8"
  assert integer.conv_impl_for(grouped, False, "int8_widened") == "int8"
