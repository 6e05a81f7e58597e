"""Property tests for flexiq_jax.numerics.extraction: FlexiQ's 8 -> 4-bit lowering and its fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexiq_jax import numerics

SETTINGS = settings(max_examples=30, deadline=None)
C, N = 6, 64  # codes are (N, C): channel axis 1 (or -1)
CANDIDATES = (0, 1, 2, 3, 4)


def _codes(seed, signed, dtype=np.float32):
  """8-bit codes whose channels use very different parts of the grid: small-range channels
  (where keeping low bits wins), full-range ones, sparse outliers, an all-zero channel."""
  rng = np.random.default_rng(seed)
  qmin, qmax = numerics.int_range(8, signed)
  spread = 2.0 ** rng.uniform(0, 8, size=C)
  x = rng.laplace(size=(N, C)) * spread if signed else rng.exponential(size=(N, C)) * spread
  q = np.clip(np.round(x), qmin, qmax)
  q[:, 0] = 0  # an all-zero channel
  return q.astype(dtype)


def _reference_lower(q, e, signed):
  """Integer reference: floor(q / 2^e + 1/2) by Python integer arithmetic, clip, shift back."""
  lo4, hi4 = numerics.int_range(4, signed)
  q = np.asarray(q, np.int64)
  e = np.broadcast_to(np.asarray(e, np.int64), q.shape)
  kept = np.floor_divide(2 * q + (1 << e), 1 << (e + 1))  # = floor((q + 2^(e-1)) / 2^e), exact
  return np.clip(kept, lo4, hi4) << e


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), signed=st.booleans(),
       dtype=st.sampled_from([np.float32, np.int32, "int8_or_uint8", jnp.bfloat16]))
def test_lower_codes_range_multiple_and_reference(seed, signed, dtype):
  """Output inside int8 (uint8), a multiple of 2^e, inside [lo4, hi4] * 2^e, equal to the integer
  reference, for every dtype the codes may come in."""
  if dtype == "int8_or_uint8":
    dtype = np.int8 if signed else np.uint8
  q = _codes(seed, signed, np.float32)
  e = np.random.default_rng(seed + 1).integers(0, 5, size=C).astype(np.int32)
  out = numerics.lower_codes(jnp.asarray(q).astype(dtype), e, signed, axis=1)
  assert out.dtype == jnp.dtype(dtype)
  out = np.asarray(out.astype(jnp.float32)).astype(np.int64)
  qmin, qmax = numerics.int_range(8, signed)
  lo4, hi4 = numerics.int_range(4, signed)
  assert out.min() >= qmin and out.max() <= qmax
  assert np.all(out % (1 << e) == 0)
  assert np.all(out >= lo4 * (1 << e)) and np.all(out <= hi4 * (1 << e))
  np.testing.assert_array_equal(out, _reference_lower(q, e, signed))


def test_lower_codes_hand_values():
  q = jnp.array([-128, -9, -8, -3, -2, -1, 0, 1, 2, 3, 7, 8, 24, 127], jnp.float32)
  np.testing.assert_array_equal(numerics.lower_codes(q, 0, True), [-8, -8, -8, -3, -2, -1, 0, 1, 2, 3, 7, 7, 7, 7])
  # e = 1: round half up (-3/2 -> -1, -1/2 -> 0, 3/2 -> 2), saturate to [-16, 14].
  np.testing.assert_array_equal(numerics.lower_codes(q, 1, True),
                                [-16, -8, -8, -2, -2, 0, 0, 2, 2, 4, 8, 8, 14, 14])
  np.testing.assert_array_equal(numerics.lower_codes(q, 4, True),
                                [-128, -16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 32, 112])
  u = jnp.array([0, 7, 8, 15, 16, 255], jnp.uint8)
  np.testing.assert_array_equal(numerics.lower_codes(u, 4, False), [0, 0, 16, 16, 16, 240])
  np.testing.assert_array_equal(numerics.lower_codes(u, 0, False), [0, 7, 8, 15, 15, 15])


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), signed=st.booleans())
def test_e0_is_exact_on_4bit_codes(seed, signed):
  lo4, hi4 = numerics.int_range(4, signed)
  q = np.random.default_rng(seed).integers(lo4, hi4 + 1, size=(N, C)).astype(np.float32)
  np.testing.assert_array_equal(numerics.lower_codes(q, 0, signed), q)
  np.testing.assert_array_equal(numerics.lowering_error(q, 0, 1, signed), np.zeros(C))


def test_lower_codes_axis_argument_equals_preshaped_e():
  q = _codes(3, True).reshape(4, 16, C)
  e = np.arange(C, dtype=np.int32) % 5
  np.testing.assert_array_equal(numerics.lower_codes(q, e, True, axis=-1), numerics.lower_codes(q, e, True))
  qt = np.moveaxis(q, -1, 0)
  np.testing.assert_array_equal(numerics.lower_codes(qt, e, True, axis=0),
                                numerics.lower_codes(qt, e[:, None, None], True))


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), signed=st.booleans())
def test_fit_never_worse_than_naive_or_any_fixed_e(seed, signed):
  q = _codes(seed, signed)
  e = numerics.fit_extraction(q, 1, signed, CANDIDATES)
  fitted = np.asarray(numerics.lowering_error(q, e, 1, signed))
  naive = np.asarray(numerics.lowering_error(q, jnp.full((C,), 4, jnp.int32), 1, signed))  # drop the 4 low bits
  assert np.all(fitted <= naive)
  for fixed in CANDIDATES:
    assert np.all(fitted <= np.asarray(numerics.lowering_error(q, fixed, 1, signed)))
  # The fit is exactly the per-channel argmin of the brute-force errors (smallest e on ties).
  ref_err = np.stack([((q - _reference_lower(q, c, signed)) ** 2).sum(0) for c in CANDIDATES])
  np.testing.assert_array_equal(e, np.argmin(ref_err, axis=0))
  np.testing.assert_array_equal(fitted, ref_err.min(axis=0))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), signed=st.booleans(), weighted=st.booleans(),
       candidates=st.sampled_from([CANDIDATES, (4, 0, 2), (2,)]))
def test_histogram_fit_equals_direct_fit(seed, signed, weighted, candidates):
  q = _codes(seed, signed)
  # Integer weights per element keep every sum exact, so the two fits must agree bit for bit.
  w = np.random.default_rng(seed).integers(1, 5, size=(N, 1)).astype(np.float32) if weighted else None
  direct = numerics.fit_extraction(q, 1, signed, candidates, weights=w)
  hist = numerics.code_histogram(q, 1, signed, weights=w)
  assert hist.shape == (C, 256)
  from_hist = numerics.fit_extraction_from_histogram(hist, signed, candidates)
  np.testing.assert_array_equal(direct, from_hist)
  assert set(np.asarray(direct).tolist()) <= set(candidates)
  per_candidate = np.asarray(numerics.extraction_errors_from_histogram(hist, signed, candidates))
  chosen = np.asarray([candidates.index(e) for e in np.asarray(direct)])
  np.testing.assert_array_equal(per_candidate[chosen, np.arange(C)],
                                numerics.lowering_error(q, direct, 1, signed, weights=w))


def test_histogram_fit_accumulates_over_batches():
  q = _codes(11, False)
  hist = sum(numerics.code_histogram(b, -1, False) for b in np.split(q, 4))
  np.testing.assert_array_equal(hist, numerics.code_histogram(q, -1, False))
  assert hist.dtype == jnp.int32 and np.all(hist.sum(1) == N)
  np.testing.assert_array_equal(numerics.fit_extraction_from_histogram(hist, False),
                                numerics.fit_extraction(q, -1, False))
  # bin k <-> code qmin + k
  h = numerics.code_histogram(jnp.array([[-128.0], [0.0], [127.0], [127.0]]), 1, True)
  assert h[0, 0] == 1 and h[0, 128] == 1 and h[0, 255] == 2


def test_zero_and_constant_channels():
  q = np.zeros((N, 4), np.float32)
  q[:, 1] = 5.0  # fits in 4 bits: e = 0 exact
  q[:, 2] = 96.0  # 96 = 6 * 16: only e = 4 is exact (96 / 8 = 12 > 7 clips at e = 3)
  q[:, 3] = -128.0
  e = numerics.fit_extraction(q, 1, True)
  np.testing.assert_array_equal(e, [0, 0, 4, 4])
  np.testing.assert_array_equal(numerics.lowering_error(q, e, 1, True), np.zeros(4))
  hist = numerics.code_histogram(q, 1, True)
  np.testing.assert_array_equal(numerics.fit_extraction_from_histogram(hist, True), e)
  empty = jnp.zeros((3, 256), jnp.int32)
  np.testing.assert_array_equal(numerics.fit_extraction_from_histogram(empty, True), [0, 0, 0])
  np.testing.assert_array_equal(numerics.extraction_errors_from_histogram(empty, True), 0)


def test_tie_rule_smallest_e():
  # Codes {0, 64}: e = 3 (64 -> 8 clips to 7 -> 56) loses; e = 4 (64 -> 4 * 16) is exact; codes {0} tie.
  q = np.array([[0.0, 0.0], [0.0, 64.0]], np.float32)
  np.testing.assert_array_equal(numerics.fit_extraction(q, 1, True), [0, 4])
  np.testing.assert_array_equal(numerics.fit_extraction(q, 1, True, candidates=(4, 2, 3)), [2, 4])


def test_weighted_fit_follows_real_valued_error():
  """Weight row c multiplies outputs with scales s_w[o]; weighting by s_w[o]^2 makes the fit
  protect the large-scale output, where e = 0 (exact small codes) beats e = 4 (exact big ones)."""
  q = np.array([[3.0, 3.0, 3.0, 112.0]]).T  # (O=4, C=1): three small codes, one large
  axis = 1
  assert numerics.fit_extraction(q, axis, True)[0] == 4  # unweighted: 3 * 9 (e=4) < 105^2 (e=0)
  s_w = np.array([10.0, 10.0, 10.0, 0.01])[:, None]
  assert numerics.fit_extraction(q, axis, True, weights=s_w ** 2)[0] == 0


def test_candidates_are_validated():
  q = _codes(0, True)
  with pytest.raises(ValueError):
    numerics.fit_extraction(q, 1, True, candidates=(0, 5))
  with pytest.raises(ValueError):
    numerics.fit_extraction_from_histogram(jnp.zeros((2, 100)), True)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), signed=st.booleans())
def test_lower_codes_ste_gradient_passes_inside_the_grid_and_stops_where_clipped(seed, signed):
  """Forward: exactly lower_codes. Backward: the upstream gradient where the lowered code is not
  clipped, 0 where it is (a code the 4-bit grid cannot hold gets no push further out)."""
  q = _codes(seed, signed)
  e = np.random.default_rng(seed).integers(0, 5, size=C)
  e[1] = 0  # a full-scale code at position 0 clips; channel 0 (all zero) never does
  q[0, 1] = numerics.int_range(8, signed)[1]
  upstream = np.random.default_rng(seed + 1).normal(size=q.shape).astype(np.float32)
  fwd, vjp = jax.vjp(lambda v: numerics.lower_codes_ste(v, e, signed, axis=1), q)
  np.testing.assert_array_equal(fwd, numerics.lower_codes(q, e, signed, axis=1))
  lo4, hi4 = numerics.int_range(4, signed)
  kept = np.floor(np.asarray(q, np.float64) / 2.0 ** e + 0.5)  # e broadcasts along axis 1 (C last)
  clipped = (kept < lo4) | (kept > hi4)
  assert clipped.any() and (~clipped).any()  # both cases occur in every draw
  np.testing.assert_array_equal(vjp(upstream)[0], np.where(clipped, 0.0, upstream))


def test_extraction_functions_jit():
  q = _codes(5, True)
  e = jnp.arange(C, dtype=jnp.int32) % 5
  lower = jax.jit(numerics.lower_codes, static_argnames=("signed", "low_bits", "axis"))
  np.testing.assert_array_equal(lower(q, e, signed=True, axis=1), numerics.lower_codes(q, e, True, axis=1))
  lower_ste = jax.jit(numerics.lower_codes_ste, static_argnames=("signed", "low_bits", "axis"))
  np.testing.assert_array_equal(lower_ste(q, e, signed=True, axis=1), numerics.lower_codes(q, e, True, axis=1))
  hist = jax.jit(numerics.code_histogram, static_argnames=("axis", "signed", "bits"))(q, axis=1, signed=True)
  fit_h = jax.jit(numerics.fit_extraction_from_histogram, static_argnames=("signed", "candidates", "low_bits"))
  fit = jax.jit(numerics.fit_extraction, static_argnames=("axis", "signed", "candidates", "low_bits", "bits"))
  e_fit = fit(q, axis=1, signed=True)
  np.testing.assert_array_equal(fit_h(hist, signed=True), e_fit)
  err = jax.jit(numerics.lowering_error, static_argnames=("axis", "signed", "low_bits"))(q, e_fit, axis=1, signed=True)
  errs_h = jax.jit(numerics.extraction_errors_from_histogram, static_argnames=("signed", "candidates", "low_bits"))(
      hist, signed=True)
  np.testing.assert_array_equal(errs_h.min(0), err)
  errs = jax.jit(numerics.extraction_errors, static_argnames=("axis", "signed", "candidates", "low_bits"))(
      q, axis=1, signed=True)
  np.testing.assert_array_equal(errs.min(0), err)
  # e as a traced runtime argument (e.g. stored in the quantization state).
  grad = jax.jit(jax.grad(lambda v, e: numerics.lower_codes_ste(v, e, True, axis=1).sum()))(q, e)
  kept = np.floor(np.asarray(q) / 2.0 ** np.asarray(e) + 0.5)
  np.testing.assert_array_equal(grad, ((kept >= -8) & (kept <= 7)).astype(np.float32))
