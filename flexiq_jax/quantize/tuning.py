"""Per-layer choice of how the serving form runs each conv, by measurement (as cuDNN autotunes).

The implementations (`integer.CONV_IMPLS`) compute the same integer accumulators, so the choice
changes only the speed: `tune_conv_impls` times each conv under each implementation at the
serving shape, on this backend, and returns the model with the fastest per layer.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import interception
from flexiq_jax.interception import get_path
from flexiq_jax.quantize import integer


def capture_layer_inputs(qmodel, svars, images, ratio: float = 0.0) -> dict:
  """{quantized layer path: (LayerCall, its input)} of the serving form on `images` at `ratio`.

  Args:
    qmodel: the `QuantizedModel` (its plan, accumulator and conv implementations are used).
    svars: its serving variables (`qmodel.prepare`).
    images: an input batch.
    ratio: the 4-bit ratio the model runs at while capturing.

  Returns:
    {path: (LayerCall, input array)} for every quantized layer, in call order.
  """
  counts = qmodel.layer_counts(svars, jnp.float32(ratio))
  inner = integer.IntegerLayers(svars[integer.SERVING_KEY], svars["quant"], counts, qmodel.plan.signed,
                                qmodel.plan.matmul_signed, qmodel.conv_accumulator or "int32", qmodel.conv_impl_map())
  captured = {}

  class Capture:
    def layer(self, call, x):
      captured[call.path] = (call, x)
      return inner.layer(call, x)

    def matmul(self, call, a, b):
      return inner.matmul(call, a, b)

  variables = {k: v for k, v in svars.items() if k in ("params", "batch_stats")}
  interception.run_with_provider(qmodel.model, qmodel.plan, variables, images, Capture())
  return captured


def time_call(fn, args, repeats: int) -> float:
  """Median seconds of `fn(*args)` after one warm-up call.

  Args:
    fn: the function to time (typically jitted; its result is waited for).
    args: its positional arguments.
    repeats: number of timed calls.

  Returns:
    The median wall time of one call, in seconds.
  """
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def conv_impl_times(qmodel, svars, images, repeats: int = 3, impls=integer.TUNED_CONV_IMPLS) -> dict:
  """{conv path: {impl: seconds}} of each quantized conv alone (at ratio 0) on its captured input.

  Implementations `integer.conv_impl_for` would replace (float32 where not exact, int8_widened where
  there is nothing to widen, 'onednn' where its library is unavailable) are not timed. By default
  neither is the opt-in 'onednn' (its fused epilogue may round the last bit of an output
  differently: with the default the tuned logits equal the untuned ones bit for bit).

  Args:
    qmodel: the `QuantizedModel`.
    svars: its serving variables.
    images: the batch whose layer inputs are captured (its shape is the one timed).
    repeats: timed calls per implementation (`time_call`).
    impls: the implementations to time (e.g. `integer.CONV_IMPLS` to include 'onednn').

  Returns:
    {conv path: {implementation: median seconds}}.
  """
  plan = qmodel.plan
  out = {}
  for path, (call, x) in capture_layer_inputs(qmodel, svars, images).items():
    info = plan.layers[path]
    if info.kind != "conv":
      continue
    entry = get_path(svars[integer.SERVING_KEY], path)
    out[path] = {}
    for impl in impls:
      if integer.conv_impl_for(info, plan.signed[path], impl) != impl:
        continue  # not exact in float32 here
      fn = jax.jit(lambda x, e, k, b, call=call, impl=impl, signed=plan.signed[path]: integer.integer_forward(
          dataclasses.replace(call, kernel=k, bias=b), x, e, None, signed=signed, conv_impl=impl))
      out[path][impl] = time_call(fn, (x, entry, call.kernel, call.bias), repeats)
  return out


def tune_conv_impls(qmodel, qvars, images, repeats: int = 3, impls=integer.TUNED_CONV_IMPLS):
  """`qmodel` with conv_impls set to the fastest implementation of each conv at the shape of
  `images` (e.g. a serving batch), and the measured {path: {impl: seconds}}.

  Args:
    qmodel: the `QuantizedModel`.
    qvars: its quantized (or serving) variables.
    images: a batch of the serving shape.
    repeats: timed calls per implementation.
    impls: the implementations to time (`conv_impl_times`); `integer.CONV_IMPLS` adds 'onednn'.

  Returns:
    (tuned QuantizedModel, {conv path: {implementation: seconds}}).
  """
  svars = jax.jit(qmodel.prepare)(qvars)
  times = conv_impl_times(qmodel, svars, images, repeats, impls)
  best = tuple((p, min(t, key=t.get)) for p, t in times.items())
  return dataclasses.replace(qmodel, conv_impls=best), times
