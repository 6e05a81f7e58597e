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
