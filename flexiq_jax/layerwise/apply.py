"""Layer-wise quantized apply: each quantized layer at its own (weight bits, activation bits),
with the bits as *data* so one compiled function evaluates every configuration.

Fake quantization in float: symmetric per-output-channel weights on the narrow grid
[-(2^(b-1)-1), 2^(b-1)-1]; per-tensor symmetric activations, unsigned [0, 2^b-1] where the
calibrated input is non-negative (plan.signed False), signed [-2^(b-1), 2^(b-1)-1] otherwise.
Clipping ranges come from tables indexed by the traced bit width (0..16): min-max (the same for
every width) or MSE-fitted per width (activations from an |x| histogram of the calibration
images, weights per output channel with `quant.mse_range`). Bits 0 = float (the layer's input or
weight passes through unchanged).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import quant
from flexiq_jax.inspect_model import get_path
from flexiq_jax.quantize import layer_ops
from flexiq_jax.quantize.plan import QuantPlan, apply_with_layers

MAX_BITS = 16
NUM_HIST_BINS = 2048


def _pow2(bits):
  return jnp.exp2(jnp.maximum(bits, 2).astype(jnp.float32))


def act_qrange(bits, signed: bool):
  """(qmin, qmax) of a traced activation bit width."""
  if signed:
    half = _pow2(bits) / 2
    return -half, half - 1
  return jnp.float32(0.0), _pow2(bits) - 1


def weight_qmax(bits):
  return _pow2(bits) / 2 - 1


def fake_quant_act(x, clip, bits, signed: bool):
  qmin, qmax = act_qrange(bits, signed)
  # The unsigned grid spans [0, clip] with qmax steps; the signed one [-clip, clip] with qmax steps.
  scale = jnp.maximum(clip, 1e-8) / qmax
  return jnp.clip(jnp.round(x / scale), qmin, qmax) * scale


def fake_quant_weight(w, clip, bits):
  """w (..., O), clip (O,): symmetric per output channel."""
  qmax = weight_qmax(bits)
  scale = jnp.maximum(clip, 1e-8) / qmax
  return jnp.clip(jnp.round(w / scale), -qmax, qmax) * scale


def _act_histograms(model, plan: QuantPlan, folded, batches, absmax: dict) -> dict:
  """|x| histograms of every quantized layer's input over [0, absmax], summed over batches."""

  def run(v, images):
    hists = {}

    def layer_fn(info, module, x, kernel, bias):
      a = max(absmax[info.path], 1e-8)
      idx = jnp.clip((jnp.abs(x) / a * NUM_HIST_BINS).astype(jnp.int32), 0, NUM_HIST_BINS - 1)
      hists[info.path] = jnp.bincount(idx.reshape(-1), length=NUM_HIST_BINS)
      return layer_ops.float_forward(info, module, x, kernel, bias)

    apply_with_layers(model, plan, v, images, layer_fn)
    return hists

  run = jax.jit(run)
  total = None
  for images in batches:
    h = jax.device_get(run(folded, images))
    total = h if total is None else {p: total[p] + h[p] for p in h}
  return total


def build_tables(model, plan: QuantPlan, folded, calib: dict, *, act_method: str = "minmax",
                 weight_method: str = "minmax", bits: Sequence[int] = (4, 8), batches=None) -> dict:
  """{path: {'act_clip': (17,), 'weight_clip': (17, O)}} clipping ranges indexed by bit width.

  Min-max entries are the calibrated |x| max (from calib ch_min/ch_max) and the per-output-channel
  |w| max; 'mse' fits the ranges for each width in `bits` (other widths keep min-max). Activation
  MSE needs the calibration `batches`.
  """
  for m in (act_method, weight_method):
    if m not in ("minmax", "mse"):
      raise ValueError(f"unknown range method {m!r}; use 'minmax' or 'mse'")
  absmax = {p: float(max(-np.min(calib[p]["ch_min"]), np.max(calib[p]["ch_max"]), 0.0)) for p in plan.quantized}
  hists = None
  if act_method == "mse":
    if batches is None:
      raise ValueError("MSE activation ranges need calibration batches")
    hists = _act_histograms(model, plan, folded, batches, absmax)
  tables = {}
  for p in plan.quantized:
    info = plan.layers[p]
    act_clip = np.full(MAX_BITS + 1, absmax[p], np.float32)
    w = np.asarray(layer_ops.kernel_matrix(info, get_path(folded["params"], p)["kernel"]))
    w2 = w.reshape(-1, w.shape[-1])
    w_absmax = np.abs(w2).max(0)
    w_clip = np.tile(w_absmax[None], (MAX_BITS + 1, 1)).astype(np.float32)
    for b in bits:
      if hists is not None and absmax[p] > 0:
        edges = np.linspace(0.0, absmax[p], NUM_HIST_BINS + 1)
        # An unsigned b-bit grid over [0, clip] has the step of the signed grid's positive half
        # at b+1 bits, so a signed input is fitted as unsigned with one bit less.
        fit_bits = b if not plan.signed[p] else b - 1
        act_clip[b] = float(quant.mse_range_from_histogram(np.asarray(hists[p], np.float64), edges,
                                                           fit_bits, True, False)[1])
      if weight_method == "mse":
        lo, hi = quant.mse_range(jnp.asarray(w2), b, symmetric=True, signed=True, axis=-1)
        w_clip[b] = np.maximum(np.abs(np.asarray(lo)), np.abs(np.asarray(hi)))  # symmetric extent
    tables[p] = {"act_clip": jnp.asarray(act_clip), "weight_clip": jnp.asarray(w_clip)}
  return tables


def make_apply(model, plan: QuantPlan):
  """apply(folded_variables, tables, weight_bits (L,), act_bits (L,), x) -> logits, where L
  runs over plan.quantized; bits are int32 arrays (0 = float), traced: jit once, evaluate any
  configuration."""
  index = {p: i for i, p in enumerate(plan.quantized)}

  def apply(variables, tables, weight_bits, act_bits, x):
    def layer_fn(info, module, h, kernel, bias):
      i = index[info.path]
      wb, ab = weight_bits[i], act_bits[i]
      t = tables[info.path]
      hq = fake_quant_act(h, t["act_clip"][ab], ab, plan.signed[info.path])
      h = jnp.where(ab > 0, hq, h)
      wm = layer_ops.kernel_matrix(info, kernel)
      wq = fake_quant_weight(wm, t["weight_clip"][wb], wb)
      wm = jnp.where(wb > 0, wq, wm)
      return layer_ops.float_forward(info, module, h, wm.reshape(kernel.shape), bias)

    return apply_with_layers(model, plan, variables, x, layer_fn)

  return apply


def bits_arrays(plan: QuantPlan, assignment: dict, default=(0, 0)):
  """{path: Candidate or (w, a)} -> (weight_bits, act_bits) int32 arrays over plan.quantized."""
  w, a = [], []
  for p in plan.quantized:
    c = assignment.get(p, default)
    wb, ab = (c.weight_bits, c.act_bits) if hasattr(c, "weight_bits") else c
    w.append(wb)
    a.append(ab)
  return jnp.asarray(w, jnp.int32), jnp.asarray(a, jnp.int32)


def sqnr_db(reference, test) -> float:
  """10 log10(Σ ref² / Σ (ref - test)²) over the whole output."""
  ref = np.asarray(reference, np.float64)
  err = np.sum((ref - np.asarray(test, np.float64)) ** 2)
  return float(10 * np.log10(np.sum(ref ** 2) / max(err, 1e-30)))
