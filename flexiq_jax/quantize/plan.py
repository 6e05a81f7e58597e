"""The quantization plan: which layers are quantized, which may be lowered to 4 bits, which
BatchNorms fold into which convs — decided by regex rules on module paths, first match wins.

Also the interception that runs a linen model with its quantizable layers replaced, shared by
calibration (float, recording statistics) and the quantized model (fake-quant or integer).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flexiq_jax import inspect_model
from flexiq_jax.inspect_model import LayerInfo, get_path
from flexiq_jax.quantize import layer_ops


@dataclasses.dataclass
class QuantPlan:
  layers: dict[str, LayerInfo]  # every quantizable layer, call order
  quantized: list[str]  # layers that get 8-bit quantization
  eligible: list[str]  # quantized layers whose channels may be lowered to 4 bits
  folded_bn: dict[str, str]  # batchnorm path -> conv path it is folded into
  signed: dict[str, bool] = dataclasses.field(default_factory=dict)  # set by calibration
  unmatched_rules: list[str] = dataclasses.field(default_factory=list)

  def to_json(self) -> dict:
    return {"quantized": self.quantized, "eligible": self.eligible, "folded_bn": self.folded_bn,
            "signed": self.signed, "unmatched_rules": self.unmatched_rules,
            "layers": {p: dataclasses.asdict(i) for p, i in self.layers.items()}}

  @classmethod
  def from_json(cls, d: dict) -> "QuantPlan":
    layers = {p: LayerInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in i.items()})
              for p, i in d["layers"].items()}
    return cls(layers, list(d["quantized"]), list(d["eligible"]), dict(d["folded_bn"]),
               dict(d.get("signed", {})), list(d.get("unmatched_rules", [])))


def _resolve(rules: Sequence[str], paths: list[str], used: set) -> set[str]:
  """'first' / 'last' name the first / last quantizable layer in call order; else a regex
  (re.search) on the module path."""
  out = set()
  for rule in rules:
    if rule == "first":
      hits = paths[:1]
    elif rule == "last":
      hits = paths[-1:]
    else:
      hits = [p for p in paths if re.search(rule, p)]
    if hits:
      used.add(rule)
    out.update(hits)
  return out


def build_plan(model: nn.Module, variables, image_shape, *, skip: Sequence[str] = (),
               keep_8bit: Sequence[str] = ("first", "last"), fold_bn: bool = True) -> QuantPlan:
  """skip: layers left in float. keep_8bit: quantized but never lowered (default: the first
  layer — stem conv or patch embedding — and the classifier)."""
  layers, bn_pairs = inspect_model.trace_layers(model, variables, inspect_model.sample_input(image_shape))
  paths = list(layers)
  used: set[str] = set()
  skipped = _resolve(skip, paths, used)
  quantized = [p for p in paths if p not in skipped]
  kept = _resolve(keep_8bit, quantized, used)
  eligible = [p for p in quantized if p not in kept]
  folded = {bn: conv for bn, conv in bn_pairs.items()} if fold_bn else {}
  unmatched = [r for r in list(skip) + list(keep_8bit) if r not in used]
  return QuantPlan(layers, quantized, eligible, folded, {}, unmatched)


def fold_batchnorm(variables, plan: QuantPlan, eps_of: Callable[[str], float] | None = None):
  """Folds each BatchNorm in `plan.folded_bn` into its conv: W' = W * γ/σ, b' = β + (b - μ)γ/σ.

  Returns variables whose conv kernels are folded and whose convs carry a 'bias' (added even when
  the module has none; the interceptor reads it). Folded BatchNorms are bypassed at apply time.
  """
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  for bn_path, conv_path in plan.folded_bn.items():
    bn_p, bn_s = get_path(params, bn_path), get_path(stats, bn_path)
    eps = eps_of(bn_path) if eps_of else 1e-5
    inv = bn_p.get("scale", 1.0) * jax.lax.rsqrt(bn_s["var"] + eps)
    conv = dict(get_path(params, conv_path))
    bias = conv.get("bias", jnp.zeros_like(bn_s["mean"]))
    conv["kernel"] = conv["kernel"] * inv
    conv["bias"] = bn_p.get("bias", 0.0) + (bias - bn_s["mean"]) * inv
    params = inspect_model.set_path(params, conv_path, conv)
  out = dict(variables)
  out["params"] = params
  return out


def bn_epsilons(model: nn.Module, variables, plan: QuantPlan, image_shape) -> dict[str, float]:
  """Each folded BatchNorm's epsilon, read off the modules (models differ: 1e-5, 1e-3, ...)."""
  eps = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm):
      eps[inspect_model.path_str(context.module)] = context.module.epsilon
    return next_fun(*args, **kwargs)

  def run(v, x):
    with nn.intercept_methods(interceptor):
      return model.apply(v, x, train=False)

  jax.eval_shape(run, variables, inspect_model.sample_input(image_shape))
  return {p: eps[p] for p in plan.folded_bn}


LayerFn = Callable[[LayerInfo, nn.Module, jax.Array, jax.Array, "jax.Array | None"], jax.Array]


def apply_with_layers(model: nn.Module, plan: QuantPlan, variables, x, layer_fn: LayerFn, *,
                      paths: Sequence[str] | None = None):
  """Runs the model (eval mode) with each layer in `paths` (default: plan.quantized) computed by
  `layer_fn(info, module, x, kernel, bias)` and the folded BatchNorms bypassed. Variables must be
  folded (see fold_batchnorm) if the plan folds any."""
  targets = set(plan.quantized if paths is None else paths)
  folded = set(plan.folded_bn)
  params = variables["params"]

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    module = context.module
    path = inspect_model.path_str(module)
    if path in folded and isinstance(module, nn.BatchNorm):
      return args[0]
    if path in targets and isinstance(module, inspect_model.QUANTIZABLE):
      p = get_path(params, path)
      return layer_fn(plan.layers[path], module, args[0], p["kernel"], p.get("bias"))
    if path in plan.folded_bn.values() and isinstance(module, nn.Conv):
      # A folded conv that is not quantized still needs its folded bias.
      p = get_path(params, path)
      return layer_ops.float_forward(plan.layers[path], module, args[0], p["kernel"], p.get("bias"))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    return model.apply(variables, x, train=False)
