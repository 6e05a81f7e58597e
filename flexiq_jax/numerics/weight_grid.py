"""The 8-bit weight grid of a lowerable layer, chosen with its 4-bit extraction in view.

Weights are symmetric per output channel: `s_w[o] = max|W[:, o]| / d[o]`, codes
`clip(round(W / s_w), -127, 127)`. The divisor `d` is the code the largest weight of the channel
lands on (the hardware contract is unchanged: one int8 scale per output channel; only the value
of the scale moves). With `d = 127` (the narrow grid's top) and the usual fitted weight shift
`f = 4`, the 4-bit grid is {-8..7}·16, so codes 120..127 round to 128 and saturate at 112: the
largest weight of every such channel shrinks by up to 12 % when it is lowered, a gain error that
bias correction (a mean correction) cannot remove. The modes (`WEIGHT_SCALE_MODES`):

* `max127`: `d = 127` (the full 8-bit range; the 4-bit top clips).
* `max112`: `d = 112 = 7·16`, the top of the 4-bit grid at `f = 4`: the largest weight is exact
  in both grids, at 127/112 (1.13x) coarser 8-bit steps.
* `joint`: per output channel, the `d` of `JOINT_CANDIDATES` that minimises the summed squared
  real-valued error of the 8-bit and the 4-bit weights, `Σ (w − s·q)² + Σ (w − s·lower(q, f_c))²`,
  with `f_c` fitted (as calibration fits it) at each candidate. Ties: the larger `d`.

Layers that are never lowered (`keep_8bit`) keep `d = 127` in every mode.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax.numerics.extraction import DEFAULT_CANDIDATES, lower_codes
from flexiq_jax.numerics.quantizers import MIN_RANGE, WEIGHT_QMAX_8BIT

WEIGHT_SCALE_MODES = ("max127", "max112", "joint")
JOINT_CANDIDATES = (96, 100, 104, 108, 112, 116, 120, 124, 127)


def codes_at(w, qmax):
  """(scale (O,), codes) of a weight matrix `w` (..., O) with max |w| on code `qmax` ((O,) or scalar).

  Args:
    w: weights with output channels on the last axis.
    qmax: the code each output channel's max |w| lands on, a scalar or (O,).

  Returns:
    (scale, codes): float32 (O,) scale max(max |w|, MIN_RANGE) / qmax, and the float codes
    clip(round(w / scale), -127, 127) shaped as `w`.
  """
  absmax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)))
  scale = jnp.maximum(absmax, MIN_RANGE) / jnp.asarray(qmax, jnp.float32)
  return scale, jnp.clip(jnp.round(w / scale), -WEIGHT_QMAX_8BIT, WEIGHT_QMAX_8BIT)


def fit_weight_shift(q, scale, index, num_channels: int, candidates: Sequence[int] = DEFAULT_CANDIDATES):
  """Per feature channel c, the f minimising Σ s[o]² (q − lower(q, f))² over the kernel elements
  reading c (index: the feature channel of each element, broadcast against q). Ties go to the
  smallest f (the first of `candidates`, which are used in the given order).

  Args:
    q: signed weight codes (..., I, O).
    scale: (O,) per-output-channel weight scale.
    index: feature channel of each kernel element, broadcastable against `q` (e.g. (I, O)).
    num_channels: C, the number of feature channels.
    candidates: extraction positions to try.

  Returns:
    (f, error): int32 (C,) positions and float32 (C,) minimal errors in real units.
  """
  index = jnp.broadcast_to(index, q.shape).reshape(-1)
  errors = jnp.stack([
      jax.ops.segment_sum(((q - lower_codes(q, f, signed=True)) ** 2 * scale ** 2).reshape(-1), index,
                          num_segments=num_channels) for f in candidates])
  return jnp.asarray(candidates, jnp.int32)[jnp.argmin(errors, axis=0)], jnp.min(errors, axis=0)


def joint_qmax(w, index, num_channels: int, candidates: Sequence[int] = JOINT_CANDIDATES,
               shift_candidates: Sequence[int] = DEFAULT_CANDIDATES) -> np.ndarray:
  """Per output channel, the top code `d` (module docstring, mode 'joint').

  Args:
    w: the weight matrix (..., I, O) (a conv kernel (kh, kw, I, O) as is).
    index: (I, O) feature channel of each kernel row (`layer_ops.weight_channel_index`).
    num_channels: C, the layer's feature channels.
    candidates: the top codes tried (integers in [1, 127]).
    shift_candidates: the weight extraction positions fitted at each candidate.
  Returns:
    float32 (O,): the chosen `d` per output channel.
  """
  w = jnp.asarray(w, jnp.float32)
  index = jnp.broadcast_to(jnp.asarray(index), w.shape)
  totals = []
  for d in candidates:
    scale, q = codes_at(w, float(d))
    f, _ = fit_weight_shift(q, scale, index, num_channels, shift_candidates)
    low = lower_codes(q, f[index], signed=True)
    axes = tuple(range(w.ndim - 1))
    totals.append(jnp.sum((w - scale * q) ** 2, axis=axes) + jnp.sum((w - scale * low) ** 2, axis=axes))
  totals = np.asarray(jnp.stack(totals))  # (K, O)
  cands = np.asarray(candidates, np.float32)
  # Ties go to the larger d: argmin over the reversed candidates.
  best = len(candidates) - 1 - np.argmin(totals[::-1], axis=0)
  return cands[best]


def weight_qmax(mode: str, w, index, num_channels: int, lowerable: bool) -> np.ndarray:
  """float32 (O,) top code per output channel for `quant.weight_scale = mode` (module docstring).

  Args:
    mode: one of WEIGHT_SCALE_MODES ('max127', 'max112', 'joint').
    w: the weight matrix (..., I, O).
    index: (I, O) feature channel of each kernel row (used by 'joint').
    num_channels: C, the layer's feature channels (used by 'joint').
    lowerable: whether the layer may be lowered; if not, 127 in every mode.

  Returns:
    float32 (O,) numpy array of top codes.

  Raises:
    ValueError: `mode` is unknown.
  """
  if mode not in WEIGHT_SCALE_MODES:
    raise ValueError(f"unknown quant.weight_scale {mode!r}; use one of {', '.join(WEIGHT_SCALE_MODES)}")
  out_channels = np.shape(w)[-1]
  if mode == "max127" or not lowerable:
    return np.full((out_channels,), float(WEIGHT_QMAX_8BIT), np.float32)
  if mode == "max112":
    return np.full((out_channels,), 112.0, np.float32)
  return joint_qmax(w, index, num_channels)
