"""Uniform baselines on the layer-wise apply: post-training W8A8/W4A4 (min-max or MSE ranges,
per-output-channel weights, per-tensor activations) and uniform 4-bit QAT with LSQ.

Uniform means every quantized layer at the same candidate, except that with `keep_ends` the
first and last quantized layers (plan.quantized minus plan.lowerable: FlexiQ's keep_8bit rule)
stay W8A8 — as FlexiQ keeps them, and as the LSQ paper does — so the baselines and FlexiQ's
ratio-1 point cost the same BOPs.

The activation x activation matmuls (attention's q·kᵀ and attn·v, plan.quantized_matmuls) run
in these baselines exactly as in FlexiQ: at 8 bits whatever the layers' bits, with the calibrated
per-tensor min-max scales (the tables' matmul entries, `layerwise.apply.build_tables`) and the
plan's signedness, through `layer_ops.quantized_matmul` in fake mode (`LsqLayers.matmul`,
layerwise.LayerwiseBits.matmul); their scales are fixed, never learnt (LSQ learns the layers'
scales only). With quant.attention='float' the plan quantizes none, and every method leaves them
float. Their BOPs are counted at 8 x 8 bits for every method (`relative_bops`), so all rows share
one BOPs axis.

The activation grid follows `quant.act_grid` alike: a layer the calibration put on the asymmetric
grid (its statistics' 'act_zero_point' > 0) has its input quantized by every baseline on an
asymmetric grid at the baseline's own width b (unsigned [0, 2^b-1], step (hi - lo) / (2^b-1) over
the calibrated range, zero point round(-lo / step), as TFLite/PyTorch: the tables' 'act_zero',
`layerwise.apply.build_tables`); the other layers keep their symmetric grids. The baselines
extract no bits, so their zero points need not be multiples of 16 as FlexiQ's 8-bit one is. LSQ
learns the step with the zero point fixed at its initial value (`lsq_zero_points`; LSQ+ would
learn the offset too, not built here).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from flexiq_jax import cost
from flexiq_jax import data
from flexiq_jax import finetune
from flexiq_jax import interception
from flexiq_jax import judge
from flexiq_jax import layer_ops
from flexiq_jax import lr_select
from flexiq_jax import numerics
from flexiq_jax import parallel
from flexiq_jax import train as train_lib
from flexiq_jax.interception import LayerCall, MatmulCall
from flexiq_jax.layerwise import apply as apply_lib


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
  per-output-channel weight scales, both learnable, at fixed bits per layer. A layer in
  `zero_points` (on the asymmetric grid) has unsigned activation codes with that fixed zero point
  (LSQ's symmetric formulation plus a fixed offset: no gradient to it). The matmuls routed to
  it (plan.quantized_matmuls: q·kᵀ, attn·v) run at 8 bits with fixed calibrated scales, as FlexiQ
  runs them (`layer_ops.quantized_matmul`, fake: straight-through to the operands, no gradient to
  the scales)."""

  scales: dict  # {flat key: {'act': (), 'weight': (O,)}}
  bits: dict  # {path: (weight bits, act bits)}
  signed: dict
  matmul_scales: dict  # {matmul path: {'a_scale', 'b_scale'}}: layerwise.apply.matmul_tables
  matmul_signed: dict  # {matmul path: (a signed, b signed)}: plan.matmul_signed
  zero_points: dict = dataclasses.field(default_factory=dict)  # {path: z}: `lsq_zero_points`
  affine: dict | None = None  # {flat key: {'gain', 'bias'}}: `switchable_affine`, or None

  def layer(self, call: LayerCall, x):
    wb, ab = self.bits[call.path]
    s = self.scales[_key(call.path)]
    a_qmin, a_qmax = numerics.int_range(ab, self.signed[call.path])
    # LSQ's activation gradient scale counts the features of one example, not the batch.
    g = numerics.lsq_default_grad_scale(x.size // x.shape[0], 1, a_qmax)
    if call.path in self.zero_points:
      x = numerics.lsq_fake_quant(x, s["act"], a_qmin, a_qmax, g, zero_point=self.zero_points[call.path])
    else:
      x = numerics.lsq_fake_quant(x, s["act"], a_qmin, a_qmax, g)
    w_qmax = 2 ** (wb - 1) - 1
    wm = interception.kernel_matrix(call.info, call.kernel)
    wm = numerics.lsq_fake_quant(wm, s["weight"], -w_qmax, w_qmax)
    y = call.float_forward(x, wm.reshape(call.kernel.shape))
    if self.affine is None or _key(call.path) not in self.affine:
      return y
    # The output before the bias, times (1 + gain), plus the learnt bias: FlexiQ's ratio affine at
    # share 1 (layer_ops.ratio_affine).
    a, info = self.affine[_key(call.path)], call.info
    shape = tuple(info.kernel_shape[info.contracted_axes:]) if info.kind == "dense" else (info.out_channels,)
    bias = 0.0 if call.bias is None else call.bias.reshape(shape)
    return (y - bias) * (1.0 + a["gain"].reshape(shape)) + a["bias"].reshape(shape) + bias

  def matmul(self, call: MatmulCall, a, b):
    return layer_ops.quantized_matmul(call, a, b, self.matmul_scales[call.path],
                                      signed=self.matmul_signed[call.path], mode="fake")


@dataclasses.dataclass(frozen=True)
class LsqForward:
  """logits_fn(trainable, frozen, images) of the LSQ model, for finetune.distill_step; the plan's
  quantized matmuls at 8 bits with the fixed scales `matmul_scales` and the asymmetric-grid layers'
  inputs with the fixed `zero_points` (constants, not trained)."""

  model: object
  plan: object
  bits: dict
  matmul_scales: dict  # {matmul path: {'a_scale', 'b_scale'}}: layerwise.apply.matmul_tables
  zero_points: dict = dataclasses.field(default_factory=dict)  # {path: z}: `lsq_zero_points`

  def __call__(self, trainable, frozen, images):
    provider = LsqLayers(trainable["scales"], self.bits, self.plan.signed, self.matmul_scales,
                         self.plan.matmul_signed, self.zero_points, trainable.get("affine"))
    variables = {"params": trainable["params"], **frozen}
    return interception.run_with_provider(self.model, self.plan, variables, images, provider)


def lsq_initial_scales(plan, tables, bits: dict) -> dict:
  """LSQ scales initialised from the post-training clipping ranges in `tables`.

  Each scale is the clip at the layer's bit width (floored at numerics.MIN_RANGE) over the largest
  code: the activation's per-tensor scale and the weight's per-output-channel scales. On the
  asymmetric grid the clip is the range's width and the largest code 2^b - 1 (the layer is
  unsigned in the plan), so the step is that of the tables' grid, whose zero point
  `lsq_zero_points` gives.

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


def switchable_affine(plan) -> dict:
  """The switchable network's learnt output gain and bias at its low precision (zeros: the
  identity), one pair of (O,) vectors per lowerable layer: the freedom `finetune.ratio_affine`
  gives FlexiQ at ratio 1, and that a per-precision batch norm gives Any-Precision DNN.

  Args:
    plan: the QuantPlan.

  Returns:
    {flat key: {'gain': zeros (O,), 'bias': zeros (O,)}} over plan.lowerable.
  """
  return {_key(p): {k: jnp.zeros((plan.layers[p].out_channels,), jnp.float32) for k in ("gain", "bias")}
          for p in plan.lowerable}


def lsq_zero_points(plan, tables, bits: dict) -> dict:
  """The fixed zero points of the LSQ activation grids: those of the post-training tables at each
  layer's activation width, for the layers on the asymmetric grid (their tables' 'act_zero').

  Args:
    plan: The QuantPlan (its quantized layers).
    tables: Clipping tables (`layerwise.apply.build_tables`).
    bits: {path: (weight bits, act bits)} for every quantized layer.

  Returns:
    {path: () float32 zero point}; empty where no layer is on the asymmetric grid.
  """
  return {p: tables[p]["act_zero"][bits[p][1]] for p in plan.quantized if "act_zero" in tables[p]}


# The finetune fields LSQ QAT trains with (FlexiQ's budget and recipe; not its ratio sampling,
# refresh or learnable scales, which are FlexiQ's own).
LSQ_FINETUNE_FIELDS = ("num_epochs", "batch_size", "optimizer", "learning_rate", "momentum", "nesterov",
                       "weight_decay", "schedule", "warmup_steps", "label_smoothing", "grad_clip_norm",
                       "distill_weight")


def qat_baseline_recipe(config, passes: int, learning_rate: float | None = None):
  """The recipe of a QAT baseline: config.finetune at `learning_rate` when given, else at
  config.compare.lsq_learning_rate when set, for as many forward+backward passes as FlexiQ's
  finetuning at `passes` per step.

  Args:
    config: The run config (reads config.finetune, config.compare and config.data).
    passes: Forward+backward passes one step of the baseline makes.
    learning_rate: The rate to train at (a candidate of finetune.lr_grid), or None.

  Returns:
    (the finetune recipe, the training dataset, the number of steps, the optimizer).
  """
  cfg = config.finetune.copy_and_resolve_references()
  lsq_lr = config.get("compare", {}).get("lsq_learning_rate", 0.0)
  if learning_rate is not None:
    cfg.learning_rate = learning_rate
  elif lsq_lr > 0:
    cfg.learning_rate = lsq_lr
  train_ds = data.get_dataset(config.data, config.data.train_split, train=True)
  total_steps = finetune.pass_matched_steps(cfg, train_ds.num_examples, passes=passes)
  return cfg, train_ds, total_steps, train_lib.make_optimizer(cfg, total_steps)


def train_at_chosen_rate(config, workdir: str, train: Callable, points: Callable, float_logits_fn: Callable):
  """A QAT baseline's training, once (no `finetune.lr_grid`: in `workdir`, at the configured rate)
  or once per rate of the grid with the best on held-out training images kept (`lr_select.choose`,
  candidates in <workdir>/lr_<rate>; the criterion averages over every point of `points`).

  Args:
    config: The run config.
    workdir: The baseline's directory.
    train: `(learning_rate or None, directory) -> (state, recipe, total_steps)`: trains (or restores a
      finished run from) the checkpoints in `directory`.
    points: `state -> {name: (logits_fn, args)}`, the points a candidate is scored at (`lr_select.score`).
    float_logits_fn: images -> float logits.

  Returns:
    (state, recipe, total_steps, the selection record or None) of the kept run.
  """
  if not lr_select.grid(config):
    return (*train(None, workdir), None)

  def train_and_score(rate, path, held):
    state = train(rate, path)[0]
    return lr_select.score(points(state), float_logits_fn, held, int(config.eval_batch_size))

  rate, path, record = lr_select.choose(config, workdir, None, train_and_score)
  return (*train(rate, path), record)  # restores the chosen candidate's finished checkpoint


def lsq_qat(config, workdir: str, model, variables, plan, folded, tables, bits: dict, eval_batches,
            mesh=None, reference_logits=None) -> dict:
  """Uniform QAT with LSQ, initialised from the PTQ ranges in `tables` (an asymmetric-grid layer's
  zero point fixed at the tables', `lsq_zero_points`), trained with the budget
  and recipe of config.finetune (as many forward+backward passes as FlexiQ's finetuning,
  `finetune.pass_matched_steps`; batch size, optimizer, distillation) through the same
  resumable loop and step as FlexiQ's finetuning, at config.compare.lsq_learning_rate when set
  or, with finetune.lr_grid, at the grid's rate best at W4A4 on held-out training images
  (`train_at_chosen_rate`). Checkpoints go to <workdir>/checkpoints (<workdir>/lr_<rate>/ with a
  grid). Returns train.evaluate's metrics on `eval_batches` (agreement / KL / SQNR too with the
  float `reference_logits`) with 'steps' and 'learning_rate'.

  Args:
    config: The run config.
    workdir: Directory of the checkpoints.
    model: The float Flax model.
    variables: The float model's variables (the distillation teacher and the judge's reference).
    plan: The calibration's QuantPlan.
    folded: BN-folded variables, the starting weights.
    tables: PTQ clipping tables the LSQ scales start from, with the matmuls' fixed scales.
    bits: {path: (weight bits, act bits)} for every quantized layer.
    eval_batches: Evaluation batches.
    mesh: Device mesh; default `parallel.make_mesh()`.
    reference_logits: Optional float logits of eval_batches.

  Returns:
    The metrics dict with 'steps', 'learning_rate', 'judge' (the verdict of
    judge.judge_uniform_qat; a warning is printed when it refuses) and 'lr_selection' (the
    selection record, or None without a grid).
  """
  mesh = mesh or parallel.make_mesh()
  trainable = {"params": folded["params"], "scales": lsq_initial_scales(plan, tables, bits)}
  frozen = {"batch_stats": folded["batch_stats"]} if "batch_stats" in folded else {}
  forward = LsqForward(model, plan, bits, apply_lib.matmul_tables(plan, tables), lsq_zero_points(plan, tables, bits))
  float_fn = functools.partial(train_lib.float_logits, model, variables)
  seed = config.seed + finetune.BASELINE_SEED_OFFSET

  def train(learning_rate, directory):
    cfg, train_ds, total_steps, tx = qat_baseline_recipe(config, passes=1, learning_rate=learning_rate)
    state = parallel.replicate(finetune.state_from_parts(trainable, frozen, tx), mesh)
    teacher = float_fn if cfg.distill_weight > 0 else None
    step_fn = functools.partial(finetune.distill_step, logits_fn=forward, tx=tx, teacher_fn=teacher,
                                distill_weight=cfg.distill_weight, label_smoothing=cfg.label_smoothing)
    state = train_lib.fit(state, step_fn, train_ds, cfg, total_steps=total_steps, seed=seed, workdir=directory,
                          desc="LSQ QAT", log_every=config.train.log_every_steps, mesh=mesh,
                          num_threads=config.data.num_threads)
    return state, cfg, total_steps

  logits = lambda images, t, f: forward(t, f, images)
  points = lambda state: {"W4A4": (logits, (state.trainable, state.frozen))}
  state, cfg, total_steps, selection = train_at_chosen_rate(config, workdir, train, points, float_fn)
  predict = lambda images, trainable, frozen: forward(trainable, frozen, images)
  metrics = train_lib.evaluate(predict, iter(eval_batches), mesh, desc="LSQ eval", args=(state.trainable, state.frozen),
                               reference_logits=reference_logits)
  frozen_now = state.frozen
  verdict = judge.judge_uniform_qat(config, float_fn, lambda t, x: forward(t, frozen_now, x), trainable,
                                    state.trainable, total_steps=total_steps, train_seed=seed)
  if not verdict["accepted"]:
    print(f"warning: LSQ QAT ended worse than its PTQ start ({', '.join(verdict['failed'])}) on {verdict['images']}: "
          f"top-1 {verdict['before_qat']['top1']:.2f}% -> {verdict['after_qat']['top1']:.2f}%, KL "
          f"{verdict['before_qat']['kl']:.4g} -> {verdict['after_qat']['kl']:.4g}; its row is marked refused. Lower "
          f"compare.lsq_learning_rate (the rates of finetune.lr_grid where set) or set finetune.grad_clip_norm.")
  return {**metrics, "steps": total_steps, "learning_rate": float(cfg.learning_rate), "judge": verdict,
          "lr_selection": selection}


# The two precisions of the switchable-precision baseline, highest first.
SWITCHABLE_BITS = ((8, 8), (4, 4))


def precision(trainable, i: int) -> dict:
  """The switchable network's trainable variables at its i-th precision: the shared weights, that
  precision's scales and, where learnt, its output affine (`switchable_affine`).

  Args:
    trainable: {'params', 'scales': (one per precision), and optionally 'affine': (one per precision,
      None where it has none)}.
    i: the precision's index in SWITCHABLE_BITS.

  Returns:
    {'params', 'scales'[, 'affine']} for `LsqForward`.
  """
  out = {"params": trainable["params"], "scales": trainable["scales"][i]}
  if trainable.get("affine") is not None and trainable["affine"][i] is not None:
    out["affine"] = trainable["affine"][i]
  return out


def switchable_step(state: finetune.QATState, batch, *, forwards: tuple, tx: optax.GradientTransformation,
                    teacher_fn=None, distill_weight: float = 0.0, label_smoothing: float = 0.0):
  """One step of switchable-precision QAT (Any-Precision DNN, Yu et al. 2021): the loss is the mean
  of the losses of one set of weights at every precision, each with its own learnt LSQ scales
  (switchable clipping, as AdaBits). Pure: (state, batch) -> (state, metrics).

  Args:
    state: trainable {'params', 'scales': ({...} per precision), optionally 'affine' (`precision`)}
      and the frozen variables.
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
    for i, forward in enumerate(forwards):
      one = finetune.make_loss_fn(batch, logits_fn=forward, teacher_logits=teacher, frozen=state.frozen,
                                  distill_weight=distill_weight, label_smoothing=label_smoothing)
      loss, (logits, ce) = one(precision(trainable, i))
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
  config.compare.lsq_learning_rate when set, or with finetune.lr_grid at the grid's rate best on
  held-out training images, mean over W8A8 and W4A4) and the same number of forward+backward passes as
  FlexiQ's finetuning: a step makes one pass per precision, so it runs half the steps of LSQ.
  BN is folded before training, so there is no switchable BN (the paper's per-precision BN); with
  finetune.ratio_affine (FlexiQ's per-ratio output gain and bias) the W4A4 precision learns the
  same gain and bias per output channel (`switchable_affine`), the freedom such a BN gives.

  Args:
    config: the run config.
    workdir: where its checkpoints and metrics go.
    model, variables: the float model.
    plan, folded: the calibration's plan and BN-folded variables.
    tables: PTQ clipping tables with entries for 4 and 8 bits (and the matmuls' fixed scales).
    keep_ends: keep the non-lowerable layers at W8A8.
    eval_batches: the evaluation batches (a list: it is iterated once per precision).
    mesh: the device mesh.
    reference_logits: float logits of eval_batches, for agreement / KL / SQNR.

  Returns:
    One metrics dict per precision of SWITCHABLE_BITS (train.evaluate's, with 'bits', 'steps',
    'learning_rate', 'relative_bops', the judge's verdict of that precision and 'lr_selection').
  """
  mesh = mesh or parallel.make_mesh()
  bits = [uniform_bits(plan, b, keep_ends) for b in SWITCHABLE_BITS]
  forwards = tuple(LsqForward(model, plan, b, apply_lib.matmul_tables(plan, tables), lsq_zero_points(plan, tables, b))
                   for b in bits)
  start = {"params": folded["params"], "scales": tuple(lsq_initial_scales(plan, tables, b) for b in bits)}
  if config.finetune.get("ratio_affine", False):  # as FlexiQ's ratio affine: at the low precision only
    start["affine"] = (None, switchable_affine(plan))
  frozen = {"batch_stats": folded["batch_stats"]} if "batch_stats" in folded else {}
  float_fn = functools.partial(train_lib.float_logits, model, variables)
  seed = config.seed + finetune.BASELINE_SEED_OFFSET

  def train(learning_rate, directory):
    cfg, train_ds, total_steps, tx = qat_baseline_recipe(config, passes=len(SWITCHABLE_BITS),
                                                         learning_rate=learning_rate)
    state = parallel.replicate(finetune.state_from_parts(start, frozen, tx), mesh)
    teacher = float_fn if cfg.distill_weight > 0 else None
    step_fn = functools.partial(switchable_step, forwards=forwards, tx=tx, teacher_fn=teacher,
                                distill_weight=cfg.distill_weight, label_smoothing=cfg.label_smoothing)
    state = train_lib.fit(state, step_fn, train_ds, cfg, total_steps=total_steps, seed=seed, workdir=directory,
                          desc="switchable QAT", log_every=config.train.log_every_steps, mesh=mesh,
                          num_threads=config.data.num_threads)
    return state, cfg, total_steps

  def points(state):
    out = {}
    for i, ((w, a), forward) in enumerate(zip(SWITCHABLE_BITS, forwards)):
      logits = lambda images, t, f, forward=forward, i=i: forward(precision(t, i), f, images)
      out[f"W{w}A{a}"] = (logits, (state.trainable, state.frozen))
    return out

  state, cfg, total_steps, selection = train_at_chosen_rate(config, workdir, train, points, float_fn)
  out = []
  for i, (b, forward) in enumerate(zip(SWITCHABLE_BITS, forwards)):
    pick = lambda t, i=i: precision(t, i)
    predict = lambda images, trainable, frozen, forward=forward, pick=pick: forward(pick(trainable), frozen, images)
    metrics = train_lib.evaluate(predict, iter(eval_batches), mesh, desc=f"switchable W{b[0]}A{b[1]} eval",
                                 args=(state.trainable, state.frozen), reference_logits=reference_logits)
    frozen_now = state.frozen
    verdict = judge.judge_uniform_qat(config, float_fn, lambda t, x, forward=forward: forward(t, frozen_now, x),
                                      pick(start), pick(state.trainable), total_steps=total_steps,
                                      train_seed=seed, label=f"W{b[0]}A{b[1]}")
    if not verdict["accepted"]:
      print(f"warning: switchable QAT at W{b[0]}A{b[1]} ended worse than its PTQ start ({', '.join(verdict['failed'])})"
            f"; its row is marked refused.")
    out.append({**metrics, "bits": b, "steps": total_steps, "learning_rate": float(cfg.learning_rate),
                "relative_bops": relative_bops(plan, bits[i]), "judge": verdict, "lr_selection": selection})
  return out
