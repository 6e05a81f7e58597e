"""LSQ for a scale shared by 8-bit channels and channels lowered by bit extraction: an activation
scale (`lsq_quantize_lower`) or a per-output-channel weight scale (`lsq_quantize_lower_weights`).

A lowered channel's real value is `s · lower(q, e)`: a 4-bit grid of step `s' = s · 2^e`. Plain
LSQ through the 8-bit quantizer treats it as an 8-bit channel: its gradient to `s` is
`2^e · (q4 − v4)` per element (`v4 = x / s'`), and its gradient scale counts 255 levels, so the
relative update it gives `s` is up to `4^e` times what LSQ would give a 4-bit quantizer of step
`s'` (256x at e = 4): learnt scales diverge at high ratios.

`lsq_quantize_lower` keeps the forward of the FlexiQ quantizer exactly (8-bit codes, then the
extraction: double rounding, half-even then half-up) and gives LSQ's gradients per grid:

  d/dx  = 1 where the value lies inside its grid (8-bit, and for a lowered channel the 4-bit
          clip too), else 0 (the clipped STE);
  d/ds  = Σ over 8-bit elements  g8 · (q − v·inside)
        + Σ over lowered elements g4 · (lower(q, e) − v·inside) / 4^e

with `v = x / s`, `g8 = 1 / sqrt(N · Q8)`, `g4 = 1 / sqrt(N · Q4)` (N features per example,
Q8 = 255 or 127, Q4 = 15 or 7 the positive level counts): each lowered element moves `s` as LSQ
would move its own step `s'`, relative to its size. For weights N counts the weights of one
output channel, Q8 = 127 and Q4 = 7; plain LSQ through the 8-bit weight quantizer, with the
extraction's straight-through gradient after it, leaves each lowered weight a gradient
`lower(q, e) − q` to its scale without any gradient scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flexiq_jax.numerics.extraction import lower_codes
from flexiq_jax.numerics.quantizers import _scale_gradient, int_range
from flexiq_jax.numerics.shapes import expand_to_axis


def lsq_quantize_lower(x, scale, e, lowered, *, signed: bool, features: int, bits: int = 8, low_bits: int = 4,
                       zero_point=0.0):
  """Codes of `x` (float, integer-valued) at scale `scale`, channels `lowered` extracted at `e`.

  On an asymmetric grid (`zero_point` z > 0, unsigned codes) the codes are clip(round(x / s) + z)
  and the real value (codes - z) * s; the gradients are those of that value (d/ds of an element
  clipped at the grid's end is its code minus z).

  Args:
    x: activations (..., C), channels last.
    scale: the per-tensor scale (a scalar, learnt).
    e: (C,) extraction positions.
    lowered: (C,) bool, the lowered channels.
    signed: the grid's sign.
    features: N, the values per example that share the scale (LSQ's gradient scale).
    bits, low_bits: the base and the lowered width.
    zero_point: the grid's zero point z (a scalar holding an integer; 0 on a symmetric grid).
  Returns:
    Codes in 8-bit units (the lowered ones multiples of 2^e), exactly the values of
    `where(lowered, lower_codes(q, e), q)` with `q = clip(round(x / scale) + z)`. Minus z and
    multiplied by `stop_gradient(scale)` they carry the gradients of the module docstring (to `x`
    and to `scale`); do not multiply them by a `scale` that carries a gradient as well.
  """
  x = jnp.asarray(x)
  qmin, qmax = int_range(bits, signed)
  axis = x.ndim - 1
  e = expand_to_axis(jnp.asarray(e, jnp.int32), x.ndim, axis)
  lowered = expand_to_axis(jnp.asarray(lowered), x.ndim, axis)
  return _lsq_codes(x, scale, e, lowered, qmin=qmin, qmax=qmax, signed=signed, features=features,
                    low_bits=low_bits, zero_point=zero_point)


def lsq_quantize_lower_weights(w, scale, e, lowered, *, qmax: int = 127, low_bits: int = 4):
  """Weight codes of `w` at a learnt per-output-channel scale, the rows `lowered` extracted at `e`.

  The weights' counterpart of `lsq_quantize_lower` (the module docstring's gradients, per output
  channel): symmetric signed codes clip(round(w / s), -qmax, qmax), each row of a lowered feature
  channel then kept on its 4-bit grid (`lower_codes`, signed). LSQ's gradient scale counts the
  weights of one output channel (N = w.size / O) and each element's own grid's levels: a lowered
  weight moves its channel's scale as LSQ would move the 4-bit step `s · 2^e`, relative to its size.

  Args:
    w: the kernel as a matrix (C, O) or HWIO (kh, kw, I, O); output channels last.
    scale: (O,) the learnt per-output-channel scale.
    e: the weight extraction positions per kernel row, broadcastable against `w` (e.g. (I, O)).
    lowered: bool, broadcastable against `w`: the rows of lowered feature channels.
    qmax: the largest weight code (the grid is [-qmax, qmax]).
    low_bits: the lowered width.
  Returns:
    Codes in 8-bit units with w's shape, exactly `where(lowered, lower_codes(q, e), q)` with
    `q = clip(round(w / scale), -qmax, qmax)`; multiplied by `stop_gradient(scale)` they carry the
    gradients to `w` and `scale`.
  """
  w = jnp.asarray(w)
  scale = jnp.asarray(scale)
  features = w.size // max(scale.size, 1)
  return _lsq_codes(w, scale, jnp.asarray(e, jnp.int32), jnp.asarray(lowered), qmin=-qmax, qmax=qmax, signed=True,
                    features=features, low_bits=low_bits, zero_point=0.0)


def _lsq_codes(x, scale, e, lowered, *, qmin: int, qmax: int, signed: bool, features: int, low_bits: int,
               zero_point):
  """`lsq_quantize_lower`'s computation for `e` and `lowered` that already broadcast against `x`
  and a `scale` that does (a scalar or a trailing-axis vector)."""
  lo4, hi4 = int_range(low_bits, signed)
  s = jax.lax.stop_gradient(scale)
  z = jax.lax.stop_gradient(jnp.asarray(zero_point, x.dtype))
  v = x / s + z
  q = jnp.clip(jnp.round(x / s) + z, qmin, qmax)
  low = lower_codes(q, e, signed=signed, low_bits=low_bits)
  codes = jax.lax.stop_gradient(jnp.where(lowered, low, q))
  step = jnp.exp2(e.astype(x.dtype))
  inside8 = (v >= qmin) & (v <= qmax)
  # floor(q / step + 1/2) lies in [lo4, hi4] exactly when q lies in [(lo4 - 1/2) step, (hi4 + 1/2) step).
  inside4 = (q >= (lo4 - 0.5) * step) & (q < (hi4 + 0.5) * step)
  inside = jnp.where(lowered, inside8 & inside4, inside8)
  inside_f = jax.lax.stop_gradient(inside.astype(x.dtype))
  g8 = 1.0 / jnp.sqrt(features * float(qmax))
  g4 = 1.0 / jnp.sqrt(features * float(hi4))
  per_element = jnp.where(lowered, g4 / (step * step), g8)
  # Surrogate in real units: its value is 0, its gradients those of the docstring.
  scale_b = _scale_gradient(jnp.broadcast_to(scale, x.shape), jax.lax.stop_gradient(per_element))
  offset = jax.lax.stop_gradient(codes - z - (v - z) * inside_f)
  surrogate = inside_f * x + scale_b * offset
  return codes + (surrogate - jax.lax.stop_gradient(surrogate)) / s  # the value: codes + 0, exactly
