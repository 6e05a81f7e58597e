"""Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019) of the BN-folded float variables.

For two layers A -> B where A's output channel i reaches B's input channel i only through a
positively homogeneous function f (f(x / s) = f(x) / s for s > 0: identity, ReLU), dividing A's
output channel i (its kernel column and bias) by s_i and multiplying B's input channel i (its kernel
rows; a depthwise B's filter i) by s_i leaves the function unchanged. With r1_i the range max|W_A|
of A's output channel i and r2_i the range of B's input channel i, the new ranges are r1_i / s_i and
s_i r2_i; the paper's choice s_i = sqrt(r1_i / r2_i) makes both sqrt(r1_i r2_i) (the product
r1_i r2_i is invariant, so this is the best the pair can do for both layers' per-channel
precision at once). Layers in chains (B is the A of the next pair) are equalized by sweeping
over the pairs until the scales converge, as the paper does.

The pairs are found without a graph: a candidate is a quantized layer B and the nearest quantized
layer A before it in call order with as many output channels as B has input channels; it is
taken only if a random positive rescaling of the pair (s log-uniform in [1/8, 8]) leaves the
model's output and every other quantized layer's input unchanged on the check images, within
a relative tolerance. So a pair through a non-homogeneous function (SiLU, GELU, ReLU6 where the
check images reach its clip, a BatchNorm that is not folded), or one whose A also feeds a residual
sum or another branch, is refused. ReLU6 is not replaced by ReLU (the paper does so for
MobileNetV2): the float model is never changed, so ReLU6 pairs whose clip is reached stay
unequalized. The check is empirical: a non-homogeneous function the check images never exercise
(a ReLU6 clip no check image reaches) would pass it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import interception
from flexiq_jax.interception import FloatLayers, LayerInfo, get_path, set_path
from flexiq_jax.layer_ops import weight_channel_index

# The random rescaling of the function-preservation check: s = exp(u), u ~ U(-log 8, log 8).
CHECK_SCALE = 8.0


@dataclasses.dataclass(frozen=True)
class Pair:
  """A -> B: A's output channel i feeds B's input channel i through a positively homogeneous function."""

  a: str
  b: str


@dataclasses.dataclass(frozen=True)
class Equalized:
  """The equalized variables and what was done.

  Attributes:
    variables: the variables with every accepted pair equalized.
    pairs: the accepted pairs, in call order.
    refused: {'A -> B': relative deviation the random rescaling caused} of the refused candidates.
    sweeps: sweeps over the pairs until the scales converged (or the limit).
    last_move: max |log s_i| of the last sweep (how far from converged).
    ranges: {'A -> B': {'a_before', 'a_after', 'b_before', 'b_after'}}: the ratio max/min over the
      channels of A's output-channel weight ranges and of B's input-channel weight ranges.
    deviation: the equalized model's largest relative output deviation on the check images.
  """

  variables: dict
  pairs: tuple[Pair, ...]
  refused: dict
  sweeps: int
  last_move: float
  ranges: dict
  deviation: float

  def to_json(self) -> dict:
    """The report (everything but the variables) as JSON-ready values."""
    return {"pairs": [[p.a, p.b] for p in self.pairs], "refused": self.refused, "sweeps": self.sweeps,
            "last_move": self.last_move, "ranges": self.ranges, "deviation": self.deviation}


def pairs_from_json(report: dict) -> list[Pair]:
  """The pairs of a saved report (`Equalized.to_json`).

  Args:
    report: the report.

  Returns:
    Its pairs.
  """
  return [Pair(a, b) for a, b in report["pairs"]]


def supported(info: LayerInfo, kernel) -> bool:
  """Whether a layer's kernel has the (..., I, O) form the rescaling handles: a conv, or a Dense
  with a 2-D kernel over one contracted axis.

  Args:
    info: the layer.
    kernel: its kernel.

  Returns:
    True if the layer can be one end of a pair.
  """
  if kernel.shape[-1] != info.out_channels or kernel.shape[-2] * info.groups != info.in_channels:
    return False
  return info.kind == "conv" or (kernel.ndim == 2 and info.contracted_axes == 1)


def output_ranges(kernel) -> jax.Array:
  """max|W| of each output channel: (O,) from a (..., I, O) kernel.

  Args:
    kernel: the kernel.

  Returns:
    The per-output-channel ranges.
  """
  return jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)))


def input_ranges(kernel, info: LayerInfo) -> jax.Array:
  """max|W| over the weights that multiply each feature (input) channel: (C,).

  For a grouped or depthwise conv, channel c is read only by its group's filters
  (`layer_ops.weight_channel_index`).

  Args:
    kernel: the (..., I, O) kernel.
    info: the layer.

  Returns:
    The per-input-channel ranges.
  """
  per_element = jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 2))) if kernel.ndim > 2 else jnp.abs(kernel)
  index = jnp.asarray(weight_channel_index(info)).reshape(-1)
  return jax.ops.segment_max(per_element.reshape(-1), index, num_segments=info.in_channels)


def rescale_pair(params: dict, layers: dict, pair: Pair, s) -> dict:
  """Divides A's output channel i (kernel column, bias) by s_i and multiplies B's input channel i by s_i.

  Args:
    params: the (folded) params tree; not modified.
    layers: {path: LayerInfo} (the plan's layers).
    pair: the pair.
    s: (C,) positive scales.

  Returns:
    A new params tree.
  """
  a = dict(get_path(params, pair.a))
  a["kernel"] = a["kernel"] / s
  if a.get("bias") is not None:
    a["bias"] = a["bias"] / s
  params = set_path(params, pair.a, a)
  b = dict(get_path(params, pair.b))
  b["kernel"] = b["kernel"] * jnp.asarray(s)[weight_channel_index(layers[pair.b])]
  return set_path(params, pair.b, b)


def equalizing_scales(params: dict, layers: dict, pair: Pair) -> jax.Array:
  """s_i = sqrt(r1_i / r2_i): after `rescale_pair`, both ranges of channel i are sqrt(r1_i r2_i).
  A channel with a zero range on either side keeps s_i = 1.

  Args:
    params: the params tree.
    layers: {path: LayerInfo}.
    pair: the pair.

  Returns:
    (C,) scales.
  """
  r1 = output_ranges(get_path(params, pair.a)["kernel"])
  r2 = input_ranges(get_path(params, pair.b)["kernel"], layers[pair.b])
  ok = (r1 > 0) & (r2 > 0)
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, r1, 1.0) / jnp.where(ok, r2, 1.0)), 1.0)


def candidate_pairs(plan, params: dict) -> list[Pair]:
  """For each quantized layer B, the nearest quantized layer A before it in call order whose output
  channel count is B's input channel count (both of a supported form).

  Args:
    plan: the QuantPlan (`layers` in call order, `quantized`).
    params: the params tree (for the kernels' shapes).

  Returns:
    The candidate pairs, in B's call order.
  """
  quantized = set(plan.quantized)
  paths = [p for p in plan.layers if p in quantized]
  ok = [p for p in paths if supported(plan.layers[p], get_path(params, p)["kernel"])]
  out = []
  for j, b in enumerate(ok):
    for a in reversed(ok[:j]):
      if plan.layers[a].out_channels == plan.layers[b].in_channels:
        out.append(Pair(a, b))
        break
  return out


class _Recorder(FloatLayers):
  """Float layers that record each layer's input."""

  def __init__(self):
    self.inputs = {}

  def layer(self, call, x):
    self.inputs[call.path] = x
    return call.float_forward(x)


def probe(model, plan):
  """A jitted (variables, images) -> (output, {path: layer input}) of the float model with BN folded.

  Args:
    model: the linen model.
    plan: the QuantPlan.

  Returns:
    The function.
  """
  def run(variables, images):
    recorder = _Recorder()
    out = interception.run_with_provider(model, plan, variables, images, recorder)
    return out, recorder.inputs
  return jax.jit(run)


def relative_deviation(ref, new, skip: Sequence[str] = ()) -> float:
  """The largest max|new - ref| / max|ref| over the output and the recorded layer inputs not in `skip`.

  Args:
    ref: (output, {path: input}) of the reference.
    new: the same of the rescaled variables.
    skip: layer paths whose inputs are expected to change (the B of the pair).

  Returns:
    The deviation.
  """
  (out_r, in_r), (out_n, in_n) = ref, new
  pairs = list(zip(jax.tree.leaves(out_r), jax.tree.leaves(out_n)))
  pairs += [(in_r[p], in_n[p]) for p in in_r if p not in skip]
  dev = 0.0
  for r, n in pairs:
    scale = float(jnp.max(jnp.abs(r)))
    dev = max(dev, float(jnp.max(jnp.abs(n - r))) / max(scale, 1e-30))
  return dev


def find_pairs(model, plan, variables: dict, images, *, tolerance: float = 1e-4, seed: int = 0):
  """The candidate pairs (`candidate_pairs`) whose random positive rescaling preserves the function.

  Each candidate is checked alone, against the unrescaled variables: accepted if the model's
  output and every quantized layer's input but B's move by at most `tolerance` relative to their
  largest magnitude. A layer is the A of at most one pair and the B of at most one.

  Args:
    model: the linen model.
    plan: the QuantPlan.
    variables: the BN-folded variables.
    images: the check images (N, H, W, C).
    tolerance: the relative deviation allowed (float32 rounding is ~1e-6).
    seed: seed of the random scales.

  Returns:
    (accepted pairs, {'A -> B': deviation} of the refused ones).
  """
  run = probe(model, plan)
  ref = run(variables, images)
  rng = np.random.default_rng(seed)
  accepted, refused, used_a, used_b = [], {}, set(), set()
  for pair in candidate_pairs(plan, variables["params"]):
    c = plan.layers[pair.b].in_channels
    s = jnp.asarray(np.exp(rng.uniform(-np.log(CHECK_SCALE), np.log(CHECK_SCALE), c)), jnp.float32)
    rescaled = {**variables, "params": rescale_pair(variables["params"], plan.layers, pair, s)}
    dev = relative_deviation(ref, run(rescaled, images), skip=(pair.b,))
    if dev <= tolerance and pair.a not in used_a and pair.b not in used_b:
      accepted.append(pair)
      used_a.add(pair.a)
      used_b.add(pair.b)
    else:
      refused[f"{pair.a} -> {pair.b}"] = dev
  return accepted, refused


def range_ratio(r) -> float:
  """max / min of the nonzero per-channel ranges (1.0 for none).

  Args:
    r: per-channel ranges.

  Returns:
    The ratio.
  """
  r = np.asarray(r)
  r = r[r > 0]
  return float(r.max() / r.min()) if r.size else 1.0


def pair_ranges(params: dict, layers: dict, pair: Pair) -> tuple[float, float]:
  """(range ratio of A's output channels, range ratio of B's input channels).

  Args:
    params: the params tree.
    layers: {path: LayerInfo}.
    pair: the pair.

  Returns:
    The two ratios (`range_ratio`).
  """
  return (range_ratio(output_ranges(get_path(params, pair.a)["kernel"])),
          range_ratio(input_ranges(get_path(params, pair.b)["kernel"], layers[pair.b])))


def equalize_params(params: dict, layers: dict, pairs: Sequence[Pair], *, max_sweeps: int = 100,
                    tol: float = 1e-4) -> tuple[dict, int, float]:
  """Equalizes every pair, sweeping in order until no scale moves by more than `tol` (|log s|).

  Args:
    params: the params tree.
    layers: {path: LayerInfo}.
    pairs: the pairs, in call order.
    max_sweeps: the sweep limit.
    tol: the convergence threshold on max |log s_i|.

  Returns:
    (equalized params, sweeps done, max |log s_i| of the last sweep).
  """
  sweeps, moved = 0, 0.0
  for sweeps in range(1, max_sweeps + 1):
    moved = 0.0
    for pair in pairs:
      s = equalizing_scales(params, layers, pair)
      params = rescale_pair(params, layers, pair, s)
      moved = max(moved, float(jnp.max(jnp.abs(jnp.log(s)))))
    if moved <= tol:
      break
  return params, sweeps, moved


def equalize(model, plan, variables: dict, images, *, tolerance: float = 1e-4, max_sweeps: int = 100,
             seed: int = 0, pairs: Sequence[Pair] | None = None) -> Equalized:
  """Cross-layer equalization of the BN-folded variables over the pairs `find_pairs` accepts.

  Args:
    model: the linen model.
    plan: the QuantPlan (folded BatchNorms bypassed).
    variables: the BN-folded variables (`plan.fold_batchnorm`); not modified.
    images: the check images.
    tolerance: the function-preservation tolerance of each pair's check and of the result.
    max_sweeps: the sweep limit of `equalize_params`.
    seed: seed of the check's random scales.
    pairs: pairs found before (a saved report's) instead of `find_pairs`; the result is still
      checked against the float output.

  Returns:
    The Equalized variables and report.

  Raises:
    RuntimeError: the equalized model's output deviates by more than `tolerance` on the check
      images (the pairs checked one at a time did not compose).
  """
  images = jnp.asarray(images)
  if pairs is None:
    pairs, refused = find_pairs(model, plan, variables, images, tolerance=tolerance, seed=seed)
  else:
    pairs, refused = list(pairs), {}
  params = variables["params"]
  before = {p: pair_ranges(params, plan.layers, p) for p in pairs}
  params, sweeps, moved = equalize_params(params, plan.layers, pairs, max_sweeps=max_sweeps)
  after = {p: pair_ranges(params, plan.layers, p) for p in pairs}
  out = {**variables, "params": params}
  run = probe(model, plan)
  ref, new = run(variables, images), run(out, images)
  deviation = relative_deviation((ref[0], {}), (new[0], {}))
  if deviation > tolerance:
    raise RuntimeError(f"cross-layer equalization changed the float output by {deviation:.2g} (relative), "
                       f"more than {tolerance:g}")
  ranges = {f"{p.a} -> {p.b}": {"a_before": before[p][0], "a_after": after[p][0], "b_before": before[p][1],
                                "b_after": after[p][1]} for p in pairs}
  return Equalized(out, tuple(pairs), refused, sweeps, moved, ranges, deviation)
