"""The integer path in serving form: everything the ratio does not change is computed once.

`prepare(plan, qvars)` turns quantized variables (float kernels, an LSQ scale, or an int8 export)
into serving variables holding, per quantized layer:

  params/<path>/kernel  the int8 weight codes (input channels zero-padded for small convs, below)
  integer/<path>:
    w_low        int8 codes of every weight element lowered as its feature channel would be
    scale        (O,) s_x * s_w, the epilogue's per-output scale
    step         (C,) 2^e of each feature channel (activation extraction position)
    colsum       (O,) Σ of the int8 codes per output; colsum_delta (I, O) the change of that sum
                 when the channel read at (i, o) is lowered (unsigned inputs: the exact -128 shift)
    lost         (I, O) Σ over the kernel's spatial taps of E[q_c] w8 - E[lower(q_c)] w_low: the
                 calibrated mean output lost by lowering channel c (bias correction), in codes

so that a call at any ratio does only: one elementwise pass that quantizes and lowers the
activation and writes int8 codes; one int8 GEMM/conv with int32 accumulation; one epilogue
`acc * scale + offset` where the ratio enters through masked sums over (I, O) tables (never a
pass over the kernel or the activations); and a select between `kernel` and `w_low` rows. XLA
fuses the epilogue with what follows it up to the next layer's quantize pass (ReLU, folded
residual adds), so between layers the activation is written once, as int8 codes.

The arithmetic is that of `layer_ops.quantized_forward(mode='int')` (the plain reference): the
int32 accumulators are identical; the logits agree up to float rounding of the bias correction
term, summed here per channel rather than per kernel element.

Small convolutions: XLA:CPU's int8 convolution is several times slower than float32 when both
channel counts are small (16 -> 16 channels, 3x3: about 8x slower on a 2-core AVX-512 VNNI
machine; 32 -> 16: 2x faster than float32). `min_conv_channels` zero-pads the input channels of
such convs (the activation codes get zero channels in the same fused pass) up to that count;
benchmarks/integer_path.py measures it both ways.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flexiq_jax import numerics
from flexiq_jax.interception import (LayerCall, LayerInfo, MatmulCall, as_matrix_input, conv, conv_padding, finish,
                                     get_path, kernel_matrix, set_path)
from flexiq_jax.quantize import layer_ops
from flexiq_jax.quantize.plan import QuantPlan

SERVING_KEY = "integer"
CONV_LAYOUTS = ("auto", "plain")


def default_min_conv_channels() -> int:
  """32 on CPU, where XLA's int8 convolutions with fewer input channels are slow; 1 elsewhere."""
  return 32 if jax.default_backend() == "cpu" else 1


def is_prepared(qvars) -> bool:
  return SERVING_KEY in qvars


def _padded_in_channels(info: LayerInfo, min_conv_channels: int) -> int:
  """Input channels of the int8 conv: an ungrouped conv with 8 to min_conv_channels - 1 input
  channels is padded with zero channels up to min_conv_channels (a stem with 1-3 channels is not:
  padding would multiply its input many times; grouped convs keep theirs: it would change groups)."""
  if info.kind == "conv" and info.groups == 1 and 8 <= info.in_channels < min_conv_channels:
    return min_conv_channels
  return info.in_channels


def prepare_layer(info: LayerInfo, layer_params: dict, lq: dict, *, lowerable: bool,
                  min_conv_channels: int) -> tuple[dict, dict]:
  """(params entry with the int8 kernel, integer entry) of one quantized layer (module docstring)."""
  if layer_params["kernel"].dtype == jnp.int8:  # an int8 export: the codes and their scale
    w8 = kernel_matrix(info, layer_params["kernel"]).astype(jnp.float32)
    s_w = lq["weight_scale"]
  else:
    codes, s_w = layer_ops.weight_codes(info, layer_params["kernel"], lq.get("lsq_weight_scale"))
    w8 = kernel_matrix(info, codes).astype(jnp.float32)
  s_x = lq["act_scale"]
  entry = {"act_scale": s_x, "weight_scale": s_w, "scale": s_x * s_w, "step": jnp.exp2(lq["act_e"].astype(jnp.float32))}
  w_low = numerics.lower_codes(w8, layer_ops.gather_channel(lq["weight_e"], info), signed=True)
  lowerable = lowerable and "rank" in lq  # no rank: no selection yet (report.float_ops_of_plan)
  if lowerable:
    entry["rank"] = lq["rank"]
    if "mean_lowered" in lq:
      entry["lost"] = layer_ops.lost_output_table(info, w8, w_low, lq)
  pad = _padded_in_channels(info, min_conv_channels) - info.in_channels
  pad_rows = (lambda w: jnp.pad(w, ((0, 0), (0, 0), (0, pad), (0, 0)))) if pad else (lambda w: w)
  if lowerable:
    entry["w_low"] = pad_rows(w_low).astype(jnp.int8)
  params = {"kernel": pad_rows(w8).astype(jnp.int8)}
  if layer_params.get("bias") is not None:
    params["bias"] = layer_params["bias"]
  return params, entry


def prepare(plan: QuantPlan, qvars, *, conv_layout: str = "auto") -> dict:
  """Serving variables from quantized variables (module docstring); jit-compatible, and done once
  outside the serving function by `quantize.make_predict`. Idempotent on prepared variables.
  conv_layout 'auto' pads small convs' input channels (`default_min_conv_channels`), 'plain' none."""
  if is_prepared(qvars):
    return qvars
  min_conv_channels = default_min_conv_channels() if conv_layout == "auto" else 1
  params, integer = qvars["params"], {}
  for path in plan.quantized:
    layer_params, entry = prepare_layer(plan.layers[path], get_path(params, path), get_path(qvars["quant"], path),
                                        lowerable=path in plan.lowerable,
                                        min_conv_channels=min_conv_channels)
    params = set_path(params, path, layer_params)
    integer = set_path(integer, path, entry)
  matmuls = {}
  for path in plan.quantized_matmuls:
    matmuls = set_path(matmuls, path, get_path(qvars["quant"], path))
  out = {k: v for k, v in qvars.items() if k not in ("params", "quant")}
  return {**out, "params": params, SERVING_KEY: integer, "quant": matmuls}


def _row_mask(info: LayerInfo, lowered, padded_in: int):
  """The lowered mask broadcast over the kernel: (C,) -> (I, O) or (1, 1, I, O)-broadcastable."""
  if info.kind == "dense":
    return lowered[:, None]
  if info.groups == 1:
    return jnp.pad(lowered, (0, padded_in - info.in_channels))[None, None, :, None]
  return layer_ops.gather_channel(lowered, info)[None, None]


def activation_codes(x, entry: dict, lowered, *, signed: bool):
  """int8/uint8-valued codes of x (float array holding integers) with the `lowered` channels'
  codes replaced by their 4-bit extraction: one elementwise pass (fused by XLA)."""
  qmin, qmax = numerics.int_range(8, signed)
  q = jnp.clip(jnp.round(x / entry["act_scale"]), qmin, qmax)
  if lowered is None:
    return q
  lo4, hi4 = numerics.int_range(4, signed)
  step = jnp.where(lowered, entry["step"], 1.0)
  lo = jnp.where(lowered, lo4, qmin).astype(q.dtype)
  hi = jnp.where(lowered, hi4, qmax).astype(q.dtype)
  # An unlowered channel: floor(q + 1/2) = q and the 8-bit bounds: unchanged. Powers of two: exact.
  return jnp.clip(jnp.floor(q * (1.0 / step) + 0.5), lo, hi) * step


def _pair(v) -> tuple[int, int]:
  v = 1 if v is None else v
  return (v, v) if isinstance(v, int) else tuple(v)


def _taps_inside(size: int, out_size: int, taps: int, stride: int, dilation: int, pad_lo: int) -> np.ndarray:
  """(out_size, taps) bool: whether tap a of output position r reads inside the input (not padding)."""
  pos = np.arange(out_size)[:, None] * stride + np.arange(taps)[None, :] * dilation - pad_lo
  return (pos >= 0) & (pos < size)


def unsigned_shift_correction(module, x_shape, padding, kernel, out_hw) -> jax.Array:
  """(H', W', O) int32: Σ of the kernel taps that fall inside the image, per output position.

  An unsigned code q in [0, 255] enters the int8 conv as q - 128 and the conv pads with 0 (= code
  128), so acc = Σ_inside (q - 128) w; adding 128 * this map gives Σ_inside q w exactly. Built from
  static shapes (numpy) and the per-tap column sums of the kernel at this ratio: no extra pass over
  the activations, and the conv keeps its own padding (XLA:CPU's int8 conv on an explicitly padded
  input runs several times slower)."""
  (kh, kw), strides, dil = kernel.shape[:2], _pair(module.strides), _pair(module.kernel_dilation)
  rows = _taps_inside(x_shape[1], out_hw[0], kh, strides[0], dil[0], padding[0][0])
  cols = _taps_inside(x_shape[2], out_hw[1], kw, strides[1], dil[1], padding[1][0])
  inside = (rows[:, None, :, None] & cols[None, :, None, :]).astype(np.int32)  # (H', W', kh, kw)
  tap_sums = jnp.sum(kernel, axis=2, dtype=jnp.int32)  # (kh, kw, O): per output, over its group's inputs
  return jnp.einsum("hwab,abo->hwo", inside, tap_sums)


def exact_in_float32(info: LayerInfo, signed: bool) -> bool:
  """Whether a float32 conv on the integer codes is exact: |Σ| <= K * max|q| * 127 <= 2^24, with
  K = the taps and input channels each output sums over."""
  taps = int(np.prod(info.kernel_shape[:-1]))
  return taps * (128 if signed else 255) * layer_ops.WEIGHT_QMAX <= 2 ** 24


def default_float_codes_conv(info: LayerInfo) -> bool:
  """On CPU, convs that XLA's int8 kernels serve poorly (a stem with fewer than 8 input channels,
  which XLA widens to int32; grouped and depthwise convs) run on the codes in float32 where that
  is exact (`exact_in_float32`)."""
  return jax.default_backend() == "cpu" and info.kind == "conv" and (info.in_channels < 8 or info.groups > 1)


def integer_forward(call: LayerCall, x, entry: dict, lowered, *, signed: bool, conv_accumulator=jnp.int32,
                    float_codes_conv: bool | None = None):
  """One quantized layer on serving variables: `lowered` (C,) bool, or None for a layer that is
  never lowered. call.kernel holds the (padded) int8 codes. float_codes_conv: run a conv on the
  codes in float32 where that is exact (None: `default_float_codes_conv`); the accumulators are
  the same integers either way."""
  info, module, kernel = call.info, call.module, call.kernel
  x = as_matrix_input(info, x)
  q = activation_codes(x, entry, lowered, signed=signed)
  wi = kernel
  if lowered is not None:
    wi = jnp.where(_row_mask(info, lowered, kernel.shape[-2] if info.kind == "conv" else 0), entry["w_low"], kernel)
  if info.kind == "dense":
    # XLA's dot takes uint8 x int8 directly: unsigned codes need no shift.
    xi = q.astype(jnp.int8 if signed else jnp.uint8)
    acc = lax.dot_general(xi, wi, (((xi.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
  elif ((default_float_codes_conv(info) if float_codes_conv is None else float_codes_conv)
        and exact_in_float32(info, signed) and kernel.shape[-2] == info.in_channels // info.groups):
    # The codes in float32: every partial sum is an integer below 2^24, so the accumulators are
    # exactly the int8 conv's; padding with 0 is the real zero, so no shift is needed.
    acc = conv(module, q, wi.astype(jnp.float32), conv_padding(module, x.shape, info.kernel_shape))
  else:
    shift = 0 if signed else 128
    xi = (q - shift).astype(jnp.int8)
    if info.groups == 1 and kernel.shape[-2] > info.in_channels:  # zero channels for a small conv
      xi = jnp.pad(xi, [(0, 0)] * 3 + [(0, kernel.shape[-2] - info.in_channels)])
    padding = conv_padding(module, x.shape, info.kernel_shape)
    if shift and _pair(module.input_dilation) != (1, 1):
      # A transposed conv's inserted zeros are real zeros too (code -128): pad them explicitly.
      d = _pair(module.input_dilation)
      xi = lax.pad(xi, jnp.int8(-shift), [(0, 0, 0), (*padding[0], d[0] - 1), (*padding[1], d[1] - 1), (0, 0, 0)])
      acc = conv(module, xi, wi, [(0, 0), (0, 0)], preferred=conv_accumulator, input_dilation=1)
      acc = acc + (shift * jnp.sum(wi, axis=(0, 1, 2), dtype=jnp.int32)).astype(acc.dtype)
    else:
      acc = conv(module, xi, wi, padding, preferred=conv_accumulator)
      if shift:
        acc = acc + (shift * unsigned_shift_correction(module, x.shape, padding, wi, acc.shape[1:3])).astype(acc.dtype)
  y = acc.astype(jnp.float32) * entry["scale"]
  if lowered is not None and "lost" in entry:  # in the reference's order: the same float roundings
    y = y + layer_ops.masked_channel_sum(info, lowered, entry["lost"]) * entry["act_scale"] * entry["weight_scale"]
  return finish(info, y, call.bias)


@dataclasses.dataclass(frozen=True)
class IntegerLayers:
  """The provider of the serving form: layer p lowers the channels whose rank is below counts[p]
  (layers without a count lower none); matmuls run 8-bit as in `layer_ops.quantized_matmul`."""

  integer: dict  # svars['integer']
  matmul_quant: dict  # svars['quant']: the matmuls' operand scales
  counts: dict  # {lowerable path: traced count}
  signed: dict  # {path: bool}
  matmul_signed: dict  # {matmul path: (a signed, b signed)}
  conv_accumulator: str = "int32"
  conv_layout: str = "auto"  # 'plain': no float32 convs on codes (see integer_forward)

  def layer(self, call: LayerCall, x):
    entry = get_path(self.integer, call.path)
    lowered = entry["rank"] < self.counts[call.path] if call.path in self.counts else None
    acc = jnp.int32 if self.conv_accumulator == "int32" else jnp.float32
    return integer_forward(call, x, entry, lowered, signed=self.signed[call.path], conv_accumulator=acc,
                           float_codes_conv=None if self.conv_layout == "auto" else False)

  def matmul(self, call: MatmulCall, a, b):
    return layer_ops.quantized_matmul(call, a, b, get_path(self.matmul_quant, call.path),
                                      signed=self.matmul_signed[call.path], mode="int")
