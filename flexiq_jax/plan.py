"""The quantization plan: which layers are quantized, which are *lowerable* (their feature
channels may go to 4 bits), which BatchNorms fold into which convs, which activation x
activation matmuls (`AttentionMatmul`: attention's q·kᵀ and attn·v) run in 8 bits, and each
layer's input and each matmul's operand signedness — decided by regex rules on module paths.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import interception
from flexiq_jax.interception import LayerInfo, MatmulInfo, get_path

ATTENTION_MODES = ("int8", "float")


@dataclasses.dataclass(frozen=True)
class QuantPlan:
  layers: dict[str, LayerInfo]  # every quantizable layer, call order
  quantized: list[str]  # layers that get 8-bit quantization
  lowerable: list[str]  # quantized layers whose channels may be lowered to 4 bits
  folded_bn: dict[str, str]  # batchnorm path -> conv path it is folded into
  bn_epsilon: dict[str, float] = dataclasses.field(default_factory=dict)  # of the folded BatchNorms
  signed: dict[str, bool] = dataclasses.field(default_factory=dict)  # set from calibration
  unmatched_rules: list[str] = dataclasses.field(default_factory=list)
  matmuls: dict[str, MatmulInfo] = dataclasses.field(default_factory=dict)  # every traced AttentionMatmul
  quantized_matmuls: list[str] = dataclasses.field(default_factory=list)  # those run in 8 bits (never lowered)
  matmul_signed: dict[str, tuple[bool, bool]] = dataclasses.field(default_factory=dict)  # (a, b), from calibration
  # Why each layer's input is signed: {path: {'negative_count', 'values', 'negative_fraction', 'min'}}
  # of its calibration input (with_signedness; empty for plans from statistics without counts).
  input_negatives: dict[str, dict] = dataclasses.field(default_factory=dict)

  def with_signedness(self, stats: dict) -> "QuantPlan":
    """Signed input grid where calibration saw a negative value in a layer's input (its calibrated
    minimum is negative), unsigned otherwise. This is empirical, not proven from the graph: a
    negative input at test time clips to 0. `input_negatives` records the evidence per layer
    (statistics from `calibrate.calibrate` count the negative values; older ones only hold the
    minimum, which decides alone). A layer calibrated onto an asymmetric grid (a positive
    'act_zero_point', `calibrate.asymmetric_grid`) has unsigned codes whatever its input's sign."""
    evidence = {}
    for p in self.quantized:
      entry = {"min": float(np.min(stats[p]["ch_min"]))}
      if "negative_count" in stats[p]:
        count = int(np.sum(np.asarray(stats[p]["negative_count"], np.int64)))
        values = int(np.asarray(stats[p]["input_rows"], np.int64)) * int(np.size(stats[p]["negative_count"]))
        entry.update(negative_count=count, values=values, negative_fraction=count / max(values, 1))
      evidence[p] = entry
    signed = {p: bool(e["negative_count"] > 0 if "negative_count" in e else e["min"] < 0)
              and not float(stats[p].get("act_zero_point", 0.0)) > 0 for p, e in evidence.items()}
    plan = dataclasses.replace(self, signed=signed,
                               input_negatives={p: e for p, e in evidence.items() if "negative_count" in e})
    # Each matmul operand likewise (softmax probabilities are >= 0: unsigned).
    return dataclasses.replace(plan, matmul_signed={
        p: (bool(stats[p]["a_min"] < 0), bool(stats[p]["b_min"] < 0)) for p in self.quantized_matmuls})

  def signedness_summary(self) -> str:
    """One line for logs: how many quantized layers get the unsigned input grid, and why."""
    unsigned = [p for p in self.quantized if not self.signed.get(p, True)]
    line = f"{len(unsigned)} of {len(self.quantized)} quantized layers have unsigned inputs"
    if self.input_negatives:
      signed = [e["negative_fraction"] for p, e in self.input_negatives.items() if self.signed.get(p)]
      shifted = sum(1 for p in unsigned if self.input_negatives.get(p, {}).get("negative_count", 0) > 0)
      line += (f" ({len(unsigned) - shifted} with no negative value in calibration, {shifted} with negative ones "
               "on an asymmetric grid with a zero point)" if shifted else " (no negative value in calibration)")
      if signed:
        line += f"; the signed ones saw {min(signed):.2g} to {max(signed):.2g} of their inputs negative"
    return line

  def layer_infos(self, paths: Sequence[str] | None = None) -> dict[str, LayerInfo]:
    """{path: LayerInfo} of `paths` (default: the quantized layers), for cost accounting."""
    return {p: self.layers[p] for p in (self.quantized if paths is None else paths)}

  def matmul_infos(self) -> dict[str, MatmulInfo]:
    """{path: MatmulInfo} of the quantized (8-bit) matmuls, for cost accounting."""
    return {p: self.matmuls[p] for p in self.quantized_matmuls}

  def to_json(self) -> dict:
    return {"quantized": self.quantized, "lowerable": self.lowerable, "folded_bn": self.folded_bn,
            "bn_epsilon": self.bn_epsilon, "signed": self.signed, "unmatched_rules": self.unmatched_rules,
            "layers": {p: dataclasses.asdict(i) for p, i in self.layers.items()},
            "matmuls": {p: dataclasses.asdict(i) for p, i in self.matmuls.items()},
            "quantized_matmuls": self.quantized_matmuls,
            "matmul_signed": {p: list(s) for p, s in self.matmul_signed.items()},
            "input_negatives": self.input_negatives}

  @classmethod
  def from_json(cls, d: dict) -> "QuantPlan":
    layers = {p: LayerInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in i.items()})
              for p, i in d["layers"].items()}
    matmuls = {p: MatmulInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in i.items()})
               for p, i in d.get("matmuls", {}).items()}  # plans written before matmuls were traced have none
    return cls(layers, list(d["quantized"]), list(d["lowerable"]), dict(d["folded_bn"]),
               {k: float(v) for k, v in d.get("bn_epsilon", {}).items()}, dict(d.get("signed", {})),
               list(d.get("unmatched_rules", [])), matmuls, list(d.get("quantized_matmuls", [])),
               {p: (bool(s[0]), bool(s[1])) for p, s in d.get("matmul_signed", {}).items()},
               {p: dict(e) for p, e in d.get("input_negatives", {}).items()})


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
               keep_8bit: Sequence[str] = ("first", "last"), fold_bn: bool = True,
               attention: str = "int8") -> QuantPlan:
  """Traces the model and decides which layers are quantized, which are lowerable, which BatchNorms
  fold, and which matmuls run in 8 bits.

  skip: layers left in float (its regexes also leave the matmuls they match in float; 'first'
  and 'last' name layers only). keep_8bit: quantized but never lowered (default: the first
  layer — stem conv or patch embedding — and the classifier). attention: 'int8' quantizes every
  `AttentionMatmul` (q·kᵀ, attn·v) to 8 bits at every ratio; 'float' leaves them all in float.
  A rule is 'first', 'last' (the first / last quantizable layer in call order) or a regex searched
  (re.search) in the module path; rules that match nothing are listed in `unmatched_rules`.

  Args:
    model: the linen model.
    variables: its variables (only shapes are used).
    image_shape: (H, W, C) of one image.
    skip: rules for the layers (and matmuls) left in float.
    keep_8bit: rules for the quantized layers that are never lowered (matched among the quantized).
    fold_bn: fold each BatchNorm that directly consumes a conv's output into that conv.
    attention: 'int8' or 'float'.

  Returns:
    A `QuantPlan` without signedness (set it with `QuantPlan.with_signedness` after calibration).

  Raises:
    ValueError: `attention` is not in ATTENTION_MODES.
    NotImplementedError: from `interception.trace`, for a model it cannot trace.
  """
  if attention not in ATTENTION_MODES:
    raise ValueError(f"unknown quant.attention {attention!r}; use 'int8' or 'float'")
  traced = interception.trace(model, variables, image_shape)
  paths = list(traced.layers)
  used: set[str] = set()
  skipped = _resolve(skip, paths, used)
  quantized_matmuls = []
  if attention == "int8":
    skipped_matmuls = _resolve([r for r in skip if r not in ("first", "last")], list(traced.matmuls), used)
    quantized_matmuls = [p for p in traced.matmuls if p not in skipped_matmuls]
  quantized = [p for p in paths if p not in skipped]
  kept = _resolve(keep_8bit, quantized, used)
  lowerable = [p for p in quantized if p not in kept]
  folded = dict(traced.foldable_bn) if fold_bn else {}
  unmatched = [r for r in list(skip) + list(keep_8bit) if r not in used]
  return QuantPlan(traced.layers, quantized, lowerable, folded, {bn: traced.bn_epsilon[bn] for bn in folded},
                   {}, unmatched, traced.matmuls, quantized_matmuls)


def fold_batchnorm(variables, plan: QuantPlan):
  """Folds each BatchNorm in `plan.folded_bn` into its conv: W' = W * γ/σ, b' = β + (b - μ)γ/σ.

  Returns variables whose conv kernels are folded and whose convs carry a 'bias' (added even when
  the module has none; the interceptor reads it). Folded BatchNorms are bypassed at apply time.
  σ = sqrt(var + ε) with the BatchNorm's own epsilon (`plan.bn_epsilon`); a BatchNorm without scale
  or bias uses γ = 1, β = 0.

  Args:
    variables: the float model's variables ({'params', 'batch_stats'}); not modified.
    plan: the plan naming the BatchNorms to fold and their convs.

  Returns:
    A shallow copy of `variables` with new 'params' (the folded convs' kernels and biases replaced);
    'batch_stats' is left as it was.
  """
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  for bn_path, conv_path in plan.folded_bn.items():
    bn_p, bn_s = get_path(params, bn_path), get_path(stats, bn_path)
    inv = bn_p.get("scale", 1.0) * jax.lax.rsqrt(bn_s["var"] + plan.bn_epsilon[bn_path])
    conv = dict(get_path(params, conv_path))
    bias = conv.get("bias", jnp.zeros_like(bn_s["mean"]))
    conv["kernel"] = conv["kernel"] * inv
    conv["bias"] = bn_p.get("bias", 0.0) + (bias - bn_s["mean"]) * inv
    params = interception.set_path(params, conv_path, conv)
  out = dict(variables)
  out["params"] = params
  return out


def unfolded_batch_stats(variables, plan: QuantPlan) -> dict:
  """The batch statistics of BatchNorms the plan does not fold (they still run at apply time).

  Args:
    variables: the model's variables; only 'batch_stats' is read.
    plan: the plan whose `folded_bn` names the folded BatchNorms.

  Returns:
    A nested dict of the 'batch_stats' entries not under a folded BatchNorm's path (empty if none).
  """
  flat = interception.flatten_paths(variables.get("batch_stats", {}))
  tree: dict = {}
  for p, v in flat.items():
    if not any(p.startswith(bn + "/") for bn in plan.folded_bn):
      tree = interception.set_path(tree, p, v)
  return tree
