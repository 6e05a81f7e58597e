"""Uniform baselines on the layer-wise apply: post-training W8A8/W4A4 (min-max or MSE ranges,
per-output-channel weights, per-tensor activations) and uniform 4-bit QAT with LSQ.

Uniform means every quantized layer at the same candidate, except that with `keep_ends` the
first and last quantized layers (plan.quantized minus plan.lowerable: FlexiQ's keep_8bit rule)
stay W8A8 — as FlexiQ keeps them, and as the LSQ paper does — so the baselines and FlexiQ's
ratio-1 point cost the same BOPs.

The activation x activation matmuls (attention's q·kᵀ and attn·v) run in float in these
baselines (`LsqLayers.matmul`, layerwise.LayerwiseBits.matmul), while FlexiQ runs them at 8 bits.
Their BOPs are counted at 8 x 8 bits for every method (`relative_bops`), so all rows share one
BOPs axis; the baselines' accuracy is measured with those matmuls unquantized.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from flexiq_jax import cost
from flexiq_jax import data
from flexiq_jax import finetune
from flexiq_jax import interception
from flexiq_jax import judge
from flexiq_jax import numerics
from flexiq_jax import parallel
from flexiq_jax import train as train_lib
from flexiq_jax.interception import LayerCall, MatmulCall


def uniform_bits(plan, bits: tuple[int, int], keep_ends: bool) -> dict:
  """{path: (w, a)}: every quantized layer at `bits`; the non-lowerable ones at W8A8 if keep_ends.

  Args:
    plan: The QuantPlan.
    bits: (weight bits, act bits) of the uniform candidate.
    keep_ends: Whether the non-lowerable layers stay at W8A8.

  Returns:
    A dict {path: (weight bits, act bits)} over plan.quantized.
  """
  return {p: ((8, 8) if keep_ends and p not in plan.lowerable else tuple(bits)) for p in plan.quantized}


def relative_bops(plan, bits: dict) -> float:
  """Layer-wise BOPs relative to every quantized layer at W8A8, with the plan's quantized matmuls
  at 8 x 8 bits in both (as FlexiQ's relative BOPs).

  Args:
    plan: The QuantPlan (its layer and matmul infos).
    bits: {path: (weight bits, act bits)}; layers not listed count at cost.layerwise_bops' default.

  Returns:
    The relative BOPs as a float.
  """
  layers, matmuls = plan.layer_infos(), plan.matmul_infos()
  return cost.layerwise_bops(layers, bits, matmuls=matmuls) / cost.layerwise_bops(layers, {}, (8, 8), matmuls)


def _key(path: str) -> str:
  return path.replace("/", ".")  # a flat key per layer keeps the scales tree one level deep


@dataclasses.dataclass(frozen=True)
class LsqLayers:
  """The provider of LSQ fake quantization (Esser et al. 2020): per-tensor activation scales and
  per-output-channel weight scales, both learnable, at fixed bits per layer. Matmuls (q·kᵀ,
  attn·v) stay float."""

  scales: dict  # {flat key: {'act': (), 'weight': (O,)}}
  bits: dict  # {path: (weight bits, act bits)}
  signed: dict

  def layer(self, call: LayerCall, x):
    wb, ab = self.bits[call.path]
    s = self.scales[_key(call.path)]
    a_qmin, a_qmax = numerics.int_range(ab, self.signed[call.path])
    # LSQ's activation gradient scale counts the features of one example, not the batch.
    g = numerics.lsq_default_grad_scale(x.size // x.shape[0], 1, a_qmax)
    x = numerics.lsq_fake_quant(x, s["act"], a_qmin, a_qmax, g)
    w_qmax = 2 ** (wb - 1) - 1
    wm = interception.kernel_matrix(call.info, call.kernel)
    wm = numerics.lsq_fake_quant(wm, s["weight"], -w_qmax, w_qmax)
    return call.float_forward(x, wm.reshape(call.kernel.shape))

  def matmul(self, call: MatmulCall, a, b):
    return call.float_forward(a, b)


@dataclasses.dataclass(frozen=True)
class LsqForward:
  """logits_fn(trainable, frozen, images) of the LSQ model, for finetune.distill_step."""

  model: object
  plan: object
  bits: dict

  def __call__(self, trainable, frozen, images):
    provider = LsqLayers(trainable["scales"], self.bits, self.plan.signed)
    variables = {"params": trainable["params"], **frozen}
    return interception.run_with_provider(self.model, self.plan, variables, images, provider)


def lsq_initial_scales(plan, tables, bits: dict) -> dict:
  """LSQ scales initialised from the post-training clipping ranges in `tables`.

  Each scale is the clip at the layer's bit width (floored at numerics.MIN_RANGE) over the largest
  code: the activation's per-tensor scale and the weight's per-output-channel scales.

  Args:
    plan: The QuantPlan (quantized layers and their signedness).
    tables: Clipping tables {path: {'act_clip', 'weight_clip'}} indexed by bit width.
    bits: {path: (weight bits, act bits)} for every quantized layer.

  Returns:
    A dict {flat key: {'act': scalar, 'weight': (O,)}}, the key being the path with '/' -> '.'.
  """
  scales = {}
  for p in plan.quantized:
    wb, ab = bits[p]
    _, a_qmax = numerics.int_range(ab, plan.signed[p])
    w_qmax = 2 ** (wb - 1) - 1
    scales[_key(p)] = {"act": jnp.maximum(tables[p]["act_clip"][ab], numerics.MIN_RANGE) / a_qmax,
                       "weight": jnp.maximum(tables[p]["weight_clip"][wb], numerics.MIN_RANGE) / w_qmax}
  return scales


# The finetune fields LSQ QAT trains with (FlexiQ's budget and recipe; not its ratio sampling,
# refresh or learnable scales, which are FlexiQ's own).
LSQ_FINETUNE_FIELDS = ("num_epochs", "batch_size", "optimizer", "learning_rate", "momentum", "nesterov",
                       "weight_decay", "schedule", "warmup_steps", "label_smoothing", "grad_clip_norm",
                       "distill_weight")


def qat_baseline_recipe(config, passes: int):
  """The recipe of a QAT baseline: config.finetune at config.compare.lsq_learning_rate when set,
  for as many forward+backward passes as FlexiQ's finetuning at `passes` per step.

  Args:
    config: The run config (reads config.finetune, config.compare and config.data).
    passes: Forward+backward passes one step of the baseline makes.

  Returns:
    (the finetune recipe, the training dataset, the number of steps, the optimizer).
  """
  cfg = config.finetune.copy_and_resolve_references()
  lsq_lr = config.get("compare", {}).get("lsq_learning_rate", 0.0)
  if lsq_lr > 0:
    cfg.learning_rate = lsq_lr
  train_ds = data.get_dataset(config.data, config.data.train_split, train=True)
  total_steps = finetune.pass_matched_steps(cfg, train_ds.num_examples, passes=passes)
  return cfg, train_ds, total_steps, train_lib.make_optimizer(cfg, total_steps)


def lsq_qat(config, workdir: str, model, variables, plan, folded, tables, bits: dict, eval_batches,
            mesh=None, reference_logits=None) -> dict:
  """Uniform QAT with LSQ, initialised from the PTQ ranges in `tables`, trained with the budget
  and recipe of config.finetune (as many forward+backward passes as FlexiQ's finetuning,
  `finetune.pass_matched_steps`; batch size, optimizer, distillation) through the same
  resumable loop and step as FlexiQ's finetuning, at config.compare.lsq_learning_rate when set.
  Checkpoints go to <workdir>/checkpoints. Returns train.evaluate's metrics on `eval_batches`
  (agreement / KL / SQNR too with the float `reference_logits`) with 'steps' and 'learning_rate'.

  Args:
    config: The run config.
    workdir: Directory of the checkpoints.
    model: The float Flax model.
    variables: The float model's variables (the distillation teacher and the judge's reference).
    plan: The calibration's QuantPlan.
    folded: BN-folded variables, the starting weights.
    tables: PTQ clipping tables the LSQ scales start from.
    bits: {path: (weight bits, act bits)} for every quantized layer.
    eval_batches: Evaluation batches.
    mesh: Device mesh; default `parallel.make_mesh()`.
    reference_logits: Optional float logits of eval_batches.

  Returns:
    The metrics dict with 'steps', 'learning_rate' and 'judge' (the verdict of
    judge.judge_uniform_qat; a warning is printed when it refuses).
  """
  mesh = mesh or parallel.make_mesh()
  cfg, train_ds, total_steps, tx = qat_baseline_recipe(config, passes=1)
  trainable = {"params": folded["params"], "scales": lsq_initial_scales(plan, tables, bits)}
  frozen = {"batch_stats": folded["batch_stats"]} if "batch_stats" in folded else {}
  state = parallel.replicate(finetune.state_from_parts(trainable, frozen, tx), mesh)
  forward = LsqForward(model, plan, bits)
  teacher = (functools.partial(train_lib.float_logits, model, variables) if cfg.distill_weight > 0 else None)
  step_fn = functools.partial(finetune.distill_step, logits_fn=forward, tx=tx, teacher_fn=teacher,
                              distill_weight=cfg.distill_weight, label_smoothing=cfg.label_smoothing)
  state = train_lib.fit(state, step_fn, train_ds, cfg, total_steps=total_steps, seed=config.seed + 2, workdir=workdir,
                        desc="LSQ QAT", log_every=config.train.log_every_steps, mesh=mesh,
                        num_threads=config.data.num_threads)
  predict = lambda images, trainable, frozen: forward(trainable, frozen, images)
  metrics = train_lib.evaluate(predict, iter(eval_batches), mesh, desc="LSQ eval", args=(state.trainable, state.frozen),
                               reference_logits=reference_logits)
  frozen_now = state.frozen
  verdict = judge.judge_uniform_qat(config, functools.partial(train_lib.float_logits, model, variables),
                                    lambda t, x: forward(t, frozen_now, x), trainable, state.trainable,
                                    total_steps=total_steps, train_seed=config.seed + 2)
  if not verdict["accepted"]:
    print(f"warning: LSQ QAT ended worse than its PTQ start ({', '.join(verdict['failed'])}) on {verdict['images']}: "
          f"top-1 {verdict['before_qat']['top1']:.2f}% -> {verdict['after_qat']['top1']:.2f}%, KL "
          f"{verdict['before_qat']['kl']:.4g} -> {verdict['after_qat']['kl']:.4g}; its row is marked refused. Lower "
          f"compare.lsq_learning_rate or set finetune.grad_clip_norm.")
  return {**metrics, "steps": total_steps, "learning_rate": float(cfg.learning_rate), "judge": verdict}


# The two precisions of the switchable-precision baseline, highest first.
SWITCHABLE_BITS = ((8, 8), (4, 4))


def switchable_step(state: finetune.QATState, batch, *, forwards: tuple, tx: optax.GradientTransformation,
                    teacher_fn=None, distill_weight: float = 0.0, label_smoothing: float = 0.0):
  """One step of switchable-precision QAT (Any-Precision DNN, Yu et al. 2021): the loss is the mean
  of the losses of one set of weights at every precision, each with its own learnt LSQ scales
  (switchable clipping, as AdaBits). Pure: (state, batch) -> (state, metrics).

  Args:
    state: trainable {'params', 'scales': ({...} per precision)} and the frozen variables.
    batch: {'image', 'label'}.
    forwards: one `LsqForward` per precision, in the order of state.trainable['scales'].
    tx: the optimizer.
    teacher_fn: float logits for distillation, or None.
    distill_weight: weight of KL(teacher || student) in the loss.
    label_smoothing: of the cross-entropy.

  Returns:
    The new state and {'loss', 'ce', 'accuracy', 'grad_norm', 'accuracy_<w>w<a>a' per precision}.
  """
  teacher = finetune.teacher_logits_of(teacher_fn, distill_weight, batch["image"])

  def loss_fn(trainable):
    losses, ces, accs = [], [], []
    for forward, scales in zip(forwards, trainable["scales"]):
      one = finetune.make_loss_fn(batch, logits_fn=forward, teacher_logits=teacher, frozen=state.frozen,
                                  distill_weight=distill_weight, label_smoothing=label_smoothing)
      loss, (logits, ce) = one({"params": trainable["params"], "scales": scales})
      losses.append(loss)
      ces.append(ce)
      accs.append(jnp.mean(jnp.argmax(logits, -1) == batch["label"]))
    return sum(losses) / len(losses), (sum(ces) / len(ces), accs)

  (loss, (ce, accs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
  metrics = {"loss": loss, "ce": ce, "accuracy": sum(accs) / len(accs), "grad_norm": optax.tree.norm(grads)}
  for (w, a), acc in zip(SWITCHABLE_BITS, accs):
    metrics[f"accuracy_w{w}a{a}"] = acc
  return finetune.apply_gradients(state, grads, tx), metrics


def switchable_qat(config, workdir: str, model, variables, plan, folded, tables: dict, keep_ends: bool, eval_batches,
                   mesh=None, reference_logits=None) -> list[dict]:
  """Switchable-precision QAT: one set of BN-folded weights trained jointly at W8A8 and W4A4
  (every quantized layer; with `keep_ends` the first and last stay W8A8 in both, as FlexiQ keeps
  them), each precision with its own LSQ scales initialised from the PTQ ranges in `tables`, and
  switched at run time by choosing the scales. Same recipe as `lsq_qat` (config.finetune at
  config.compare.lsq_learning_rate when set) and the same number of forward+backward passes as
  FlexiQ's finetuning: a step makes one pass per precision, so it runs half the steps of LSQ.
  BN is folded before training, so there is no switchable BN (the paper's per-precision BN).

  Args:
    config: the run config.
    workdir: where its checkpoints and metrics go.
    model, variables: the float model.
    plan, folded: the calibration's plan and BN-folded variables.
    tables: PTQ clipping tables with entries for 4 and 8 bits.
    keep_ends: keep the non-lowerable layers at W8A8.
    eval_batches: the evaluation batches (a list: it is iterated once per precision).
    mesh: the device mesh.
    reference_logits: float logits of eval_batches, for agreement / KL / SQNR.

  Returns:
    One metrics dict per precision of SWITCHABLE_BITS (train.evaluate's, with 'bits', 'steps',
    'learning_rate', 'relative_bops' and the judge's verdict of that precision).
  """
  mesh = mesh or parallel.make_mesh()
  cfg, train_ds, total_steps, tx = qat_baseline_recipe(config, passes=len(SWITCHABLE_BITS))
  bits = [uniform_bits(plan, b, keep_ends) for b in SWITCHABLE_BITS]
  forwards = tuple(LsqForward(model, plan, b) for b in bits)
  start = {"params": folded["params"], "scales": tuple(lsq_initial_scales(plan, tables, b) for b in bits)}
  frozen = {"batch_stats": folded["batch_stats"]} if "batch_stats" in folded else {}
  state = parallel.replicate(finetune.state_from_parts(start, frozen, tx), mesh)
  teacher = (functools.partial(train_lib.float_logits, model, variables) if cfg.distill_weight > 0 else None)
  step_fn = functools.partial(switchable_step, forwards=forwards, tx=tx, teacher_fn=teacher,
                              distill_weight=cfg.distill_weight, label_smoothing=cfg.label_smoothing)
  state = train_lib.fit(state, step_fn, train_ds, cfg, total_steps=total_steps, seed=config.seed + 2, workdir=workdir,
                        desc="switchable QAT", log_every=config.train.log_every_steps, mesh=mesh,
                        num_threads=config.data.num_threads)
  out = []
  float_fn = functools.partial(train_lib.float_logits, model, variables)
  for i, (b, forward) in enumerate(zip(SWITCHABLE_BITS, forwards)):
    pick = lambda t, i=i: {"params": t["params"], "scales": t["scales"][i]}
    predict = lambda images, trainable, frozen, forward=forward, pick=pick: forward(pick(trainable), frozen, images)
    metrics = train_lib.evaluate(predict, iter(eval_batches), mesh, desc=f"switchable W{b[0]}A{b[1]} eval",
                                 args=(state.trainable, state.frozen), reference_logits=reference_logits)
    frozen_now = state.frozen
    verdict = judge.judge_uniform_qat(config, float_fn, lambda t, x, forward=forward: forward(t, frozen_now, x),
                                      pick(start), pick(state.trainable), total_steps=total_steps,
                                      train_seed=config.seed + 2, label=f"W{b[0]}A{b[1]}")
    if not verdict["accepted"]:
      print(f"warning: switchable QAT at W{b[0]}A{b[1]} ended worse than its PTQ start ({', '.join(verdict['failed'])})"
            f"; its row is marked refused.")
    out.append({**metrics, "bits": b, "steps": total_steps, "learning_rate": float(cfg.learning_rate),
                "relative_bops": relative_bops(plan, bits[i]), "judge": verdict})
  return out
