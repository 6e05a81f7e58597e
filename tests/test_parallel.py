"""Data parallelism: 4 simulated CPU devices give the same training as 1 device."""

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
print(json.dumps({"devices": mesh.size, "losses": losses,
                  "batch_shards": len(sharded["image"].addressable_shards),
                  "kernel_sum": float(jnp.sum(state.params["conv1"]["kernel"]))}))
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
  assert four["batch_shards"] == 4  # the batch really is split across the devices
  # BatchNorm statistics are global-batch under jit sharding, so the numbers agree.
  assert one["losses"] == pytest.approx(four["losses"], rel=1e-4)
  assert one["kernel_sum"] == pytest.approx(four["kernel_sum"], rel=1e-4, abs=1e-5)


def test_indivisible_batch_is_a_clear_error():
  from flexiq_jax import parallel

  class FakeMesh:
    size = 4

  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    parallel.check_batch_size(30, FakeMesh())
