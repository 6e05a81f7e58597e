"""The ratio affine (layer_ops.ratio_affine): a learnt per-output-channel gain and bias scaled by the
share of a layer's inputs lowered. It is the identity at ratio 0 and while untrained, every path
(fake, int_reference, the serving form, oneDNN) computes the same outputs with it, it is trained
with the weights (never floored like a scale) and it reaches the encodings export."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flexiq_jax import finetune, layer_ops, quantize
from flexiq_jax.interception import LayerInfo, get_path, set_path
from flexiq_jax.quantize import export, integer, onednn

import smallnet

RATIOS = (0.0, 0.37, 1.0)


@pytest.fixture(scope="module")
def setup():
  return smallnet.make_setup()


def _info(kind, c, o, groups=1):
  shape = (c, o) if kind == "dense" else (3, 3, c // groups, o)
  return LayerInfo("l", kind, 0, c, o, groups, shape, (1, c), (1, o), 1)


def test_lowered_share_counts_each_outputs_lowered_inputs():
  lowered = jnp.asarray([True, False, True, True])
  np.testing.assert_allclose(layer_ops.lowered_share(_info("dense", 4, 3), lowered), [0.75] * 3)
  np.testing.assert_allclose(layer_ops.lowered_share(_info("conv", 4, 2), lowered), [0.75] * 2)
  np.testing.assert_allclose(layer_ops.lowered_share(_info("conv", 4, 4, groups=4), lowered), [1, 0, 1, 1])
  # Grouped, 2 groups of 2 inputs, 2 outputs each: group 0 reads channels 0-1, group 1 channels 2-3.
  np.testing.assert_allclose(layer_ops.lowered_share(_info("conv", 4, 4, groups=2), lowered), [0.5, 0.5, 1, 1])


def _with_random_affine(plan, qvars, seed=0):
  rng = np.random.default_rng(seed)
  qvars = quantize.add_ratio_affine(plan, qvars)
  quant = qvars["quant"]
  for p in plan.lowerable:
    o = plan.layers[p].out_channels
    entry = {**get_path(quant, p), "ratio_gain": jnp.asarray(rng.uniform(-0.3, 0.3, o), jnp.float32),
             "ratio_bias": jnp.asarray(rng.normal(0, 0.5, o), jnp.float32)}
    quant = set_path(quant, p, entry)
  return {**qvars, "quant": quant}


@pytest.mark.parametrize("mode", ["fake", "int_reference", "int"])
def test_untrained_affine_is_the_identity_and_a_learnt_one_only_moves_lowered_ratios(setup, mode):
  model, plan, images = setup.model, setup.plan, setup.images
  apply = jax.jit(quantize.QuantizedModel(model, plan, mode=mode).apply)
  zero = quantize.add_ratio_affine(plan, setup.qvars)
  assert all(set(layer_ops.RATIO_AFFINE_KEYS) <= set(get_path(zero["quant"], p)) for p in plan.lowerable)
  learnt = _with_random_affine(plan, setup.qvars)
  for r in RATIOS:
    plain = apply(setup.qvars, images, r)
    np.testing.assert_array_equal(apply(zero, images, r), plain)
    if r == 0:
      np.testing.assert_array_equal(apply(learnt, images, r), plain)
    else:
      assert not np.allclose(apply(learnt, images, r), plain, atol=1e-3)


def test_serving_form_with_the_affine_is_bit_identical_to_the_reference(setup):
  model, plan, images = setup.model, setup.plan, setup.images
  learnt = _with_random_affine(plan, setup.qvars)
  reference = jax.jit(quantize.QuantizedModel(model, plan, mode="int_reference").apply)
  qmodel = quantize.QuantizedModel(model, plan)
  svars = jax.jit(qmodel.prepare)(learnt)
  assert all("ratio_gain" in get_path(svars[integer.SERVING_KEY], p) for p in plan.lowerable)
  apply = jax.jit(qmodel.apply)
  for r in RATIOS:
    np.testing.assert_array_equal(apply(svars, images, r), reference(learnt, images, r))
  # The fused Pallas dense kernel has no affine: such a layer runs the XLA steps, the same outputs.
  pallas = jax.jit(quantize.QuantizedModel(model, plan, dense_impl="pallas").apply)
  np.testing.assert_array_equal(pallas(svars, images, 1.0), reference(learnt, images, 1.0))


@pytest.mark.skipif(not onednn.available(), reason="the oneDNN extension is not built")
def test_onednn_folds_the_affine_into_its_epilogue(setup):
  model, plan, images = setup.model, setup.plan, setup.images
  learnt = _with_random_affine(plan, setup.qvars)
  reference = jax.jit(quantize.QuantizedModel(model, plan, mode="int_reference").apply)
  qmodel = quantize.QuantizedModel(model, plan, conv_impls="onednn", dense_impl="onednn")
  svars = jax.jit(qmodel.prepare)(learnt)
  apply = jax.jit(qmodel.apply)
  for r in RATIOS:
    np.testing.assert_allclose(apply(svars, images, jnp.float32(r)), reference(learnt, images, r), rtol=1e-5,
                               atol=1e-5)


def test_the_affine_trains_with_the_weights_and_is_not_floored(setup):
  model, plan = setup.model, setup.plan
  start = quantize.add_ratio_affine(plan, setup.qvars)
  tx = optax.sgd(0.5)
  state = finetune.create_state(start, tx, lsq=False, ratio_affine=True)
  assert set(state.trainable) == {"params", "ratio_gain", "ratio_bias"}
  lowerable = set(plan.lowerable)
  for p in plan.quantized:  # layers never lowered carry no affine
    assert (get_path(state.trainable["ratio_bias"], p) is None) == (p not in lowerable)
  fake = quantize.QuantizedModel(model, plan, mode="fake")
  batch = {"image": setup.images, "label": jnp.asarray(np.arange(setup.images.shape[0]) % 5, jnp.int32)}

  def step_at(ratio):
    sampler = finetune.RatioSampler((ratio,), (1.0,))
    step = jax.jit(functools.partial(finetune.qat_step, qmodel=fake, tx=tx, sampler=sampler,
                                     rng_key=jax.random.PRNGKey(0)))
    return step(state, batch)[0]

  at0, at1 = step_at(0.0), step_at(1.0)
  for p in plan.lowerable:  # at ratio 0 the affine is out of the forward pass: no gradient
    np.testing.assert_array_equal(get_path(at0.trainable["ratio_bias"], p), 0.0)
  moved = np.concatenate([np.asarray(get_path(at1.trainable["ratio_bias"], p)) for p in plan.lowerable])
  assert np.abs(moved).max() > 0 and (moved < 0).any()  # learnt, and signed: no floor at MIN_RANGE
  merged = finetune.merge_qvars(at1.trainable, at1.frozen)
  p = plan.lowerable[0]
  np.testing.assert_array_equal(get_path(merged["quant"], p)["ratio_bias"], get_path(at1.trainable["ratio_bias"], p))


def test_encodings_carry_the_affine(setup):
  plan = setup.plan
  learnt = _with_random_affine(plan, setup.qvars)
  qmodel = quantize.QuantizedModel(setup.model, plan)
  layers = export.encodings(qmodel, learnt, qmodel.prepare(learnt))["flexiq"]["layers"]
  for p in plan.lowerable:
    np.testing.assert_allclose(layers[p]["ratio_affine"]["bias"], get_path(learnt["quant"], p)["ratio_bias"],
                               rtol=1e-6)
  assert all("ratio_affine" not in layers[p] for p in plan.quantized if p not in plan.lowerable)
