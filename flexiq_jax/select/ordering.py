"""Per-layer channel orders: which feature channels a layer lowers first.

Conventions: `order` (C,) int32 is a permutation of 0..C-1, lowered first; at a count n the
layer lowers channels order[:n]. `rank` (C,) int32 is its inverse (rank[c] = position of channel
c in the order), which the transform stores so that a channel is lowered iff rank[c] < n.
"""

from __future__ import annotations

import numpy as np

# Ranges whose relative difference is below this count as tied (see `channel_order`).
DEFAULT_RTOL = 1e-3


def range_bins(ranges, rtol: float = DEFAULT_RTOL) -> np.ndarray:
  """Integer-valued tie key for ranges: equal key = tied.

  Positive ranges are binned on a log grid of relative width `rtol`
  (bin = floor(log(range) / log1p(rtol))); zero ranges (dead channels) share the lowest bin.
  rtol = 0 keys by the exact range. Binning is transitive and deterministic; the price is that
  two ranges closer than rtol can still straddle a bin edge and then are not tied.

  Args:
    ranges: Per-channel ranges (C,), >= 0.
    rtol: Relative bin width; 0 keys by the exact range.

  Returns:
    A float64 (C,) array of bin keys (-inf for zero ranges; the ranges themselves when rtol == 0).

  Raises:
    ValueError: If rtol is negative.
  """
  ranges = np.asarray(ranges, np.float64)
  if rtol < 0:
    raise ValueError(f"rtol must be >= 0, got {rtol}")
  if rtol == 0:
    return ranges
  with np.errstate(divide="ignore"):  # log(0) = -inf is the intended bin for dead channels
    return np.floor(np.log(ranges) / np.log1p(rtol))


def channel_order(ranges, lowering_error=None, *, rtol: float = DEFAULT_RTOL) -> np.ndarray:
  """Lowering order of one layer's feature channels, (C,) int32, lowered first.

  Sorted by calibrated value range ascending (a small range survives 4 bits best); ties and
  near-ties (ranges in the same relative bin of width `rtol`, see `range_bins`, so calibration
  noise does not override a measured difference) are broken by `lowering_error` ascending, then
  by channel index, so the order is deterministic. ranges, lowering_error: (C,), finite, >= 0
  for ranges.

  Args:
    ranges: Calibrated value range per channel (C,), finite and >= 0.
    lowering_error: Optional lowering error per channel (C,), finite; None counts as all zero.
    rtol: Relative bin width under which ranges count as tied.

  Returns:
    The channel order, a (C,) int32 permutation, lowered first.

  Raises:
    ValueError: If ranges are empty, not 1-D, not finite or negative, or lowering_error has
      another shape or is not finite.
  """
  ranges = np.asarray(ranges, np.float64)
  if ranges.ndim != 1 or ranges.size == 0:
    raise ValueError(f"ranges must be a non-empty (C,) array, got shape {ranges.shape}")
  if not np.all(np.isfinite(ranges)) or np.any(ranges < 0):
    raise ValueError("ranges must be finite and >= 0")
  if lowering_error is None:
    error = np.zeros_like(ranges)
  else:
    error = np.asarray(lowering_error, np.float64)
    if error.shape != ranges.shape:
      raise ValueError(f"lowering_error shape {error.shape} != ranges shape {ranges.shape}")
    if not np.all(np.isfinite(error)):
      raise ValueError("lowering_error must be finite")
  index = np.arange(ranges.size)
  # np.lexsort sorts by the last key first.
  return np.lexsort((index, error, range_bins(ranges, rtol))).astype(np.int32)


def order_to_rank(order) -> np.ndarray:
  """Inverse permutation: rank[c] = position of channel c in `order`, (C,) int32.

  Args:
    order: A permutation of 0..C-1, (C,).

  Returns:
    The rank array, (C,) int32.

  Raises:
    ValueError: If `order` is not a 1-D permutation of 0..C-1.
  """
  order = np.asarray(order)
  c = order.size
  if order.ndim != 1 or not np.array_equal(np.sort(order), np.arange(c)):
    raise ValueError("order must be a permutation of 0..C-1")
  rank = np.empty(c, np.int32)
  rank[order] = np.arange(c, dtype=np.int32)
  return rank


def random_order(num_channels: int, seed) -> np.ndarray:
  """A random lowering order (the random-channel ablation), (C,) int32; same seed, same order.

  Args:
    num_channels: Number of channels C, >= 1.
    seed: Any seed numpy's default_rng accepts.

  Returns:
    A (C,) int32 random permutation.

  Raises:
    ValueError: If num_channels < 1.
  """
  if num_channels < 1:
    raise ValueError(f"num_channels must be >= 1, got {num_channels}")
  return np.random.default_rng(seed).permutation(num_channels).astype(np.int32)
