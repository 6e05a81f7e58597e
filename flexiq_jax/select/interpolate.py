"""Per-layer counts at any ratio, from the counts selected at the ratio levels.

counts (K, L) (nested, selected at `levels` (K,), strictly increasing in [0, 1]); an implicit
level 0 with counts 0 is prepended (if levels[0] == 0 too, that zero-width segment is never
used). For levels[i] <= ratio <= levels[i+1] each layer's count is the linear interpolation
of counts[i] and counts[i+1], floored; below 0 it is 0, at or above the last level it is the
last level's counts.

Exact at the levels and monotone in ratio: the segment is picked by searchsorted and the value
computed as c_lo + t * (c_hi - c_lo) with t = clip((ratio - lo) / (hi - lo), 0, 1), which is
monotone under float rounding and equals c_lo at t = 0 and c_hi at t = 1 exactly (small
integers are exact in float32), so no epsilon is needed before the floor. Nested counts thus
stay nested for every ratio, with a fixed channel order per layer.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _interpolate(xp, counts, levels, ratio, dtype):
  counts = xp.asarray(counts, dtype)
  levels = xp.asarray(levels, dtype)
  if counts.ndim != 2 or levels.shape != counts.shape[:1]:
    raise ValueError(f"counts must be (K, L) and levels (K,), got {counts.shape}, {levels.shape}")
  xs = xp.concatenate([xp.zeros((1,), dtype), levels])
  ys = xp.concatenate([xp.zeros((1, counts.shape[1]), dtype), counts])
  ratio = xp.asarray(ratio, dtype)
  # Segment [xs[i], xs[i+1]] with xs[i] <= ratio < xs[i+1]; clipped at both ends.
  i = xp.clip(xp.searchsorted(xs, ratio, side="right") - 1, 0, levels.shape[0] - 1)
  lo, hi = xs[i], xs[i + 1]
  width = xp.where(hi > lo, hi - lo, xp.ones_like(hi))  # zero width only for a given level 0
  t = xp.clip((ratio - lo) / width, 0, 1)
  return xp.floor(ys[i] + t * (ys[i + 1] - ys[i]))


def interpolate_counts(counts, levels, ratio):
  """Counts (L,) int32 at `ratio`, in jax.numpy: jit-compatible with a traced ratio (and traced
  counts/levels), so a new ratio never recompiles."""
  return _interpolate(jnp, counts, levels, ratio, jnp.float32).astype(jnp.int32)


def interpolate_counts_np(counts, levels, ratio) -> np.ndarray:
  """NumPy twin of `interpolate_counts` (float32 arithmetic too, so both agree exactly)."""
  return _interpolate(np, counts, levels, ratio, np.float32).astype(np.int32)
