"""Calibration: statistics of every quantized layer's input on unlabelled images, gathered by
interception (no model code touched), and the 8-bit scales and 4-bit extraction positions fitted
from them.

Streaming passes over the calibration batches, so no activations are kept:
  1. per-input-channel min/max and count of negative values (-> signedness, per-tensor range);
  2. (percentile / MSE only) a histogram of |x| over [0, absmax] -> the activation scale;
  3. per-channel histograms of the 8-bit codes -> the extraction position e_c minimising each
     channel's squared lowering error (exact given the histogram).
Weight extraction positions f_c are fitted on the (BN-folded) weight codes directly.
Activation quantization is symmetric per tensor: unsigned [0, 255] where no calibration input
value is negative (e.g. after ReLU), signed [-128, 127] otherwise. The first pass counts the
negative values per channel, and the plan records them (`QuantPlan.input_negatives`): the sign is
empirical, not proven from the graph. With `act_grid='asymmetric'` a signed input may instead get
an unsigned grid with a zero point (`asymmetric_grid`: one zero point per tensor, a multiple of 16
so that it survives the extraction), where that grid's calibrated error is smaller: inputs whose
negative side is short (after SiLU, GELU, Hardswish) then keep 4-bit levels for their positive
range instead of spending half the 4-bit grid on values that never occur.

The quantized activation x activation matmuls (`plan.quantized_matmuls`: attention's q·kᵀ and
attn·v) get one more pass: the per-tensor min/max of both operands (`OperandRanges`), hence each
operand's signedness (softmax probabilities are >= 0: unsigned [0, 255]) and its 8-bit scale,
always min-max (absmax / qmax) whatever `method` says: the rare large values of these operands
(a peaked attention row, outlier q/k entries) are the ones that matter, and a histogram fit would
clip them. They are never lowered, so they need no code histograms.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import interception
from flexiq_jax import numerics
from flexiq_jax import progress
from flexiq_jax.numerics import weight_grid
from flexiq_jax.interception import LayerCall, MatmulCall, get_path
from flexiq_jax import layer_ops
from flexiq_jax.plan import QuantPlan

EXTRACTION_CANDIDATES = (0, 1, 2, 3, 4)
NAIVE_EXTRACTION = 4  # drop the 4 low bits
ACT_GRIDS = ("symmetric", "asymmetric")
# An asymmetric grid's zero point is a multiple of this, 2^(bits - low bits): every extraction
# position's step divides it (numerics.zero_point_candidates).
ZERO_POINT_STEP = 16


def _add64(a, b):
  return np.add(a, b, dtype=np.int64)


class ChannelRanges:
  """Per-input-channel min, max and number of negative values, and the number of input rows
  (values per channel); the negative counts decide each layer's signedness."""

  merge = {"min": np.minimum, "max": np.maximum, "negatives": _add64, "rows": _add64}

  def statistics(self, path, x):
    # After a ReLU XLA proves `x < 0` false and constant-folds the count of a (rows, C) array of
    # zeros, which takes seconds per layer on CPU; the barrier hides where x came from.
    negative = jax.lax.optimization_barrier(x) < 0
    return {"min": x.min(0), "max": x.max(0), "negatives": jnp.sum(negative, axis=0, dtype=jnp.int32),
            "rows": jnp.asarray(x.shape[0], jnp.int32)}


@dataclasses.dataclass(frozen=True)
class AbsHistograms:
  """A histogram of |x| over [0, absmax[path]] per layer (percentile and MSE ranges)."""

  absmax: dict
  num_bins: int = numerics.DEFAULT_NUM_BINS
  merge = {"hist": np.add}

  def statistics(self, path, x):
    counts = jnp.zeros((self.num_bins,), jnp.int32)
    return {"hist": numerics.histogram_update(counts, jnp.abs(x).reshape(-1), 0.0, self.absmax[path])}


@dataclasses.dataclass(frozen=True)
class CodeHistograms:
  """Per-channel histograms of the 8-bit codes at the calibrated scales (extraction fits).

  `zero_points` {path: z} gives a layer an unsigned grid with zero point z (codes
  clip(round(x / s) + z, 0, 255)); `alternatives` {path: (scale, z)} adds, as 'codes_alt', the
  histogram of the same input on a second, unsigned grid (the asymmetric candidate).
  """

  scales: dict
  signed: dict
  zero_points: dict = dataclasses.field(default_factory=dict)
  alternatives: dict = dataclasses.field(default_factory=dict)
  merge = {"codes": np.add, "codes_alt": np.add}

  def statistics(self, path, x):
    qmin, qmax = numerics.int_range(8, self.signed[path])
    z = self.zero_points.get(path, 0)
    q = jnp.clip(jnp.round(x / self.scales[path]) + z, qmin, qmax)
    out = {"codes": numerics.code_histogram(q, axis=-1, signed=self.signed[path])}
    if path in self.alternatives:
      scale, z = self.alternatives[path]
      q = jnp.clip(jnp.round(x / scale) + z, 0, 255)
      out["codes_alt"] = numerics.code_histogram(q, axis=-1, signed=False)
    return out


class OperandRanges:
  """Per-tensor min and max of both operands of each quantized matmul."""

  merge = {"a_min": np.minimum, "a_max": np.maximum, "b_min": np.minimum, "b_max": np.maximum}

  def matmul_statistics(self, path, a, b):
    return {"a_min": a.min(), "a_max": a.max(), "b_min": b.min(), "b_max": b.max()}


class _Recording:
  """The provider that computes each layer and matmul in float and records, where `statistics`
  has the method, `statistics.statistics(path, x (N, C))` of each layer's input and
  `statistics.matmul_statistics(path, a, b)` of each matmul's operands."""

  def __init__(self, statistics):
    self.statistics, self.recorded = statistics, {}

  def layer(self, call: LayerCall, x):
    if hasattr(self.statistics, "statistics"):
      self.recorded[call.path] = self.statistics.statistics(call.path, interception.flat_features(call.info, x))
    return call.float_forward(x)

  def matmul(self, call: MatmulCall, a, b):
    if hasattr(self.statistics, "matmul_statistics"):
      self.recorded[call.path] = self.statistics.matmul_statistics(call.path, a, b)
    return call.float_forward(a, b)


def collect(model, plan: QuantPlan, variables, batches, statistics) -> dict:
  """Runs `statistics` (ChannelRanges, AbsHistograms, CodeHistograms: a `statistics(path, x)`
  method, or OperandRanges: a `matmul_statistics(path, a, b)` method; and a `merge` {name: fn} of
  batches) over every batch: {path: {name: numpy array}}. One compilation per batch shape.

  Each layer and matmul runs in float (BN-folded), so every layer sees the float model's input.

  Args:
    model: the float linen model.
    plan: the plan (its quantized layers and matmuls are recorded).
    variables: the (BN-folded, where the plan folds) float variables.
    batches: an iterable of image batches.
    statistics: the statistics object, as above.

  Returns:
    {path: {name: numpy array}}, merged over all batches.

  Raises:
    ValueError: `batches` is empty.
    FloatingPointError: a batch gives non-finite statistics (`check_finite`).
  """

  def run(v, images):
    recording = _Recording(statistics)
    interception.run_with_provider(model, plan, v, images, recording)
    return recording.recorded

  run = jax.jit(run)
  acc = None
  total = sum(len(b) for b in batches) if isinstance(batches, (list, tuple)) else None
  for index, images in enumerate(progress.image_batches(batches, desc=f"calibrate ({type(statistics).__name__})",
                                                        total_images=total)):
    new = jax.device_get(run(variables, images))
    check_finite(new, index)
    if acc is None:
      acc = new
    else:
      acc = {p: {k: statistics.merge[k](acc[p][k], v) for k, v in d.items()} for p, d in new.items()}
  if acc is None:
    raise ValueError("calibration received no batches")
  return acc


def check_finite(recorded: dict, batch_index: int) -> None:
  """Calibration statistics from a NaN/Inf activation would give an infinite or NaN scale (and a
  silently broken model), so they are refused, naming the layers.

  Args:
    recorded: one batch's statistics, {path: {name: array}}; only floating-point arrays are checked.
    batch_index: the batch's index, for the message.

  Raises:
    FloatingPointError: a floating-point statistic holds NaN or Inf.
  """
  bad = [path for path, stats in recorded.items()
         if any(np.issubdtype(np.asarray(v).dtype, np.floating) and not np.all(np.isfinite(v))
                for v in stats.values())]
  if bad:
    raise FloatingPointError(
        f"calibration: non-finite activations at the input of layer(s) {', '.join(map(repr, bad))} in "
        f"calibration batch {batch_index}; check the calibration images (data.*) for NaN/Inf pixels and "
        f"the float model's weights. Nothing was saved.")


def _int32(count):
  """A count accumulated in int64, as int32 (saturating) for the statistics tree."""
  return np.minimum(np.asarray(count, np.int64), np.iinfo(np.int32).max).astype(np.int32)


def _act_scale(method, absmax, signed, hist=None, percentile=99.99):
  qmin, qmax = numerics.int_range(8, signed)
  if method == "minmax" or absmax <= 0:
    clip = absmax
  else:
    edges = np.linspace(0.0, absmax, len(hist) + 1)
    if method == "percentile":
      clip = float(numerics.percentile_range_from_histogram(hist, edges, percentile)[1])
    else:
      # |x| histogram: an unsigned grid over [0, clip] has the same step as the signed grid's
      # positive half when signed, so fit with the matching level count.
      clip = float(numerics.mse_range_from_histogram(hist, edges, 8 if not signed else 7, True, False)[1])
  return max(float(clip), numerics.MIN_RANGE) / qmax


def asymmetric_grid(lo: float, hi: float) -> tuple[float, int] | None:
  """The unsigned 8-bit grid over [lo, hi] (lo < 0 < hi) whose zero point survives extraction.

  The zero point z is the smallest multiple of ZERO_POINT_STEP (16) at or above the exact one
  255 * (-lo) / (hi - lo), so the negative end stays covered, and the scale is the smallest that
  covers both ends: max(hi / (255 - z), -lo / z). Real value = (code - z) * scale.

  Args:
    lo: the range's negative end.
    hi: the range's positive end.

  Returns:
    (scale, z), or None where the range is not strictly around zero or z would leave no code
    for the positive side.
  """
  if not (lo < 0.0 < hi):
    return None
  exact = 255.0 * (-lo) / (hi - lo)
  z = ZERO_POINT_STEP * max(1, int(np.ceil(exact / ZERO_POINT_STEP - 1e-9)))
  if z > 255 - ZERO_POINT_STEP:
    return None
  return max(hi / (255 - z), -lo / z, numerics.MIN_RANGE), z


def grid_error(hist, scale: float, signed: bool, candidates=EXTRACTION_CANDIDATES) -> tuple[float, np.ndarray]:
  """A layer's calibrated squared error on one grid, in real units per value: Σ over channels of
  the mean squared lowering error at each channel's best extraction position plus the 8-bit
  rounding error (1/12 of a step squared), times scale². The quantity `act_grid='asymmetric'`
  compares between the symmetric and the asymmetric grid of a signed input.

  Args:
    hist: (C, 256) per-channel code histogram on the grid.
    scale: the grid's step.
    signed: whether the grid is signed.
    candidates: the extraction positions allowed on it.

  Returns:
    (error, act_e): the summed error and the (C,) fitted extraction positions.
  """
  act_e = np.asarray(numerics.fit_extraction_from_histogram(hist, signed=signed, candidates=candidates))
  sq_err, _, _ = code_moments(hist, act_e, signed)
  return float(np.sum(sq_err + 1.0 / 12.0) * scale ** 2), act_e


def code_moments(hist, act_e, signed: bool, zero_point: float = 0.0):
  """From per-channel 8-bit code histograms (C, 256) and extraction positions (C,): the mean
  squared lowering error (code units), and the mean code before and after lowering — the
  expected shift a lowered channel adds to the layer output, which bias correction removes
  (layer_ops). An empty channel gives zeros.

  Args:
    hist: (C, 256) per-channel code histogram (bin k is code qmin + k).
    act_e: (C,) activation extraction positions.
    signed: whether the codes are signed.
    zero_point: the grid's zero point; the means are returned relative to it (code - z, the
      value the GEMM multiplies), so they mean the same on every grid.

  Returns:
    (sq_err, mean_code, mean_lowered): three float64 (C,) numpy arrays, in code units.
  """
  hist = np.asarray(hist, np.float64)
  qmin, _ = numerics.int_range(8, signed)
  code_values = np.arange(hist.shape[1]) + qmin
  lowered = np.asarray(numerics.lower_codes(code_values[None, :].astype(np.float32),
                                            np.asarray(act_e)[:, None], signed=signed))
  counts = np.maximum(hist.sum(1), 1.0)
  sq_err = (hist * (code_values[None, :] - lowered) ** 2).sum(1) / counts
  empty = hist.sum(1) == 0
  mean_code = np.where(empty, 0.0, (hist * code_values[None, :]).sum(1) / counts - zero_point)
  mean_lowered = np.where(empty, 0.0, (hist * lowered).sum(1) / counts - zero_point)
  return sq_err, mean_code, mean_lowered


def weight_extraction(info, kernel, candidates=EXTRACTION_CANDIDATES, qmax=layer_ops.WEIGHT_QMAX):
  """Per feature channel c, the f in `candidates` minimising Σ_o s_w[o]² (q - lower(q, f))² over
  the kernel elements that multiply channel c, with s_w = max |w| / qmax per output channel
  (qmax: a scalar or (O,), `layer_ops.weight_qmax`).

  Args:
    info: the layer.
    kernel: its (BN-folded) float kernel.
    candidates: weight extraction positions to try, ascending (ties go to the first).
    qmax: the code each output channel's max |w| lands on, scalar or (O,).

  Returns:
    (f, error): int32 (C,) positions and float32 (C,) summed squared errors in real units.
  """
  w = interception.kernel_matrix(info, kernel)
  s_w, q = weight_grid.codes_at(w, qmax)
  return weight_grid.fit_weight_shift(q, s_w, layer_ops.weight_channel_index(info), info.in_channels, candidates)


def calibrate(model, plan: QuantPlan, variables, batches: Sequence[np.ndarray], *, method: str = "minmax",
              percentile: float = 99.99, extraction: str = "fitted", weight_scale: str = "max127",
              act_grid: str = "symmetric") -> dict:
  """Returns {path: {name: numpy array}} (`plan.with_signedness` reads the input signs from it).

  Per layer: 'ch_min', 'ch_max' (C,); 'act_scale' (); 'act_e', 'weight_e' (C,) int32;
  'act_lowering_error' (C,) mean squared error per value (real units) at act_e;
  'weight_lowering_error' (C,) summed squared error of the channel's weights at weight_e;
  'act_mean_code', 'act_mean_lowered' (C,) mean 8-bit code and mean lowered code (code units);
  'negative_count' (C,) int32 negative input values per channel and 'input_rows' () int32 the
  values per channel seen (a layer is signed iff it saw a negative value; plan.input_negatives).
  Per quantized matmul: 'a_min', 'a_max', 'b_min', 'b_max' () per-tensor operand ranges and
  'a_scale', 'b_scale' () min-max 8-bit scales (signed where the minimum is negative).
  With `weight_scale` other than 'max127' (`numerics.weight_grid`), also 'weight_qmax' (O,)
  float32: the code each output channel's max |w| lands on (the weight scale is max |w| / it);
  'weight_e' and 'weight_lowering_error' are fitted on that grid.
  With `act_grid='asymmetric'`, also 'act_zero_point' () float32 per layer (0 on a symmetric
  grid) and, for each signed input, 'grid_error_symmetric' / 'grid_error_asymmetric' (`grid_error`;
  the smaller one's grid is taken, `asymmetric_grid`). The mean codes are relative to the zero
  point (`code_moments`).
  `variables` must be BN-folded when the plan folds (see plan.fold_batchnorm).

  Args:
    model: the float linen model.
    plan: the quantization plan (signedness not needed).
    variables: the BN-folded float variables.
    batches: unlabelled image batches; passed over two to four times (three for the layers, one
      more with 'percentile'/'mse', one more for the matmuls).
    method: activation range method, 'minmax', 'percentile' or 'mse'.
    percentile: the percentile of |x| for method 'percentile'.
    extraction: 'fitted' (positions minimising the lowering error) or 'naive' (e = 4 everywhere).
    weight_scale: one of `weight_grid.WEIGHT_SCALE_MODES`.
    act_grid: 'symmetric' (every input on a symmetric grid) or 'asymmetric' (a signed input on
      an unsigned grid with a zero point where that grid's calibrated error is smaller).

  Returns:
    {path: {name: numpy array}} for every quantized layer and matmul, as listed above.

  Raises:
    ValueError: an unknown `method`, `extraction` or `weight_scale`, or no batches.
    FloatingPointError: non-finite activations in a calibration batch.
  """
  if method not in ("minmax", "percentile", "mse"):
    raise ValueError(f"unknown activation calibration {method!r}; use 'minmax', 'percentile' or 'mse'")
  if extraction not in ("fitted", "naive"):
    raise ValueError(f"unknown extraction {extraction!r}; use 'fitted' or 'naive'")
  if weight_scale not in weight_grid.WEIGHT_SCALE_MODES:
    raise ValueError(f"unknown weight_scale {weight_scale!r}; use one of {', '.join(weight_grid.WEIGHT_SCALE_MODES)}")
  if act_grid not in ACT_GRIDS:
    raise ValueError(f"unknown act_grid {act_grid!r}; use one of {', '.join(ACT_GRIDS)}")
  batches = list(batches)
  ranges = collect(model, plan, variables, batches, ChannelRanges())
  absmax = {p: float(max(-r["min"].min(), r["max"].max())) for p, r in ranges.items()}
  signed = {p: bool(np.sum(r["negatives"]) > 0) for p, r in ranges.items()}  # empirical (module docstring)
  hists = {}
  if method != "minmax":
    hists = collect(model, plan, variables, batches, AbsHistograms(absmax))
  scales = {p: _act_scale(method, absmax[p], signed[p], hists.get(p, {}).get("hist"), percentile)
            for p in plan.quantized}
  alternatives = {}
  if act_grid == "asymmetric":
    for p in plan.quantized:
      if signed[p]:  # the positive end: the calibrated maximum, within the method's clip
        hi = min(float(np.max(ranges[p]["max"])), scales[p] * numerics.int_range(8, True)[1])
        if (grid := asymmetric_grid(float(np.min(ranges[p]["min"])), hi)) is not None:
          alternatives[p] = grid
  codes = collect(model, plan, variables, batches, CodeHistograms(scales, signed, {}, alternatives))
  candidates = EXTRACTION_CANDIDATES if extraction == "fitted" else (NAIVE_EXTRACTION,)

  out = {}
  for p in plan.quantized:
    info = plan.layers[p]
    hist = np.asarray(codes[p]["codes"], np.float64)
    act_e = np.asarray(numerics.fit_extraction_from_histogram(hist, signed=signed[p], candidates=candidates))
    scale, layer_signed, zero_point, grid_errors = scales[p], signed[p], 0, {}
    if p in alternatives:
      alt_scale, alt_z = alternatives[p]
      alt_hist = np.asarray(codes[p]["codes_alt"], np.float64)
      sym_error, _ = grid_error(hist, scale, True, candidates)
      alt_error, alt_e = grid_error(alt_hist, alt_scale, False, numerics.zero_point_candidates(alt_z, candidates))
      grid_errors = {"grid_error_symmetric": np.float32(sym_error), "grid_error_asymmetric": np.float32(alt_error)}
      if alt_error < sym_error:
        hist, act_e, scale, layer_signed, zero_point = alt_hist, alt_e, alt_scale, False, alt_z
    sq_err, mean_code, mean_lowered = code_moments(hist, act_e, layer_signed, zero_point)
    act_err = sq_err * scale ** 2

    kernel = get_path(variables["params"], p)["kernel"]
    qmax_w = weight_grid.weight_qmax(weight_scale, interception.kernel_matrix(info, kernel),
                                     layer_ops.weight_channel_index(info), info.in_channels, p in plan.lowerable)
    w_e, w_err = weight_extraction(info, kernel, EXTRACTION_CANDIDATES if extraction == "fitted"
                                   else (NAIVE_EXTRACTION,), qmax_w)
    out[p] = {
        "ch_min": np.asarray(ranges[p]["min"], np.float32), "ch_max": np.asarray(ranges[p]["max"], np.float32),
        "act_scale": np.float32(scale), "act_e": act_e.astype(np.int32),
        "weight_e": np.asarray(w_e, np.int32), "act_lowering_error": act_err.astype(np.float32),
        "weight_lowering_error": np.asarray(w_err, np.float32),
        "act_mean_code": mean_code.astype(np.float32), "act_mean_lowered": mean_lowered.astype(np.float32),
        "negative_count": _int32(ranges[p]["negatives"]), "input_rows": _int32(ranges[p]["rows"]),
    }
    if weight_scale != "max127":
      out[p]["weight_qmax"] = np.asarray(qmax_w, np.float32)
    if act_grid != "symmetric":
      out[p].update(act_zero_point=np.float32(zero_point), **grid_errors)
  out.update(matmul_calibration(model, plan, variables, batches))
  return out


def matmul_calibration(model, plan: QuantPlan, variables, batches) -> dict:
  """{matmul path: 'a_min', 'a_max', 'b_min', 'b_max', 'a_scale', 'b_scale'} (float32 scalars) of
  every quantized matmul: per-tensor min-max ranges of both operands and their 8-bit scales,
  unsigned [0, 255] where an operand's minimum is >= 0, signed [-128, 127] otherwise.

  Args:
    model: the float linen model.
    plan: the quantization plan.
    variables: the BN-folded float variables.
    batches: unlabelled image batches.

  Returns:
    {matmul path: {name: float32 scalar}}; empty if the plan quantizes no matmul.

  Raises:
    ValueError: `batches` is empty (with quantized matmuls).
    FloatingPointError: non-finite operands in a calibration batch.
  """
  if not getattr(plan, "quantized_matmuls", ()):
    return {}
  ranges = collect(model, plan, variables, list(batches), OperandRanges())
  out = {}
  for p in plan.quantized_matmuls:
    r = {k: float(v) for k, v in ranges[p].items()}
    entry = {k: np.float32(v) for k, v in r.items()}
    for op in ("a", "b"):
      lo, hi = r[f"{op}_min"], r[f"{op}_max"]
      entry[f"{op}_scale"] = np.float32(_act_scale("minmax", max(-lo, hi, 0.0), lo < 0))
    out[p] = entry
  return out
