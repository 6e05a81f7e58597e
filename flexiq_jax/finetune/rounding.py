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

from flexiq_jax import interception
from flexiq_jax import layer_ops
from flexiq_jax import numerics
from flexiq_jax.interception import LayerCall, get_path
from flexiq_jax.numerics.adaround import AdaRoundSettings, initial_logits, learn_logits, rectified_sigmoid
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


def round_layer(call: LayerCall, inputs, targets, lq: dict, *, signed: bool, settings: AdaRoundSettings,
                seed: int = 0):
  """The kernel of one lowerable layer with its lowered rows' 4-bit rounding learnt (module docstring).

  The rounding is trained at every ratio of `inputs` at once: at a ratio the rows of its lowered
  channels read their learnt 4-bit codes and the other rows the 8-bit codes placed in those
  codes' extraction bins (`code_in_bin`, relaxed with the soft codes), so a flip that helps the
  4-bit rows but moves an 8-bit code far costs at the ratios that read it. The loss is the mean of
  the ratios' squared errors in the output's own units, so the ratios with more 4-bit error weigh
  more (a relative weighting, each ratio's error over its own at nearest, let the 8-bit end's tiny
  error veto nearly every flip).

  Args:
    call: the layer's call in the quantized model (its current kernel).
    inputs: [(x, lowered)] per ratio: (N, ...) the layer's float input in the quantized model at the
      ratio and the (C,) bool mask of the channels lowered there; the rows lowered at any of them
      are rounded.
    targets: (N, ...) the float layer's output on the float model's input.
    lq: the layer's quantization variables.
    signed: whether the layer's activation codes are signed.
    settings: AdaRound's iterations, batch size, learning rate and regulariser schedule.
    seed: seed of the minibatch sampling.

  Returns:
    (kernel, report): the new kernel in the module's shape, and {'flipped_share' (rounded weights
    whose 4-bit code left nearest), 'moved_share' (8-bit codes changed), 'mse_nearest',
    'mse_rounded' (per ratio, the reconstruction error before and after on every image),
    'kept_nearest' (True where the learnt rounding reconstructed worse than nearest over the
    ratios, which the layer then keeps)}.
  """
  info = call.info
  coded = []
  for x, lowered in inputs:
    x = interception.as_matrix_input(info, x)
    xq, _, s_x, s_w, _ = layer_ops.quantize_codes(info, x, call.kernel, lq, lowered, signed=signed, ste=False)
    coded.append((xq, lowered, layer_ops.gather_channel(lowered, info)))
  x0, lowered0 = inputs[0]
  _, wq8, _, _, _ = layer_ops.quantize_codes(info, interception.as_matrix_input(info, x0)[:1], call.kernel, lq,
                                             jnp.zeros_like(lowered0), signed=signed, ste=False)  # none lowered
  w = interception.kernel_matrix(info, call.kernel)
  qmax = layer_ops.weight_qmax(lq)
  e = layer_ops.gather_channel(lq["weight_e"], info)
  rounded_rows = jnp.any(jnp.stack([rows for _, _, rows in coded]), axis=0)
  # Each output channel's largest |w| keeps its code (and so the channel its scale).
  free = rounded_rows & (jnp.abs(wq8) < qmax)
  step = jnp.exp2(e.astype(jnp.float32))
  grid = w / (s_w * step)
  base = jnp.floor(grid)
  lo4, hi4 = reachable_codes(qmax, e)
  nearest_low = numerics.lower_codes(wq8, e, signed=True, low_bits=LOW_BITS)

  def codes(v, hard: bool):
    """(4-bit codes, 8-bit codes), both in 8-bit code units."""
    h = (v >= 0).astype(jnp.float32) if hard else rectified_sigmoid(v)
    w_low = jnp.where(free, jnp.clip(base + h, lo4, hi4) * step, nearest_low)
    return w_low, jnp.where(free, code_in_bin(wq8, w_low / step, e, qmax), wq8)

  def output(w_low, w8, xq_batch, lowered, rows):
    shift = jnp.zeros_like(s_w)
    if "mean_lowered" in lq:
      table = layer_ops.lost_output_table(info, w8, w_low, lq)
      shift = layer_ops.masked_channel_sum(info, lowered, table) * s_x * s_w
    return layer_ops.fake_output(call, xq_batch, xq_batch, jnp.where(rows, w_low, w8), s_x, s_w, shift, lq, lowered)

  def errors(w_low, w8, xqs, y):
    return [jnp.mean((output(w_low, w8, xq, lowered, rows) - y) ** 2)
            for xq, (_, lowered, rows) in zip(xqs, coded)]

  all_codes = [xq for xq, _, _ in coded]
  nearest = [float(m) for m in errors(nearest_low, wq8, all_codes, targets)]
  weights = jnp.full((len(coded),), 1.0 / len(coded))

  def reconstruction(v, batch):
    xqs, y = batch
    return jnp.sum(weights * jnp.stack(errors(*codes(v, False), xqs, y)))

  v = learn_logits(reconstruction, initial_logits(grid - base), (all_codes, targets), settings, seed=seed, mask=free)
  w_low, w8 = codes(v, True)
  rounded = [float(m) for m in errors(w_low, w8, all_codes, targets)]
  kept_nearest = float(np.dot(weights, rounded)) > float(np.dot(weights, nearest))
  if kept_nearest:  # the learnt rounding did not help this layer: nearest stays
    w_low, w8, rounded = nearest_low, wq8, nearest
  rows = jnp.broadcast_to(rounded_rows, w.shape)
  report = {"flipped_share": float(jnp.sum(w_low != nearest_low) / jnp.maximum(jnp.sum(rows), 1)),
            "moved_share": float(jnp.mean(w8 != wq8)), "mse_nearest": nearest, "mse_rounded": rounded,
            "kept_nearest": bool(kept_nearest)}
  return (w8 * s_w).reshape(call.kernel.shape).astype(call.kernel.dtype), report


def round_extraction(qmodel: QuantizedModel, qvars: dict, images, settings: AdaRoundSettings, *,
                     ratios: tuple = (1.0,), seed: int = 0) -> tuple[dict, dict]:
  """FlexiQ's quantized variables with the 4-bit rounding of every lowerable layer learnt
  (`round_layer`, layer after layer in model order, each on the inputs the layers before it,
  already rounded, give it at each ratio).

  Args:
    qmodel: the quantized model (its model and plan).
    qvars: its quantized variables; not modified.
    images: (N, H, W, C) calibration images the reconstruction is trained on.
    settings: AdaRound's optimisation settings, per layer.
    ratios: the 4-bit ratios reconstructed at once (1: every lowerable channel lowered; 0: the
      8-bit codes the rounding moves); the channels lowered at any of them are rounded.
    seed: base seed; layer i samples its minibatches with seed + i.

  Returns:
    (qvars, report): a copy of `qvars` with the new kernels, and {path: `round_layer`'s report}.
  """
  plan = qmodel.plan
  images = jnp.asarray(images)
  original = {k: v for k, v in qvars.items() if k in ("params", "batch_stats")}
  rounded = jax.tree_util.tree_map(lambda a: a, qvars)
  counts = [qmodel.layer_counts(qvars, r) for r in ratios]
  accumulator = qmodel.conv_accumulator or default_conv_accumulator()
  report = {}
  for i, path in enumerate(plan.lowerable):
    lq = get_path(qvars["quant"], path)
    masks = [lq["rank"] < c[path] for c in counts]
    if not any(bool(jnp.any(m)) for m in masks):
      continue
    float_call, x_float = interception.capture_input(qmodel.model, plan, original, images,
                                                     interception.FloatLayers(), path)
    targets = float_call.float_forward(x_float)
    variables = {k: v for k, v in rounded.items() if k in ("params", "batch_stats")}
    inputs = []
    for c, mask in zip(counts, masks):
      provider = FlexiQLayers(rounded["quant"], c, plan.signed, "fake", False, accumulator, plan.matmul_signed)
      call, x = interception.capture_input(qmodel.model, plan, variables, images, provider, path)
      inputs.append((x, mask))
    kernel, report[path] = round_layer(call, inputs, targets, lq, signed=plan.signed[path], settings=settings,
                                       seed=seed + i)
    get_path(rounded["params"], path)["kernel"] = kernel
  return rounded, report
