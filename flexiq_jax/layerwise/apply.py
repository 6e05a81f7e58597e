"""Layer-wise quantized apply: each quantized layer at its own (weight bits, activation bits),
with the bits as *data* so one compiled function evaluates every configuration.

Fake quantization in float: symmetric per-output-channel weights on the narrow grid
[-(2^(b-1)-1), 2^(b-1)-1]; per-tensor symmetric activations, unsigned [0, 2^b-1] where the
calibrated input is non-negative (plan.signed False), signed [-2^(b-1), 2^(b-1)-1] otherwise.
Clipping ranges come from tables indexed by the traced bit width (0..16): min-max (the same for
every width) or MSE-fitted per width (activations from an |x| histogram of the calibration
images, weights per output channel on the narrow grid they are applied on). Bits 0 = float (the
layer's input or weight passes through unchanged). `make_recalibrate` recomputes the min-max
activation ranges with the model quantized at given bits, as AIMET recomputes its encodings.

The activation grid follows `quant.act_grid` as FlexiQ's does: a layer the calibration put on the
asymmetric grid (its statistics' 'act_zero_point' > 0, `calibrate.asymmetric_grid`) has its input
quantized here on an asymmetric grid at every width b, as standard asymmetric quantizers
(TFLite, PyTorch) do: unsigned codes [0, 2^b-1], the step s_b = (hi - lo) / (2^b-1) over the
calibrated range [lo, hi] and the zero point z_b = round(-lo / s_b), real value (q - z_b)·s_b. The
tables hold the range's width hi - lo as 'act_clip' and z_b as 'act_zero', both indexed by width
(so the width stays traced); with MSE ranges lo stays at the calibrated minimum and hi is fitted
per width (`fit_high_end`). These baselines extract no bits, so z_b needs no multiple of 16
(FlexiQ's 8-bit zero point does, to survive the extraction). Every other layer keeps the
symmetric grid above, computed exactly as without the asymmetric grid.

The activation x activation matmuls (attention's q·kᵀ and attn·v, `plan.quantized_matmuls`: all
of them with quant.attention='int8', none with 'float') are not groups of this search: they run at
8 bits in every configuration (all-float bits included) exactly as in FlexiQ's model
(`LayerwiseBits.matmul` calls `layer_ops.quantized_matmul` in fake mode with the calibrated
per-tensor scales the tables carry and the plan's `matmul_signed`), never recalibrated or learnt.
The comparison counts them at 8 x 8 bits in every method's BOPs (compare.baselines.relative_bops).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import calibrate
from flexiq_jax import interception
from flexiq_jax import layer_ops
from flexiq_jax import numerics
from flexiq_jax.interception import LayerCall, MatmulCall, get_path
from flexiq_jax.plan import QuantPlan

MAX_BITS = 16
# The fingerprint entry of the results that run a plan's quantized matmuls at 8 bits
# (`matmul_fingerprint`): the layer-wise search's cached phases and the compare baselines' rows.
# Results cached without it ran those matmuls in float, so they are computed again.
MATMULS_8BIT = {"baseline_attention_matmuls": "int8, FlexiQ's calibrated per-tensor scales"}


def matmul_fingerprint(plan: QuantPlan) -> dict:
  """The fingerprint entry of a result that runs `plan`'s quantized matmuls at 8 bits.

  Args:
    plan: The QuantPlan.

  Returns:
    MATMULS_8BIT where the plan quantizes a matmul; {} where it quantizes none (a model without
    attention matmuls, or quant.attention='float'), whose results are those of float matmuls.
  """
  return dict(MATMULS_8BIT) if getattr(plan, "quantized_matmuls", ()) else {}


def matmul_tables(plan: QuantPlan, tables: dict) -> dict:
  """The tables' entries of the plan's quantized matmuls.

  Args:
    plan: The QuantPlan.
    tables: Tables from `build_tables`.

  Returns:
    {matmul path: {'a_scale', 'b_scale'}} over plan.quantized_matmuls.
  """
  return {p: tables[p] for p in getattr(plan, "quantized_matmuls", ())}


# The fingerprint entry of the baselines' results where the calibration put a layer on the
# asymmetric grid (`act_grid_fingerprint`): results cached when the baselines quantized such a
# layer's input unsigned from 0 (its negative values clipped) are computed again.
ASYMMETRIC_INPUTS = {"baseline_act_grid": "asymmetric inputs: unsigned, zero point per width"}


def asymmetric_layers(plan: QuantPlan) -> tuple[str, ...]:
  """The quantized layers the calibration put on the asymmetric grid: unsigned codes although
  their calibrated input has negative values (`plan.with_signedness`).

  Args:
    plan: The QuantPlan, with its signedness from the calibration statistics.

  Returns:
    Their paths, in plan.quantized order.
  """
  negatives = getattr(plan, "input_negatives", None) or {}
  return tuple(p for p in plan.quantized
               if not plan.signed.get(p, True) and negatives.get(p, {}).get("negative_count", 0) > 0)


def act_grid_fingerprint(plan: QuantPlan) -> dict:
  """The fingerprint entry of a baseline's result on `plan`'s activation grids.

  Args:
    plan: The QuantPlan.

  Returns:
    ASYMMETRIC_INPUTS where a layer is on the asymmetric grid (`asymmetric_layers`); {} where
    none is (every calibration with quant.act_grid='symmetric'), whose results are unchanged.
  """
  return dict(ASYMMETRIC_INPUTS) if asymmetric_layers(plan) else {}


def asymmetric_range(stats: dict) -> tuple[float, float] | None:
  """A layer's calibrated input range [lo, hi] where the calibration put it on the asymmetric grid.

  Args:
    stats: The layer's calibration statistics ('ch_min', 'ch_max', and 'act_zero_point' with
      quant.act_grid='asymmetric').

  Returns:
    (lo, hi) widened to contain 0, or None for a layer on a symmetric grid ('act_zero_point'
    absent or 0).
  """
  if not float(stats.get("act_zero_point", 0.0)) > 0:
    return None
  return min(float(np.min(stats["ch_min"])), 0.0), max(float(np.max(stats["ch_max"])), 0.0)


def asymmetric_zero_points(lo, width, xp=np):
  """Zero points z_b = clip(round(-lo / s_b), 0, 2^b - 1), s_b = width_b / (2^b - 1), for every
  width b = 0..MAX_BITS (below 2 as 2, as the traced quantizers), the step computed exactly as
  `fake_quant_asymmetric_traced_bits` computes it.

  Args:
    lo: The range's lower end (<= 0), a scalar.
    width: (MAX_BITS + 1,) the range's width hi - lo per bit width.
    xp: numpy or jax.numpy.

  Returns:
    (MAX_BITS + 1,) float32 zero points.
  """
  qmax = xp.exp2(xp.maximum(xp.arange(MAX_BITS + 1), 2).astype(xp.float32)) - 1
  scale = xp.maximum(xp.asarray(width, xp.float32), xp.float32(numerics.MIN_RANGE)) / qmax
  return xp.clip(xp.round(-xp.asarray(lo, xp.float32) / scale), 0, qmax).astype(xp.float32)


def fake_quant_asymmetric_traced_bits(x, width, zero_point, bits):
  """Asymmetric per-tensor fake quant with a traced bit width: unsigned codes
  clip(round(x / s) + z, 0, 2^b - 1), real value (code - z)·s, s = width / (2^b - 1).

  Args:
    x: Real values.
    width: The range's width hi - lo (the step is width / (2^b - 1)).
    zero_point: z, a float holding an integer (`asymmetric_zero_points`).
    bits: Bit width, possibly traced (below 2 acts as 2).

  Returns:
    The fake-quantized values, shaped as `x`.
  """
  _, qmax = numerics.traced_int_range(bits, False)
  scale = jnp.maximum(width, numerics.MIN_RANGE) / qmax
  return (jnp.clip(jnp.round(x / scale) + zero_point, 0.0, qmax) - zero_point) * scale


def fake_quant_input(table: dict, x, bits, signed: bool):
  """A layer input fake-quantized at `bits` with its table: on the asymmetric grid where the table
  has 'act_zero' (`fake_quant_asymmetric_traced_bits`), else on the symmetric grid over
  'act_clip' (`numerics.fake_quant_traced_bits`).

  Args:
    table: The layer's entry of `build_tables` ('act_clip', and 'act_zero' on the asymmetric grid).
    x: The layer's input.
    bits: Activation bit width, possibly traced.
    signed: plan.signed of the layer (the symmetric grid's sign).

  Returns:
    The fake-quantized input, shaped as `x`.
  """
  if "act_zero" in table:
    return fake_quant_asymmetric_traced_bits(x, table["act_clip"][bits], table["act_zero"][bits], bits)
  return numerics.fake_quant_traced_bits(x, table["act_clip"][bits], bits, signed)


def fit_high_end(counts, lo: float, hi: float, bits: int, num_candidates: int = 100) -> float:
  """The high end alpha·hi (alpha in `numerics.shrink_factors`) minimising the squared error of the
  asymmetric `bits`-bit grid over [lo, alpha·hi] on a histogram over [lo, hi], lo kept: the MSE
  range of an input on the asymmetric grid, whose short negative side stays covered as FlexiQ's
  grid covers it. Each bin's values are taken at its centre; ties go to the largest alpha.

  Args:
    counts: (B,) histogram of the input over B equal bins of [lo, hi].
    lo: The calibrated minimum (< 0), kept.
    hi: The calibrated maximum (> 0).
    bits: The code width.
    num_candidates: The number of shrink factors tried.

  Returns:
    The fitted high end, a float in (0, hi].
  """
  counts = np.asarray(counts, np.float64)
  edges = np.linspace(lo, hi, len(counts) + 1)
  centres = 0.5 * (edges[1:] + edges[:-1])
  his = np.asarray(numerics.shrink_factors(num_candidates), np.float64) * hi
  qmax = 2.0 ** bits - 1
  scale = np.maximum(his - lo, numerics.MIN_RANGE)[:, None] / qmax
  zero = np.clip(np.round(-lo / scale), 0, qmax)
  values = (np.clip(np.round(centres[None] / scale) + zero, 0, qmax) - zero) * scale
  errors = ((values - centres[None]) ** 2) @ counts
  return float(his[num_candidates - 1 - np.argmin(errors[::-1])])


@dataclasses.dataclass(frozen=True)
class RangeHistograms:
  """A histogram of x over [lo, hi] for the layers in `ranges` {path: (lo, hi)} (nothing for the
  others): `calibrate.collect` statistics for the MSE ranges of the asymmetric grid."""

  ranges: dict
  num_bins: int = numerics.DEFAULT_NUM_BINS
  merge = {"hist": np.add}

  def statistics(self, path, x):
    if path not in self.ranges:
      return {}
    lo, hi = self.ranges[path]
    counts = jnp.zeros((self.num_bins,), jnp.int32)
    return {"hist": numerics.histogram_update(counts, x.reshape(-1), lo, hi)}


def build_tables(model, plan: QuantPlan, folded, calib: dict, *, act_method: str = "minmax",
                 weight_method: str = "minmax", bits: Sequence[int] = (4, 8), batches=None) -> dict:
  """{path: {'act_clip': (17,), 'weight_clip': (17, O)}} clipping ranges indexed by bit width
(and 'act_zero' (17,) for a layer on the asymmetric grid), and {matmul path: {'a_scale',
'b_scale'}} for every quantized matmul.

  Min-max entries are the calibrated |x| max (from calib ch_min/ch_max) and the per-output-channel
  |w| max; 'mse' fits the ranges for each width in `bits` (other widths keep min-max). Activation
  MSE needs the calibration `batches`. A layer the calibration put on the asymmetric grid
  (`asymmetric_range`: its 'act_zero_point' > 0) gets instead 'act_clip' = hi - lo, the width of
  its calibrated range [lo, hi] (with 'mse', hi fitted per width and lo kept: `fit_high_end`), and
  'act_zero' the zero point at each width (`asymmetric_zero_points`). A matmul's entry holds the
  8-bit operand scales of the calibration (`calibrate.matmul_calibration`), the very scales
  FlexiQ's qvars hold.

  Args:
    model: The float Flax model.
    plan: The QuantPlan; its `quantized` layers and `quantized_matmuls` get tables.
    folded: The model's folded variables (weights read from folded['params']).
    calib: Calibration statistics {path: {'ch_min', 'ch_max', ('act_zero_point',) ...}; matmul path:
      {'a_scale', 'b_scale', ...}}.
    act_method: 'minmax' or 'mse' for the activation ranges.
    weight_method: 'minmax' or 'mse' for the weight ranges.
    bits: Bit widths that 'mse' fits.
    batches: Calibration image batches; required when act_method is 'mse'.

  Returns:
    A dict {path: {'act_clip': (MAX_BITS + 1,) float32, 'weight_clip': (MAX_BITS + 1, O) float32}}
    of jax arrays ('act_zero': (MAX_BITS + 1,) float32 too on the asymmetric grid), and {matmul
    path: {'a_scale': () float32, 'b_scale': () float32}}.

  Raises:
    ValueError: If a range method is unknown, or act_method is 'mse' without `batches`.
  """
  for m in (act_method, weight_method):
    if m not in ("minmax", "mse"):
      raise ValueError(f"unknown range method {m!r}; use 'minmax' or 'mse'")
  absmax = {p: float(max(-np.min(calib[p]["ch_min"]), np.max(calib[p]["ch_max"]), 0.0)) for p in plan.quantized}
  hists = None
  if act_method == "mse":
    if batches is None:
      raise ValueError("MSE activation ranges need calibration batches")
    hists = calibrate.collect(model, plan, folded, batches, calibrate.AbsHistograms(absmax))
  asym = {p: r for p in plan.quantized if (r := asymmetric_range(calib[p])) is not None}
  asym_hists = None
  if asym and act_method == "mse":
    asym_hists = calibrate.collect(model, plan, folded, batches, RangeHistograms(asym))
  tables = {}
  for p in plan.quantized:
    info = plan.layers[p]
    act_clip = np.full(MAX_BITS + 1, absmax[p], np.float32)
    if p in asym:
      lo, hi = asym[p]
      act_clip = np.full(MAX_BITS + 1, hi - lo, np.float32)
    w = np.asarray(interception.kernel_matrix(info, get_path(folded["params"], p)["kernel"]))
    w2 = w.reshape(-1, w.shape[-1])
    w_absmax = np.abs(w2).max(0)
    w_clip = np.tile(w_absmax[None], (MAX_BITS + 1, 1)).astype(np.float32)
    for b in bits:
      if p in asym:
        if asym_hists is not None:
          act_clip[b] = fit_high_end(asym_hists[p]["hist"], lo, hi, b) - lo
      elif hists is not None and absmax[p] > 0:
        hist = np.asarray(hists[p]["hist"], np.float64)
        edges = np.linspace(0.0, absmax[p], len(hist) + 1)
        # An unsigned b-bit grid over [0, clip] has the step of the signed grid's positive half
        # at b+1 bits, so a signed input is fitted as unsigned with one bit less.
        fit_bits = b if not plan.signed[p] else b - 1
        act_clip[b] = float(numerics.mse_range_from_histogram(hist, edges,
                                                           fit_bits, True, False)[1])
      if weight_method == "mse":
        w_clip[b] = np.asarray(narrow_mse_clip(jnp.asarray(w2), b))
    tables[p] = {"act_clip": jnp.asarray(act_clip), "weight_clip": jnp.asarray(w_clip)}
    if p in asym:
      tables[p]["act_zero"] = jnp.asarray(asymmetric_zero_points(lo, act_clip))
  for p in getattr(plan, "quantized_matmuls", ()):
    tables[p] = {k: jnp.asarray(calib[p][k], jnp.float32) for k in ("a_scale", "b_scale")}
  return tables


def narrow_mse_clip(w, bits: int, num_candidates: int = 100):
  """Per output channel of w (..., O): the clip alpha * max|w| minimising the squared error of
  `fake_quant_weight_traced_bits` (the narrow grid [-(2^(b-1)-1), 2^(b-1)-1] it is applied
  on); ties go to the largest alpha.

  Args:
    w: Weight array (..., O); flattened to (N, O).
    bits: Weight bit width (may be traced).
    num_candidates: Number of shrink factors alpha tried (`numerics.shrink_factors`).

  Returns:
    The clip per output channel, an (O,) jax array.
  """
  w = w.reshape(-1, w.shape[-1])
  absmax = jnp.abs(w).max(0)
  alphas = numerics.shrink_factors(num_candidates)
  errors = jax.lax.map(lambda a: jnp.sum((numerics.fake_quant_weight_traced_bits(w, a * absmax, bits) - w) ** 2, 0),
                       alphas)  # (K, O)
  best = num_candidates - 1 - jnp.argmin(errors[::-1], axis=0)
  return alphas[best] * absmax


@dataclasses.dataclass(frozen=True)
class LayerwiseBits:
  """The provider of layer-wise fake quantization: layer i of plan.quantized at weight_bits[i] x
  act_bits[i] (traced; 0 = float) with the clipping ranges of `tables` at that width (its input on
  the asymmetric grid where its table has 'act_zero', `fake_quant_input`). The matmuls
  routed to it (plan.quantized_matmuls: q·kᵀ, attn·v) run at 8 bits whatever the bits, as FlexiQ
  runs them (`layer_ops.quantized_matmul`, fake, with the tables' calibrated scales)."""

  tables: dict
  weight_bits: jnp.ndarray  # (L,) int32
  act_bits: jnp.ndarray  # (L,) int32
  index: dict  # {path: i}
  signed: dict  # {path: bool}
  matmul_signed: dict  # {matmul path: (a signed, b signed)}: plan.matmul_signed

  def layer(self, call: LayerCall, x):
    i = self.index[call.path]
    wb, ab = self.weight_bits[i], self.act_bits[i]
    t = self.tables[call.path]
    xq = fake_quant_input(t, x, ab, self.signed[call.path])
    x = jnp.where(ab > 0, xq, x)
    wm = interception.kernel_matrix(call.info, call.kernel)
    wq = numerics.fake_quant_weight_traced_bits(wm, t["weight_clip"][wb], wb)
    wm = jnp.where(wb > 0, wq, wm)
    return call.float_forward(x, wm.reshape(call.kernel.shape))

  def matmul(self, call: MatmulCall, a, b):
    return layer_ops.quantized_matmul(call, a, b, self.tables[call.path], signed=self.matmul_signed[call.path],
                                      mode="fake")


def make_apply(model, plan: QuantPlan):
  """apply(folded_variables, tables, weight_bits (L,), act_bits (L,), x) -> logits, where L
  runs over plan.quantized; bits are int32 arrays (0 = float), traced: jit once, evaluate any
  configuration. The plan's quantized matmuls run at 8 bits in every configuration.

  Args:
    model: The float Flax model.
    plan: The QuantPlan whose `quantized` layers the bit arrays index.

  Returns:
    The apply function described above.
  """
  index = {p: i for i, p in enumerate(plan.quantized)}

  def apply(variables, tables, weight_bits, act_bits, x):
    provider = LayerwiseBits(tables, weight_bits, act_bits, index, plan.signed, plan.matmul_signed)
    return interception.run_with_provider(model, plan, variables, x, provider)

  return apply


@dataclasses.dataclass(frozen=True)
class DynamicRanges(LayerwiseBits):
  """LayerwiseBits with each layer input quantized over its own batch range (AIMET's
  compute_encodings quantizes with the batch's statistics): |x| max on a symmetric grid, [min, max]
  (widened to contain 0) on the asymmetric grid; the extents (-min, max) recorded in `seen`. The
  matmuls keep their calibrated scales."""

  seen: dict = dataclasses.field(default_factory=dict)

  def layer(self, call: LayerCall, x):
    neg, pos = -jnp.min(x), jnp.max(x)
    self.seen[call.path] = jnp.stack([neg, pos])
    if "act_zero" in self.tables[call.path]:
      lo, width = -jnp.maximum(neg, 0.0), jnp.maximum(neg, 0.0) + jnp.maximum(pos, 0.0)
      table = dict(self.tables[call.path], act_clip=jnp.full(MAX_BITS + 1, width),
                   act_zero=asymmetric_zero_points(lo, jnp.full(MAX_BITS + 1, width), jnp))
    else:
      amax = jnp.maximum(jnp.maximum(neg, pos), 0.0)
      table = dict(self.tables[call.path], act_clip=jnp.full(MAX_BITS + 1, amax))
    return LayerwiseBits({call.path: table}, self.weight_bits, self.act_bits, self.index, self.signed,
                         self.matmul_signed).layer(call, x)


def make_recalibrate(model, plan: QuantPlan):
  """recalibrate(folded_variables, tables, weight_bits, act_bits, x) -> (L, 2) extents (-min,
  max) of each layer input (over plan.quantized) with the model quantized at those bits; take the
  max over the calibration batches for the new min-max activation ranges (`with_act_ranges`). The
  plan's quantized matmuls run at 8 bits with their calibrated scales.

  Args:
    model: The float Flax model.
    plan: The QuantPlan whose `quantized` layers the bit arrays index.

  Returns:
    The recalibrate function described above.
  """
  index = {p: i for i, p in enumerate(plan.quantized)}

  def recalibrate(variables, tables, weight_bits, act_bits, x):
    provider = DynamicRanges(tables, weight_bits, act_bits, index, plan.signed, plan.matmul_signed, {})
    interception.run_with_provider(model, plan, variables, x, provider)
    return jnp.stack([provider.seen[p] for p in plan.quantized])

  return recalibrate


def with_act_ranges(tables: dict, plan: QuantPlan, extents) -> dict:
  """The tables with every activation width's range set to the recalibrated one (min-max): the
  |x| max max(-min, max, 0) on a symmetric grid; on the asymmetric grid (a table with 'act_zero')
  the width of [min(min, 0), max(max, 0)] and its zero points.

  Args:
    tables: Clipping tables {path: {'act_clip', 'weight_clip', ('act_zero')}} (`build_tables`).
    plan: The QuantPlan; extents are indexed in plan.quantized order.
    extents: (L, 2) recalibrated (-min, max) per quantized layer (`make_recalibrate`, the max over
      the batches).

  Returns:
    A new tables dict; the weight clips and the matmuls' entries (their calibrated scales) are
    unchanged.
  """
  extents = np.asarray(extents)
  out = dict(tables)
  for i, p in enumerate(plan.quantized):
    neg, pos = extents[i]
    if "act_zero" in tables[p]:
      width = np.full(MAX_BITS + 1, max(neg, 0.0) + max(pos, 0.0), np.float32)
      out[p] = dict(tables[p], act_clip=jnp.asarray(width),
                    act_zero=jnp.asarray(asymmetric_zero_points(-max(neg, 0.0), width)))
    else:
      out[p] = dict(tables[p], act_clip=jnp.full(MAX_BITS + 1, max(neg, pos, 0.0), jnp.float32))
  return out


def bits_arrays(plan: QuantPlan, assignment: dict, default=(0, 0)):
  """{path: Candidate or (w, a)} -> (weight_bits, act_bits) int32 arrays over plan.quantized.

  Args:
    plan: The QuantPlan whose `quantized` layers give the order.
    assignment: {path: Candidate or (weight_bits, act_bits)}; missing layers take `default`.
    default: (weight_bits, act_bits) of the layers not in `assignment`; (0, 0) is float.

  Returns:
    Tuple (weight_bits, act_bits) of (L,) int32 jax arrays.
  """
  w, a = [], []
  for p in plan.quantized:
    c = assignment.get(p, default)
    wb, ab = (c.weight_bits, c.act_bits) if hasattr(c, "weight_bits") else c
    w.append(wb)
    a.append(ab)
  return jnp.asarray(w, jnp.int32), jnp.asarray(a, jnp.int32)


def sqnr_db(reference, test) -> float:
  """10 log10(Σ ref² / Σ (ref - test)²) over the whole output.

  Args:
    reference: Reference output (e.g. float logits), any shape.
    test: Output to compare, the same shape.

  Returns:
    The SQNR in dB as a float (the error is floored at 1e-30).
  """
  ref = np.asarray(reference, np.float64)
  err = np.sum((ref - np.asarray(test, np.float64)) ** 2)
  return float(10 * np.log10(np.sum(ref ** 2) / max(err, 1e-30)))
