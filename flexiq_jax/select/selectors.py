"""Simple per-level selectors: uniform, greedy by range, random.

Every selector takes (levels (K,), channels (L,), macs (L,), ...) (conventions in `budget`) and
returns counts (K, L) int32 that are nested (counts[k] <= counts[k + 1] elementwise), on budget
at every level (|cost.lowered_mac_share(counts[k]) - levels[k]| <= budget_tolerance), all zeros at level 0
and all channels (C) at level 1.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from flexiq_jax import cost

from flexiq_jax.select import budget
from flexiq_jax.select.ordering import DEFAULT_RTOL, channel_order


def trivial_counts(r: float, channels) -> np.ndarray | None:
  """Counts for the levels that need no choice: 0 -> none lowered, 1 -> all; else None.

  Args:
    r: Ratio level.
    channels: Feature channels per lowerable layer (L,).

  Returns:
    Zeros like `channels` for r <= 0, a copy of `channels` for r >= 1, else None.
  """
  if r <= 0:
    return np.zeros_like(channels)
  if r >= 1:
    return np.array(channels, copy=True)
  return None


def select_uniform(levels, channels, macs) -> np.ndarray:
  """The same ratio in every layer: floor or ceil of r * C_l, chosen for the global budget.

  Args:
    levels: Ratio levels (K,), strictly increasing in [0, 1].
    channels: Feature channels per lowerable layer (L,).
    macs: MACs per lowerable layer (L,).

  Returns:
    Nested counts (K, L) int32, on budget at every level.

  Raises:
    ValueError: If levels, channels or macs are invalid (`budget.check_problem`).
  """
  levels, channels, macs = budget.check_problem(levels, channels, macs)
  out = np.zeros((levels.size, channels.size), np.int64)
  prev = np.zeros_like(channels)
  for k, r in enumerate(levels):
    fixed = trivial_counts(r, channels)
    prev = fixed if fixed is not None else budget.counts_for_uniform_ratio(r, channels, macs, lower=prev)
    out[k] = prev
  return out.astype(np.int32)


def _normalizer(normalize) -> Callable[[np.ndarray], float]:
  if callable(normalize):
    return normalize
  table = {"max": np.max, "mean": np.mean, "none": lambda r: 1.0}
  if normalize not in table:
    raise ValueError(f"unknown normalize {normalize!r}; valid: {sorted(table)} or a callable")
  return table[normalize]


def global_channel_sequence(channels, ranges: Sequence, lowering_error: Sequence | None = None, *,
                            normalize="max", rtol: float = DEFAULT_RTOL):
  """One global lowering sequence over all channels of all layers.

  Returns (layer (N,), channel (N,)) with N = sum C_l: the n-th channel lowered globally is
  channel[n] of layer[n]. Channels compete by normalised range, range / scale_l, where
  scale_l = normalize(ranges of layer l) ('max': the layer's largest range, so every layer's
  scores lie in [0, 1] and layers of very different magnitude (post-ReLU features, attention
  projections) compete on their relative spread; 'mean'; 'none': raw ranges; or a callable).
  Within a layer the sequence follows `channel_order` (same tie-breaking), so a layer count n
  always means that layer's first n channels; ties across layers go to the earlier layer.

  Args:
    channels: Feature channels per lowerable layer (L,).
    ranges: One (C_l,) range array per layer.
    lowering_error: Optional one (C_l,) lowering-error array per layer (tie-breaking).
    normalize: 'max', 'mean', 'none' or a callable mapping a layer's ranges to its scale.
    rtol: Relative tolerance under which ranges count as tied (`channel_order`).

  Returns:
    Tuple (layer, channel) of (N,) arrays, N = sum C_l, in global lowering order.

  Raises:
    ValueError: If `ranges` or `lowering_error` do not have one entry per layer, a layer's ranges
      do not have shape (C_l,), or `normalize` is an unknown name.
  """
  channels = np.asarray(channels, np.int64)
  if len(ranges) != channels.size:
    raise ValueError(f"need one range array per layer: {len(ranges)} for {channels.size} layers")
  if lowering_error is not None and len(lowering_error) != channels.size:
    raise ValueError("need one lowering_error array per layer")
  scale_fn = _normalizer(normalize)
  scores, layers, positions, members = [], [], [], []
  for l, c in enumerate(channels):
    r = np.asarray(ranges[l], np.float64)
    if r.shape != (c,):
      raise ValueError(f"layer {l}: ranges shape {r.shape} != ({c},)")
    order = channel_order(r, None if lowering_error is None else lowering_error[l], rtol=rtol)
    scale = float(scale_fn(r))
    scale = scale if scale > 0 and np.isfinite(scale) else 1.0  # all-dead layer
    # Near-ties may leave the per-layer order slightly unsorted in range; a running max keeps
    # the merge from reordering channels inside a layer.
    scores.append(np.maximum.accumulate(r[order] / scale))
    layers.append(np.full(c, l))
    positions.append(np.arange(c))
    members.append(order)
  scores, layers, positions = map(np.concatenate, (scores, layers, positions))
  seq = np.lexsort((positions, layers, scores))
  return layers[seq], np.concatenate(members)[seq]


def select_greedy_by_range(levels, channels, macs, ranges: Sequence, *, lowering_error=None,
                           normalize="max", rtol: float = DEFAULT_RTOL) -> np.ndarray:
  """Lowers channels in one global order of normalised range (see `global_channel_sequence`)
  until each level's budget is met: level r takes the prefix whose MAC share is closest to r.
  Prefixes of one sequence are nested by construction.

  Args:
    levels: Ratio levels (K,), strictly increasing in [0, 1].
    channels: Feature channels per lowerable layer (L,).
    macs: MACs per lowerable layer (L,).
    ranges: One (C_l,) channel range array per layer.
    lowering_error: Optional one (C_l,) lowering-error array per layer (tie-breaking).
    normalize: Range normalisation per layer (see `global_channel_sequence`).
    rtol: Relative tolerance under which ranges count as tied.

  Returns:
    Nested counts (K, L) int32.

  Raises:
    ValueError: If the inputs are invalid (`budget.check_problem`, `global_channel_sequence`).
  """
  levels, channels, macs = budget.check_problem(levels, channels, macs)
  layer_seq, _ = global_channel_sequence(channels, ranges, lowering_error, normalize=normalize,
                                         rtol=rtol)
  w = cost.macs_per_channel(channels, macs)
  cum = np.concatenate([[0.0], np.cumsum(w[layer_seq])]) / np.sum(macs)
  out = np.zeros((levels.size, channels.size), np.int64)
  n_prev = 0
  for k, r in enumerate(levels):
    if r >= 1:
      n = cum.size - 1
    else:
      n = n_prev + int(np.argmin(np.abs(cum[n_prev:] - r)))  # first of equals: deterministic
    out[k] = np.bincount(layer_seq[:n], minlength=channels.size)
    n_prev = n
  return out.astype(np.int32)


def select_random(levels, channels, macs, seed=0) -> np.ndarray:
  """Random per-layer counts on budget and nested: level k draws each layer's count uniformly
  between the previous level's count and C, then repairs the draw onto the budget.

  Args:
    levels: Ratio levels (K,), strictly increasing in [0, 1].
    channels: Feature channels per lowerable layer (L,).
    macs: MACs per lowerable layer (L,).
    seed: Seed of the numpy Generator (draws and repair order).

  Returns:
    Nested counts (K, L) int32, on budget at every level.

  Raises:
    ValueError: If levels, channels or macs are invalid (`budget.check_problem`).
  """
  levels, channels, macs = budget.check_problem(levels, channels, macs)
  rng = np.random.default_rng(seed)
  out = np.zeros((levels.size, channels.size), np.int64)
  prev = np.zeros_like(channels)
  for k, r in enumerate(levels):
    fixed = trivial_counts(r, channels)
    if fixed is None:
      draw = prev + np.floor(rng.random(channels.size) * (channels - prev + 1))
      fixed = budget.repair_to_budget(draw, r, channels, macs, prev, channels, rng)
    out[k] = prev = fixed
  return out.astype(np.int32)
