"""Bit extraction: lowering 8-bit codes to 4 bits per channel, and fitting the extraction position.

FlexiQ (DESIGN §2) lowers a feature channel c by keeping the `low_bits` (4) bits of its 8-bit
code that start at bit `e_c` (the *extraction position*, 0 <= e_c <= bits - low_bits):

    lower(q, e) = clip(floor(q / 2^e + 1/2), lo4, hi4) * 2^e,    (lo4, hi4) = int_range(4, signed)

i.e. round half *up* (add 2^(e-1), arithmetic shift right by e: what hardware does), saturate to
the 4-bit grid ([-8, 7] signed, [0, 15] unsigned), and shift back. The result is kept in 8-bit
code units: a multiple of 2^e inside [lo4, hi4] * 2^e, which for e <= bits - low_bits is still
an int8 (uint8) value, so a lowered channel runs inside the same int8 GEMM as the 8-bit ones and
its real value is `scale * lower(q, e)`.

Fitting `e` minimises, per channel, the (optionally weighted) squared error in code units
Σ w * (q - lower(q, e))^2 over a candidate set, clipping allowed ("dynamic adjustment of the
extraction position"). For activations the codes come from calibration data, accumulated as a
per-channel code histogram (C, 2^bits) so calibration streams over batches; for weights the
codes are the weight tensor itself, with the input-channel axis as the channel axis.

Tie rule (deterministic): among candidates with equal error, the *smallest* e wins (the finer
grid). An all-zero or empty channel has error 0 for every e and therefore gets the smallest
candidate (0 by default).

Numerics: errors are summed in float32. Unweighted errors are integers, so sums are exact (and
the histogram fit equals the direct fit bit for bit) while a channel's total stays below 2^24;
beyond that, candidates whose errors differ by less than float32 roundoff may resolve either way.

Everything is jit-compatible: `signed`, `bits`, `low_bits`, `axis` and `candidates` are static;
codes, `e` and weights may be traced.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from flexiq_jax.numerics.quantizers import int_range
from flexiq_jax.numerics.shapes import channels_first, expand_to_axis

DEFAULT_CANDIDATES = (0, 1, 2, 3, 4)


def lower_codes(q, e, signed: bool, low_bits: int = 4, *, axis: int | None = None):
  """Keeps `low_bits` bits of the codes `q` starting at bit `e`, in the codes' own units.

  Args:
    q: integer codes, in a float or integer array (e.g. int8/uint8/int32), any shape.
    e: extraction positions (int). A scalar, an array that broadcasts against `q`, or a (C,)
      vector with `axis` naming q's channel axis. Must lie in [0, bits - low_bits] for the result
      to be an 8-bit code (not checked: `e` may be traced).
    signed: whether the codes (and the 4-bit grid) are signed.
    low_bits: the lowered bit width (4).
    axis: channel axis of `q` for a (C,) vector `e`; None means `e` already broadcasts.
  Returns:
    `clip(floor(q / 2^e + 1/2), lo4, hi4) * 2^e` with q's shape and dtype (integer inputs are
    computed exactly in int32 with add-and-arithmetic-shift, then cast back; float inputs in
    float32 or wider, so bfloat16 codes round correctly, then cast back).
  """
  q = jnp.asarray(q)
  e = expand_to_axis(jnp.asarray(e, jnp.int32), q.ndim, axis)
  lo4, hi4 = int_range(low_bits, signed)
  if jnp.issubdtype(q.dtype, jnp.integer):
    qi = q.astype(jnp.int32)
    half = jnp.right_shift(jnp.left_shift(jnp.int32(1), e), 1)  # 2^(e-1), 0 for e = 0
    kept = jnp.clip(jnp.right_shift(qi + half, e), lo4, hi4)  # >> on int32 is arithmetic: floor
    return jnp.left_shift(kept, e).astype(q.dtype)
  compute = jnp.promote_types(q.dtype, jnp.float32)
  step = jnp.left_shift(jnp.int32(1), e).astype(compute)  # exact powers of two
  kept = jnp.clip(jnp.floor(q.astype(compute) / step + 0.5), lo4, hi4)
  return (kept * step).astype(q.dtype)


def lower_codes_ste(q, e, signed: bool, low_bits: int = 4, *, axis: int | None = None):
  """`lower_codes` with a straight-through gradient w.r.t. `q` for QAT: 1 where the code rounds
  into the `low_bits` grid, 0 where `lower_codes` clips it (as the 8-bit fake quantizer does).

  Why the clip stops the gradient: with an identity gradient through the clip, QAT at a high
  ratio keeps pushing a lowered value that already sits at the 4-bit limit, the forward never
  shows it, and the weights drift until the same value, not clipped at 8 bits, breaks ratio 0
  (EfficientNet-B0 `:fmnist`: KL to float at ratio 0 rose from 0.003 to 0.38 in 94 steps, most
  of it from the stem feeding a lowered depthwise conv).

  The forward value is exactly `lower_codes(q, e)` when `q` holds integers (the difference
  added to `q` is an integer, so no roundoff). `q` must be a float array here.

  Args:
    q: integer-valued codes in a float array, any shape.
    e: extraction positions: a scalar, an array broadcasting against `q`, or a (C,) vector along `axis`.
    signed: whether the codes (and the 4-bit grid) are signed.
    low_bits: the lowered bit width (4).
    axis: channel axis of `q` for a (C,) vector `e`; None if `e` already broadcasts.

  Returns:
    The lowered codes, shaped and typed as `q`, with the gradient described above.
  """
  q = jnp.asarray(q)
  lowered = lower_codes(q, e, signed, low_bits, axis=axis)
  step = jnp.left_shift(jnp.int32(1), expand_to_axis(jnp.asarray(e, jnp.int32), q.ndim, axis)).astype(q.dtype)
  lo4, hi4 = int_range(low_bits, signed)
  # floor(q / step + 1/2) lies in [lo4, hi4] exactly when q / step lies in [lo4 - 1/2, hi4 + 1/2).
  inside = (q >= (lo4 - 0.5) * step) & (q < (hi4 + 0.5) * step)
  passed = jnp.where(inside, q, jax.lax.stop_gradient(q))
  return passed + jax.lax.stop_gradient(lowered - passed)


def zero_point_candidates(zero_point: int, candidates: Sequence[int] = DEFAULT_CANDIDATES,
                          low_bits: int = 4) -> tuple[int, ...]:
  """The extraction positions that keep an unsigned grid's zero point exact after lowering.

  On an asymmetric grid the real zero is the code `zero_point` (z). A channel lowered at e keeps
  the codes {0, 1, ..., 2^low_bits - 1} * 2^e, so z survives the extraction (`lower_codes(z, e) ==
  z`: zero padding, ReLU-like zeros and the bias correction stay exact) exactly when 2^e divides
  z and z <= (2^low_bits - 1) * 2^e. z = 0 (a symmetric grid) allows every candidate.

  Args:
    zero_point: the 8-bit zero point z, a non-negative Python int.
    candidates: extraction positions to filter.
    low_bits: the lowered bit width.

  Returns:
    The sorted candidates e that keep z exact; empty if none does.
  """
  z, top = int(zero_point), 2 ** low_bits - 1
  return tuple(sorted(int(e) for e in set(candidates) if z % (1 << int(e)) == 0 and z <= top << int(e)))


def _check_candidates(candidates: Sequence[int], bits: int, low_bits: int) -> tuple[int, ...]:
  """Sorted, de-duplicated static candidates, each in [0, bits - low_bits]."""
  cands = tuple(sorted({int(c) for c in candidates}))
  if not cands:
    raise ValueError("need at least one extraction candidate")
  if cands[0] < 0 or cands[-1] > bits - low_bits:
    raise ValueError(f"extraction positions must lie in [0, {bits - low_bits}] for {bits}-bit codes "
                     f"lowered to {low_bits} bits, got {cands}")
  return cands


def _bits_of_histogram(hist) -> int:
  num_codes = hist.shape[-1]
  bits = int(round(math.log2(num_codes))) if num_codes > 0 else 0
  if num_codes < 2 or 2 ** bits != num_codes:
    raise ValueError(f"a code histogram's last axis must have 2^bits bins, got {num_codes}")
  return bits


def code_histogram(q, axis: int | None, signed: bool, bits: int = 8, weights=None):
  """Per-channel histogram of the `bits`-bit codes `q`: shape (C, 2^bits), bin k <-> code qmin + k
  (qmin = int_range(bits, signed)[0], the full not narrow grid).

  `axis` is the channel axis kept (None: the whole tensor, shape (1, 2^bits)). Float codes are
  rounded; codes outside the grid are counted in the end bins. Without `weights` the counts are
  int32 (exact, summable across batches by addition); with `weights` (broadcastable against `q`,
  e.g. per-element squared scales) each code adds its weight and the result is float32.

  Args:
    q: codes, float or integer, any shape.
    axis: the channel axis kept, or None.
    signed: whether the grid is signed ([-2^(b-1), 2^(b-1) - 1]) or unsigned ([0, 2^b - 1]).
    bits: code width.
    weights: per-element weights broadcastable against `q`, or None for counts.

  Returns:
    (C, 2^bits) int32 counts, or float32 summed weights with `weights`.

  Raises:
    ValueError: `axis` is out of range.
  """
  q = jnp.asarray(q)
  qmin, _ = int_range(bits, signed)
  num_codes = 2 ** bits
  qc = channels_first(q, axis)  # (C, N)
  codes = jnp.round(qc) if jnp.issubdtype(qc.dtype, jnp.floating) else qc
  idx = jnp.clip(codes.astype(jnp.int32) - qmin, 0, num_codes - 1)
  idx = idx + num_codes * jnp.arange(qc.shape[0], dtype=jnp.int32)[:, None]
  length = qc.shape[0] * num_codes
  if weights is None:
    counts = jnp.bincount(idx.reshape(-1), length=length).astype(jnp.int32)
  else:
    w = channels_first(jnp.broadcast_to(jnp.asarray(weights, jnp.float32), q.shape), axis)
    counts = jnp.bincount(idx.reshape(-1), weights=w.reshape(-1), length=length)
  return counts.reshape(qc.shape[0], num_codes)


def _code_values(bits: int, signed: bool):
  qmin, _ = int_range(bits, signed)
  return jnp.arange(2 ** bits, dtype=jnp.float32) + qmin


def extraction_errors_from_histogram(hist, signed: bool, candidates: Sequence[int] = DEFAULT_CANDIDATES,
                                     weights=None, low_bits: int = 4):
  """Squared lowering error Σ_code count * (code - lower(code, e))^2 for every candidate e.

  hist: (..., 2^bits) counts (e.g. (C, 256) from `code_histogram`); `weights` optionally
  multiplies the counts (broadcastable against `hist`). Candidates are used in the given order
  (not checked against the grid).

  Args:
    hist: (..., 2^bits) code histogram; bin k is code qmin + k.
    signed: whether the histogram's grid is signed.
    candidates: K extraction positions.
    weights: factors on the counts, or None.
    low_bits: the lowered bit width.

  Returns:
    float32 (K, ...), K = len(candidates).

  Raises:
    ValueError: the last axis of `hist` is not a power of two >= 2.
  """
  hist = jnp.asarray(hist)
  bits = _bits_of_histogram(hist)
  counts = hist.astype(jnp.float32)
  if weights is not None:
    counts = counts * jnp.asarray(weights, jnp.float32)
  codes = _code_values(bits, signed)
  cands = jnp.asarray(candidates, jnp.int32)
  table = (codes - lower_codes(codes[None, :], cands[:, None], signed, low_bits)) ** 2  # (K, B)
  table = table.reshape((len(candidates),) + (1,) * (counts.ndim - 1) + (codes.shape[0],))
  # Elementwise then sum (not a matmul): exact float32 on every backend, no reduced precision.
  return (counts[None] * table).sum(-1)


def fit_extraction_from_histogram(hist, signed: bool, candidates: Sequence[int] = DEFAULT_CANDIDATES,
                                  weights=None, low_bits: int = 4):
  """Per-channel extraction position minimising the histogram's squared lowering error (exact for
  the data the histogram counts). hist: (C, 2^bits) (or any (..., 2^bits)). Ties go to the
  smallest e; an empty or all-zero channel gets the smallest candidate.

  Args:
    hist: (C, 2^bits) code histogram (e.g. from `code_histogram`).
    signed: whether the histogram's grid is signed.
    candidates: extraction positions to try (sorted and de-duplicated here).
    weights: factors on the counts, broadcastable against `hist`, or None.
    low_bits: the lowered bit width.

  Returns:
    int32 (C,) (or hist.shape[:-1]) extraction positions.

  Raises:
    ValueError: no candidate, a candidate outside [0, bits - low_bits], or a last axis of `hist` that
      is not a power of two >= 2.
  """
  hist = jnp.asarray(hist)
  cands = _check_candidates(candidates, _bits_of_histogram(hist), low_bits)
  errors = extraction_errors_from_histogram(hist, signed, cands, weights, low_bits)
  return jnp.asarray(cands, jnp.int32)[jnp.argmin(errors, axis=0)]  # argmin: first = smallest e


def lowering_error(q, e, axis: int | None, signed: bool, weights=None, low_bits: int = 4):
  """Per-channel Σ w * (q - lower(q, e))^2 in code units (float32, shape (C,); (1,) for
  axis=None). `e`: a scalar or a (C,) vector along `axis`; `weights` broadcast against `q`.

  Args:
    q: codes, any shape.
    e: a scalar extraction position, or a (C,) vector along `axis`.
    axis: the channel axis kept, or None for the whole tensor.
    signed: whether the codes are signed.
    weights: per-element squared-error weights broadcastable against `q`, or None.
    low_bits: the lowered bit width.

  Returns:
    float32 (C,) (or (1,) for axis None) summed errors.

  Raises:
    ValueError: `axis` is out of range.
  """
  q = jnp.asarray(q)
  e = jnp.asarray(e, jnp.int32)
  lowered = lower_codes(q, e, signed, low_bits, axis=axis if e.ndim == 1 else None)
  err = (q.astype(jnp.float32) - lowered.astype(jnp.float32)) ** 2
  if weights is not None:
    err = err * jnp.asarray(weights, jnp.float32)
  return channels_first(jnp.broadcast_to(err, q.shape), axis).sum(axis=1)


def extraction_errors(q, axis: int | None, signed: bool, candidates: Sequence[int] = DEFAULT_CANDIDATES,
                      weights=None, low_bits: int = 4):
  """`lowering_error` for each candidate e (all channels at the same e): float32 (K, C).

  Args:
    q: codes, any shape.
    axis: the channel axis kept, or None.
    signed: whether the codes are signed.
    candidates: K extraction positions, used in the given order.
    weights: per-element squared-error weights broadcastable against `q`, or None.
    low_bits: the lowered bit width.

  Returns:
    float32 (K, C) errors.
  """
  return jnp.stack([lowering_error(q, c, axis, signed, weights, low_bits) for c in candidates])


def fit_extraction(q, axis: int | None, signed: bool, candidates: Sequence[int] = DEFAULT_CANDIDATES,
                   weights=None, low_bits: int = 4, bits: int = 8):
  """Per-channel extraction position fitted directly on codes `q` (no histogram).

  For weights: q = the weight codes, `axis` = the input-channel (feature) axis, and optionally
  `weights` = per-element squared-error weights broadcast against q (e.g. s_w[o]^2 along the
  output axis) so that the fit minimises the real-valued error across output channels with
  different scales. Same objective, candidates check and tie rule (smallest e) as
  `fit_extraction_from_histogram`; `bits` only bounds the candidates.

  Args:
    q: codes, any shape.
    axis: the channel axis kept, or None.
    signed: whether the codes are signed.
    candidates: extraction positions to try (sorted and de-duplicated here).
    weights: per-element squared-error weights, or None.
    low_bits: the lowered bit width.
    bits: code width, bounding the candidates to [0, bits - low_bits].

  Returns:
    int32 (C,) extraction positions.

  Raises:
    ValueError: no candidate or a candidate out of range.
  """
  cands = _check_candidates(candidates, bits, low_bits)
  errors = extraction_errors(q, axis, signed, cands, weights, low_bits)
  return jnp.asarray(cands, jnp.int32)[jnp.argmin(errors, axis=0)]
