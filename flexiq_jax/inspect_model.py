"""Finds a linen model's quantizable layers by tracing it once with method interception.

No model code is touched: `flax.linen.intercept_methods` sees every `Dense`, `DenseGeneral` and
`Conv` call (its module path, input and kernel shapes, call order) and every BatchNorm that
directly consumes a conv's output (for folding). Tracing uses `jax.eval_shape`: no FLOPs.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

QUANTIZABLE = (nn.Dense, nn.DenseGeneral, nn.Conv)


def path_str(module: nn.Module) -> str:
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
    """Output positions per example (tokens for dense layers, pixels for convs)."""
    feature_dims = 1 if self.kind == "conv" else len(self.output_shape) - (len(self.input_shape) - self.contracted_axes)
    return int(np.prod(self.output_shape[1:len(self.output_shape) - feature_dims]))

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


def _dense_axes(module) -> int:
  if isinstance(module, nn.Dense):
    return 1
  axis = module.axis
  if getattr(module, "batch_dims", ()):
    raise NotImplementedError(f"{path_str(module)}: DenseGeneral with batch_dims is not supported")
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return len(axes)


def trace_layers(model: nn.Module, variables, sample_input) -> tuple[dict[str, LayerInfo], dict[str, str]]:
  """Returns ({path: LayerInfo} in call order, {batchnorm_path: conv_path} for foldable pairs).

  A layer called more than once (weight sharing) is an error: per-call statistics would differ.
  """
  layers: dict[str, LayerInfo] = {}
  conv_outputs: dict[int, str] = {}
  bn_of_conv: dict[str, str] = {}
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
    elif isinstance(module, nn.BatchNorm) and id(args[0]) in conv_outputs:
      bn_of_conv[path] = conv_outputs[id(args[0])]
    return out

  def run(v, x):
    with nn.intercept_methods(interceptor):
      return model.apply(v, x, train=False)

  jax.eval_shape(run, variables, jnp.zeros(sample_input.shape, sample_input.dtype)
                 if not isinstance(sample_input, jax.ShapeDtypeStruct) else sample_input)
  return layers, bn_of_conv


def sample_input(image_shape, batch: int = 1) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch,) + tuple(image_shape), jnp.float32)


def get_path(tree, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def set_path(tree: dict, path: str, value) -> dict:
  """Functional update of a nested dict at 'a/b/c'."""
  key, _, rest = path.partition("/")
  new = dict(tree)
  new[key] = set_path(tree[key], rest, value) if rest else value
  return new
