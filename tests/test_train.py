import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flexiq_jax import models
from flexiq_jax import train as train_lib


def test_eval_sums_top1_top5_and_mask():
  logits = jnp.array([[9., 1, 2, 3, 4, 5, 0], [0., 9, 8, 7, 6, 5, 4], [1., 2, 3, 4, 5, 6, 7]])
  labels = jnp.array([0, 3, 0])
  sums = train_lib.eval_sums(logits, {"label": labels, "mask": jnp.array([1., 1., 0.])})
  assert float(sums["top1"]) == 1  # row 0 right, row 1 wrong, row 2 masked out
  assert float(sums["top5"]) == 2  # label 3 is 4th best in row 1
  assert float(sums["count"]) == 2


def test_fidelity_sums_against_reference_by_hand():
  ref = np.array([[2., 0., -1.], [0., 3., 1.], [5., 5., 0.]], np.float32)
  out = np.array([[1., 0., 0.], [2., 0., 1.], [0., 0., 9.]], np.float32)
  mask = np.array([1., 1., 0.], np.float32)  # the padded third row must not count
  sums = train_lib.fidelity_sums(jnp.asarray(out), jnp.asarray(ref), jnp.asarray(mask))
  assert float(sums["agree"]) == 1  # row 0 agrees (class 0), row 1 does not (1 vs 0)
  log_softmax = lambda z: z - np.log(np.sum(np.exp(z), -1, keepdims=True))
  p = np.exp(log_softmax(ref))
  kl = np.sum(p * (log_softmax(ref) - log_softmax(out)), -1)
  assert float(sums["kl"]) == pytest.approx(kl[0] + kl[1], rel=1e-5)
  assert float(sums["ref_energy"]) == pytest.approx(np.sum(ref[:2] ** 2))
  assert float(sums["error_energy"]) == pytest.approx(np.sum((ref[:2] - out[:2]) ** 2))
  same = train_lib.fidelity_sums(jnp.asarray(ref), jnp.asarray(ref), jnp.asarray(mask))
  assert float(same["kl"]) == pytest.approx(0.0, abs=1e-6) and float(same["agree"]) == 2


def test_evaluate_reports_agreement_kl_and_the_layerwise_sqnr():
  """Reference logits collected by one pass (logits_out) give agreement/KL/SQNR in the next, and
  the SQNR is the layer-wise search's measure over the whole output."""
  from flexiq_jax.layerwise.apply import sqnr_db
  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  batches = [{"image": rng.normal(size=(8, 4)).astype(np.float32), "label": rng.integers(0, 5, 8).astype(np.int32)}
             for _ in range(3)]
  batches[-1]["mask"] = np.array([1.] * 5 + [0.] * 3, np.float32)  # a padded last batch
  predict = lambda images, w: images @ w
  reference = []
  float_metrics = train_lib.evaluate(predict, batches, args=(weights,), logits_out=reference)
  assert "kl" not in float_metrics and len(reference) == 3 and reference[0].shape == (8, 5)
  noisy = weights + 0.3 * jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
  m = train_lib.evaluate(predict, batches, args=(noisy,), reference_logits=reference)
  keep = np.concatenate([b.get("mask", np.ones(8)) for b in batches]) > 0
  ref = np.concatenate(reference)[keep]
  out = np.concatenate([b["image"] @ np.asarray(noisy) for b in batches])[keep]
  assert m["num_examples"] == 21
  assert m["agreement"] == pytest.approx(100 * np.mean(ref.argmax(-1) == out.argmax(-1)))
  assert m["sqnr_db"] == pytest.approx(sqnr_db(ref, out), rel=1e-4)
  assert 0 < m["kl"] and m["agreement"] < 100  # the noise is large enough to flip some classes
  same = train_lib.evaluate(predict, batches, args=(weights,), reference_logits=reference)
  assert same["agreement"] == 100 and same["kl"] == pytest.approx(0, abs=1e-6) and same["sqnr_db"] > 100
  with pytest.raises(ValueError, match="reference_logits do not match"):
    train_lib.evaluate(predict, batches, args=(weights,), reference_logits=reference[:2])


def test_cross_entropy_label_smoothing():
  logits = jnp.array([[10.0, 0.0]])
  plain = train_lib.cross_entropy(logits, jnp.array([0]))
  smoothed = train_lib.cross_entropy(logits, jnp.array([0]), label_smoothing=0.2)
  assert float(smoothed) > float(plain)  # smoothing penalises over-confidence
  np.testing.assert_allclose(smoothed, -(0.9 * jax.nn.log_softmax(logits)[0, 0] +
                                         0.1 * jax.nn.log_softmax(logits)[0, 1]), rtol=1e-5)


def _opt_config(**kw):
  cfg = ml_collections.ConfigDict(dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, nesterov=True,
                                       weight_decay=1e-4, schedule="cosine", warmup_steps=0,
                                       grad_clip_norm=0.0))
  cfg.update(kw)
  return cfg


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_train_step_is_pure_and_learns(optimizer):
  model = models.create("resnet_small", num_classes=4)
  tx = train_lib.make_optimizer(_opt_config(optimizer=optimizer, learning_rate=0.05 if optimizer == "sgd"
                                            else 3e-3), total_steps=40)
  state = train_lib.create_train_state(model, jax.random.PRNGKey(0), (12, 12, 1), tx)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(16, 12, 12, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 4, 16), jnp.int32)}
  step = jax.jit(functools.partial(train_lib.train_step, apply_fn=model.apply, tx=tx))
  first, m0 = step(state, batch)
  again, _ = step(state, batch)  # same inputs -> same outputs: no hidden state
  jax.tree_util.tree_map(np.testing.assert_array_equal, first.params, again.params)
  assert int(first.step) == 1
  # BatchNorm running statistics are updated in train mode.
  assert not np.allclose(first.batch_stats["bn1"]["mean"], state.batch_stats["bn1"]["mean"])
  s = first
  for _ in range(30):
    s, m = step(s, batch)
  assert float(m["loss"]) < 0.5 * float(m0["loss"])  # memorises a single batch


def _updates_of_sgd(cfg, grads, params, steps):
  """The optimizer's update at each of `steps` consecutive steps for fixed gradients."""
  tx = train_lib.make_optimizer(cfg, total_steps=20)
  state, out = tx.init(params), []
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    out.append(updates)
  return out


def test_learning_rate_schedule_at_chosen_steps():
  """Linear warmup from 0 over 4 steps, then cosine from the peak to 0 at step 20, by hand."""
  lr = 0.1
  cosine = lambda s: lr * 0.5 * (1 + np.cos(np.pi * (s - 4) / 16))
  schedule = train_lib.make_schedule(_opt_config(learning_rate=lr, warmup_steps=4), total_steps=20)
  want = {0: 0.0, 1: 0.025, 2: 0.05, 4: 0.1, 8: cosine(8), 12: 0.05, 16: cosine(16), 19: cosine(19), 20: 0.0}
  assert cosine(8) == pytest.approx(0.0853553, abs=1e-7) and cosine(16) == pytest.approx(0.0146447, abs=1e-7)
  for step, value in want.items():
    assert float(schedule(step)) == pytest.approx(value, abs=1e-7), step
  # Without warmup the cosine starts at the peak; 'constant' warms up, then stays at the peak.
  no_warmup = train_lib.make_schedule(_opt_config(learning_rate=lr), total_steps=20)
  assert [float(no_warmup(s)) for s in (0, 10, 20)] == pytest.approx([0.1, 0.05, 0.0], abs=1e-7)
  constant = train_lib.make_schedule(_opt_config(learning_rate=lr, warmup_steps=4, schedule="constant"), 20)
  assert [float(constant(s)) for s in (0, 2, 4, 12, 20)] == pytest.approx([0.0, 0.05, 0.1, 0.1, 0.1], abs=1e-7)
  # The optimizer follows the schedule: plain SGD (no momentum, no decay) on a unit gradient
  # moves each parameter by -lr(step).
  params = {"w": jnp.ones((2, 2))}
  cfg = _opt_config(learning_rate=lr, warmup_steps=4, momentum=0.0, nesterov=False, weight_decay=0.0)
  updates = _updates_of_sgd(cfg, {"w": jnp.ones((2, 2))}, params, 13)
  for step in (0, 2, 4, 8, 12):
    np.testing.assert_allclose(updates[step]["w"], -want[step], atol=1e-7, err_msg=f"step {step}")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_weight_decay_reaches_kernels_and_embeddings_only(optimizer):
  """Decayed: conv/dense kernels and other >= 2-D weights (embeddings); not decayed: biases and
  norm scales. With zero gradients the update is -lr * weight_decay * w exactly where decayed."""
  model = models.create("resnet_small", num_classes=4)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 1)))["params"]
  # A ViT's embeddings and a DenseGeneral with a 2-D bias (heads x head_dim), as in attention.
  params = {**params, "pos_embed": jnp.ones((1, 5, 8)), "cls_token": jnp.ones((1, 1, 8)),
            "qkv": {"kernel": jnp.ones((8, 3, 4)), "bias": jnp.ones((3, 4))}}
  mask = train_lib._decay_mask(params)
  flat_mask = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat_mask["['conv1']['kernel']"] and flat_mask["['fc']['kernel']"] and flat_mask["['pos_embed']"]
  assert flat_mask["['qkv']['kernel']"] and flat_mask["['layer2_0']['downsample_conv']['kernel']"]
  assert not flat_mask["['bn1']['scale']"] and not flat_mask["['bn1']['bias']"]
  assert not flat_mask["['fc']['bias']"] and not flat_mask["['qkv']['bias']"]
  assert sum(flat_mask.values()) < len(flat_mask)
  cfg = _opt_config(optimizer=optimizer, learning_rate=0.1, schedule="constant", weight_decay=0.01,
                    momentum=0.0, nesterov=False)
  updates = _updates_of_sgd(cfg, jax.tree.map(jnp.zeros_like, params), params, 1)[0]
  for path, w in jax.tree_util.tree_leaves_with_path(params):
    u = _at(updates, path)
    decayed = flat_mask[jax.tree_util.keystr(path)]
    assert decayed == (w.ndim > 1 and path[-1].key not in ("bias", "scale")), jax.tree_util.keystr(path)
    np.testing.assert_allclose(u, -0.1 * 0.01 * w if decayed else 0.0, rtol=1e-5, atol=1e-9,
                               err_msg=jax.tree_util.keystr(path))


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_unknown_optimizer_and_schedule_errors():
  with pytest.raises(ValueError, match="'sgd' or 'adamw'"):
    train_lib.make_optimizer(_opt_config(optimizer="lion"), 10)
  with pytest.raises(ValueError, match="'cosine' or 'constant'"):
    train_lib.make_optimizer(_opt_config(schedule="step"), 10)


class Crash(Exception):
  pass


def _loop_setup(tmp_path, name):
  model = models.create("resnet_small", num_classes=4)
  tx = train_lib.make_optimizer(_opt_config(), total_steps=8)
  state = train_lib.create_train_state(model, jax.random.PRNGKey(0), (12, 12, 1), tx)
  step_fn = functools.partial(train_lib.train_step, apply_fn=model.apply, tx=tx)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(8, 12, 12, 1)).astype(np.float32),
              "label": rng.integers(0, 4, 8).astype(np.int32)} for _ in range(8)]
  ckpt_dir, metrics = str(tmp_path / name / "checkpoints"), str(tmp_path / name / "metrics.jsonl")
  return state, step_fn, batches, ckpt_dir, metrics


def test_run_loop_checkpoints_logs_and_resumes_exactly(tmp_path):
  """A loop killed after step 5 (checkpoints every 3) resumes from step 3 to the same weights."""
  state, step_fn, batches, ckpt_dir, metrics = _loop_setup(tmp_path, "full")
  loop = functools.partial(train_lib.run_loop, step_fn=step_fn, total_steps=8, checkpoint_every=3, log_every=2)
  full = loop(state, batches=iter(batches), ckpt_dir=ckpt_dir, metrics_path=metrics)
  assert int(full.step) == 8
  lines = [json.loads(l) for l in open(metrics)]
  assert [l["step"] for l in lines] == [2, 4, 6, 8] and all(l["images_per_s"] > 0 for l in lines)
  assert {"loss", "accuracy", "grad_norm"} <= set(lines[0])

  state, step_fn, batches, ckpt_dir, metrics = _loop_setup(tmp_path, "crash")

  def crash_at_5(step):
    if step == 5:
      raise Crash()

  with pytest.raises(Crash):
    loop(state, batches=iter(batches), ckpt_dir=ckpt_dir, metrics_path=metrics, on_step=crash_at_5)
  assert sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())[-1] == 3  # step 5 was never saved
  fresh = _loop_setup(tmp_path, "crash")[0]  # the loop donated `state`
  restored = train_lib.restore_latest(ckpt_dir, fresh)
  assert int(restored.step) == 3
  resumed = loop(restored, batches=iter(batches[3:]), ckpt_dir=ckpt_dir, metrics_path=metrics)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         jax.device_get(full.variables()), jax.device_get(resumed.variables()))
  # Nothing to restore: the state is returned as given.
  assert train_lib.restore_latest(str(tmp_path / "empty"), fresh) is fresh
