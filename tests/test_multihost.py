"""Multi-host data parallelism with real processes: two CPU processes joined by
`jax.distributed.initialize` on a local coordinator train the smoke float model to the same
parameters, and evaluate it to the same metrics, as one process with the same global batch;
each reads only its slice of every batch, and only process 0 writes the workdir's files."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import ROOT

WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(num_processes, data_dir, workdir, out):
  port = _free_port()
  env = dict(os.environ, FLEXIQ_NO_PROGRESS="1", PYTHONPATH=ROOT, XLA_FLAGS="")
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(num_processes), str(port), data_dir, workdir, out],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(num_processes)]
  outputs = [p.communicate(timeout=240)[0] for p in procs]
  for p, text in zip(procs, outputs):
    assert p.returncode == 0, text[-4000:]
  return outputs


def test_two_processes_train_like_one_with_the_same_global_batch(tiny_fmnist, tmp_path):
  one, two = str(tmp_path / "one.npz"), str(tmp_path / "two.npz")
  _launch(1, tiny_fmnist, str(tmp_path / "wd1"), one)
  outputs = _launch(2, tiny_fmnist, str(tmp_path / "wd2"), two)
  a, b = np.load(one), np.load(two)
  assert set(a.files) == set(b.files) and len(a.files) > 3
  for key in a.files:
    if key != "metrics":
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
  m1, m2 = json.loads(str(a["metrics"])), json.loads(str(b["metrics"]))
  # Counts are global: every test example once, not once per process.
  assert m1["num_examples"] == m2["num_examples"] == 128
  assert abs(m1["top1"] - m2["top1"]) < 1e-6 and abs(m1["loss"] - m2["loss"]) < 1e-4
  # One writer: each logged step appears once in metrics.jsonl.
  steps = [json.loads(l)["step"] for l in open(tmp_path / "wd2" / "float" / "metrics.jsonl")]
  assert steps == [1, 2, 3, 4]
