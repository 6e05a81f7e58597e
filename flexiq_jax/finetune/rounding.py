"""Extraction-aware adaptive rounding: AdaRound's learnt up-or-down rounding for FlexiQ's 4-bit
weights, inside the extraction contract.

A lowered row's 4-bit weight is the extraction of its 8-bit code, lower(q8, e) (DESIGN §2), so
rounding to nearest at 8 bits and then extraction's own rounding puts each 4-bit weight on the
nearest step of its 4-bit grid. AdaRound (Nagel et al. 2020; the `adaround` baseline) shows that
choosing up or down per weight so that the layer's output is reconstructed is worth points at
W4A4. This does the same for the 4-bit grid FlexiQ extracts, then places each 8-bit code where
that choice holds:

1. Per lowerable layer, in model order, each lowered row's 4-bit code is
   clip(floor(w / (s_w 2^e)) + h(V), lo, hi), h AdaRound's soft rounding (`numerics.adaround`),
   trained to reconstruct the float layer's output on the float model's input from the input the
   partly rounded FlexiQ model gives it at ratio 1 (every lowerable channel lowered, the bias
   correction included). lo and hi are the codes the extraction can reach from [-qmax, qmax].
2. Each 8-bit code becomes the one nearest w / s_w among those whose extraction is the chosen
   4-bit code (so it is unchanged wherever the learnt rounding agrees with nearest), and the
   kernel becomes code * s_w. Each output channel's largest |w| keeps its code, so its scale
   (max |w| / qmax) is unchanged.

Every ratio still runs one set of codes: the 8-bit point reads the 8-bit codes, moved by at most
half a 4-bit step where the rounding went the other way, and a lowered row its extraction. The
finetune's QAT starts from these weights, which lie on their grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexiq_jax import interception
from flexiq_jax import layer_ops
from flexiq_jax import numerics
from flexiq_jax.interception import LayerCall, get_path
from flexiq_jax.numerics.adaround import AdaRoundSettings, initial_logits, rectified_sigmoid, regulariser
from flexiq_jax.quantize.transform import FlexiQLayers, QuantizedModel, default_conv_accumulator

LOW_BITS = 4


def reachable_codes(qmax, e):
  """(lo, hi): the 4-bit codes the extraction at `e` reaches from 8-bit codes in [-qmax, qmax].

  Args:
    qmax: the largest 8-bit code magnitude (a scalar or (O,)).
    e: extraction positions, broadcastable against qmax.

  Returns:
    (lo, hi) float arrays of the broadcast shape.
  """
  shape = jnp.broadcast_shapes(jnp.shape(qmax), jnp.shape(e))
  q = jnp.broadcast_to(jnp.asarray(qmax, jnp.float32), shape)
  step = jnp.exp2(jnp.broadcast_to(e, shape).astype(jnp.float32))
  return (numerics.lower_codes(-q, e, signed=True, low_bits=LOW_BITS) / step,
          numerics.lower_codes(q, e, signed=True, low_bits=LOW_BITS) / step)


def code_in_bin(q8, q4, e, qmax):
  """The 8-bit code nearest `q8` whose extraction at `e` is the 4-bit code `q4` (signed grid; the
  extraction rounds half up and saturates at -8 and 7), within [-qmax, qmax].

  Args:
    q8: 8-bit codes (floats holding integers).
    q4: 4-bit codes each reachable from [-qmax, qmax] (`reachable_codes`).
    e: extraction positions, broadcastable.
    qmax: the largest code magnitude, broadcastable.

  Returns:
    Codes of q8's shape with lower_codes(code, e) == q4 * 2^e.
  """
  lo4, hi4 = numerics.int_range(LOW_BITS, True)
  step = jnp.exp2(jnp.asarray(e, jnp.float32))
  below = jnp.floor(step / 2)  # floor(q / 2^e + 1/2) = q4  <=>  q4 2^e - below <= q <= q4 2^e + step - below - 1
  lo = jnp.where(q4 <= lo4, -qmax, q4 * step - below)
  hi = jnp.where(q4 >= hi4, qmax, q4 * step + step - below - 1)
  return jnp.clip(q8, jnp.maximum(lo, -qmax), jnp.minimum(hi, qmax))


def round_layer(call: LayerCall, x, targets, lq: dict, lowered, *, signed: bool, settings: AdaRoundSettings,
                seed: int = 0):
  """The kernel of one lowerable layer with its lowered rows' 4-bit rounding learnt (module docstring).

  Args:
    call: the layer's call in the quantized model (its current kernel).
    x: (N, ...) the layer's float input in the quantized model at the ratio.
    targets: (N, ...) the float layer's output on the float model's input.
    lq: the layer's quantization variables.
    lowered: (C,) bool mask of the channels lowered at the ratio.
    signed: whether the layer's activation codes are signed.
    settings: AdaRound's iterations, batch size, learning rate and regulariser schedule.
    seed: seed of the minibatch sampling.

  Returns:
    (kernel, report): the new kernel in the module's shape, and {'flipped_share' (lowered weights
    whose 4-bit code left nearest), 'moved_share' (8-bit codes changed), 'mse_nearest',
    'mse_rounded' (the reconstruction error before and after, on every image), 'kept_nearest'
    (True where the learnt rounding reconstructed worse than nearest, which the layer then keeps)}.
  """
  info = call.info
  x = interception.as_matrix_input(info, x)
  xq, _, s_x, s_w, _ = layer_ops.quantize_codes(info, x, call.kernel, lq, lowered, signed=signed, ste=False)
  _, wq8, _, _, _ = layer_ops.quantize_codes(info, x[:1], call.kernel, lq, jnp.zeros_like(lowered), signed=signed,
                                             ste=False)  # the 8-bit codes, none lowered
  w = interception.kernel_matrix(info, call.kernel)
  qmax = layer_ops.weight_qmax(lq)
  e = layer_ops.gather_channel(lq["weight_e"], info)
  lowered_rows = layer_ops.gather_channel(lowered, info)
  # Each output channel's largest |w| keeps its code (and so the channel its scale).
  free = lowered_rows & (jnp.abs(wq8) < qmax)
  step = jnp.exp2(e.astype(jnp.float32))
  grid = w / (s_w * step)
  base = jnp.floor(grid)
  lo4, hi4 = reachable_codes(qmax, e)
  nearest_low = numerics.lower_codes(wq8, e, signed=True, low_bits=LOW_BITS)

  def low_codes(v, hard: bool):
    h = (v >= 0).astype(jnp.float32) if hard else rectified_sigmoid(v)
    return jnp.where(free, jnp.clip(base + h, lo4, hi4) * step, nearest_low)

  def output(w_low, xq_batch):
    codes = jnp.where(lowered_rows, w_low, wq8)
    shift = jnp.zeros_like(s_w)
    if "mean_lowered" in lq:
      table = layer_ops.lost_output_table(info, wq8, w_low, lq)
      shift = layer_ops.masked_channel_sum(info, lowered, table) * s_x * s_w
    return layer_ops.fake_output(call, xq_batch, xq_batch, codes, s_x, s_w, shift, lq, lowered)

  def loss_fn(v, xq_batch, y, step_index):
    reconstruction = jnp.mean((output(low_codes(v, False), xq_batch) - y) ** 2)
    use_reg = step_index >= settings.warmup * settings.iterations
    return reconstruction + jnp.where(use_reg, settings.reg_weight * regulariser(v, step_index, settings, free), 0.0)

  tx = optax.adam(settings.learning_rate)

  @jax.jit
  def step_fn(v, opt_state, xq_batch, y, step_index):
    grads = jax.grad(loss_fn)(v, xq_batch, y, step_index)
    updates, opt_state = tx.update(grads, opt_state, v)
    return optax.apply_updates(v, updates), opt_state

  v = initial_logits(grid - base)
  opt_state = tx.init(v)
  rng = np.random.default_rng(seed)
  n = xq.shape[0]
  for i in range(settings.iterations):
    idx = rng.choice(n, size=min(settings.batch_size, n), replace=False)
    v, opt_state = step_fn(v, opt_state, xq[idx], targets[idx], jnp.float32(i))
  w_low = low_codes(v, True)
  mse = lambda low: float(jnp.mean((output(low, xq) - targets) ** 2))
  nearest_mse, rounded_mse = mse(nearest_low), mse(w_low)
  kept_nearest = rounded_mse > nearest_mse  # the learnt rounding did not help this layer: nearest stays
  if kept_nearest:
    w_low = nearest_low
  q8 = jnp.where(free, code_in_bin(wq8, w_low / step, e, qmax), wq8)
  rows = jnp.broadcast_to(lowered_rows, w.shape)
  report = {"flipped_share": float(jnp.sum(w_low != nearest_low) / jnp.maximum(jnp.sum(rows), 1)),
            "moved_share": float(jnp.mean(q8 != wq8)), "mse_nearest": nearest_mse,
            "mse_rounded": min(rounded_mse, nearest_mse), "kept_nearest": bool(kept_nearest)}
  return (q8 * s_w).reshape(call.kernel.shape).astype(call.kernel.dtype), report


def round_extraction(qmodel: QuantizedModel, qvars: dict, images, settings: AdaRoundSettings, *, ratio: float = 1.0,
                     seed: int = 0) -> tuple[dict, dict]:
  """FlexiQ's quantized variables with the 4-bit rounding of every lowerable layer learnt
  (`round_layer`, layer after layer in model order, each on the input the layers before it,
  already rounded, give it).

  Args:
    qmodel: the quantized model (its model and plan).
    qvars: its quantized variables; not modified.
    images: (N, H, W, C) calibration images the reconstruction is trained on.
    settings: AdaRound's optimisation settings, per layer.
    ratio: the 4-bit ratio whose lowered channels are rounded (1: every lowerable channel).
    seed: base seed; layer i samples its minibatches with seed + i.

  Returns:
    (qvars, report): a copy of `qvars` with the new kernels, and {path: `round_layer`'s report}.
  """
  plan = qmodel.plan
  images = jnp.asarray(images)
  original = {k: v for k, v in qvars.items() if k in ("params", "batch_stats")}
  rounded = jax.tree_util.tree_map(lambda a: a, qvars)
  counts = qmodel.layer_counts(qvars, ratio)
  accumulator = qmodel.conv_accumulator or default_conv_accumulator()
  report = {}
  for i, path in enumerate(plan.lowerable):
    lq = get_path(qvars["quant"], path)
    lowered = lq["rank"] < counts[path]
    if not bool(jnp.any(lowered)):
      continue
    float_call, x_float = interception.capture_input(qmodel.model, plan, original, images,
                                                     interception.FloatLayers(), path)
    targets = float_call.float_forward(x_float)
    provider = FlexiQLayers(rounded["quant"], counts, plan.signed, "fake", False, accumulator, plan.matmul_signed)
    variables = {k: v for k, v in rounded.items() if k in ("params", "batch_stats")}
    call, x = interception.capture_input(qmodel.model, plan, variables, images, provider, path)
    kernel, report[path] = round_layer(call, x, targets, lq, lowered, signed=plan.signed[path], settings=settings,
                                       seed=seed + i)
    get_path(rounded["params"], path)["kernel"] = kernel
  return rounded, report
