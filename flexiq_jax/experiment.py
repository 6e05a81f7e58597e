"""The stages behind `run.py`'s modes. Each stage saves its output in the workdir and reuses an
existing output made from the same config, so reruns and later modes redo no finished work."""

from __future__ import annotations

import functools
import math
import os

import jax
import numpy as np

from flexiq_jax import checkpoint
from flexiq_jax import config_utils
from flexiq_jax import data
from flexiq_jax import models
from flexiq_jax import parallel
from flexiq_jax import reporting
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
    return models.load_timm(config.model.name, config.init_weights, num_classes=num_classes,
                            image_size=image_shape[0])
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
  predict = lambda images: model.apply(variables, images, train=False)
  metrics = train_lib.evaluate(predict, eval_batches(config, eval_ds), mesh, desc="float eval")
  print(f"float model on {eval_ds.name}/{eval_ds.split}: top-1 {metrics['top1']:.2f}%  "
        f"top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}")
  return metrics
