"""The integer path in serving form: everything the ratio does not change is computed once.

`prepare(plan, qvars)` turns quantized variables (float kernels, an LSQ scale, or an int8 export)
into serving variables holding, per quantized layer:

  params/<path>/kernel  the int8 weight codes (no float kernel is kept)
  integer/<path>:
    w_low         int8 codes of every weight element lowered as its feature channel would be
    act_scale, weight_scale, scale = act_scale * weight_scale (the epilogue's per-output scale)
    step          (C,) 2^e of each feature channel (the activation's extraction position)
    rank          (C,) position of each channel in the lowering order
    lost          (I, O) Σ over the kernel's spatial taps of E[q_c] w8 - E[lower(q_c)] w_low: the
                  calibrated mean output lost by lowering channel c (bias correction), in codes

so that a call at any ratio does only: one elementwise pass that quantizes and lowers the
activation (per-channel step and bounds chosen by the lowered mask); a select between `kernel`
and `w_low` rows (kernel-sized, not activation-sized); one int8 GEMM/conv with int32
accumulation; one epilogue `acc * scale + bias + correction`, the correction a masked sum over
an (I, O) table. XLA fuses the epilogue with what follows it up to the next layer's quantize pass
(ReLU, residual adds), so between layers the activation is written once (as int8 codes where the
next layer is the only reader).

Unsigned codes ([0, 255]): a dense layer takes them as uint8 (XLA's dot accepts uint8 x int8); a
conv takes q - 128 in int8 and adds back 128 x the kernel taps inside the image per output
position (`unsigned_shift_correction`, from static shapes), so the conv keeps its own padding.
On an asymmetric grid (entry 'zero_point' z, unsigned codes whose real zero is code z) the same
map takes z x the taps inside the image off (dense: z x the kernel's column sums), so a padded
position still adds nothing; such layers run on the XLA implementations (oneDNN and the Pallas
dense kernel take no zero point here).

Each conv has interchangeable implementations (`CONV_IMPLS`, the same integer accumulators):
'int8', 'int8_pad' (explicit padding with the shifted zero), 'int8_widened' (input channels
padded with zero weights up to 32, where XLA:CPU's int8 conv is fast) and 'float32' (the conv on
the codes in float32, exact while every sum stays below 2^24: `exact_in_float32`). XLA:CPU's int8 kernels
are much faster than float32 for some shapes and much slower for others (few channels, depthwise),
so `default_conv_impl` picks per backend and `tuning.tune_conv_impls` per layer by measurement.
'onednn' (opt-in, CPU only) runs the conv as oneDNN's int8 convolution through XLA's FFI
(`quantize.onednn`) with the epilogue `acc * scale + (bias + correction)` fused into it; dense layers
likewise with `dense_impl='onednn'`. Where the kernel library is not built or the backend is not
the CPU, both fall back to the XLA implementations.

The arithmetic is that of `layer_ops.quantized_forward(mode='int')` (the plain reference): the
int32 accumulators are identical and so are the logits when compiled alike (separate
compilations may contract the epilogue's multiply-add into an FMA differently: the last bit).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flexiq_jax import numerics
from flexiq_jax.interception import (LayerCall, LayerInfo, MatmulCall, as_matrix_input, conv, conv_padding, finish,
                                     get_path, kernel_matrix, set_path, spatial_pair)
from flexiq_jax import layer_ops
from flexiq_jax.plan import QuantPlan
from flexiq_jax.quantize import onednn

SERVING_KEY = "integer"


def is_prepared(qvars) -> bool:
  """Whether `qvars` are already serving variables (from `prepare`).

  Args:
    qvars: quantized or serving variables.

  Returns:
    True if `qvars` holds the SERVING_KEY ('integer') collection.
  """
  return SERVING_KEY in qvars


def prepare_layer(info: LayerInfo, layer_params: dict, lq: dict, *, lowerable: bool) -> tuple[dict, dict]:
  """(params entry with the int8 kernel, integer entry) of one quantized layer (module docstring).

  The weight codes come from an int8 export's kernel and lq['weight_scale'] as they are, or are
  computed from the float kernel (`layer_ops.weight_codes`, with lq's LSQ scale or weight_qmax).
  'rank' and 'w_low' are added only for a lowerable layer whose `lq` holds a 'rank' (a selection),
  and 'lost' only where `lq` also holds the bias-correction means.

  Args:
    info: the layer.
    layer_params: its params entry ({'kernel', 'bias'?}); the kernel float or int8.
    lq: its quantization variables ('act_scale', 'act_e', 'weight_e', and optionally 'weight_scale',
      'lsq_weight_scale', 'weight_qmax', 'rank', 'mean_code', 'mean_lowered').
    lowerable: whether the layer may be lowered.

  Returns:
    (params, entry): params {'kernel': int8 codes in the kernel's matrix form, 'bias' if any}, and the
    integer entry {'act_scale', 'weight_scale', 'scale', 'step', 'zero_point' on an asymmetric
    grid, and 'rank', 'w_low', 'lost' as above, with 'ratio_gain' and 'ratio_bias' where lq holds
    them: `layer_ops.ratio_affine`}.
  """
  if layer_params["kernel"].dtype == jnp.int8:  # an int8 export: the codes and their scale
    w8 = kernel_matrix(info, layer_params["kernel"]).astype(jnp.float32)
    s_w = lq["weight_scale"]
  else:
    codes, s_w = layer_ops.weight_codes(info, layer_params["kernel"], lq.get("lsq_weight_scale"),
                                         layer_ops.weight_qmax(lq))
    w8 = kernel_matrix(info, codes).astype(jnp.float32)
  s_x = lq["act_scale"]
  entry = {"act_scale": s_x, "weight_scale": s_w, "scale": s_x * s_w, "step": jnp.exp2(lq["act_e"].astype(jnp.float32))}
  if "act_zero" in lq:  # an asymmetric activation grid: its zero point
    entry["zero_point"] = lq["act_zero"]
  if lowerable and "rank" in lq:  # no rank: no selection yet (report.float_ops_of_plan)
    w_low = numerics.lower_codes(w8, layer_ops.gather_channel(lq["weight_e"], info), signed=True)
    entry["rank"] = lq["rank"]
    entry["w_low"] = w_low.astype(jnp.int8)
    if "mean_lowered" in lq:
      entry["lost"] = layer_ops.lost_output_table(info, w8, w_low, lq)
    entry.update({k: lq[k] for k in layer_ops.RATIO_AFFINE_KEYS if k in lq})
  params = {"kernel": w8.astype(jnp.int8)}
  if layer_params.get("bias") is not None:
    params["bias"] = layer_params["bias"]
  return params, entry


def prepare(plan: QuantPlan, qvars) -> dict:
  """Serving variables from quantized variables (module docstring); jit-compatible, and done once
  outside the serving function by `quantize.make_predict`. Idempotent on prepared variables.

  Args:
    plan: the quantization plan.
    qvars: quantized variables ({'params', 'quant', ...}) or serving variables.

  Returns:
    The serving variables: 'params' with int8 kernels for the quantized layers, 'integer' with one
    entry per quantized layer (`prepare_layer`), 'quant' with only the matmuls' scales, and every
    other collection of `qvars` (e.g. 'batch_stats') as it was. `qvars` itself if already prepared.
  """
  if is_prepared(qvars):
    return qvars
  params, integer = qvars["params"], {}
  for path in plan.quantized:
    layer_params, entry = prepare_layer(plan.layers[path], get_path(params, path), get_path(qvars["quant"], path),
                                        lowerable=path in plan.lowerable)
    params = set_path(params, path, layer_params)
    integer = set_path(integer, path, entry)
  matmuls = {}
  for path in plan.quantized_matmuls:
    matmuls = set_path(matmuls, path, get_path(qvars["quant"], path))
  out = {k: v for k, v in qvars.items() if k not in ("params", "quant")}
  return {**out, "params": params, SERVING_KEY: integer, "quant": matmuls}


def _row_mask(info: LayerInfo, lowered):
  """The lowered mask broadcast over the kernel: (C,) -> (I, O) or (1, 1, I, O)-broadcastable."""
  if info.kind == "dense":
    return lowered[:, None]
  if info.groups == 1:
    return lowered[None, None, :, None]
  return layer_ops.gather_channel(lowered, info)[None, None]


def activation_codes(x, entry: dict, lowered, *, signed: bool):
  """int8/uint8-valued codes of x (float array holding integers) with the `lowered` channels'
  codes replaced by their 4-bit extraction: one elementwise pass (fused by XLA).

  Args:
    x: the layer's float input, feature channels last.
    entry: the layer's integer entry ('act_scale', 'zero_point' on an asymmetric grid, and 'step'
      (C,) when lowering).
    lowered: (C,) bool mask of lowered channels, or None for none.
    signed: signed ([-128, 127]) or unsigned ([0, 255]) codes.

  Returns:
    Float codes shaped as `x`.
  """
  qmin, qmax = numerics.int_range(8, signed)
  q = jnp.clip(jnp.round(x * (1.0 / entry["act_scale"])) + entry.get("zero_point", 0.0), qmin, qmax)
  if lowered is None:
    return q
  lo4, hi4 = numerics.int_range(4, signed)
  step = jnp.where(lowered, entry["step"], 1.0)
  lo = jnp.where(lowered, lo4, qmin).astype(q.dtype)
  hi = jnp.where(lowered, hi4, qmax).astype(q.dtype)
  # An unlowered channel: floor(q + 1/2) = q and the 8-bit bounds: unchanged. Powers of two: exact.
  return jnp.clip(jnp.floor(q * (1.0 / step) + 0.5), lo, hi) * step


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
  input runs several times slower). Assumes no input dilation (the caller pads explicitly there).

  Args:
    module: the `nn.Conv` (strides and kernel dilation).
    x_shape: NHWC input shape.
    padding: explicit (lo, hi) pairs of the conv.
    kernel: the int8 HWIO kernel the conv runs at this ratio.
    out_hw: (H', W') of the conv's output.

  Returns:
    (H', W', O) int32 array.
  """
  (kh, kw), strides, dil = kernel.shape[:2], spatial_pair(module.strides), spatial_pair(module.kernel_dilation)
  rows = _taps_inside(x_shape[1], out_hw[0], kh, strides[0], dil[0], padding[0][0])
  cols = _taps_inside(x_shape[2], out_hw[1], kw, strides[1], dil[1], padding[1][0])
  inside = (rows[:, None, :, None] & cols[None, :, None, :]).astype(np.int32)  # (H', W', kh, kw)
  tap_sums = jnp.sum(kernel, axis=2, dtype=jnp.int32)  # (kh, kw, O): per output, over its group's inputs
  return jnp.einsum("hwab,abo->hwo", inside, tap_sums)


def exact_in_float32(info: LayerInfo, signed: bool) -> bool:
  """Whether a float32 conv on the integer codes is exact: |Σ| <= K * max|q| * 127 <= 2^24, with
  K = the taps and input channels each output sums over.

  Args:
    info: the layer.
    signed: signed codes (max |q| 128) or unsigned (255).

  Returns:
    True if every partial sum fits float32's 24-bit mantissa.
  """
  taps = int(np.prod(info.kernel_shape[:-1]))
  return taps * (128 if signed else 255) * layer_ops.WEIGHT_QMAX <= 2 ** 24


CONV_IMPLS = ("int8", "int8_pad", "int8_widened", "float32", "onednn")
TUNED_CONV_IMPLS = CONV_IMPLS[:4]  # the XLA ones: the tuner keeps the logits bit for bit
CPU_INT8_MIN_CHANNELS = 32  # XLA:CPU's int8 conv is fast from here; 'int8_widened' pads up to it


def default_conv_impl(info: LayerInfo) -> str:
  """Without tuning (`tune_conv_impls`): on CPU, convs with fewer than 32 input channels and
  depthwise/grouped convs run on the codes in float32 (falling back to int8 where that would not
  be exact); every other conv, and everything on other backends, as 'int8'. Measured on a 2-core
  AVX-512 VNNI machine (benchmarks/integer_path.py): XLA's int8 16 -> 16 3x3 conv is several times
  slower than its float32 one and 32 -> 16 twice as fast; a 1-3 channel stem is widened to int32;
  EfficientNet-B0's 5x5 depthwise convs run about 6x slower in int8 than on float32 codes.
  'int8_widened' is left to the tuner: on int8 codes alone the widened 16 -> 16 conv ran ~2.5x
  faster than float32, but within the layer (the quantize pass, the channel padding and the
  unsigned-shift correction included) it was no faster than float32 on the quickstart's convs.

  Args:
    info: the layer.

  Returns:
    'float32' or 'int8' (the fallback from 'float32' is applied by `conv_impl_for`).
  """
  if jax.default_backend() != "cpu" or info.kind != "conv":
    return "int8"
  return "float32" if info.groups > 1 or info.in_channels < CPU_INT8_MIN_CHANNELS else "int8"


def conv_impl_for(info: LayerInfo, signed: bool, requested: str | None) -> str:
  """The conv implementation a layer runs: `requested` (None: `default_conv_impl`), with 'float32'
  falling back to 'int8' where float32 sums would not be exact, 'int8_widened' to 'int8' where
  there is nothing to widen (32+ input channels) or it would change the groups (grouped convs), and
  'onednn' to the default where the oneDNN kernels are unavailable (`onednn.available`).

  Args:
    info: the conv layer.
    signed: whether its activation codes are signed.
    requested: one of CONV_IMPLS, or None for the backend default.

  Returns:
    One of CONV_IMPLS.

  Raises:
    ValueError: the implementation is not in CONV_IMPLS.
  """
  impl = default_conv_impl(info) if requested is None else requested
  if impl not in CONV_IMPLS:
    raise ValueError(f"unknown conv implementation {impl!r}; use one of {CONV_IMPLS}")
  if impl == "int8_widened" and (info.groups > 1 or info.in_channels >= CPU_INT8_MIN_CHANNELS):
    return "int8"
  if impl == "onednn":
    return impl if onednn.available() else conv_impl_for(info, signed, None)
  return "int8" if impl == "float32" and not exact_in_float32(info, signed) else impl


DENSE_IMPLS = ("xla", "pallas", "onednn")


def _bias_correction(info: LayerInfo, entry: dict, lowered):
  """(O,) float: the mean output the lowered channels lose at this ratio, or None (no lowering)."""
  if lowered is None or "lost" not in entry:
    return None
  return layer_ops.masked_channel_sum(info, lowered, entry["lost"]) * entry["act_scale"] * entry["weight_scale"]


def _affine(info: LayerInfo, entry: dict, lowered):
  """The layer's `layer_ops.ratio_affine` (gain, bias) at this ratio, or None (none learnt, or a
  layer never lowered)."""
  return None if lowered is None else layer_ops.ratio_affine(info, entry, lowered)


def _fused_epilogue(info: LayerInfo, entry: dict, lowered, bias, out_channels: int):
  """(scale (O,) or scalar, bias (O,)) of a fused epilogue `acc * scale + bias`: the layer's scale
  and bias, its bias correction at this ratio, and its ratio affine folded into both."""
  out = jnp.zeros((out_channels,), jnp.float32)
  if (correction := _bias_correction(info, entry, lowered)) is not None:
    out = out + correction
  scale = entry["scale"]
  if (affine := _affine(info, entry, lowered)) is not None:
    scale, out = scale * affine[0], out * affine[0] + affine[1]
  if bias is not None:
    out = out + bias.reshape(-1)
  return scale, out


def _zero_code(entry: dict):
  """The entry's zero point as an int32 scalar (an integer held in a float)."""
  return jnp.asarray(entry["zero_point"], jnp.float32).astype(jnp.int32)


def _onednn_conv_ok(module, padding) -> bool:
  """Whether oneDNN's conv can run this layer: no input dilation, no negative (cropping) padding."""
  return spatial_pair(module.input_dilation) == (1, 1) and all(v >= 0 for p in padding for v in p)


@dataclasses.dataclass(frozen=True)
class NextCodes:
  """The activation quantization of the layer that reads a layer's output (`IntegerLayers`'
  requantization edges): its entry, lowered channels and signedness, and the activation between
  the two layers ('none', 'relu' or 'relu6')."""

  entry: dict
  lowered: jax.Array | None
  signed: bool
  activation: str


def lowering_operand(step, lowered, *, signed: bool):
  """The oneDNN kernels' `lowering` operand (`onednn.lowering_rows`) for the activation codes of a
  layer whose `lowered` channels extract 4 bits at `step`: those channels' step and 4-bit bounds,
  the others step 1 and the 8-bit bounds (left as they are).

  Args:
    step: (C,) float, each channel's extraction step 2^e.
    lowered: (C,) bool mask of the lowered channels.
    signed: signed or unsigned codes.

  Returns:
    (4, C) float32.
  """
  qmin, qmax = numerics.int_range(8, signed)
  lo4, hi4 = numerics.int_range(4, signed)
  return onednn.lowering_rows(jnp.where(lowered, step, 1.0), jnp.where(lowered, lo4, qmin),
                              jnp.where(lowered, hi4, qmax))


def _next_codes_epilogue(next_codes: NextCodes) -> dict | None:
  """`onednn.conv`/`matmul` epilogue arguments that write `next_codes`' activation codes from this
  layer's float output (activation, multiplication by the inverse scale, 8-bit clip, 4-bit
  extraction: what `activation_codes` computes), or None where its grid has a zero point or a per-channel scale."""
  entry = next_codes.entry
  if "zero_point" in entry or jnp.size(entry["act_scale"]) != 1:
    return None
  kw = dict(post_op=next_codes.activation, out_dtype=jnp.int8 if next_codes.signed else jnp.uint8,
            dst_scale=jnp.reshape(entry["act_scale"], ()))
  if next_codes.lowered is not None:
    kw["lowering"] = lowering_operand(entry["step"], next_codes.lowered, signed=next_codes.signed)
  return kw


def integer_forward(call: LayerCall, x, entry: dict, lowered, *, signed: bool, conv_accumulator=jnp.int32,
                    conv_impl: str | None = None, dense_impl: str = "xla", codes=None,
                    next_codes: NextCodes | None = None, addend=None, addend_activation: str = "none",
                    sum_codes: NextCodes | None = None, stream=None):
  """One quantized layer on serving variables: `lowered` (C,) bool, or None for a layer that is
  never lowered; call.kernel holds the int8 codes. conv_impl (CONV_IMPLS; None: the default for
  the backend): 'int8' one int8 conv with the layer's own padding (unsigned codes shifted by -128,
  the border corrected exactly: `unsigned_shift_correction`); 'int8_pad' the shifted codes padded
  explicitly with the shifted zero, then an unpadded int8 conv; 'int8_widened' 'int8' on input
  channels padded with zero weights to 32; 'float32' the conv on the codes in float32 (where exact).
  The accumulators are the same integers whichever runs. dense_impl (DENSE_IMPLS): 'xla' the steps
  below; 'pallas' quantize, lower, GEMM and epilogue in one fused kernel (`pallas_dense.fused_dense`,
  the same outputs; Pallas interpret mode off a GPU, where it is only a check, never fast).
  codes: the layer's input activation codes, already computed (by the layer that feeds it, through
  `next_codes`): `x` then only gives the shape. next_codes: a layer on oneDNN then returns the
  activation codes of the layer that reads its output (uint8/int8) instead of its float output.
  addend: a residual sum's other term (the output's shape): the layer then returns
  `addend_activation(output + addend)`, the sum fused into the oneDNN conv's epilogue where the layer
  runs there (`IntegerLayers.residual_add`), else added after it; the same float32 adds either way.
  sum_codes: with `addend`, where the sum is fused into a oneDNN conv, the activation quantization
  of the layer that reads the sum: the layer then returns (sum, that layer's codes), both from the
  kernel's one pass. stream: with `addend`, for a conv on oneDNN whose sum is on the 8-bit residual
  stream (`layer_ops.residual_stream`): a dict with 'step' and 'signed' (the stream's grid),
  'shortcut' ((codes, step) where the addend is itself on the stream, else None) and optionally
  'lowering' (the `lowering_operand` of the layer that reads the sum); the kernel then writes the
  stream's uint8/int8 codes and the reader's codes (its lowered channels extracted): the layer
  returns the pair (stream codes, reader codes).

  Args:
    call: the intercepted layer call; `call.kernel` holds the int8 codes, `call.bias` the float bias.
    x: the layer's float input.
    entry: the layer's integer entry (`prepare_layer`).
    lowered: (C,) bool mask of the channels at 4 bits, or None.
    signed: whether the activation codes are signed.
    conv_accumulator: the int8 conv's accumulator dtype (jnp.int32, or jnp.float32).
    conv_impl: one of CONV_IMPLS, or None for `default_conv_impl`.
    dense_impl: one of DENSE_IMPLS.
    codes: this layer's activation codes (uint8/int8, shaped as `as_matrix_input(x)`), or None to
      quantize `x`.
    next_codes: the next layer's activation quantization (`NextCodes`), or None.
    addend: float array of the output's shape added before `addend_activation`, or None.
    addend_activation: 'none' or 'relu', applied after the addend.
    sum_codes: the activation quantization of the layer that reads the residual sum (`NextCodes`),
      or None.
    stream: the residual stream's grid and shortcut (above), or None.

  Returns:
    The layer's float output in the module's output shape, bias and bias correction included; with
    `next_codes`, where the layer runs on oneDNN (and the next grid has no zero point), the next
    layer's codes instead (uint8/int8, the same shape); with `addend`, the residual sum; with
    `sum_codes` too, where the sum is fused (and that grid has no zero point), (sum, codes); with
    `stream`, (stream codes, reader codes).

  Raises:
    ValueError: an unknown `dense_impl` or `conv_impl`.
  """
  info, module, kernel = call.info, call.module, call.kernel
  x = as_matrix_input(info, x)
  # A zero point (asymmetric grid) runs on the XLA implementations: acc - z Σ w over the taps
  # inside the image (the conv pads with code 0, the image's real zero is code z).
  has_zero = "zero_point" in entry
  if has_zero and (dense_impl != "xla" or conv_impl == "onednn"):
    dense_impl, conv_impl = "xla", (None if conv_impl == "onednn" else conv_impl)
  if codes is not None and info.kind == "dense" and dense_impl == "pallas":
    dense_impl = "xla"  # the fused kernel quantizes x itself
  if info.kind == "dense" and dense_impl == "pallas" and _affine(info, entry, lowered) is not None:
    dense_impl = "xla"  # the fused kernel's epilogue has no ratio affine
  if info.kind == "dense" and dense_impl == "pallas":
    from flexiq_jax.quantize import pallas_dense  # imports Pallas only where it runs
    y = pallas_dense.fused_dense(x, entry, kernel, None, lowered, signed=signed,
                                 interpret=jax.default_backend() != "gpu")
    return _add(finish(info, y, call.bias), addend, addend_activation)  # the bias added as integer_forward adds it: the same roundings
  if dense_impl not in DENSE_IMPLS:
    raise ValueError(f"unknown dense implementation {dense_impl!r}; use one of {DENSE_IMPLS}")
  codes_dtype = jnp.int8 if signed else jnp.uint8
  q = activation_codes(x, entry, lowered, signed=signed) if codes is None else codes.astype(jnp.float32)
  q8 = q.astype(codes_dtype) if codes is None else codes  # what the oneDNN kernels take
  wi = kernel
  if lowered is not None:
    wi = jnp.where(_row_mask(info, lowered), entry["w_low"], kernel)
  epilogue = dict(out_dtype=jnp.float32)
  if next_codes is not None and (info.kind == "conv" or len(info.kernel_shape) == 2):
    epilogue = _next_codes_epilogue(next_codes) or epilogue
  if info.kind == "dense" and dense_impl == "onednn" and onednn.available():
    scale, fused_bias = _fused_epilogue(info, entry, lowered, call.bias, wi.shape[-1])
    y = onednn.matmul(q8, wi, scale=scale, bias=fused_bias, **epilogue)
    return _add(finish(info, y, None), addend, addend_activation)
  if info.kind == "conv" and (impl := conv_impl_for(info, signed, conv_impl)) == "onednn":
    padding = conv_padding(module, x.shape, info.kernel_shape)
    if _onednn_conv_ok(module, padding):
      scale, fused_bias = _fused_epilogue(info, entry, lowered, call.bias, wi.shape[-1])
      if stream is not None and addend is not None and epilogue["out_dtype"] == jnp.float32:
        codes_dtype = jnp.int8 if stream["signed"] else jnp.uint8
        # The shortcut's codes added inside the kernel, or a float shortcut (not on the stream) added
        # after it; the stream's codes and the reader's (its lowered channels extracted) either way.
        shortcut, step = stream["shortcut"] or (addend, None)
        return onednn.conv(q8, wi, strides=spatial_pair(module.strides), padding=padding,
                           dilation=spatial_pair(module.kernel_dilation), groups=info.groups, scale=scale,
                           bias=fused_bias, post_op=addend_activation, out_dtype=codes_dtype,
                           dst_scale=stream["step"], lowering=stream.get("lowering"),
                           shortcut_codes=shortcut if step is None else shortcut.astype(codes_dtype),
                           shortcut_scale=step)
      if addend is not None and epilogue["out_dtype"] == jnp.float32:
        epilogue = dict(epilogue, addend=addend, post_op=addend_activation)
        addend = None  # fused
        if sum_codes is not None and (kw := _next_codes_epilogue(sum_codes)) is not None:
          epilogue["sum_codes"] = {k: kw[k] for k in ("out_dtype", "dst_scale", "lowering") if k in kw}
      y = onednn.conv(q8, wi, strides=spatial_pair(module.strides), padding=padding,
                      dilation=spatial_pair(module.kernel_dilation), groups=info.groups, scale=scale,
                      bias=fused_bias, **epilogue)
      if isinstance(y, tuple):
        return finish(info, y[0], None), finish(info, y[1], None)
      return _add(finish(info, y, None), addend, addend_activation)
    conv_impl = "int8"
  dilated = info.kind == "conv" and spatial_pair(module.input_dilation) != (1, 1)
  if info.kind == "dense":
    # XLA's dot takes uint8 x int8 directly: unsigned codes need no shift.
    xi = q.astype(codes_dtype)
    acc = lax.dot_general(xi, wi, (((xi.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    if has_zero:
      acc = acc - _zero_code(entry) * jnp.sum(wi, axis=0, dtype=jnp.int32)
  elif (impl := conv_impl_for(info, signed, conv_impl)) == "float32" and not (has_zero and dilated):
    # Every partial sum is an integer below 2^24: exact; padding with 0 is the real zero, no shift
    # (on an asymmetric grid code 0 is not: z times the taps inside the image is taken off).
    padding = conv_padding(module, x.shape, info.kernel_shape)
    acc = conv(module, q, wi.astype(jnp.float32), padding)
    if has_zero:
      acc = acc - (_zero_code(entry) * unsigned_shift_correction(module, x.shape, padding, wi, acc.shape[1:3])
                   ).astype(acc.dtype)
  else:
    shift = 0 if signed else 128
    # Σ (q - z) w = Σ (q - shift) w + (shift - z) Σ w; z = 0 on a symmetric grid.
    offset = shift - _zero_code(entry) if has_zero else shift
    xi = (q - shift).astype(jnp.int8)
    padding = conv_padding(module, x.shape, info.kernel_shape)
    w_conv = wi  # the kernel the conv runs; the shift corrections below sum the layer's own `wi`
    if impl == "int8_widened":
      # Extra input channels with zero weights add nothing to any sum, but move XLA:CPU onto its
      # fast int8 conv kernel (`default_conv_impl`).
      extra = CPU_INT8_MIN_CHANNELS - xi.shape[-1]
      xi = jnp.pad(xi, [(0, 0)] * (xi.ndim - 1) + [(0, extra)])
      w_conv = jnp.pad(wi, [(0, 0), (0, 0), (0, extra), (0, 0)])
    if shift and (impl == "int8_pad" or dilated):
      # Border padding (and a transposed conv's inserted zeros) are real zeros: code z, shifted.
      d = spatial_pair(module.input_dilation)
      pad_value = jnp.asarray(-offset).astype(jnp.int8)
      xi = lax.pad(xi, pad_value, [(0, 0, 0), (*padding[0], d[0] - 1), (*padding[1], d[1] - 1), (0, 0, 0)])
      acc = conv(module, xi, w_conv, [(0, 0), (0, 0)], preferred=conv_accumulator, input_dilation=1)
      acc = acc + (offset * jnp.sum(wi, axis=(0, 1, 2), dtype=jnp.int32)).astype(acc.dtype)
    else:
      acc = conv(module, xi, w_conv, padding, preferred=conv_accumulator)
      if shift:
        acc = acc + (offset * unsigned_shift_correction(module, x.shape, padding, wi, acc.shape[1:3])).astype(acc.dtype)
  y = acc.astype(jnp.float32) * entry["scale"]
  if (correction := _bias_correction(info, entry, lowered)) is not None:  # the reference's order and roundings
    y = y + correction
  if lowered is not None:
    y = layer_ops.with_ratio_affine(y, info, entry, lowered)
  return _add(finish(info, y, call.bias), addend, addend_activation)


def _add(y, addend, activation: str):
  """`activation(y + addend)` ('none' or 'relu'); y itself without an addend."""
  if addend is None:
    return y
  y = y + addend
  return jnp.maximum(y, 0.0) if activation == "relu" else y


@dataclasses.dataclass(frozen=True)
class IntegerLayers:
  """The provider of the serving form: layer p lowers the channels whose rank is below counts[p]
  (layers without a count lower none); matmuls run 8-bit as in `layer_ops.quantized_matmul`.

  requant_edges {producer: (consumer, activation)} (`interception.layer_edges`): a producer on
  oneDNN writes its consumer's activation codes (`NextCodes`) instead of its float output; the
  consumer takes them instead of quantizing its input, and the producer hands the model a
  placeholder of NaNs, which only the activation between the two reads (the edge's condition), so
  XLA drops both. The codes are those the consumer would compute from the float output.

  fuse_residual: a `ResidualAdd` one of whose terms is the float output of a conv on oneDNN runs
  that conv again with the other term as its addend (`integer_forward`): the kernel writes the
  residual sum, XLA drops the first run (nothing reads it), and the sum is one buffer that every
  later reader shares (XLA:CPU would otherwise recompute a chain of residual sums inside each
  reader's fusion). residual_edges {k: consumer} (`interception.residual_edges`): the k-th sum's
  kernel also writes the activation codes of the quantized layer that reads the sum, which takes
  them instead of quantizing the sum (the same codes).
  """

  integer: dict  # svars['integer']
  matmul_quant: dict  # svars['quant']: the matmuls' operand scales
  counts: dict  # {lowerable path: traced count}
  signed: dict  # {path: bool}
  matmul_signed: dict  # {matmul path: (a signed, b signed)}
  conv_accumulator: str = "int32"
  conv_impls: dict = dataclasses.field(default_factory=dict)  # {path: CONV_IMPLS entry}; others: default
  dense_impl: str = "xla"  # DENSE_IMPLS entry, for every dense layer
  requant_edges: dict = dataclasses.field(default_factory=dict)  # {producer: (consumer, activation)}
  pending: dict = dataclasses.field(default_factory=dict)  # {consumer: codes its producer wrote}
  fuse_residual: bool = False
  producers: dict = dataclasses.field(default_factory=dict)  # {id(output): (output, rerun(addend, act, codes))}
  residual_edges: dict = dataclasses.field(default_factory=dict)  # {residual index: consumer path}
  residual_calls: list = dataclasses.field(default_factory=list)  # one entry per ResidualAdd seen
  stream_edges: dict = dataclasses.field(default_factory=dict)  # {residual index: reader}, 8-bit stream
  streams: dict = dataclasses.field(default_factory=dict)  # {id(value): (value, codes, step)}
  stream_readers: tuple = ()  # stream readers that take the codes a kernel writes for them

  def _lowered(self, path: str, entry: dict):
    return entry["rank"] < self.counts[path] if path in self.counts else None

  def layer(self, call: LayerCall, x):
    entry = get_path(self.integer, call.path)
    lowered = self._lowered(call.path, entry)
    acc = jnp.int32 if self.conv_accumulator == "int32" else jnp.float32
    next_codes = None
    if call.path in self.requant_edges:
      next_codes = self._next_codes(*self.requant_edges[call.path])
    run = functools.partial(integer_forward, call, x, entry, lowered, signed=self.signed[call.path],
                            conv_accumulator=acc, conv_impl=self.conv_impls.get(call.path),
                            dense_impl=self.dense_impl, codes=self.pending.pop(call.path, None))
    y = run(next_codes=next_codes)
    if next_codes is not None and jnp.issubdtype(y.dtype, jnp.integer):
      self.pending[self.requant_edges[call.path][0]] = y
      return jnp.full(y.shape, jnp.nan, jnp.float32)
    if ((self.fuse_residual or self.stream_edges) and call.info.kind == "conv"
        and conv_impl_for(call.info, self.signed[call.path], self.conv_impls.get(call.path)) == "onednn"):
      self.producers[id(y)] = (y, lambda addend, activation, codes=None, stream=None: run(
          addend=addend, addend_activation=activation, sum_codes=codes, stream=stream))
    return y

  def _next_codes(self, consumer: str, activation: str) -> NextCodes:
    entry = get_path(self.integer, consumer)
    return NextCodes(entry, self._lowered(consumer, entry), self.signed[consumer], activation)

  def residual_add(self, y, shortcut, activation: str):
    """A `ResidualAdd`'s sum written by the oneDNN conv that produced one of its terms (`fuse_residual`),
    with the codes of the layer that reads the sum where `residual_edges` names one, or None (the
    plain sum) where neither term is such a conv's float output."""
    k = len(self.residual_calls)
    self.residual_calls.append(k)
    if (reader := self.stream_edges.get(k)) is not None:
      return self._stream_add(y, shortcut, activation, reader)
    consumer = self.residual_edges.get(k)
    for term, other in ((y, shortcut), (shortcut, y)):
      found = self.producers.get(id(term))
      if found is not None and found[0] is term and jnp.shape(other) == jnp.shape(term):
        out = found[1](other, activation, None if consumer is None else self._next_codes(consumer, "none"))
        if isinstance(out, tuple):
          out, self.pending[consumer] = out
        return out
    return None

  def _stream_add(self, y, shortcut, activation: str, reader: str):
    """A residual sum on the 8-bit stream (`layer_ops.residual_stream`) on `reader`'s grid: written
    as codes by the oneDNN conv that produced one term where there is one (with the other term's
    codes added inside the kernel where that term is on the stream too), else computed in XLA. The
    stream's value (codes times step) is what the model reads; the reader quantizes it back to the
    same codes exactly, with its 4-bit extraction."""
    entry = get_path(self.integer, reader)
    step, signed = jnp.reshape(entry["act_scale"], ()), self.signed[reader]
    other, term, on_stream = layer_ops.stream_terms(self.streams, y, shortcut)
    codes = None
    for conv_out, addend in ((other, term), (term, other)):
      found = self.producers.get(id(conv_out))
      if found is not None and found[0] is conv_out and jnp.shape(addend) == jnp.shape(conv_out):
        grid = dict(step=step, signed=signed, shortcut=on_stream if addend is term else None)
        lowered = self._lowered(reader, entry)
        if lowered is not None:
          grid["lowering"] = lowering_operand(entry["step"], lowered, signed=signed)
        codes, reader_codes = found[1](addend, activation, stream=grid)
        if reader in self.stream_readers:
          self.pending[reader] = reader_codes
        break
    if codes is None:
      codes = layer_ops.residual_stream(other, term, activation, step, signed=signed, ste=False,
                                        shortcut_stream=on_stream)[1]
    value = codes.astype(jnp.float32) * step
    self.streams[id(value)] = (value, codes, step)
    return value

  def matmul(self, call: MatmulCall, a, b):
    return layer_ops.quantized_matmul(call, a, b, get_path(self.matmul_quant, call.path),
                                      signed=self.matmul_signed[call.path], mode="int", unsigned_direct=True)
