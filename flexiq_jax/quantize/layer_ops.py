"""What an intercepted `Dense`/`DenseGeneral`/`Conv` call computes: float (BN-folded), fake-quant
(float simulation with straight-through gradients, for QAT) or integer (int8 codes, int32
accumulation), with any subset of feature channels lowered to 4 bits by bit extraction.

A lowered value is still an 8-bit code (a 4-bit value times 2^e), so a mixed layer is one int8
GEMM/conv: this is how the 4-bit channels run on hardware without 4-bit instructions.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flexiq_jax import quant
from flexiq_jax.inspect_model import LayerInfo

WEIGHT_QMAX = 127.0  # symmetric narrow int8 weights: [-127, 127]


def as_matrix_input(info: LayerInfo, x):
  """Dense layers: flatten the contracted trailing axes into one feature axis C."""
  if info.kind == "dense" and info.contracted_axes > 1:
    return x.reshape(x.shape[:x.ndim - info.contracted_axes] + (info.in_channels,))
  return x


def kernel_matrix(info: LayerInfo, kernel):
  """Dense kernel as (C, O); conv kernels stay HWIO."""
  if info.kind == "dense":
    return kernel.reshape(info.in_channels, -1)
  return kernel


def weight_channel_index(info: LayerInfo) -> np.ndarray:
  """For each kernel element along (I, O) — I = C/groups — the feature channel it multiplies.

  Dense: row c is channel c. Grouped conv: output o of group g reads channels g*I .. g*I+I-1.
  Depthwise (groups == C): the filter of output channel c reads feature channel c.
  """
  if info.kind == "dense":
    return np.broadcast_to(np.arange(info.in_channels)[:, None], (info.in_channels, info.out_channels))
  per_group_in = info.in_channels // info.groups
  per_group_out = info.out_channels // info.groups
  group = np.arange(info.out_channels) // per_group_out
  return group[None, :] * per_group_in + np.arange(per_group_in)[:, None]


def gather_channel(values, info: LayerInfo):
  """Per-feature-channel values (C,) -> per-kernel-element (I, O) (broadcast over spatial dims)."""
  return jnp.asarray(values)[weight_channel_index(info)]


def weight_scale(info: LayerInfo, kernel):
  """Symmetric per-output-channel scale from the current weights (no gradient through it)."""
  w = kernel_matrix(info, kernel)
  reduce_axes = tuple(range(w.ndim - 1))
  absmax = jnp.max(jnp.abs(lax.stop_gradient(w)), axis=reduce_axes)
  return jnp.maximum(absmax, 1e-8) / WEIGHT_QMAX


def _conv_padding(module: nn.Conv, x_shape, kernel_shape):
  padding = module.padding
  if isinstance(padding, str):
    if padding.upper() == "CIRCULAR":
      raise NotImplementedError(f"{'/'.join(module.path)}: circular padding is not supported")
    strides = module.strides or 1
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    dil = module.kernel_dilation or 1
    dil = (dil,) * 2 if isinstance(dil, int) else tuple(dil)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel_shape[:2], dil)]
    return lax.padtype_to_pads(x_shape[1:3], eff, strides, padding.upper())
  if isinstance(padding, int):
    return [(padding, padding)] * 2
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def _conv(module: nn.Conv, x, kernel, padding, preferred=None):
  def pair(v):
    v = 1 if v is None else v
    return (v, v) if isinstance(v, int) else tuple(v)

  return lax.conv_general_dilated(
      x, kernel, window_strides=pair(module.strides), padding=padding,
      lhs_dilation=pair(module.input_dilation), rhs_dilation=pair(module.kernel_dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=module.feature_group_count,
      preferred_element_type=preferred)


def _finish(info: LayerInfo, module, y, bias):
  if bias is not None:
    y = y + bias.reshape(-1)
  if info.kind == "dense":
    y = y.reshape(y.shape[:-1] + tuple(info.kernel_shape[info.contracted_axes:]))
  return y


def float_forward(info: LayerInfo, module, x, kernel, bias):
  """The layer in float, with an optional (folded) bias even where the module has none."""
  xm = as_matrix_input(info, x)
  if info.kind == "dense":
    y = xm @ kernel_matrix(info, kernel)
  else:
    y = _conv(module, xm, kernel, _conv_padding(module, x.shape, kernel.shape))
  return _finish(info, module, y, bias)


def quantize_codes(info: LayerInfo, x, kernel, lq: dict, lowered, *, signed: bool, ste: bool,
                   lsq: bool = False):
  """Returns (activation codes, weight codes, activation scale, weight scale, bias shift), with
  the `lowered` (C,) channels of both replaced by their 4-bit extraction.

  The bias shift (O,), in real units, is zero unless `lq` holds the calibrated mean codes
  ('mean_code', 'mean_lowered'): then it is the expected output lost by lowering,
  Σ_{c lowered} (E[q_c] w8[c, o] - E[lower(q_c)] w4[c, o]) s_x s_w[o], summed over the kernel
  elements that read channel c. Lowering (clipping especially) shifts each channel's mean, and
  the shifts of many channels add up through the network; this first-order correction (as in
  data-free quantization's bias correction) removes them, for any set of lowered channels.
  """
  s_x = lq["act_scale"]
  qmin, qmax = quant.int_range(8, signed)
  if lsq:
    xq = quant.lsq_fake_quant(x, s_x, qmin, qmax) / s_x
  elif ste:
    xq = jnp.clip(quant.round_ste(x / s_x), qmin, qmax)
  else:
    xq = jnp.clip(jnp.round(x / s_x), qmin, qmax)
  lower = quant.lower_codes_ste if ste else quant.lower_codes
  x_low = lower(xq, lq["act_e"], signed=signed)
  xq = jnp.where(lowered, x_low, xq)

  if "weight_scale" in lq:  # a serving export: the kernel holds the int8 codes themselves
    wq = kernel_matrix(info, kernel).astype(jnp.float32)
    s_w = lq["weight_scale"]
  else:
    w = kernel_matrix(info, kernel)
    s_w = weight_scale(info, kernel)
    wq = jnp.clip((quant.round_ste if ste else jnp.round)(w / s_w), -WEIGHT_QMAX, WEIGHT_QMAX)
  w_low = lower(wq, gather_channel(lq["weight_e"], info), signed=True)
  lowered_k = gather_channel(lowered, info)
  bias_shift = jnp.zeros(s_w.shape, jnp.float32)
  if "mean_lowered" in lq:
    lost = gather_channel(lq["mean_code"], info) * wq - gather_channel(lq["mean_lowered"], info) * w_low
    lost = jax.lax.stop_gradient(jnp.where(lowered_k, lost, 0.0))
    bias_shift = jnp.sum(lost, axis=tuple(range(lost.ndim - 1))) * s_x * s_w
  wq = jnp.where(lowered_k, w_low, wq)
  return xq, wq, s_x, s_w, bias_shift


def weight_codes(info: LayerInfo, kernel):
  """(int8 codes in the kernel's shape, per-output-channel scale (O,)) of a float kernel, as the
  integer path computes them: what a serving export stores instead of the float kernel."""
  s_w = weight_scale(info, kernel)
  q = jnp.clip(jnp.round(kernel_matrix(info, kernel) / s_w), -WEIGHT_QMAX, WEIGHT_QMAX)
  return q.astype(jnp.int8).reshape(kernel.shape), s_w


def quantized_forward(info: LayerInfo, module, x, kernel, bias, lq: dict, lowered, *, signed: bool,
                      mode: str = "fake", lsq: bool = False, conv_accumulator=jnp.int32):
  """mode 'fake': dequantized codes in float (differentiable, STE); 'int': int8 x int8 -> int32.

  Unsigned activations ([0, 255]) do not fit int8, so the integer path shifts them by -128 and adds
  back 128 * Σ w per output (exact); a conv then pads explicitly with the shifted zero.
  """
  x = as_matrix_input(info, x)
  xq, wq, s_x, s_w, bias_shift = quantize_codes(info, x, kernel, lq, lowered, signed=signed,
                                                ste=mode == "fake", lsq=lsq)
  if mode == "fake":
    xd, wd = xq * s_x, wq * s_w
    if info.kind == "dense":
      y = xd @ wd
    else:
      y = _conv(module, xd, wd, _conv_padding(module, x.shape, kernel.shape))
    return _finish(info, module, y + bias_shift, bias)
  if mode != "int":
    raise ValueError(f"mode must be 'fake' or 'int', not {mode!r}")
  shift = 0 if signed else 128
  xi = (xq - shift).astype(jnp.int8)
  wi = wq.astype(jnp.int8)
  if info.kind == "dense":
    acc = lax.dot_general(xi, wi, (((xi.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    if shift:
      acc = acc + shift * jnp.sum(wi.astype(jnp.int32), axis=0)
  else:
    padding = _conv_padding(module, x.shape, kernel.shape)
    if shift:
      xi = jnp.pad(xi, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)), constant_values=-shift)
      padding = [(0, 0), (0, 0)]
    acc = _conv(module, xi, wi, padding, preferred=conv_accumulator)
    if shift:
      acc = acc + shift * jnp.sum(wi.astype(acc.dtype), axis=(0, 1, 2))
  y = acc.astype(jnp.float32) * (s_x * s_w)
  return _finish(info, module, y + bias_shift, bias)
