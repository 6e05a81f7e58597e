"""The stages behind `run.py`'s modes. Each stage saves its output in the workdir and reuses an
existing output made from the same config, so reruns and later modes redo no finished work."""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import numpy as np

from flexiq_jax import calibrate as calibrate_lib
from flexiq_jax import checkpoint
from flexiq_jax import config_utils
from flexiq_jax import data
from flexiq_jax import finetune
from flexiq_jax import models
from flexiq_jax import parallel
from flexiq_jax import quantize
from flexiq_jax import reporting
from flexiq_jax import select as select_lib
from flexiq_jax import train as train_lib


def build_model(config, num_classes: int):
  return models.create(config.model.name, num_classes=num_classes, **config.model.kwargs.to_dict())


def datasets(config):
  train_ds = data.get_dataset(config.data, config.data.train_split, train=True)
  eval_ds = data.get_dataset(config.data, config.data.eval_split)
  return train_ds, eval_ds


def total_train_steps(config, num_examples: int) -> int:
  return int(math.ceil(config.train.num_epochs * num_examples / config.train.batch_size))


def _float_fingerprint(config) -> str:
  return config_utils.fingerprint(config.model, config.data, config.train, config.seed, config.init_weights)


def _init_variables(config, model, image_shape, num_classes):
  if config.init_weights:
    kwargs = config.model.kwargs.to_dict()
    image_size = kwargs.pop("image_size", image_shape[0])  # transformers carry it in model.kwargs
    return models.load_timm(config.model.name, config.init_weights, num_classes=num_classes,
                            image_size=image_size, in_chans=image_shape[2], **kwargs)
  return None


def train_float(config, workdir: str, mesh=None, on_step=None):
  """Trains (or resumes, or reuses) the float model; returns (model, variables)."""
  mesh = mesh or parallel.make_mesh()
  parallel.check_batch_size(config.train.batch_size, mesh)
  train_ds = data.get_dataset(config.data, config.data.train_split, train=True)
  model = build_model(config, train_ds.num_classes)
  total_steps = total_train_steps(config, train_ds.num_examples)
  tx = train_lib.make_optimizer(config.train, total_steps)
  init_vars = _init_variables(config, model, train_ds.image_shape, train_ds.num_classes)
  state = train_lib.create_train_state(model, jax.random.PRNGKey(config.seed), train_ds.image_shape, tx,
                                       init_vars)

  float_dir = os.path.join(workdir, "float")
  fp_path = os.path.join(float_dir, "fingerprint.json")
  fingerprint = _float_fingerprint(config)
  saved = reporting.read_json(fp_path)
  if saved is not None and saved["fingerprint"] != fingerprint:
    raise ValueError(
        f"{float_dir} holds a float model trained with a different model/data/train config "
        f"(fingerprint {saved['fingerprint']} != {fingerprint}). Use a new --workdir, or delete {float_dir}.")
  reporting.write_json_atomic(fp_path, {"fingerprint": fingerprint, "total_steps": total_steps})

  ckpt_dir = os.path.join(float_dir, "checkpoints")
  mngr = checkpoint.manager(ckpt_dir)
  latest = mngr.latest_step()
  mngr.close()
  state = parallel.replicate(state, mesh)
  if latest is not None:
    state = checkpoint.restore(checkpoint.manager(ckpt_dir), state, latest)
    if latest < total_steps:
      print(f"float model: resuming from step {latest}/{total_steps} in {ckpt_dir}")
  if int(state.step) < total_steps:
    host_batch = config.train.batch_size // jax.process_count()
    batches = data.train_batches(train_ds, host_batch, seed=config.seed, start_step=int(state.step),
                                 num_steps=total_steps, num_threads=config.data.num_threads)
    step_fn = functools.partial(train_lib.train_step, apply_fn=model.apply, tx=tx,
                                label_smoothing=config.train.label_smoothing)
    state = train_lib.run_loop(
        state, step_fn, batches, total_steps=total_steps, ckpt_dir=ckpt_dir,
        checkpoint_every=config.train.checkpoint_every_steps,
        metrics_path=os.path.join(float_dir, "metrics.jsonl"), log_every=config.train.log_every_steps,
        mesh=mesh, desc="float train", on_step=on_step)
  elif latest is None:
    print("float model: no training steps configured (train.num_epochs=0); using the initial weights"
          + (f" from {config.init_weights}" if config.init_weights else ""))
  else:
    print(f"float model: reusing the finished checkpoint at step {latest} in {ckpt_dir}")
  return model, state.variables()


def eval_batches(config, eval_ds):
  n = config.data.get("eval_examples", -1)
  return data.eval_batches(eval_ds, config.eval_batch_size, num_examples=None if n < 0 else n,
                           num_threads=config.data.num_threads)


def evaluate_float(config, workdir: str, model, variables, mesh=None) -> dict:
  eval_ds = data.get_dataset(config.data, config.data.eval_split)
  parallel.check_batch_size(config.eval_batch_size, mesh or parallel.make_mesh(), "eval_batch_size")
  predict = lambda images, v: model.apply(v, images, train=False)
  metrics = train_lib.evaluate(predict, eval_batches(config, eval_ds), mesh, desc="float eval",
                               args=(variables,))
  print(f"float model on {eval_ds.name}/{eval_ds.split}: top-1 {metrics['top1']:.2f}%  "
        f"top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}")
  return metrics


# ----------------------------------------------------------------------------------------------
# FlexiQ stages: calibrate -> select -> quantize -> finetune -> sweep.


def _stage_dir(workdir, name):
  path = os.path.join(workdir, name)
  os.makedirs(path, exist_ok=True)
  return path


def _reusable(stage_dir: str, fingerprint: str) -> bool:
  saved = reporting.read_json(os.path.join(stage_dir, "done.json"))
  return saved is not None and saved.get("fingerprint") == fingerprint


def _mark_done(stage_dir: str, fingerprint: str, **extra):
  reporting.write_json_atomic(os.path.join(stage_dir, "done.json"), {"fingerprint": fingerprint, **extra})


def calibration_batches(config):
  train_ds = data.get_dataset(config.data, config.data.train_split)
  return [jax.numpy.asarray(b) for b in data.calibration_images(
      train_ds, config.calib.num_images, seed=config.seed, batch_size=config.calib.batch_size)]


def calibrate_stage(config, workdir, model, variables):
  """Plan (which layers, BN folding) + calibration statistics; saved and reused."""
  stage = _stage_dir(workdir, "calibrate")
  fp = config_utils.fingerprint(_float_fingerprint(config), config.quant, config.calib)
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  plan = quantize.build_plan(model, variables, image_shape, skip=tuple(config.quant.skip),
                             keep_8bit=tuple(config.quant.keep_8bit), fold_bn=config.quant.fold_bn)
  for rule in plan.unmatched_rules:
    print(f"warning: quantization rule {rule!r} matched no layer")
  eps = quantize.bn_epsilons(model, variables, plan, image_shape)
  folded = quantize.fold_batchnorm(variables, plan, eps.get)
  if _reusable(stage, fp):
    calib = checkpoint.load_tree(os.path.join(stage, "stats"))
    plan = quantize.QuantPlan.from_json(reporting.read_json(os.path.join(stage, "plan.json")))
    print(f"calibrate: reusing {stage}")
    return plan, folded, calib
  calib = calibrate_lib.calibrate(model, plan, folded, calibration_batches(config),
                                  method=config.quant.act_calibration, percentile=config.quant.percentile,
                                  extraction=config.quant.extraction)
  checkpoint.save_tree(os.path.join(stage, "stats"), calib)
  reporting.write_json_atomic(os.path.join(stage, "plan.json"), plan.to_json())
  _mark_done(stage, fp)
  print(f"calibrate: {len(plan.quantized)} quantized layers ({len(plan.eligible)} lowerable), "
        f"{len(plan.folded_bn)} BatchNorms folded, {config.calib.num_images} images")
  return plan, folded, calib


def _eligible_arrays(plan, calib):
  """Per eligible layer: channels, MACs, ranges (absmax per channel), lowering errors."""
  channels = np.array([plan.layers[p].in_channels for p in plan.eligible], np.int64)
  macs = np.array([plan.layers[p].macs for p in plan.eligible], np.float64)
  ranges = [np.maximum(np.abs(calib[p]["ch_min"]), np.abs(calib[p]["ch_max"])) for p in plan.eligible]
  errors = [calib[p]["act_lowering_error"] + calib[p]["weight_lowering_error"] for p in plan.eligible]
  return channels, macs, ranges, errors


def select_stage(config, workdir, model, variables, plan, folded, calib):
  """Channel orders (small range first) and per-level counts from the configured selector."""
  stage = _stage_dir(workdir, "select")
  fp = config_utils.fingerprint(_float_fingerprint(config), config.quant, config.calib, config.select)
  if _reusable(stage, fp):
    saved = reporting.read_json(os.path.join(stage, "selection.json"))
    print(f"select: reusing {stage}")
    return ({p: np.asarray(o) for p, o in saved["orders"].items()},
            {p: np.asarray(c) for p, c in saved["counts"].items()}, saved["levels"])
  levels = [float(l) for l in config.select.levels]
  if sorted(levels) != levels or not all(0 < l <= 1 for l in levels):
    raise ValueError(f"select.levels must be increasing values in (0, 1], got {levels}")
  channels, macs, ranges, errors = _eligible_arrays(plan, calib)
  if config.select.channel_order == "range":
    orders = [select_lib.channel_order(r, e) for r, e in zip(ranges, errors)]
  elif config.select.channel_order == "random":
    orders = [select_lib.random_order(len(r), [config.seed, i]) for i, r in enumerate(ranges)]
  else:
    raise ValueError(f"unknown select.channel_order {config.select.channel_order!r}; use 'range' or 'random'")
  orders = dict(zip(plan.eligible, orders))
  name = config.select.selector
  by_range = config.select.channel_order == "range"
  if name == "greedy" and not by_range:
    raise ValueError("select.selector='greedy' lowers channels by range, so it needs select.channel_order='range'")
  fitness = None
  options = {}
  if name == "evolutionary":
    fitness = _fitness(config, model, variables, plan, folded, calib, orders, levels)
    options = {"population": config.select.population, "generations": config.select.generations}
  # The greedy seed of the search follows the range order; with a random order it would not match.
  counts, history = select_lib.select(name, levels, channels, macs, ranges=ranges if by_range else None,
                                      lowering_error=errors,
                                      fitness_fn=fitness, seed=config.seed, **options)
  counts = np.asarray(counts)
  if history is not None:
    select_lib.plot_search_history(history, os.path.join(stage, "search_history.png"))
  counts_by_layer = {p: counts[:, i] for i, p in enumerate(plan.eligible)}
  reporting.write_json_atomic(os.path.join(stage, "selection.json"), {
      "selector": name, "levels": levels,
      "orders": {p: np.asarray(o).tolist() for p, o in orders.items()},
      "counts": {p: c.tolist() for p, c in counts_by_layer.items()},
      "mac_ratio_per_level": [float(select_lib.mac_ratio(counts[k], channels, macs)) for k in range(len(levels))],
      "search": history.as_dict() if history is not None else None})
  _mark_done(stage, fp)
  print(f"select ({name}): per-level MAC ratios "
        + ", ".join(f"{select_lib.mac_ratio(counts[k], channels, macs):.3f}" for k in range(len(levels))))
  return orders, counts_by_layer, levels


def _fitness(config, model, variables, plan, folded, calib, orders, levels):
  """fitness(counts (L,)) on calibration images (lower is better); one compilation.

  select.fitness: 'kl' = KL(float || quantized); 'ce' = cross-entropy of the quantized model
  against the float model's predicted labels (the calibration images are unlabelled)."""
  kind = config.select.get("fitness", "kl")
  if kind not in ("kl", "ce"):
    raise ValueError(f"unknown select.fitness {kind!r}; use 'kl' or 'ce'")
  qmodel = quantize.QuantizedModel(model, plan, mode="int", conv_accumulator=_conv_accumulator())
  dummy = {p: np.zeros(len(levels), np.int32) for p in plan.eligible}
  qvars = quantize.build_qvars(plan, folded, calib, orders, dummy, levels,
                               bias_correction=config.quant.bias_correction)
  images = jax.numpy.concatenate(calibration_batches(config)[:config.select.fitness_batches])
  teacher = model.apply(variables, images, train=False)

  # Data are arguments, not closed-over constants: XLA would otherwise constant-fold the convs.
  @jax.jit
  def score(qvars, images, teacher, counts_vector):
    counts = {p: counts_vector[i] for i, p in enumerate(plan.eligible)}
    logits = qmodel.apply_counts(qvars, images, counts)
    if kind == "ce":
      return train_lib.cross_entropy(logits, jax.numpy.argmax(teacher, -1))
    return finetune.kl_divergence(teacher, logits)

  return lambda counts: float(score(qvars, images, teacher, jax.numpy.asarray(counts, jax.numpy.int32)))


def quantize_stage(config, workdir, model, plan, folded, calib, orders, counts, levels):
  """Builds and saves the quantized variables; returns (QuantizedModel, qvars)."""
  stage = _stage_dir(workdir, "quantized")
  qvars = quantize.build_qvars(plan, folded, calib, orders, counts, levels,
                               bias_correction=config.quant.bias_correction)
  checkpoint.save_tree(os.path.join(stage, "qvars"), qvars)
  reporting.write_json_atomic(os.path.join(stage, "plan.json"), plan.to_json())
  return quantize.QuantizedModel(model, plan, mode="int", conv_accumulator=_conv_accumulator()), qvars


def _conv_accumulator() -> str:
  # XLA:GPU runs int8 convolutions only with float32 output (exact up to 2^24 per output).
  return "float32" if jax.default_backend() == "gpu" else "int32"


def finetune_stage(config, workdir, model, variables, qmodel, qvars, mesh=None, on_step=None):
  """Multi-ratio QAT; resumes after a kill; returns the finetuned qvars."""
  mesh = mesh or parallel.make_mesh()
  cfg = config.finetune
  stage = _stage_dir(workdir, "finetune")
  train_ds = data.get_dataset(config.data, config.data.train_split, train=True)
  total_steps = int(math.ceil(cfg.num_epochs * train_ds.num_examples / cfg.batch_size))
  tx = train_lib.make_optimizer(cfg, total_steps)
  fake = qmodel.with_mode("fake")
  if cfg.lsq:
    fake = dataclasses.replace(fake, lsq=True)
  state = parallel.replicate(finetune.create_state(qvars, tx, cfg.lsq), mesh)
  ckpt_dir = os.path.join(stage, "checkpoints")
  fp = config_utils.fingerprint(_float_fingerprint(config), config.quant, config.calib, config.select, cfg)
  saved = reporting.read_json(os.path.join(stage, "fingerprint.json"))
  if saved is not None and saved["fingerprint"] != fp:
    raise ValueError(f"{stage} holds a finetune run with a different config; use a new --workdir or delete it")
  reporting.write_json_atomic(os.path.join(stage, "fingerprint.json"), {"fingerprint": fp})
  mngr = checkpoint.manager(ckpt_dir)
  latest = mngr.latest_step()
  mngr.close()
  if latest is not None:
    state = checkpoint.restore(checkpoint.manager(ckpt_dir), state, latest)
    if latest < total_steps:
      print(f"finetune: resuming from step {latest}/{total_steps}")
  if int(state.step) < total_steps:
    levels = list(cfg.levels) if cfg.levels else list(config.select.levels)
    probs = list(cfg.level_probs) if cfg.level_probs else [1.0 / len(levels)] * len(levels)
    if len(probs) != len(levels) or abs(sum(probs) - 1) > 1e-6:
      raise ValueError(f"finetune.level_probs {probs} must have one probability per level {levels} summing to 1")
    teacher = (lambda images: model.apply(variables, images, train=False)) if cfg.distill_weight > 0 else None
    step_fn = functools.partial(
        finetune.qat_step, qmodel=fake, tx=tx, levels=levels, level_probs=probs,
        rng_key=jax.random.PRNGKey(config.seed + 1), teacher_fn=teacher, distill_weight=cfg.distill_weight,
        label_smoothing=cfg.label_smoothing)
    batches = data.train_batches(train_ds, cfg.batch_size // jax.process_count(), seed=config.seed + 1,
                                 start_step=int(state.step), num_steps=total_steps,
                                 num_threads=config.data.num_threads)
    state = train_lib.run_loop(state, step_fn, batches, total_steps=total_steps, ckpt_dir=ckpt_dir,
                               checkpoint_every=cfg.checkpoint_every_steps,
                               metrics_path=os.path.join(stage, "metrics.jsonl"),
                               log_every=config.train.log_every_steps, mesh=mesh, desc="QAT finetune",
                               on_step=on_step)
  else:
    print(f"finetune: reusing the finished run in {ckpt_dir}")
  return finetune.merge_qvars(state.trainable, state.frozen)


def sweep(config, qmodel, qvars, mesh=None, desc="sweep") -> list[dict]:
  """Top-1/top-5 at each ratio in config.sweep.ratios, with relative BOPs and 4-bit MAC share."""
  eval_ds = data.get_dataset(config.data, config.data.eval_split)
  predict = lambda images, qv, r: qmodel.apply(qv, images, r)  # one compilation serves every ratio
  rows = []
  for ratio in config.sweep.ratios:
    r = jax.numpy.float32(quantize.check_ratio(ratio))
    metrics = train_lib.evaluate(predict, eval_batches(config, eval_ds), mesh, desc=f"{desc} r={ratio}",
                                 args=(qvars, r))
    rows.append({"ratio": float(ratio), "top1": metrics["top1"], "top5": metrics["top5"],
                 "relative_bops": quantize.relative_bops_at(qmodel, qvars, ratio),
                 "low_bit_mac_share": quantize.low_bit_share_at(qmodel, qvars, ratio)})
    print(f"{desc}: ratio {ratio:.2f}  top-1 {metrics['top1']:.2f}%  relative BOPs {rows[-1]['relative_bops']:.3f}")
  return rows


def save_serving(workdir, qmodel, qvars) -> str:
  """The int8 serving export (no float kernels, see quantize.export_int8) and its plan."""
  stage = _stage_dir(workdir, "serving")
  checkpoint.save_tree(os.path.join(stage, "qvars_int8"), quantize.export_int8(qmodel, qvars))
  reporting.write_json_atomic(os.path.join(stage, "plan.json"), qmodel.plan.to_json())
  return stage


def save_finetuned(workdir, qvars):
  """The finetuned quantized variables, for serving (`run.py` sweeps reload them)."""
  checkpoint.save_tree(os.path.join(workdir, "finetune", "qvars"), qvars)
