"""flexiq_jax.finetune: the multi-ratio QAT step trains and samples the configured levels, LSQ scales
learn, and `distill_step` (shared with the LSQ baseline) mixes CE and KL and keeps scales positive.
The resumable finetune stage is tested in test_pipeline.py."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flexiq_jax
from flexiq_jax import finetune
from flexiq_jax import numerics
from flexiq_jax import quantize
from flexiq_jax.interception import get_path


class TinyCNN(nn.Module):
  """stem (8-bit, with a folded BN) -> conv (lowerable) -> head (8-bit)."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv")(x))
    return nn.Dense(5, name="head")(x.mean(axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class QatSetup:
  model: nn.Module
  variables: dict
  qmodel: quantize.QuantizedModel
  qvars: dict
  images: jax.Array

  def batch(self):
    return {"image": self.images, "label": jnp.asarray(np.arange(self.images.shape[0]) % 5, jnp.int32)}

  def teacher(self, x):
    return self.model.apply(self.variables, x, train=False)


@pytest.fixture(scope="module")
def setup() -> QatSetup:
  model = TinyCNN()
  images = jnp.asarray(np.random.default_rng(0).normal(size=(32, 10, 10, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), images[:1])
  qmodel, qvars = flexiq_jax.quantize_model(model, variables, images, levels=(0.5, 1.0), selector="greedy")
  assert qmodel.plan.lowerable == ["conv"]
  return QatSetup(model, variables, qmodel, qvars, images)


@pytest.mark.parametrize("lsq", [False, True])
def test_qat_step_reduces_loss_at_the_sampled_level(setup, lsq):
  fake = dataclasses.replace(setup.qmodel.with_mode("fake"), lsq=lsq)
  tx = optax.adam(3e-3)
  state = finetune.create_state(setup.qvars, tx, lsq)
  assert set(state.trainable) == ({"params", "act_scale"} if lsq else {"params"})
  sampler = finetune.RatioSampler((0.5, 1.0), (0.0, 1.0))
  step = jax.jit(functools.partial(finetune.qat_step, qmodel=fake, tx=tx, sampler=sampler,
                                   rng_key=jax.random.PRNGKey(0), teacher_fn=setup.teacher, distill_weight=0.3))
  batch = setup.batch()
  first = None
  for _ in range(25):
    state, metrics = step(state, batch)
    first = first if first is not None else float(metrics["loss"])
    assert float(metrics["ratio"]) == 1.0  # probability 1 on level 1.0
  assert int(state.step) == 25 and float(metrics["loss"]) < first
  merged = finetune.merge_qvars(state.trainable, state.frozen)
  old = get_path(setup.qvars["quant"], "conv")["act_scale"]
  new = get_path(merged["quant"], "conv")["act_scale"]
  assert (float(new) != float(old)) == lsq  # scales learn only under LSQ
  np.testing.assert_array_equal(get_path(merged["quant"], "conv")["rank"], get_path(setup.qvars["quant"], "conv")["rank"])


def test_qat_step_samples_ratios_reproducibly(setup):
  fake = setup.qmodel.with_mode("fake")
  tx = optax.sgd(0.0)
  sampler = finetune.RatioSampler((0.0, 0.5, 1.0), (0.2, 0.3, 0.5), uniform_prob=0.25)
  step = jax.jit(functools.partial(finetune.qat_step, qmodel=fake, tx=tx, sampler=sampler,
                                   rng_key=jax.random.PRNGKey(3)))

  def ratios():
    state, out = finetune.create_state(setup.qvars, tx, False), []
    for _ in range(8):
      state, metrics = step(state, setup.batch())
      out.append(float(metrics["ratio"]))
    return out

  first = ratios()
  assert ratios() == first  # the ratio follows (rng_key, step): a resumed run samples the same
  assert all(0.0 <= r <= 1.0 for r in first)


def _chi_square(counts, probs) -> float:
  counts, probs = np.asarray(counts, np.float64), np.asarray(probs, np.float64)
  expected = counts.sum() * probs
  return float(((counts - expected) ** 2 / expected).sum())


# Chi-square critical value at p = 0.001 with 2 degrees of freedom (3 levels): a correct sampler
# exceeds it once in a thousand seeds; the seed below is fixed, so the test is deterministic.
CHI2_2DOF_P001 = 13.82


def test_qat_steps_draw_several_levels_with_their_probabilities(setup):
  """Over 400 QAT steps the per-step ratio takes each of 3 levels with its set probability (a
  chi-square bound), so every level is trained, in the proportions configured; and each step's
  loss is the model's at the ratio it drew."""
  fake = setup.qmodel.with_mode("fake")
  tx = optax.sgd(0.0)
  levels, probs = (0.0, 0.5, 1.0), (0.2, 0.3, 0.5)
  step = jax.jit(functools.partial(finetune.qat_step, qmodel=fake, tx=tx,
                                   sampler=finetune.RatioSampler(levels, probs),
                                   rng_key=jax.random.PRNGKey(5)))
  batch = {k: v[:2] for k, v in setup.batch().items()}
  state, ratios, ces = finetune.create_state(setup.qvars, tx, False), [], []
  for _ in range(400):
    state, metrics = step(state, batch)
    ratios.append(float(metrics["ratio"]))
    ces.append(float(metrics["ce"]))
  ratios, ces = np.asarray(ratios), np.asarray(ces)
  assert set(ratios.tolist()) == set(levels)  # only the levels, each of them drawn
  counts = [np.sum(ratios == l) for l in levels]
  assert _chi_square(counts, probs) < CHI2_2DOF_P001, counts
  # The same counts are far from other proportions (the test has the power to tell them apart).
  assert _chi_square(counts, (1 / 3, 1 / 3, 1 / 3)) > CHI2_2DOF_P001, counts
  assert _chi_square(counts, (0.5, 0.3, 0.2)) > CHI2_2DOF_P001, counts
  # Learning rate 0: the weights never change, so a step at level l has the loss at ratio l.
  by_hand = {l: float(optax.softmax_cross_entropy_with_integer_labels(
      fake.apply(setup.qvars, batch["image"], l), batch["label"]).mean()) for l in levels}
  assert min(abs(by_hand[a] - by_hand[b]) for a, b in ((0.0, 0.5), (0.5, 1.0), (0.0, 1.0))) > 1e-4, by_hand
  for l in levels:
    np.testing.assert_allclose(ces[ratios == l], by_hand[l], rtol=1e-5, err_msg=f"level {l}")


@pytest.mark.parametrize("weights", [(), (1.0, 3.0)])
def test_every_step_ratios_average_the_gradients_of_each_ratio(setup, weights):
  """With every_step=(0, 1) a step's update is SGD on the (weighted) mean of the losses at 0, at 1
  and at the sampled ratio (here always 0.5, weight 1): the same parameters as a step on that mean
  written by hand, and not those of a step at the sampled ratio alone."""
  fake = setup.qmodel.with_mode("fake")
  tx = optax.sgd(1.0)
  batch = setup.batch()
  sampler = finetune.RatioSampler((0.5,), (1.0,), every_step=(0.0, 1.0), every_step_weights=weights)
  step = jax.jit(functools.partial(finetune.qat_step, qmodel=fake, tx=tx, sampler=sampler,
                                   rng_key=jax.random.PRNGKey(0), teacher_fn=setup.teacher, distill_weight=0.3))
  state, metrics = step(finetune.create_state(setup.qvars, tx, False), batch)
  assert float(metrics["ratio"]) == 0.5
  teacher = setup.teacher(batch["image"])

  def loss_at(params, ratio):
    logits = fake.apply({**setup.qvars, "params": params}, batch["image"], ratio)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return 0.7 * ce + 0.3 * finetune.kl_divergence(teacher, logits)

  params = setup.qvars["params"]
  w0, w1 = weights or (1.0, 1.0)
  mean_loss = lambda p: (w0 * loss_at(p, 0.0) + w1 * loss_at(p, 1.0) + loss_at(p, 0.5)) / (w0 + w1 + 1)
  np.testing.assert_allclose(float(metrics["loss"]), float(mean_loss(params)), rtol=1e-5)
  by_hand = jax.tree.map(lambda p, g: p - g, params, jax.grad(mean_loss)(params))
  assert_trees_close = lambda a, b: jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a, b)
  assert_trees_close(state.trainable["params"], by_hand)
  sampled_only = jax.tree.map(lambda p, g: p - g, params, jax.grad(lambda p: loss_at(p, 0.5))(params))
  differences = jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), state.trainable["params"],
                                             sampled_only))
  assert max(differences) > 1e-4  # the ends change the update
  if weights:  # the weights change the update too
    equal = jax.tree.map(lambda p, g: p - g, params, jax.grad(
        lambda p: (loss_at(p, 0.0) + loss_at(p, 1.0) + loss_at(p, 0.5)) / 3)(params))
    assert max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), state.trainable["params"],
                                            equal))) > 1e-4


def test_ratio_sampler_distribution():
  """Levels with their probabilities, 0 included, and continuous ratios between levels."""
  sampler = finetune.RatioSampler((0.0, 0.5, 1.0), (0.2, 0.3, 0.5), uniform_prob=0.4)
  draws = np.asarray(jax.vmap(sampler)(jax.random.split(jax.random.PRNGKey(0), 20000)))
  at_level = {lvl: np.mean(draws == lvl) for lvl in (0.0, 0.5, 1.0)}
  n = len(draws)
  for lvl, p in zip((0.0, 0.5, 1.0), (0.2, 0.3, 0.5)):
    want = 0.6 * p  # continuous draws hit a level with probability 0
    assert abs(at_level[lvl] - want) < 4 * np.sqrt(want * (1 - want) / n), (lvl, at_level[lvl], want)
  between = draws[(draws != 0.0) & (draws != 0.5) & (draws != 1.0)]
  assert abs(len(between) / n - 0.4) < 4 * np.sqrt(0.24 / n)
  assert between.min() >= 0 and between.max() <= 1 and abs(between.mean() - 0.5) < 0.02  # uniform on [0, 1]
  assert np.mean(between < 0.25) == pytest.approx(0.25, abs=0.03)


def test_ratio_sampler_from_config_and_errors():
  import ml_collections
  cfg = ml_collections.ConfigDict({"levels": (), "level_probs": (), "uniform_prob": 0.5})
  sampler = finetune.RatioSampler.from_config(cfg, (0.25, 1.0))
  assert sampler.levels == (0.0, 0.25, 1.0) and sampler.level_probs == pytest.approx((1 / 3,) * 3)
  assert sampler.uniform_prob == 0.5
  with pytest.raises(ValueError, match="level_probs"):
    finetune.RatioSampler((0.5, 1.0), (0.5,))
  with pytest.raises(ValueError, match="level_probs"):
    finetune.RatioSampler((0.5, 1.0), (0.5, 0.6))
  with pytest.raises(ValueError, match="uniform_prob"):
    finetune.RatioSampler((0.5,), (1.0,), uniform_prob=1.5)
  assert sampler.every_step == ()
  cfg.every_step_ratios = (0.0, 1.0)
  assert finetune.RatioSampler.from_config(cfg, (0.25, 1.0)).every_step == (0.0, 1.0)
  with pytest.raises(ValueError, match="every_step_ratios"):
    finetune.RatioSampler((0.5,), (1.0,), every_step=(1.5,))
  cfg.every_step_weights = (1.0, 2.0)
  weighted = finetune.RatioSampler.from_config(cfg, (0.25, 1.0))
  assert weighted.step_weights() == pytest.approx((0.25, 0.5, 0.25))
  assert finetune.RatioSampler((0.5,), (1.0,), every_step=(0.0, 1.0)).step_weights() == pytest.approx((1 / 3,) * 3)
  with pytest.raises(ValueError, match="one weight per every-step ratio"):
    finetune.RatioSampler((0.5,), (1.0,), every_step=(0.0, 1.0), every_step_weights=(1.0,))
  with pytest.raises(ValueError, match="every_step_weights must be finite"):
    finetune.RatioSampler((0.5,), (1.0,), every_step=(1.0,), every_step_weights=(-1.0,))


def test_lsq_weight_scales_are_learnt_and_exported(setup):
  from flexiq_jax import quantize
  qvars = quantize.add_lsq_weight_scales(setup.qmodel.plan, setup.qvars)
  start = get_path(qvars["quant"], "conv")["lsq_weight_scale"]
  # At initialisation the learnable scale equals the max-abs scale: the same logits.
  np.testing.assert_allclose(setup.qmodel.apply(qvars, setup.images[:4], 0.5),
                             setup.qmodel.apply(setup.qvars, setup.images[:4], 0.5), rtol=1e-6, atol=1e-6)
  fake = setup.qmodel.with_mode("fake")
  tx = optax.adam(3e-3)
  state = finetune.create_state(qvars, tx, False, lsq_weights=True)
  assert set(state.trainable) == {"params", "lsq_weight_scale"}
  step = jax.jit(functools.partial(finetune.qat_step, qmodel=fake, tx=tx,
                                   sampler=finetune.RatioSampler((1.0,), (1.0,)), rng_key=jax.random.PRNGKey(0)))
  for _ in range(5):
    state, _ = step(state, setup.batch())
  merged = finetune.merge_qvars(state.trainable, state.frozen)
  learnt = get_path(merged["quant"], "conv")["lsq_weight_scale"]
  assert not np.allclose(learnt, start)
  exported = quantize.export_int8(setup.qmodel, merged)
  np.testing.assert_array_equal(get_path(exported["quant"], "conv")["weight_scale"], learnt)
  np.testing.assert_array_equal(setup.qmodel.apply(exported, setup.images[:4], 0.7),
                                setup.qmodel.apply(merged, setup.images[:4], 0.7))


def test_refresh_after_finetuning_reestimates_weight_state(setup):
  from flexiq_jax import calibrate
  plan = setup.qmodel.plan
  params = jax.tree.map(lambda w: w * 1.7 if w.ndim > 1 else w, setup.qvars["params"])  # "finetuned" weights
  changed = {**setup.qvars, "params": params}
  refreshed = finetune.refresh_after_finetuning(setup.model, plan, changed, [setup.images])
  entry, old = get_path(refreshed["quant"], "conv"), get_path(setup.qvars["quant"], "conv")
  # Weight extraction positions follow the new weights, as a fresh fit on them gives.
  want_e, _ = calibrate.weight_extraction(plan.layers["conv"], get_path(params, "conv")["kernel"])
  np.testing.assert_array_equal(entry["weight_e"], want_e)
  # The mean codes are those of the new layer inputs at the unchanged scale (the input of 'conv'
  # scales with the stem's weights, so its mean code moves).
  assert float(entry["act_scale"]) == float(old["act_scale"])
  assert not np.allclose(entry["mean_code"], old["mean_code"])
  np.testing.assert_array_equal(entry["rank"], old["rank"])
  with pytest.raises(ValueError, match="extraction"):
    finetune.refresh_after_finetuning(setup.model, plan, changed, [setup.images], extraction="bad")


@pytest.mark.parametrize("lsq", [False, True])
def test_split_and_merge_qvars_round_trip(setup, lsq):
  trainable, frozen = finetune.split_qvars(setup.qvars, lsq)
  assert "params" not in frozen and ("act_scale" in trainable) == lsq
  merged = finetune.merge_qvars(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(setup.qvars)
  jax.tree.map(np.testing.assert_array_equal, merged, setup.qvars)


def test_kl_divergence():
  a = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  b = jnp.array([[0.0, 1.0, 0.0], [3.0, 0.5, 0.5]])
  assert float(finetune.kl_divergence(a, a)) == pytest.approx(0.0, abs=1e-6)
  assert float(finetune.kl_divergence(a, a + 7.0)) == pytest.approx(0.0, abs=1e-6)  # softmax is shift-invariant
  p, q = jax.nn.softmax(a), jax.nn.softmax(b)
  want = float(jnp.mean(jnp.sum(p * (jnp.log(p) - jnp.log(q)), -1)))
  assert float(finetune.kl_divergence(a, b)) == pytest.approx(want, rel=1e-5) and want > 0


def test_distill_step_with_any_forward_keeps_scales_positive():
  """distill_step on a hand-written forward (as the LSQ baseline uses it): the loss mixes
  cross-entropy and KL to the teacher by distill_weight, and every trainable entry besides
  'params' (a quantization scale) is kept >= numerics.MIN_RANGE."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  batch = {"image": images, "label": jnp.asarray(rng.integers(0, 3, 16), jnp.int32)}
  w = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  teacher_w = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  forward = lambda trainable, frozen, x: (x @ trainable["params"]["w"]) * trainable["scales"]["s"] + frozen["b"]
  teacher = lambda x: x @ teacher_w
  trainable = {"params": {"w": w}, "scales": {"s": jnp.float32(0.5)}}
  frozen = {"b": jnp.zeros(3)}
  logits = forward(trainable, frozen, images)
  ce = float(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean())
  kl = float(finetune.kl_divergence(teacher(images), logits))
  loss_of_scale = lambda s: 0.75 * optax.softmax_cross_entropy_with_integer_labels(
      (images @ w) * s, batch["label"]).mean() + 0.25 * finetune.kl_divergence(teacher(images), (images @ w) * s)
  grad_s = float(jax.grad(loss_of_scale)(0.5))
  assert grad_s != 0
  tx = optax.sgd(10.0 / grad_s)  # the plain update would take the scale to 0.5 - 10 < 0
  state = finetune.state_from_parts(trainable, frozen, tx)
  step = functools.partial(finetune.distill_step, logits_fn=forward, tx=tx, teacher_fn=teacher, distill_weight=0.25,
                           extra_metrics={"tag": jnp.float32(7)})
  new, metrics = jax.jit(step)(state, batch)
  assert float(metrics["ce"]) == pytest.approx(ce, rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(0.75 * ce + 0.25 * kl, rel=1e-5)
  assert float(metrics["tag"]) == 7.0 and int(new.step) == 1
  assert float(new.trainable["scales"]["s"]) == pytest.approx(numerics.MIN_RANGE)  # it is clamped
  assert not np.allclose(new.trainable["params"]["w"], w)  # params are not clamped, they move
  np.testing.assert_array_equal(state.trainable["params"]["w"], w)  # pure: the given state is unchanged
  # Without a teacher (or weight 0) the loss is the cross-entropy alone.
  _, plain = finetune.distill_step(state, batch, logits_fn=forward, tx=tx)
  assert float(plain["loss"]) == pytest.approx(ce, rel=1e-5)
