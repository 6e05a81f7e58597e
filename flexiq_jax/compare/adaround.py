"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML
2020) as a uniform W4A4 post-training baseline on the layer-wise apply.

Each 4-bit layer's weights are rounded up or down per element by a learned soft mask instead of
to nearest: w_q = s * clip(floor(w / s) + h(V), -qmax, qmax) with the rectified sigmoid
h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), trained to reconstruct the float layer's
output, min ||W x - W_q x_q||^2 + lambda sum(1 - |2h - 1|^beta), with beta annealed from 20 to 2
after a warm-up without the regulariser, then h rounded to {0, 1}. The layers go in model order and
each sees the input the quantized model gives it (earlier layers already rounded, attention's
matmuls at 8 bits as in every method, its input quantized to 4 bits: the paper's asymmetric
reconstruction), against the float model's output of that layer on the float input. Scales (s) are the MSE-fitted 4-bit weight ranges, activations use
MSE-fitted per-tensor ranges (the ptq_mse baseline; asymmetric where the calibration put a layer on
the asymmetric grid, `layerwise.apply.fake_quant_input`), and the first and last layers stay W8A8 with
nearest rounding, as in every uniform baseline here.

Budget: the paper uses 10k iterations of batch 32 per layer with Adam at 1e-3 and lambda 0.01;
`AdaRoundSettings` defaults to 500 iterations at 1e-2 (a twentieth of the iterations at ten times
the rate), which keeps eleven small models within the sweep's CPU budget. The reconstruction
error is the mean over every output element, as in AIMET's implementation (the regulariser's
weight is relative to it).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from flexiq_jax import interception
from flexiq_jax import numerics
from flexiq_jax.interception import get_path
from flexiq_jax.layerwise import apply as apply_lib
from flexiq_jax.numerics.adaround import AdaRoundSettings, initial_logits, learn_logits, rectified_sigmoid


def round_layer(call, inputs, targets, weight_matrix, scale, qmax, settings: AdaRoundSettings, seed: int = 0):
  """The learned integer codes (K, O) of one layer: `inputs` are its (quantized) inputs, `targets`
  the float layer's outputs for the same images, `scale` (O,) the per-output-channel step.

  Args:
    call: The layer's LayerCall (its kernel shape and float forward).
    inputs: (N, ...) quantized inputs of the layer.
    targets: (N, ...) float outputs of the layer.
    weight_matrix: The kernel as a (K, O) matrix.
    scale: (O,) per-output-channel quantization step.
    qmax: Largest code magnitude; codes are clipped to [-qmax, qmax].
    settings: Iterations, batch size, learning rate and regulariser schedule.
    seed: Seed of the minibatch sampling.

  Returns:
    The hard-rounded integer codes (K, O), as floats.
  """
  floor = jnp.floor(weight_matrix / scale)
  shape = call.kernel.shape

  def codes(v, hard: bool):
    h = (v >= 0).astype(v.dtype) if hard else rectified_sigmoid(v)
    return jnp.clip(floor + h, -qmax, qmax)

  def reconstruction(v, batch):
    x, y = batch
    out = call.float_forward(x, (codes(v, False) * scale).reshape(shape))
    return jnp.mean((out - y) ** 2)  # over every element, as AIMET's implementation

  v = learn_logits(reconstruction, initial_logits(weight_matrix / scale - floor), (inputs, targets), settings,
                   seed=seed)
  return codes(v, True)


def _layer_input(model, plan, variables, tables, weight_bits, act_bits, images, path, *, quantized_matmuls=True):
  """(LayerCall, input) of layer `path` in the layer-wise apply at the given bits; the plan's
  quantized matmuls at 8 bits, or in float with quantized_matmuls=False (the float model)."""
  index = {p: i for i, p in enumerate(plan.quantized)}
  provider = apply_lib.LayerwiseBits(tables, weight_bits, act_bits, index, plan.signed, plan.matmul_signed)
  return interception.capture_input(model, plan, variables, images, provider, path,
                                    matmul_paths=None if quantized_matmuls else ())


def adaround_weights(model, plan, folded, tables, bits: dict, images, settings: AdaRoundSettings = AdaRoundSettings(),
                     seed: int = 0) -> tuple[dict, dict]:
  """Folded variables whose 4-bit layers' kernels lie on their 4-bit grid, rounded by AdaRound;
  `bits` {path: (w, a)} as compare.baselines.uniform_bits. Returns (variables, per-layer report:
  share of elements rounded away from nearest, reconstruction MSE nearest vs AdaRound).

  Args:
    model: The float Flax model.
    plan: The QuantPlan.
    folded: BN-folded variables; not modified.
    tables: Clipping tables (`layerwise.apply.build_tables`) with entries at the used widths.
    bits: {path: (weight bits, act bits)} for every quantized layer; layers at 4 weight bits are
      rounded by AdaRound, the others are left as they are.
    images: Calibration images the reconstruction is trained on.
    settings: AdaRound's optimisation settings.
    seed: Base seed; layer i uses seed + i.

  Returns:
    Tuple (variables, report): a copy of `folded` with the rounded kernels, and {path:
    {'flipped_share', 'mse_nearest', 'mse_adaround'}} for each rounded layer.
  """
  variables = jax.tree_util.tree_map(lambda a: a, folded)
  wb, ab = apply_lib.bits_arrays(plan, bits)
  float_bits = jnp.zeros_like(wb)
  report = {}
  for i, path in enumerate(plan.quantized):
    w_bits, a_bits = bits[path]
    if w_bits != 4:
      continue
    # Targets: the float model's layer on its float input (attention's matmuls float too); inputs:
    # what the partly rounded quantized model (its matmuls at 8 bits) feeds the layer, quantized at
    # the layer's activation width.
    call, x_float = _layer_input(model, plan, folded, tables, float_bits, float_bits, images, path,
                                 quantized_matmuls=False)
    targets = call.float_forward(x_float)
    qcall, x = _layer_input(model, plan, variables, tables, wb, ab, images, path)
    t = tables[path]
    x = apply_lib.fake_quant_input(t, x, jnp.int32(a_bits), plan.signed[path])
    qmax = 2 ** (w_bits - 1) - 1
    scale = jnp.maximum(t["weight_clip"][w_bits], numerics.MIN_RANGE) / qmax
    weight_matrix = interception.kernel_matrix(call.info, qcall.kernel)
    codes = round_layer(qcall, x, targets, weight_matrix, scale, qmax, settings, seed=seed + i)
    nearest = jnp.clip(jnp.round(weight_matrix / scale), -qmax, qmax)
    mse = lambda c: float(jnp.mean((qcall.float_forward(x, (c * scale).reshape(qcall.kernel.shape)) - targets) ** 2))
    report[path] = {"flipped_share": float(jnp.mean(codes != nearest)), "mse_nearest": mse(nearest),
                    "mse_adaround": mse(codes)}
    get_path(variables["params"], path)["kernel"] = (codes * scale).reshape(qcall.kernel.shape)
  return variables, report
