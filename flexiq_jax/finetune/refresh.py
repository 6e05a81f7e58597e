"""The refresh after quantization-aware finetuning: the state that depends on the weights
(weight extraction positions, bias-correction means) re-estimated for the finetuned weights, from
the float forward or from the quantized model's own layer inputs. Above calibrate (whose
statistics it reuses) and quantize (whose forward it runs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flexiq_jax import interception
from flexiq_jax import layer_ops
from flexiq_jax.calibrate import statistics as calib
from flexiq_jax.interception import LayerCall, MatmulCall, get_path
from flexiq_jax.plan import QuantPlan
from flexiq_jax.quantize import transform


class _RecordingQuantized:
  """The provider that runs `inner` (the quantized layers) and records `statistics.statistics`
  of each quantized layer's input: the inputs the quantized model itself produces."""

  def __init__(self, statistics, inner):
    self.statistics, self.inner, self.recorded = statistics, inner, {}

  def layer(self, call: LayerCall, x):
    self.recorded[call.path] = self.statistics.statistics(call.path, interception.flat_features(call.info, x))
    return self.inner.layer(call, x)

  def matmul(self, call: MatmulCall, a, b):
    return self.inner.matmul(call, a, b)


REFRESH_QUANTIZED_RATIOS = (0.5, 1.0)


def collect_quantized(model, plan: QuantPlan, qvars, batches, statistics, ratios=REFRESH_QUANTIZED_RATIOS) -> dict:
  """`collect` on the layer inputs of the quantized model (fake-quant arithmetic: the integer
  path's values) at each of `ratios`, merged over ratios and batches.

  Args:
    model: the float linen model.
    plan: the quantization plan, with signedness.
    qvars: the quantized variables (with 'fill').
    batches: a sequence of image batches (iterated once per ratio).
    statistics: a statistics object with a `statistics(path, x)` method and a `merge` (e.g.
      `calibrate.statistics.CodeHistograms`).
    ratios: the 4-bit ratios the model runs at.

  Returns:
    {layer path: {name: numpy array}}, merged over ratios and batches.

  Raises:
    ValueError: no batches (or no ratios).
    FloatingPointError: non-finite layer inputs in a batch.
  """
  qmodel = transform.QuantizedModel(model, plan, mode="fake")

  def run(qv, images, ratio):
    inner = transform.FlexiQLayers(qv["quant"], qmodel.layer_counts(qv, ratio), plan.signed, "fake", False,
                                   "int32", plan.matmul_signed)
    recording = _RecordingQuantized(statistics, inner)
    variables = {k: v for k, v in qv.items() if k in ("params", "batch_stats")}
    interception.run_with_provider(model, plan, variables, images, recording)
    return recording.recorded

  run = jax.jit(run)
  acc = None
  for ratio in ratios:
    for index, images in enumerate(batches):
      new = jax.device_get(run(qvars, images, jnp.float32(ratio)))
      calib.check_finite(new, index)
      acc = new if acc is None else {p: {k: statistics.merge[k](acc[p][k], v) for k, v in d.items()}
                                     for p, d in new.items()}
  if acc is None:
    raise ValueError("calibration received no batches")
  return acc


def refresh_after_finetuning(model, plan: QuantPlan, qvars, batches, *, extraction: str = "fitted",
                             source: str = "float") -> dict:
  """Re-estimates the state that depends on the weights after quantization-aware finetuning:
  each layer's weight extraction positions (a function of the new weights) and the bias
  correction's mean codes (of the new model's layer inputs on `batches`, at the layer's current
  activation scale and extraction positions). Scales, channel orders and counts stay.

  source: where the layer inputs come from: 'float' the float forward of the finetuned weights
  (the weights were trained through the quantized model, so their float forward can be far from
  what the quantized layers see); 'quantized' the quantized model's own inputs, at ratios
  `REFRESH_QUANTIZED_RATIOS` (the bias correction acts on lowered channels only), merged.

  Args:
    model: the float linen model.
    plan: the quantization plan, with signedness.
    qvars: the finetuned quantized variables.
    batches: unlabelled calibration image batches.
    extraction: 'fitted' refits the weight extraction positions; 'naive' keeps them as they are.
    source: 'float' or 'quantized', as above.

  Returns:
    A shallow copy of `qvars` with a new 'quant': 'weight_e' refitted (with 'fitted') and
    'mean_code' / 'mean_lowered' re-estimated where the layer holds them.

  Raises:
    ValueError: an unknown `extraction` or `source`, or no batches.
    FloatingPointError: non-finite layer inputs in a batch.
  """
  if extraction not in ("fitted", "naive"):
    raise ValueError(f"unknown extraction {extraction!r}; use 'fitted' or 'naive'")
  if source not in ("float", "quantized"):
    raise ValueError(f"unknown refresh source {source!r}; use 'float' or 'quantized'")
  quant = qvars["quant"]
  scales = {p: float(get_path(quant, p)["act_scale"]) for p in plan.quantized}
  zeros = {p: float(layer_ops.act_zero_point(get_path(quant, p))) for p in plan.quantized}
  histograms = calib.CodeHistograms(scales, plan.signed, {p: z for p, z in zeros.items() if z})
  variables = {k: v for k, v in qvars.items() if k in ("params", "batch_stats")}
  if source == "float":
    codes = calib.collect(model, plan, variables, list(batches), histograms)
  else:
    codes = collect_quantized(model, plan, qvars, list(batches), histograms)
  for p in plan.quantized:
    entry = dict(get_path(quant, p))
    kernel = get_path(qvars["params"], p)["kernel"]
    if extraction == "fitted":
      entry["weight_e"] = jnp.asarray(calib.weight_extraction(plan.layers[p], kernel,
                                                              qmax=layer_ops.weight_qmax(entry))[0], jnp.int32)
    if "mean_code" in entry:
      _, mean_code, mean_lowered = calib.code_moments(codes[p]["codes"], entry["act_e"], plan.signed[p], zeros[p])
      entry["mean_code"] = jnp.asarray(mean_code, jnp.float32)
      entry["mean_lowered"] = jnp.asarray(mean_lowered, jnp.float32)
    quant = interception.set_path(quant, p, entry)
  return {**qvars, "quant": quant}
