"""Float training and evaluation: a pure, jit-compiled train step and a resumable loop.

The loop is generic over the step function so quantization-aware finetuning reuses it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flexiq_jax import checkpoint
from flexiq_jax import data
from flexiq_jax import parallel
from flexiq_jax import progress as progress_lib
from flexiq_jax import signals
from flexiq_jax import summary


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  def variables(self) -> dict:
    out = {"params": self.params}
    if self.batch_stats:
      out["batch_stats"] = self.batch_stats
    return out


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule of `cfg`: linear warmup, then cosine decay to 0 or a constant rate.

  Args:
    cfg: the training config (a ConfigDict): `schedule` ('cosine' | 'constant'), `learning_rate`
      and the optional `warmup_steps` (default 0).
    total_steps: the run's length in optimizer steps (the cosine decay ends there).

  Returns:
    An optax schedule of the update count.

  Raises:
    ValueError: `cfg.schedule` is neither 'cosine' nor 'constant'.
  """
  warmup = int(cfg.get("warmup_steps", 0))
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(warmup, 1) if warmup else 0,
                                              max(total_steps, warmup + 1), end_value=0.0)
  if cfg.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup),
                                 optax.constant_schedule(cfg.learning_rate)], [warmup])
  raise ValueError(f"unknown schedule {cfg.schedule!r}; use 'cosine' or 'constant'")


def _decay_mask(params):
  # Decay conv/dense kernels and embeddings only, as is standard (no BN/LN scales or biases).
  return jax.tree_util.tree_map_with_path(
      lambda path, x: getattr(path[-1], "key", "") not in ("bias", "scale") and x.ndim > 1, params)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """The optimizer of `cfg`, with weight decay on kernels and embeddings only (no biases or norm scales).

  Args:
    cfg: the training config (a ConfigDict): `optimizer` ('sgd' | 'adamw'), `learning_rate`,
      `schedule`, `warmup_steps`, `weight_decay`, `momentum` and the optional `nesterov` (default
      True, SGD only) and `grad_clip_norm` (clips the global gradient norm when set).
    total_steps: the run's length in optimizer steps (for `make_schedule`).

  Returns:
    The optax gradient transformation.

  Raises:
    ValueError: `cfg.optimizer` is neither 'sgd' nor 'adamw', or the schedule is unknown.
  """
  schedule = make_schedule(cfg, total_steps)
  if cfg.optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, _decay_mask),
                     optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.get("nesterov", True)))
  elif cfg.optimizer == "adamw":
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=_decay_mask)
  else:
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use 'sgd' or 'adamw'")
  if cfg.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx


def cross_entropy(logits, labels, label_smoothing: float = 0.0, mask=None):
  """The mean softmax cross-entropy of `logits` against integer `labels`, in float32.

  Args:
    logits: [batch, num_classes] logits.
    labels: [batch] integer class labels.
    label_smoothing: the label smoothing factor (0: one-hot targets).
    mask: optional [batch] weights (1 for real examples, 0 for padding); the mean is then over the
      masked examples (divided by max(sum(mask), 1)).

  Returns:
    The scalar mean loss.
  """
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  if mask is None:
    return losses.mean()
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def train_step(state: TrainState, batch, *, apply_fn: Callable, tx: optax.GradientTransformation,
               label_smoothing: float = 0.0):
  """One SGD step of the float model; pure: (state, batch) -> (state, metrics).

  Args:
    state: the `TrainState` before the step.
    batch: a dict with 'image' ([batch, H, W, C]) and 'label' ([batch] integers).
    apply_fn: the model's `apply` (called with `train=True`; batch statistics are updated when the
      state has them).
    tx: the optimizer.
    label_smoothing: the cross-entropy's label smoothing.

  Returns:
    `(new_state, metrics)`: the state with its step advanced by one, and the step's 'loss',
    'accuracy' (top-1 on the batch, a fraction) and 'grad_norm' (global gradient norm).
  """

  def loss_fn(params):
    variables = {"params": params}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
      logits, updates = apply_fn(variables, batch["image"], train=True, mutable=["batch_stats"])
      new_stats = updates["batch_stats"]
    else:
      logits, new_stats = apply_fn(variables, batch["image"], train=True), state.batch_stats
    loss = cross_entropy(logits, batch["label"], label_smoothing)
    return loss, (logits, new_stats)

  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
  return new_state, {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}


def eval_sums(logits, batch) -> dict:
  """Masked sums (top-1, top-5 hits, loss) so padded eval batches count correctly; with the
  float model's logits in batch['reference_logits'], also the sums of the fidelity measures
  (`fidelity_sums`).

  Args:
    logits: [batch, num_classes] logits of the evaluated model.
    batch: a dict with 'label' ([batch] integers), the optional 'mask' ([batch], 1 for real
      examples; all ones when absent) and the optional 'reference_logits'.

  Returns:
    A dict of scalar sums: 'top1', 'top5', 'loss', 'count' (the masked example count) and, with
    reference logits, 'agree', 'kl', 'ref_energy' and 'error_energy'.
  """
  mask = batch.get("mask", jnp.ones(logits.shape[0], jnp.float32))
  labels = batch["label"]
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  sums = {
      "top1": jnp.sum((top5[:, 0] == labels) * mask),
      "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
      "loss": jnp.sum(losses * mask),
      "count": jnp.sum(mask),
  }
  if "reference_logits" in batch:
    sums.update(fidelity_sums(logits, batch["reference_logits"], mask))
  return sums


FIDELITY_METRICS = ("agreement", "kl", "sqnr_db")  # what `evaluate` adds given reference logits


def fidelity_sums(logits, reference_logits, mask) -> dict:
  """How far `logits` are from the reference (float) model's on the same images, as masked sums:
  top-1 agreement, KL(reference || model) of the softmax outputs, and the squared reference and
  squared error for the output SQNR (the layer-wise search's sensitivity measure,
  layerwise.apply.sqnr_db: 10 log10(sum ref^2 / sum (ref - out)^2) over the whole output).

  Args:
    logits: [batch, num_classes] logits of the evaluated model.
    reference_logits: [batch, num_classes] logits of the reference model on the same images.
    mask: [batch] weights (1 for real examples, 0 for padding).

  Returns:
    A dict of scalar sums: 'agree' (top-1 matches), 'kl', 'ref_energy' (sum of ref^2) and
    'error_energy' (sum of (ref - out)^2).
  """
  out = logits.astype(jnp.float32)
  ref = reference_logits.astype(jnp.float32)
  ref_logp = jax.nn.log_softmax(ref)
  kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - jax.nn.log_softmax(out)), axis=-1)
  return {
      "agree": jnp.sum((jnp.argmax(out, -1) == jnp.argmax(ref, -1)) * mask),
      "kl": jnp.sum(kl * mask),
      "ref_energy": jnp.sum(jnp.sum(ref ** 2, axis=-1) * mask),
      "error_energy": jnp.sum(jnp.sum((ref - out) ** 2, axis=-1) * mask),
  }


def evaluate(predict_fn: Callable, batches: Iterable[dict], mesh=None, desc: str = "eval",
             args: tuple = (), reference_logits=None, logits_out: list | None = None,
             total_images: int | None = None) -> dict:
  """predict_fn(images, *args) -> logits; returns top1/top5 (%), loss and the example count.

  The jitted step is cached per `predict_fn`, so evaluating the same function with new `args`
  (e.g. another 4-bit ratio) reuses the compilation.

  Args:
    predict_fn: `(images, *args) -> logits`, traced under `jax.jit`.
    batches: the eval batches (dicts with 'image', 'label' and optionally 'mask').
    mesh: the device mesh the batches are sharded over (default `parallel.make_mesh()`).
    desc: the progress bar's name.
    args: extra arguments passed to `predict_fn` after the images.
    reference_logits: the float model's logits for the same batches, in order (one host-local
      array per batch, as `logits_out` collects them): adds top-1 agreement with it (%), the mean
      KL(reference || model) and the output SQNR in dB, computed in the same pass.
    logits_out: a list that receives each batch's logits (host-local, padded rows included).
    total_images: the number of images, which gives the progress bar its ETA.

  Returns:
    A dict with 'top1' and 'top5' (%), 'loss' (mean), 'num_examples' and, with
    `reference_logits`, 'agreement' (%), 'kl' (mean) and 'sqnr_db'.

  Raises:
    ValueError: `batches` is empty, or `reference_logits` has fewer batches or other batch sizes
      than `batches`.
  """
  mesh = mesh or parallel.make_mesh()
  step = _eval_step(predict_fn)
  references = iter(reference_logits) if reference_logits is not None else None
  totals = None
  for batch in progress_lib.image_batches(batches, desc=desc, total_images=total_images):
    if references is not None:
      reference = next(references, None)
      if reference is None or len(reference) != len(batch["label"]):
        raise ValueError("reference_logits do not match the eval batches (fewer batches or another batch size); "
                         "compute them with logits_out= on the same batches")
      batch = {**batch, "reference_logits": np.asarray(reference)}
    sums, logits = step(parallel.shard_batch(batch, mesh), *args)
    if logits_out is not None:
      logits_out.append(parallel.host_local(logits))
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError("evaluation received no batches")
  totals = jax.device_get(totals)
  count = float(totals["count"])
  metrics = {"top1": 100.0 * float(totals["top1"]) / count, "top5": 100.0 * float(totals["top5"]) / count,
             "loss": float(totals["loss"]) / count, "num_examples": int(count)}
  if "agree" in totals:
    error = float(totals["error_energy"])
    metrics.update(agreement=100.0 * float(totals["agree"]) / count, kl=float(totals["kl"]) / count,
                   sqnr_db=float(10 * np.log10(float(totals["ref_energy"]) / max(error, 1e-30))))
  return metrics


@functools.lru_cache(maxsize=64)
def _eval_step(predict_fn: Callable):
  def step(batch, *args):
    logits = predict_fn(batch["image"], *args)
    return eval_sums(logits, batch), logits
  return jax.jit(step)


class JsonlWriter:
  """Appends one JSON object per line (big_vision style); readable while the run is going. Records
  with a `step` also go to TensorBoard event files in the same directory (`summary`)."""

  def __init__(self, path: str):
    self.path = path
    # Periodic evaluations go beside the training records (eval.jsonl), and to TensorBoard as eval/<name>.
    self.eval_path = os.path.join(os.path.dirname(path), "eval.jsonl")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self.tensorboard = summary.ScalarWriter(os.path.dirname(path) or ".")

  def drop_after(self, step: int) -> None:
    """Drops the records of steps after `step` (those a resumed run replays from its checkpoint)."""
    for path in (self.path, self.eval_path):
      if jax.process_index() != 0 or not os.path.exists(path):
        continue
      with open(path) as f:
        lines = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
      tmp = f"{path}.tmp.{os.getpid()}"
      with open(tmp, "w") as f:
        f.writelines(lines)
      os.replace(tmp, path)

  def write(self, **record):
    self._append(self.path, record)

  def write_eval(self, step: int, metrics: dict) -> None:
    """One periodic evaluation: a record in eval.jsonl, and the scalars under eval/ in TensorBoard."""
    self._append(self.eval_path, {"step": step, **metrics}, prefix="eval/")

  def _append(self, path: str, record: dict, prefix: str = "") -> None:
    if jax.process_index() != 0:  # one writer per multi-host run (every process logs the same means)
      return
    record = {k: _to_py(v) for k, v in record.items()}
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if "step" in record:
      self.tensorboard.write(record["step"], {k: v for k, v in record.items() if k != "step"}, prefix)

  def close(self):
    self.tensorboard.close()


def _to_py(value):
  if isinstance(value, (np.ndarray, jax.Array)):
    return value.item() if np.ndim(value) == 0 else np.asarray(value).tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


class NonFiniteError(FloatingPointError):
  """Training produced a NaN or Inf loss or gradient."""


def check_finite(metrics: list[dict], first_step: int, desc: str = "train") -> None:
  """Raises at the first step (numbered from 1, `first_step` steps done before `metrics[0]`)
  whose loss or gradient norm is NaN or Inf.

  Args:
    metrics: the per-step metrics dicts (device or host values), in step order; their 'loss' and
      'grad_norm' entries are checked where present.
    first_step: how many steps were done before `metrics[0]`.
    desc: the name the error message starts with.

  Raises:
    NonFiniteError: a step's loss or gradient norm is NaN or Inf.
  """
  for i, m in enumerate(jax.device_get(metrics)):
    bad = [k for k in ("loss", "grad_norm") if k in m and not np.isfinite(m[k])]
    if bad:
      raise NonFiniteError(
          f"{desc}: non-finite {' and '.join(bad)} ({', '.join(f'{k}={m[k]}' for k in bad)}) at step "
          f"{first_step + i + 1}; training stopped and nothing from that step on was saved. Lower the "
          f"learning rate, set grad_clip_norm, or check the data for NaN/Inf values.")



class DivergedError(NonFiniteError):
  """Training's loss rose far above where it started (finite, but the model is lost)."""


def check_diverged(metrics: list[dict], first_step: int, start_loss: float | None, factor: float,
                   desc: str = "train") -> None:
  """Raises DivergedError at the first step whose loss exceeds `factor` x max(start_loss, 1)
  (`start_loss`: the loss of the run's first step; factor <= 0 turns the check off). A loss
  that big without being NaN is a diverged run: a learning rate far too high, say.

  Args:
    metrics: the per-step metrics dicts, in step order; their 'loss' entries are checked.
    first_step: how many steps were done before `metrics[0]`.
    start_loss: the loss of the run's first step (None: no check).
    factor: the divergence factor (0 or less: no check).
    desc: the name the error message starts with.

  Raises:
    DivergedError: a step's loss is above the limit.
  """
  if start_loss is None or not factor or factor <= 0:
    return
  limit = factor * max(start_loss, 1.0)
  for i, m in enumerate(jax.device_get(metrics)):
    if "loss" in m and float(m["loss"]) > limit:
      raise DivergedError(
          f"{desc}: the loss diverged to {float(m['loss']):.4g} (started at {start_loss:.4g}; the limit is "
          f"divergence_factor {factor:g} x max(start, 1) = {limit:.4g}) at step {first_step + i + 1}; training "
          f"stopped and nothing from that step on was saved. Lower the learning rate or set grad_clip_norm.")


def checkpoint_interval(configured: int, total_steps: int) -> int:
  """The checkpoint interval a stage of `total_steps` steps uses: `configured`, but a quarter of
  the stage when `configured` is as long as the stage (an interrupt then keeps work too).

  Args:
    configured: the configured checkpoint interval in steps.
    total_steps: the stage's length in steps.

  Returns:
    The interval in steps, at least 1.
  """
  configured = int(configured)
  if configured < total_steps or total_steps <= 0:
    return max(configured, 1)
  return max(1, math.ceil(total_steps / 4))


def run_loop(state, step_fn: Callable, batches: Iterator[dict], *, total_steps: int, ckpt_dir: str,
             checkpoint_every: int, metrics_path: str, log_every: int = 50, mesh=None,
             batch_size: int | None = None, desc: str = "train",
             on_step: Callable[[int], None] | None = None, divergence_factor: float = 0.0,
             learning_rate: Callable | None = None, eval_fn: Callable[[Any], dict] | None = None,
             eval_every: int = 0):
  """Runs `state, metrics = step_fn(state, batch)` up to `total_steps`, checkpointing every
  `checkpoint_every` steps and at the end. `batches` must start at `int(state.step)`.

  NaN/Inf losses (`check_finite`) and, with `divergence_factor` > 0, a loss above that factor x
  its first step's (`check_diverged`) stop the run before anything of theirs is saved. A signal
  caught by `signals.graceful()` stops it after the current step, with a checkpoint there
  (`signals.Interrupted`).

  Args:
    state: the state to train from (a pytree with a `step`); it is donated to the jitted step.
    step_fn: `(state, batch) -> (state, metrics)`, pure; metrics must include 'loss'.
    batches: an iterator of training batches starting at `int(state.step)`.
    total_steps: the step to stop at.
    ckpt_dir: the Orbax checkpoint directory.
    checkpoint_every: steps between checkpoints.
    metrics_path: the JSON-lines file of the logged records (eval.jsonl and TensorBoard events go
      beside it).
    log_every: steps per logged record (the means of the metrics over those steps, with images/s).
    mesh: the device mesh (default `parallel.make_mesh()`).
    batch_size: unused by the loop itself (the image count comes from each batch).
    desc: the progress bar's and the messages' name.
    on_step: `on_step(step)`, called after each step's checkpoint decision (tests use it to
      simulate a crash).
    divergence_factor: the `check_diverged` factor (0: no divergence check).
    learning_rate: the optimizer's schedule (an optax schedule of the update count); each logged
      record then carries `learning_rate`, the rate of its last step's update.
    eval_fn: `eval_fn(state) -> {name: value}`, logged to eval.jsonl beside `metrics_path` and to
      TensorBoard under eval/.
    eval_every: steps between `eval_fn` calls, which also runs at the end (0: never).

  Returns:
    The final state.

  Raises:
    NonFiniteError: a loss or gradient norm became NaN or Inf.
    DivergedError: the loss diverged (with `divergence_factor` > 0).
    signals.Interrupted: a signal stopped the run (after checkpointing the current step).
  """
  mesh = mesh or parallel.make_mesh()
  mngr = checkpoint.manager(ckpt_dir)
  writer = JsonlWriter(metrics_path)
  start = int(jax.device_get(state.step))
  jitted = jax.jit(step_fn, donate_argnums=0)
  progress = progress_lib.bar(desc=desc, total=total_steps, initial=start, unit="step")
  window_start, window_images, pending = time.perf_counter(), 0, []
  unchecked = []  # step metrics not yet checked for NaN/Inf (checked in batches: no sync per step)
  start_loss = None  # the loss of this run's first step (the divergence reference)
  writer.drop_after(start)  # a resumed run replays the steps after its checkpoint
  polled = signals.polled()
  polled.__enter__()  # a signal now waits for the current step (and its checkpoint)
  try:
    for step in range(start, total_steps):
      batch = next(batches)
      state, metrics = jitted(state, parallel.shard_batch(batch, mesh))
      window_images += len(batch["label"]) * jax.process_count()
      pending.append(metrics)
      unchecked.append(metrics)
      done = step + 1
      interrupted = signals.requested() is not None
      if start_loss is None and divergence_factor:
        start_loss = float(jax.device_get(metrics["loss"]))
      if done % log_every == 0 or done % checkpoint_every == 0 or done == total_steps or interrupted:
        check_finite(unchecked, done - len(unchecked), desc)  # before anything is logged or saved
        check_diverged(unchecked, done - len(unchecked), start_loss, divergence_factor, desc)
        unchecked = []
      if done % log_every == 0 or done == total_steps:
        means = jax.tree_util.tree_map(lambda *x: float(np.mean(x)), *jax.device_get(pending))
        elapsed = time.perf_counter() - window_start
        images_per_s = window_images / max(elapsed, 1e-9)
        if learning_rate is not None:  # update number `done` used the schedule at count done - 1
          means["learning_rate"] = float(learning_rate(done - 1))
        writer.write(step=done, images_per_s=images_per_s, **means)
        progress.set_postfix(loss=f"{means['loss']:.3f}", img_s=f"{images_per_s:.0f}")
        window_start, window_images, pending = time.perf_counter(), 0, []
      progress.update(1)
      if done % checkpoint_every == 0 or done == total_steps or interrupted:
        checkpoint.save(mngr, done, state)
      if interrupted:
        mngr.wait_until_finished()
        signals.raise_if_requested(f"{desc} at step {done}/{total_steps}, checkpointed in {ckpt_dir}; rerun the same "
                                   f"command to resume")
      if eval_fn is not None and eval_every > 0 and (done % eval_every == 0 or done == total_steps):
        writer.write_eval(done, eval_fn(state))
      if on_step is not None:
        on_step(done)
  finally:
    polled.__exit__(None, None, None)
    mngr.wait_until_finished()
    mngr.close()
    progress.close()
    writer.close()
  return state


def create_train_state(model, rng, image_shape, tx, init_variables=None) -> TrainState:
  """A fresh `TrainState` at step 0 of `model`, with the optimizer state of `tx`.

  Args:
    model: the Flax module.
    rng: the PRNG key of the initialization (unused with `init_variables`).
    image_shape: (H, W, C) of one image (the model is initialized on a single zero image).
    tx: the optimizer.
    init_variables: optional variables to start from instead of a fresh initialization (a dict
      with 'params' and optionally 'batch_stats').

  Returns:
    The `TrainState` (empty `batch_stats` for models without batch normalization).
  """
  if init_variables is None:
    init_variables = jax.jit(functools.partial(model.init, train=False))(
        rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
  params = init_variables["params"]
  batch_stats = init_variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params))


def total_steps_of(num_epochs: float, num_examples: int, batch_size: int) -> int:
  """Steps of `num_epochs` epochs of `num_examples` examples at `batch_size` (the last one partial).

  Args:
    num_epochs: the number of epochs (may be fractional).
    num_examples: the examples per epoch.
    batch_size: the global batch size.

  Returns:
    The number of steps, rounded up.
  """
  return int(math.ceil(num_epochs * num_examples / batch_size))


def fit(state, step_fn: Callable, train_ds, recipe, *, total_steps: int, seed: int, workdir: str, desc: str,
        log_every: int, mesh=None, num_threads: int = 2, on_step: Callable[[int], None] | None = None,
        eval_fn: Callable[[Any], dict] | None = None, eval_every: int = 0):
  """The training wiring every stage and QAT baseline shares: `state` restored from the newest
  intact checkpoint in <workdir>/checkpoints, then `run_loop` over the deterministic batches of
  `train_ds` from its step on to `total_steps`, with the recipe's checkpoint interval, divergence
  guard and learning-rate schedule; metrics to <workdir>/metrics.jsonl.

  Args:
    state: the initial state (replicated on `mesh`), with a `step`.
    step_fn: `(state, batch) -> (state, metrics)`, pure.
    train_ds: a `data.Dataset`.
    recipe: the training fields (`batch_size`, `checkpoint_every_steps`, `divergence_factor` and
      the schedule's fields, as `make_schedule` reads them).
    total_steps: the run's length (the optimizer's schedule was built for it).
    seed: the batches' seed.
    workdir: the folder of the checkpoints and metrics.
    desc: the progress bar's and the messages' name.
    log_every: steps per logged record.
    mesh: the device mesh.
    num_threads: data loading threads.
    on_step, eval_fn, eval_every: as `run_loop`.

  Returns:
    The state at `total_steps` (restored, not retrained, when a finished run is there).
  """
  ckpt_dir = os.path.join(workdir, "checkpoints")
  state = restore_latest(ckpt_dir, state)
  start = int(state.step)
  if start >= total_steps:
    if total_steps > 0:
      print(f"{desc}: reusing the finished checkpoint at step {start} in {ckpt_dir}")
    return state
  if start:
    print(f"{desc}: resuming from step {start}/{total_steps} in {ckpt_dir}")
  batches = data.train_batches(train_ds, recipe.batch_size, seed=seed, start_step=start, num_steps=total_steps,
                               num_threads=num_threads)
  return run_loop(state, step_fn, batches, total_steps=total_steps, ckpt_dir=ckpt_dir,
                  checkpoint_every=checkpoint_interval(recipe.checkpoint_every_steps, total_steps),
                  metrics_path=os.path.join(workdir, "metrics.jsonl"), log_every=log_every, mesh=mesh, desc=desc,
                  on_step=on_step, divergence_factor=float(recipe.get("divergence_factor", 0.0) or 0.0),
                  learning_rate=make_schedule(recipe, total_steps), eval_fn=eval_fn, eval_every=eval_every)


def restore_latest(ckpt_dir: str, state):
  """`state` restored from the newest intact checkpoint in `ckpt_dir` (unchanged if there is
  none; a damaged newer step is skipped with a warning).

  Args:
    ckpt_dir: the Orbax checkpoint directory.
    state: the target state, giving the structure, shapes and shardings to restore into.

  Returns:
    The restored state, or `state` itself when there is no intact checkpoint.
  """
  mngr = checkpoint.manager(ckpt_dir)
  try:
    return checkpoint.restore_newest_intact(mngr, state)[1]
  finally:
    mngr.close()


def float_logits(model, variables, images):
  """The float model's eval-mode logits (the distillation teacher).

  Args:
    model: the Flax module.
    variables: its variables ('params' and, where it has them, 'batch_stats').
    images: [batch, H, W, C] images.

  Returns:
    The [batch, num_classes] logits.
  """
  return model.apply(variables, images, train=False)
