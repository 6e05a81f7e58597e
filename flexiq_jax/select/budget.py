"""The 4-bit MAC budget: measuring it and projecting count vectors onto it.

Conventions shared by every selector:
  channels (L,)  C_l >= 1 feature (input) channels of lowerable layer l;
  macs     (L,)  M_l > 0 its MACs (per example, as `flexiq_jax.cost` counts them); every feature
                 channel of layer l carries w_l = M_l / C_l MACs;
  counts   (L,)  or (K, L) integers in [0, C_l]: channels lowered to 4 bits;
  levels   (K,)  ratio levels, strictly increasing, in [0, 1].
  ratio(counts) = sum_l counts_l * w_l / sum_l M_l, the share of 4-bit MACs among the lowerable
  layers' MACs (`cost.low_bit_mac_share` over the same layers).

Budget tolerance: tol = max_l w_l / sum_l M_l, the ratio step of one channel of the coarsest
layer. A count vector is on budget r when |ratio - r| <= tol (hence never above r + tol).
`repair_to_budget` does better whenever the bounds allow reaching r: it lands within half a
channel of the finest layer it can still move, <= tol / 2.
"""

from __future__ import annotations

import numpy as np

from flexiq_jax import cost

# Relative slack for float comparisons of MAC sums.
_EPS = 1e-9


def check_problem(levels, channels, macs):
  """Validated (levels float64 (K,), channels int64 (L,), macs float64 (L,)).

  Args:
    levels: Ratio levels (K,), strictly increasing in [0, 1], or None to skip their check.
    channels: Feature channels per lowerable layer (L,), integers >= 1.
    macs: MACs per lowerable layer (L,), finite and > 0.

  Returns:
    Tuple (levels, channels, macs): levels as a float64 (K,) array (None if None was given),
    channels as int64 (L,), macs as float64 (L,).

  Raises:
    ValueError: If channels and macs are empty or differ in shape, channels are not integers >= 1,
      macs are not finite and positive, or levels are empty, outside [0, 1] or not strictly
      increasing.
  """
  channels = np.asarray(channels)
  macs = np.asarray(macs, np.float64)
  if channels.ndim != 1 or channels.size == 0 or macs.shape != channels.shape:
    raise ValueError(f"channels and macs must be non-empty (L,) arrays, got {channels.shape} "
                     f"and {macs.shape}")
  if not np.all(channels == np.round(channels)) or np.any(channels < 1):
    raise ValueError("channels must be integers >= 1")
  if not np.all(np.isfinite(macs)) or np.any(macs <= 0):
    raise ValueError("macs must be finite and > 0")
  channels = channels.astype(np.int64)
  if levels is not None:
    levels = np.atleast_1d(np.asarray(levels, np.float64))
    if levels.ndim != 1 or levels.size == 0:
      raise ValueError("levels must be a non-empty 1-D sequence")
    if np.any(levels < 0) or np.any(levels > 1) or np.any(np.diff(levels) <= 0):
      raise ValueError(f"levels must be strictly increasing in [0, 1], got {levels.tolist()}")
  return levels, channels, macs


def budget_tolerance(channels, macs) -> float:
  """max_l w_l / sum_l M_l: the ratio step of one channel of the coarsest layer.

  Args:
    channels: Feature channels per lowerable layer (L,).
    macs: MACs per lowerable layer (L,).

  Returns:
    The budget tolerance as a float (a fraction of the total lowerable MACs).
  """
  return float(np.max(cost.macs_per_channel(channels, macs)) / np.sum(np.asarray(macs, np.float64)))


def _fill(room, w, amount, order):
  """Non-negative integer steps delta <= room with sum(delta * w) close to `amount` (MACs).

  First every layer moves the same fraction of its room (so a repair spreads over the layers
  in proportion to their freedom instead of dumping on one), floored; then the remainder is
  filled one layer at a time in `order`, as many whole channels as fit; finally one more channel
  of the finest movable layer if that overshoots by less than the remaining shortfall.
  """
  delta = np.zeros_like(room)
  capacity = float(room @ w)
  if amount <= 0 or capacity <= 0:
    return delta
  alpha = min(1.0, amount / capacity)
  delta = np.floor(alpha * room).astype(np.int64)
  rest = amount - float(delta @ w)
  for l in order:
    if rest <= 0:
      break
    k = int(min(room[l] - delta[l], max(0.0, np.floor(rest / w[l] * (1 + _EPS)))))
    delta[l] += k
    rest -= k * w[l]
  free = np.flatnonzero(room - delta > 0)
  if rest > 0 and free.size:
    l = free[np.argmin(w[free])]  # argmin takes the first of equals: deterministic
    if w[l] - rest < rest:
      delta[l] += 1
  return delta


def repair_to_budget(counts, r, channels, macs, lower=None, upper=None, rng=None) -> np.ndarray:
  """Projects an integer count vector onto budget r as a hard constraint, (L,) int64.

  The result lies in [lower, upper] elementwise (defaults 0 and C; `counts` is clipped there
  first) and |ratio - r| <= tol (module docstring): within half a channel of the finest movable
  layer whenever cost.lowered_mac_share(lower) <= r <= cost.lowered_mac_share(upper). Channels are added (or removed)
  in proportion to each layer's room towards upper (or lower), then the remainder one whole
  channel at a time: layers by decreasing w_l (fewest channels moved) without `rng`, in a
  random order drawn from `rng` (a numpy Generator or seed) with it. Deterministic given rng.
  A vector that no single one-channel move towards r brings closer is returned unchanged.
  Raises ValueError when no vector in the bounds is within tol of r.

  Args:
    counts: Initial count vector (L,); rounded to integers and clipped into [lower, upper].
    r: Target ratio in [0, 1].
    channels: Feature channels per lowerable layer (L,).
    macs: MACs per lowerable layer (L,).
    lower: Per-layer lower bounds (L,) on the counts; default 0.
    upper: Per-layer upper bounds (L,) on the counts; default `channels`.
    rng: None for the deterministic order (decreasing w_l), else a numpy Generator or seed that
      draws the order in which layers take the remainder.

  Returns:
    The repaired count vector, (L,) int64.

  Raises:
    ValueError: If channels/macs are invalid (`check_problem`), r is outside [0, 1], the bounds do
      not satisfy 0 <= lower <= upper <= C, or no vector in the bounds is within tol of r.
  """
  _, channels, macs = check_problem(None, channels, macs)
  if not 0 <= r <= 1:
    raise ValueError(f"ratio must be in [0, 1], got {r}")
  lower = np.zeros_like(channels) if lower is None else np.asarray(lower, np.int64)
  upper = channels.copy() if upper is None else np.asarray(upper, np.int64)
  if np.any(lower < 0) or np.any(upper > channels) or np.any(lower > upper):
    raise ValueError("bounds must satisfy 0 <= lower <= upper <= C")
  w = cost.macs_per_channel(channels, macs)
  return repair_validated(counts, r, w, float(np.sum(macs)), lower, upper, rng)


def repair_validated(counts, r, w, total, lower, upper, rng) -> np.ndarray:
  """`repair_to_budget` without input validation, for callers that repair in a loop.

  Args:
    counts: Initial count vector (L,); rounded to integers and clipped into [lower, upper].
    r: Target ratio in [0, 1].
    w: MACs per feature channel of each layer (L,), w_l = M_l / C_l.
    total: Sum of the lowerable layers' MACs.
    lower: Per-layer lower bounds (L,) int64.
    upper: Per-layer upper bounds (L,) int64.
    rng: None for the deterministic order (decreasing w), else a numpy Generator or seed.

  Returns:
    The repaired count vector, (L,) int64.

  Raises:
    ValueError: If the result is still farther than tol from r (the budget is unreachable within
      the bounds).
  """
  counts = np.clip(np.round(np.asarray(counts, np.float64)).astype(np.int64), lower, upper)
  if rng is None:
    order = np.argsort(-w, kind="stable")
  else:
    order = np.random.default_rng(rng).permutation(w.size)
  deficit = r * total - float(counts @ w)  # MACs to add (< 0: to remove)
  if deficit > 0:
    counts = counts + _fill(upper - counts, w, deficit, order)
  elif deficit < 0:
    counts = counts - _fill(counts - lower, w, -deficit, order)
  tol = float(np.max(w)) / total
  if abs(float(counts @ w) / total - r) > tol * (1 + 1e-6):
    raise ValueError(f"budget {r} unreachable within bounds: best ratio {float(counts @ w) / total}"
                     f" (tolerance {tol})")
  return counts


def counts_for_uniform_ratio(r, channels, macs=None, lower=None) -> np.ndarray:
  """The same ratio r in every layer, (L,) int64.

  Without `macs`: round(r * C_l) per layer. With `macs`: each layer gets floor or ceil of
  r * C_l, chosen so the global MAC ratio is as close to r as the repair gets (within tol / 2).
  `lower` (e.g. the previous level's counts, for nesting) raises the floor where needed.

  Args:
    r: Target ratio in [0, 1].
    channels: Feature channels per lowerable layer (L,).
    macs: MACs per lowerable layer (L,), or None for plain per-layer rounding.
    lower: Optional per-layer minimum counts (L,).

  Returns:
    The count vector, (L,) int64.

  Raises:
    ValueError: If r is outside [0, 1], or (with `macs`) the budget cannot be reached.
  """
  channels = np.asarray(channels, np.int64)
  if not 0 <= r <= 1:
    raise ValueError(f"ratio must be in [0, 1], got {r}")
  exact = r * channels
  # Slack so 0.3 * 10 = 3.0000000000000004 counts as the integer 3.
  lo = np.floor(exact + 1e-9).astype(np.int64)
  hi = np.ceil(exact - 1e-9).astype(np.int64)
  if macs is None:
    counts = np.floor(exact + 0.5).astype(np.int64)
    return counts if lower is None else np.maximum(counts, lower)
  start = np.floor(exact + 0.5)
  if lower is None:
    return repair_to_budget(start, r, channels, macs, lo, hi)
  lower = np.asarray(lower, np.int64)
  try:
    return repair_to_budget(start, r, channels, macs, np.maximum(lo, lower), np.maximum(hi, lower))
  except ValueError:
    # Defensive: the floor/ceil band could be unreachable once `lower` sticks out of it (not
    # seen in 3000 random problems); then widen to [lower, C].
    return repair_to_budget(start, r, channels, macs, lower, channels)
