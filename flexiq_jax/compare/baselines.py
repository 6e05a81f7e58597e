"""Uniform baselines on the layer-wise apply: post-training W8A8/W4A4 (min-max or MSE ranges,
per-output-channel weights, per-tensor activations) and uniform 4-bit QAT with LSQ.

Uniform means every quantized layer at the same candidate, except that with `keep_ends` the
first and last quantized layers (plan.quantized minus plan.eligible: FlexiQ's keep_8bit rule)
stay W8A8 — as FlexiQ keeps them, and as the LSQ paper does — so the baselines and FlexiQ's
ratio-1 point cost the same BOPs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexiq_jax import cost
from flexiq_jax import data
from flexiq_jax import quant
from flexiq_jax import train as train_lib
from flexiq_jax.finetune import kl_divergence
from flexiq_jax.inspect_model import get_path
from flexiq_jax.layerwise import apply as apply_lib
from flexiq_jax.quantize import layer_ops
from flexiq_jax.quantize.plan import apply_with_layers


def uniform_bits(plan, bits: tuple[int, int], keep_ends: bool) -> dict:
  """{path: (w, a)}: every quantized layer at `bits`; the non-lowerable ones at W8A8 if keep_ends."""
  return {p: ((8, 8) if keep_ends and p not in plan.eligible else tuple(bits)) for p in plan.quantized}


def relative_bops(plan, bits: dict) -> float:
  """Layer-wise BOPs relative to every quantized layer at W8A8."""
  layers = {p: plan.layers[p] for p in plan.quantized}
  return cost.layerwise_bops(layers, bits) / cost.layerwise_bops(layers, {}, (8, 8))


def lsq_qat(config, model, variables, plan, folded, tables, bits: dict, eval_batches, mesh=None, log=print) -> dict:
  """Uniform QAT with LSQ (Esser et al. 2020): learnable per-tensor activation scales and
  per-output-channel weight scales, initialised from the PTQ ranges in `tables`, trained with the
  finetuning budget and recipe of config.finetune (epochs, batch size, optimizer, distillation),
  with config.compare.lsq_learning_rate when set.
  Returns {'top1', 'steps'} on `eval_batches`."""
  cfg = config.finetune.copy_and_resolve_references()
  lsq_lr = config.get("compare", {}).get("lsq_learning_rate", 0.0)
  if lsq_lr > 0:
    cfg.learning_rate = lsq_lr
  train_ds = data.get_dataset(config.data, config.data.train_split, train=True)
  total_steps = int(math.ceil(cfg.num_epochs * train_ds.num_examples / cfg.batch_size))
  scales = {}
  for p in plan.quantized:
    wb, ab = bits[p]
    a_qmin, a_qmax = quant.int_range(ab, plan.signed[p])
    w_qmax = 2 ** (wb - 1) - 1
    scales[p.replace("/", ".")] = {
        "act": jnp.maximum(tables[p]["act_clip"][ab], 1e-8) / a_qmax,
        "weight": jnp.maximum(tables[p]["weight_clip"][wb], 1e-8) / w_qmax}
  trainable = {"params": folded["params"], "scales": scales}

  def forward(tr, images):
    def layer_fn(info, module, h, kernel, bias):
      wb, ab = bits[info.path]
      s = tr["scales"][info.path.replace("/", ".")]
      a_qmin, a_qmax = quant.int_range(ab, plan.signed[info.path])
      h = quant.lsq_fake_quant(h, s["act"], a_qmin, a_qmax)
      w_qmax = 2 ** (wb - 1) - 1
      wm = layer_ops.kernel_matrix(info, kernel)
      wm = quant.lsq_fake_quant(wm, s["weight"], -w_qmax, w_qmax)
      return layer_ops.float_forward(info, module, h, wm.reshape(kernel.shape), bias)

    v = {"params": tr["params"], **({"batch_stats": folded["batch_stats"]} if "batch_stats" in folded else {})}
    return apply_with_layers(model, plan, v, images, layer_fn)

  tx = train_lib.make_optimizer(cfg, total_steps)
  opt_state = tx.init(trainable)

  @jax.jit
  def step(tr, opt_state, batch):
    teacher = None
    if cfg.distill_weight > 0:
      teacher = jax.lax.stop_gradient(model.apply(variables, batch["image"], train=False))

    def loss_fn(t):
      logits = forward(t, batch["image"])
      loss = train_lib.cross_entropy(logits, batch["label"], cfg.label_smoothing)
      if teacher is not None:
        loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * kl_divergence(teacher, logits)
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(tr)
    updates, opt_state = tx.update(grads, opt_state, tr)
    tr = optax.apply_updates(tr, updates)
    tr["scales"] = jax.tree_util.tree_map(lambda s: jnp.maximum(s, 1e-8), tr["scales"])
    return tr, opt_state, loss

  batches = data.train_batches(train_ds, cfg.batch_size, seed=config.seed + 2, num_steps=total_steps,
                               num_threads=config.data.num_threads)
  losses = []
  for i in range(total_steps):
    trainable, opt_state, loss = step(trainable, opt_state, next(batches))
    losses.append(loss)
    if (i + 1) % max(1, config.train.log_every_steps) == 0 or i + 1 == total_steps:
      log(f"LSQ QAT step {i + 1}/{total_steps}: loss {float(np.mean(jax.device_get(losses))):.4f}")
      losses = []
  predict = lambda images, tr: forward(tr, images)
  top1 = train_lib.evaluate(predict, iter(eval_batches), mesh, desc="LSQ eval", args=(trainable,))["top1"]
  return {"top1": top1, "steps": total_steps, "learning_rate": float(cfg.learning_rate)}
