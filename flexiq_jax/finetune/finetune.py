"""Multi-ratio quantization-aware finetuning: one set of weights for every ratio level.

Each step samples a ratio level (configurable levels and probabilities) and trains the BN-folded
weights through the fake-quant model (straight-through estimator), optionally with learnable
activation scales (LSQ) and distillation from the float model (KL on logits). The step is pure
and jit-compiled once: the sampled ratio is data.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from flexiq_jax import numerics
from flexiq_jax import train as train_lib
from flexiq_jax.quantize.transform import QuantizedModel


class QATState(flax.struct.PyTreeNode):
  step: jax.Array
  trainable: Any  # {'params': ..., 'act_scale': {path: ()}} (the latter only with LSQ)
  frozen: Any  # the rest of the quantized variables (orders, counts, extraction positions)
  opt_state: Any


def split_qvars(qvars, lsq: bool):
  """Trainable part (weights, and activation scales under LSQ) and frozen part."""
  trainable = {"params": qvars["params"]}
  frozen = {k: v for k, v in qvars.items() if k != "params"}
  if lsq:
    trainable["act_scale"] = jax.tree_util.tree_map(
        lambda d: d["act_scale"], frozen["quant"], is_leaf=lambda d: isinstance(d, dict) and "act_scale" in d)
  return trainable, frozen


def merge_qvars(trainable, frozen):
  qvars = dict(frozen)
  qvars["params"] = trainable["params"]
  if "act_scale" in trainable:
    def put(d, s):
      return {**d, "act_scale": s}
    qvars["quant"] = jax.tree_util.tree_map(put, frozen["quant"], trainable["act_scale"],
                                            is_leaf=lambda d: isinstance(d, dict) and "act_scale" in d)
  return qvars


def create_state(qvars, tx, lsq: bool) -> QATState:
  return state_from_parts(*split_qvars(qvars, lsq), tx)


def state_from_parts(trainable, frozen, tx) -> QATState:
  # Copies: the training loop donates its state, which must not delete the caller's arrays.
  trainable, frozen = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), (trainable, frozen))
  return QATState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                  opt_state=tx.init(trainable))


def kl_divergence(teacher_logits, student_logits):
  """KL(teacher || student), mean over the batch."""
  p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32))
  q = jax.nn.log_softmax(student_logits.astype(jnp.float32))
  return jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1))


def distill_step(state: QATState, batch, *, logits_fn: Callable, tx: optax.GradientTransformation,
                 teacher_fn: Callable | None = None, distill_weight: float = 0.0, label_smoothing: float = 0.0,
                 extra_metrics: dict | None = None):
  """One step of quantization-aware training, shared by FlexiQ and the QAT baselines; pure:
  (state, batch) -> (state, metrics). `logits_fn(trainable, frozen, images)` is the quantized
  forward pass. Loss: cross-entropy, mixed with KL to `teacher_fn` when distilling. Every
  trainable entry besides 'params' is a quantization scale and is kept positive."""
  teacher = None
  if teacher_fn is not None and distill_weight > 0:
    teacher = jax.lax.stop_gradient(teacher_fn(batch["image"]))

  def loss_fn(trainable):
    logits = logits_fn(trainable, state.frozen, batch["image"])
    ce = train_lib.cross_entropy(logits, batch["label"], label_smoothing)
    loss = ce
    if teacher is not None:
      loss = (1 - distill_weight) * ce + distill_weight * kl_divergence(teacher, logits)
    return loss, (logits, ce)

  (loss, (logits, ce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  trainable = {k: v if k == "params" else jax.tree_util.tree_map(lambda s: jnp.maximum(s, numerics.MIN_RANGE), v)
               for k, v in trainable.items()}
  metrics = {"loss": loss, "ce": ce, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             "grad_norm": optax.tree.norm(grads), **(extra_metrics or {})}
  return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def qat_step(state: QATState, batch, *, qmodel: QuantizedModel, tx: optax.GradientTransformation,
             levels, level_probs, rng_key, teacher_fn: Callable | None = None, distill_weight: float = 0.0,
             label_smoothing: float = 0.0):
  """One multi-ratio QAT step at a randomly sampled ratio level (the ratio is data: one compilation)."""
  rng = jax.random.fold_in(rng_key, state.step)
  levels = jnp.asarray(levels, jnp.float32)
  ratio = levels[jax.random.choice(rng, len(levels), p=jnp.asarray(level_probs, jnp.float32))]

  def logits_fn(trainable, frozen, images):
    return qmodel.apply(merge_qvars(trainable, frozen), images, ratio)

  return distill_step(state, batch, logits_fn=logits_fn, tx=tx, teacher_fn=teacher_fn,
                      distill_weight=distill_weight, label_smoothing=label_smoothing,
                      extra_metrics={"ratio": ratio})
