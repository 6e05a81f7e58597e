"""The one interception point between linen models and quantization.

Models are plain Flax modules that know nothing of quantization. This module
  * traces a model once (`trace`, under `jax.eval_shape`: no FLOPs) to find every `Dense`,
    `DenseGeneral` and `Conv` call (`LayerInfo`: module path, shapes, MACs), every
    `models.layers.AttentionMatmul` call (`MatmulInfo`: an activation x activation einsum such
    as attention's q·kᵀ and attn·v, kept apart from the kernel layers) and every BatchNorm that
    directly consumes a conv's output (foldable), with its epsilon; and
  * runs a model with chosen layers computed by a *provider* (`run_with_provider`): an object
    whose `layer(call, x)` returns the layer's output and whose `matmul(call, a, b)` returns the
    matmul's. Calibration, the FlexiQ apply, the layer-wise apply and the baselines are each a
    provider; none touches `intercept_methods`.

It also holds the geometry of an intercepted layer that every provider shares (`kernel_matrix`,
`as_matrix_input`, `float_forward`, the conv call), so a provider is only its own arithmetic.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flexiq_jax.models.layers import AttentionMatmul
from flexiq_jax.models.layers import ResidualAdd
from flexiq_jax.models.layers import depthwise_conv_general_dilated

QUANTIZABLE = (nn.Dense, nn.DenseGeneral, nn.Conv)


def path_str(module: nn.Module) -> str:
  """The module's path as a '/'-joined string ('block1/conv2').

  Args:
    module: a bound linen module.

  Returns:
    '/'.join(module.path), the key used for the module throughout (plans, parameters, statistics).
  """
  return "/".join(module.path)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One quantizable call. Feature (input) channels C, output channels O.

  For a grouped conv each output channel reads C/groups input channels; for a depthwise conv
  (groups == C) the feature channel a filter reads is also its output channel.
  """

  path: str
  kind: str  # 'dense' | 'conv'
  order: int  # call order in the forward pass
  in_channels: int
  out_channels: int
  groups: int
  kernel_shape: tuple[int, ...]
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  contracted_axes: int  # trailing input axes contracted (DenseGeneral may contract several)

  @property
  def positions(self) -> int:
    """Output positions per example (tokens for dense layers, pixels for convs).

    The shapes are those of the traced batch of one image, so every leading axis counts: a Swin
    window attention's Dense layers see (windows, tokens, C), and each image has all the windows.
    """
    feature_dims = 1 if self.kind == "conv" else len(self.output_shape) - (len(self.input_shape) - self.contracted_axes)
    return int(np.prod(self.output_shape[:len(self.output_shape) - feature_dims]))

  @property
  def macs(self) -> int:
    """Multiply-accumulates per example."""
    per_position = self.in_channels * self.out_channels // self.groups
    if self.kind == "conv":
      per_position *= int(np.prod(self.kernel_shape[:-2]))
    return self.positions * per_position

  @property
  def macs_per_channel(self) -> float:
    return self.macs / self.in_channels


def einsum_summed_size(equation: str, a_shape, b_shape) -> int:
  """Products summed into each output element of `jnp.einsum(equation, a, b)`: the product of the
  sizes of the indices absent from the output (q·kᵀ: head_dim; attn·v: the key tokens).

  Args:
    equation: an explicit two-operand einsum equation ('bqhd,bkhd->bhqk').
    a_shape: shape of the first operand.
    b_shape: shape of the second operand.

  Returns:
    The product of the sizes of the contracted indices, as an int (1 if none).

  Raises:
    NotImplementedError: the equation uses an ellipsis or its index counts do not match the shapes.
  """
  inputs, output = equation.replace(" ", "").split("->")
  a_idx, b_idx = inputs.split(",")
  if "." in equation or len(a_idx) != len(a_shape) or len(b_idx) != len(b_shape):
    raise NotImplementedError(f"einsum {equation!r} on shapes {a_shape}, {b_shape}: only explicit "
                              "two-operand equations without ellipses are supported")
  sizes = dict(zip(a_idx, a_shape))
  sizes.update(zip(b_idx, b_shape))
  return int(np.prod([sizes[i] for i in sizes if i not in output]))


@dataclasses.dataclass(frozen=True)
class MatmulInfo:
  """One `AttentionMatmul` call: `jnp.einsum(equation, a, b)` on two activations (no kernel).

  Shapes are those of the traced batch of one image (a Swin window attention's leading axis is
  the image's windows), so `macs` is per example: output elements x summed size. For ViT's
  q·kᵀ (`bqhd,bkhd->bhqk`) that is heads·N·N·head_dim, and the same for attn·v.
  """

  path: str
  equation: str
  order: int  # call order among the matmuls
  a_shape: tuple[int, ...]
  b_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  summed_size: int  # products accumulated into each output element (einsum_summed_size)

  @property
  def macs(self) -> int:
    """Multiply-accumulates per example."""
    return int(np.prod(self.output_shape)) * self.summed_size


@dataclasses.dataclass(frozen=True)
class Trace:
  """What one traced forward pass found."""

  layers: dict[str, LayerInfo]  # quantizable layers, in call order
  foldable_bn: dict[str, str]  # BatchNorm path -> the conv path whose output it normalises
  bn_epsilon: dict[str, float]  # every BatchNorm's epsilon (models differ: 1e-5, 1e-3, ...)
  matmuls: dict[str, MatmulInfo] = dataclasses.field(default_factory=dict)  # AttentionMatmul calls, in call order


def _dense_axes(module) -> int:
  if isinstance(module, nn.Dense):
    return 1
  axis = module.axis
  if getattr(module, "batch_dims", ()):
    raise NotImplementedError(f"{path_str(module)}: DenseGeneral with batch_dims is not supported")
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return len(axes)


def sample_input(image_shape, batch: int = 1) -> jax.ShapeDtypeStruct:
  """An abstract float32 batch of images, for tracing without FLOPs.

  Args:
    image_shape: shape of one image (H, W, C).
    batch: leading batch size.

  Returns:
    `jax.ShapeDtypeStruct` of shape (batch, *image_shape), float32.
  """
  return jax.ShapeDtypeStruct((batch,) + tuple(image_shape), jnp.float32)


def trace(model: nn.Module, variables, image_shape) -> Trace:
  """Traces `model.apply(variables, images, train=False)` on an abstract batch of one image.

  A layer (or matmul) called more than once is an error: per-call statistics would differ.

  Args:
    model: the linen model.
    variables: its variables ({'params': ..., 'batch_stats': ...}); only shapes are used.
    image_shape: shape of one input image (H, W, C).

  Returns:
    A `Trace`: the quantizable layers and the `AttentionMatmul` calls in call order (shapes for a batch
    of one), the BatchNorms that directly consume a conv's output (foldable) and every BatchNorm's epsilon.

  Raises:
    NotImplementedError: a quantizable layer or matmul is called twice, a conv is not 2-D on NHWC
      input, or a DenseGeneral has batch_dims.
  """
  layers: dict[str, LayerInfo] = {}
  matmuls: dict[str, MatmulInfo] = {}
  conv_outputs: dict[int, str] = {}
  foldable: dict[str, str] = {}
  eps: dict[str, float] = {}
  keep_alive = []  # ids are only unique while the objects live

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    path = path_str(module)
    if isinstance(module, QUANTIZABLE):
      if path in layers:
        raise NotImplementedError(f"layer {path} is called twice; shared layers cannot be quantized per call")
      x = args[0]
      kernel = module.get_variable("params", "kernel")
      if isinstance(module, nn.Conv):
        if x.ndim != 4:
          raise NotImplementedError(f"{path}: only 2-D convolutions on NHWC inputs are supported")
        info = LayerInfo(path, "conv", len(layers), x.shape[-1], kernel.shape[-1], module.feature_group_count,
                         tuple(kernel.shape), tuple(x.shape), tuple(out.shape), 1)
        conv_outputs[id(out)] = path
        keep_alive.append(out)
      else:
        n = _dense_axes(module)
        c = int(np.prod(x.shape[x.ndim - n:]))
        o = int(np.prod(kernel.shape[n:]))
        info = LayerInfo(path, "dense", len(layers), c, o, 1, tuple(kernel.shape), tuple(x.shape),
                         tuple(out.shape), n)
      layers[path] = info
    elif isinstance(module, AttentionMatmul):
      if path in matmuls:
        raise NotImplementedError(f"matmul {path} is called twice; shared modules cannot be quantized per call")
      a, b = args[:2]
      matmuls[path] = MatmulInfo(path, module.equation, len(matmuls), tuple(a.shape), tuple(b.shape),
                                 tuple(out.shape), einsum_summed_size(module.equation, a.shape, b.shape))
    elif isinstance(module, nn.BatchNorm):
      eps[path] = module.epsilon
      if id(args[0]) in conv_outputs:
        foldable[path] = conv_outputs[id(args[0])]
    return out

  def run(v, x):
    with nn.intercept_methods(interceptor):
      return model.apply(v, x, train=False)

  jax.eval_shape(run, variables, sample_input(image_shape))
  return Trace(layers, foldable, eps, matmuls)


# ----------------------------------------------------------------------------------------------
# Geometry of an intercepted layer, shared by every provider.


def as_matrix_input(info: LayerInfo, x):
  """Dense layers: flatten the contracted trailing axes into one feature axis C.

  Args:
    info: the layer.
    x: its input, (..., *contracted dims) for dense layers, NHWC for convs.

  Returns:
    (..., C) for a DenseGeneral contracting several axes; `x` unchanged otherwise.
  """
  if info.kind == "dense" and info.contracted_axes > 1:
    return x.reshape(x.shape[:x.ndim - info.contracted_axes] + (info.in_channels,))
  return x


def flat_features(info: LayerInfo, x):
  """The layer input as (N, C): one row per position, one column per feature channel.

  Args:
    info: the layer.
    x: its input (any leading axes; NHWC for convs).

  Returns:
    The input reshaped to (N, C), N the number of positions in the batch.
  """
  x = as_matrix_input(info, x)
  return x.reshape(-1, x.shape[-1])


def kernel_matrix(info: LayerInfo, kernel):
  """Dense kernel as (C, O); conv kernels stay HWIO.

  Args:
    info: the layer.
    kernel: its kernel in the module's shape.

  Returns:
    (C, O) for dense layers (DenseGeneral output dims flattened into O); the HWIO kernel for convs.
  """
  if info.kind == "dense":
    return kernel.reshape(info.in_channels, -1)
  return kernel


def spatial_pair(v) -> tuple[int, int]:
  """A conv's stride or dilation setting (None, an int or a pair) as a (height, width) pair.

  Args:
    v: None (meaning 1), an int, or a sequence of two ints.

  Returns:
    A (height, width) tuple of ints.
  """
  v = 1 if v is None else v
  return (v, v) if isinstance(v, int) else tuple(v)


def conv_padding(module: nn.Conv, x_shape, kernel_shape):
  """The module's padding as explicit (lo, hi) pairs (symmetric as PyTorch where it says so).

  Args:
    module: the `nn.Conv`.
    x_shape: NHWC input shape.
    kernel_shape: HWIO kernel shape.

  Returns:
    Two (lo, hi) pairs, for height and width; string paddings ('SAME', 'VALID', ...) are resolved for
    the input size, strides and kernel dilation.

  Raises:
    NotImplementedError: the padding is 'CIRCULAR'.
  """
  padding = module.padding
  if isinstance(padding, str):
    if padding.upper() == "CIRCULAR":
      raise NotImplementedError(f"{'/'.join(module.path)}: circular padding is not supported")
    eff = [(k - 1) * d + 1 for k, d in zip(kernel_shape[:2], spatial_pair(module.kernel_dilation))]
    return lax.padtype_to_pads(x_shape[1:3], eff, spatial_pair(module.strides), padding.upper())
  if isinstance(padding, int):
    return [(padding, padding)] * 2
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def conv(module: nn.Conv, x, kernel, padding, preferred=None, input_dilation=None):
  """The module's convolution (strides, dilations, groups) on explicit operands; `input_dilation`
  overrides the module's (e.g. 1 for an input the caller has already dilated).

  Args:
    module: the `nn.Conv` whose strides, dilations and feature groups are used.
    x: NHWC input.
    kernel: HWIO kernel.
    padding: explicit (lo, hi) pairs, as from `conv_padding`.
    preferred: `preferred_element_type` of the convolution (e.g. jnp.int32 for integer operands), or
      None for the default.
    input_dilation: lhs dilation to use instead of the module's, or None.

  Returns:
    The NHWC convolution output, without bias.
  """
  lhs_dilation = module.input_dilation if input_dilation is None else input_dilation
  # Float operands of a depthwise conv: the k*k taps (XLA:CPU's grouped conv is several times slower,
  # forward and backward); any other conv, and integer accumulation, is XLA's conv.
  if preferred is None:
    conv_fn, extra = depthwise_conv_general_dilated, {}
  else:
    conv_fn, extra = lax.conv_general_dilated, {"preferred_element_type": preferred}
  return conv_fn(
      x, kernel, window_strides=spatial_pair(module.strides), padding=padding,
      lhs_dilation=spatial_pair(lhs_dilation), rhs_dilation=spatial_pair(module.kernel_dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=module.feature_group_count, **extra)


def finish(info: LayerInfo, y, bias):
  """Adds the bias and restores a DenseGeneral's output feature shape.

  Args:
    info: the layer.
    y: the linear map's output with one flat output feature axis O last.
    bias: the (possibly BN-folded) bias, or None.

  Returns:
    `y` + bias, with the trailing axis reshaped to the kernel's output dims for dense layers.
  """
  if bias is not None:
    y = y + bias.reshape(-1)
  if info.kind == "dense":
    y = y.reshape(y.shape[:-1] + tuple(info.kernel_shape[info.contracted_axes:]))
  return y


def linear(info: LayerInfo, module, x, kernel_mat, bias):
  """The layer's linear map on an (already matrix-shaped) input and kernel, in float.

  Args:
    info: the layer.
    module: its module (conv strides, padding and groups).
    x: the input, as from `as_matrix_input`.
    kernel_mat: the kernel, as from `kernel_matrix` ((C, O) or HWIO).
    bias: the bias, or None.

  Returns:
    The layer's output in the module's output shape, bias included.
  """
  if info.kind == "dense":
    y = x @ kernel_mat
  else:
    y = conv(module, x, kernel_mat, conv_padding(module, x.shape, kernel_mat.shape))
  return finish(info, y, bias)


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One intercepted call, as a provider sees it: the layer's description, its module (for conv
  strides/padding/groups) and its current (BN-folded) kernel and bias."""

  info: LayerInfo
  module: nn.Module
  kernel: jax.Array
  bias: jax.Array | None

  @property
  def path(self) -> str:
    return self.info.path

  def float_forward(self, x, kernel=None):
    """The layer in float (optionally with another kernel of the same shape), folded bias included."""
    kernel = self.kernel if kernel is None else kernel
    return linear(self.info, self.module, as_matrix_input(self.info, x), kernel_matrix(self.info, kernel), self.bias)


@dataclasses.dataclass(frozen=True)
class MatmulCall:
  """One intercepted `AttentionMatmul` call, as a provider sees it: its description and module."""

  info: MatmulInfo
  module: nn.Module

  @property
  def path(self) -> str:
    return self.info.path

  def float_forward(self, a, b):
    """The matmul in float: exactly what the model computes without interception."""
    return jnp.einsum(self.info.equation, a, b)


class LayerProvider(Protocol):
  """Computes intercepted layers: `layer(call, x)` returns what the layer outputs and
  `matmul(call, a, b)` what an intercepted activation x activation matmul outputs."""

  def layer(self, call: LayerCall, x: jax.Array) -> jax.Array:
    ...

  def matmul(self, call: MatmulCall, a: jax.Array, b: jax.Array) -> jax.Array:
    ...


class FloatLayers:
  """The provider that leaves every layer (BN-folded) and every matmul in float."""

  def layer(self, call: LayerCall, x):
    return call.float_forward(x)

  def matmul(self, call: MatmulCall, a, b):
    return call.float_forward(a, b)


class _Captured(Exception):
  """Stops an eager forward pass once the captured layer's input is known."""


class _CaptureAndStop:
  """The provider that runs `inner` until the layer at `path`, keeps (LayerCall, input) of that
  layer in `captured` and stops the pass."""

  def __init__(self, inner: LayerProvider, path: str):
    self.inner, self.path, self.captured = inner, path, None

  def layer(self, call: LayerCall, x):
    if call.path == self.path:
      self.captured = (call, x)
      raise _Captured()
    return self.inner.layer(call, x)

  def matmul(self, call: MatmulCall, a, b):
    return self.inner.matmul(call, a, b)


def capture_input(model: nn.Module, plan, variables, x, provider: LayerProvider, path: str, **kwargs):
  """(LayerCall, input) of layer `path` when the model runs on `x` with `provider`, the layers
  after it not computed (eagerly, outside jit: the pass stops there).

  Args:
    model: the linen model.
    plan: the plan (as `run_with_provider`).
    variables: the model's (BN-folded) variables.
    x: the input batch.
    provider: the provider of the layers before it.
    path: the layer, one of the routed paths.
    **kwargs: `run_with_provider`'s paths / matmul_paths.

  Returns:
    The layer's LayerCall and its input.

  Raises:
    ValueError: the model ran without calling the layer.
  """
  capture = _CaptureAndStop(provider, path)
  try:
    run_with_provider(model, plan, variables, x, capture, **kwargs)
  except _Captured:
    return capture.captured
  raise ValueError(f"the model never called layer {path!r} through the provider")


def run_with_provider(model: nn.Module, plan, variables, x, provider: LayerProvider, *,
                      paths: Sequence[str] | None = None, matmul_paths: Sequence[str] | None = None):
  """Runs the model (eval mode) with each layer in `paths` (default: plan.quantized) computed by
  `provider.layer`, each `AttentionMatmul` in `matmul_paths` (default: plan.quantized_matmuls)
  by `provider.matmul`, each `ResidualAdd` by `provider.residual_add(y, shortcut, activation)` where the
  provider has that method and it returns an array (None: the plain sum), and the BatchNorms folded
  by the plan bypassed. Variables must be folded
  (see quantize.fold_batchnorm) if the plan folds any. `plan` needs `layers`, `quantized`,
  `folded_bn`, and `matmuls` / `quantized_matmuls` where it has matmuls.

  A folded conv that is not in `paths` runs in float with its folded kernel and bias.

  Args:
    model: the linen model.
    plan: the plan (`plan.Plan` or anything with the fields above).
    variables: the model's (BN-folded) variables.
    x: the input batch.
    provider: a `LayerProvider`.
    paths: layer paths to route to `provider.layer`, or None for `plan.quantized`.
    matmul_paths: matmul paths to route to `provider.matmul`, or None for `plan.quantized_matmuls`.

  Returns:
    The model's output.
  """
  targets = set(plan.quantized if paths is None else paths)
  matmul_targets = set(getattr(plan, "quantized_matmuls", ()) if matmul_paths is None else matmul_paths)
  folded_bn = set(plan.folded_bn)
  folded_convs = set(plan.folded_bn.values())
  params = variables["params"]

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    module = context.module
    path = path_str(module)
    if path in folded_bn and isinstance(module, nn.BatchNorm):
      return args[0]
    if isinstance(module, QUANTIZABLE) and (path in targets or path in folded_convs):
      p = get_path(params, path)
      call = LayerCall(plan.layers[path], module, p["kernel"], p.get("bias"))
      # A folded conv that is not a target still needs its folded bias.
      return provider.layer(call, args[0]) if path in targets else call.float_forward(args[0])
    if path in matmul_targets and isinstance(module, AttentionMatmul):
      return provider.matmul(MatmulCall(plan.matmuls[path], module), *args[:2])
    if isinstance(module, ResidualAdd) and (fuse := getattr(provider, "residual_add", None)) is not None:
      if (out := fuse(args[0], args[1], module.activation)) is not None:
        return out
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    return model.apply(variables, x, train=False)


# ----------------------------------------------------------------------------------------------
# Which layers feed which: the model's dataflow between intercepted layers.

# The elementwise activations `layer_edges` sees through, as the primitive chains their jaxprs hold
# (nested jit and custom_jvp calls inlined): ReLU max(x, 0) and ReLU6 min(max(x, 0), 6).
EDGE_ACTIVATIONS = {(("max", 0.0),): "relu", (("max", 0.0), ("min", 6.0)): "relu6"}


def _chain(eqn):
  """The (primitive, literal) chain one single-input elementwise equation computes, nested jit and
  custom_jvp calls inlined, or None if it is not a chain of max/min with a scalar literal."""
  name = eqn.primitive.name
  if name in ("max", "min"):
    a, b = eqn.invars
    literal = b if type(b).__name__ == "Literal" else a if type(a).__name__ == "Literal" else None
    if literal is None or np.ndim(literal.val) != 0:
      return None
    return ((name, float(literal.val)),)
  inner = {"pjit": "jaxpr", "jit": "jaxpr", "custom_jvp_call": "call_jaxpr"}.get(name)
  if inner is None:
    return None
  jaxpr = eqn.params[inner]
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  if len(jaxpr.invars) != 1 or len(jaxpr.outvars) != 1 or jaxpr.constvars:
    return None
  ops, current = [], jaxpr.invars[0]
  for e in jaxpr.eqns:
    variables = [v for v in e.invars if type(v).__name__ != "Literal"]
    if len(variables) != 1 or variables[0] is not current or len(e.outvars) != 1:
      return None
    sub = _chain(e)
    if sub is None:
      return None
    ops += sub
    current = e.outvars[0]
  return tuple(ops) if jaxpr.outvars[0] is current else None


def _dataflow(model: nn.Module, plan, variables, x):
  """The model's jaxpr with every layer of `plan.quantized` and every `ResidualAdd` a named jit call
  (one abstract trace, no FLOPs), and the names: ({jit name: layer path}, {jit name: the residual
  sum's index in call order}), with each variable's producing equation and its number of uses."""
  names, residuals = {}, {}

  class Marker:
    def layer(self, call: LayerCall, x):
      shape = (x.shape[0],) + tuple(call.info.output_shape[1:])
      def marker(x):
        return jnp.zeros(shape, jnp.float32) + 0 * jnp.sum(x)
      marker.__name__ = f"flexiq_layer_{len(names)}"
      names[marker.__name__] = call.path
      return jax.jit(marker)(x)

    def matmul(self, call: MatmulCall, a, b):
      return call.float_forward(a, b)

    def residual_add(self, y, shortcut, activation: str):
      del activation
      def marker(y, shortcut):
        return y + shortcut
      marker.__name__ = f"flexiq_residual_{len(residuals)}"
      residuals[marker.__name__] = len(residuals)
      return jax.jit(marker)(y, shortcut)

  jaxpr = jax.make_jaxpr(lambda v, x: run_with_provider(model, plan, v, x, Marker()))(variables, x).jaxpr
  producer, uses = {}, {}
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if type(v).__name__ != "Literal":
        uses[v] = uses.get(v, 0) + 1
    for v in eqn.outvars:
      producer[v] = eqn
  for v in jaxpr.outvars:
    if type(v).__name__ != "Literal":
      uses[v] = uses.get(v, 0) + 1
  return jaxpr, names, residuals, producer, uses


def _jit_name(eqn):
  return eqn.params.get("name") if eqn is not None and eqn.primitive.name in ("pjit", "jit") else None


def edges(model: nn.Module, plan, variables, x) -> tuple[dict[str, tuple[str, str]], dict[int, str]]:
  """Which quantized layers feed which, from one abstract trace of the model (`jax.make_jaxpr`, no
  FLOPs) with every layer of `plan.quantized` and every `ResidualAdd` a named jit call.

  Layer edges: the quantized layers whose input is another quantized layer's output, directly or
  through one ReLU/ReLU6 (`EDGE_ACTIVATIONS`), where nothing else reads that output or the
  activation's. A folded BatchNorm between the two layers is no operation here
  (`run_with_provider` bypasses it). On such an edge the consumer's input codes are a function of
  the producer's output alone, so the producer can write them.

  Residual edges: the quantized layers that read a `ResidualAdd`'s sum directly, {the sum's index
  among the model's residual sums, in call order: the first quantized layer that reads it}. The sum
  has other readers too (the next residual sum); its codes are a function of the sum alone, so the
  kernel that writes the sum can write that layer's codes as well
  (`integer.IntegerLayers.residual_add`).

  Args:
    model: the linen model.
    plan: the plan (as `run_with_provider` takes it).
    variables: the model's (BN-folded) variables, or their shapes.
    x: an input batch, or its shape and dtype (`jax.ShapeDtypeStruct`).

  Returns:
    ({consumer path: (producer path, 'none' | 'relu' | 'relu6')}, {residual index: consumer path}).
  """
  jaxpr, names, residuals, producer, uses = _dataflow(model, plan, variables, x)

  def layer_of(eqn):
    return names.get(_jit_name(eqn))

  layer, residual = {}, {}
  for eqn in jaxpr.eqns:
    consumer = layer_of(eqn)
    if consumer is None:
      continue
    v = eqn.invars[0]
    source, act = producer.get(v), "none"
    k = residuals.get(_jit_name(source))
    if k is not None and k not in residual:
      residual[k] = consumer
    if layer_of(source) is None and source is not None and uses.get(v) == 1:
      act = EDGE_ACTIVATIONS.get(_chain(source))
      v = source.invars[0]
      source = producer.get(v) if act is not None else None
    if layer_of(source) is not None and uses.get(v) == 1:
      layer[consumer] = (layer_of(source), act)
  return layer, residual


def layer_edges(model: nn.Module, plan, variables, x) -> dict[str, tuple[str, str]]:
  """The layer edges of `edges`: {consumer path: (producer path, 'none' | 'relu' | 'relu6')}."""
  return edges(model, plan, variables, x)[0]


def residual_edges(model: nn.Module, plan, variables, x) -> dict[int, str]:
  """The residual edges of `edges`: {residual index: consumer path}."""
  return edges(model, plan, variables, x)[1]


# ----------------------------------------------------------------------------------------------
# Nested dicts addressed by module path ('block1/conv2').


def get_path(tree, path: str):
  """The value of a nested dict at a module path.

  Args:
    tree: nested dicts (e.g. params).
    path: '/'-separated keys ('block1/conv2').

  Returns:
    tree[k1][k2]...

  Raises:
    KeyError: a key along the path is missing.
  """
  for key in path.split("/"):
    tree = tree[key]
  return tree


def set_path(tree: dict, path: str, value) -> dict:
  """Functional update of a nested dict at 'a/b/c' (missing levels are created).

  Args:
    tree: nested dicts; not modified.
    path: '/'-separated keys.
    value: the new leaf (or subtree).

  Returns:
    A new nested dict (the dicts along the path copied, the rest shared) with `value` at `path`.
  """
  key, _, rest = path.partition("/")
  new = dict(tree)
  new[key] = set_path(tree.get(key, {}), rest, value) if rest else value
  return new


def flatten_paths(tree, prefix="") -> dict:
  """{'a/b/c': leaf} of a nested dict.

  Args:
    tree: nested dicts; any non-dict value is a leaf.
    prefix: path prepended to every key (used by the recursion).

  Returns:
    A flat dict from '/'-joined paths to leaves.
  """
  out = {}
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else k
    if isinstance(v, dict):
      out.update(flatten_paths(v, p))
    else:
      out[p] = v
  return out
