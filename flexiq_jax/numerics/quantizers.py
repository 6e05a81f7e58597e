"""Uniform integer quantizers: integer grids, (fake) quantization, straight-through estimators, LSQ.

Conventions (DESIGN §2):
  * A quantizer maps a real `x` to an integer *code* `q = clip(round(x / scale) + zero_point,
    qmin, qmax)` and back by `(q - zero_point) * scale`. Codes are held in a float array (the
    dtype of `x / scale`) whose values are integers; cast them yourself for an integer kernel.
  * Rounding is round-half-to-even (`jnp.round`), the IEEE default and what XLA's integer
    converters use.
  * `scale` and `zero_point` broadcast against `x`: a scalar is per-tensor; a per-channel vector
    (C,) is either pre-shaped by the caller or expanded along `axis=` (the channel axis kept).
  * `zero_point` is a float holding an integer inside [qmin, qmax].
  * Every function here is jit-compatible: bit widths, `signed`, `narrow` and `axis` are static
    Python values; `x`, `scale`, `zero_point` (and `qmin`/`qmax` if you like) may be traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flexiq_jax.numerics.shapes import expand_to_axis

# Floor on a calibrated range so that an all-zero or constant tensor never yields scale 0 / NaN.
MIN_RANGE = 1e-8


def int_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
  """The integer grid (qmin, qmax) of a `bits`-bit code.

  signed: [-2^(b-1), 2^(b-1) - 1]; with `narrow`, [-(2^(b-1) - 1), 2^(b-1) - 1] (symmetric, as
  for 8-bit weights in [-127, 127]). unsigned: [0, 2^b - 1]; `narrow` has no effect there.

  Args:
    bits: code width, a static Python int >= 1.
    signed: signed or unsigned grid.
    narrow: drop the most negative signed code.

  Returns:
    (qmin, qmax) as Python ints.

  Raises:
    ValueError: `bits` < 1.
  """
  if bits < 1:
    raise ValueError(f"bits must be >= 1, got {bits}")
  if signed:
    half = 2 ** (bits - 1)
    return (-(half - 1) if narrow else -half), half - 1
  return 0, 2 ** bits - 1


@jax.custom_jvp
def round_ste(x):
  """Round half to even in the forward pass; identity gradient (straight-through estimator).

  Args:
    x: real values, any shape.

  Returns:
    jnp.round(x); its JVP passes the input tangent through unchanged.
  """
  return jnp.round(x)


@round_ste.defjvp
def _round_ste_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  return jnp.round(x), x_dot


@jax.custom_jvp
def _round_clip_ste(v, qmin, qmax):
  """clip(round(v), qmin, qmax) with the *clipped* STE: d/dv = 1 where qmin <= v <= qmax, else 0.

  Written in code space, so that `(_round_clip_ste(x / s + zp) - zp) * s` differentiated by
  autodiff gives both the clipped STE for `x` and the LSQ gradient for `s` (see lsq_fake_quant).
  `qmin`/`qmax` get zero gradient.
  """
  return jnp.clip(jnp.round(v), qmin, qmax)


@_round_clip_ste.defjvp
def _round_clip_ste_jvp(primals, tangents):
  v, qmin, qmax = primals
  v_dot = tangents[0]
  inside = (v >= qmin) & (v <= qmax)
  # zeros_like keeps the tangent's dtype (a symbolic-zero input tangent arrives instantiated).
  return _round_clip_ste(v, qmin, qmax), jnp.where(inside, v_dot, jnp.zeros_like(v_dot))


def quantize(x, scale, zero_point, qmin, qmax, *, axis: int | None = None):
  """Integer codes `clip(round(x / scale) + zero_point, qmin, qmax)`, in a float dtype.

  Args:
    x: real values, any shape.
    scale, zero_point: broadcast against `x`, or (C,) vectors expanded along `axis`.
    qmin, qmax: the integer grid, e.g. from `int_range`.
    axis: channel axis of `x` that per-channel (C,) `scale`/`zero_point` run along; None means
      they are scalars or already shaped to broadcast.
  Returns:
    Codes with integer values, dtype of `x / scale`. Not differentiable in a useful way (round
    has zero gradient); use `fake_quant` / `round_ste` for training.
  """
  x = jnp.asarray(x)
  scale = expand_to_axis(scale, x.ndim, axis)
  zero_point = expand_to_axis(zero_point, x.ndim, axis)
  return jnp.clip(jnp.round(x / scale) + zero_point, qmin, qmax)


def dequantize(codes, scale, zero_point, *, axis: int | None = None):
  """Real values `(codes - zero_point) * scale`; broadcasting as in `quantize`.

  Args:
    codes: integer-valued codes, any shape.
    scale: scalar, broadcastable array, or (C,) vector expanded along `axis`.
    zero_point: as `scale`.
    axis: channel axis of `codes` for (C,) parameters; None if they already broadcast.

  Returns:
    The real values, shaped as the broadcast of `codes` with the parameters.

  Raises:
    ValueError: `axis` is out of range, or a parameter to expand is not 1-D.
  """
  codes = jnp.asarray(codes)
  scale = expand_to_axis(scale, codes.ndim, axis)
  zero_point = expand_to_axis(zero_point, codes.ndim, axis)
  return (codes - zero_point) * scale


def fake_quant(x, scale, zero_point, qmin, qmax, *, axis: int | None = None):
  """`dequantize(quantize(x))` with the clipped straight-through estimator.

  Forward: exactly `(clip(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale`.
  Gradient w.r.t. `x`: 1 where the *unrounded* code `x / scale + zero_point` lies in
  [qmin, qmax], 0 outside (clipped values do not move). Gradients w.r.t. `scale` and
  `zero_point` are those of the code-space STE (for `scale` the LSQ form without its gradient
  scale; see `lsq_fake_quant`); freeze them with `jax.lax.stop_gradient` if unwanted.

  Args:
    x: real values, any shape.
    scale: scalar, broadcastable array, or (C,) vector expanded along `axis`.
    zero_point: as `scale`; a float holding an integer in [qmin, qmax].
    qmin: lowest code.
    qmax: highest code.
    axis: channel axis of `x` for (C,) parameters; None if they already broadcast.

  Returns:
    The fake-quantized values, shaped as `x` (broadcast with the parameters).

  Raises:
    ValueError: `axis` is out of range, or a parameter to expand is not 1-D.
  """
  x = jnp.asarray(x)
  scale = expand_to_axis(scale, x.ndim, axis)
  zero_point = expand_to_axis(zero_point, x.ndim, axis)
  codes = _round_clip_ste(x / scale + zero_point, qmin, qmax)
  return (codes - zero_point) * scale


@jax.custom_jvp
def _scale_gradient(value, factor):
  """Identity in the forward pass; multiplies the incoming tangent by `factor` (no roundoff in
  the forward value, unlike the `v*g + stop_gradient(v - v*g)` trick)."""
  del factor
  return value


@_scale_gradient.defjvp
def _scale_gradient_jvp(primals, tangents):
  value, factor = primals
  return value, tangents[0] * jax.lax.stop_gradient(factor)


def lsq_default_grad_scale(x_size: int, num_scales: int, qmax):
  """LSQ's gradient scale g = 1 / sqrt(N * Q_P): N = elements per scale, Q_P = qmax.

  Args:
    x_size: number of elements quantized.
    num_scales: number of scales they share (1 per-tensor, C per-channel).
    qmax: the grid's highest code Q_P (scalar or array).

  Returns:
    g as a float32 JAX array (shaped as `qmax`).
  """
  return 1.0 / jnp.sqrt(x_size / num_scales * jnp.asarray(qmax, jnp.float32))


def lsq_fake_quant(x, scale, qmin, qmax, grad_scale=None, *, axis: int | None = None, zero_point=0.0):
  """Learned Step Size Quantization (Esser et al., ICLR 2020): fake quant with a learnt step.

  Forward: `(clip(round(x / scale) + z, qmin, qmax) - z) * scale`, identical to `fake_quant(x,
  scale, z, qmin, qmax)` (z = `zero_point`, a fixed integer, 0 for LSQ's symmetric grids).
  Gradients, with v = x / scale + z:
    d/dx     = 1 if qmin <= v <= qmax else 0                     (clipped STE)
    d/dscale = (round(v) - v if qmin <= v <= qmax else clip(v, qmin, qmax) - z) * grad_scale
               summed over the elements sharing the scale.
  `grad_scale` defaults to 1 / sqrt(x.size / scale.size * qmax) (N elements per scale, Q_P = qmax).
  `scale` may be per-tensor or per-channel (pre-shaped, or (C,) with `axis`).

  Args:
    x: real values, any shape.
    scale: the learnt step size(s), positive.
    qmin: lowest code.
    qmax: highest code.
    grad_scale: factor on the scale's gradient, or None for the default above.
    axis: channel axis of `x` for a (C,) `scale`; None if it already broadcasts.
    zero_point: the grid's fixed zero point (no gradient), a scalar holding an integer.

  Returns:
    The fake-quantized values, shaped as `x`.

  Raises:
    ValueError: `axis` is out of range, or a (C,) scale to expand is not 1-D.
  """
  x = jnp.asarray(x)
  scale = expand_to_axis(scale, x.ndim, axis)
  if grad_scale is None:
    grad_scale = lsq_default_grad_scale(x.size, jnp.size(scale), qmax)
  scale = _scale_gradient(scale, grad_scale)
  z = jax.lax.stop_gradient(jnp.asarray(zero_point, jnp.float32))
  return (_round_clip_ste(x / scale + z, qmin, qmax) - z) * scale


def scale_from_range(lo, hi, bits: int, symmetric: bool, signed: bool, narrow: bool = False):
  """(scale, zero_point) mapping the real range [lo, hi] onto the `bits`-bit grid.

  * symmetric, signed: scale = max(|lo|, |hi|) / qmax, zero_point 0.
  * symmetric, unsigned (for non-negative data, e.g. after ReLU): scale = hi / qmax, zero_point 0;
    `lo` is ignored (negative values clip to 0).
  * asymmetric: the range is first widened to contain 0 (lo <= 0 <= hi, so that 0 is exactly
    representable and the zero point lands inside the grid, as in TFLite/PyTorch), then
    scale = (hi - lo) / (qmax - qmin), zero_point = clip(round(qmin - lo / scale), qmin, qmax).
  The range is floored at MIN_RANGE before dividing, so an all-zero or constant tensor gives a
  finite, positive scale; a constant tensor quantizes to within half a step of itself (exactly,
  up to float roundoff, for a constant range end).
  `lo`/`hi` may be scalars or per-channel arrays; the outputs have their broadcast shape (float32
  or wider); zero_point is a float holding an integer.

  Args:
    lo: lower end(s) of the range.
    hi: upper end(s) of the range.
    bits: code width.
    symmetric: symmetric (zero point 0) or asymmetric grid.
    signed: signed or unsigned grid.
    narrow: narrow signed grid (see `int_range`).

  Returns:
    (scale, zero_point), both shaped as the broadcast of `lo` and `hi`.

  Raises:
    ValueError: `bits` < 1.
  """
  qmin, qmax = int_range(bits, signed, narrow)
  lo = jnp.asarray(lo, jnp.result_type(lo, jnp.float32))
  hi = jnp.asarray(hi, jnp.result_type(hi, jnp.float32))
  if symmetric:
    if signed:
      extent = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    else:
      extent = jnp.broadcast_to(hi, jnp.broadcast_shapes(lo.shape, hi.shape))
    scale = jnp.maximum(extent, MIN_RANGE) / qmax
    return scale, jnp.zeros_like(scale)
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  scale = jnp.maximum(hi - lo, MIN_RANGE) / (qmax - qmin)
  zero_point = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
  return scale, zero_point


# ----------------------------------------------------------------------------------------------
# Per-output-channel weights and bit widths held as traced data.

WEIGHT_QMAX_8BIT = 127  # symmetric narrow int8 weights: [-127, 127]


def per_channel_weight_scale(w, qmax=WEIGHT_QMAX_8BIT):
  """Symmetric scale per output channel (the last axis) from the current weights; no gradient
  flows through it (the weights' straight-through estimator carries the gradient).

  Args:
    w: weights with output channels on the last axis ((C, O) or HWIO).
    qmax: the code max |w| lands on, a scalar or (O,).

  Returns:
    (O,) scale, max(max |w|, MIN_RANGE) / qmax over all axes but the last.
  """
  absmax = jnp.max(jnp.abs(jax.lax.stop_gradient(w)), axis=tuple(range(w.ndim - 1)))
  return jnp.maximum(absmax, MIN_RANGE) / qmax


def _pow2(bits):
  return jnp.exp2(jnp.maximum(bits, 2).astype(jnp.float32))


def traced_int_range(bits, signed: bool):
  """`int_range` for a traced bit width (as float32 bounds; widths below 2 act as 2).

  Args:
    bits: bit width, possibly traced.
    signed: signed (full, not narrow) or unsigned grid.

  Returns:
    (qmin, qmax) as float32 scalars or arrays shaped as `bits`.
  """
  if signed:
    half = _pow2(bits) / 2
    return -half, half - 1
  return jnp.float32(0.0), _pow2(bits) - 1


def fake_quant_traced_bits(x, clip, bits, signed: bool):
  """Symmetric per-tensor fake quant over [-clip, clip] (signed) or [0, clip] (unsigned) with a
  traced bit width: one compilation serves every width.

  The signed grid is the full one ([-2^(b-1), 2^(b-1) - 1]); rounding is plain `jnp.round` (no
  straight-through gradient).

  Args:
    x: real values.
    clip: the range end (scale = clip / qmax).
    bits: bit width, possibly traced (below 2 acts as 2).
    signed: signed or unsigned grid.

  Returns:
    The fake-quantized values, shaped as `x`.
  """
  qmin, qmax = traced_int_range(bits, signed)
  scale = jnp.maximum(clip, MIN_RANGE) / qmax
  return jnp.clip(jnp.round(x / scale), qmin, qmax) * scale


def fake_quant_weight_traced_bits(w, clip, bits):
  """Symmetric narrow-grid fake quant per output channel: w (..., O), clip (O,), traced bits.

  Args:
    w: weights with output channels on the last axis.
    clip: (O,) per-output-channel range end (scale = clip / (2^(b-1) - 1)).
    bits: bit width, possibly traced (below 2 acts as 2).

  Returns:
    The fake-quantized weights, shaped as `w`.
  """
  qmax = _pow2(bits) / 2 - 1
  scale = jnp.maximum(clip, MIN_RANGE) / qmax
  return jnp.clip(jnp.round(w / scale), -qmax, qmax) * scale
