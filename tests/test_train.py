import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flexiq_jax import pipeline
from flexiq_jax import models
from flexiq_jax import train as train_lib


def test_eval_sums_top1_top5_and_mask():
  logits = jnp.array([[9., 1, 2, 3, 4, 5, 0], [0., 9, 8, 7, 6, 5, 4], [1., 2, 3, 4, 5, 6, 7]])
  labels = jnp.array([0, 3, 0])
  sums = train_lib.eval_sums(logits, {"label": labels, "mask": jnp.array([1., 1., 0.])})
  assert float(sums["top1"]) == 1  # row 0 right, row 1 wrong, row 2 masked out
  assert float(sums["top5"]) == 2  # label 3 is 4th best in row 1
  assert float(sums["count"]) == 2


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


def test_unknown_optimizer_and_schedule_errors():
  with pytest.raises(ValueError, match="'sgd' or 'adamw'"):
    train_lib.make_optimizer(_opt_config(optimizer="lion"), 10)
  with pytest.raises(ValueError, match="'cosine' or 'constant'"):
    train_lib.make_optimizer(_opt_config(schedule="step"), 10)


class Crash(Exception):
  pass


def test_killed_run_resumes_to_identical_params(smoke_config, tmp_path):
  full_dir, crash_dir = str(tmp_path / "full"), str(tmp_path / "crash")
  _, full_vars = pipeline.train_float(smoke_config, full_dir)

  def crash_at_5(step):
    if step == 5:
      raise Crash()

  with pytest.raises(Crash):
    pipeline.train_float(smoke_config, crash_dir, on_step=crash_at_5)
  steps_done = sorted(int(d) for d in os.listdir(os.path.join(crash_dir, "float", "checkpoints"))
                      if d.isdigit())
  assert steps_done[-1] == 3  # checkpoints every 3 steps; step 5 was never saved
  _, resumed_vars = pipeline.train_float(smoke_config, crash_dir)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         full_vars, resumed_vars)
  lines = [json.loads(l) for l in open(os.path.join(full_dir, "float", "metrics.jsonl"))]
  assert lines[-1]["step"] == 8 and lines[-1]["images_per_s"] > 0


def test_finished_float_model_is_reused_not_retrained(smoke_config, tmp_path):
  workdir = str(tmp_path / "w")
  _, first = pipeline.train_float(smoke_config, workdir)
  calls = []
  _, second = pipeline.train_float(smoke_config, workdir, on_step=calls.append)
  assert calls == []  # no training step ran
  jax.tree_util.tree_map(np.testing.assert_array_equal, first, second)
  changed = smoke_config.copy_and_resolve_references()
  changed.train.learning_rate = 0.5
  with pytest.raises(ValueError, match="different model/data/train config"):
    pipeline.train_float(changed, workdir)
