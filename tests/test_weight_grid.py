"""The 4-bit-aware 8-bit weight grid (`quant.weight_scale`, numerics.weight_grid), LSQ with the
lowered channels' own gradient scale (numerics.lsq_extraction) and the refresh from the quantized
model's own layer inputs."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flexiq_jax import calibrate, finetune, numerics, quantize
from flexiq_jax.interception import get_path
from flexiq_jax.numerics import lsq_extraction, weight_grid
from flexiq_jax import layer_ops

import smallnet


@pytest.fixture(scope="module")
def setup():
  return smallnet.make_setup()


def _qvars_with(setup, mode):
  calib = calibrate.calibrate(setup.model, setup.plan, setup.folded, [setup.images[:16], setup.images[16:]],
                              weight_scale=mode)
  orders = {p: np.argsort(np.maximum(-calib[p]["ch_min"], calib[p]["ch_max"]), kind="stable")
            for p in setup.plan.lowerable}
  counts = {p: np.array([setup.plan.layers[p].in_channels // 2, setup.plan.layers[p].in_channels])
            for p in setup.plan.lowerable}
  return calib, quantize.build_qvars(setup.plan, setup.folded, calib, orders, counts, [0.5, 1.0])


def _np_lower(q, f):
  return np.clip(np.floor(q / 2.0 ** f + 0.5), -8, 7) * 2.0 ** f


def test_max127_by_hand_is_the_gain_error_and_max112_removes_it():
  # One depthwise-like channel: its largest weight on code 127 lowers (f = 4) to 112.
  w = np.array([[1.0], [0.5], [-0.25]], np.float32)
  s, q = weight_grid.codes_at(jnp.asarray(w), 127.0)
  assert float(q[0, 0]) == 127 and float(numerics.lower_codes(q, 4, signed=True)[0, 0]) == 112
  s, q = weight_grid.codes_at(jnp.asarray(w), 112.0)
  assert float(q[0, 0]) == 112 and float(numerics.lower_codes(q, 4, signed=True)[0, 0]) == 112
  np.testing.assert_allclose(float(s[0]), 1.0 / 112, rtol=1e-6)


def test_weight_qmax_modes_and_keep_8bit_layers():
  w = np.random.default_rng(0).normal(size=(3, 3, 4, 6)).astype(np.float32)
  index = np.broadcast_to(np.arange(4)[:, None], (4, 6))
  np.testing.assert_array_equal(weight_grid.weight_qmax("max127", w, index, 4, True), np.full(6, 127.0))
  np.testing.assert_array_equal(weight_grid.weight_qmax("max112", w, index, 4, True), np.full(6, 112.0))
  np.testing.assert_array_equal(weight_grid.weight_qmax("joint", w, index, 4, False), np.full(6, 127.0))
  d = weight_grid.weight_qmax("joint", w, index, 4, True)
  assert d.shape == (6,) and set(d.tolist()) <= set(weight_grid.JOINT_CANDIDATES)
  with pytest.raises(ValueError, match="weight_scale"):
    weight_grid.weight_qmax("max100", w, index, 4, True)


def test_joint_choice_is_the_argmin_of_the_summed_8_and_4_bit_error():
  """Depthwise: each output reads one feature channel, so the per-output choice is exactly joint;
  recomputed in numpy for every candidate (f fitted per candidate, as calibration fits it)."""
  rng = np.random.default_rng(1)
  w = rng.laplace(size=(5, 5, 1, 7)).astype(np.float32)  # peaked, like depthwise kernels
  index = np.arange(7)[None, :]
  d = weight_grid.joint_qmax(w, index, 7)
  for o in range(7):
    wo = w[..., 0, o].astype(np.float64)
    totals = []
    for cand in weight_grid.JOINT_CANDIDATES:
      s = max(np.abs(wo).max(), numerics.MIN_RANGE) / cand
      q = np.clip(np.round(wo / s), -127, 127)
      f = min(range(5), key=lambda f: (((q - _np_lower(q, f)) ** 2).sum(), f))
      totals.append(((wo - s * q) ** 2).sum() + ((wo - s * _np_lower(q, f)) ** 2).sum())
    totals = np.asarray(totals)
    best = max(i for i in range(len(totals)) if totals[i] <= totals.min() * (1 + 1e-5))
    assert totals[list(weight_grid.JOINT_CANDIDATES).index(d[o])] <= totals.min() * (1 + 1e-5), (o, d[o])
    assert d[o] <= 127
  # On peaked channels the top code moves off 127 for at least one channel (the gain error).
  assert (d < 127).any()


@pytest.mark.parametrize("mode", ["max112", "joint"])
def test_grid_reaches_every_path_int_equals_reference_and_fake(setup, mode):
  calib, qvars = _qvars_with(setup, mode)
  plan = setup.plan
  for p in plan.quantized:
    entry = get_path(qvars["quant"], p)
    if p in plan.lowerable:
      np.testing.assert_array_equal(entry["weight_qmax"], calib[p]["weight_qmax"])
      # The int8 codes put each output channel's max |w| on its top code d.
      codes, _ = layer_ops.weight_codes(plan.layers[p], get_path(qvars["params"], p)["kernel"],
                                        qmax=entry["weight_qmax"])
      top = np.abs(np.asarray(codes)).reshape(-1, codes.shape[-1]).max(0)
      np.testing.assert_array_equal(top, entry["weight_qmax"])
    else:
      np.testing.assert_array_equal(calib[p]["weight_qmax"], 127.0)
  model = quantize.QuantizedModel(setup.model, plan, mode="int")
  for r in (0.0, 0.5, 1.0):
    a = model.apply(qvars, setup.images, r)
    b = model.with_mode("int_reference").apply(qvars, setup.images, r)
    c = model.with_mode("fake").apply(qvars, setup.images, r)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c, a, atol=2e-3 * float(jnp.abs(a).max()))
    exported = quantize.export_int8(model, qvars)
    np.testing.assert_array_equal(model.apply(exported, setup.images, r), a)
  _, base = _qvars_with(setup, "max127")
  assert not np.allclose(model.apply(qvars, setup.images, 1.0), model.apply(base, setup.images, 1.0))


def test_max127_stores_no_weight_qmax_and_keeps_the_old_qvars(setup):
  calib, qvars = _qvars_with(setup, "max127")
  assert all("weight_qmax" not in calib[p] for p in setup.plan.quantized)
  jax.tree.map(np.testing.assert_array_equal, qvars, setup.qvars)


def test_weight_extraction_fits_on_the_chosen_grid(setup):
  calib, _ = _qvars_with(setup, "max112")
  for p in setup.plan.lowerable:
    kernel = get_path(setup.folded["params"], p)["kernel"]
    want, _ = calibrate.weight_extraction(setup.plan.layers[p], kernel, qmax=calib[p]["weight_qmax"])
    np.testing.assert_array_equal(calib[p]["weight_e"], want)


# -- LSQ on the lowered channels' own grid ---------------------------------------------------------

def test_lsq_quantize_lower_forward_is_exact_and_gradients_are_per_grid():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.uniform(0, 3, size=(4, 6)), jnp.float32)
  s = jnp.float32(0.02)
  e = jnp.asarray([0, 1, 2, 3, 4, 4], jnp.int32)
  lowered = jnp.asarray([False, True, True, True, True, False])
  codes = lsq_extraction.lsq_quantize_lower(x, s, e, lowered, signed=False, features=6)
  q = jnp.clip(jnp.round(x / s), 0, 255)
  want = jnp.where(lowered, numerics.lower_codes(q, e, signed=False), q)
  np.testing.assert_array_equal(codes, want)

  def real(scale):
    return jnp.sum(lsq_extraction.lsq_quantize_lower(x, scale, e, lowered, signed=False, features=6)
                   * jax.lax.stop_gradient(scale))

  grad = float(jax.grad(real)(s))
  v = np.asarray(x) / float(s)
  qn, wn = np.asarray(q), np.asarray(want)
  step = 2.0 ** np.asarray(e)
  inside8 = (v >= 0) & (v <= 255)
  inside4 = (qn >= -0.5 * step) & (qn < 15.5 * step)
  low = np.asarray(lowered)
  inside = np.where(low, inside8 & inside4, inside8)
  g = np.where(low, 1 / np.sqrt(6 * 15) / step ** 2, 1 / np.sqrt(6 * 255))
  np.testing.assert_allclose(grad, float((g * (wn - v * inside)).sum()), rtol=1e-4)
  gx = jax.grad(lambda x: jnp.sum(lsq_extraction.lsq_quantize_lower(x, s, e, lowered, signed=False, features=6)
                                  * s))(x)
  np.testing.assert_array_equal(np.asarray(gx), inside.astype(np.float32))


def test_lsq_weights_forward_is_exact_and_gradients_are_per_grid_and_per_output_channel():
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.laplace(size=(3, 3, 4, 5)), jnp.float32)  # HWIO
  s = jnp.abs(w).reshape(-1, 5).max(0) / 112.0
  e = jnp.asarray(rng.integers(0, 5, size=(4, 5)), jnp.int32)  # per kernel row (I, O)
  lowered = jnp.asarray([[True], [False], [True], [True]]) & jnp.ones((4, 5), bool)
  codes = lsq_extraction.lsq_quantize_lower_weights(w, s, e, lowered)
  q = jnp.clip(jnp.round(w / s), -127, 127)
  want = jnp.where(lowered, numerics.lower_codes(q, e, signed=True), q)
  np.testing.assert_array_equal(codes, want)

  def real(scale, upstream):
    return jnp.sum(lsq_extraction.lsq_quantize_lower_weights(w, scale, e, lowered)
                   * jax.lax.stop_gradient(scale) * upstream)

  upstream = jnp.asarray(rng.normal(size=w.shape), jnp.float32)
  grad = np.asarray(jax.grad(real)(s, upstream))
  v = np.asarray(w) / np.asarray(s)
  qn, wn = np.asarray(q), np.asarray(want)
  step = 2.0 ** np.broadcast_to(np.asarray(e), w.shape)
  low = np.broadcast_to(np.asarray(lowered), w.shape)
  inside8 = (v >= -127) & (v <= 127)
  inside4 = (qn >= -8.5 * step) & (qn < 7.5 * step)
  inside = np.where(low, inside8 & inside4, inside8)
  n = w.size // 5  # weights per output channel
  g = np.where(low, 1 / np.sqrt(n * 7) / step ** 2, 1 / np.sqrt(n * 127))
  want_grad = (g * (wn - v * inside) * np.asarray(upstream)).reshape(-1, 5).sum(0)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
  gw = jax.grad(lambda w: jnp.sum(lsq_extraction.lsq_quantize_lower_weights(w, s, e, lowered) * s))(w)
  np.testing.assert_allclose(np.asarray(gw), inside.astype(np.float32), atol=1e-6)  # (w / s) * s roundoff


def _scale_grad_norm(setup, qvars, ratio, **model_fields):
  """(the gradient norm of the learnt scales, the logits) of the fake path with `model_fields`: the
  activation scales where they set `lsq`, else the weight scales qvars must hold."""
  fake = dataclasses.replace(quantize.QuantizedModel(setup.model, setup.plan, mode="fake"), **model_fields)
  learnt = "act_scale" if fake.lsq else "lsq_weight_scale"
  trainable, frozen = finetune.split_qvars(qvars, fake.lsq, not fake.lsq)
  labels = jnp.arange(setup.images.shape[0]) % 5

  def loss(t):
    logits = fake.apply(finetune.merge_qvars(t, frozen), setup.images, ratio)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.grad(loss)(trainable)
  return float(optax.tree.norm(grads[learnt])), fake.apply(qvars, setup.images, ratio)


def _act_scale_grad_norm(setup, grad_scale, ratio):
  return _scale_grad_norm(setup, setup.qvars, ratio, lsq=True, lsq_grad_scale=grad_scale)


def _weight_scale_grad_norm(setup, grad_scale, ratio):
  return _scale_grad_norm(setup, quantize.add_lsq_weight_scales(setup.plan, setup.qvars), ratio,
                          lsq_weight_grad_scale=grad_scale)


def test_effective_weight_grad_scale_keeps_the_forward_and_shrinks_the_lowered_rows_gradient(setup):
  plain = quantize.QuantizedModel(setup.model, setup.plan, mode="fake")
  old1, y_old = _weight_scale_grad_norm(setup, "qmax8", 1.0)
  new1, y_new = _weight_scale_grad_norm(setup, "effective", 1.0)
  np.testing.assert_allclose(y_new, y_old, rtol=1e-5, atol=1e-5)  # the learnt scale starts at max|w|/127
  np.testing.assert_allclose(y_new, plain.apply(setup.qvars, setup.images, 1.0), rtol=1e-5, atol=1e-5)
  # Through the 8-bit grid each lowered weight pulls its scale by lower(q) - q, unscaled.
  assert new1 < 0.5 * old1
  old0, _ = _weight_scale_grad_norm(setup, "qmax8", 0.0)
  new0, _ = _weight_scale_grad_norm(setup, "effective", 0.0)
  np.testing.assert_allclose(new0, old0, rtol=1e-3)  # nothing lowered: LSQ as before
  with pytest.raises(ValueError, match="lsq_weight_grad_scale"):
    _weight_scale_grad_norm(setup, "qmax4", 1.0)


def test_effective_grad_scale_shrinks_the_scale_gradient_at_ratio_1_only_there(setup):
  old1, y_old = _act_scale_grad_norm(setup, "qmax8", 1.0)
  new1, y_new = _act_scale_grad_norm(setup, "effective", 1.0)
  plain = quantize.QuantizedModel(setup.model, setup.plan, mode="fake").apply(setup.qvars, setup.images, 1.0)
  np.testing.assert_array_equal(y_new, plain)  # the forward of the fake path without LSQ, exactly
  np.testing.assert_array_equal(y_old, plain)  # (LSQ's codes are rounded back to exact integers)
  assert new1 < old1
  old0, _ = _act_scale_grad_norm(setup, "qmax8", 0.0)
  new0, _ = _act_scale_grad_norm(setup, "effective", 0.0)
  np.testing.assert_allclose(new0, old0, rtol=1e-4)  # nothing lowered: LSQ as before


def test_qat_optimizer_gives_the_scales_their_own_learning_rate():
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(optimizer="sgd", learning_rate=0.0, momentum=0.0, nesterov=False,
                                       weight_decay=0.0, schedule="constant", warmup_steps=0, grad_clip_norm=0.0,
                                       lsq_learning_rate=0.5))
  tx = finetune.make_optimizer(cfg, 10)
  params = {"params": {"w": jnp.ones(3)}, "act_scale": {"a": jnp.float32(1.0)}}
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["params"]["w"], 0.0)
  np.testing.assert_allclose(updates["act_scale"]["a"], -0.5)
  cfg.lsq_learning_rate = -1.0
  with pytest.raises(ValueError, match="lsq_learning_rate"):
    finetune.make_optimizer(cfg, 10)


# -- refresh from the quantized model --------------------------------------------------------------

def test_refresh_from_the_quantized_model_reads_its_own_layer_inputs(setup):
  plan = setup.plan
  params = jax.tree.map(lambda w: w * 1.3 if w.ndim > 1 else w, setup.qvars["params"])
  changed = {**setup.qvars, "params": params}
  from_float = finetune.refresh_after_finetuning(setup.model, plan, changed, [setup.images])
  from_quant = finetune.refresh_after_finetuning(setup.model, plan, changed, [setup.images], source="quantized")
  # The stem reads the image in both; the layers after it read quantized (and at ratio 0.5 and 1
  # lowered) activations, so at least one lowerable layer's means differ.
  recorded = finetune.collect_quantized(setup.model, plan, changed, [setup.images], calibrate.ChannelRanges())
  variables = {k: v for k, v in changed.items() if k in ("params", "batch_stats")}
  images_ranges = calibrate.collect(setup.model, plan, variables, [setup.images], calibrate.ChannelRanges())
  np.testing.assert_allclose(recorded["stem"]["max"], images_ranges["stem"]["max"], rtol=1e-6)
  assert any(not np.allclose(get_path(from_float["quant"], p)["mean_code"], get_path(from_quant["quant"], p)["mean_code"])
             for p in plan.lowerable)
  for p in plan.lowerable:
    np.testing.assert_array_equal(get_path(from_float["quant"], p)["weight_e"], get_path(from_quant["quant"], p)["weight_e"])
  with pytest.raises(ValueError, match="source"):
    finetune.refresh_after_finetuning(setup.model, plan, changed, [setup.images], source="bad")
