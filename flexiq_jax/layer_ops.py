"""What FlexiQ computes for an intercepted `Dense`/`DenseGeneral`/`Conv` call: fake-quant (float
simulation with straight-through gradients, for QAT) or integer (int8 codes, int32 accumulation),
with any subset of feature channels lowered to 4 bits by bit extraction.

A lowered value is still an 8-bit code (a 4-bit value times 2^e), so a mixed layer is one int8
GEMM/conv: this is how the 4-bit channels run on hardware without 4-bit instructions.

`quantized_matmul` does the same for an intercepted `AttentionMatmul` (q·kᵀ, attn·v): both
operands per-tensor 8-bit, never lowered (the paper lowers feature channels of linear and conv
layers only), so it is 8-bit at every ratio.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flexiq_jax import numerics
from flexiq_jax.numerics import lsq_extraction
from flexiq_jax.interception import (LayerCall, LayerInfo, MatmulCall, as_matrix_input, conv, conv_padding,
                                     einsum_summed_size, finish, kernel_matrix, spatial_pair)

WEIGHT_QMAX = float(numerics.WEIGHT_QMAX_8BIT)


def weight_channel_index(info: LayerInfo) -> np.ndarray:
  """For each kernel element along (I, O) — I = C/groups — the feature channel it multiplies.

  Dense: row c is channel c. Grouped conv: output o of group g reads channels g*I .. g*I+I-1.
  Depthwise (groups == C): the filter of output channel c reads feature channel c.

  Args:
    info: the layer.

  Returns:
    (I, O) int array of feature channel indices in [0, C).
  """
  if info.kind == "dense":
    return np.broadcast_to(np.arange(info.in_channels)[:, None], (info.in_channels, info.out_channels))
  per_group_in = info.in_channels // info.groups
  per_group_out = info.out_channels // info.groups
  group = np.arange(info.out_channels) // per_group_out
  return group[None, :] * per_group_in + np.arange(per_group_in)[:, None]


def gather_channel(values, info: LayerInfo):
  """Per-feature-channel values (C,) -> per-kernel-element (I, O) (broadcast over spatial dims).

  Args:
    values: (C,) array, one value per feature channel.
    info: the layer.

  Returns:
    (I, O) array: values[weight_channel_index(info)].
  """
  return jnp.asarray(values)[weight_channel_index(info)]


def quantize_codes(info: LayerInfo, x, kernel, lq: dict, lowered, *, signed: bool, ste: bool,
                   lsq: bool = False, lsq_grad_scale: str = "qmax8", lsq_weight_grad_scale: str = "qmax8"):
  """Returns (activation codes, weight codes, activation scale, weight scale, bias shift), with
  the `lowered` (C,) channels of both replaced by their 4-bit extraction.

  The bias shift (O,), in real units, is zero unless `lq` holds the calibrated mean codes
  ('mean_code', 'mean_lowered'): then it is the expected output lost by lowering,
  Σ_{c lowered} (E[q_c] w8[c, o] - E[lower(q_c)] w4[c, o]) s_x s_w[o], summed over the kernel
  elements that read channel c. Lowering (clipping especially) shifts each channel's mean, and
  the shifts of many channels add up through the network; this first-order correction (as in
  data-free quantization's bias correction) removes them, for any set of lowered channels.

  lsq_grad_scale (with `lsq` and `ste`): 'qmax8' LSQ through the 8-bit quantizer, its gradient
  scale from 255 (127) levels for every channel; 'effective' each lowered channel's gradient
  counted on its own 4-bit grid (`numerics.lsq_extraction`; the returned activation scale then
  carries no gradient, the codes carry it all). lsq_weight_grad_scale (with lq['lsq_weight_scale']
  and `ste`) does the same for the learnt weight scales (`lsq_extraction.lsq_quantize_lower_weights`):
  'qmax8' LSQ through the 8-bit weight quantizer, the extraction's straight-through gradient after
  it; 'effective' each lowered row on its own 4-bit grid (the returned weight scale then carries no
  gradient).

  The activation codes are clip(round(x · (1/s))): a multiplication by the float32 inverse of the
  scale, as oneDNN's requantization computes it (`quantize.onednn`), so a kernel that writes the next
  layer's codes itself matches this path bit for bit. On an asymmetric grid (lq['act_zero'] = z,
  unsigned codes) the codes are clip(round(x · (1/s)) + z,
  0, 255) and their real value (q - z) * s: the codes returned include z (`act_zero_point`), and
  z survives the extraction (`numerics.zero_point_candidates`).

  The weight codes come from, in this order of precedence: lq['weight_scale'] (a serving export whose
  kernel already holds the int8 codes), lq['lsq_weight_scale'] (a learnt per-output-channel scale), or
  max |w| / `weight_qmax(lq)` per output channel.

  Args:
    info: the layer.
    x: its input, matrix-shaped (`as_matrix_input`); feature channels on the last axis.
    kernel: its (BN-folded) kernel, or its int8 codes in a serving export.
    lq: the layer's quantization variables: 'act_scale', 'act_e' (C,), 'weight_e' (C,), and optionally
      'weight_scale', 'lsq_weight_scale', 'weight_qmax', 'mean_code' and 'mean_lowered'.
    lowered: (C,) bool mask of the feature channels to lower.
    signed: activation codes in [-128, 127] if True, [0, 255] if False.
    ste: straight-through rounding (for fake-quant training); plain rounding otherwise.
    lsq: quantize activations with LSQ's fake-quant (gradients to the activation scale).
    lsq_grad_scale: 'qmax8' or 'effective', as above.
    lsq_weight_grad_scale: 'qmax8' or 'effective', as above.

  Returns:
    (xq, wq, s_x, s_w, bias_shift): float activation codes shaped as `x`, float weight codes (C, O)
    or HWIO, the activation scale, the per-output-channel weight scale (O,), and the bias shift (O,)
    in real units.

  Raises:
    ValueError: `lsq_grad_scale` or `lsq_weight_grad_scale` is neither 'qmax8' nor 'effective'.
  """
  if lsq_weight_grad_scale not in ("qmax8", "effective"):
    raise ValueError(f"unknown lsq_weight_grad_scale {lsq_weight_grad_scale!r}; use 'qmax8' or 'effective'")
  s_x = lq["act_scale"]
  z = act_zero_point(lq)
  qmin, qmax = numerics.int_range(8, signed)
  lower = numerics.lower_codes_ste if ste else numerics.lower_codes
  if lsq and ste and lsq_grad_scale == "effective":
    xq = lsq_extraction.lsq_quantize_lower(x, s_x, lq["act_e"], lowered, signed=signed,
                                           features=x.size // x.shape[0], zero_point=z)
    s_x = jax.lax.stop_gradient(s_x)
  elif lsq_grad_scale not in ("qmax8", "effective"):
    raise ValueError(f"unknown lsq_grad_scale {lsq_grad_scale!r}; use 'qmax8' or 'effective'")
  elif lsq:
    # LSQ's activation gradient scale counts the features of one example, not the batch.
    g = numerics.lsq_default_grad_scale(x.size // x.shape[0], 1, qmax)
    xq = numerics.lsq_fake_quant(x, s_x, qmin, qmax, g, zero_point=z) / s_x + z
    # codes·s/s is an integer only up to roundoff, which can flip the extraction's rounding at a
    # half step: the value is rounded back to the exact code, the gradients are kept.
    xq = jax.lax.stop_gradient(jnp.round(xq)) + (xq - jax.lax.stop_gradient(xq))
  elif ste:
    xq = jnp.clip(numerics.round_ste(x * (1.0 / s_x)) + z, qmin, qmax)
  else:
    xq = jnp.clip(jnp.round(x * (1.0 / s_x)) + z, qmin, qmax)
  if not (lsq and ste and lsq_grad_scale == "effective"):  # there the codes come lowered
    xq = jnp.where(lowered, lower(xq, lq["act_e"], signed=signed), xq)

  lsq_lowered = None  # the lowered weight codes, where LSQ's per-grid gradients come with them
  if "weight_scale" in lq:  # a serving export: the kernel holds the int8 codes themselves
    wq = kernel_matrix(info, kernel).astype(jnp.float32)
    s_w = lq["weight_scale"]
  elif "lsq_weight_scale" in lq and ste and lsq_weight_grad_scale == "effective":
    # Learnt per-output-channel scales, each lowered row's gradient on its own 4-bit grid: the
    # lowered codes carry the scale's gradient (the scale is returned without one); wq, the 8-bit
    # codes, only feed the bias shift below.
    w = kernel_matrix(info, kernel)
    s_w = jax.lax.stop_gradient(lq["lsq_weight_scale"])
    wq = jnp.clip(jnp.round(w / s_w), -WEIGHT_QMAX, WEIGHT_QMAX)
    lsq_lowered = lsq_extraction.lsq_quantize_lower_weights(
        w, lq["lsq_weight_scale"], gather_channel(lq["weight_e"], info), gather_channel(lowered, info),
        qmax=WEIGHT_QMAX)
  elif "lsq_weight_scale" in lq:  # a learnt per-output-channel scale (LSQ finetuning)
    w = kernel_matrix(info, kernel)
    s_w = lq["lsq_weight_scale"]
    if ste:
      wq = numerics.lsq_fake_quant(w, s_w, -WEIGHT_QMAX, WEIGHT_QMAX) / s_w
      # Rounded back to the exact code (codes·s/s can miss it by roundoff and flip the
      # extraction's rounding at a half step), the gradients kept.
      wq = jax.lax.stop_gradient(jnp.round(wq)) + (wq - jax.lax.stop_gradient(wq))
    else:
      wq = jnp.clip(jnp.round(w / s_w), -WEIGHT_QMAX, WEIGHT_QMAX)
  else:
    w = kernel_matrix(info, kernel)
    s_w = numerics.per_channel_weight_scale(w, weight_qmax(lq))
    wq = jnp.clip((numerics.round_ste if ste else jnp.round)(w / s_w), -WEIGHT_QMAX, WEIGHT_QMAX)
  w_low = lower(wq, gather_channel(lq["weight_e"], info), signed=True)
  bias_shift = jnp.zeros(s_w.shape, jnp.float32)
  if "mean_lowered" in lq:
    table = lost_output_table(info, jax.lax.stop_gradient(wq), jax.lax.stop_gradient(w_low), lq)
    bias_shift = masked_channel_sum(info, lowered, table) * s_x * s_w
  wq = jnp.where(gather_channel(lowered, info), w_low, wq) if lsq_lowered is None else lsq_lowered
  return xq, wq, s_x, s_w, bias_shift


def per_channel_sum(info: LayerInfo, values):
  """A kernel-shaped array summed over the spatial taps: conv (kh, kw, I, O) -> (I, O); dense as is.

  Args:
    info: the layer.
    values: (I, O) for dense layers, (kh, kw, I, O) for convs.

  Returns:
    (I, O) array.
  """
  return values if info.kind == "dense" else values.sum(axis=(0, 1))


def lost_output_table(info: LayerInfo, wq, w_low, lq: dict):
  """(I, O): per kernel row, the calibrated mean output (in code units) lost when its feature
  channel c is lowered, Σ_taps E[q_c] w8 - E[lower(q_c)] w_low (see quantize_codes).

  Args:
    info: the layer.
    wq: 8-bit weight codes, (C, O) or HWIO.
    w_low: the same codes lowered by extraction, same shape.
    lq: the layer's quantization variables with 'mean_code' and 'mean_lowered' (C,).

  Returns:
    (I, O) float array.
  """
  return per_channel_sum(info, gather_channel(lq["mean_code"], info) * wq
                         - gather_channel(lq["mean_lowered"], info) * w_low)


def masked_channel_sum(info: LayerInfo, lowered, table):
  """Σ_i table[i, o] over the kernel rows i whose feature channel is lowered: (I, O) -> (O,).

  Args:
    info: the layer.
    lowered: (C,) bool mask of lowered feature channels.
    table: (I, O) per-row values, e.g. `lost_output_table`.

  Returns:
    (O,) array.
  """
  if info.kind == "dense" or info.groups == 1:
    return jnp.sum(jnp.where(lowered[:, None], table, 0), axis=0)
  return jnp.sum(jnp.where(gather_channel(lowered, info), table, 0), axis=0)


RATIO_AFFINE_KEYS = ("ratio_gain", "ratio_bias")


def lowered_share(info: LayerInfo, lowered):
  """(O,): the share of each output channel's kernel rows whose feature channel is lowered (a dense
  or regular conv layer: the lowered share of all its input channels; a depthwise conv: 0 or 1).

  Args:
    info: the layer.
    lowered: (C,) bool mask of lowered feature channels.

  Returns:
    (O,) float32 in [0, 1].
  """
  rows = info.in_channels // (1 if info.kind == "dense" else info.groups)
  ones = jnp.ones((rows, info.out_channels), jnp.float32)
  return masked_channel_sum(info, lowered, ones) / rows


def ratio_affine(info: LayerInfo, lq: dict, lowered):
  """The layer's ratio-dependent output affine, or None where lq holds none: (gain, bias), each (O,),
  gain = 1 + share·lq['ratio_gain'] and bias = share·lq['ratio_bias'], share the `lowered_share`
  of each output channel. The output before the layer's own bias is gain·(acc·s_x·s_w + bias
  shift) + bias: the identity at ratio 0 (no channel lowered), whatever was learnt.

  What it is for: one set of weights serves every ratio, but the output statistics of a layer
  shift as its inputs and weights are lowered. A single-point method folds that into its own
  weights and bias; switchable networks keep a batch norm per precision for it (Any-Precision DNN).
  This is the same freedom at the cost FlexiQ's hardware contract allows: a per-output-channel
  multiplier of the requantization scale and an added bias, both (O,) vectors that follow the
  run-time ratio (through the lowered mask, traced: no recompilation).

  Args:
    info: the layer.
    lq: its quantization variables (optionally 'ratio_gain' and 'ratio_bias', (O,)).
    lowered: (C,) bool mask of lowered feature channels.

  Returns:
    (gain, bias) or None.
  """
  if RATIO_AFFINE_KEYS[0] not in lq:
    return None
  share = lowered_share(info, lowered)
  return 1.0 + share * lq["ratio_gain"], share * lq["ratio_bias"]


def stream_sum(y, codes, step):
  """A residual sum whose shortcut is on the 8-bit residual stream (`residual_stream`), as every
  integer path computes it: ((y · (1/step)) + codes) · step, each operation rounded to float32.

  oneDNN's conv computes the same steps as post-ops inside its kernel (`quantize.onednn.conv` with
  `shortcut_codes`); its sum post-op would add step · codes in one fused multiply-add instead.

  Args:
    y: the other term (a layer's float output).
    codes: the shortcut's 8-bit codes (any dtype holding integers), shaped as `y`.
    step: the shortcut's grid step (scalar).

  Returns:
    The float32 sum, close to y + codes · step.
  """
  return (y * (1.0 / step) + codes.astype(jnp.float32)) * step


def stream_terms(streams: dict, y, shortcut):
  """(other term, stream term, (codes, step) or None): the two terms of a residual sum ordered so
  that a term on the 8-bit residual stream (a value in `streams`, {id(value): (value, codes, step)})
  comes second, with its codes and step.

  Args:
    streams: the stream values seen so far in one trace.
    y: one term.
    shortcut: the other.

  Returns:
    (other, stream term, (codes, step)), or (y, shortcut, None) where neither is on the stream.
  """
  for term, other in ((shortcut, y), (y, shortcut)):
    found = streams.get(id(term))
    if found is not None and found[0] is term and jnp.shape(other) == jnp.shape(term):
      return other, term, found[1:]
  return y, shortcut, None


def residual_stream(y, shortcut, activation: str, step, *, signed: bool, ste: bool, shortcut_stream=None):
  """A residual sum kept on an 8-bit grid (the 8-bit residual stream): the sum, its activation,
  then clip(round(· (1/step))) on the grid of the quantized layer that reads it, without 4-bit
  extraction (that layer extracts its lowered channels from these codes; the next sum reads all 8
  bits).

  Args:
    y: one term (a layer's float output).
    shortcut: the other term.
    activation: 'none' or 'relu', applied to the sum.
    step: the grid's step (the reading layer's activation scale, one per tensor).
    signed: codes in [-128, 127] if True, [0, 255] if False.
    ste: straight-through rounding (fake quantization for training).
    shortcut_stream: (codes, step) where `shortcut` is itself on the stream (`stream_sum`), else None.

  Returns:
    (value, codes): the stream's float value codes · step and its codes (float, integer-valued).
  """
  if shortcut_stream is not None:
    total = stream_sum(y, *shortcut_stream)
  else:
    total = y + shortcut
  if activation == "relu":
    total = jnp.maximum(total, 0.0)
  elif activation != "none":
    raise ValueError(f"unknown residual activation {activation!r}; use 'none' or 'relu'")
  qmin, qmax = numerics.int_range(8, signed)
  q = jnp.clip((numerics.round_ste if ste else jnp.round)(total * (1.0 / step)), qmin, qmax)
  return q * step, q


def act_zero_point(lq: dict):
  """The activation grid's zero point: lq['act_zero'] on an asymmetric grid, else 0.

  Args:
    lq: the layer's quantization variables.

  Returns:
    A float (a traced scalar where lq holds one): the code of the real zero.
  """
  return lq.get("act_zero", 0.0)


def weight_qmax(lq: dict):
  """The code max |w| of each output channel lands on: qvars' 'weight_qmax' (O,) where
  `quant.weight_scale` chose one (`numerics.weight_grid`), else 127.

  Args:
    lq: the layer's quantization variables.

  Returns:
    lq['weight_qmax'] ((O,) array) if present, else the float 127.0.
  """
  return lq.get("weight_qmax", WEIGHT_QMAX)


def weight_codes(info: LayerInfo, kernel, scale=None, qmax=WEIGHT_QMAX):
  """(int8 codes in the kernel's shape, per-output-channel scale (O,)) of a float kernel, as the
  integer path computes them: scale max |w| / qmax (qmax: a scalar or (O,), `weight_qmax`), or
  `scale` (a learnt LSQ scale) where given. What a serving export stores instead of the float
  kernel.

  Args:
    info: the layer.
    kernel: its float kernel.
    scale: a learnt per-output-channel scale, or None.
    qmax: the code of each output channel's max |w| when `scale` is None.
  Returns:
    (int8 codes, scale (O,)).
  """
  w = kernel_matrix(info, kernel)
  s_w = numerics.per_channel_weight_scale(w, qmax) if scale is None else scale
  q = jnp.clip(jnp.round(w / s_w), -WEIGHT_QMAX, WEIGHT_QMAX)
  return q.astype(jnp.int8).reshape(kernel.shape), s_w


def quantized_forward(call: LayerCall, x, lq: dict, lowered, *, signed: bool, mode: str = "fake",
                      lsq: bool = False, conv_accumulator=jnp.int32, lsq_grad_scale: str = "qmax8",
                      lsq_weight_grad_scale: str = "qmax8"):
  """mode 'fake': dequantized codes in float (differentiable, STE); 'int': int8 x int8 -> int32.

  Unsigned activations ([0, 255]) do not fit int8, so the integer path shifts them by -128 and adds
  back 128 * Σ w per output (exact); a conv then pads explicitly with the shifted zero, and an
  input-dilated conv also inserts the shifted zero between inputs before an undilated conv.

  Args:
    call: the intercepted layer call (info, module, kernel, bias).
    x: the layer's float input.
    lq: the layer's quantization variables (see `quantize_codes`).
    lowered: (C,) bool mask of the feature channels at 4 bits.
    signed: whether the activation codes are signed ([-128, 127]) or unsigned ([0, 255]).
    mode: 'fake' or 'int'.
    lsq: LSQ fake-quant of the activations (see `quantize_codes`).
    conv_accumulator: accumulator dtype of the integer conv (`preferred_element_type`), e.g. jnp.int32.
    lsq_grad_scale: 'qmax8' or 'effective' (see `quantize_codes`).
    lsq_weight_grad_scale: 'qmax8' or 'effective' (see `quantize_codes`).

  Returns:
    The layer's float output in the module's output shape, bias and bias shift included.

  Raises:
    ValueError: `mode` is neither 'fake' nor 'int', or `lsq_grad_scale` is unknown.
  """
  info, module, kernel, bias = call.info, call.module, call.kernel, call.bias
  x = as_matrix_input(info, x)
  xq, wq, s_x, s_w, bias_shift = quantize_codes(info, x, kernel, lq, lowered, signed=signed,
                                                ste=mode == "fake", lsq=lsq, lsq_grad_scale=lsq_grad_scale,
                                                lsq_weight_grad_scale=lsq_weight_grad_scale)
  z = act_zero_point(lq)
  if mode == "fake":
    return fake_output(call, x, xq, wq, s_x, s_w, bias_shift, lq, lowered)
  if mode != "int":
    raise ValueError(f"mode must be 'fake' or 'int', not {mode!r}")
  shift = 0 if signed else 128
  xi = (xq - shift).astype(jnp.int8)
  wi = wq.astype(jnp.int8)
  # Σ (q - z) w = Σ (q - shift) w + (shift - z) Σ w: the int8 GEMM on shifted codes, then one
  # per-output correction (z = 0 on a symmetric grid; shift = 128 for unsigned codes).
  offset = jnp.asarray(shift, jnp.int32) - jnp.asarray(z, jnp.float32).astype(jnp.int32)
  if info.kind == "dense":
    acc = lax.dot_general(xi, wi, (((xi.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    if shift:
      acc = acc + offset * jnp.sum(wi.astype(jnp.int32), axis=0)
  else:
    padding = conv_padding(module, x.shape, kernel.shape)
    dilation = None
    if shift:
      # Border padding and, for an input-dilated (transposed) conv, the zeros inserted between
      # inputs are real zeros: code z - shift once shifted. lax.pad writes both (interior padding
      # = dilation - 1; negative borders crop as in the conv), then the conv runs undilated.
      d = spatial_pair(module.input_dilation)
      pads = [(0, 0, 0), (*padding[0], d[0] - 1), (*padding[1], d[1] - 1), (0, 0, 0)]
      xi = lax.pad(xi, (-offset).astype(jnp.int8), pads)
      padding, dilation = [(0, 0), (0, 0)], 1
    acc = conv(module, xi, wi, padding, preferred=conv_accumulator, input_dilation=dilation)
    if shift:
      acc = acc + offset.astype(acc.dtype) * jnp.sum(wi.astype(acc.dtype), axis=(0, 1, 2))
  y = acc.astype(jnp.float32) * (s_x * s_w)
  return finish(info, with_ratio_affine(y + bias_shift, info, lq, lowered), bias)


def fake_output(call: LayerCall, x, xq, wq, s_x, s_w, bias_shift, lq: dict, lowered):
  """The layer's output from its codes in float (the 'fake' arithmetic of `quantized_forward`).

  Args:
    call: the intercepted layer call.
    x: its input, matrix-shaped (`as_matrix_input`; only its shape is read).
    xq: the activation codes (`quantize_codes`), lowered channels included.
    wq: the weight codes in the kernel-matrix layout, lowered rows included.
    s_x: the activation scale.
    s_w: (O,) the weight scale.
    bias_shift: (O,) the bias correction in real units.
    lq: the layer's quantization variables (its zero point and ratio affine).
    lowered: (C,) bool mask of the lowered feature channels.

  Returns:
    The layer's float output in the module's output shape, bias included.
  """
  info = call.info
  xd, wd = (xq - act_zero_point(lq)) * s_x, wq * s_w
  if info.kind == "dense":
    y = xd @ wd
  else:
    y = conv(call.module, xd, wd, conv_padding(call.module, x.shape, call.kernel.shape))
  return finish(info, with_ratio_affine(y + bias_shift, info, lq, lowered), call.bias)


def with_ratio_affine(y, info: LayerInfo, lq: dict, lowered):
  """y (output channels last, before the layer's bias) through the layer's `ratio_affine`, where
  it has one.

  Args:
    y: the layer's output before its bias, output channels on the last axis.
    info: the layer.
    lq: its quantization (or integer) variables.
    lowered: (C,) bool mask of lowered feature channels.

  Returns:
    gain·y + bias, or `y` itself where lq holds no ratio affine.
  """
  affine = ratio_affine(info, lq, lowered)
  return y if affine is None else y * affine[0] + affine[1]


def operand_codes(x, scale, *, signed: bool, ste: bool):
  """8-bit codes of a matmul operand at its per-tensor scale: [-128, 127] or unsigned [0, 255].

  Args:
    x: the operand (float).
    scale: its per-tensor scale.
    signed: signed or unsigned code range.
    ste: straight-through rounding (fake-quant) instead of plain rounding.

  Returns:
    Float codes, clip(round(x / scale)), shaped as `x`.
  """
  qmin, qmax = numerics.int_range(8, signed)
  return jnp.clip((numerics.round_ste if ste else jnp.round)(x / scale), qmin, qmax)


def quantized_matmul(call: MatmulCall, a, b, mq: dict, *, signed: tuple[bool, bool], mode: str = "fake",
                     unsigned_direct: bool = False):
  """`einsum(equation, a, b)` with both operands 8-bit (scales mq['a_scale'], mq['b_scale']).

  mode 'fake': the dequantized codes in float (round_ste: straight-through gradients to the
  operands, zero outside the grid; none to the scales, which stay as calibrated); 'int': int8 x
  int8 -> int32 einsum, times s_a·s_b. An unsigned operand ([0, 255])
  is shifted by -128 into int8 and the shift is corrected exactly in int32:
    Σ qa·qb = Σ (qa−α)(qb−β) + α·Σ (qb−β) + β·Σ (qa−α) + α·β·K      (α, β ∈ {0, 128})
  where the two sums are einsums with a ones operand (int8 as well) and K the summed size.
  unsigned_direct (the serving form): an unsigned operand enters the einsum as uint8 instead
  (XLA's dot takes uint8 x int8 and uint8 x uint8 into int32), so one einsum with the same
  accumulator replaces the shift and its corrections.

  Args:
    call: the intercepted matmul call (its equation).
    a: first float operand.
    b: second float operand.
    mq: the matmul's quantization variables, 'a_scale' and 'b_scale'.
    signed: (a signed, b signed).
    mode: 'fake' or 'int'.
    unsigned_direct: in 'int' mode, feed unsigned operands as uint8 instead of shifting them.

  Returns:
    The float einsum output.

  Raises:
    ValueError: `mode` is neither 'fake' nor 'int'.
  """
  eq = call.info.equation
  # The scales are calibrated, never learnt (FlexiQ's LSQ option learns only the layers' scales).
  s_a, s_b = lax.stop_gradient(mq["a_scale"]), lax.stop_gradient(mq["b_scale"])
  ste = mode == "fake"
  qa = operand_codes(a, s_a, signed=signed[0], ste=ste)
  qb = operand_codes(b, s_b, signed=signed[1], ste=ste)
  if mode == "fake":
    return jnp.einsum(eq, qa * s_a, qb * s_b)
  if mode != "int":
    raise ValueError(f"mode must be 'fake' or 'int', not {mode!r}")
  dot = lambda x, y: jnp.einsum(eq, x, y, preferred_element_type=jnp.int32)
  if unsigned_direct:
    code_type = lambda sg: jnp.int8 if sg else jnp.uint8
    acc = dot(qa.astype(code_type(signed[0])), qb.astype(code_type(signed[1])))
    return acc.astype(jnp.float32) * (s_a * s_b)
  alpha, beta = (0 if signed[0] else 128), (0 if signed[1] else 128)
  ai, bi = (qa - alpha).astype(jnp.int8), (qb - beta).astype(jnp.int8)
  acc = dot(ai, bi)
  if alpha:
    acc = acc + alpha * dot(jnp.ones_like(ai), bi)
  if beta:
    acc = acc + beta * dot(ai, jnp.ones_like(bi))
  if alpha and beta:
    acc = acc + alpha * beta * einsum_summed_size(eq, a.shape, b.shape)
  return acc.astype(jnp.float32) * (s_a * s_b)
