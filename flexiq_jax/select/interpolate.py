"""Per-layer counts at any ratio, exact in MACs: the fill table between the selected levels.

counts (K, L) are selected at `levels` (K,) (strictly increasing in [0, 1]) and nested
(counts[k-1] <= counts[k]); an implicit level 0 with counts 0 is prepended (if levels[0] == 0
too, that zero-width segment lowers levels[0]'s counts at ratio 0). The ratio is the share of
4-bit MACs among the lowerable layers' MACs (`cost.lowered_mac_share`): one channel of layer l
adds s_l = w_l / sum(M) to it, w_l = M_l / C_l (budget module docstring).

Segment k (levels[k-1] -> levels[k]) adds d_l = counts[k, l] - counts[k-1, l] channels of each
layer l, the next ones in the layer's fixed order. They form one sequence that interleaves the
layers in proportion: channel j of layer l sits at position (j + 0.5) / d_l, ties by layer
index. Channel i of the sequence (of layer l_i) gets the threshold

    t_i = share(counts[k-1]) + S_i - s_{l_i} / 2,        S_i = s_{l_1} + ... + s_{l_i},

the ratio from which the prefix that includes it is nearer r than the prefix without it (the
*nearest* rule, not "largest prefix <= r"), clipped into the segment in float32:
T_i = min(max(t_i, nextafter(levels[k-1])), levels[k]). A channel is lowered at ratio r iff
T_i <= r, so n_l(r) = #{i : l_i = l, T_i <= r}: no search at run time, just a compare and a
segment sum (`counts_at_ratio`, jit-compatible with a traced ratio, so a new ratio never
recompiles; `counts_at_ratio_np` is its exact host twin, same float32 comparison).

Guarantees (tol = max_l s_l, the step of one channel of the coarsest layer):
  * nested for every r: each channel has one threshold, so what is lowered at r1 is lowered at
    every r2 > r1;
  * exact at the levels as selected: at r = levels[k] the lowered channels are those of
    counts[k] (the clip keeps the next segment's channels strictly above levels[k]);
  * between levels the delivered share is the nearest prefix share: within s/2 of r (s: the
    boundary channel's step, <= tol / 2), except next to a level whose selected counts are off
    their level, where it is within |share(counts[k]) - levels[k]| (<= tol for selectors, which
    are on budget);
  * above the last level: the last level's counts; below 0 (and for NaN): no channel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import cost
from flexiq_jax.select.budget import check_problem


def fill_table(counts, levels, channels, macs) -> tuple[np.ndarray, np.ndarray]:
  """(layer (N,) int32, threshold (N,) float32) of the N = sum_l counts[-1, l] channels lowered at
  the last level, in the order they are lowered (thresholds non-decreasing; module docstring).

  With no channel lowered at any level, one sentinel (layer 0, threshold +inf) keeps the arrays
  non-empty. Raises ValueError for counts that are not (K, L) integers in [0, C], nested.

  Args:
    counts: Selected counts (K, L), integers in [0, C_l], nested along K.
    levels: Ratio levels (K,), strictly increasing in [0, 1].
    channels: Feature channels per lowerable layer (L,).
    macs: MACs per lowerable layer (L,).

  Returns:
    Tuple (layer, threshold): layer (N,) int32, the layer index of each lowered channel, and
    threshold (N,) float32, the ratio from which that channel is lowered.

  Raises:
    ValueError: If counts are not (K, L) integers in [0, C] that are nested, or levels, channels
      or macs are invalid (`check_problem`).
  """
  levels, channels, macs = check_problem(levels, channels, macs)
  counts = np.asarray(counts)
  if counts.shape != (levels.size, channels.size):
    raise ValueError(f"counts must be (K, L) = {(levels.size, channels.size)}, got {counts.shape}")
  if not np.all(counts == np.round(counts)):
    raise ValueError("counts must be integers")
  counts = counts.astype(np.int64)
  if np.any(counts < 0) or np.any(counts > channels):
    raise ValueError("counts must lie in [0, C] per layer")
  if np.any(np.diff(counts, axis=0) < 0):
    raise ValueError("counts must be nested: counts[k-1] <= counts[k] for every layer")
  step = cost.lowered_mac_share(np.eye(channels.size), channels, macs)  # (L,) share of one channel
  bounds = np.concatenate([[0.0], levels]).astype(np.float32)
  rows = np.concatenate([np.zeros((1, channels.size), np.int64), counts])
  layers, thresholds = [], []
  for k in range(1, rows.shape[0]):
    d = rows[k] - rows[k - 1]
    layer = np.repeat(np.arange(channels.size), d)
    j = np.concatenate([np.arange(n) for n in d]) if d.sum() else np.zeros(0, np.int64)
    seq = np.lexsort((layer, (j + 0.5) / np.maximum(d[layer], 1)))
    layer = layer[seq]
    t = cost.lowered_mac_share(rows[k - 1], channels, macs) + np.cumsum(step[layer]) - step[layer] / 2
    lo = np.nextafter(bounds[k - 1], np.float32(np.inf))
    t = np.minimum(np.maximum(t.astype(np.float32), lo), bounds[k])
    layers.append(layer)
    thresholds.append(t)
  layer = np.concatenate(layers).astype(np.int32)
  threshold = np.concatenate(thresholds).astype(np.float32)
  if layer.size == 0:
    return np.zeros(1, np.int32), np.full(1, np.inf, np.float32)
  return layer, threshold


def counts_at_ratio(layer, threshold, num_layers: int, ratio):
  """Counts (num_layers,) int32 lowered at `ratio`, in jax.numpy (traced ratio and tables).

  Args:
    layer: (N,) int32 layer index per table entry, from `fill_table`.
    threshold: (N,) float32 threshold per table entry, from `fill_table`.
    num_layers: Number of lowerable layers L.
    ratio: Scalar ratio (may be traced).

  Returns:
    A (num_layers,) int32 jax array: the number of channels of each layer lowered at `ratio`.
  """
  lowered = threshold <= jnp.asarray(ratio, jnp.float32)
  return jax.ops.segment_sum(lowered.astype(jnp.int32), layer, num_segments=num_layers)


def counts_at_ratio_np(layer, threshold, num_layers: int, ratio) -> np.ndarray:
  """NumPy twin of `counts_at_ratio` (the same float32 comparison, so both agree exactly).

  Args:
    layer: (N,) int layer index per table entry, from `fill_table`.
    threshold: (N,) float threshold per table entry, from `fill_table`.
    num_layers: Number of lowerable layers L.
    ratio: Scalar ratio.

  Returns:
    A (num_layers,) int32 numpy array of counts lowered at `ratio`.
  """
  lowered = np.asarray(threshold, np.float32) <= np.float32(ratio)
  return np.bincount(np.asarray(layer)[lowered], minlength=num_layers).astype(np.int32)
