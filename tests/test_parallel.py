"""Data parallelism: 4 simulated CPU devices give the same training and evaluation as 1 device."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import functools, json, sys
import jax, jax.numpy as jnp, ml_collections, numpy as np
from flexiq_jax import models, parallel
from flexiq_jax import train as train_lib

mesh = parallel.make_mesh()
model = models.create("resnet_small", num_classes=10)
tx = train_lib.make_optimizer(ml_collections.ConfigDict(dict(
    optimizer="sgd", learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4, schedule="cosine",
    warmup_steps=0, grad_clip_norm=0.0)), total_steps=4)
state = parallel.replicate(train_lib.create_train_state(model, jax.random.PRNGKey(0), (12, 12, 1), tx), mesh)
step = jax.jit(functools.partial(train_lib.train_step, apply_fn=model.apply, tx=tx))
rng = np.random.default_rng(0)
losses = []
for _ in range(3):
  batch = {"image": rng.normal(size=(16, 12, 12, 1)).astype(np.float32),
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  sharded = parallel.shard_batch(batch, mesh)
  state, metrics = step(state, sharded)
  losses.append(float(metrics["loss"]))
# Sharded evaluation: 40 examples in batches of 16, the last padded and masked, against the
# same metrics counted by hand in numpy from unsharded logits.
erng = np.random.default_rng(1)
images = erng.normal(size=(40, 12, 12, 1)).astype(np.float32)
labels = erng.integers(0, 10, 40).astype(np.int32)
batches = []
for start in range(0, 40, 16):
  n = min(16, 40 - start)
  pad = lambda a: np.concatenate([a, np.zeros((16 - n,) + a.shape[1:], a.dtype)])
  batches.append({"image": pad(images[start:start + n]), "label": pad(labels[start:start + n]),
                  "mask": pad(np.ones(n, np.float32))})
variables = state.variables()
predict = lambda x, v: model.apply(v, x, train=False)
metrics = train_lib.evaluate(predict, batches, mesh, args=(variables,))
logits = np.asarray(jax.jit(predict)(images, jax.device_get(variables)), np.float64)  # on one device
logp = logits - logits.max(-1, keepdims=True)
logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
top5 = np.argsort(-logits, -1)[:, :5]
by_hand = {"top1": 100 * float(np.mean(top5[:, 0] == labels)),
           "top5": 100 * float(np.mean((top5 == labels[:, None]).any(-1))),
           "loss": float(-np.mean(logp[np.arange(40), labels])), "num_examples": 40}
print(json.dumps({"devices": mesh.size, "losses": losses,
                  "batch_shards": len(sharded["image"].addressable_shards),
                  "shard_rows": int(sharded["image"].addressable_shards[0].data.shape[0]),
                  "kernel_sum": float(jnp.sum(state.params["conv1"]["kernel"])),
                  "eval": metrics, "eval_by_hand": by_hand}))
"""


def _run(num_devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_four_devices_match_one_device():
  one, four = _run(1), _run(4)
  assert one["devices"] == 1 and four["devices"] == 4
  assert four["batch_shards"] == 4 and four["shard_rows"] == 16 // 4  # the batch really is split
  assert one["shard_rows"] == 16
  # BatchNorm statistics are global-batch under jit sharding, so the numbers agree.
  assert one["losses"] == pytest.approx(four["losses"], rel=1e-4)
  assert one["kernel_sum"] == pytest.approx(four["kernel_sum"], rel=1e-4, abs=1e-5)
  # Sharded evaluation counts each real example once (padding masked out) and agrees with the
  # hand count and with one device.
  for run in (one, four):
    assert run["eval"]["num_examples"] == 40
    for key in ("top1", "top5", "loss"):
      assert run["eval"][key] == pytest.approx(run["eval_by_hand"][key], rel=1e-4, abs=1e-6), (key, run)
  assert four["eval"] == pytest.approx(one["eval"], rel=1e-4)
  assert 0 < four["eval"]["top5"] < 100 and four["eval"]["top1"] < four["eval"]["top5"]  # discriminating data


def test_indivisible_batch_is_a_clear_error():
  from flexiq_jax import parallel

  class FakeMesh:
    size = 4

  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    parallel.check_batch_size(30, FakeMesh())
