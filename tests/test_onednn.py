"""oneDNN's int8 kernels through XLA's FFI (quantize/onednn.py, csrc/onednn): int32 accumulators
equal XLA's exact integer conv/dot for every layer kind, signedness and padding; the fused epilogue
(scale, bias, ReLU/ReLU6/GELU, requantization) within the stated tolerance; a residual sum's addend
bit for bit, and a model's residual sums fused into its convs without changing a logit; a model's logits
with every layer on oneDNN close to the reference path's; one compilation for every ratio; the
export and machines without the library run the XLA form."""

import ctypes
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from flexiq_jax import quantize, serve
from flexiq_jax.interception import LayerInfo, get_path
from flexiq_jax.quantize import integer, onednn

import smallnet

needs_onednn = pytest.mark.skipif(not onednn.available(), reason=f"oneDNN kernels unavailable: "
                                  f"{onednn.unavailable_reason()}")
RATIOS = (0.0, 0.37, 1.0)

CONVS = {  # (C, O, kernel, strides, padding, dilation, groups)
    "regular": (16, 24, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    "strided_asymmetric_pad": (8, 16, (3, 3), (2, 2), ((0, 2), (1, 0)), (1, 1), 1),
    "dilated": (8, 8, (3, 3), (1, 1), ((2, 2), (2, 2)), (2, 2), 1),
    "depthwise": (16, 16, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 16),
    "depthwise_strided": (8, 8, (5, 5), (2, 2), ((2, 2), (2, 2)), (1, 1), 8),
    "grouped": (12, 8, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 4),
    "stem": (3, 16, (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1), 1),
    "pointwise": (32, 48, (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),
}


def _codes(rng, shape, signed: bool, extreme: bool):
  """Random codes on the full 8-bit grid, or all at the grid's largest magnitude (where oneDNN's
  non-VNNI kernels saturate or halve the weights unless split)."""
  dtype = jnp.int8 if signed else jnp.uint8
  if extreme:
    return jnp.full(shape, -128 if signed else 255, dtype)
  lo, hi = (-128, 128) if signed else (0, 256)
  return jnp.asarray(rng.integers(lo, hi, shape), dtype)


def _weights(rng, shape, extreme: bool):
  if extreme:  # -128 and 127 alternating along the output channels
    return jnp.asarray(np.where(np.arange(shape[-1]) % 2 == 0, -128, 127) * np.ones(shape), jnp.int8)
  return jnp.asarray(rng.integers(-128, 128, shape), jnp.int8)


def _xla_conv(x, w, strides, padding, dilation, groups):
  """The exact integer conv (int32 operands) as XLA computes it."""
  return lax.conv_general_dilated(x.astype(jnp.int32), w.astype(jnp.int32), strides, padding,
                                  rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=groups)


@needs_onednn
@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("extreme", [False, True])
def test_conv_accumulators_equal_xla(name, signed, extreme):
  c, o, kernel, strides, padding, dilation, groups = CONVS[name]
  rng = np.random.default_rng(len(name) + 2 * signed + extreme)
  x = _codes(rng, (2, 11, 10, c), signed, extreme)
  w = _weights(rng, kernel + (c // groups, o), extreme)
  kw = dict(strides=strides, padding=padding, dilation=dilation, groups=groups)
  acc = jax.jit(lambda x, w: onednn.conv(x, w, **kw))(x, w)
  assert acc.dtype == jnp.int32
  np.testing.assert_array_equal(acc, _xla_conv(x, w, strides, padding, dilation, groups))
  # Also against XLA's own int8 conv, the serving form's (codes shifted into int8 if unsigned).
  if signed:
    np.testing.assert_array_equal(acc, lax.conv_general_dilated(
        x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups, preferred_element_type=jnp.int32))


@needs_onednn
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("extreme", [False, True])
def test_matmul_accumulators_equal_xla(signed, extreme):
  rng = np.random.default_rng(7 + signed + 2 * extreme)
  x = _codes(rng, (3, 13, 200), signed, extreme)  # leading axes flattened into rows
  w = _weights(rng, (200, 40), extreme)
  acc = jax.jit(onednn.matmul)(x, w)
  assert acc.shape == (3, 13, 40) and acc.dtype == jnp.int32
  np.testing.assert_array_equal(acc, jnp.einsum("abk,kn->abn", x.astype(jnp.int32), w.astype(jnp.int32)))


def _sparse_large_codes(rng, shape, signed: bool, fraction: float = 0.05):
  """Codes inside 7 bits ([0, 127] unsigned, [-64, 63] signed) but for `fraction` of them at
  larger magnitudes up to the grid's ends: the single mode's sparse remainder."""
  if signed:
    x = rng.integers(-64, 64, shape)
    large = rng.choice(np.array([-128, 127, -65, 64, -100, 90]), shape)
  else:
    x = rng.integers(0, 128, shape)
    large = rng.choice(np.array([255, 128, 200]), shape)
  return jnp.asarray(np.where(rng.random(shape) < fraction, large, x), jnp.int8 if signed else jnp.uint8)


@needs_onednn
@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("signed", [False, True])
def test_single_mode_adds_the_sparse_remainder_exactly(name, signed):
  """'single': one int8 run on the 7-bit part of the codes plus the remainder of the codes outside
  7 bits scattered over their outputs (every layer kind, both signs, padding and strides): the
  exact accumulators, and the library ran it single (not split) with a nonzero remainder."""
  c, o, kernel, strides, padding, dilation, groups = CONVS[name]
  rng = np.random.default_rng(len(name) + 5 * signed)
  x = _sparse_large_codes(rng, (2, 11, 10, c), signed)
  w = _weights(rng, kernel + (c // groups, o), False)
  before = onednn.run_counts()
  acc = jax.jit(lambda x, w: onednn.conv(x, w, strides=strides, padding=padding, dilation=dilation, groups=groups,
                                         mode="single"))(x, w)
  after = onednn.run_counts()
  np.testing.assert_array_equal(acc, _xla_conv(x, w, strides, padding, dilation, groups))
  assert after["single"] == before["single"] + 1 and after["split"] == before["split"]
  assert after["single_remainders"] > before["single_remainders"]
  # The same codes with the fused epilogue: the float output of the exact accumulators.
  scale = jnp.asarray(rng.uniform(1e-4, 2e-4, o), jnp.float32)
  y = onednn.conv(x, w, strides=strides, padding=padding, dilation=dilation, groups=groups, scale=scale, bias=0.5,
                  post_op="relu", out_dtype=jnp.float32, mode="single")
  want = np.maximum(np.asarray(_xla_conv(x, w, strides, padding, dilation, groups), np.float64)
                    * np.asarray(scale, np.float64) + 0.5, 0)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


WIDE = {  # (C, O, kernel, strides, padding, dilation, groups): channel counts the library vectorizes
    "wide": (64, 64, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    "wide_strided_dilated": (64, 80, (3, 3), (2, 2), ((0, 2), (2, 1)), (2, 2), 1),
    "wide_grouped": (64, 32, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 2),
}


@needs_onednn
@pytest.mark.parametrize("name", sorted(WIDE))
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("post_op", ["none", "relu", "relu6"])
def test_single_mode_wide_layers_equal_the_float32_epilogue(name, signed, post_op):
  """At channel counts where the library runs its vectorized steps (codes split 32 at a time, the
  remainder added two terms at a time over blocks of 32 outputs, the float epilogue 8 at a time):
  the exact accumulators, and the float output equal bit for bit to float32(acc) * scale + bias
  (rounded separately, no FMA) then the post-op, computed here in NumPy."""
  c, o, kernel, strides, padding, dilation, groups = WIDE[name]
  rng = np.random.default_rng(len(name) + 3 * signed)
  x = _sparse_large_codes(rng, (3, 13, 12, c), signed, fraction=0.08)
  w = _weights(rng, kernel + (c // groups, o), False)
  kw = dict(strides=strides, padding=padding, dilation=dilation, groups=groups, mode="single")
  before = onednn.run_counts()
  acc = onednn.conv(x, w, **kw)
  after = onednn.run_counts()
  np.testing.assert_array_equal(acc, _xla_conv(x, w, strides, padding, dilation, groups))
  assert after["single"] == before["single"] + 1 and after["single_remainders"] > before["single_remainders"]
  scale = np.asarray(rng.uniform(1e-4, 2e-4, o), np.float32)
  bias = np.asarray(rng.normal(0, 0.5, o), np.float32)
  want = np.asarray(acc).astype(np.float32) * scale + bias
  want = {"none": want, "relu": np.maximum(want, np.float32(0)), "relu6": np.clip(want, np.float32(0), np.float32(6))}[post_op]
  y = onednn.conv(x, w, scale=scale, bias=bias, post_op=post_op, out_dtype=jnp.float32, **kw)
  np.testing.assert_array_equal(np.asarray(y), want)


@needs_onednn
@pytest.mark.parametrize("signed", [False, True])
def test_single_mode_matmul_and_dense_remainder_fallback(signed):
  """The single mode's matmul is exact with a sparse remainder; where the remainder is dense (all
  codes at the grid's end) the layer runs split instead, still exact."""
  rng = np.random.default_rng(21 + signed)
  x = _sparse_large_codes(rng, (37, 96), signed)
  w = _weights(rng, (96, 24), False)
  before = onednn.run_counts()
  np.testing.assert_array_equal(onednn.matmul(x, w, mode="single"), x.astype(jnp.int32) @ w.astype(jnp.int32))
  assert onednn.run_counts()["single"] == before["single"] + 1
  dense = _codes(rng, (37, 96), signed, True)
  before = onednn.run_counts()
  np.testing.assert_array_equal(onednn.matmul(dense, w, mode="single"),
                                dense.astype(jnp.int32) @ w.astype(jnp.int32))
  after = onednn.run_counts()
  assert after["split"] == before["split"] + 1 and after["single"] == before["single"]


@needs_onednn
@pytest.mark.parametrize("signed", [False, True])
def test_single_mode_low_codes_reach_the_weights_bound(signed):
  """With weights within +-112 the low codes go up to 146 (2 * 146 * 112 <= 32767): unsigned codes
  up to 146 (signed codes in [-73, 73]) are no remainder, every code beyond is one; exact."""
  rng = np.random.default_rng(5 + signed)
  w = jnp.asarray(rng.integers(-112, 113, (3, 3, 32, 16)), jnp.int8)
  if signed:
    values, p = [-128, -74, -73, 0, 73, 74, 127], [0.02, 0.02, 0.2, 0.4, 0.32, 0.02, 0.02]
  else:
    values, p = [0, 100, 146, 147, 255], [0.4, 0.3, 0.25, 0.025, 0.025]
  x = jnp.asarray(rng.choice(values, (2, 7, 7, 32), p=p), jnp.int8 if signed else jnp.uint8)
  before = onednn.run_counts()
  acc = onednn.conv(x, w, padding=((1, 1), (1, 1)), mode="single")
  np.testing.assert_array_equal(acc, _xla_conv(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1), 1))
  large = np.abs(np.asarray(x, np.int32)) > 73 if signed else np.asarray(x, np.int32) > 146
  after = onednn.run_counts()
  assert after["single"] == before["single"] + 1
  assert after["single_remainders"] - before["single_remainders"] == large.sum() > 0
  # With one weight at -128 the bound is 127: the same codes, exact again.
  w = w.at[0, 0, 0, 0].set(-128)
  np.testing.assert_array_equal(onednn.conv(x, w, padding=((1, 1), (1, 1)), mode="single"),
                                _xla_conv(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1), 1))


@needs_onednn
def test_reordered_weights_are_kept_per_content():
  """The library keeps weights reordered for a primitive and reuses them only for the same bytes:
  weights that differ in one element (a new 4-bit ratio) give their own exact accumulators."""
  rng = np.random.default_rng(9)
  x = _sparse_large_codes(rng, (2, 9, 9, 16), False)
  w1 = _weights(rng, (3, 3, 16, 24), False)
  w2 = w1.at[2, 2, 15, 23].set(-w1[2, 2, 15, 23] - 1)
  conv = jax.jit(lambda x, w: onednn.conv(x, w, padding=((1, 1), (1, 1))))
  for w in (w1, w2, w1, w2):
    np.testing.assert_array_equal(conv(x, w), _xla_conv(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1), 1))


@needs_onednn
def test_split_mode_is_exact_and_direct_mode_on_small_codes():
  """'split' is exact on every CPU; 'direct' (one fused primitive) is exact on VNNI CPUs and, on
  any CPU, for unsigned codes below 128 (no s16 pair sum can saturate)."""
  rng = np.random.default_rng(3)
  c, o, kernel, strides, padding, dilation, groups = CONVS["regular"]
  w = _weights(rng, kernel + (c, o), False)
  for signed in (False, True):
    x = _codes(rng, (2, 9, 9, c), signed, False)
    np.testing.assert_array_equal(onednn.conv(x, w, padding=padding, mode="split"),
                                  _xla_conv(x, w, strides, padding, dilation, groups))
  small = jnp.asarray(rng.integers(0, 128, (2, 9, 9, c)), jnp.uint8)
  np.testing.assert_array_equal(onednn.conv(small, w, padding=padding, mode="direct"),
                                _xla_conv(small, w, strides, padding, dilation, groups))
  xs = jnp.asarray(rng.integers(0, 128, (31, 64)), jnp.uint8)
  wm = _weights(rng, (64, 24), False)
  np.testing.assert_array_equal(onednn.matmul(xs, wm, mode="direct"), xs.astype(jnp.int32) @ wm.astype(jnp.int32))


def _epilogue(acc, scale, bias, post_op):
  y = np.asarray(acc, np.float64) * scale + bias
  if post_op == "relu":
    return np.maximum(y, 0)
  if post_op == "relu6":
    return np.clip(y, 0, 6)
  if post_op == "gelu":
    from scipy.special import erf
    return 0.5 * y * (1 + erf(y / np.sqrt(2)))
  return y


@needs_onednn
@pytest.mark.parametrize("mode", ["auto", "split", "direct", "single"])
@pytest.mark.parametrize("post_op", ["none", "relu", "relu6", "gelu"])
def test_fused_epilogue_and_requantization(mode, post_op):
  """f32 output: acc·scale[o] + bias[o], then the post-op, within 1e-5 relative (float32 roundings
  of a value computed in float64 here); u8/s8 output: that value over dst_scale, rounded and
  saturated, within one code (a value at a half step may round either way)."""
  rng = np.random.default_rng(11)
  c, o, kernel, strides, padding, dilation, groups = CONVS["regular"]
  # Codes below 128: exact accumulators in every mode on every CPU, so only the epilogue is tested.
  x = jnp.asarray(rng.integers(0, 128, (2, 8, 8, c)), jnp.uint8)
  w = _weights(rng, kernel + (c, o), False)
  scale = jnp.asarray(rng.uniform(1e-5, 4e-5, o), jnp.float32)
  bias = jnp.asarray(rng.normal(0, 1, o), jnp.float32)
  acc = _xla_conv(x, w, strides, padding, dilation, groups)
  want = _epilogue(acc, np.asarray(scale, np.float64), np.asarray(bias, np.float64), post_op)
  assert (want < 0).any() or post_op != "none"  # the post-op has something to do
  kw = dict(padding=padding, scale=scale, bias=bias, post_op=post_op, mode=mode)
  y = onednn.conv(x, w, out_dtype=jnp.float32, **kw)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  dst_scale = 0.02
  for dtype, lo, hi in ((jnp.uint8, 0, 255), (jnp.int8, -128, 127)):
    q = onednn.conv(x, w, out_dtype=dtype, dst_scale=dst_scale, **kw)
    assert q.dtype == dtype
    want_q = np.clip(np.round(want / dst_scale), lo, hi)
    assert np.max(np.abs(np.asarray(q, np.int32) - want_q)) <= 1
    assert np.mean(np.asarray(q, np.int32) == want_q) > 0.99
  ym = onednn.matmul(x.reshape(-1, c), w[1, 1], scale=scale, bias=bias, post_op=post_op, out_dtype=jnp.float32,
                     mode=mode)
  want_m = _epilogue(np.asarray(x, np.int64).reshape(-1, c) @ np.asarray(w[1, 1], np.int64),
                     np.asarray(scale, np.float64), np.asarray(bias, np.float64), post_op)
  np.testing.assert_allclose(ym, want_m, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("mode", ["auto", "split", "direct", "single"])
@pytest.mark.parametrize("name", ["regular", "depthwise", "stem"])
@pytest.mark.parametrize("post_op", ["none", "relu"])
def test_conv_addend_is_added_before_the_post_op_bit_for_bit(mode, name, post_op):
  """The residual operand: post_op(acc * scale + bias + addend) equals the conv's float32 output
  plus the addend, then the post-op, bit for bit (one float32 add either way), in every mode and for
  a 3-channel stem; with `sum_codes` the same sum and, from the same pass, its codes on the reading
  layer's grid (`integer.activation_codes`, with and without lowered channels)."""
  rng = np.random.default_rng(5)
  c, o, kernel, strides, padding, dilation, groups = CONVS[name]
  for signed in (False, True):
    x = _codes(rng, (2, 9, 9, c), signed, False)
    w = _weights(rng, kernel + (c // groups, o), False)
    kw = dict(strides=strides, padding=padding, dilation=dilation, groups=groups, mode=mode, out_dtype=jnp.float32,
              scale=jnp.asarray(rng.uniform(1e-4, 2e-4, o), jnp.float32),
              bias=jnp.asarray(rng.normal(0, 1, o), jnp.float32))
    y = onednn.conv(x, w, **kw)
    addend = jnp.asarray(rng.normal(0, 2, y.shape), jnp.float32)
    want = y + addend
    want = jnp.maximum(want, 0.0) if post_op == "relu" else want
    got = onednn.conv(x, w, addend=addend, post_op=post_op, **kw)
    np.testing.assert_array_equal(got, want)
    assert post_op == "none" or (np.asarray(got) == 0).any()  # the ReLU clipped something
    # The sum's codes for the layer that reads it (signed grid where the sum can be negative).
    codes_signed = post_op == "none"
    lowered = jnp.asarray(rng.random(o) < 0.5)
    entry = {"act_scale": jnp.float32(0.03), "step": jnp.asarray(2.0 ** rng.integers(1, 4, o), jnp.float32)}
    rows = integer.lowering_operand(entry["step"], lowered, signed=codes_signed)
    codes_dtype = jnp.int8 if codes_signed else jnp.uint8
    for lowering, mask in ((rows, lowered), (None, None)):
      got_sum, codes = onednn.conv(x, w, addend=addend, post_op=post_op, **kw, sum_codes=dict(
          out_dtype=codes_dtype, dst_scale=entry["act_scale"], lowering=lowering))
      np.testing.assert_array_equal(got_sum, want)
      assert codes.dtype == codes_dtype
      np.testing.assert_array_equal(codes, integer.activation_codes(want, entry, mask, signed=codes_signed)
                                    .astype(codes_dtype))
  with pytest.raises(ValueError, match="sum_codes needs an addend"):
    onednn.conv(x, w, sum_codes=dict(out_dtype=jnp.uint8, dst_scale=0.1), **kw)
  with pytest.raises(ValueError, match="addend must be float32 of the output's shape"):
    onednn.conv(x, w, addend=addend[:1], **kw)
  with pytest.raises(ValueError, match="addend must be float32 of the output's shape"):
    onednn.conv(x, w, addend=addend, **dict(kw, out_dtype=jnp.uint8))


def test_bad_arguments_are_refused():
  x, w = jnp.zeros((1, 4, 4, 2), jnp.float32), jnp.zeros((3, 3, 2, 2), jnp.int8)
  with pytest.raises(ValueError, match="uint8/int8 codes"):
    onednn.conv(x, w)
  with pytest.raises(ValueError, match="unknown post_op"):
    onednn.conv(x.astype(jnp.int8), w, post_op="swish", out_dtype=jnp.float32)
  with pytest.raises(ValueError, match="no post-op"):
    onednn.conv(x.astype(jnp.int8), w, post_op="relu")
  with pytest.raises(ValueError, match="unknown mode"):
    onednn.matmul(x[0, 0].astype(jnp.int8), w[0, 0], mode="fast")


@pytest.fixture(scope="module")
def setup():
  return smallnet.make_setup()


def _onednn_model(setup):
  return quantize.QuantizedModel(setup.model, setup.plan, conv_impls="onednn", dense_impl="onednn")


@needs_onednn
def test_model_logits_match_the_reference_with_one_compilation(setup):
  """Every conv (regular, strided, depthwise, grouped; signed and unsigned inputs) and dense layer
  on oneDNN: logits within 1e-5 (relative, plus 1e-5 absolute) of mode='int_reference' at every
  ratio: the accumulators are the same integers, the fused epilogue adds bias and bias correction
  in another order (float32 roundings). One compilation serves every ratio."""
  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
  reference = jax.jit(quantize.QuantizedModel(model, plan, mode="int_reference").apply)
  qmodel = _onednn_model(setup)
  svars = jax.jit(qmodel.prepare)(qvars)
  apply = jax.jit(qmodel.apply)
  text = apply.lower(svars, images, 0.0).as_text()
  convs = [p for p in plan.quantized if plan.layers[p].kind == "conv"]
  assert text.count(onednn.CONV_TARGET) == len(convs) and onednn.MATMUL_TARGET in text
  want = [reference(qvars, images, r) for r in RATIOS]
  with serve.count_compilations() as compiled:
    outs = [apply(svars, images, jnp.float32(r)) for r in RATIOS]
  assert compiled.count == 1
  for out, ref in zip(outs, want):
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  assert not np.allclose(outs[0], outs[-1], rtol=1e-3)  # lowering changes the logits: the test sees it


@needs_onednn
def test_tuner_can_include_onednn(setup):
  """impls=CONV_IMPLS times 'onednn' per conv too; the tuned model's logits stay within the
  oneDNN tolerance of the reference; by default 'onednn' is not timed."""
  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
  qmodel = quantize.QuantizedModel(model, plan)
  tuned, times = quantize.tune_conv_impls(qmodel, qvars, images[:8], repeats=1, impls=integer.CONV_IMPLS)
  assert all("onednn" in t for t in times.values())
  chosen = tuned.conv_impl_map()
  assert all(chosen[p] == min(t, key=t.get) for p, t in times.items())
  reference = quantize.QuantizedModel(model, plan, mode="int_reference").apply
  np.testing.assert_allclose(jax.jit(tuned.apply)(qvars, images, 0.5), jax.jit(reference)(qvars, images, 0.5),
                             rtol=1e-5, atol=1e-5)
  _, default_times = quantize.tune_conv_impls(qmodel, qvars, images[:8], repeats=1)
  assert not any("onednn" in t for t in default_times.values())


def test_export_and_missing_library_run_the_xla_form(setup, monkeypatch):
  """The portable export's form has no custom call; without the library (or off the CPU) the
  oneDNN choices fall back to XLA's kernels and the logits are the XLA form's."""
  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
  qmodel = _onednn_model(setup)
  xla = qmodel.xla_form()
  assert xla.conv_impls == "auto" and xla.dense_impl == "xla"
  assert quantize.QuantizedModel(model, plan, conv_impls=(("conv", "onednn"), ("dw", "int8"))).xla_form().conv_impls \
      == (("dw", "int8"),)
  svars = jax.jit(qmodel.prepare)(qvars)
  assert "custom_call" not in jax.jit(xla.apply).lower(svars, images, 0.5).as_text()
  monkeypatch.setattr(onednn, "unavailable_reason", lambda: "no library (test)")
  info = LayerInfo("c", "conv", 0, 64, 8, 1, (3, 3, 64, 8), (1, 4, 4, 64), (1, 4, 4, 8), 1)
  assert integer.conv_impl_for(info, True, "onednn") == integer.conv_impl_for(info, True, None)
  lowered = jax.jit(qmodel.apply).lower(svars, images, 0.5)
  assert "custom_call" not in lowered.as_text()
  np.testing.assert_allclose(lowered.compile()(svars, images, 0.5), jax.jit(xla.apply)(svars, images, 0.5),
                             rtol=1e-6, atol=0)
  with pytest.raises(ValueError, match="conv_impls must be"):
    dataclasses.replace(qmodel, conv_impls="mkldnn")


@needs_onednn
def test_auto_falls_back_to_single_where_the_fused_kernels_are_not_exact(monkeypatch):
  """'auto' trusts the library's fused kernels only after a probe of extreme codes: told that this
  CPU has VNNI, a CPU without it (whose fused kernels saturate) resolves 'auto' to 'single', and
  the accumulators stay exact either way."""
  has_vnni = onednn.direct_here()
  monkeypatch.setattr(onednn, "direct_here", lambda: True)
  onednn.auto_mode.cache_clear()
  try:
    resolved = onednn.auto_mode()
    assert resolved == ("auto" if has_vnni else "single")
    rng = np.random.default_rng(0)
    c, o, kernel, strides, padding, dilation, groups = CONVS["regular"]
    for signed in (False, True):
      x, w = _codes(rng, (2, 9, 9, c), signed, True), _weights(rng, kernel + (c, o), True)
      np.testing.assert_array_equal(jax.jit(lambda x, w: onednn.conv(x, w, padding=padding))(x, w),
                                    _xla_conv(x, w, strides, padding, dilation, groups))
  finally:
    onednn.auto_mode.cache_clear()


def test_a_library_of_another_interface_version_is_refused():
  """A kernel library built from other sources (here oneDNN's own library, which exports no
  interface version) is refused with a sentence naming the rebuild, so that flexiq_jax never calls
  a library that reads its modes and attributes differently."""
  import ctypes
  import flexiq_jax_onednn
  dnnl = flexiq_jax_onednn.dnnl_path()
  if dnnl is None:
    pytest.skip("the onednn-cpu-gomp wheel is not installed")
  why = onednn._abi_problem(ctypes.CDLL(dnnl), dnnl)
  assert "interface version 1, expected" in why and "pip install ./csrc/onednn" in why
  lib, _ = onednn._load()
  if lib is not None:
    assert onednn._abi_problem(lib, "lib") == ""



@needs_onednn
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("dilation", [(1, 1), (2, 1)])
@pytest.mark.parametrize("channels", [1, 3])
def test_few_input_channels_are_padded_to_four_and_stay_exact(signed, dilation, channels):
  """A conv with 1 or 3 input channels (the stem's kind, strided 7x7) reaches the library with its
  channels padded with zeros to 4, and gives the exact accumulators, padded or as given: in single
  mode with a sparse remainder (and the float epilogue of them) and in direct mode (u8 codes below
  128, exact without VNNI too)."""
  rng = np.random.default_rng(31 + 2 * signed + dilation[0] + 7 * channels)
  x = _sparse_large_codes(rng, (5, 17, 15, channels), signed)
  w = _weights(rng, (7, 7, channels, 24), False)
  kw = dict(strides=(2, 2), padding=((3, 3), (3, 2)), dilation=dilation)
  want = _xla_conv(x, w, kw["strides"], kw["padding"], dilation, 1)
  operand_channels = [e.invars[0].aval.shape[-1] for e in jax.make_jaxpr(lambda a, b: onednn.conv(a, b, **kw))(x, w).eqns
                      if e.primitive.name == "ffi_call"]
  assert operand_channels == [4]
  for pad_channels in (True, False):
    before = onednn.run_counts()
    np.testing.assert_array_equal(onednn.conv(x, w, mode="single", pad_channels=pad_channels, **kw), want)
    after = onednn.run_counts()
    assert after["single"] == before["single"] + 1 and after["single_remainders"] > before["single_remainders"]
  scale = np.asarray(rng.uniform(1e-4, 2e-4, 24), np.float32)
  bias = np.asarray(rng.normal(0, 0.5, 24), np.float32)
  y = onednn.conv(x, w, scale=scale, bias=bias, post_op="relu", out_dtype=jnp.float32, mode="single", **kw)
  np.testing.assert_array_equal(np.asarray(y), np.maximum(np.asarray(want).astype(np.float32) * scale + bias,
                                                          np.float32(0)))
  if not signed:
    small = jnp.minimum(x, 127)
    for pad_channels in (True, False):
      np.testing.assert_array_equal(onednn.conv(small, w, mode="direct", pad_channels=pad_channels, **kw),
                                    _xla_conv(small, w, kw["strides"], kw["padding"], dilation, 1))


REQUANT_CONVS = {  # name: (CONVS entry, mode, sparse large codes)
    "single": ("wide", "single", True),
    "split": ("strided_asymmetric_pad", "split", False),
    "depthwise": ("depthwise", "auto", False),
    "grouped": ("grouped", "auto", True),
    "direct": ("regular", "direct", False),  # u8 codes below 128: exact without VNNI too
}


@needs_onednn
@pytest.mark.parametrize("name", sorted(REQUANT_CONVS))
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("post_op", ["none", "relu", "relu6"])
def test_requantized_output_is_the_next_layers_activation_codes(name, signed, post_op):
  """A uint8/int8 output with a lowering operand holds, bit for bit, the codes
  `integer.activation_codes` computes from the same layer's float32 output (after the post-op):
  the multiplication by the inverse scale, rounding half to even (a power-of-two scale puts many values on .5),
  the 8-bit clip and each lowered channel's 4-bit extraction; for every way the library runs a
  conv, and for the matmul."""
  conv_name, mode, sparse = REQUANT_CONVS[name]
  c, o, kernel, strides, padding, dilation, groups = (WIDE | CONVS)[conv_name]
  rng = np.random.default_rng(len(name) + 7 * signed + len(post_op))
  if mode == "direct":
    x = jnp.asarray(rng.integers(0, 128, (2, 9, 8, c)), jnp.uint8)
  else:
    x = _sparse_large_codes(rng, (2, 9, 8, c), False) if sparse else _codes(rng, (2, 9, 8, c), False, False)
  w = _weights(rng, kernel + (c // groups, o), False)
  scale = np.where(np.arange(o) % 2 == 0, 2.0 ** -8, rng.uniform(1e-3, 4e-3, o)).astype(np.float32)
  bias = np.asarray(rng.normal(0, 0.5, o), np.float32)
  act_scale = np.float32(2.0 ** -4 if signed else 0.05)
  lowered = jnp.asarray(rng.random(o) < 0.5)
  entry = {"act_scale": jnp.asarray(act_scale), "step": jnp.asarray(2.0 ** rng.integers(0, 5, o), jnp.float32)}
  rows = integer.lowering_operand(entry["step"], lowered, signed=signed)
  codes_dtype = jnp.int8 if signed else jnp.uint8
  kw = dict(strides=strides, padding=padding, dilation=dilation, groups=groups, scale=scale, bias=bias,
            post_op=post_op, mode=mode)
  y = onednn.conv(x, w, out_dtype=jnp.float32, **kw)
  codes = onednn.conv(x, w, out_dtype=codes_dtype, dst_scale=act_scale, lowering=rows, **kw)
  want = integer.activation_codes(y, entry, lowered, signed=signed).astype(codes_dtype)
  assert codes.dtype == codes_dtype
  np.testing.assert_array_equal(codes, want)
  assert len(np.unique(np.asarray(codes))) > 8  # a real spread of codes, not all clipped
  if name == "single":  # the matmul, and no lowering (8-bit codes)
    xm, wm = x.reshape(-1, c), w.reshape(-1, o)[:c]
    ym = onednn.matmul(xm, wm, scale=scale, bias=bias, post_op=post_op, out_dtype=jnp.float32, mode="single")
    np.testing.assert_array_equal(
        onednn.matmul(xm, wm, scale=scale, bias=bias, post_op=post_op, out_dtype=codes_dtype, dst_scale=act_scale,
                      lowering=rows, mode="single"),
        integer.activation_codes(ym, entry, lowered, signed=signed).astype(codes_dtype))
    np.testing.assert_array_equal(
        onednn.conv(x, w, out_dtype=codes_dtype, dst_scale=act_scale, **kw),
        integer.activation_codes(y, entry, None, signed=signed).astype(codes_dtype))


def _rounding_ties(scale: np.float32, signed: bool) -> np.ndarray:
  """float32 values within a few ulps of every half code k + 1/2 of the grid of `scale`: where
  round(y * (1/scale)) and round(y / scale) can differ."""
  lo, hi = (-128, 127) if signed else (0, 255)
  out = []
  for k in range(lo - 1, hi + 1):
    y = np.float32((k + 0.5) * np.float64(scale))
    for direction in (-np.inf, np.inf):
      v = y
      for _ in range(4):
        out.append(v)
        v = np.nextafter(v, np.float32(direction))
  return np.unique(np.asarray(out, np.float32))


@needs_onednn
@pytest.mark.parametrize("mode", ["auto", "direct", "single", "split"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("lowering", [False, True])
def test_requantization_multiplies_by_the_inverse_scale_at_rounding_ties(mode, signed, lowering):
  """At values on and next to the rounding ties of the output grid (the layer's float output is its
  bias: zero weights), the codes the kernels write are clip(round(y * (1/s))) with the float32
  inverse, as `integer.activation_codes` computes them, and not round(y / s), which differs at some
  of these ties; with a lowering, the extraction applied to those codes (every other 8-channel
  block lowered, so the library skips the blocks without a lowered channel)."""
  scale = np.float32(0.0137)
  y = _rounding_ties(scale, signed)
  n = y.size // 16 * 16
  y = y[:n]
  qmin, qmax = (-128, 127) if signed else (0, 255)
  by_division = np.clip(np.round(y / scale), qmin, qmax)
  by_inverse = np.clip(np.round(y * (np.float32(1) / scale)), qmin, qmax)
  assert (by_division != by_inverse).sum() > 10  # the two definitions differ here
  codes_dtype = jnp.int8 if signed else jnp.uint8
  x = jnp.zeros((3, 8), jnp.uint8)
  w = jnp.zeros((8, n), jnp.int8)
  lowered = jnp.asarray((np.arange(n) // 8) % 2 == 0) if lowering else None
  entry = {"act_scale": jnp.asarray(scale), "step": jnp.full((n,), 4.0, jnp.float32)}
  rows = integer.lowering_operand(entry["step"], lowered, signed=signed) if lowering else None
  codes = onednn.matmul(x, w, scale=np.ones(n, np.float32), bias=y, out_dtype=codes_dtype, dst_scale=scale,
                        lowering=rows, mode=mode)
  want = integer.activation_codes(jnp.broadcast_to(jnp.asarray(y), (3, n)), entry, lowered, signed=signed)
  np.testing.assert_array_equal(codes, want.astype(codes_dtype))
  if not lowering:
    np.testing.assert_array_equal(np.asarray(codes)[0], by_inverse)


@needs_onednn
@pytest.mark.parametrize("channels", [8, 24, 40, 1000])
@pytest.mark.parametrize("signed", [False, True])
def test_extraction_in_place_for_any_channel_count(channels, signed):
  """The in-place 4-bit extraction of requantized codes takes the codes as a flat array whose
  channel pattern repeats (few channels: several rows per vector; a last period cut short when
  the rows do not fill it; a long period falls back to the row-by-row pass): the codes equal
  `integer.activation_codes` of the float output for 7 rows of 8, 24, 40 and 1000 channels."""
  rng = np.random.default_rng(channels + signed)
  x = jnp.asarray(rng.integers(0, 256, (7, 32)), jnp.uint8)
  w = jnp.asarray(rng.integers(-128, 128, (32, channels)), jnp.int8)
  scale = jnp.full((channels,), 1e-5, jnp.float32)
  bias = jnp.asarray(rng.normal(0, 0.5, channels), jnp.float32)
  lowered = jnp.asarray(rng.random(channels) < 0.4)
  entry = {"act_scale": jnp.float32(0.01), "step": jnp.asarray(2.0 ** rng.integers(0, 5, channels), jnp.float32)}
  rows = integer.lowering_operand(entry["step"], lowered, signed=signed)
  codes_dtype = jnp.int8 if signed else jnp.uint8
  y = onednn.matmul(x, w, scale=scale, bias=bias, out_dtype=jnp.float32)
  codes = onednn.matmul(x, w, scale=scale, bias=bias, out_dtype=codes_dtype, dst_scale=entry["act_scale"],
                        lowering=rows)
  np.testing.assert_array_equal(codes, integer.activation_codes(y, entry, lowered, signed=signed).astype(codes_dtype))
  assert len(np.unique(np.asarray(codes))) > 8


def test_layer_edges_find_the_layers_that_feed_a_layer_through_an_activation(setup):
  """SmallNet: stem -> ReLU -> dw -> ReLU -> grouped -> ReLU -> conv (a folded BatchNorm between
  some); conv -> mean -> fc1 and fc1 -> GELU -> head are no edges (a mean, an activation other than
  ReLU/ReLU6)."""
  from flexiq_jax import interception
  variables = {k: v for k, v in setup.qvars.items() if k in ("params", "batch_stats")}
  edges = interception.layer_edges(setup.model, setup.plan, variables, setup.images)
  assert edges == {"dw": ("stem", "relu"), "grouped": ("dw", "relu"), "conv": ("grouped", "relu")}


@needs_onednn
def test_requant_fusion_keeps_the_logits_bit_for_bit(setup):
  """With fuse_requant (the default) the producers of the edges write their consumers' codes
  (lowered targets in the module, no float between them); the logits equal those of the model
  without it bit for bit at every ratio, with one compilation."""
  qmodel = _onednn_model(setup)
  svars = jax.jit(qmodel.prepare)(setup.qvars)
  assert qmodel.requant_edges(svars, setup.images) == {"stem": ("dw", "relu"), "dw": ("grouped", "relu"),
                                                       "grouped": ("conv", "relu")}
  fused, plain = jax.jit(qmodel.apply), jax.jit(dataclasses.replace(qmodel, fuse_requant=False).apply)
  assert fused.lower(svars, setup.images, 0.0).as_text().count(onednn.CONV_LOWERED_TARGET) == 3
  assert onednn.CONV_LOWERED_TARGET not in plain.lower(svars, setup.images, 0.0).as_text()
  with serve.count_compilations() as compiled:
    outs = [fused(svars, setup.images, jnp.float32(r)) for r in RATIOS]
  assert compiled.count == 1
  for r, out in zip(RATIOS, outs):
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_array_equal(out, plain(svars, setup.images, jnp.float32(r)))


@pytest.fixture(scope="module")
def residual_setup():
  """A small ResNet (`ResidualAdd` blocks, identity and downsampling shortcuts) quantized on random
  images: (model, qvars, images)."""
  from flexiq_jax import api, models
  model = models.create("resnet18", num_classes=10, **models.small_kwargs("resnet18", 16))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(4, 16, 16, 1)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), images)
  qmodel, qvars = api.quantize_model(model, variables, np.asarray(images), selector="greedy", calib_batch_size=4)
  return dataclasses.replace(qmodel, conv_impls="onednn", dense_impl="onednn"), qvars, images


@needs_onednn
def test_residual_fusion_keeps_the_logits_bit_for_bit(residual_setup):
  """With fuse_residual (the default) each block's sum is written by a conv's kernel (the conv
  run again with the shortcut as its addend; XLA drops the first run: as many oneDNN calls as
  without it), and where a quantized conv reads the sum (the next stage's first conv) the same
  kernel writes that conv's codes too; the logits equal those of the model without either bit for
  bit at every ratio, with one compilation."""
  qmodel, qvars, images = residual_setup
  svars = jax.jit(qmodel.prepare)(qvars)
  assert qmodel.residual_edges(svars, images) == {0: "layer2_0/conv1", 1: "layer3_0/conv1", 2: "layer4_0/conv1"}
  assert dataclasses.replace(qmodel, fuse_requant=False).residual_edges(svars, images) == {}
  fused, plain = jax.jit(qmodel.apply), jax.jit(dataclasses.replace(qmodel, fuse_residual=False).apply)
  sums_only = jax.jit(dataclasses.replace(qmodel, fuse_requant=False).apply)
  fused_hlo = fused.lower(svars, images, 0.0).compile().as_text()
  plain_hlo = plain.lower(svars, images, 0.0).compile().as_text()
  blocks = 4  # one block per stage in the small ResNet-18; the last sum feeds the pool, not a conv
  assert fused_hlo.count(f'"{onednn.CONV_ADD_CODES_TARGET}"') == blocks - 1
  assert fused_hlo.count(f'"{onednn.CONV_ADD_TARGET}"') == 1
  assert onednn.CONV_ADD_TARGET not in plain_hlo
  calls = lambda text: text.count('custom_call_target="flexiq_onednn')
  assert calls(fused_hlo) == calls(plain_hlo) > blocks
  with serve.count_compilations() as compiled:
    outs = [fused(svars, images, jnp.float32(r)) for r in RATIOS]
  assert compiled.count == 1
  for r, out in zip(RATIOS, outs):
    np.testing.assert_array_equal(out, plain(svars, images, jnp.float32(r)))
    np.testing.assert_array_equal(out, sums_only(svars, images, jnp.float32(r)))
  assert not np.array_equal(outs[0], outs[-1])


@needs_onednn
@pytest.mark.parametrize("mode", ["auto", "direct", "single", "split"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("post_op", ["none", "relu", "relu6"])
def test_stream_sum_adds_the_shortcut_codes_as_the_xla_arithmetic_does(mode, signed, post_op):
  """A conv with a residual shortcut on the 8-bit stream (`shortcut_codes`) writes the sum's codes
  equal to the XLA arithmetic of `layer_ops.residual_stream` on the conv's float output, bit for bit
  (oneDNN's post-ops compute ((y * (1/s)) + q) * s with each step rounded, as XLA does), and the
  reader's codes with its 4-bit extraction; at rounding ties of the sum too; a float32 shortcut is
  the plain sum."""
  from flexiq_jax import layer_ops
  rng = np.random.default_rng(7)
  dtype = jnp.int8 if signed else jnp.uint8
  x = _codes(rng, (2, 9, 9, 16), signed, False)
  w = _weights(rng, (3, 3, 16, 24), False)
  scale = jnp.asarray(rng.uniform(2e-4, 4e-4, 24), jnp.float32)
  bias = jnp.asarray(rng.normal(size=24), jnp.float32)
  shortcut = _codes(rng, (2, 9, 9, 24), signed, False)
  s_short, s_out = np.float32(0.0625), np.float32(0.046875)  # powers-of-two multiples: many exact ties
  kw = dict(padding=((1, 1), (1, 1)), scale=scale, bias=bias, mode=mode)
  y = onednn.conv(x, w, out_dtype=jnp.float32, **kw)
  y = jnp.clip(y, -6, 6) if post_op == "relu6" else y  # relu6 is not a residual activation: checked by hand
  act = "relu" if post_op == "relu" else "none"
  _, want = layer_ops.residual_stream(y, None, act, s_out, signed=signed, ste=False,
                                      shortcut_stream=(shortcut, s_short))
  if post_op == "relu6":
    total = layer_ops.stream_sum(onednn.conv(x, w, out_dtype=jnp.float32, **kw), shortcut, s_short)
    qmin, qmax = (-128, 127) if signed else (0, 255)
    want = jnp.clip(jnp.round(jnp.clip(total, 0.0, 6.0) * (1.0 / s_out)), qmin, qmax)
  lowered = jnp.arange(24) % 3 == 0
  step = jnp.full((24,), 16.0)
  codes, reader = onednn.conv(x, w, post_op=post_op, out_dtype=dtype, dst_scale=s_out, shortcut_codes=shortcut,
                              shortcut_scale=s_short,
                              lowering=integer.lowering_operand(step, lowered, signed=signed), **kw)
  assert codes.dtype == reader.dtype == dtype
  np.testing.assert_array_equal(np.asarray(codes, np.int32), np.asarray(want, np.int32))
  entry = {"act_scale": jnp.float32(1.0), "step": step}
  np.testing.assert_array_equal(np.asarray(reader, np.int32), np.asarray(
      integer.activation_codes(codes.astype(jnp.float32), entry, lowered, signed=signed), np.int32))
  assert not np.array_equal(np.asarray(codes), np.asarray(reader))
  if post_op != "relu6":  # a float shortcut (not on the stream): the plain float32 sum
    values = jnp.asarray(rng.normal(size=(2, 9, 9, 24)), jnp.float32)
    _, want = layer_ops.residual_stream(y, values, act, s_out, signed=signed, ste=False)
    got, _ = onednn.conv(x, w, post_op=post_op, out_dtype=dtype, dst_scale=s_out, shortcut_codes=values, **kw)
    np.testing.assert_array_equal(np.asarray(got, np.int32), np.asarray(want, np.int32))
  with pytest.raises(ValueError, match="shortcut codes"):
    onednn.conv(x, w, out_dtype=jnp.float32, shortcut_codes=shortcut, shortcut_scale=s_short, **kw)


@pytest.fixture(scope="module")
def stream_setup():
  """A small ResNet with two blocks in its first stages (identity shortcuts reading a stream sum)
  quantized on random images, with the 8-bit residual stream: (qmodel, qvars, images)."""
  from flexiq_jax import api, models
  model = models.create("resnet18", num_classes=10, **{**models.small_kwargs("resnet18", 16), "depths": (2, 2, 1, 1)})
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 16, 16, 1)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), images)
  qmodel, qvars = api.quantize_model(model, variables, np.asarray(images), selector="greedy", calib_batch_size=8)
  return dataclasses.replace(qmodel, residual_codes=True), qvars, images


def test_residual_stream_is_the_same_arithmetic_in_every_integer_form(stream_setup):
  """With `residual_codes`, each sum a conv reads is kept on that conv's 8-bit grid: the XLA
  integer path equals the reference path bit for bit at every ratio, the fake path is within float
  rounding of it, and the sums' rounding changes the numerics (the stream is not the float32 one)."""
  qmodel, qvars, images = stream_setup
  assert qmodel.stream_edges(qvars, images) == {0: "layer1_1/conv1", 1: "layer2_0/conv1", 2: "layer2_1/conv1",
                                                3: "layer3_0/conv1", 4: "layer4_0/conv1"}
  assert dataclasses.replace(qmodel, residual_codes=False).stream_edges(qvars, images) == {}
  reference = jax.jit(qmodel.with_mode("int_reference").apply)
  xla = jax.jit(dataclasses.replace(qmodel, conv_impls="int8").apply)
  fake = jax.jit(qmodel.with_mode("fake").apply)
  for r in RATIOS:
    want = reference(qvars, images, r)
    np.testing.assert_array_equal(xla(qvars, images, r), want)
    np.testing.assert_allclose(fake(qvars, images, r), want, rtol=1e-4, atol=1e-6)
  rounded = _block_sums(qmodel.with_mode("int_reference"), qvars, images, 5)
  floats = _block_sums(dataclasses.replace(qmodel, residual_codes=False, mode="int_reference"), qvars, images, 5)
  steps = [float(jnp.reshape(get_path(qvars["quant"], p)["act_scale"], ()))
           for p in qmodel.stream_edges(qvars, images).values()]
  assert len(rounded) == len(floats) == len(steps) == 5
  for value, step in zip(rounded, steps):  # on the grid: integer multiples of the step
    np.testing.assert_allclose(np.asarray(value) / step, np.round(np.asarray(value) / step), atol=1e-3)
  assert all(not np.array_equal(a, b) for a, b in zip(rounded, floats))


def _block_sums(qmodel, qvars, images, count: int, total: int = 6):
  """The values the model's first `count` `ResidualAdd`s (of `total`) return at ratio 0 (the
  stream's, where it is on); the stream edges' abstract trace sees every sum first."""
  import flax.linen as nn
  from flexiq_jax.models.layers import ResidualAdd

  def run(v, x):
    sums = []

    def keep(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, ResidualAdd) and context.method_name == "__call__":
        sums.append(out)
      return out
    with nn.intercept_methods(keep):
      qmodel.apply(v, x, 0.0)
    return sums[-total:][:count]
  return jax.jit(run)(qvars, images)


@needs_onednn
def test_residual_stream_on_onednn_keeps_the_logits_of_the_xla_integer_path(stream_setup):
  """On oneDNN the conv before each stream sum writes the stream's codes and the reader's codes
  beside them (`CONV_STREAM_TARGET`; the shortcut's codes added inside the kernel where the shortcut
  is on the stream, a float shortcut added after it): the logits equal the XLA integer path's bit
  for bit at every ratio, with one compilation."""
  qmodel, qvars, images = stream_setup
  dnn = dataclasses.replace(qmodel, conv_impls="onednn", dense_impl="onednn")
  svars = jax.jit(dnn.prepare)(qvars)
  apply = jax.jit(dnn.apply)
  hlo = apply.lower(svars, images, 0.0).compile().as_text()
  assert hlo.count(f'"{onednn.CONV_STREAM_TARGET}"') == 5  # every stream sum; the last sum feeds the pool
  xla = jax.jit(dataclasses.replace(qmodel, conv_impls="int8").apply)
  with serve.count_compilations() as compiled:
    outs = [apply(svars, images, jnp.float32(r)) for r in RATIOS]
  assert compiled.count == 1
  for r, out in zip(RATIOS, outs):
    np.testing.assert_array_equal(out, xla(qvars, images, r))
  assert not np.array_equal(outs[0], outs[-1])
