"""Calibration: statistics of every quantized layer's input on unlabelled images, gathered by
interception (no model code touched), and the 8-bit scales and 4-bit extraction positions fitted
from them.

Streaming passes over the calibration batches, so no activations are kept:
  1. per-input-channel min/max (-> signedness, per-tensor range);
  2. (percentile / MSE only) a histogram of |x| over [0, absmax] -> the activation scale;
  3. per-channel histograms of the 8-bit codes -> the extraction position e_c minimising each
     channel's squared lowering error (exact given the histogram).
Weight extraction positions f_c are fitted on the (BN-folded) weight codes directly.
Activation quantization is symmetric per tensor: unsigned [0, 255] where the calibrated minimum is
>= 0 (e.g. after ReLU), signed [-128, 127] otherwise.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import quant
from flexiq_jax.inspect_model import get_path
from flexiq_jax.quantize import layer_ops
from flexiq_jax.quantize.plan import QuantPlan, apply_with_layers

NUM_HIST_BINS = 2048
EXTRACTION_CANDIDATES = (0, 1, 2, 3, 4)
NAIVE_EXTRACTION = 4  # drop the 4 low bits


def _flat(info, x):
  x = layer_ops.as_matrix_input(info, x)
  return x.reshape(-1, x.shape[-1])


def _collect(model, plan: QuantPlan, variables, batches, stat_fn: Callable, combine: dict) -> dict:
  """Runs `stat_fn(path, x2d) -> {name: array}` on each quantized layer's input (N, C) for every
  batch, merging batches with `combine[name](acc, new)`. One compilation per batch shape."""

  def run(v, images):
    stats = {}

    def layer_fn(info, module, x, kernel, bias):
      stats[info.path] = stat_fn(info.path, _flat(info, x))
      return layer_ops.float_forward(info, module, x, kernel, bias)

    apply_with_layers(model, plan, v, images, layer_fn)
    return stats

  run = jax.jit(run)
  acc = None
  for images in batches:
    new = jax.device_get(run(variables, images))
    if acc is None:
      acc = new
    else:
      acc = {p: {k: combine[k](acc[p][k], v) for k, v in d.items()} for p, d in new.items()}
  if acc is None:
    raise ValueError("calibration received no batches")
  return acc


def _act_scale(method, absmax, signed, hist=None, percentile=99.99):
  qmin, qmax = quant.int_range(8, signed)
  if method == "minmax" or absmax <= 0:
    clip = absmax
  else:
    edges = np.linspace(0.0, absmax, NUM_HIST_BINS + 1)
    if method == "percentile":
      clip = float(quant.percentile_range_from_histogram(hist, edges, percentile)[1])
    else:
      # |x| histogram: an unsigned grid over [0, clip] has the same step as the signed grid's
      # positive half when signed, so fit with the matching level count.
      clip = float(quant.mse_range_from_histogram(hist, edges, 8 if not signed else 7, True, False)[1])
  return max(float(clip), 1e-8) / qmax


def weight_extraction(info, kernel, candidates=EXTRACTION_CANDIDATES):
  """Per feature channel c, the f in `candidates` minimising Σ_o s_w[o]² (q - lower(q, f))² over
  the kernel elements that multiply channel c; returns (f (C,), error (C,) in real units)."""
  w = layer_ops.kernel_matrix(info, kernel)
  s_w = layer_ops.weight_scale(info, kernel)
  q = jnp.clip(jnp.round(w / s_w), -layer_ops.WEIGHT_QMAX, layer_ops.WEIGHT_QMAX)
  index = layer_ops.weight_channel_index(info)
  index = jnp.broadcast_to(index, q.shape)
  errors = []
  for f in candidates:
    err = (q - quant.lower_codes(q, f, signed=True)) ** 2 * s_w ** 2
    errors.append(jax.ops.segment_sum(err.reshape(-1), index.reshape(-1), num_segments=info.in_channels))
  errors = jnp.stack(errors)  # (len(candidates), C)
  best = jnp.argmin(errors, axis=0)
  return jnp.asarray(candidates)[best], jnp.min(errors, axis=0)


def calibrate(model, plan: QuantPlan, variables, batches: Sequence[np.ndarray], *, method: str = "minmax",
              percentile: float = 99.99, extraction: str = "fitted") -> dict:
  """Returns {path: {name: numpy array}} and fills `plan.signed`.

  Per layer: 'ch_min', 'ch_max' (C,); 'act_scale' (); 'act_e', 'weight_e' (C,) int32;
  'act_lowering_error' (C,) mean squared error per value (real units) at act_e;
  'weight_lowering_error' (C,) summed squared error of the channel's weights at weight_e;
  'act_mean_code', 'act_mean_lowered' (C,) mean 8-bit code and mean lowered code (code units).
  `variables` must be BN-folded when the plan folds (see plan.fold_batchnorm).
  """
  if method not in ("minmax", "percentile", "mse"):
    raise ValueError(f"unknown activation calibration {method!r}; use 'minmax', 'percentile' or 'mse'")
  if extraction not in ("fitted", "naive"):
    raise ValueError(f"unknown extraction {extraction!r}; use 'fitted' or 'naive'")
  batches = list(batches)
  ranges = _collect(model, plan, variables, batches, lambda p, x: {"min": x.min(0), "max": x.max(0)},
                    {"min": np.minimum, "max": np.maximum})
  absmax = {p: float(max(-r["min"].min(), r["max"].max())) for p, r in ranges.items()}
  plan.signed = {p: bool(r["min"].min() < 0) for p, r in ranges.items()}

  hists = {}
  if method != "minmax":
    edges_max = {p: max(a, 1e-8) for p, a in absmax.items()}

    def abs_hist(p, x):
      idx = jnp.clip((jnp.abs(x) / edges_max[p] * NUM_HIST_BINS).astype(jnp.int32), 0, NUM_HIST_BINS - 1)
      return {"hist": jnp.bincount(idx.reshape(-1), length=NUM_HIST_BINS)}

    hists = _collect(model, plan, variables, batches, abs_hist, {"hist": np.add})
  scales = {p: _act_scale(method, absmax[p], plan.signed[p], hists.get(p, {}).get("hist"), percentile)
            for p in plan.quantized}

  def code_hist(p, x):
    qmin, qmax = quant.int_range(8, plan.signed[p])
    q = jnp.clip(jnp.round(x / scales[p]), qmin, qmax)
    return {"codes": quant.code_histogram(q, axis=-1, signed=plan.signed[p])}

  codes = _collect(model, plan, variables, batches, code_hist, {"codes": np.add})

  out = {}
  for p in plan.quantized:
    info = plan.layers[p]
    hist = np.asarray(codes[p]["codes"], np.float64)
    if extraction == "fitted":
      act_e = np.asarray(quant.fit_extraction_from_histogram(hist, signed=plan.signed[p],
                                                             candidates=EXTRACTION_CANDIDATES))
    else:
      act_e = np.full(info.in_channels, NAIVE_EXTRACTION)
    qmin, _ = quant.int_range(8, plan.signed[p])
    code_values = np.arange(hist.shape[1]) + qmin
    lowered = np.asarray(quant.lower_codes(code_values[None, :].astype(np.float32),
                                           act_e[:, None], signed=plan.signed[p]))
    counts = np.maximum(hist.sum(1), 1.0)
    act_err = (hist * (code_values[None, :] - lowered) ** 2).sum(1) / counts * scales[p] ** 2
    # Mean code before and after lowering: the expected shift a lowered channel adds to the
    # layer output, which bias correction removes (quantize.layer_ops).
    mean_code = (hist * code_values[None, :]).sum(1) / counts
    mean_lowered = (hist * lowered).sum(1) / counts

    kernel = get_path(variables["params"], p)["kernel"]
    if extraction == "fitted":
      w_e, w_err = weight_extraction(info, kernel)
    else:
      w_e, w_err = weight_extraction(info, kernel, (NAIVE_EXTRACTION,))
    out[p] = {
        "ch_min": np.asarray(ranges[p]["min"], np.float32), "ch_max": np.asarray(ranges[p]["max"], np.float32),
        "act_scale": np.float32(scales[p]), "act_e": act_e.astype(np.int32),
        "weight_e": np.asarray(w_e, np.int32), "act_lowering_error": act_err.astype(np.float32),
        "weight_lowering_error": np.asarray(w_err, np.float32),
        "act_mean_code": mean_code.astype(np.float32), "act_mean_lowered": mean_lowered.astype(np.float32),
    }
  return out
