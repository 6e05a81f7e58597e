"""The FlexiQ pipeline, one stage after another, for run.py, compare and experiments/:

  train_float -> evaluate_float -> calibrate -> select -> quantize -> finetune -> sweep

A cached driver: each stage's options come from the config (`stage_options`), its work is a
pure function (`stages`; float training and QAT, which checkpoint as they go, are here), and its
output is kept in a directory of the workdir under one cache protocol (`stage_cache`), keyed by
a fingerprint derived from its options and the stages before it: reruns reuse finished stages,
a killed training stage resumes, and a changed config field is named. `run_until` chains the
stages up to a named one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import artifacts
from flexiq_jax import checkpoint
from flexiq_jax import contract
from flexiq_jax import cost
from flexiq_jax import data
from flexiq_jax import equalize as equalize_lib
from flexiq_jax import finetune as finetune_lib
from flexiq_jax import judge as judge_lib
from flexiq_jax import lr_select
from flexiq_jax import models
from flexiq_jax import parallel
from flexiq_jax import preflight
from flexiq_jax import quantize as quantize_lib
from flexiq_jax import records
from flexiq_jax import select as select_lib
from flexiq_jax import stage_cache
from flexiq_jax import stage_options
from flexiq_jax import stages
from flexiq_jax import summary
from flexiq_jax import train as train_lib
from flexiq_jax.finetune import rounding as rounding_lib
from flexiq_jax.numerics.adaround import AdaRoundSettings
from flexiq_jax.stage_results import Calibration, FloatModel, Quantized, RatioPoint, Selection

STAGES = ("train", "eval", "calibrate", "select", "quantize", "finetune")


@dataclasses.dataclass(frozen=True)
class Run:
  """Where a pipeline runs: the config, the workdir and the device mesh. A `read_only` run (its
  workdir cannot be written) reuses the stages the workdir holds and writes no TensorBoard events."""

  config: object
  workdir: str
  mesh: object = None
  read_only: bool = False

  def __post_init__(self):
    if self.mesh is None:
      object.__setattr__(self, "mesh", parallel.make_mesh())

  def options(self, stage: str):
    """The options of cached stage `stage` (`stage_options.STAGES`) that the config sets."""
    return stage_options.stage_options(self.config, stage)

  def stage(self, name: str, directory: str | None = None, *extra_fields: str) -> stage_cache.Stage:
    """The cache directory of stage `name`, keyed by its fingerprint fields (and `extra_fields`)."""
    return stage_cache.Stage(self.workdir, directory or name,
                             stage_options.fingerprint_fields(self.config, name, *extra_fields))


@dataclasses.dataclass(frozen=True)
class PipelineResult:
  """What `run_until` ran (None for stages it did not reach)."""

  float_model: FloatModel
  float_metrics: dict | None = None
  # The float model's logits on the eval batches, one array per batch (from the float
  # evaluation's pass): the reference of the sweep's agreement / KL / SQNR columns.
  float_logits: tuple | None = None
  calibration: Calibration | None = None
  selection: Selection | None = None
  quantized: Quantized | None = None
  finetuned: Quantized | None = None


# ----------------------------------------------------------------------------------------------
# Float model.


def build_model(config, num_classes: int):
  """The float model of `config` (its `model` section) for `num_classes` classes.

  Args:
    config: a run.py config (`model.name` and `model.kwargs` are read).
    num_classes: the classifier's output size.

  Returns:
    The Flax module from the model registry (`models.create`).
  """
  return models.create(config.model.name, num_classes=num_classes, **config.model.kwargs.to_dict())


def train_examples(config) -> int:
  """The size of the config's training split.

  Args:
    config: a run.py config (`data` is read).

  Returns:
    The number of training examples.
  """
  return data.get_dataset(config.data, config.data.train_split).num_examples


def image_shape(config) -> tuple[int, int, int]:
  """(H, W, C) of the config's images.

  Args:
    config: a run.py config (`data.image_size` and `data.channels` are read).

  Returns:
    The (height, width, channels) tuple; images are square.
  """
  return (config.data.image_size, config.data.image_size, config.data.channels)


def _init_variables(options: stage_options.FloatOptions, shape, num_classes):
  if options.init_weights:
    kwargs = dict(options.model_kwargs)
    image_size = kwargs.pop("image_size", shape[0])  # transformers carry it in model.kwargs
    return models.load_timm(options.model_name, options.init_weights, num_classes=num_classes,
                            image_size=image_size, in_chans=shape[2], **kwargs)
  return None


def train_float(run: Run, on_step=None) -> FloatModel:
  """Trains (or resumes, or reuses) the float model in <workdir>/float.

  Args:
    run: the pipeline run (its config's `FloatOptions`).
    on_step: called with each finished step number (tests interrupt training with it).

  Returns:
    The FloatModel.
  """
  opts: stage_options.FloatOptions = run.options("float")
  parallel.check_batch_size(opts.batch_size, run.mesh)
  train_ds = data.get_dataset(opts.data, opts.data.train_split, train=True)
  model = models.create(opts.model_name, num_classes=train_ds.num_classes, **opts.model_kwargs)
  total_steps = train_lib.total_steps_of(opts.num_epochs, train_ds.num_examples, opts.batch_size)
  tx = train_lib.make_optimizer(opts, total_steps)
  init_vars = _init_variables(opts, train_ds.image_shape, train_ds.num_classes)
  state = train_lib.create_train_state(model, jax.random.PRNGKey(opts.seed), train_ds.image_shape, tx, init_vars)
  stage = run.stage("float")
  stage.begin(resumable=True)  # refuses a changed config before anything is written
  if not run.read_only:
    records.write_run_config(run.workdir, run.config)
  step_fn = functools.partial(train_lib.train_step, apply_fn=model.apply, tx=tx, label_smoothing=opts.label_smoothing)
  state = train_lib.fit(parallel.replicate(state, run.mesh), step_fn, train_ds, opts, total_steps=total_steps,
                        seed=opts.seed, workdir=stage.path, desc="float train", log_every=opts.log_every_steps,
                        mesh=run.mesh, num_threads=opts.data.num_threads, on_step=on_step,
                        eval_fn=periodic_eval(run, lambda images, v: train_lib.float_logits(model, v, images),
                                              lambda state: state.variables()),
                        eval_every=opts.eval_every_steps)
  if total_steps == 0:
    print("float model: no training steps configured (train.num_epochs=0); using the initial weights"
          + (f" from {opts.init_weights}" if opts.init_weights else ""))
  stage.mark_done(total_steps=total_steps, num_classes=train_ds.num_classes)
  return FloatModel(model, state.variables())


def eval_batches(config):
  """The eval batches of `config`: its `data.eval_split`, at `eval_batch_size`, padded and masked.

  Args:
    config: a run.py config; `data.eval_examples` >= 0 limits the number of images (-1 or absent:
      the whole split).

  Returns:
    An iterator of batch dicts ('image', 'label', 'mask'), as `data.eval_batches` yields them.
  """
  eval_ds = data.get_dataset(config.data, config.data.eval_split)
  n = config.data.get("eval_examples", -1)
  return data.eval_batches(eval_ds, config.eval_batch_size, num_examples=None if n < 0 else n,
                           num_threads=config.data.num_threads)


def eval_images(config) -> int:
  """How many images `eval_batches` yields (the progress bars' total).

  Args:
    config: a run.py config.

  Returns:
    The eval split's size, or `data.eval_examples` where that is smaller and not negative.
  """
  n, size = config.data.get("eval_examples", -1), data.get_dataset(config.data, config.data.eval_split).num_examples
  return size if n < 0 else min(n, size)


def evaluate_float(run: Run, float_model: FloatModel, logits_out: list | None = None) -> dict:
  """Top-1/top-5 of the float model on the eval split; `logits_out` receives its logits per batch
  (the reference of `sweep`'s agreement / KL / SQNR).

  Args:
    run: the pipeline run.
    float_model: the float model and its variables.
    logits_out: a list that receives each eval batch's logits (host-local), in order.

  Returns:
    The metrics of `train.evaluate`: 'top1', 'top5' (%), 'loss' and 'num_examples'.

  Raises:
    ValueError: `eval_batch_size` does not divide over the mesh's devices.
  """
  config = run.config
  parallel.check_batch_size(config.eval_batch_size, run.mesh, "eval_batch_size")
  predict = lambda images, variables: train_lib.float_logits(float_model.model, variables, images)
  metrics = train_lib.evaluate(predict, eval_batches(config), run.mesh, desc="float eval",
                               args=(float_model.variables,), logits_out=logits_out,
                               total_images=eval_images(config))
  print(f"float model on {config.data.name}/{config.data.eval_split}: top-1 {metrics['top1']:.2f}%  "
        f"top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}")
  return metrics


# ----------------------------------------------------------------------------------------------
# FlexiQ stages.


def calibration_batches(config):
  """The unlabelled calibration image batches of `config` (`CalibrateOptions`).

  Args:
    config: a run.py config.

  Returns:
    A list of [batch, H, W, C] image arrays from the training split, chosen by the calibration
    seed.
  """
  opts: stage_options.CalibrateOptions = stage_options.stage_options(config, "calibrate")
  train_ds = data.get_dataset(opts.data, opts.data.train_split)
  return [jnp.asarray(b) for b in data.calibration_images(
      train_ds, opts.num_images, seed=opts.seed, batch_size=opts.batch_size)]


def calibrate(run: Run, float_model: FloatModel, batches=None) -> Calibration:
  """Plan (which layers, BN folding) + calibration statistics (`stages.calibrate`), cached in
  <workdir>/calibrate.

  Args:
    run: the pipeline run.
    float_model: the float model.
    batches: calibration batches to use instead of the config's.

  Returns:
    The Calibration.
  """
  opts = run.options("calibrate")
  stage = run.stage("calibrate")
  # The equalization's check runs on the config's first calibration images; a finished stage's pairs
  # are reused (the scales follow from the weights).
  check_images = calibration_batches(run.config)[0] if opts.equalize else None
  report = records.read_json(stage.file("equalize.json")) if opts.equalize and stage.is_done() else None
  plan, folded, equalized = stages.plan_with_report(float_model, image_shape(run.config), opts, check_images,
                                                    pairs=equalize_lib.pairs_from_json(report) if report else None)
  for rule in plan.unmatched_rules:
    print(f"warning: quantization rule {rule!r} matched no layer")
  if equalized is not None:
    print(f"calibrate: cross-layer equalization of {len(equalized.pairs)} layer pairs"
          + ("" if report else f" ({len(equalized.refused)} candidates refused)")
          + f", float output deviation {equalized.deviation:.2g}")
  if stage.is_done():
    print(f"calibrate: reusing {stage.path}")
    return Calibration(quantize_lib.QuantPlan.from_json(records.read_json(stage.file("plan.json"))), folded,
                       checkpoint.load_tree(stage.file("stats")))
  stage.begin(resumable=False)
  batches = calibration_batches(run.config) if batches is None else batches
  calibration = stages.calibrate(float_model, batches, opts, planned=(plan, folded))
  plan, stats = calibration.plan, calibration.stats
  # What stays float in the integer path (plain einsums a model computes outside the
  # intercepted modules, or matmuls the plan leaves float), so that "8-bit" is never assumed.
  float_ops = quantize_lib.float_ops_of_plan(float_model.model, plan, folded, stats, batches[0][:1])
  checkpoint.save_tree(stage.file("stats"), stats)
  records.write_json_atomic(stage.file("plan.json"), plan.to_json())
  records.write_json_atomic(stage.file("float_ops.json"), [str(op) for op in float_ops])
  if equalized is not None:
    records.write_json_atomic(stage.file("equalize.json"), equalized.to_json())
  stage.mark_done()
  print(f"calibrate: {len(plan.quantized)} quantized layers ({len(plan.lowerable)} lowerable), "
        f"{len(plan.quantized_matmuls)} attention matmuls in 8 bits, {len(plan.folded_bn)} BatchNorms folded, "
        f"{opts.num_images} images")
  print(f"calibrate: {plan.signedness_summary()}")
  print(f"calibrate: {quantize_lib.format_float_ops(float_ops)}")
  return calibration


def select(run: Run, float_model: FloatModel, calibration: Calibration) -> Selection:
  """Channel orders (small range first) and per-level counts from the configured selector
  (`stages.select`), cached in <workdir>/select.

  Args:
    run: the pipeline run.
    float_model: the float model (the search's fitness reference).
    calibration: the calibration result.

  Returns:
    The Selection.
  """
  opts: stage_options.SelectOptions = run.options("select")
  stage = run.stage("select")
  if stage.is_done():
    saved = records.read_json(stage.file("selection.json"))
    print(f"select: reusing {stage.path}")
    return Selection({p: np.asarray(o) for p, o in saved["orders"].items()},
                     {p: np.asarray(c) for p, c in saved["counts"].items()}, tuple(saved["levels"]),
                     saved["selector"])
  stage.begin(resumable=False)
  fitness_images = lambda: jnp.concatenate(calibration_batches(run.config)[:opts.fitness_batches])
  out = stages.select(float_model, calibration, fitness_images, opts)
  selection, layers, history = out.selection, out.layers, out.history
  levels = list(selection.levels)
  counts = np.stack([selection.counts[p] for p in layers.paths], axis=1)
  if history is not None:
    select_lib.plot_search_history(history, stage.file("search_history.png"))
    summary.write_scalars(stage.path, [(g, {f"fitness_best/level_{r:g}": b, f"fitness_mean/level_{r:g}": m})
                                       for r, h in zip(levels, history.history)
                                       for g, (b, m) in enumerate(zip(h["best"], h["mean"]))])
  shares = cost.lowered_mac_share(counts, layers.channels, layers.macs)
  records.write_json_atomic(stage.file("selection.json"), {
      "selector": selection.selector, "levels": levels,
      "orders": {p: np.asarray(o).tolist() for p, o in selection.orders.items()},
      "counts": {p: counts[:, i].tolist() for i, p in enumerate(layers.paths)},
      "mac_ratio_per_level": [float(s) for s in np.atleast_1d(shares)],
      "search": history.as_dict() if history is not None else None})
  stage.mark_done()
  print(f"select ({selection.selector}): per-level MAC ratios " + ", ".join(f"{s:.3f}" for s in np.atleast_1d(shares)))
  return selection


def quantize(run: Run, float_model: FloatModel, calibration: Calibration, selection: Selection) -> Quantized:
  """The quantized variables of the integer path (`stages.quantize`), cached in <workdir>/quantized.

  Args:
    run: the pipeline run.
    float_model: the float model.
    calibration: the calibration result.
    selection: the selection result.

  Returns:
    The Quantized model (not finetuned).
  """
  quantized = stages.quantize(float_model, calibration, selection, run.options("quantize"))
  stage = run.stage("quantize", "quantized")
  if stage.is_done():
    return Quantized(quantized.qmodel, checkpoint.load_tree(stage.file("qvars"), quantized.qvars))
  stage.begin(resumable=False)
  checkpoint.save_tree(stage.file("qvars"), quantized.qvars)
  records.write_json_atomic(stage.file("plan.json"), calibration.plan.to_json())
  stage.mark_done()
  return quantized


def finetune(run: Run, float_model: FloatModel, quantized: Quantized, on_step=None) -> Quantized:
  """Multi-ratio QAT in <workdir>/finetune (resumes after a kill), then the refresh of the state
  that depends on the weights (`refresh`; before/after in refresh.json); also writes the int8
  serving export to <workdir>/serving. With `finetune.lr_grid` set, one QAT per rate of the grid,
  each in finetune/lr_<rate>, the best on held-out training images kept (`select_learning_rate`).

  Args:
    run: the pipeline run (its config's `FinetuneOptions`).
    float_model: the float model (the distillation teacher).
    quantized: the quantized model to train.
    on_step: called with each finished step number.

  Returns:
    The finetuned Quantized model.
  """
  opts: stage_options.FinetuneOptions = run.options("finetune")
  stage = run.stage("finetune")
  start = _qat_start(quantized, opts)
  stage.begin(resumable=True)
  if stage.is_done():
    print(f"finetune: reusing the finished run in {stage.path}")
    return Quantized(quantized.qmodel, checkpoint.load_tree(stage.file("qvars"), start.qvars), finetuned=True)
  rounded = round_weights(run, quantized, opts, stage.path)
  if opts.lr_grid:
    tuned, total_steps = select_learning_rate(run, float_model, rounded, stage.path, on_step)
  else:
    tuned, total_steps = qat(run, float_model, rounded, opts, stage.path, on_step)
  checkpoint.save_tree(stage.file("qvars"), tuned.qvars)
  judge_lib.accept_or_refuse(run, float_model.logits, quantized, tuned, stage, total_steps=total_steps,
                             train_seed=opts.qat_seed(), judged_ratios=_trained_ends(opts))
  export_serving(run.workdir, tuned)
  stage.mark_done(total_steps=total_steps)
  return tuned


def round_weights(run: Run, quantized: Quantized, opts: stage_options.FinetuneOptions, directory: str) -> Quantized:
  """The model the QAT starts from: with `finetune.rounding_iterations`, the 4-bit rounding of every
  lowerable layer learnt (`finetune.rounding`; saved in <directory>/rounded, reused on a resume,
  its per-layer report in rounding.json); else `quantized` itself.

  Args:
    run: the pipeline run (its config's calibration images).
    quantized: the quantized model before finetuning.
    opts: the finetune options.
    directory: the finetune stage's folder.

  Returns:
    The Quantized model to finetune.
  """
  if not opts.rounding_iterations:
    return quantized
  path = os.path.join(directory, "rounded")
  if os.path.exists(path):
    print(f"finetune: reusing the learnt rounding in {path}")
    return Quantized(quantized.qmodel, checkpoint.load_tree(path, quantized.qvars))
  images = jnp.concatenate(calibration_batches(run.config))[:opts.rounding_images]
  settings = AdaRoundSettings(iterations=opts.rounding_iterations)
  print(f"finetune: learning the 4-bit rounding of {len(quantized.qmodel.plan.lowerable)} layers "
        f"({settings.iterations} iterations each, {images.shape[0]} images)")
  qvars, report = rounding_lib.round_extraction(quantized.qmodel, quantized.qvars, images, settings,
                                                ratios=tuple(float(r) for r in opts.rounding_ratios), seed=opts.seed)
  records.write_json_atomic(os.path.join(directory, "rounding.json"), report)
  checkpoint.save_tree(path, qvars)
  return Quantized(quantized.qmodel, qvars)


def _trained_ends(opts: stage_options.FinetuneOptions) -> tuple[float, ...]:
  """The ratios of judge.JUDGE_RATIOS (the ends) that the finetune's sampler trains: what its judge
  and its learning-rate selection hold it to."""
  sampler = opts.sampler()
  return tuple(r for r in judge_lib.JUDGE_RATIOS if sampler.trains(r))


def _qat_start(quantized: Quantized, opts: stage_options.FinetuneOptions) -> Quantized:
  """The quantized model QAT starts from: with `finetune.lsq_weights`, plus the weight scales; with
  `finetune.ratio_affine`, plus the ratio affine (zeros: the same model)."""
  qvars = quantized.qvars
  if opts.lsq_weights:
    qvars = quantize_lib.add_lsq_weight_scales(quantized.qmodel.plan, qvars)
  if opts.ratio_affine:
    qvars = quantize_lib.add_ratio_affine(quantized.qmodel.plan, qvars)
  return quantized if qvars is quantized.qvars else Quantized(quantized.qmodel, qvars)


def qat(run: Run, float_model: FloatModel, quantized: Quantized, opts: stage_options.FinetuneOptions,
        directory: str, on_step=None) -> tuple[Quantized, int]:
  """Multi-ratio QAT at `opts` (its checkpoints and metrics in `directory`, resumed from there)
  and the refresh after it (its report in `directory`/refresh.json).

  Args:
    run: the pipeline run (its mesh, config and data).
    float_model: the float model (the distillation teacher).
    quantized: the quantized model to train.
    opts: the finetune options (the learning rate among them).
    directory: where the checkpoints, metrics and refresh report go.
    on_step: called with each finished step number.

  Returns:
    (the trained and refreshed model, its number of steps).
  """
  train_ds = data.get_dataset(opts.data, opts.data.train_split, train=True)
  total_steps = train_lib.total_steps_of(opts.num_epochs, train_ds.num_examples, opts.batch_size)
  tx = finetune_lib.make_optimizer(opts, total_steps)
  fake = dataclasses.replace(quantized.qmodel.with_mode("fake"), lsq=bool(opts.lsq),
                             lsq_grad_scale=opts.lsq_grad_scale, lsq_weight_grad_scale=opts.lsq_weight_grad_scale)
  start = _qat_start(quantized, opts).qvars
  state = parallel.replicate(finetune_lib.create_state(start, tx, opts.lsq, bool(opts.lsq_weights),
                                                      bool(opts.ratio_affine)), run.mesh)
  teacher = float_model.logits if opts.distill_weight > 0 else None
  seed = opts.qat_seed()
  step_fn = functools.partial(
      finetune_lib.qat_step, qmodel=fake, tx=tx, sampler=opts.sampler(), rng_key=jax.random.PRNGKey(seed),
      teacher_fn=teacher, distill_weight=opts.distill_weight, label_smoothing=opts.label_smoothing)
  reference = []  # the float model's eval logits (KL and agreement of the periodic evaluation), made on first use
  qat_eval = periodic_eval(run, lambda images, qv, r: fake.apply(qv, images, r),
                           lambda state: finetune_lib.merge_qvars(state.trainable, state.frozen),
                           ratios=EVAL_RATIOS, reference_logits=reference)

  def eval_fn(state):
    if not reference:
      evaluate_float(run, float_model, logits_out=reference)
    return qat_eval(state)

  state = train_lib.fit(state, step_fn, train_ds, opts, total_steps=total_steps, seed=seed,
                        workdir=directory, desc="QAT finetune", log_every=opts.log_every_steps, mesh=run.mesh,
                        num_threads=opts.data.num_threads, on_step=on_step, eval_fn=eval_fn,
                        eval_every=opts.eval_every_steps)
  trained = Quantized(quantized.qmodel, finetune_lib.merge_qvars(state.trainable, state.frozen), finetuned=True)
  return refresh(run, float_model, trained, directory=directory, opts=opts), total_steps


def select_learning_rate(run: Run, float_model: FloatModel, quantized: Quantized, directory: str,
                         on_step=None) -> tuple[Quantized, int]:
  """`qat` once per rate of `finetune.lr_grid`, each in <directory>/lr_<rate> (`lr_select.choose`:
  resumable, a finished candidate reused), scored on the held-out training images at ratios 0 and
  1; the criterion averages the ends of the ratio range the finetune trains (both for the
  multi-ratio finetuning, ratio 1 for a finetune at ratio 1 only). The candidates run without
  the periodic evaluation (`finetune.eval_every_steps`), which reads the eval split. The chosen
  candidate is the result (reloaded, not retrained); its refresh report and metrics are copied
  into `directory` beside lr_selection.json.

  Args:
    run: the pipeline run.
    float_model: the float model.
    quantized: the quantized model to train.
    directory: the finetune stage's directory.
    on_step: called with each finished step number of every candidate's QAT.

  Returns:
    (the chosen finetuned model, its number of steps).
  """
  opts: stage_options.FinetuneOptions = run.options("finetune")
  points = tuple(f"ratio {r:g}" for r in _trained_ends(opts))

  def train_and_score(rate, path, held):
    # No periodic evaluation: it reads the eval split, which a selection never does.
    candidate = dataclasses.replace(opts, learning_rate=rate, eval_every_steps=0)
    tuned, _ = qat(run, float_model, quantized, candidate, path, on_step)
    checkpoint.save_tree(os.path.join(path, "qvars"), tuned.qvars)
    return held_out_scores(run.config, float_model, tuned, held)

  rate, path, _ = lr_select.choose(run.config, directory, points, train_and_score)
  for name in ("refresh.json", "metrics.jsonl"):
    if os.path.exists(os.path.join(path, name)) and jax.process_index() == 0:
      shutil.copyfile(os.path.join(path, name), os.path.join(directory, name))
  steps = train_lib.total_steps_of(opts.num_epochs, train_examples(run.config), opts.batch_size)
  qvars = checkpoint.load_tree(os.path.join(path, "qvars"), _qat_start(quantized, opts).qvars)
  return Quantized(quantized.qmodel, qvars, finetuned=True), steps


def held_out_scores(config, float_model: FloatModel, quantized: Quantized, held) -> dict:
  """Top-1 and KL to float of a (finetuned) FlexiQ model on held-out images at judge.JUDGE_RATIOS,
  through the integer path: how the learning-rate selection scores its candidates.

  Args:
    config: the run config (its eval batch size).
    float_model: the float model.
    quantized: the model to score.
    held: the held-out images (`lr_select.held_out`).

  Returns:
    {'ratio <r>': {'top1', 'kl'}} (`lr_select.score`).
  """
  int_model = quantized.qmodel.with_mode("int")
  logits = lambda images, svars, ratio: int_model.apply(svars, images, ratio)
  svars = jax.jit(int_model.prepare)(quantized.qvars)
  return lr_select.score({f"ratio {r:g}": (logits, (svars, jnp.float32(r))) for r in judge_lib.JUDGE_RATIOS},
                         float_model.logits, held, int(config.eval_batch_size))


def lr_selection(workdir: str) -> dict | None:
  """The learning-rate selection record of the workdir's finetune stage (None without a grid).

  Args:
    workdir: a run's workdir.

  Returns:
    The record `lr_select.choose` wrote to finetune/lr_selection.json, or None.
  """
  return records.read_json(os.path.join(workdir, "finetune", lr_select.RECORD_FILE))


def finetune_judgement(workdir: str) -> dict | None:
  """The finetune judge's report of the workdir's finished finetune stage (None when it was not
  judged): held-out top-1 and KL at judge.JUDGE_RATIOS before and after finetuning.

  Args:
    workdir: a run's workdir.

  Returns:
    The report `judge.accept_or_refuse` wrote to finetune/judge.json, or None.
  """
  return records.read_json(os.path.join(workdir, "finetune", judge_lib.REPORT_FILE))


REFRESH_REPORT_RATIOS = stages.REFRESH_REPORT_RATIOS
EVAL_RATIOS = (0.0, 0.5, 1.0)  # the ratios of QAT's periodic evaluation (finetune.eval_every_steps)


def periodic_eval(run: Run, predict, variables_of, ratios=None, reference_logits=None):
  """`eval_fn(state)` for `train.run_loop`: top-1/top-5/loss on the eval split of
  `predict(images, variables_of(state)[, ratio])`, at each of `ratios` if given ('top1/r0.5', ...),
  with KL and agreement to the float model where its logits (`reference_logits`) are given. One
  compilation serves every evaluation (`train.evaluate` caches the step per `predict`).

  Args:
    run: the pipeline run (its config's eval split and mesh).
    predict: `(images, variables[, ratio]) -> logits`.
    variables_of: `state -> variables`, the variables `predict` takes.
    ratios: the 4-bit ratios to evaluate at (None: `predict` takes no ratio).
    reference_logits: the float model's logits per eval batch (None or empty: no KL/agreement).

  Returns:
    The function `eval_fn(state) -> {name: value}`, with 'top1', 'top5', 'loss' (and 'kl',
    'agreement') suffixed '/r<ratio>' when `ratios` is given.
  """
  def eval_fn(state):
    variables = variables_of(state)
    out = {}
    for ratio in (ratios if ratios is not None else (None,)):
      args = (variables,) if ratio is None else (variables, jnp.float32(ratio))
      m = train_lib.evaluate(predict, eval_batches(run.config), run.mesh, desc="periodic eval", args=args,
                             reference_logits=reference_logits or None, total_images=eval_images(run.config))
      suffix = "" if ratio is None else f"/r{ratio:g}"
      out.update({f"{k}{suffix}": m[k] for k in ("top1", "top5", "loss", "kl", "agreement") if k in m})
    return out
  return eval_fn


def refresh(run: Run, float_model: FloatModel, trained: Quantized, directory: str | None = None,
            opts: stage_options.FinetuneOptions | None = None) -> Quantized:
  """`stages.refresh` on the config's calibration images (finetune.refresh: 'auto' | 'always' |
  'never'), its report in <directory>/refresh.json.

  Args:
    run: the pipeline run.
    float_model: the float model.
    trained: the finetuned model.
    directory: where the report goes (default <workdir>/finetune).
    opts: the finetune options (default the run's).

  Returns:
    The model kept (refreshed or as trained).
  """
  opts = opts or run.options("finetune")
  if opts.refresh == "never":
    return trained
  kept, report = stages.refresh(float_model, trained, calibration_batches(run.config), opts)
  report = {**records.run_info(), **report}
  records.write_json_atomic(os.path.join(directory or os.path.join(run.workdir, "finetune"), "refresh.json"), report)
  before, after = report["before_refresh"], report["after_refresh"]
  print("finetune: refresh of weight extraction positions and bias-correction means, KL to float at ratios "
        + ", ".join(f"{r}: {before[r]:.4f} -> {after[r]:.4f}" for r in before)
        + f"; kept the {report['kept']} state (finetune.refresh={opts.refresh})")
  return kept


def export_serving(workdir: str, quantized: Quantized) -> str:
  """<workdir>/serving: the int8 export (no float kernels, see quantize.export_int8) and its plan;
  `flexiq_jax.load_quantized(workdir)` reads it back.

  Args:
    workdir: the run's workdir (its config.json, if there, gives the export's input spec).
    quantized: the quantized model and variables to export.

  Returns:
    What `artifacts.write_serving` returns: the path of the serving directory.
  """
  return artifacts.write_serving(workdir, quantized.qmodel, quantize_lib.export_int8(quantized.qmodel, quantized.qvars),
                                 input_spec=_input_spec_json(workdir))


def _input_spec_json(workdir: str) -> dict | None:
  config = records.read_json(os.path.join(workdir, "config.json"))
  if config is None:
    return None
  import ml_collections
  return contract.InputSpec.from_config(ml_collections.ConfigDict(config)).to_json()


def sweep(run: Run, quantized: Quantized, desc: str = "sweep", ratios=None,
          float_logits=None) -> list[RatioPoint]:
  """Top-1/top-5 at each ratio (default config.sweep.ratios), with relative BOPs and the 4-bit
  share of all quantized MACs; with `float_logits` (PipelineResult.float_logits) also agreement,
  KL and SQNR against the float model, in the same pass. One compilation serves every ratio; the
  serving form is prepared once, outside it. The points also go to TensorBoard in <workdir>/sweep,
  with the ratio in percent as the step.

  Args:
    run: the pipeline run.
    quantized: the quantized model and variables.
    desc: the progress bars' and printed lines' name, and the TensorBoard tag prefix.
    ratios: the 4-bit ratios to evaluate (None: config.sweep.ratios).
    float_logits: the float model's logits per eval batch (None: no fidelity measures).

  Returns:
    One `RatioPoint` per ratio, in order.

  Raises:
    ValueError: a ratio that is not a number in [0, 1] (`contract.check_ratio`).
  """
  qmodel, qvars = quantized.qmodel, quantized.qvars
  svars = qmodel.prepare(qvars) if qmodel.mode == "int" else qvars
  predict = lambda images, sv, r: qmodel.apply(sv, images, r)  # one compilation serves every ratio
  points = []
  for ratio in (run.config.sweep.ratios if ratios is None else ratios):
    r = jnp.float32(quantize_lib.check_ratio(ratio))
    m = train_lib.evaluate(predict, eval_batches(run.config), run.mesh, desc=f"{desc} r={ratio}",
                           args=(svars, r), reference_logits=float_logits, total_images=eval_images(run.config))
    points.append(RatioPoint(float(ratio), m["top1"], m["top5"], quantize_lib.relative_bops_at(qmodel, qvars, ratio),
                             quantize_lib.low_bit_share_at(qmodel, qvars, ratio),
                             m.get("agreement"), m.get("kl"), m.get("sqnr_db")))
    fidelity = (f"  agreement {m['agreement']:.2f}%  KL {m['kl']:.4f}  SQNR {m['sqnr_db']:.1f} dB"
                if "kl" in m else "")
    print(f"{desc}: ratio {ratio:.2f}  top-1 {m['top1']:.2f}%  relative BOPs {points[-1].relative_bops:.3f}{fidelity}")
  if run.read_only:
    return points
  # TensorBoard: accuracy against the ratio in percent (the step axis), one tag per sweep.
  summary.write_scalars(os.path.join(run.workdir, "sweep"), [
      (round(100 * p.ratio), {"top1": p.top1, "top5": p.top5, "relative_bops": p.relative_bops,
                              **({"kl": p.kl, "agreement": p.agreement, "sqnr_db": p.sqnr_db} if p.kl is not None else {})})
       for p in points],
      prefix=desc.replace(" ", "_") + "/")
  return points


# ----------------------------------------------------------------------------------------------
# Chaining.


def run_until(run: Run, until: str, *, float_model: FloatModel | None = None, evaluate: bool = True,
              calibration: Calibration | None = None) -> PipelineResult:
  """Runs (or reuses) every stage up to `until` (one of STAGES). A given `float_model` (or
  `calibration`) is used instead of the workdir's, e.g. for ablation variants that share one float
  model; `evaluate=False` skips the float evaluation. The config and inputs are checked first
  (`check_before_work`).

  Args:
    run: the pipeline run.
    until: the last stage to run, one of STAGES.
    float_model: a float model to use instead of training (or reusing) the workdir's.
    evaluate: whether to evaluate the float model (and collect its logits) when `until` reaches 'eval'.
    calibration: a calibration to use instead of the workdir's.

  Returns:
    The `PipelineResult`, with None for the stages not reached.

  Raises:
    ValueError: `until` is not one of STAGES.
    preflight.ConfigError: the config or its inputs are invalid.
  """
  if until not in STAGES:
    raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
  check_before_work(run, until, check_float=float_model is None)
  last = STAGES.index(until)
  fm = float_model or train_float(run)
  result = PipelineResult(fm)
  if last >= STAGES.index("eval") and evaluate:
    logits = []
    result = dataclasses.replace(result, float_metrics=evaluate_float(run, fm, logits_out=logits),
                                 float_logits=tuple(logits))
  if last < STAGES.index("calibrate"):
    return result
  calib = calibration or calibrate(run, fm)
  result = dataclasses.replace(result, calibration=calib)
  if last < STAGES.index("select"):
    return result
  selection = select(run, fm, calib)
  result = dataclasses.replace(result, selection=selection)
  if last < STAGES.index("quantize"):
    return result
  quantized = quantize(run, fm, calib, selection)
  result = dataclasses.replace(result, quantized=quantized)
  if last < STAGES.index("finetune"):
    return result
  return dataclasses.replace(result, finetuned=finetune(run, fm, quantized))


def check_config(config) -> None:
  """Every config value a stage would reject later, checked before any stage runs.

  Args:
    config: a run.py config.

  Raises:
    ValueError: naming the field.
  """
  for ratio in config.sweep.ratios:
    try:
      quantize_lib.check_ratio(ratio)
    except (TypeError, ValueError) as e:
      raise ValueError(f"sweep.ratios: {e}") from None
  stage_options.check_config(config)


def check_before_work(run: Run, until: str, *, check_float: bool = True) -> None:
  """Validates the config and refuses a training stage (float, finetune) whose saved run used
  other values, before any stage runs: a refusal never comes after hours of other work.

  Args:
    run: the pipeline run.
    until: the last stage that will run (finetune's saved run is checked only when it is reached).
    check_float: whether the float stage (and its initial weights) will be used from the workdir.

  Raises:
    preflight.ConfigError: a config value a stage would reject, or missing inputs.
    stage_cache.StageConfigChanged: a resumable stage's saved run used other values.
  """
  try:
    preflight.check_numbers(run.config)
    preflight.check_model(run.config)
    check_config(run.config)
    parallel.check_batch_size(run.config.train.batch_size, run.mesh)
    parallel.check_batch_size(run.config.eval_batch_size, run.mesh, "eval_batch_size")
  except preflight.ConfigError:
    raise
  except (TypeError, ValueError) as e:  # every config value a stage would reject: one kind of user error
    raise preflight.ConfigError(str(e)) from None
  preflight.check_inputs(run.config, weights=check_float and not run.stage("float").is_done())
  last = STAGES.index(until)
  resumable = (["float"] if check_float else []) + (["finetune"] if last >= STAGES.index("finetune") else [])
  for name in resumable:
    error = run.stage(name).refusal()
    if error is not None:
      raise error


def replace_stages(workdir: str, first: str) -> list[str]:
  """`run.py --force_from=<stage>`: moves the outputs of `first` and every stage after it to
  <workdir>/replaced/<timestamp>/ (kept, not deleted), so that those stages are redone. serving/
  and export/ stay until a new finetune is accepted (`artifacts.write_serving` then retires both):
  a redo that fails or is refused leaves the previous serving model in place.

  Args:
    workdir: the run's workdir.
    first: the first stage to redo: 'train', 'calibrate', 'select', 'quantize' or 'finetune'.

  Returns:
    The names of the stage directories that were moved (those that existed).

  Raises:
    ValueError: `first` is not one of those stages.
  """
  dirs = {"train": "float", "calibrate": "calibrate", "select": "select", "quantize": "quantized",
          "finetune": "finetune"}
  if first not in dirs:
    raise ValueError(f"--force_from={first!r} is not a stage; use one of {', '.join(dirs)}")
  order = list(dirs)
  moved = [dirs[s] for s in order[order.index(first):]]
  stamp = records.run_info()["date"].replace(":", "")
  target = os.path.join(workdir, "replaced", stamp)
  out = []
  for name in moved:
    if os.path.isdir(os.path.join(workdir, name)):
      os.makedirs(target, exist_ok=True)
      os.replace(os.path.join(workdir, name), os.path.join(target, name))
      out.append(name)
  if out:
    print(f"--force_from={first}: moved {', '.join(out)} to {target}")
  return out


def refused_finetune(run: Run, quantized: Quantized) -> tuple[Quantized, dict] | None:
  """The newest finetune of `run` that the judge refused (kept in <workdir>/replaced/<time>/finetune),
  as trained and refreshed, with the judge's report; None when there is none.

  Args:
    run: the pipeline run whose finetune was refused.
    quantized: the quantized model the finetune started from (the structure of its variables).

  Returns:
    (the refused model, its judge.json report), or None.
  """
  import glob

  opts: stage_options.FinetuneOptions = run.options("finetune")
  for kept in sorted(glob.glob(os.path.join(run.workdir, "replaced", "*", "finetune")), reverse=True):
    report = records.read_json(os.path.join(kept, judge_lib.REPORT_FILE))
    if report is None or report.get("accepted", True) or not os.path.exists(os.path.join(kept, "qvars")):
      continue
    start = _qat_start(quantized, opts).qvars
    return Quantized(quantized.qmodel, checkpoint.load_tree(os.path.join(kept, "qvars"), start), finetuned=True), report
  return None


# The stages a variant run can take over from another workdir: (stage, directory).
SHAREABLE_STAGES = (("calibrate", "calibrate"), ("select", "select"), ("quantize", "quantized"))


def seed_stages(run: Run, sources: list[str]) -> list[str]:
  """Copies into `run`'s workdir each finished calibrate / select / quantized stage of a `sources`
  workdir whose fingerprint equals the one `run` wants, where `run` has none yet: a variant that
  changes only later fields (finetuning, say) reuses them instead of recomputing them (the
  selection's search included).

  Args:
    run: the variant's run (its own workdir and config).
    sources: workdirs to take finished stages from, in order of preference.

  Returns:
    The directories copied.
  """
  import shutil

  copied = []
  for stage, directory in SHAREABLE_STAGES:
    if os.path.exists(os.path.join(run.workdir, directory)):
      continue
    want = run.stage(stage, directory).fingerprint
    for source in sources:
      done = records.read_json(os.path.join(source, directory, "done.json"))
      if done is not None and done.get("fingerprint") == want:
        shutil.copytree(os.path.join(source, directory), os.path.join(run.workdir, directory))
        copied.append(directory)
        break
  return copied


def finetuned_if_done(run: Run, float_model: FloatModel, quantized: Quantized) -> Quantized | None:
  """The finished finetuned model of this config in the workdir, or None (without training).

  Args:
    run: the pipeline run.
    float_model: the float model.
    quantized: the quantized model the finetuning started from.

  Returns:
    The finetuned (and refreshed, as configured) `Quantized`, or None when the finetune stage is
    not done.
  """
  stage = run.stage("finetune")
  if not stage.is_done():
    return None
  return finetune(run, float_model, quantized)
