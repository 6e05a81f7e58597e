"""Fused Pallas kernels for a quantized dense layer at a run-time ratio.

`fused_dense` computes, in one kernel, what `integer.integer_forward` computes for a dense layer
(serving form, `integer.prepare_layer`): quantize the float activation to 8-bit codes, lower the
`lowered` channels' codes to 4 bits by bit extraction, take those channels' weight rows from
`w_low` and the others' from the int8 kernel (masked loads: each row is fetched from one of the
two), int8 x int8 -> int32 GEMM, epilogue `acc * scale (+ bias correction) + bias`. Its output is
bit for bit that of `integer_forward` under jit (tests/test_pallas_dense.py, interpret mode).

`fused_dense_packed` is the form whose cost falls with the ratio on hardware without 4-bit
arithmetic: `pack_lowered_rows` stores the weight rows in *rank order* (the lowering order:
position p holds the channel `order[p]`, and at a ratio the lowered channels are exactly the
positions p < count), once as int8 rows and once as 4-bit values k (the lowered code is
k * 2^e_c, k in [-8, 7]) packed two per byte. The kernel reads positions p < count from the packed
rows (half the bytes) and the rest from the int8 rows, unpacks k << e_c in registers and runs the
same int8 dot; the activation is permuted into rank order by the wrapper (x[:, order]).
`weight_bytes_read` gives the weight bytes it reads at a count.

Backends: written for the GPU Triton backend of Pallas (`pltriton.CompilerParams` is passed, so
Mosaic GPU is never picked). On CPU only `interpret=True` runs (Pallas has no CPU lowering): that
is what the tests use. Hopper (H100/H200) has no int4 tensor-core instructions, so lowered
channels still run as int8 MACs: packing saves weight *bytes* (what bounds a GEMM at small batch),
never MACs; at large batch the GEMM is compute-bound and the packed form cannot be faster (it does
a little more work: unpacking, a branch for the mixed block).

Kernel layout (both kernels): a 2-D grid over (M / block_m, O / block_n) output tiles; each
program holds its (block_m, C) activation rows and (C, block_n) weight columns as refs and loops
over K in steps of block_k: load the float activation tile, quantize (and lower) it in registers,
cast to int8, load (select / unpack) the int8 weight tile, `jnp.dot(..., preferred_element_type=
int32)`. The epilogue converts the int32 accumulator and applies scale, correction and bias in
`integer_forward`'s order; the correction (a masked sum over the (C, O) `lost` table) is computed
outside the kernel by the same function integer_forward uses. Each program quantizes its
activation rows itself, so the elementwise work is repeated O / block_n times: negligible at small
M, where the weights dominate. M, C and O are zero-padded by the wrappers to block multiples
(padded weight rows are 0, so padded activation channels contribute nothing); `pack_lowered_rows`
pads once, at packing time, so `fused_dense_packed` never touches the weights outside the kernel
(`fused_dense` pads kernel and w_low per call unless C and O are block multiples).

`fused_dense_packed` splits the K loop by the traced `count` into: whole blocks of lowered
positions (packed reads only, every channel lowered, no select), at most one mixed block (each
row fetched from the storage it needs, then selected), and whole 8-bit blocks (int8 reads only, no
lowering work). The two loops have traced bounds; Pallas Triton lowers them to `scf.for` and the
mixed block to `scf.if`. One compilation serves every count.

Packed layout: within every block of `block_k` rank positions, byte j of column o holds position
j in its low nibble and position j + block_k/2 in its high nibble. A K step then does two dots of
K = block_k/2 (low nibbles against the first half of the activation tile, high nibbles against the
second half), so no interleaving or value slicing is needed in the kernel (Triton lowers neither
well). The layout depends on block_k, which `PackedRows` records with block_n.

Pallas / Triton facts this relies on (jax 0.10, jax/_src/pallas/triton/lowering.py):
- `dot_general` lowers int8 x int8 with an int32 accumulator (tt.dot i8 x i8 -> i32). It rejects
  unsigned operands ("dot_general interprets all integer inputs as signed"), so unsigned codes
  [0, 255] enter as q - 128 (int8) and the kernel adds 128 * the column sums of the weight tiles
  it used: exact in int32, and equal to the uint8 x int8 dot of `integer_forward`. Triton's dot
  needs every dimension >= 16 on GPU: block_m, block_n >= 16 and block_k >= 32 (halves >= 16).
- `lax.round_p` has no Triton lowering: rounding half to even is done with floor and exact
  float arithmetic (`_round_half_even`).
- The activation codes multiply by the inverse scale (`integer.activation_codes`), computed by XLA
  outside the kernel. Off interpret mode the kernel multiplies with inline PTX `mul.rn.f32`
  (`exact_mul`): a product Triton could contract into a fused multiply-add with the rounding that
  follows would round differently from XLA.
- Loads must have power-of-two shapes: all block sizes are powers of two.
- Masked loads (`pltriton.load(..., mask=)`) are predicated: masked-off rows are not fetched.
Checked here: both kernels pass the tests in interpret mode, and lower to Triton IR for CUDA on a
CPU-only machine (`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`: tt.dot i8 x i8 ->
i32, scf.for, scf.if, the inline PTX). Not checked (no GPU): that Triton compiles and runs them;
bit-exactness against XLA's `integer_forward` on a GPU (on CPU, XLA contracts the epilogue's
`acc * scale + bias` into a fused multiply-add under jit, in integer_forward and in the
interpret-mode kernel alike, so only the jitted integer_forward is bit-identical; on a GPU both
XLA and Triton may contract, and the last bit depends on their doing the same); and the speed of
both kernels against XLA's int8 path and bfloat16.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flexiq_jax import numerics
from flexiq_jax.interception import LayerInfo
from flexiq_jax import layer_ops

DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 128
DEFAULT_BLOCK_K = 64
GPU_MIN_DOT = 16  # Triton's smallest tile dimension for tt.dot


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _check_block(name: str, b: int, minimum: int = 1) -> None:
  if b < minimum or b & (b - 1):
    raise ValueError(f"{name} must be a power of two >= {minimum}, got {b}")


def _dense_info(c: int, o: int) -> LayerInfo:
  """A LayerInfo for `layer_ops.masked_channel_sum` (it reads only the kind)."""
  return LayerInfo("", "dense", 0, c, o, 1, (c, o), (1, c), (1, o), 1)


def correction(entry: dict, lowered):
  """(O,) the bias-correction term of `integer_forward` (None where it adds none), computed with
  the same function and in the same order, so the kernel's epilogue rounds as it does.

  Args:
    entry: the layer's serving entry ('lost' (C, O), 'act_scale', 'weight_scale' where lowered).
    lowered: (C,) bool mask of lowered channels, or None.

  Returns:
    (O,) float32 masked sum of `lost` times act_scale x weight_scale, or None when `lowered` is None
    or the entry has no 'lost' table.
  """
  if lowered is None or "lost" not in entry:
    return None
  c, o = entry["lost"].shape
  return layer_ops.masked_channel_sum(_dense_info(c, o), lowered, entry["lost"]) * entry["act_scale"] \
      * entry["weight_scale"]


# ---------------------------------------------------------------------------------------------
# Elementwise pieces shared by the kernels (traced inside the kernel body).

def _round_half_even(v):
  """jnp.round (half to even) from floor: every step is exact in float32 (v - floor(v) is exact,
  and so is the parity test for integers below 2^24; larger values are integers already)."""
  r = jnp.floor(v)
  d = v - r
  odd = (r - 2.0 * jnp.floor(r * 0.5)) == 1.0
  return jnp.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


def _multiply(x, s, exact_mul: bool):
  """x * s rounded to nearest (IEEE): plain multiplication in interpret mode; on GPU inline PTX
  mul.rn.f32, which the compiler never contracts into a fused multiply-add with what follows."""
  if not exact_mul:
    return x * s
  from jax.experimental.pallas import triton as pltriton
  s = jnp.broadcast_to(s, x.shape)
  [y] = pltriton.elementwise_inline_asm("mul.rn.f32 $0, $1, $2;", args=[x, s], constraints="=f,f,f", pack=1,
                                         result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
  return y


def _codes(x, inv_s, signed: bool, exact_mul: bool):
  """clip(round(x * inv_s), qmin, qmax) as in `integer.activation_codes` (inv_s = 1 / act_scale)."""
  qmin, qmax = numerics.int_range(8, signed)
  return jnp.clip(_round_half_even(_multiply(x.astype(jnp.float32), inv_s, exact_mul)), qmin, qmax)


def _lower(q, step, inv_step, signed: bool):
  """The 4-bit extraction of codes q (every channel lowered): clip(floor(q / 2^e + 1/2), lo4, hi4)
  * 2^e, exact for powers of two."""
  lo4, hi4 = numerics.int_range(4, signed)
  return jnp.clip(jnp.floor(q * inv_step + 0.5), lo4, hi4) * step


def _int8_operand(q, signed: bool):
  """int8 dot operand: signed codes as they are, unsigned ones shifted by -128 (see module doc)."""
  return (q if signed else q - 128.0).astype(jnp.int8)


def _masked_load(ref, mask):
  """ref[...] where mask, 0 elsewhere; a predicated load on Triton (masked-off elements are not
  fetched)."""
  from jax.experimental.pallas import triton as pltriton
  return pltriton.load(ref, mask=mask, other=0)


def _accumulate(acc, csum, xi, w, signed: bool):
  acc = acc + jnp.dot(xi, w, preferred_element_type=jnp.int32)
  if not signed:
    csum = csum + jnp.sum(w.astype(jnp.int32), axis=0, keepdims=True)
  return acc, csum


def _epilogue(o_ref, acc, csum, scale_ref, corr_ref, bias_ref, signed: bool):
  """integer_forward's epilogue: ((acc * scale) + correction) + bias, in that order."""
  if not signed:
    acc = acc + 128 * csum
  y = acc.astype(jnp.float32) * scale_ref[...]
  if corr_ref is not None:
    y = y + corr_ref[...]
  if bias_ref is not None:
    y = y + bias_ref[...]
  o_ref[...] = y


def _split_epilogue_refs(rest, has_corr: bool, has_bias: bool):
  scale_ref, *rest = rest
  corr_ref = rest.pop(0) if has_corr else None
  bias_ref = rest.pop(0) if has_bias else None
  (o_ref,) = rest
  return scale_ref, corr_ref, bias_ref, o_ref


# ---------------------------------------------------------------------------------------------
# fused_dense: any lowered mask, channels in their own order; each weight row from kernel or w_low.

def _dense_kernel(s_ref, low_row_ref, low_col_ref, step_ref, inv_ref, x_ref, w8_ref, wl_ref, *rest, nk: int, bk: int,
                  signed: bool, has_lowered: bool, has_corr: bool, has_bias: bool, exact_mul: bool):
  scale_ref, corr_ref, bias_ref, o_ref = _split_epilogue_refs(rest, has_corr, has_bias)
  bm, bn = o_ref.shape
  s = s_ref[...]
  qmin, qmax = numerics.int_range(8, signed)
  lo4, hi4 = numerics.int_range(4, signed)

  def body(kb, carry):
    acc, csum = carry
    start = pl.multiple_of(kb * bk, bk)
    cols = pl.ds(start, bk)
    q = _codes(x_ref[:, cols], s, signed, exact_mul)
    if not has_lowered:
      w = w8_ref[cols, :]
    else:
      # activation_codes' formula on every channel (unlowered: step 1 and the 8-bit bounds, so q).
      low = low_row_ref[:, cols] != 0
      step = jnp.where(low, step_ref[:, cols], 1.0)
      inv = jnp.where(low, inv_ref[:, cols], 1.0)
      lo = jnp.where(low, float(lo4), float(qmin))
      hi = jnp.where(low, float(hi4), float(qmax))
      q = jnp.clip(jnp.floor(q * inv + 0.5), lo, hi) * step
      # Each row read from one of the two: masked-off rows cost no memory traffic on a GPU.
      low_w = jnp.broadcast_to(low_col_ref[cols, :] != 0, (bk, bn))
      w = jnp.where(low_w, _masked_load(wl_ref.at[cols, :], low_w), _masked_load(w8_ref.at[cols, :], ~low_w))
    return _accumulate(acc, csum, _int8_operand(q, signed), w, signed)

  init = (jnp.zeros((bm, bn), jnp.int32), jnp.zeros((1, bn), jnp.int32))
  acc, csum = lax.fori_loop(0, nk, body, init)
  _epilogue(o_ref, acc, csum, scale_ref, corr_ref, bias_ref, signed)


def _triton_params(num_warps: int | None, num_stages: int | None):
  from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _as_rows(x, c: int):
  """(..., C) -> (M, C) and the leading shape."""
  lead = x.shape[:-1]
  if x.shape[-1] != c:
    raise ValueError(f"activation has {x.shape[-1]} features, the layer {c}")
  return x.reshape(-1, c), lead


def _block_m(m: int, block_m: int, interpret: bool) -> int:
  """The M tile: block_m, or less for a small batch (never below Triton's 16 off interpret)."""
  return min(block_m, max(1 if interpret else GPU_MIN_DOT, _next_pow2(m)))


def _epilogue_operands(entry: dict, bias, corr, op: int):
  """(operands, has_corr, has_bias): the (1, Op) float32 rows of scale, correction, bias."""
  def row(v):
    v = jnp.asarray(v, jnp.float32).reshape(-1)
    return jnp.pad(v, (0, op - v.shape[0]))[None, :]
  ops = [row(entry["scale"])]
  if corr is not None:
    ops.append(row(corr))
  if bias is not None:
    ops.append(row(bias))
  return ops, corr is not None, bias is not None


def fused_dense(x, entry: dict, kernel, bias, lowered, *, signed: bool, interpret: bool = False,
                block_m: int = DEFAULT_BLOCK_M, block_n: int = DEFAULT_BLOCK_N, block_k: int = DEFAULT_BLOCK_K,
                exact_mul: bool | None = None, num_warps: int | None = 4, num_stages: int | None = None):
  """`integer.integer_forward` of a dense layer in one Pallas kernel (module docstring).

  x: (..., C) float activation; entry: the layer's serving entry (`integer.prepare_layer`:
  act_scale, scale, step, and w_low / lost / weight_scale where lowered); kernel: (C, O) int8
  codes; bias: (O,) or None; lowered: (C,) bool, or None for a layer never lowered. Returns
  float32 (..., O), bit-identical to integer_forward under jit. Each weight row is fetched from
  kernel or w_low (C x O bytes at any ratio); `fused_dense_packed` is the form whose weight reads
  fall with the ratio. exact_mul: None = off interpret mode only (see module docstring).

  Args:
    x: (..., C) float activation.
    entry: the layer's serving entry.
    kernel: (C, O) int8 weight codes.
    bias: (O,) float bias, or None.
    lowered: (C,) bool mask of lowered channels, or None.
    signed: whether the activation codes are signed.
    interpret: run Pallas in interpret mode (required off a GPU).
    block_m: M tile, a power of two (reduced for a small M).
    block_n: O tile, a power of two.
    block_k: K step, a power of two.
    exact_mul: multiply with inline PTX mul.rn.f32; None for `not interpret`.
    num_warps: Triton's num_warps, or None for its default.
    num_stages: Triton's num_stages, or None for its default.

  Returns:
    float32 (..., O) layer output, bias and bias correction included.

  Raises:
    ValueError: a block size that is not a power of two, or an activation whose last axis is not C.
  """
  _check_block("block_m", block_m)
  _check_block("block_n", block_n)
  _check_block("block_k", block_k)
  exact_mul = (not interpret) if exact_mul is None else exact_mul
  c, o = kernel.shape
  x2, lead = _as_rows(x, c)
  m = x2.shape[0]
  bm = _block_m(m, block_m, interpret)
  mp, cp, op = _round_up(m, bm), _round_up(c, block_k), _round_up(o, block_n)
  xp = jnp.pad(x2, ((0, mp - m), (0, cp - c)))
  pad_w = lambda w: jnp.pad(w.astype(jnp.int8), ((0, cp - c), (0, op - o)))
  w8 = pad_w(kernel)
  has_lowered = lowered is not None
  if has_lowered:
    low = jnp.pad(jnp.asarray(lowered).astype(jnp.int32), (0, cp - c))
    step = jnp.pad(jnp.asarray(entry["step"], jnp.float32), (0, cp - c), constant_values=1.0)
    wl = pad_w(entry["w_low"])
  else:  # placeholders, never read
    low, step, wl = jnp.zeros((cp,), jnp.int32), jnp.ones((cp,), jnp.float32), w8
  inv = 1.0 / step
  s = (1.0 / jnp.asarray(entry["act_scale"], jnp.float32)).reshape(1, 1)  # the inverse scale
  epi, has_corr, has_bias = _epilogue_operands(entry, bias, correction(entry, lowered), op)

  kern = functools.partial(_dense_kernel, nk=cp // block_k, bk=block_k, signed=signed, has_lowered=has_lowered,
                           has_corr=has_corr, has_bias=has_bias, exact_mul=exact_mul)
  whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0, 0))
  in_specs = [whole((1, 1)), whole((1, cp)), whole((cp, 1)), whole((1, cp)), whole((1, cp)),
              pl.BlockSpec((bm, cp), lambda i, j: (i, 0)),
              pl.BlockSpec((cp, block_n), lambda i, j: (0, j)),
              pl.BlockSpec((cp, block_n), lambda i, j: (0, j))]
  in_specs += [pl.BlockSpec((1, block_n), lambda i, j: (0, j))] * len(epi)
  out = pl.pallas_call(
      kern, out_shape=jax.ShapeDtypeStruct((mp, op), jnp.float32), grid=(mp // bm, op // block_n),
      in_specs=in_specs, out_specs=pl.BlockSpec((bm, block_n), lambda i, j: (i, j)), interpret=interpret,
      compiler_params=_triton_params(num_warps, num_stages), name="flexiq_fused_dense",
  )(s, low[None, :], low[:, None], step[None, :], inv[None, :], xp, w8, wl, *epi)
  return out[:m, :o].reshape(lead + (o,))


# ---------------------------------------------------------------------------------------------
# Packed rank-ordered rows.

@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed", "rows8", "e", "order"],
                   meta_fields=["block_k", "block_n", "in_channels", "out_channels"])
@dataclasses.dataclass(frozen=True)
class PackedRows:
  """A dense layer's weights in rank order (module docstring), padded to (Cp, Op) block multiples.

  packed: (Cp/2, Op) uint8, two 4-bit k values a byte (lowered code = k << e); rows8: (Cp, Op)
  int8 codes; e: (Cp, 1) int32 weight extraction positions; order: (C,) int32, the channel at
  each rank position (argsort of rank). Padding positions are zero rows with e = 0."""

  packed: jax.Array
  rows8: jax.Array
  e: jax.Array
  order: jax.Array
  block_k: int
  block_n: int
  in_channels: int
  out_channels: int


def pack_lowered_rows(w_low, weight_e, rank, kernel, *, block_k: int = DEFAULT_BLOCK_K,
                      block_n: int = DEFAULT_BLOCK_N) -> PackedRows:
  """Rank-ordered packed 4-bit rows of `w_low` (C, O) (every element k * 2^weight_e[c], k in
  [-8, 7]: not checked, `unpack_lowered_rows` round-trips it) and the int8 rows of `kernel` (C, O).
  rank: (C,) a permutation, rank[c] = position of channel c in the lowering order. Done once, at
  preparation time; jit-compatible (block sizes static).

  Args:
    w_low: (C, O) int8 lowered weight codes (`integer.prepare_layer`'s 'w_low').
    weight_e: (C,) weight extraction positions.
    rank: (C,) permutation: each channel's position in the lowering order.
    kernel: (C, O) int8 weight codes.
    block_k: K step of the kernel that will read them, a power of two >= 2 (fixes the nibble layout).
    block_n: O tile, a power of two.

  Returns:
    A `PackedRows`, padded to (Cp, Op) block multiples.

  Raises:
    ValueError: a block size that is not a power of two (or block_k < 2).
  """
  _check_block("block_k", block_k, 2)
  _check_block("block_n", block_n)
  c, o = w_low.shape
  cp, op = _round_up(c, block_k), _round_up(o, block_n)
  order = jnp.argsort(jnp.asarray(rank, jnp.int32)).astype(jnp.int32)
  e = jnp.asarray(weight_e, jnp.int32)
  k = jnp.right_shift(jnp.asarray(w_low).astype(jnp.int32), e[:, None])  # exact: multiples of 2^e
  pad = lambda a: jnp.pad(a[order], ((0, cp - c), (0, op - o)))
  k = pad(k).reshape(cp // block_k, 2, block_k // 2, op)
  packed = (k[:, 0] & 15) | ((k[:, 1] & 15) << 4)
  return PackedRows(packed=packed.reshape(cp // 2, op).astype(jnp.uint8), rows8=pad(jnp.asarray(kernel, jnp.int8)),
                    e=jnp.pad(e[order], (0, cp - c))[:, None], order=order, block_k=block_k, block_n=block_n,
                    in_channels=c, out_channels=o)


def _unpack_nibbles(b, e, high: bool):
  """int8 codes k << e from uint8 bytes b: the low (or high) nibbles, sign-extended."""
  b = b.astype(jnp.int32)
  k = jnp.right_shift(jnp.left_shift(b, 24 if high else 28), 28)
  return jnp.left_shift(k, e).astype(jnp.int8)


def unpack_lowered_rows(p: PackedRows):
  """(C, O) int8: `w_low` back in channel order (the inverse of `pack_lowered_rows`).

  Args:
    p: the packed rows.

  Returns:
    (C, O) int8 lowered weight codes, padding removed.
  """
  h = p.block_k // 2
  b = p.packed.reshape(-1, h, p.packed.shape[-1])
  e = p.e.reshape(-1, 2, h, 1)
  rows = jnp.stack([_unpack_nibbles(b, e[:, 0], False), _unpack_nibbles(b, e[:, 1], True)], axis=1)
  rows = rows.reshape(-1, p.packed.shape[-1])[:p.in_channels, :p.out_channels]
  inverse = jnp.zeros_like(p.order).at[p.order].set(jnp.arange(p.in_channels, dtype=jnp.int32))
  return rows[inverse]


def weight_bytes_read(p: PackedRows, count: int) -> int:
  """Weight bytes `fused_dense_packed` reads for one row of output tiles (every weight column once:
  the total for an M of at most block_m) at a lowered `count` (Python int): per column, half a
  byte a row in whole packed blocks, one in 8-bit blocks; the mixed block's rows are each fetched
  from one storage, counted here at the bound of a whole packed and a whole int8 block (a GPU
  fetches 32-byte sectors, so partial masks save less). For bytes-vs-ratio accounting.

  Args:
    p: the packed rows (their padded shape and block_k).
    count: number of lowered rank positions, in [0, C].

  Returns:
    The modelled bytes, as an int (padding rows and columns included).
  """
  cp, op = p.rows8.shape
  full, rem = divmod(int(count), p.block_k)
  rows8 = cp - full * p.block_k - (p.block_k if rem else 0)
  return op * (full * p.block_k // 2 + (p.block_k * 3 // 2 if rem else 0) + rows8)


def _packed_kernel(s_ref, count_ref, step_ref, inv_ref, e_ref, x_ref, pk_ref, w8_ref, *rest, nk: int, bk: int,
                   signed: bool, has_corr: bool, has_bias: bool, exact_mul: bool):
  scale_ref, corr_ref, bias_ref, o_ref = _split_epilogue_refs(rest, has_corr, has_bias)
  bm, bn = o_ref.shape
  h = bk // 2
  s = s_ref[...]
  count = count_ref[0, 0]
  n_low = lax.div(count, bk)  # whole blocks of lowered positions (count >= 0)
  mixed = lax.rem(count, bk) != 0

  def packed_block(kb, carry):  # every position lowered: packed bytes only
    acc, csum = carry
    b = pk_ref[pl.ds(pl.multiple_of(kb * h, h), h), :]
    for half in (0, 1):
      cols = pl.ds(pl.multiple_of(kb * bk + half * h, h), h)
      q = _lower(_codes(x_ref[:, cols], s, signed, exact_mul), step_ref[:, cols], inv_ref[:, cols], signed)
      w = _unpack_nibbles(b, e_ref[cols, :], bool(half))
      acc, csum = _accumulate(acc, csum, _int8_operand(q, signed), w, signed)
    return acc, csum

  def mixed_block(carry):  # block n_low: positions below count lowered, both storages read
    acc, csum = carry
    kb = n_low
    # Byte row j serves positions j and j + h: fetched only when position j is lowered.
    low_b = jnp.broadcast_to(kb * bk + lax.broadcasted_iota(jnp.int32, (h, 1), 0) < count, (h, bn))
    b = _masked_load(pk_ref.at[pl.ds(pl.multiple_of(kb * h, h), h), :], low_b)
    for half in (0, 1):
      start = pl.multiple_of(kb * bk + half * h, h)
      cols = pl.ds(start, h)
      q = _codes(x_ref[:, cols], s, signed, exact_mul)
      low_row = start + lax.broadcasted_iota(jnp.int32, (1, h), 1) < count
      low_col = jnp.broadcast_to(start + lax.broadcasted_iota(jnp.int32, (h, 1), 0) < count, (h, bn))
      q = jnp.where(low_row, _lower(q, step_ref[:, cols], inv_ref[:, cols], signed), q)
      w = jnp.where(low_col, _unpack_nibbles(b, e_ref[cols, :], bool(half)), _masked_load(w8_ref.at[cols, :], ~low_col))
      acc, csum = _accumulate(acc, csum, _int8_operand(q, signed), w, signed)
    return acc, csum

  def int8_block(kb, carry):  # no position lowered: int8 rows only, no lowering work
    acc, csum = carry
    cols = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    q = _codes(x_ref[:, cols], s, signed, exact_mul)
    return _accumulate(acc, csum, _int8_operand(q, signed), w8_ref[cols, :], signed)

  carry = (jnp.zeros((bm, bn), jnp.int32), jnp.zeros((1, bn), jnp.int32))
  carry = lax.fori_loop(0, n_low, packed_block, carry)
  carry = lax.cond(mixed, mixed_block, lambda c: c, carry)
  carry = lax.fori_loop(n_low + mixed.astype(jnp.int32), nk, int8_block, carry)
  _epilogue(o_ref, *carry, scale_ref, corr_ref, bias_ref, signed)


def fused_dense_packed(x, entry: dict, packed: PackedRows, bias, count, *, signed: bool, interpret: bool = False,
                       block_m: int = DEFAULT_BLOCK_M, exact_mul: bool | None = None, num_warps: int | None = 4,
                       num_stages: int | None = None):
  """`integer_forward` of a dense layer whose channels with entry['rank'] < count are lowered,
  reading the lowered rank positions' weights from `packed` (`pack_lowered_rows`; its block_k and
  block_n are the kernel's). count: traced int (0..C); recompiles never depend on it. x: (..., C)
  float; returns float32 (..., O), bit-identical to integer_forward under jit. The activation is gathered
  into rank order here (x[:, order]): one extra pass over x that a serving graph could fold into
  the previous layer's output columns.

  Args:
    x: (..., C) float activation.
    entry: the layer's serving entry ('act_scale', 'scale', 'step', 'rank', and 'lost' /
      'weight_scale' for bias correction).
    packed: the layer's `PackedRows`.
    bias: (O,) float bias, or None.
    count: number of lowered channels (traced int).
    signed: whether the activation codes are signed.
    interpret: run Pallas in interpret mode (required off a GPU).
    block_m: M tile, a power of two (reduced for a small M).
    exact_mul: multiply with inline PTX mul.rn.f32; None for `not interpret`.
    num_warps: Triton's num_warps, or None for its default.
    num_stages: Triton's num_stages, or None for its default.

  Returns:
    float32 (..., O) layer output, bias and bias correction included.

  Raises:
    ValueError: `block_m` is not a power of two, or the activation's last axis is not C.
  """
  _check_block("block_m", block_m)
  exact_mul = (not interpret) if exact_mul is None else exact_mul
  bk, bn = packed.block_k, packed.block_n
  c, o = packed.in_channels, packed.out_channels
  cp, op = packed.rows8.shape
  x2, lead = _as_rows(x, c)
  m = x2.shape[0]
  bm = _block_m(m, block_m, interpret)
  mp = _round_up(m, bm)
  order = packed.order
  xp = jnp.pad(x2[:, order], ((0, mp - m), (0, cp - c)))
  step = jnp.pad(jnp.asarray(entry["step"], jnp.float32)[order], (0, cp - c), constant_values=1.0)
  inv = 1.0 / step
  count = jnp.asarray(count, jnp.int32)
  lowered = entry["rank"] < count
  s = (1.0 / jnp.asarray(entry["act_scale"], jnp.float32)).reshape(1, 1)  # the inverse scale
  epi, has_corr, has_bias = _epilogue_operands(entry, bias, correction(entry, lowered), op)

  kern = functools.partial(_packed_kernel, nk=cp // bk, bk=bk, signed=signed, has_corr=has_corr, has_bias=has_bias,
                           exact_mul=exact_mul)
  whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0, 0))
  in_specs = [whole((1, 1)), whole((1, 1)), whole((1, cp)), whole((1, cp)), whole((cp, 1)),
              pl.BlockSpec((bm, cp), lambda i, j: (i, 0)),
              pl.BlockSpec((cp // 2, bn), lambda i, j: (0, j)),
              pl.BlockSpec((cp, bn), lambda i, j: (0, j))]
  in_specs += [pl.BlockSpec((1, bn), lambda i, j: (0, j))] * len(epi)
  out = pl.pallas_call(
      kern, out_shape=jax.ShapeDtypeStruct((mp, op), jnp.float32), grid=(mp // bm, op // bn),
      in_specs=in_specs, out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)), interpret=interpret,
      compiler_params=_triton_params(num_warps, num_stages), name="flexiq_fused_dense_packed",
  )(s, count.reshape(1, 1), step[None, :], inv[None, :], packed.e, xp, packed.packed, packed.rows8, *epi)
  return out[:m, :o].reshape(lead + (o,))
