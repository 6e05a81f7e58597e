"""Flax NNX models through the same interception point as linen ones.

`to_linen(nnx_model)` returns a linen module (`NNXModule`) and its variables. Calling the linen
module runs the NNX model, with each call of an `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv`, `nnx.BatchNorm`
and `models.layers.NNXAttentionMatmul` computed by the linen module of the same arithmetic
(`nn.Dense`, `nn.DenseGeneral`, `nn.Conv`, `nn.BatchNorm`, `AttentionMatmul`) named after the layer's graph path
(`nnx.iter_graph`: `blocks.0.attn.qkv`). So `interception.trace` and `run_with_provider`, and
with them calibration, selection, the quantized apply (fake and integer), finetuning and
serving, see an NNX model's layers exactly as they see a linen model's; nothing downstream knows
the model was NNX.

How: the NNX module is split once (`nnx.split`) into its graph definition and state. The linen
variables hold, per intercepted layer, its parameters under the layer's name (a BatchNorm's
running statistics under 'batch_stats'), and every other `nnx.Param` (LayerNorm scales,
embeddings, class tokens) under 'params'/'nnx' by its graph path; the remaining NNX state (RNG
keys and counts, other variables) is kept as constants. Each call rebuilds the NNX module from
these (`nnx.merge`, in evaluation mode: `module.eval()`), and runs it while the intercepted
classes' `__call__` is patched to dispatch to the linen layers (the patch is active only inside
the call, and a layer not of this module runs unchanged).

Not intercepted (they run in float, and `quantize.float_ops_in_int_path` lists them):
`nnx.Einsum` and plain einsums (e.g. the attention matmuls inside `nnx.MultiHeadAttention`,
whose projections, `nnx.LinearGeneral`, are intercepted).
Evaluation only: `train=True` is refused (train an NNX model with NNX, then quantize it).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from flexiq_jax.models.layers import AttentionMatmul
from flexiq_jax.models.layers import NNXAttentionMatmul

REST = "nnx"  # params key of the NNX parameters outside the intercepted layers
INTERCEPTED = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.BatchNorm, NNXAttentionMatmul)


def layer_name(path: tuple) -> str:
  """The linen name of the NNX layer at graph path `path`: its keys joined by '.'.

  Args:
    path: Graph path, a tuple of keys (strings or ints).

  Returns:
    The name, e.g. 'blocks.0.attn.qkv'.
  """
  return ".".join(str(k) for k in path)


def intercepted_layers(module: nnx.Module) -> dict[tuple, nnx.Module]:
  """{graph path: layer} of the NNX layers this module intercepts, in graph order.

  Args:
    module: An NNX module.

  Returns:
    A dict {graph path tuple: layer} of its Linear, LinearGeneral, Conv, BatchNorm and
    NNXAttentionMatmul layers (the root module itself excluded).
  """
  return {tuple(path): node for path, node in nnx.iter_graph(module)
          if isinstance(node, INTERCEPTED) and path}


def _linen_layer(layer: nnx.Module, name: str) -> nn.Module:
  """The linen module computing what `layer` computes, with its parameters under `name`."""
  if isinstance(layer, nnx.Linear):
    return nn.Dense(layer.out_features, use_bias=layer.use_bias, dtype=layer.dtype, param_dtype=layer.param_dtype,
                    precision=layer.precision, name=name)
  if isinstance(layer, nnx.LinearGeneral):
    if layer.batch_axis:
      raise NotImplementedError(f"{name}: nnx.LinearGeneral with batch_axis cannot be quantized")
    return nn.DenseGeneral(tuple(layer.out_features), axis=layer.axis, use_bias=layer.use_bias, dtype=layer.dtype,
                           param_dtype=layer.param_dtype, precision=layer.precision, name=name)
  if isinstance(layer, nnx.Conv):
    if layer.mask is not None:
      raise NotImplementedError(f"{name}: a masked nnx.Conv cannot be quantized")
    return nn.Conv(layer.out_features, tuple(layer.kernel_size), strides=layer.strides, padding=layer.padding,
                   input_dilation=layer.input_dilation, kernel_dilation=layer.kernel_dilation,
                   feature_group_count=layer.feature_group_count, use_bias=layer.use_bias, dtype=layer.dtype,
                   param_dtype=layer.param_dtype, precision=layer.precision, name=name)
  if isinstance(layer, nnx.BatchNorm):
    return nn.BatchNorm(use_running_average=True, axis=layer.axis, momentum=layer.momentum, epsilon=layer.epsilon,
                        use_bias=layer.use_bias, use_scale=layer.use_scale, dtype=layer.dtype,
                        param_dtype=layer.param_dtype, use_fast_variance=layer.use_fast_variance, name=name)
  if isinstance(layer, NNXAttentionMatmul):
    return AttentionMatmul(layer.equation, name=name)
  raise TypeError(f"{type(layer).__name__} is not intercepted")


@contextlib.contextmanager
def _dispatch(layers: dict[int, Callable]):
  """Patches the intercepted NNX classes' `__call__` so that a layer whose id is in `layers` is
  computed by `layers[id](*args)`; other instances run their own `__call__`."""
  originals = {cls: cls.__call__ for cls in INTERCEPTED}

  def patched(cls):
    original = originals[cls]

    def call(self, *args, **kwargs):
      run = layers.get(id(self))
      if run is None:
        return original(self, *args, **kwargs)
      given = sorted(k for k, v in kwargs.items() if v is not None)  # e.g. out_sharding=None: the default
      if given:
        raise NotImplementedError(f"{type(self).__name__} called with keyword arguments {given}")
      return run(*args)
    return call

  try:
    for cls in INTERCEPTED:
      cls.__call__ = patched(cls)
    yield
  finally:
    for cls, original in originals.items():
      cls.__call__ = original


class _Constants:
  """The NNX state that is neither a parameter nor a running statistic (RNG keys and counts,
  other variables), held as constants; compared and hashed by identity."""

  def __init__(self, values: dict):
    self.values = values


def _key(k) -> str:
  return str(k)


def _get(tree: dict, path: tuple):
  for k in path:
    tree = tree[_key(k)]
  return tree


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(_key(k), {})
  tree[_key(path[-1])] = value


class NNXModule(nn.Module):
  """A linen module running an NNX module with its layers intercepted (module docstring).

  Attributes:
    graphdef: the NNX module's graph definition (`nnx.split`).
    template: the NNX state as split (its structure and variable types), and the constants.
    layer_paths: the graph paths of the intercepted layers.
    call_fn: `(module, images) -> logits` instead of `module(images)`.
  """

  graphdef: Any
  template: _Constants
  layer_paths: tuple
  call_fn: Callable | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if train:
      raise NotImplementedError("an NNX model runs here in evaluation mode only: train it with NNX, then quantize it")
    variables = self.variables
    params, stats = variables.get("params", {}), variables.get("batch_stats", {})
    names = {p: layer_name(p) for p in self.layer_paths}
    flat = []
    for path, var in self.template.values["flat"]:
      layer = next((p for p in names if path[:len(p)] == p and len(path) == len(p) + 1), None)
      # A layer's own variables come from the linen variables; a BatchNorm folded into its conv
      # has none there (the interception bypasses it), so the NNX state keeps its split value.
      value = var.get_value() if hasattr(var, "get_value") else var.value
      if layer is not None and isinstance(var, (nnx.Param, nnx.BatchStat)):
        value = (params if isinstance(var, nnx.Param) else stats).get(names[layer], {}).get(path[-1], value)
      elif isinstance(var, nnx.Param):
        value = _get(params[REST], path)
      flat.append((path, var.replace(value)))
    module = nnx.merge(self.graphdef, nnx.from_flat_state(flat))
    module.eval()
    by_path = intercepted_layers(module)
    linen_layers: dict[str, nn.Module] = {}

    def runner(path, layer):
      def run(*args):
        name = names[path]
        if name not in linen_layers:
          linen_layers[name] = _linen_layer(layer, name)
        return linen_layers[name](*args)
      return run

    with _dispatch({id(layer): runner(path, layer) for path, layer in by_path.items()}):
      return self.call_fn(module, x) if self.call_fn is not None else module(x)


def to_linen(module: nnx.Module, call_fn: Callable | None = None) -> tuple[NNXModule, dict]:
  """(linen module, its variables) running `module` with its layers intercepted.

  Args:
    module: an NNX module (left unchanged).
    call_fn: `(module, images) -> logits`, called instead of `module(images)`.

  Returns:
    (model, variables): `model.apply(variables, images, train=False)` gives the NNX module's
    logits in evaluation mode; variables holds 'params' (and 'batch_stats' for BatchNorms).
  """
  graphdef, state = nnx.split(module)
  layers = intercepted_layers(module)
  params: dict[str, Any] = {REST: {}}
  stats: dict[str, Any] = {}
  for path, var in nnx.to_flat_state(state):
    path = tuple(path)
    layer = next((p for p in layers if path[:len(p)] == p and len(path) == len(p) + 1), None)
    value = var.get_value() if hasattr(var, "get_value") else var.value
    if layer is not None and isinstance(var, (nnx.Param, nnx.BatchStat)):
      target = params if isinstance(var, nnx.Param) else stats
      target.setdefault(layer_name(layer), {})[path[-1]] = jnp.asarray(value)
    elif isinstance(var, nnx.Param):
      _set(params[REST], path, jnp.asarray(value))
  template = _Constants({"flat": [(tuple(p), v) for p, v in nnx.to_flat_state(state)]})
  variables = {"params": params}
  if stats:
    variables["batch_stats"] = stats
  return NNXModule(graphdef, template, tuple(layers), call_fn), variables
