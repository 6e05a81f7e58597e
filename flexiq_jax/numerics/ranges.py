"""Range calibration: min-max, percentile and MSE-optimal clipping ranges, exact or from histograms.

Conventions:
  * Every function returns `(lo, hi)`: scalars for `axis=None` (per-tensor), else (C,) vectors,
    C = size of the kept channel `axis`. Feed them to `quantizers.scale_from_range`.
  * The histogram functions let calibration stream over many batches without keeping
    activations: pass 1 finds the min-max range, pass 2 accumulates a fixed-edge histogram
    (`histogram_update`, summable across batches and devices), and the range is then read off
    the histogram. Counts have shape (..., B) with edges (..., B + 1) (per-channel histograms
    are (C, B) with edges (C, B + 1) or shared (B + 1,) edges).
  * The MSE search shrinks the min-max range by factors `linspace(1/K, 1, K)` (K =
    `num_candidates`) and keeps the one with the smallest mean squared fake-quantization error;
    ties go to the *largest* factor (least clipping).
All functions are jit-compatible (`axis`, bit widths, flags and `num_candidates` static).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flexiq_jax.numerics.quantizers import MIN_RANGE, fake_quant, int_range, scale_from_range
from flexiq_jax.numerics.shapes import channels_first, normalize_axis

DEFAULT_NUM_BINS = 2048


def _squeeze_tensor(v, axis):
  """(1,) per-channel results back to scalars for per-tensor calibration."""
  return v[0] if axis is None else v


def minmax_range(x, axis: int | None = None):
  """(min, max) of `x`, over everything (axis=None) or per channel along `axis`.

  Args:
    x: values, any shape.
    axis: the channel axis kept, or None for per-tensor.

  Returns:
    (lo, hi): scalars for axis None, else (C,) vectors.

  Raises:
    ValueError: `axis` is out of range.
  """
  xc = channels_first(x, axis)
  return _squeeze_tensor(xc.min(axis=1), axis), _squeeze_tensor(xc.max(axis=1), axis)


def percentile_range(x, percentile: float = 99.99, axis: int | None = None):
  """(lo, hi) = the (100 - p)-th and p-th percentiles of `x` (linear interpolation between order
  statistics, numpy's default), per tensor or per channel along `axis`.

  Args:
    x: values, any shape.
    percentile: p, in [50, 100].
    axis: the channel axis kept, or None for per-tensor.

  Returns:
    (lo, hi): scalars for axis None, else (C,) vectors.

  Raises:
    ValueError: `axis` is out of range.
  """
  xc = channels_first(x, axis)
  lo = jnp.percentile(xc, 100.0 - percentile, axis=1)
  hi = jnp.percentile(xc, percentile, axis=1)
  return _squeeze_tensor(lo, axis), _squeeze_tensor(hi, axis)


def shrink_factors(num_candidates: int):
  """The MSE search grid: linspace(1/K, 1, K) (K = 100: 0.01, 0.02, ..., 1.0).

  Args:
    num_candidates: K, the number of factors.

  Returns:
    (K,) float array of factors, ascending, the last 1.0.
  """
  return jnp.linspace(1.0 / num_candidates, 1.0, num_candidates)


def _argmin_last(errors):
  """Index of the minimum along axis 0, ties to the *last* index (largest shrink factor)."""
  k = errors.shape[0]
  return k - 1 - jnp.argmin(errors[::-1], axis=0)


def _candidate_ranges(lo, hi, num_candidates):
  alphas = shrink_factors(num_candidates)
  expand = (slice(None),) + (None,) * jnp.ndim(lo)
  return alphas[expand] * lo, alphas[expand] * hi  # (K, ...)


def _fq_error(values, lo, hi, bits, symmetric, signed):
  """Squared fake-quantization error of `values` (..., N) with ranges lo/hi (...)."""
  qmin, qmax = int_range(bits, signed)
  scale, zp = scale_from_range(lo, hi, bits, symmetric, signed)
  err = fake_quant(values, scale[..., None], zp[..., None], qmin, qmax) - values
  return err * err


# Jitted at definition: lax.map over a fresh closure would otherwise re-trace on every eager call.
@functools.partial(jax.jit, static_argnames=("bits", "symmetric", "signed", "axis", "num_candidates"))
def mse_range(x, bits: int, symmetric: bool, signed: bool, axis: int | None = None,
              num_candidates: int = 100):
  """The shrunk min-max range (alpha * lo, alpha * hi) minimising the mean squared error of
  `fake_quant` with `scale_from_range(alpha * lo, alpha * hi, bits, symmetric, signed)`.

  alpha runs over `shrink_factors(num_candidates)`; per channel if `axis` is given. Ties go to
  the largest alpha. Candidates are evaluated one at a time (`lax.map`), so memory stays O(x.size).

  Args:
    x: values, any shape.
    bits: code width.
    symmetric: symmetric or asymmetric grid (see `scale_from_range`).
    signed: signed or unsigned grid.
    axis: the channel axis kept, or None for per-tensor.
    num_candidates: K, the number of shrink factors tried.

  Returns:
    (lo, hi): scalars for axis None, else (C,) vectors.
  """
  xc = channels_first(x, axis)  # (C, N)
  lo, hi = xc.min(axis=1), xc.max(axis=1)
  los, his = _candidate_ranges(lo, hi, num_candidates)  # (K, C)

  def channel_errors(lo_hi):
    return _fq_error(xc, lo_hi[0], lo_hi[1], bits, symmetric, signed).mean(axis=1)

  errors = jax.lax.map(channel_errors, (los, his))  # (K, C)
  best = _argmin_last(errors)
  lo_best = jnp.take_along_axis(los, best[None], axis=0)[0]
  hi_best = jnp.take_along_axis(his, best[None], axis=0)[0]
  return _squeeze_tensor(lo_best, axis), _squeeze_tensor(hi_best, axis)


# ----------------------------------------------------------------------------------------------
# Histograms.


def histogram_edges(lo, hi, num_bins: int = DEFAULT_NUM_BINS):
  """Equal-width bin edges over [lo, hi]: shape (B + 1,) for scalars, (C, B + 1) for (C,)
  vectors. The width is floored at MIN_RANGE (as in `histogram_update`), so a constant channel
  gets (near-)identical edges and every bin centre equals the constant to float precision.

  Args:
    lo: lower end(s), a scalar or (C,).
    hi: upper end(s), shaped as `lo`.
    num_bins: B.

  Returns:
    float32 edges, (B + 1,) or (C, B + 1).
  """
  lo, width = _lo_width(lo, hi)
  return lo[..., None] + width[..., None] * jnp.linspace(0.0, 1.0, num_bins + 1)


def _lo_width(lo, hi):
  lo = jnp.asarray(lo, jnp.float32)
  width = jnp.maximum(jnp.asarray(hi, jnp.float32) - lo, MIN_RANGE)
  return lo, width


def histogram_update(counts, x, lo, hi, axis: int | None = None):
  """Adds the values of `x` to `counts`, a histogram of B = counts.shape[-1] equal bins over
  [lo, hi] (the same edges as `histogram_edges(lo, hi, B)`).

  Per tensor (`axis=None`): counts (B,), lo/hi scalars. Per channel: counts (C, B), lo/hi scalars
  or (C,) vectors, one histogram per index along `axis`. Values outside [lo, hi] are counted in
  the first/last bin (so the total always equals the number of values).

  Args:
    counts: the histogram so far, (B,) or (C, B).
    x: new values, any shape.
    lo: lower end(s) of the bins, a scalar or (C,).
    hi: upper end(s), shaped as `lo`.
    axis: the channel axis kept, or None for per-tensor.

  Returns:
    The new counts, shaped as `counts` and in its dtype (int32 counts are exact up to 2^31 values per
    channel).

  Raises:
    ValueError: `axis` is out of range.
  """
  num_bins = counts.shape[-1]
  xc = channels_first(x, axis)  # (C, N)
  num_channels = xc.shape[0]
  lo, width = _lo_width(lo, hi)
  lo_c, width_c = jnp.reshape(lo, (-1, 1)), jnp.reshape(width, (-1, 1))
  idx = jnp.floor((xc - lo_c) / width_c * num_bins).astype(jnp.int32)
  idx = jnp.clip(idx, 0, num_bins - 1) + num_bins * jnp.arange(num_channels)[:, None]
  new = jnp.bincount(idx.reshape(-1), length=num_channels * num_bins)
  return counts + new.reshape(counts.shape).astype(counts.dtype)


def histogram(x, lo=None, hi=None, num_bins: int = DEFAULT_NUM_BINS, axis: int | None = None):
  """(counts, edges) of `x` in one call; lo/hi default to the min-max range of `x` (per channel
  if `axis`). counts are int32, (B,) or (C, B).

  Args:
    x: values, any shape.
    lo: lower end(s) of the bins, or None for the minimum.
    hi: upper end(s), or None for the maximum.
    num_bins: B.
    axis: the channel axis kept, or None for per-tensor.

  Returns:
    (counts, edges): int32 (B,) or (C, B) counts and float32 (B + 1,) or (C, B + 1) edges.

  Raises:
    ValueError: `axis` is out of range.
  """
  if lo is None or hi is None:
    mlo, mhi = minmax_range(x, axis)
    lo = mlo if lo is None else lo
    hi = mhi if hi is None else hi
  shape = (num_bins,) if axis is None else (jnp.shape(x)[normalize_axis(axis, jnp.ndim(x))], num_bins)
  counts = histogram_update(jnp.zeros(shape, jnp.int32), x, lo, hi, axis)
  return counts, histogram_edges(lo, hi, num_bins)


def _bin_quantile(counts, edges, q, lower: bool):
  """The value where the histogram's piecewise-linear CDF (uniform density inside each bin)
  reaches the fraction `q` of the total. On a flat stretch (empty bins) the upper quantile takes
  its left end and the lower quantile its right end, i.e. both stay next to occupied bins."""
  counts = counts.astype(jnp.float32)
  num_bins = counts.shape[-1]
  cum = jnp.cumsum(counts, axis=-1)  # cum[k] = count in bins 0..k
  target = q * cum[..., -1:]
  below = (cum <= target) if lower else (cum < target)
  k = jnp.minimum(jnp.sum(below, axis=-1, keepdims=True), num_bins - 1)
  before = jnp.take_along_axis(cum, k, axis=-1) - jnp.take_along_axis(counts, k, axis=-1)
  in_bin = jnp.take_along_axis(counts, k, axis=-1)
  frac = jnp.where(in_bin > 0, (target - before) / jnp.where(in_bin > 0, in_bin, 1.0), 0.0)
  edges = jnp.broadcast_to(edges, counts.shape[:-1] + (num_bins + 1,))
  left = jnp.take_along_axis(edges, k, axis=-1)
  right = jnp.take_along_axis(edges, k + 1, axis=-1)
  value = (left + jnp.clip(frac, 0.0, 1.0) * (right - left))[..., 0]
  return jnp.where(cum[..., -1] > 0, value, edges[..., 0])  # empty histogram: the first edge


def percentile_range_from_histogram(counts, edges, percentile: float = 99.99):
  """(lo, hi) = the (100 - p)-th and p-th percentiles of the histogrammed data, reading the
  histogram as uniform density inside each bin (so the error is at most a bin width plus the
  gap between neighbouring samples around the percentile). An empty histogram gives
  (edges[0], edges[0]).

  Args:
    counts: (B,) or (C, B) counts.
    edges: (B + 1,) or (C, B + 1) edges (shared edges broadcast).
    percentile: p, in [50, 100].

  Returns:
    (lo, hi): float32 scalars or (C,) vectors.
  """
  counts = jnp.asarray(counts)
  edges = jnp.asarray(edges, jnp.float32)
  lo = _bin_quantile(counts, edges, (100.0 - percentile) / 100.0, lower=True)
  hi = _bin_quantile(counts, edges, percentile / 100.0, lower=False)
  return lo, hi


def occupied_range(counts, edges):
  """(lower edge of the first non-empty bin, upper edge of the last non-empty bin); for an empty
  histogram (edges[0], edges[0]).

  Args:
    counts: (..., B) counts.
    edges: (..., B + 1) edges, or shared (B + 1,) edges.

  Returns:
    (lo, hi): float32, shaped as counts.shape[:-1].
  """
  counts = jnp.asarray(counts)
  num_bins = counts.shape[-1]
  edges = jnp.broadcast_to(jnp.asarray(edges, jnp.float32), counts.shape[:-1] + (num_bins + 1,))
  occupied = counts > 0
  first = jnp.argmax(occupied, axis=-1)
  last = num_bins - 1 - jnp.argmax(occupied[..., ::-1], axis=-1)
  any_ = occupied.any(axis=-1)
  lo = jnp.take_along_axis(edges, first[..., None], axis=-1)[..., 0]
  hi = jnp.take_along_axis(edges, (last + 1)[..., None], axis=-1)[..., 0]
  return lo, jnp.where(any_, hi, lo)


@functools.partial(jax.jit, static_argnames=("bits", "symmetric", "signed", "num_candidates"))
def mse_range_from_histogram(counts, edges, bits: int, symmetric: bool, signed: bool,
                             num_candidates: int = 100):
  """`mse_range` on histogrammed data, each bin's values approximated by the bin centre.

  The range shrunk is the occupied extent of the histogram (`occupied_range`: lower edge of the
  first non-empty bin to upper edge of the last), which for edges from a min-max pass is the
  data's min-max range to within a bin width. Same shrink grid and tie rule (largest factor) as
  `mse_range`. Per-channel histograms (C, B) give (C,) ranges.

  Accuracy: the bin-centre approximation matters when bins are not much finer than the
  quantization step. With 2048 bins the chosen range's exact MSE was within 0.02% of the exact
  search's at <= 4 bits and within 1% at 8 bits (the step is then only ~8 bins wide) on random
  normal/Laplace/uniform/ReLU data; use more bins for 8-bit MSE calibration if that matters.

  Args:
    counts: (..., B) counts.
    edges: (..., B + 1) edges, or shared (B + 1,) edges.
    bits: code width.
    symmetric: symmetric or asymmetric grid.
    signed: signed or unsigned grid.
    num_candidates: K, the number of shrink factors tried.

  Returns:
    (lo, hi): float32, shaped as counts.shape[:-1].
  """
  counts = jnp.asarray(counts).astype(jnp.float32)
  edges = jnp.broadcast_to(jnp.asarray(edges, jnp.float32),
                           counts.shape[:-1] + (counts.shape[-1] + 1,))
  centres = 0.5 * (edges[..., 1:] + edges[..., :-1])  # (..., B)
  lo, hi = occupied_range(counts, edges)
  los, his = _candidate_ranges(lo, hi, num_candidates)  # (K, ...)

  def errors(lo_hi):
    return (counts * _fq_error(centres, lo_hi[0], lo_hi[1], bits, symmetric, signed)).sum(-1)

  errs = jax.lax.map(errors, (los, his))  # (K, ...)
  best = _argmin_last(errs)
  lo_best = jnp.take_along_axis(los, best[None], axis=0)[0]
  hi_best = jnp.take_along_axis(his, best[None], axis=0)[0]
  return lo_best, hi_best


__all__ = [
    "DEFAULT_NUM_BINS", "histogram", "histogram_edges", "histogram_update", "minmax_range",
    "mse_range", "mse_range_from_histogram", "occupied_range", "percentile_range",
    "percentile_range_from_histogram", "shrink_factors",
]
