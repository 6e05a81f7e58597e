"""Multi-ratio quantization-aware finetuning: one set of weights for every ratio the run-time
controller may pick.

Each step samples a ratio (`RatioSampler`: a level — 0 and the selected levels by default — or,
with probability `uniform_prob`, a continuous ratio uniform in [0, 1], so ratio 0 and the ratios
between levels are trained too), adds the ratios trained at every step (`every_step`, e.g. the
two ends), and trains the BN-folded weights through the fake-quant model
(straight-through estimator), optionally with learnable activation scales and per-output-channel
weight scales (LSQ) and distillation from the float model (KL on logits). The step is pure and
jit-compiled once: the ratios are data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from flexiq_jax import layer_ops
from flexiq_jax import numerics
from flexiq_jax import train as train_lib
from flexiq_jax.quantize.transform import QuantizedModel


class QATState(flax.struct.PyTreeNode):
  step: jax.Array
  trainable: Any  # {'params', and with LSQ 'act_scale' / 'lsq_weight_scale': {path: array}}
  frozen: Any  # the rest of the quantized variables (orders, counts, extraction positions)
  opt_state: Any


def _is_layer_entry(d) -> bool:
  """A quantized layer's or attention matmul's entry in qvars['quant'] (a leaf for tree_map)."""
  return isinstance(d, dict) and ("act_scale" in d or "a_scale" in d)


# The trainable entries of a layer's quantization variables: the learnt scales and the ratio
# affine's vectors (`layer_ops.ratio_affine`). Every trainable entry of a QAT state is a
# quantization scale (kept positive, at the scales' rate: FlexiQ's 'act_scale' and
# 'lsq_weight_scale', the baselines' 'scales') except the weights and the output affines, FlexiQ's
# and the switchable baseline's 'affine' (WITH_WEIGHTS).
TRAINABLE_QUANT_KEYS = ("act_scale", "lsq_weight_scale") + layer_ops.RATIO_AFFINE_KEYS
WITH_WEIGHTS = ("params", "affine") + layer_ops.RATIO_AFFINE_KEYS


def split_qvars(qvars, lsq: bool, lsq_weights: bool = False, ratio_affine: bool = False):
  """Trainable part (weights; activation scales under `lsq`; per-output-channel weight scales
  under `lsq_weights`, which qvars must hold: quantize.add_lsq_weight_scales; the ratio affine
  under `ratio_affine`: quantize.add_ratio_affine) and frozen part.

  Args:
    qvars: the quantized variables.
    lsq: make the activation scales trainable.
    lsq_weights: make the 'lsq_weight_scale' entries trainable.
    ratio_affine: make the 'ratio_gain' and 'ratio_bias' entries trainable.

  Returns:
    (trainable, frozen): trainable {'params', and 'act_scale' / 'lsq_weight_scale' / 'ratio_gain' /
    'ratio_bias' trees shaped as qvars['quant'], None at the entries without one (the attention
    matmuls'; the layers never lowered for the ratio affine)}; frozen, every entry of `qvars` but
    'params' (the trainable entries stay in it too and are overridden by `merge_qvars`).
  """
  trainable = {"params": qvars["params"]}
  frozen = {k: v for k, v in qvars.items() if k != "params"}
  keys = ((["act_scale"] if lsq else []) + (["lsq_weight_scale"] if lsq_weights else [])
          + (list(layer_ops.RATIO_AFFINE_KEYS) if ratio_affine else []))
  for key in keys:  # entries without the key: None (e.g. attention matmuls' scales stay as calibrated)
    trainable[key] = jax.tree_util.tree_map(lambda d: d.get(key), frozen["quant"], is_leaf=_is_layer_entry)
  return trainable, frozen


def merge_qvars(trainable, frozen):
  """The quantized variables from the parts of `split_qvars`: the trainable weights and scales put
  back into the frozen part.

  Args:
    trainable: {'params', and optionally 'act_scale' / 'lsq_weight_scale'} as from `split_qvars`.
    frozen: the frozen part.

  Returns:
    The quantized variables, each layer's entry in 'quant' holding the trainable scale where it is
    not None.
  """
  qvars = dict(frozen)
  qvars["params"] = trainable["params"]
  for key in TRAINABLE_QUANT_KEYS:
    if key in trainable:
      qvars["quant"] = jax.tree_util.tree_map(lambda d, s: d if s is None else {**d, key: s}, qvars["quant"],
                                              trainable[key], is_leaf=_is_layer_entry)
  return qvars


def create_state(qvars, tx, lsq: bool, lsq_weights: bool = False, ratio_affine: bool = False) -> QATState:
  """A fresh QAT state of `qvars` (step 0, optimizer state initialised).

  Args:
    qvars: the quantized variables.
    tx: the optax optimizer.
    lsq: train the activation scales.
    lsq_weights: train the per-output-channel weight scales.
    ratio_affine: train the ratio affine (qvars must hold it: quantize.add_ratio_affine).

  Returns:
    A `QATState` holding copies of the trainable and frozen parts.
  """
  return state_from_parts(*split_qvars(qvars, lsq, lsq_weights, ratio_affine), tx)


def state_from_parts(trainable, frozen, tx) -> QATState:
  """A fresh QAT state from trainable and frozen parts (step 0, optimizer state initialised).

  The parts are copied, since the training loop donates its state.

  Args:
    trainable: the trainable part.
    frozen: the frozen part.
    tx: the optax optimizer.

  Returns:
    A `QATState`.
  """
  # Copies: the training loop donates its state, which must not delete the caller's arrays.
  trainable, frozen = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), (trainable, frozen))
  return QATState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                  opt_state=tx.init(trainable))


def kl_divergence(teacher_logits, student_logits):
  """KL(teacher || student), mean over the batch.

  Args:
    teacher_logits: (B, classes) logits of the reference (e.g. the float model).
    student_logits: (B, classes) logits of the model trained or evaluated.

  Returns:
    A float32 scalar, computed from log-softmaxes in float32.
  """
  p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32))
  q = jax.nn.log_softmax(student_logits.astype(jnp.float32))
  return jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1))


def make_loss_fn(batch, *, logits_fn: Callable, teacher_logits=None, frozen=None, distill_weight: float = 0.0,
                 label_smoothing: float = 0.0):
  """trainable -> (loss, (logits, ce)): cross-entropy, mixed with KL to `teacher_logits` when
  distilling. `logits_fn(trainable, frozen, images)` is the quantized forward pass.

  Args:
    batch: {'image', 'label'}.
    logits_fn: the quantized forward pass, (trainable, frozen, images) -> logits.
    teacher_logits: the teacher's logits on batch['image'], or None for no distillation.
    frozen: the frozen part passed to `logits_fn`.
    distill_weight: weight of the KL term; loss = (1 - w) ce + w KL when distilling.
    label_smoothing: label smoothing of the cross-entropy.

  Returns:
    The loss function, for `jax.value_and_grad(..., has_aux=True)`.
  """

  def loss_fn(trainable):
    logits = logits_fn(trainable, frozen, batch["image"])
    ce = train_lib.cross_entropy(logits, batch["label"], label_smoothing)
    loss = ce
    if teacher_logits is not None:
      loss = (1 - distill_weight) * ce + distill_weight * kl_divergence(teacher_logits, logits)
    return loss, (logits, ce)

  return loss_fn


def apply_gradients(state: QATState, grads, tx: optax.GradientTransformation) -> QATState:
  """The optimizer update; the learnt quantization scales (every trainable entry but WITH_WEIGHTS)
  are kept positive.

  Args:
    state: the QAT state.
    grads: gradients, shaped as state.trainable.
    tx: the optax optimizer the state was made with.

  Returns:
    The new state: step + 1, updated trainable (scales floored at numerics.MIN_RANGE) and optimizer state.
  """
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  trainable = {k: v if k in WITH_WEIGHTS else jax.tree_util.tree_map(lambda s: jnp.maximum(s, numerics.MIN_RANGE), v)
               for k, v in trainable.items()}
  return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """The QAT optimizer (`train.make_optimizer` on `cfg`); with `cfg.lsq_learning_rate` > 0 the
  learnt quantization scales (every trainable entry but WITH_WEIGHTS) get the same recipe at that
  learning rate instead (the ratio affine trains with the weights).

  Args:
    cfg: the finetune config section.
    total_steps: the schedule's length.
  Returns:
    An optax transformation over the trainable tree {'params', and 'act_scale' /
    'lsq_weight_scale' where learnt}.
  """
  tx = train_lib.make_optimizer(cfg, total_steps)
  scale_lr = float(cfg.get("lsq_learning_rate", 0.0) or 0.0)
  if scale_lr < 0:
    raise ValueError(f"finetune.lsq_learning_rate must be >= 0 (0: finetune.learning_rate), got {scale_lr}")
  if scale_lr == 0:
    return tx
  if dataclasses.is_dataclass(cfg):  # stage options (frozen): the same recipe at the scales' rate
    scale_cfg = dataclasses.replace(cfg, learning_rate=scale_lr, lsq_learning_rate=0.0)
  else:
    scale_cfg = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    scale_cfg.learning_rate = scale_lr
  scale_tx = train_lib.make_optimizer(scale_cfg, total_steps)
  return optax.multi_transform({"params": tx, "scales": scale_tx},
                               lambda trainable: {k: "params" if k in WITH_WEIGHTS else "scales" for k in trainable})


def teacher_logits_of(teacher_fn, distill_weight, images):
  """The distillation teacher's logits of `images`, or None when not distilling.

  Args:
    teacher_fn: images -> float logits, or None.
    distill_weight: the weight of the KL term; 0 turns distillation off.
    images: the batch's images.

  Returns:
    The teacher's logits (no gradient flows into them), or None.
  """
  if teacher_fn is None or distill_weight <= 0:
    return None
  return jax.lax.stop_gradient(teacher_fn(images))


def distill_step(state: QATState, batch, *, logits_fn: Callable, tx: optax.GradientTransformation,
                 teacher_fn: Callable | None = None, distill_weight: float = 0.0, label_smoothing: float = 0.0,
                 extra_metrics: dict | None = None):
  """One step of quantization-aware training, shared by FlexiQ and the QAT baselines; pure:
  (state, batch) -> (state, metrics). `logits_fn(trainable, frozen, images)` is the quantized
  forward pass. Loss: cross-entropy, mixed with KL to `teacher_fn` when distilling.

  Args:
    state: the QAT state.
    batch: {'image', 'label'}.
    logits_fn: the quantized forward pass, (trainable, frozen, images) -> logits.
    tx: the optax optimizer.
    teacher_fn: images -> teacher logits, or None.
    distill_weight: weight of the KL term (distillation only when > 0 and `teacher_fn` is given).
    label_smoothing: label smoothing of the cross-entropy.
    extra_metrics: metrics added to the returned ones, or None.

  Returns:
    (new state, metrics {'loss', 'ce', 'accuracy', 'grad_norm', and `extra_metrics`}).
  """
  loss_fn = make_loss_fn(batch, logits_fn=logits_fn, frozen=state.frozen,
                         teacher_logits=teacher_logits_of(teacher_fn, distill_weight, batch["image"]),
                         distill_weight=distill_weight, label_smoothing=label_smoothing)
  (loss, (logits, ce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
  metrics = {"loss": loss, "ce": ce, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
             "grad_norm": optax.tree.norm(grads), **(extra_metrics or {})}
  return apply_gradients(state, grads, tx), metrics


@dataclasses.dataclass(frozen=True)
class RatioSampler:
  """The ratios of one QAT step: each of `every_step`, and one sampled ratio: with probability
  `uniform_prob` a continuous ratio uniform in [0, 1]; otherwise one of `levels` drawn with
  `level_probs`. The step's loss is the mean of its ratios' losses weighted by `every_step_weights`
  (one per every-step ratio; the sampled ratio weighs 1; () = all 1)."""

  levels: tuple[float, ...]
  level_probs: tuple[float, ...]
  uniform_prob: float = 0.0
  every_step: tuple[float, ...] = ()
  every_step_weights: tuple[float, ...] = ()

  def __post_init__(self):
    if len(self.levels) != len(self.level_probs) or abs(sum(self.level_probs) - 1) > 1e-6:
      raise ValueError(f"finetune.level_probs {list(self.level_probs)} must have one probability per level "
                       f"{list(self.levels)} summing to 1")
    if not all(0 <= l <= 1 for l in self.levels) or not 0 <= self.uniform_prob <= 1:
      raise ValueError(f"finetune.levels must lie in [0, 1] and finetune.uniform_prob in [0, 1], got "
                       f"{list(self.levels)} and {self.uniform_prob}")
    if not all(0 <= r <= 1 for r in self.every_step):
      raise ValueError(f"finetune.every_step_ratios must lie in [0, 1], got {list(self.every_step)}")
    if self.every_step_weights and len(self.every_step_weights) != len(self.every_step):
      raise ValueError(f"finetune.every_step_weights {list(self.every_step_weights)} must have one weight per "
                       f"every-step ratio {list(self.every_step)} (or be empty: all 1)")
    if not all(0 <= w < math.inf for w in self.every_step_weights):
      raise ValueError(f"finetune.every_step_weights must be finite and >= 0, got {list(self.every_step_weights)}")

  def step_weights(self) -> tuple[float, ...]:
    """The loss weights of one step's ratios, normalised to sum 1.

    Returns:
      One weight per every-step ratio, then the sampled ratio's.
    """
    raw = tuple(self.every_step_weights or (1.0,) * len(self.every_step)) + (1.0,)
    return tuple(w / sum(raw) for w in raw)

  @classmethod
  def from_config(cls, finetune_cfg, select_levels) -> "RatioSampler":
    """finetune.levels (default: 0 and the selected levels), finetune.level_probs (default
    uniform), finetune.uniform_prob, finetune.every_step_ratios (default none) and
    finetune.every_step_weights (default all 1)."""
    levels = tuple(float(l) for l in finetune_cfg.levels) or (0.0,) + tuple(float(l) for l in select_levels)
    probs = tuple(float(p) for p in finetune_cfg.level_probs) or (1.0 / len(levels),) * len(levels)
    every_step = tuple(float(r) for r in finetune_cfg.get("every_step_ratios", ()) or ())
    weights = tuple(float(w) for w in finetune_cfg.get("every_step_weights", ()) or ())
    return cls(levels, probs, float(finetune_cfg.get("uniform_prob", 0.0)), every_step, weights)

  def trains(self, ratio: float) -> bool:
    """Whether QAT steps train at `ratio`: a level drawn with a positive probability, an
    every-step ratio, or any ratio when continuous ratios are drawn.

    Args:
      ratio: a ratio in [0, 1].

    Returns:
      True where the sampler can train at `ratio`.
    """
    levels = {l for l, p in zip(self.levels, self.level_probs) if p > 0}
    return self.uniform_prob > 0 or ratio in levels or ratio in self.every_step

  def __call__(self, rng):
    pick, cont = jax.random.split(rng)
    levels = jnp.asarray(self.levels, jnp.float32)
    level = levels[jax.random.choice(pick, len(self.levels), p=jnp.asarray(self.level_probs, jnp.float32))]
    continuous = jax.random.uniform(cont, (), jnp.float32)
    use_continuous = jax.random.uniform(jax.random.fold_in(cont, 1), ()) < self.uniform_prob
    return jnp.where(use_continuous, continuous, level)


# Batch seeds relative to the config's seed: FlexiQ's finetunings (multi-ratio and 100%-only) and the
# QAT baselines (LSQ, switchable) draw different shuffles of the training split.
FLEXIQ_SEED_OFFSET = 1
BASELINE_SEED_OFFSET = 2


def passes_per_step(finetune_cfg) -> int:
  """Forward+backward passes of one multi-ratio QAT step: the sampled ratio and each of
  finetune.every_step_ratios.

  Args:
    finetune_cfg: the config's finetune section.

  Returns:
    1 + the number of every-step ratios.
  """
  return 1 + len(tuple(finetune_cfg.get("every_step_ratios", ()) or ()))


def pass_matched_steps(finetune_cfg, num_examples: int, passes: int = 1) -> int:
  """Steps of a QAT method that makes `passes` forward+backward passes per step, so that it makes
  as many passes as FlexiQ's finetuning (finetune.num_epochs of `num_examples` at
  finetune.batch_size, `passes_per_step` each). The budget every QAT baseline gets.

  Args:
    finetune_cfg: the config's finetune section.
    num_examples: size of the training split.
    passes: passes per step of the method being budgeted.

  Returns:
    The number of steps (at least 1 when FlexiQ trains at all).
  """
  flexiq_steps = train_lib.total_steps_of(finetune_cfg.num_epochs, num_examples, finetune_cfg.batch_size)
  return int(math.ceil(flexiq_steps * passes_per_step(finetune_cfg) / passes))


def qat_step(state: QATState, batch, *, qmodel: QuantizedModel, tx: optax.GradientTransformation,
             sampler: RatioSampler, rng_key, teacher_fn: Callable | None = None, distill_weight: float = 0.0,
             label_smoothing: float = 0.0):
  """One multi-ratio QAT step (the ratios are data: one compilation). The loss is the mean of the
  losses at each of the sampler's `every_step` ratios and at its random ratio, weighted by
  `sampler.step_weights()`.

  Why `every_step`: with one sampled ratio per step, each ratio is trained on a share of the
  steps only, and the shared weights follow whichever ratio the last steps drew. Training chosen
  ratios (the ends, say) at every step is the "sandwich rule" of slimmable networks (Yu & Huang
  2019). The ratios run one after another (`lax.scan`): activation memory of one forward pass,
  time of 1 + len(every_step) steps.

  Args:
    state: the QAT state.
    batch: {'image', 'label'}.
    qmodel: the quantized model (typically mode 'fake').
    tx: the optax optimizer.
    sampler: the ratio sampler.
    rng_key: PRNG key; the step's ratio is drawn from it folded with the state's step.
    teacher_fn: images -> teacher logits, or None.
    distill_weight: weight of the KL term (distillation only when > 0 and `teacher_fn` is given).
    label_smoothing: label smoothing of the cross-entropy.

  Returns:
    (new state, metrics {'loss', 'ce', 'accuracy', 'grad_norm', 'ratio' (the sampled one), and
    'kl_to_float' when distilling}): loss and ce weighted over the step's ratios as the
    gradient is (`sampler.step_weights()`), accuracy and KL their plain mean.
  """
  sampled = sampler(jax.random.fold_in(rng_key, state.step))
  teacher = teacher_logits_of(teacher_fn, distill_weight, batch["image"])

  def loss_and_grads_at(ratio):
    loss_fn = make_loss_fn(batch, logits_fn=lambda t, f, x: qmodel.apply(merge_qvars(t, f), x, ratio),
                           frozen=state.frozen, teacher_logits=teacher, distill_weight=distill_weight,
                           label_smoothing=label_smoothing)
    (loss, (logits, ce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    kl = kl_divergence(teacher, logits) if teacher is not None else jnp.float32(0)
    return (loss, ce, accuracy, kl), grads

  def accumulate(total, ratio_and_weight):
    ratio, weight = ratio_and_weight
    values, grads = loss_and_grads_at(ratio)
    return jax.tree_util.tree_map(lambda t, g: t + weight * g, total, grads), values

  if not sampler.every_step:
    (loss, ce, accuracy, kl), grads = loss_and_grads_at(sampled)
  else:
    ratios = jnp.concatenate([jnp.asarray(sampler.every_step, jnp.float32), sampled[None]])
    weights = jnp.asarray(sampler.step_weights(), jnp.float32)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
    grads, (losses, ces, accuracies, kls) = jax.lax.scan(accumulate, zeros, (ratios, weights))
    loss, ce, accuracy, kl = losses @ weights, ces @ weights, accuracies.mean(), kls.mean()
  metrics = {"loss": loss, "ce": ce, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads), "ratio": sampled}
  if teacher is not None:  # KL(float || quantized) on the training batch, at the step's ratios
    metrics["kl_to_float"] = kl
  return apply_gradients(state, grads, tx), metrics
