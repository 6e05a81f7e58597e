"""run.py --mode=compare on the tiny dataset (two fast methods), and the report writer."""

import json
import os
import subprocess
import sys

from flexiq_jax import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, data_dir, *extra):
  cmd = [sys.executable, "run.py", "--config=configs/quickstart.py:smoke", f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}", "--config.train.batch_size=32", "--config.eval_batch_size=64",
         "--config.compare.methods=layerwise_amp,ptq_minmax", "--mode=compare", *extra]
  env = dict(os.environ, FLEXIQ_NO_PROGRESS="1", PYTHONPATH=ROOT)
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out.stdout


def test_compare_mode_smoke_and_phase_reuse(tiny_fmnist, tmp_path):
  workdir = str(tmp_path / "wd")
  prefix = str(tmp_path / "results" / "compare_tiny")
  _run(workdir, tiny_fmnist, f"--config.compare.results_prefix={prefix}")
  results = json.load(open(prefix + ".json"))
  for key in ("command", "commit", "device", "date", "rows", "float_top1"):
    assert key in results
  methods = {r["method"] for r in results["rows"]}
  assert methods == {"layerwise_amp", "ptq_minmax"}
  ptq = {r["setting"]: r for r in results["rows"] if r["method"] == "ptq_minmax"}
  assert ptq["W8A8"]["relative_bops"] == 1.0 and ptq["W4A4 (ends W8A8)"]["relative_bops"] < 0.3
  table = open(os.path.join(workdir, "compare", "compare_table.md")).read()
  assert "Commit:" in table and "| layerwise_amp |" in table
  assert os.path.getsize(prefix + ".png") > 1000
  for name in ("sensitivity.png", "pareto.png", "phase1.json", "phase2.json", "scores.json"):
    assert os.path.exists(os.path.join(workdir, "layerwise", name))
  # Another allowed drop: the layer-wise phases come from the cache, nothing is re-evaluated.
  stdout = _run(workdir, tiny_fmnist, "--config.compare.allowed_drops=0.1,5")
  assert stdout.count(", 0 new evaluations") == 2, stdout[-3000:]


def test_write_reports_same_ratio_table(tmp_path):
  rows = [{"method": "flexiq", "setting": "ratio 0.5", "top1": 80.0, "relative_bops": 0.63, "ratio": 0.5,
           "finetuned": False},
          {"method": "flexiq_amp", "setting": "ratio 0.5 (AMP)", "top1": 81.0, "relative_bops": 0.60, "ratio": 0.5},
          {"method": "ptq_mse", "setting": "W4A4", "top1": 70.0, "relative_bops": 0.25}]
  results = {"command": "python run.py", "commit": "abc", "device": "cpu", "date": "today", "model": "m",
             "dataset": "d", "float_top1": 82.0, "eval_examples": 10, "rows": rows}
  os.makedirs(tmp_path / "compare")
  text = compare.write_reports(results, str(tmp_path))
  assert "| 0.5 | 80.00 | 0.630 | 81.00 | 0.600 |" in text
  assert os.path.getsize(tmp_path / "compare" / "compare_pareto.png") > 1000
