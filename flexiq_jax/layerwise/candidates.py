"""Candidates (a bit-width pair per quantizer group) and quantizer groups.

A candidate is written 'W<w>A<a>' (weight bits, input-activation bits), e.g. 'W8A8', 'W4A8',
'W4A4', 'W8A16'; 'FP' (or 'float') means the group is not quantized. Internally bits 0 = float;
the cost model counts float as 32 x 32 bits (cost.layerwise_bops' convention).

Quantizer groups (`quantizer_groups`), in call order of their first layer:
  'shared_input' (default, as AIMET): the layers that read one tensor form one group, so the
    tensor gets one activation bit width and all its consumers' weights share the candidate
    (a ResNet block input feeding conv1 and the downsample conv is one group). AIMET also has
    activation-only groups for tensors no weighted layer reads (a residual add's inputs, a
    concat, the logits); FlexiQ's integer path keeps those tensors float (only the inputs of
    Dense/Conv/DenseGeneral are quantized), so there is no such group here.
  'per_layer': one group per quantized layer (its weight and its input activation).
"""

from __future__ import annotations

import dataclasses
import re

import jax

from flexiq_jax import interception

FLOAT_BITS = 32  # what a float operand costs in BOPs


@dataclasses.dataclass(frozen=True)
class Candidate:
  weight_bits: int  # 0 = float
  act_bits: int  # 0 = float

  @property
  def name(self) -> str:
    if self.weight_bits == 0 and self.act_bits == 0:
      return "FP"
    w = "FP" if self.weight_bits == 0 else self.weight_bits
    a = "FP" if self.act_bits == 0 else self.act_bits
    return f"W{w}A{a}"

  @property
  def cost_bits(self) -> tuple[int, int]:
    return (self.weight_bits or FLOAT_BITS, self.act_bits or FLOAT_BITS)

  @property
  def bop_factor(self) -> int:
    w, a = self.cost_bits
    return w * a


def parse_candidate(text: str) -> Candidate:
  """'W8A8' -> Candidate(8, 8); 'FP'/'float' -> Candidate(0, 0); 'WFPA8' -> float weights.

  Args:
    text: Candidate name, case-insensitive: 'W<w>A<a>' with w, a in [2, 16] or 'FP', or 'FP' /
      'float' / 'FP32'.

  Returns:
    The Candidate (bits 0 = float).

  Raises:
    ValueError: If the text is not a candidate or a bit width is outside [2, 16].
  """
  t = text.strip().upper()
  if t in ("FP", "FLOAT", "FP32"):
    return Candidate(0, 0)
  m = re.fullmatch(r"W(\d+|FP)A(\d+|FP)", t)
  if not m:
    raise ValueError(f"bad candidate {text!r}; write e.g. 'W8A8', 'W4A4', 'W8A16' or 'FP'")
  bits = [0 if g == "FP" else int(g) for g in m.groups()]
  for b in bits:
    if b != 0 and not 2 <= b <= 16:
      raise ValueError(f"candidate {text!r}: bit widths must be in [2, 16] (or FP)")
  return Candidate(*bits)


def parse_candidates(texts) -> list[Candidate]:
  """Parses a list of candidate names (`parse_candidate`).

  Args:
    texts: Iterable of candidate names.

  Returns:
    The Candidates, in the given order.

  Raises:
    ValueError: If a name is invalid or two names denote the same candidate.
  """
  out = [parse_candidate(t) for t in texts]
  if len(set(out)) != len(out):
    raise ValueError(f"duplicate candidates in {list(texts)}")
  return out


GROUPINGS = ("shared_input", "per_layer")


@dataclasses.dataclass(frozen=True)
class Group:
  """Layers (paths of plan.quantized) that take one candidate together."""

  layers: tuple[str, ...]

  @property
  def name(self) -> str:
    return "+".join(self.layers)


def shared_inputs(model, plan, variables, image_shape) -> list[tuple[str, ...]]:
  """The quantized layers grouped by the tensor they read (shape-only trace, no FLOPs), in call
  order of each tensor's first reader.

  Args:
    model: The float Flax model.
    plan: The QuantPlan; only its `quantized` layers are recorded.
    variables: The model's (folded) variables.
    image_shape: Shape of one input image, without the batch axis.

  Returns:
    A list of tuples of layer paths, each sorted in plan.quantized order.
  """
  readers: dict[int, list[str]] = {}
  seen = []  # keeps every input alive during the trace, so that no id is reused

  class Record:
    def layer(self, call, x):
      seen.append(x)
      readers.setdefault(id(x), []).append(call.path)
      return call.float_forward(x)

    def matmul(self, call, a, b):
      return call.float_forward(a, b)

  x = jax.ShapeDtypeStruct((1, *image_shape), jax.numpy.float32)
  jax.eval_shape(lambda v, x: interception.run_with_provider(model, plan, v, x, Record()), variables, x)
  order = {p: i for i, p in enumerate(plan.quantized)}
  return sorted((tuple(sorted(g, key=order.get)) for g in readers.values()), key=lambda g: order[g[0]])


def quantizer_groups(plan, grouping: str = "per_layer", model=None, variables=None, image_shape=None) -> list[Group]:
  """The groups of the search (see the module docstring); 'shared_input' needs the model, its
  (folded) variables and the image shape to see which layers read the same tensor.

  Args:
    plan: The QuantPlan.
    grouping: 'per_layer' or 'shared_input'.
    model: The float Flax model ('shared_input' only).
    variables: The model's (folded) variables ('shared_input' only).
    image_shape: Shape of one input image ('shared_input' only).

  Returns:
    A list of Groups in call order.

  Raises:
    ValueError: If `grouping` is unknown, or 'shared_input' is given without a model.
  """
  if grouping == "per_layer":
    return [Group((p,)) for p in plan.quantized]
  if grouping == "shared_input":
    if model is None:
      raise ValueError("grouping 'shared_input' needs the model, its variables and the image shape")
    return [Group(g) for g in shared_inputs(model, plan, variables, image_shape)]
  raise ValueError(f"unknown layerwise.grouping {grouping!r}; valid: {GROUPINGS}")
