"""oneDNN's int8 convolution and matmul on CPU, called from XLA through its FFI (custom calls).

The kernels live in a small C++ library (`csrc/onednn`, installed as the package
`flexiq_jax_onednn` by the README's install command) linked against PyPI's oneDNN build
(`onednn-cpu-gomp`). The library is optional: where it was not built (no compiler, another
platform) or the backend is not the CPU, `available()` is False and the serving form runs its XLA
implementations instead (`integer.conv_impl_for`, `integer.integer_forward`).

Both kernels take 8-bit activation codes (uint8 or int8), int8 weight codes and accumulate in
int32. The output dtype selects the epilogue: int32 the accumulators themselves (bit for bit those
of XLA's int8 conv/dot); float32 `acc * scale[o] + bias[o]` followed by the post-op (`POST_OPS`);
uint8/int8 that float32 result times the float32 inverse of `dst_scale`, rounded to nearest even and
saturated (oneDNN's own dst scale: the primitive writes the codes), and with `lowering`
(`lowering_rows`) each channel's 4-bit extraction after it, in place on the codes: the next layer's
activation codes, operation for operation as `integer.activation_codes` computes them from the
float32 output. oneDNN pads a conv with code 0, the real zero of both grids, so unsigned codes need
no shift. A conv may also add a residual sum's other term before its post-op: a float32 tensor
(`addend`, float32 output), or the codes of a shortcut on the 8-bit residual stream
(`shortcut_codes`, the stream's codes out; `layer_ops.stream_sum`). Primitives are cached per shape
inside the library.

Set FLEXIQ_ONEDNN_LIBRARY to a library path to use another build (e.g. one compiled by hand).
"""

from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

ABI = 10  # the library's interface version (flexiq_onednn_abi) this module calls
CONV_TARGET = "flexiq_onednn_conv"
MATMUL_TARGET = "flexiq_onednn_matmul"
# The same kernels with a `lowering` operand: uint8/int8 outputs with each channel's 4-bit extraction.
CONV_LOWERED_TARGET = "flexiq_onednn_conv_lowered"
MATMUL_LOWERED_TARGET = "flexiq_onednn_matmul_lowered"
# The conv with an `addend` operand: a float32 output post_op(acc * scale + bias + addend).
CONV_ADD_TARGET = "flexiq_onednn_conv_add"
# The same and the sum's requantized codes (uint8/int8 with the 4-bit extraction): two results.
CONV_ADD_CODES_TARGET = "flexiq_onednn_conv_add_codes"
# The residual sum on the 8-bit stream: the shortcut's codes and step in, the sum's codes out.
CONV_STREAM_TARGET = "flexiq_onednn_conv_stream"
POST_OPS = {"none": 0, "relu": 1, "relu6": 2, "gelu": 3}
# How the library runs a layer (the C++ file's comment): 'auto' fused where the CPU has VNNI and
# exact elsewhere ('single', or a probed depthwise kernel); 'split' two int8 runs on split weights,
# combined exactly, then the epilogue; 'direct' one primitive with the epilogue fused (exact
# accumulators only on VNNI CPUs, or for codes small enough that oneDNN's non-VNNI kernels neither
# saturate nor halve the weights); 'single' one int8 run on the low activation codes plus the sparse
# remainder of the codes above it, exact on every CPU (split where the remainder is dense).
MODES = {"auto": 0, "split": 1, "direct": 2, "single": 3}
OUT_DTYPES = (jnp.int32, jnp.float32, jnp.uint8, jnp.int8)


def library_path() -> str | None:
  """The path of the compiled kernel library, or None where it was not built.

  Returns:
    FLEXIQ_ONEDNN_LIBRARY if set, else the library shipped by the `flexiq_jax_onednn` package
    (None when that package is missing or was installed without its library).
  """
  if os.environ.get("FLEXIQ_ONEDNN_LIBRARY"):
    return os.environ["FLEXIQ_ONEDNN_LIBRARY"]
  try:
    import flexiq_jax_onednn
  except ImportError:
    return None
  return flexiq_jax_onednn.library_path()


def _abi_problem(lib: ctypes.CDLL, path: str) -> str:
  """Why `lib` cannot serve this module ('' if it can): a library built from older or newer sources
  (another interface version) would take the modes and attributes differently."""
  version = lib.flexiq_onednn_abi() if hasattr(lib, "flexiq_onednn_abi") else 1
  if version == ABI:
    return ""
  return (f"{path} was built from other sources than this flexiq_jax (interface version {version}, expected "
          f"{ABI}); rebuild it: pip install ./csrc/onednn")


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
  """(the loaded library with its FFI targets registered for the CPU, or None; why not)."""
  path = library_path()
  if path is None:
    return None, ("the flexiq_jax_onednn extension is not installed or was built without its library "
                  "(no C++ compiler or no oneDNN wheel at install time)")
  try:
    lib = ctypes.CDLL(path)
  except OSError as first:
    # The rpath reaches <prefix>/lib only for a regular install; load oneDNN from its wheel first.
    try:
      import flexiq_jax_onednn
      dnnl = flexiq_jax_onednn.dnnl_path()
      if dnnl is None:
        raise first
      ctypes.CDLL(dnnl, mode=ctypes.RTLD_GLOBAL)
      lib = ctypes.CDLL(path)
    except (ImportError, OSError) as e:
      return None, f"cannot load {path}: {e}"
  if why := _abi_problem(lib, path):
    return None, why
  jax.ffi.register_ffi_target(CONV_TARGET, jax.ffi.pycapsule(lib.FlexiqOnednnConv), platform="cpu")
  jax.ffi.register_ffi_target(MATMUL_TARGET, jax.ffi.pycapsule(lib.FlexiqOnednnMatmul), platform="cpu")
  jax.ffi.register_ffi_target(CONV_LOWERED_TARGET, jax.ffi.pycapsule(lib.FlexiqOnednnConvLowered), platform="cpu")
  jax.ffi.register_ffi_target(CONV_ADD_TARGET, jax.ffi.pycapsule(lib.FlexiqOnednnConvAdd), platform="cpu")
  jax.ffi.register_ffi_target(CONV_ADD_CODES_TARGET, jax.ffi.pycapsule(lib.FlexiqOnednnConvAddCodes), platform="cpu")
  jax.ffi.register_ffi_target(CONV_STREAM_TARGET, jax.ffi.pycapsule(lib.FlexiqOnednnConvStream), platform="cpu")
  jax.ffi.register_ffi_target(MATMUL_LOWERED_TARGET, jax.ffi.pycapsule(lib.FlexiqOnednnMatmulLowered), platform="cpu")
  return lib, ""


def unavailable_reason() -> str:
  """Why the oneDNN kernels cannot run here ('' if they can).

  Returns:
    A sentence naming what is missing, or '' when `available()`.
  """
  lib, why = _load()
  if lib is None:
    return why
  if jax.default_backend() != "cpu":
    return f"the default JAX backend is {jax.default_backend()!r}, not 'cpu'"
  return ""


def available() -> bool:
  """Whether the oneDNN kernels can run: the library loads and JAX's default backend is the CPU.

  Returns:
    True if `conv` and `matmul` can be used.
  """
  return not unavailable_reason()


def version() -> str | None:
  """The version of the oneDNN library the kernels run with, e.g. '3.2.0' (None if not loaded).

  Returns:
    'major.minor.patch', or None.
  """
  lib, _ = _load()
  if lib is None:
    return None
  v = lib.flexiq_onednn_version()
  return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def direct_here() -> bool:
  """Whether mode 'auto' runs the fused (direct) kernels on this CPU (it has VNNI).

  Returns:
    True on VNNI CPUs; False where 'auto' splits the weights for exact accumulators (or the library
    is not loaded).
  """
  lib, _ = _load()
  return bool(lib is not None and lib.flexiq_onednn_direct())


RUN_COUNTS = ("direct", "split", "single", "depthwise", "single_remainders", "single_inputs", "single_ns_split_codes",
              "single_ns_primitive", "single_ns_finish")


def run_counts() -> dict:
  """How the library has run layers since it was loaded (every custom call adds to these).

  Returns:
    {'direct', 'split', 'single', 'depthwise': layer runs by kernel ('depthwise': a probed u8
    depthwise kernel), 'single_remainders': the activation codes above the low range that single runs
    added as a sparse remainder, 'single_inputs': the activation codes single runs read, and
    'single_ns_<step>': their nanoseconds in each step (split_codes: the low codes' copy and the
    remainder list; primitive: oneDNN's run, weight reorder included; finish: one pass over the
    outputs that adds the remainder and applies the epilogue)}; {} where the library is not loaded
    (or predates these counters).
  """
  lib, _ = _load()
  if lib is None or not hasattr(lib, "flexiq_onednn_runs"):
    return {}
  lib.flexiq_onednn_runs.restype = ctypes.c_int64
  return {name: int(lib.flexiq_onednn_runs(i)) for i, name in enumerate(RUN_COUNTS)}


@functools.cache
def auto_mode() -> str:
  """The mode 'auto' resolves to: 'auto' (the library's own choice for this CPU) where that choice
  gives exact accumulators on a probe with the largest codes, else 'single'.

  On CPUs with VNNI the library's choice is one fused primitive; the probe (a conv and a matmul of
  all-extreme codes, signed and unsigned, against XLA's exact int32 result) checks that once, so a
  CPU or oneDNN build whose fused kernels saturate falls back to the exact 'single' mode.

  Returns:
    'auto' or 'single'.
  """
  if not direct_here():
    return "auto"  # the library runs its exact kernels here (single, split or a probed depthwise one)
  with jax.ensure_compile_time_eval():
    for x_code in (255, -128):
      dtype = jnp.uint8 if x_code > 0 else jnp.int8
      x = jnp.full((1, 4, 4, 64), x_code, dtype)
      w = jnp.where(jnp.arange(3 * 3 * 64 * 8).reshape(3, 3, 64, 8) % 3 == 0, -128, 127).astype(jnp.int8)
      want = jax.lax.conv_general_dilated(x.astype(jnp.int32), w.astype(jnp.int32), (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      got = conv(x, w, padding=((1, 1), (1, 1)), mode="direct")
      rows = x.reshape(-1, 64)
      if not (np.array_equal(np.asarray(got), np.asarray(want)) and np.array_equal(
          np.asarray(matmul(rows, w[1, 1], mode="direct")), np.asarray(rows.astype(jnp.int32) @ w[1, 1].astype(jnp.int32)))):
        return "single"
  return "auto"


def _mode_code(mode: str) -> np.int64:
  return np.int64(MODES[auto_mode() if mode == "auto" else mode])


def lowering_rows(step, lo, hi):
  """The `lowering` operand of `conv`/`matmul`: each output channel's 4-bit extraction of the
  requantized codes q, clip(floor(q * (1 / step) + 1/2), lo, hi) * step, as `integer.activation_codes`
  applies it (step 1 and the 8-bit bounds leave a channel unchanged).

  Args:
    step: (O,) float, the extraction step per channel (1 where not lowered).
    lo: (O,) float, the lower code bound per channel.
    hi: (O,) float, the upper code bound per channel.

  Returns:
    (4, O) float32: the rows 1 / step, lo, hi, step.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.stack([1.0 / step, jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32), step])


def _unlowered_rows(channels: int, dtype):
  """`lowering_rows` that leave every channel at 8 bits: step 1 within the type's range."""
  info = jnp.iinfo(dtype)
  return lowering_rows(jnp.ones(channels), jnp.full(channels, info.min), jnp.full(channels, info.max))


def _lowering_operand(lowering, out_channels: int, out_dtype):
  if lowering is None:
    return None
  if out_dtype not in (jnp.dtype(jnp.uint8), jnp.dtype(jnp.int8)):
    raise ValueError("lowering applies to a uint8/int8 output")
  lowering = jnp.asarray(lowering, jnp.float32)
  if lowering.shape != (4, out_channels):
    raise ValueError(f"lowering must be (4, {out_channels}) (lowering_rows), got {lowering.shape}")
  return lowering


def _epilogue_operands(out_channels: int, out_dtype, scale, bias, dst_scale):
  scale = jnp.ones((out_channels,), jnp.float32) if scale is None else jnp.broadcast_to(
      jnp.asarray(scale, jnp.float32), (out_channels,))
  bias = jnp.zeros((out_channels,), jnp.float32) if bias is None else jnp.broadcast_to(
      jnp.asarray(bias, jnp.float32), (out_channels,))
  dst_scale = jnp.asarray(1.0 if dst_scale is None else dst_scale, jnp.float32).reshape(())
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype not in [jnp.dtype(d) for d in OUT_DTYPES]:
    raise ValueError(f"out_dtype must be one of int32, float32, uint8, int8, not {out_dtype}")
  return scale, bias, dst_scale, out_dtype


def _check(x, w, post_op: str, out_dtype, mode: str):
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; use one of {tuple(MODES)}")
  if x.dtype not in (jnp.uint8, jnp.int8) or w.dtype != jnp.int8:
    raise ValueError(f"oneDNN int8 kernels take uint8/int8 codes and int8 weights, got {x.dtype} and {w.dtype}")
  if post_op not in POST_OPS:
    raise ValueError(f"unknown post_op {post_op!r}; use one of {tuple(POST_OPS)}")
  if out_dtype == jnp.int32 and post_op != "none":
    raise ValueError("an int32 output is the raw accumulators: no post-op")
  if not available():
    raise RuntimeError(f"oneDNN kernels unavailable: {unavailable_reason()}")


def pad_input_channels(x, w):
  """A dense conv's input channels padded with zeros (codes and weight rows) to a multiple of 4.

  oneDNN's int8 conv kernels take input channels in blocks of 4; an image's 1 or 3 channels at the
  stem are the one conv that does not fill them, and padded they run faster than the im2col form
  the library used to build (`benchmarks/onednn_stem.py`; figures in docs/DESIGN.md §3.3). The
  zero weights leave every accumulator as it is; inside a jit the pads fuse into the ops that make
  x and w.

  Args:
    x: (N, H, W, C) activation codes.
    w: (kh, kw, C, O) weight codes.

  Returns:
    (x, w) with C rounded up to a multiple of 4 (the same arrays where it is one already).
  """
  extra = -x.shape[-1] % 4
  if not extra:
    return x, w
  return jnp.pad(x, ((0, 0),) * 3 + ((0, extra),)), jnp.pad(w, ((0, 0),) * 2 + ((0, extra), (0, 0)))


def conv(x, w, *, strides=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1), groups: int = 1, scale=None,
         bias=None, post_op: str = "none", out_dtype=jnp.int32, dst_scale=None, lowering=None, addend=None,
         sum_codes=None, shortcut_codes=None, shortcut_scale=None, mode: str = "auto", pad_channels: bool = True):
  """oneDNN's int8 convolution, NHWC x HWIO -> NHWC, with its epilogue (module docstring).

  Args:
    x: (N, H, W, C) uint8 or int8 activation codes.
    w: (kh, kw, C / groups, O) int8 weight codes.
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)) explicit zero padding (non-negative).
    dilation: kernel dilation (dh, dw), 1 = none (as `lax.conv_general_dilated`'s rhs_dilation).
    groups: feature groups (C for a depthwise conv).
    scale: (O,) or scalar float multiplier of the accumulators (not with an int32 output).
    bias: (O,) or scalar float bias added after the scale.
    post_op: one of POST_OPS, applied after the bias.
    out_dtype: int32 (raw accumulators), float32, or uint8/int8 (requantized by `dst_scale`).
    dst_scale: the output grid's step for a uint8/int8 output (q = round(y * (1 / dst_scale))).
    lowering: (4, O) `lowering_rows` for a uint8/int8 output: each channel's 4-bit extraction of q.
    addend: (N, H', W', O) float32 added before the post-op (a residual sum's other term; a float32
      output only): post_op(acc * scale + bias + addend), one rounding per add as `y + addend`.
    sum_codes: with `addend`, also the sum's requantization: a dict with 'out_dtype' (uint8/int8),
      'dst_scale' and optionally 'lowering' (as the arguments of those names): the activation codes
      of the layer that reads the sum, written in the same pass as the sum.
    shortcut_codes: (N, H', W', O) uint8/int8 codes of a residual sum's shortcut on the 8-bit
      stream (the output's dtype, uint8/int8): the output is then the sum's codes,
      requant(post_op(((y * (1 / shortcut_scale)) + shortcut_codes) * shortcut_scale)) with
      y = acc * scale + bias, each step rounded to float32 (`layer_ops.stream_sum`), and the same
      codes with `lowering`'s extraction (the reading layer's codes; none extracted without one);
      post-op none, relu or relu6. Float32 values instead (a shortcut not on the stream): the
      plain sum, requant(post_op(y + shortcut)).
    shortcut_scale: the shortcut codes' step (a positive scalar), with uint8/int8 `shortcut_codes`.
    mode: one of MODES ('auto': exact accumulators on every CPU; `auto_mode`).
    pad_channels: a dense conv's input channels padded to a multiple of 4 (`pad_input_channels`);
      False runs the library on the channels as given (slower where they are not; for comparisons).

  Returns:
    (N, H', W', O) array of `out_dtype`; with `sum_codes`, the pair (sum, codes); with
    `shortcut_codes`, the pair (the stream's codes, the reading layer's codes).

  Raises:
    ValueError: wrong dtypes, an unknown post-op or mode, a post-op with an int32 output, bad padding,
      or an addend of another shape or with a non-float32 output.
    RuntimeError: the kernels are unavailable (`unavailable_reason`).
  """
  scale, bias, dst_scale, out_dtype = _epilogue_operands(w.shape[-1], out_dtype, scale, bias, dst_scale)
  _check(x, w, post_op, out_dtype, mode)
  lowering = _lowering_operand(lowering, w.shape[-1], out_dtype)
  if pad_channels and groups == 1:
    x, w = pad_input_channels(x, w)
  padding = [tuple(int(v) for v in p) for p in padding]
  if any(v < 0 for p in padding for v in p):
    raise ValueError(f"negative padding {padding} is not supported by the oneDNN conv")
  strides, dilation = tuple(int(s) for s in strides), tuple(int(d) for d in dilation)
  out_shape = jax.eval_shape(lambda a, b: jax.lax.conv_general_dilated(
      a, b, strides, padding, rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups, preferred_element_type=jnp.int32),
      jax.ShapeDtypeStruct(x.shape, jnp.int8), jax.ShapeDtypeStruct(w.shape, jnp.int8)).shape
  if addend is not None:
    if out_dtype != jnp.float32 or tuple(addend.shape) != tuple(out_shape):
      raise ValueError(f"the addend must be float32 of the output's shape {tuple(out_shape)} with a float32 "
                       f"output; got shape {tuple(addend.shape)} and output {jnp.dtype(out_dtype).name}")
    addend = jnp.asarray(addend, jnp.float32)
  attrs = dict(strides=np.asarray(strides, np.int64), pad_lo=np.asarray([p[0] for p in padding], np.int64),
               pad_hi=np.asarray([p[1] for p in padding], np.int64), dilation=np.asarray(dilation, np.int64),
               groups=np.int64(groups), post_op=np.int64(POST_OPS[post_op]), mode=_mode_code(mode))
  if shortcut_codes is not None:
    if jnp.dtype(out_dtype) not in (jnp.dtype(jnp.uint8), jnp.dtype(jnp.int8)):
      raise ValueError("shortcut codes need a uint8/int8 output (the stream's codes)")
    if (shortcut_codes.dtype not in (jnp.dtype(out_dtype), jnp.dtype(jnp.float32))
        or tuple(shortcut_codes.shape) != tuple(out_shape)):
      raise ValueError(f"the shortcut codes must be {jnp.dtype(out_dtype).name} (or float32 values) of the output's "
                       f"shape {tuple(out_shape)}; got {shortcut_codes.dtype} {tuple(shortcut_codes.shape)}")
    if addend is not None or sum_codes is not None or post_op == "gelu":
      raise ValueError("shortcut codes take no addend or sum_codes, and post-op none, relu or relu6")
    step = jnp.asarray(1.0 if shortcut_scale is None else shortcut_scale, jnp.float32).reshape(())
    if lowering is None:
      lowering = _lowering_operand(_unlowered_rows(out_shape[-1], out_dtype), w.shape[-1], out_dtype)
    out = jax.ShapeDtypeStruct(out_shape, out_dtype)
    call = jax.ffi.ffi_call(CONV_STREAM_TARGET, (out, out), vmap_method="sequential")
    return tuple(call(x, w, scale, bias, dst_scale, lowering, shortcut_codes, step, **attrs))
  if sum_codes is not None:
    if addend is None:
      raise ValueError("sum_codes needs an addend (the codes are those of the residual sum)")
    codes_dtype = jnp.dtype(sum_codes["out_dtype"])
    if codes_dtype not in (jnp.dtype(jnp.uint8), jnp.dtype(jnp.int8)):
      raise ValueError(f"the sum's codes must be uint8 or int8, not {codes_dtype}")
    rows = sum_codes.get("lowering")
    if rows is None:
      rows = _unlowered_rows(out_shape[-1], codes_dtype)
    rows = _lowering_operand(rows, w.shape[-1], codes_dtype)
    sum_scale = jnp.asarray(sum_codes["dst_scale"], jnp.float32).reshape(())
    call = jax.ffi.ffi_call(CONV_ADD_CODES_TARGET, (jax.ShapeDtypeStruct(out_shape, jnp.float32),
                                                    jax.ShapeDtypeStruct(out_shape, codes_dtype)),
                            vmap_method="sequential")
    return tuple(call(x, w, scale, bias, sum_scale, rows, addend, **attrs))
  # At most one of the two: a lowering needs a uint8/int8 output, an addend a float32 one.
  target = CONV_ADD_TARGET if addend is not None else CONV_LOWERED_TARGET if lowering is not None else CONV_TARGET
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, out_dtype), vmap_method="sequential")
  operands = (x, w, scale, bias, dst_scale) + tuple(v for v in (lowering, addend) if v is not None)
  return call(*operands, **attrs)


def matmul(x, w, *, scale=None, bias=None, post_op: str = "none", out_dtype=jnp.int32, dst_scale=None,
           lowering=None, mode: str = "auto"):
  """oneDNN's int8 matmul, (..., K) x (K, N) -> (..., N), with its epilogue (module docstring).

  Args:
    x: (..., K) uint8 or int8 codes (leading axes are flattened into rows).
    w: (K, N) int8 weight codes.
    scale: (N,) or scalar float multiplier of the accumulators (not with an int32 output).
    bias: (N,) or scalar float bias added after the scale.
    post_op: one of POST_OPS, applied after the bias.
    out_dtype: int32 (raw accumulators), float32, or uint8/int8 (requantized by `dst_scale`).
    dst_scale: the output grid's step for a uint8/int8 output.
    lowering: (4, N) `lowering_rows` for a uint8/int8 output: each channel's 4-bit extraction.
    mode: one of MODES ('auto': exact accumulators on every CPU; `auto_mode`).

  Returns:
    (..., N) array of `out_dtype`.

  Raises:
    ValueError: wrong dtypes or shapes, an unknown post-op or mode, or a post-op with an int32 output.
    RuntimeError: the kernels are unavailable (`unavailable_reason`).
  """
  scale, bias, dst_scale, out_dtype = _epilogue_operands(w.shape[-1], out_dtype, scale, bias, dst_scale)
  _check(x, w, post_op, out_dtype, mode)
  if w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"matmul shapes {x.shape} x {w.shape} do not contract")
  lowering = _lowering_operand(lowering, w.shape[-1], out_dtype)
  rows = x.reshape(-1, x.shape[-1])
  call = jax.ffi.ffi_call(MATMUL_TARGET if lowering is None else MATMUL_LOWERED_TARGET,
                          jax.ShapeDtypeStruct((rows.shape[0], w.shape[1]), out_dtype), vmap_method="sequential")
  operands = (rows, w, scale, bias, dst_scale) + (() if lowering is None else (lowering,))
  y = call(*operands, post_op=np.int64(POST_OPS[post_op]), mode=_mode_code(mode))
  return y.reshape(x.shape[:-1] + (w.shape[1],))
