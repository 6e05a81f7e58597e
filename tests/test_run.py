"""run.py end to end on a tiny Fashion-MNIST-format dataset: every stage, saved outputs reused."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, data_dir, *extra):
  cmd = [sys.executable, "run.py", "--config=configs/quickstart.py:smoke", f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}", "--config.train.batch_size=32",
         "--config.finetune.batch_size=32", "--config.finetune.num_epochs=0.25",
         "--config.eval_batch_size=64", *extra]
  env = dict(os.environ, FLEXIQ_NO_PROGRESS="1", PYTHONPATH=ROOT)
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out.stdout


@pytest.fixture(scope="module")
def finished_run(tiny_fmnist, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  stdout = _run(workdir, tiny_fmnist, "--config.select.selector=evolutionary")
  return workdir, stdout


def test_all_mode_writes_ratio_table_and_provenance(finished_run):
  workdir, stdout = finished_run
  results = json.load(open(os.path.join(workdir, "results.json")))
  for key in ("command", "commit", "device", "date", "config", "metrics"):
    assert key in results
  assert "--config.train.batch_size=32" in results["command"]
  assert results["config"]["train"]["batch_size"] == 32  # the command-line override took effect
  rows = results["metrics"]["ratio_sweep"]
  assert [r["ratio"] for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
  assert all(r["top1_after"] is not None for r in rows)
  bops = [r["relative_bops"] for r in rows]
  assert bops[0] == 1.0 and all(a > b for a, b in zip(bops, bops[1:]))
  table = open(os.path.join(workdir, "ratio_table.md")).read()
  assert "| 50% |" in table and "Commit:" in table
  assert os.path.getsize(os.path.join(workdir, "ratio_plot.png")) > 1000
  selection = json.load(open(os.path.join(workdir, "select", "selection.json")))
  assert selection["selector"] == "evolutionary" and selection["search"]["evaluations"] > 0
  assert os.path.exists(os.path.join(workdir, "select", "search_history.png"))
  assert "ratio 0.50" in stdout
  # The serving export: int8 kernels for every quantized layer, float weights not shipped.
  from flexiq_jax import checkpoint
  from flexiq_jax.inspect_model import get_path
  plan = json.load(open(os.path.join(workdir, "serving", "plan.json")))
  served = checkpoint.load_tree(os.path.join(workdir, "serving", "qvars_int8"))
  assert plan["quantized"] and all(
      str(get_path(served["params"], p)["kernel"].dtype) == "int8" for p in plan["quantized"])


def test_rerun_reuses_every_stage(finished_run, tiny_fmnist):
  workdir, _ = finished_run
  stdout = _run(workdir, tiny_fmnist, "--config.select.selector=evolutionary", "--mode=sweep")
  assert "reusing the finished checkpoint" in stdout
  assert "calibrate: reusing" in stdout and "select: reusing" in stdout
  assert "finetune: reusing the finished run" in stdout


def test_bad_config_values_are_clear_errors(tiny_fmnist, tmp_path):
  cmd = [sys.executable, "run.py", "--config=configs/quickstart.py:smoke", f"--workdir={tmp_path}",
         f"--config.data.data_dir={tiny_fmnist}", "--config.model.name=resnet_huge"]
  out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode != 0 and "unknown model 'resnet_huge'" in out.stderr and "resnet18" in out.stderr
  cmd[-1] = f"--config.data.data_dir={tmp_path}/nowhere"
  out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode != 0 and "apt-get install dataset-fashion-mnist" in out.stderr


def test_select_fitness_kl_and_ce(finished_run, tiny_fmnist):
  """select.fitness: KL to the float model, or cross-entropy to its predicted labels."""
  import jax
  import numpy as np

  from configs import quickstart
  from flexiq_jax import pipeline, quantize, train

  workdir, _ = finished_run
  config = quickstart.get_config("smoke")
  config.data.data_dir = tiny_fmnist
  config.train.batch_size = 32
  model, variables = pipeline.train_float(config, workdir)  # reused, not retrained
  plan, folded, calib = pipeline.calibrate_stage(config, workdir, model, variables)
  orders = {p: np.arange(plan.layers[p].in_channels) for p in plan.eligible}
  none = np.zeros(len(plan.eligible), np.int32)
  every = np.array([plan.layers[p].in_channels for p in plan.eligible], np.int32)
  scores = {}
  for kind in ("kl", "ce"):
    config.select.fitness = kind
    fitness = pipeline._fitness(config, model, variables, plan, folded, calib, orders, [1.0])
    scores[kind] = (fitness(none), fitness(every))
  assert 0 <= scores["kl"][0] < scores["kl"][1]
  # 'ce' against the float model's labels, by hand, with every channel lowered.
  images = jax.numpy.concatenate(pipeline.calibration_batches(config)[:config.select.fitness_batches])
  labels = np.argmax(model.apply(variables, images, train=False), -1)
  qmodel = quantize.QuantizedModel(model, plan, mode="int")
  qvars = quantize.build_qvars(plan, folded, calib, orders, {p: np.zeros(1, np.int32) for p in plan.eligible}, [1.0])
  logits = qmodel.apply_counts(qvars, images, {p: int(c) for p, c in zip(plan.eligible, every)})
  assert scores["ce"][1] == pytest.approx(float(train.cross_entropy(logits, labels)), rel=1e-4)
  config.select.fitness = "mse"
  with pytest.raises(ValueError, match="select.fitness"):
    pipeline._fitness(config, model, variables, plan, folded, calib, orders, [1.0])
