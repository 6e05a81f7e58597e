"""The FlexiQ stages as pure functions of their inputs and options, without files or caches.

  calibrate(float_model, batches, CalibrateOptions) -> Calibration
  select(float_model, calibration, fitness_images, SelectOptions) -> SelectOutput
  quantize(float_model, calibration, selection, QuantizeOptions) -> Quantized
  refresh(float_model, trained, batches, FinetuneOptions) -> (Quantized, report)

`pipeline` runs them with a workdir cache under each stage's fingerprint; `api.quantize_model`
chains them in memory. Float training and the QAT loop (which checkpoint as they go) are the
pipeline's; their options are `stage_options.FloatOptions` / `FinetuneOptions`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import calibrate as calibrate_lib
from flexiq_jax import equalize as equalize_lib
from flexiq_jax import finetune as finetune_lib
from flexiq_jax import quantize as quantize_lib
from flexiq_jax import select as select_lib
from flexiq_jax.fitness import SelectionFitness
from flexiq_jax.stage_options import CalibrateOptions, FinetuneOptions, QuantizeOptions, SelectOptions
from flexiq_jax.stage_results import Calibration, FloatModel, Quantized, Selection


# Images the equalization's function-preservation check runs on (the first calibration ones).
EQUALIZE_CHECK_IMAGES = 64


def plan_with_report(float_model: FloatModel, image_shape, options: CalibrateOptions, check_images=None,
                     pairs=None):
  """Which layers are quantized, the BN-folded float variables (cross-layer equalized with
  `options.equalize`), and the equalization's report.

  Args:
    float_model: the float model and its variables.
    image_shape: (H, W, C) of one image.
    options: the calibration options (skip, keep_8bit, fold_bn, attention, equalize).
    check_images: images for the equalization's function-preservation check (its first
      EQUALIZE_CHECK_IMAGES are used); needed only with `options.equalize`.
    pairs: the equalization's pairs from an earlier run (`equalize.Pair`s; its report's
      `pairs`), to skip finding them again.

  Returns:
    (QuantPlan without signedness, folded variables, `equalize.Equalized` or None when off).

  Raises:
    ValueError: `options.equalize` without `check_images`.
  """
  quant_plan = quantize_lib.build_plan(float_model.model, float_model.variables, tuple(image_shape),
                                       skip=tuple(options.skip), keep_8bit=tuple(options.keep_8bit),
                                       fold_bn=options.fold_bn, attention=options.attention)
  folded = quantize_lib.fold_batchnorm(float_model.variables, quant_plan)
  if not options.equalize:
    return quant_plan, folded, None
  if check_images is None:
    raise ValueError("quant.equalize needs images to check that each equalized pair keeps the float function")
  equalized = equalize_lib.equalize(float_model.model, quant_plan, folded,
                                    jnp.asarray(check_images)[:EQUALIZE_CHECK_IMAGES], pairs=pairs)
  return quant_plan, equalized.variables, equalized


def plan(float_model: FloatModel, image_shape, options: CalibrateOptions, check_images=None):
  """Which layers are quantized, and the BN-folded (with `options.equalize`, equalized) float variables.

  Args:
    float_model: the float model and its variables.
    image_shape: (H, W, C) of one image.
    options: the calibration options (skip, keep_8bit, fold_bn, attention, equalize).
    check_images: images for the equalization's check (`plan_with_report`).

  Returns:
    (QuantPlan without signedness, folded variables).
  """
  return plan_with_report(float_model, image_shape, options, check_images)[:2]


def calibrate(float_model: FloatModel, batches, options: CalibrateOptions, planned=None) -> Calibration:
  """The calibration statistics on unlabelled images, and the plan with each input's signedness.

  Args:
    float_model: the float model and its variables.
    batches: a list of (B, H, W, C) image batches.
    options: the calibration options.
    planned: `plan(...)`'s result if already built.

  Returns:
    The Calibration (plan, folded variables, statistics).
  """
  quant_plan, folded = planned or plan(float_model, batches[0].shape[1:], options, check_images=batches[0])
  stats = calibrate_lib.calibrate(float_model.model, quant_plan, folded, batches, method=options.act_calibration,
                                  percentile=options.percentile, extraction=options.extraction,
                                  weight_scale=options.weight_scale, act_grid=options.act_grid)
  return Calibration(quant_plan.with_signedness(stats), folded, stats)


@dataclasses.dataclass(frozen=True)
class SelectOutput:
  """The selection, the lowerable layers it was made over, and the search history (if any)."""

  selection: Selection
  layers: select_lib.LowerableLayers
  history: select_lib.SearchResult | None


def select(float_model: FloatModel, calibration: Calibration, fitness_images, options: SelectOptions) -> SelectOutput:
  """Channel orders (small range first) and per-level lowered counts from the configured selector.

  Args:
    float_model: the float model (the search's fitness reference).
    calibration: the calibration result.
    fitness_images: unlabelled images the search scores candidates on, or a callable returning
      them (called only by selectors that search); unused by the others.
    options: the selection options.

  Returns:
    A SelectOutput.
  """
  levels = list(options.float_levels)
  layers = select_lib.LowerableLayers.of(calibration.plan, calibration.stats)
  orders = select_lib.channel_orders(options.channel_order, layers, options.seed)
  fitness = None
  if options.searches:
    images = fitness_images() if callable(fitness_images) else fitness_images
    fitness = SelectionFitness.build(float_model, calibration, orders, levels, jnp.asarray(images),
                                     kind=options.fitness, bias_correction=options.bias_correction)
  # The greedy seed of the search follows the range order; with a random order it would not match.
  by_range = options.channel_order == "range"
  counts, history = select_lib.select(options.selector, levels, layers.channels, layers.macs,
                                      ranges=layers.ranges if by_range else None, lowering_error=layers.errors,
                                      fitness_fn=fitness, seed=options.seed, **options.search_kwargs)
  counts = np.asarray(counts)
  selection = Selection(orders, {p: counts[:, i] for i, p in enumerate(layers.paths)}, tuple(levels),
                        options.selector)
  return SelectOutput(selection, layers, history)


def quantize(float_model: FloatModel, calibration: Calibration, selection: Selection,
             options: QuantizeOptions) -> Quantized:
  """The integer-path quantized model and its variables.

  Args:
    float_model: the float model.
    calibration: the calibration result.
    selection: the selection result.
    options: the quantize options (bias correction).

  Returns:
    The Quantized model (not finetuned).
  """
  qmodel = quantize_lib.QuantizedModel(float_model.model, calibration.plan, mode="int")
  qvars = quantize_lib.build_qvars(calibration.plan, calibration.folded, calibration.stats, selection.orders,
                                   selection.counts, selection.levels, bias_correction=options.bias_correction)
  return Quantized(qmodel, qvars)


REFRESH_REPORT_RATIOS = (0.0, 0.5, 1.0)


def refresh(float_model: FloatModel, trained: Quantized, batches, options: FinetuneOptions):
  """Re-estimates a finetuned model's weight extraction positions and bias-correction means on
  calibration images, and keeps them per `options.refresh`.

  QAT trains the weights against the calibrated state (the bias shift and the weight extraction
  positions are in its forward pass), so re-estimating it can undo what the weights adapted to:
  'auto' keeps the refreshed state only if it does not raise the mean KL(float || quantized) at
  `REFRESH_REPORT_RATIOS` on those images; 'always' keeps it, 'never' skips the refresh.

  Args:
    float_model: the float model (the KL reference).
    trained: the finetuned model.
    batches: the calibration image batches.
    options: the finetune options (refresh, refresh_source, extraction, fitness_batches).

  Returns:
    (the model kept, the report dict: KL before/after per ratio and which state was kept), or
    (trained, None) for refresh='never'.
  """
  if options.refresh == "never":
    return trained, None
  qmodel = trained.qmodel
  refreshed = dataclasses.replace(trained, qvars=finetune_lib.refresh_after_finetuning(
      float_model.model, qmodel.plan, trained.qvars, batches, extraction=options.extraction,
      source=options.refresh_source))
  images = jnp.concatenate(batches[:options.fitness_batches])
  teacher = float_model.logits(images)
  kl = jax.jit(lambda qvars, r: finetune_lib.kl_divergence(teacher, qmodel.apply(qvars, images, r)))
  before = {f"{r:g}": float(kl(trained.qvars, jnp.float32(r))) for r in REFRESH_REPORT_RATIOS}
  after = {f"{r:g}": float(kl(refreshed.qvars, jnp.float32(r))) for r in REFRESH_REPORT_RATIOS}
  keep = options.refresh == "always" or np.mean(list(after.values())) <= np.mean(list(before.values()))
  report = {"images": int(images.shape[0]), "metric": "KL(float || quantized) on calibration images",
            "mode": options.refresh, "source": options.refresh_source,
            "before_refresh": before, "after_refresh": after,
            "kept": "refreshed" if keep else "as trained"}
  return (refreshed if keep else trained), report
