"""The per-layer report of a finished run (flexiq_jax/evaluate/layer_report.py): `run.py
--mode=report` and `flexiq_jax.report` write Markdown, JSON and a plot whose numbers agree with
the quantized model (lowered counts at the levels and at the named ratio, extraction positions,
MAC/BOPs shares from cost.py); bad input is one error line."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

import flexiq_jax
from flexiq_jax import cost
from flexiq_jax import quantize
from flexiq_jax.interception import get_path

from conftest import run_py

RATIO = 0.4


@pytest.fixture(scope="module")
def reported(finished_run, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("report") / "wd")
  shutil.copytree(finished_run.workdir, workdir)
  run = dataclasses.replace(finished_run, workdir=workdir)
  stdout = run_py(*run.args("--mode=report", f"--report_ratio={RATIO}")).check().stdout
  return run, stdout


def test_run_py_report_writes_markdown_json_and_plot(reported):
  run, stdout = reported
  directory = os.path.join(run.workdir, "report")
  assert f"report: {directory}/report.md" in stdout
  assert sorted(os.listdir(directory)) == ["lowbit_share.png", "report.json", "report.md"]
  md = open(os.path.join(directory, "report.md")).read()
  doc = json.load(open(os.path.join(directory, "report.json")))
  assert doc["provenance"]["flexiq_jax_version"] == flexiq_jax.__version__
  assert doc["source"].endswith("/serving") and doc["report_ratio"] == RATIO
  for layer in doc["layers"]:
    assert f"| {layer['path']} |" in md
  assert "records no per-layer sensitivity" in md


def test_report_numbers_agree_with_the_quantized_model(reported):
  run, _ = reported
  doc = json.load(open(os.path.join(run.workdir, "report", "report.json")))
  loaded = flexiq_jax.load_quantized(run.workdir)
  plan, qvars = loaded.qmodel.plan, loaded.qvars
  at_ratio = quantize.lowered_channels(loaded.qmodel, qvars, RATIO)
  infos = plan.layer_infos()
  assert [l["path"] for l in doc["layers"]] == list(plan.quantized)
  for layer in doc["layers"]:
    path, lq = layer["path"], get_path(qvars["quant"], layer["path"])
    c = infos[path].in_channels
    assert layer["in_channels"] == c and layer["macs"] == infos[path].macs
    assert sum(layer["act_e_histogram"]) == sum(layer["weight_f_histogram"]) == c
    assert layer["act_e_histogram"] == np.bincount(np.asarray(lq["act_e"]), minlength=5).tolist()
    if layer["lowerable"]:
      assert layer["lowered_per_level"] == np.asarray(lq["counts"]).tolist()
      assert layer["lowered_at_ratio"] == at_ratio[path]
      lowered = np.flatnonzero(np.asarray(lq["rank"]) < at_ratio[path])
      assert layer["lowered_channels_at_ratio"] == lowered.tolist()
      assert layer["weight_f_histogram_lowered"] == np.bincount(np.asarray(lq["weight_e"])[lowered],
                                                                 minlength=5).tolist()
      assert "lowering_error_lowered" in layer and layer["lowering_error_lowered"] <= layer["lowering_error_all"]
      assert layer["lowered_share_per_ratio"][0] == 0 and layer["lowered_share_per_ratio"][-1] == 1
    else:
      assert layer["lowered_at_ratio"] == 0
  assert sum(l["mac_share"] for l in doc["layers"]) + sum(m["mac_share"] for m in doc["matmuls"]) == pytest.approx(1)
  assert sum(l["bops_share_at_ratio"] for l in doc["layers"]) == pytest.approx(1)  # no matmuls in this CNN
  totals = doc["totals"]
  assert totals["relative_bops_at_report_ratio"] == pytest.approx(quantize.relative_bops_at(loaded.qmodel, qvars, RATIO))
  assert totals["low_bit_mac_share_at_report_ratio"] == pytest.approx(quantize.low_bit_share_at(loaded.qmodel, qvars,
                                                                                               RATIO))
  widest = max(infos[p].macs_per_channel for p in plan.lowerable) / sum(infos[p].macs for p in plan.lowerable)
  assert abs(totals["ratio_at_report_ratio"] - RATIO) <= widest  # within one channel of the named ratio
  assert cost.total_macs(infos) == totals["macs"]


def test_report_of_an_in_memory_model_and_bad_input(reported, tmp_path):
  run, _ = reported
  loaded = flexiq_jax.load_quantized(run.workdir)
  written = flexiq_jax.report((loaded.qmodel, loaded.qvars), report_ratio=1.0, directory=str(tmp_path / "r"))
  assert all(l["lowered_at_ratio"] == l["in_channels"] for l in written.data["layers"] if l["lowerable"])
  assert os.path.exists(written.markdown_path)
  with pytest.raises(ValueError, match="give directory="):
    flexiq_jax.report((loaded.qmodel, loaded.qvars))
  bad = run_py(*run.args("--mode=report", "--report_ratio=1.5"))
  assert bad.returncode != 0 and "error: ratio must be in [0, 1]" in bad.stderr and "Traceback" not in bad.stderr
  empty = dataclasses.replace(run, workdir=str(tmp_path / "empty"))
  bad = run_py(*empty.args("--mode=report"))
  assert bad.returncode != 0 and "error:" in bad.stderr and "holds no quantized model" in bad.stderr
  assert "Traceback" not in bad.stderr
