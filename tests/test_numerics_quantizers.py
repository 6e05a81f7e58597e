"""Property tests for flexiq_jax.numerics.quantizers: grids, (fake) quantization, STE, LSQ, scales."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexiq_jax import numerics

SETTINGS = settings(max_examples=30, deadline=None)
SHAPE = (3, 5, 4)  # fixed shapes keep XLA compilations (and test time) down

modes = st.sampled_from([(True, True), (True, False), (False, True), (False, False)])  # (symmetric, signed)


def _data(seed, symmetric, signed, constant_channels=False):
  """Random data matching the mode (non-negative for symmetric unsigned), with wildly different
  per-channel magnitudes along axis 1, and optionally some constant / all-zero channels."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=SHAPE) * np.exp(rng.uniform(-4, 4, size=(1, SHAPE[1], 1)))
  x = x + rng.normal(size=(1, SHAPE[1], 1)) * np.exp(rng.uniform(-4, 2))
  if symmetric and not signed:
    x = np.abs(x)
  if constant_channels:
    x[:, 0, :] = 0.0
    x[:, 1, :] = abs(x[0, 1, 0]) if (symmetric and not signed) else x[0, 1, 0]
  return x.astype(np.float32)


def test_int_range():
  assert numerics.int_range(8, True) == (-128, 127)
  assert numerics.int_range(8, True, narrow=True) == (-127, 127)
  assert numerics.int_range(8, False) == (0, 255)
  assert numerics.int_range(8, False, narrow=True) == (0, 255)
  assert numerics.int_range(4, True) == (-8, 7)
  assert numerics.int_range(4, False) == (0, 15)
  assert numerics.int_range(1, False) == (0, 1)
  with pytest.raises(ValueError):
    numerics.int_range(0, True)


def test_round_ste_half_to_even_and_identity_grad():
  x = jnp.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 0.51])
  np.testing.assert_array_equal(numerics.round_ste(x), [-2, -2, -0, 0, 2, 2, 0, 1])
  np.testing.assert_array_equal(jax.grad(lambda v: numerics.round_ste(v).sum())(x), np.ones(8))
  np.testing.assert_array_equal(jax.jit(numerics.round_ste)(x), jnp.round(x))


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), mode=modes, bits=st.sampled_from([2, 4, 8]),
       per_channel=st.booleans(), narrow=st.booleans())
def test_roundtrip_error_at_most_half_step(seed, mode, bits, per_channel, narrow):
  symmetric, signed = mode
  x = _data(seed, symmetric, signed)
  axis = 1 if per_channel else None
  lo, hi = numerics.minmax_range(x, axis)
  scale, zp = numerics.scale_from_range(lo, hi, bits, symmetric, signed, narrow)
  qmin, qmax = numerics.int_range(bits, signed, narrow)
  codes = numerics.quantize(x, scale, zp, qmin, qmax, axis=axis)
  assert np.all(codes == np.round(codes)) and codes.min() >= qmin and codes.max() <= qmax
  back = numerics.dequantize(codes, scale, zp, axis=axis)
  step = np.asarray(numerics.expand_to_axis(scale, x.ndim, axis))
  err = np.abs(np.asarray(back) - x)
  assert np.all(err <= 0.5 * step * (1 + 1e-5) + 1e-6 * np.abs(x)), err.max()
  # fake_quant is the same forward pass.
  np.testing.assert_array_equal(numerics.fake_quant(x, scale, zp, qmin, qmax, axis=axis), back)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2, 4, 8]), signed=st.booleans(),
       log_scale=st.floats(-6, 3), zp_frac=st.floats(0, 1), per_channel=st.booleans())
def test_fake_quant_idempotent(seed, bits, signed, log_scale, zp_frac, per_channel):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=SHAPE) * 10.0 ** rng.uniform(-6, 4)).astype(np.float32)  # clipping included
  qmin, qmax = numerics.int_range(bits, signed)
  if per_channel:
    scale = (10.0 ** (log_scale + rng.uniform(-1, 1, size=SHAPE[-1]))).astype(np.float32)
    zp = rng.integers(qmin, qmax + 1, size=SHAPE[-1]).astype(np.float32)
  else:
    scale = np.float32(10.0 ** log_scale)
    zp = np.float32(np.round(qmin + zp_frac * (qmax - qmin)))
  once = numerics.fake_quant(x, scale, zp, qmin, qmax)
  np.testing.assert_array_equal(numerics.fake_quant(once, scale, zp, qmin, qmax), once)
  lsq_once = numerics.lsq_fake_quant(x, scale, qmin, qmax)
  np.testing.assert_array_equal(numerics.lsq_fake_quant(lsq_once, scale, qmin, qmax), lsq_once)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), mode=modes, bits=st.sampled_from([2, 4, 8]),
       per_channel=st.booleans(), value=st.sampled_from([0.0, 1e-12, 3e-7, 0.37, -2.5, 1e5]))
def test_zero_and_constant_tensors(seed, mode, bits, per_channel, value):
  """All-zero and constant tensors/channels: positive finite scales, no NaN, reconstruction
  within half a step (and a constant is reproduced to float roundoff)."""
  symmetric, signed = mode
  if symmetric and not signed:
    value = abs(value)
  axis = 1 if per_channel else None
  if per_channel:
    x = _data(seed, symmetric, signed, constant_channels=True)
    x[:, 2, :] = value
  else:
    x = np.full(SHAPE, value, np.float32)
  qmin, qmax = numerics.int_range(bits, signed)
  lo, hi = numerics.minmax_range(x, axis)
  scale, zp = numerics.scale_from_range(lo, hi, bits, symmetric, signed)
  assert np.all(np.isfinite(scale)) and np.all(np.asarray(scale) > 0) and np.all(np.isfinite(zp))
  back = np.asarray(numerics.fake_quant(x, scale, zp, qmin, qmax, axis=axis))
  assert np.all(np.isfinite(back))
  step = np.asarray(numerics.expand_to_axis(scale, x.ndim, axis))
  assert np.all(np.abs(back - x) <= 0.5 * step * (1 + 1e-5) + 1e-6 * np.abs(x))
  const = x[:, 2, :] if per_channel else x
  np.testing.assert_allclose(back[:, 2, :] if per_channel else back, const, rtol=1e-5, atol=1e-12)
  if per_channel:
    np.testing.assert_array_equal(back[:, 0, :], 0.0)  # the all-zero channel


def test_scale_from_range_formulas():
  s, z = numerics.scale_from_range(-3.0, 5.0, 8, symmetric=True, signed=True)
  assert np.isclose(s, 5.0 / 127) and z == 0
  s, z = numerics.scale_from_range(-3.0, 5.0, 8, symmetric=True, signed=True, narrow=True)
  assert np.isclose(s, 5.0 / 127) and z == 0
  s, z = numerics.scale_from_range(0.0, 6.0, 8, symmetric=True, signed=False)
  assert np.isclose(s, 6.0 / 255) and z == 0
  s, z = numerics.scale_from_range(-1.0, 3.0, 8, symmetric=False, signed=False)
  assert np.isclose(s, 4.0 / 255) and z == np.round(0 + 1.0 / (4.0 / 255))
  s, z = numerics.scale_from_range(-1.0, 3.0, 8, symmetric=False, signed=True)
  assert np.isclose(s, 4.0 / 255) and z == np.round(-128 + 1.0 / (4.0 / 255))
  # A range away from zero is widened to contain it (zero point stays on the grid).
  s, z = numerics.scale_from_range(2.0, 3.0, 4, symmetric=False, signed=True)
  assert np.isclose(s, 3.0 / 15) and z == -8
  # Per-channel vectors broadcast.
  s, z = numerics.scale_from_range(jnp.array([-1.0, 0.0]), jnp.array([1.0, 0.0]), 8, True, True)
  assert s.shape == (2,) and np.isclose(s[0], 1 / 127) and 0 < s[1] < 1e-9


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2, 4, 8]), signed=st.booleans(),
       per_channel=st.booleans())
def test_fake_quant_clipped_ste_gradient(seed, bits, signed, per_channel):
  rng = np.random.default_rng(seed)
  qmin, qmax = numerics.int_range(bits, signed)
  scale = (np.exp(rng.uniform(-3, 1, size=SHAPE[-1])) if per_channel else np.exp(rng.uniform(-3, 1)))
  scale = np.asarray(scale, np.float32)
  zp = np.float32(rng.integers(qmin, qmax + 1)) if not signed else np.float32(0)
  v = rng.uniform(qmin - 3, qmax + 3, size=SHAPE)
  v = np.where(np.abs(v - qmin) < 1e-2, v - 0.5, v)  # keep away from the boundaries
  v = np.where(np.abs(v - qmax) < 1e-2, v + 0.5, v)
  x = ((v - zp) * scale).astype(np.float32)
  inside = (v >= qmin) & (v <= qmax)
  grad = jax.jit(jax.grad(lambda x: numerics.fake_quant(x, scale, zp, qmin, qmax).sum()))(x)
  np.testing.assert_allclose(grad, inside.astype(np.float32), rtol=1e-6, atol=0)


def _lsq_reference_scale_grad(x, s, qmin, qmax, g, upstream):
  """LSQ (Esser et al. 2020, eq. 3) evaluated in float64 numpy."""
  v = x.astype(np.float64) / s
  local = np.where(v <= qmin, qmin, np.where(v >= qmax, qmax, np.round(v) - v))
  return local * upstream * g


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_gradients_match_formula(signed, per_channel):
  rng = np.random.default_rng(7)
  qmin, qmax = numerics.int_range(4, signed)
  x = rng.normal(size=(6, 3)).astype(np.float32) * 2.0
  if not signed:
    x = np.abs(x) - 0.3  # some negatives clip to 0
  upstream = rng.normal(size=x.shape).astype(np.float32)
  s = np.array([0.31, 0.17, 0.45], np.float32) if per_channel else np.float32(0.23)

  def loss(x, s, g=None):
    return (numerics.lsq_fake_quant(x, s, qmin, qmax, g) * upstream).sum()

  gx, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, s)
  num_scales = np.size(s)
  g_default = 1.0 / np.sqrt(x.size / num_scales * qmax)
  ref = _lsq_reference_scale_grad(x, s, qmin, qmax, g_default, upstream)
  ref = ref.sum(axis=0) if per_channel else ref.sum()
  np.testing.assert_allclose(gs, ref, rtol=1e-4, atol=1e-5)
  v = x / s
  np.testing.assert_allclose(gx, upstream * ((v >= qmin) & (v <= qmax)), rtol=1e-6)
  # An explicit gradient scale multiplies the scale's gradient only.
  gx2, gs2 = jax.grad(loss, argnums=(0, 1))(x, s, 0.5)
  np.testing.assert_allclose(gs2, ref / g_default * 0.5, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gx2, gx, rtol=1e-6)
  # Forward equals symmetric fake_quant.
  np.testing.assert_array_equal(numerics.lsq_fake_quant(x, s, qmin, qmax), numerics.fake_quant(x, s, 0.0, qmin, qmax))


def test_lsq_hand_example():
  """x/s = -6..6 on a [-4, 3] grid: inside, round(v) - v = 0; outside, -4 -4 and 3 3 3."""
  x = jnp.linspace(-3.0, 3.0, 13)
  gs = jax.grad(lambda s: numerics.lsq_fake_quant(x, s, -4, 3, grad_scale=1.0).sum())(0.5)
  assert np.isclose(gs, -8.0 + 9.0)
  x = jnp.array([0.26, 0.6, 2.0])  # v = 0.52, 1.2, 4 (clipped to 3); g = 1
  gs = jax.grad(lambda s: numerics.lsq_fake_quant(x, s, -4, 3, grad_scale=1.0).sum())(0.5)
  assert np.isclose(gs, (1 - 0.52) + (1 - 1.2) + 3.0, atol=1e-6)


def test_quantizers_jit_and_axis_argument():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4)).astype(np.float32)
  s = np.array([0.1, 0.2, 0.3], np.float32)
  z = np.array([0.0, 3.0, -2.0], np.float32)
  qmin, qmax = numerics.int_range(8, True)
  codes = jax.jit(numerics.quantize, static_argnames="axis")(x, s, z, qmin, qmax, axis=1)
  np.testing.assert_array_equal(codes, numerics.quantize(x, s[:, None], z[:, None], qmin, qmax))
  back = jax.jit(numerics.dequantize, static_argnames="axis")(codes, s, z, axis=1)
  np.testing.assert_array_equal(back, numerics.dequantize(codes, s[:, None], z[:, None]))
  fq = jax.jit(numerics.fake_quant, static_argnames="axis")(x, s, z, qmin, qmax, axis=-2)
  np.testing.assert_array_equal(fq, back)
  lsq = jax.jit(numerics.lsq_fake_quant, static_argnames="axis")(x, s, qmin, qmax, axis=1)
  np.testing.assert_array_equal(lsq, numerics.fake_quant(x, s, 0.0, qmin, qmax, axis=1))
  sc, zp = jax.jit(numerics.scale_from_range, static_argnums=(2, 3, 4))(-1.0, 2.0, 8, False, True)
  np.testing.assert_allclose(sc, 3.0 / 255)
  assert zp == np.round(-128 + 1.0 / (3.0 / 255))


# -- per-output-channel weight scales and traced bit widths (moved here from quantize/layerwise) --

def test_per_channel_weight_scale_is_absmax_over_all_but_last_axis_without_gradient():
  w = np.array([[[1.0, -0.2], [-3.0, 0.1]], [[0.5, 0.0], [2.0, 0.0]]], np.float32)  # (2, 2, O=2)
  np.testing.assert_allclose(numerics.per_channel_weight_scale(w), [3.0 / 127, 0.2 / 127], rtol=1e-6)
  np.testing.assert_allclose(numerics.per_channel_weight_scale(w, qmax=7), [3.0 / 7, 0.2 / 7], rtol=1e-6)
  # An all-zero output channel gets the floor scale, not 0 (no division by zero downstream).
  zero = numerics.per_channel_weight_scale(np.zeros((3, 2), np.float32))
  np.testing.assert_allclose(zero, numerics.MIN_RANGE / numerics.WEIGHT_QMAX_8BIT)
  assert numerics.WEIGHT_QMAX_8BIT == 127
  grad = jax.grad(lambda v: numerics.per_channel_weight_scale(v).sum())(jnp.asarray(w))
  np.testing.assert_array_equal(grad, np.zeros_like(w))


def test_traced_int_range_matches_int_range_and_floors_at_two_bits():
  for bits in (2, 3, 4, 8, 16):
    for signed in (True, False):
      lo, hi = numerics.traced_int_range(jnp.int32(bits), signed)
      assert (float(lo), float(hi)) == numerics.int_range(bits, signed), (bits, signed)
  for bits in (0, 1):  # widths below 2 act as 2
    assert tuple(map(float, numerics.traced_int_range(jnp.int32(bits), True))) == (-2.0, 1.0)
    assert tuple(map(float, numerics.traced_int_range(jnp.int32(bits), False))) == (0.0, 3.0)


def test_fake_quant_traced_bits_equals_static_fake_quant_with_one_compilation():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 6)).astype(np.float32) * 2
  w = rng.normal(size=(5, 3)).astype(np.float32)
  w_clip = np.abs(w).max(0)
  traces = []

  @jax.jit
  def act(x, bits):
    traces.append(1)
    return numerics.fake_quant_traced_bits(x, 2.5, bits, True)

  for bits in (2, 4, 8):
    qmin, qmax = numerics.int_range(bits, True)
    ref = numerics.fake_quant(x, 2.5 / qmax, 0.0, qmin, qmax)
    np.testing.assert_allclose(act(x, jnp.int32(bits)), ref, rtol=1e-6, atol=1e-7)
    # Unsigned: [0, clip] on 2^b - 1 steps.
    _, uq = numerics.int_range(bits, False)
    np.testing.assert_allclose(numerics.fake_quant_traced_bits(np.abs(x), 2.5, jnp.int32(bits), False),
                               numerics.fake_quant(np.abs(x), 2.5 / uq, 0.0, 0, uq), rtol=1e-6, atol=1e-7)
    # Weights: narrow symmetric grid per output channel (the last axis).
    nq = 2 ** (bits - 1) - 1
    got = numerics.fake_quant_weight_traced_bits(w, w_clip, jnp.int32(bits))
    np.testing.assert_allclose(got, numerics.fake_quant(w, w_clip / nq, 0.0, -nq, nq, axis=1), rtol=1e-6,
                               atol=1e-7)
  assert len(traces) == 1
  # At 2 bits the narrow weight grid is {-1, 0, 1} x clip.
  w2 = np.asarray(numerics.fake_quant_weight_traced_bits(w, w_clip, jnp.int32(2)))
  assert set(np.unique(np.round(w2 / w_clip, 6))) <= {-1.0, 0.0, 1.0}
