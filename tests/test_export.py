"""The portable export (flexiq_jax/quantize/export.py): `run.py --mode=export` writes a jax.export
module that a fresh process, with flexiq_jax unimportable, runs to bit-identical logits at several
ratios and batch sizes; the weights and encodings files hold what the docs say."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import flexiq_jax
from flexiq_jax.interception import get_path

from conftest import run_py

RATIOS = (0.0, 0.37, 1.0)

# Runs in a fresh interpreter: flexiq_jax (and so the model code) cannot be imported there.
LOADER = """
import sys
sys.modules["flexiq_jax"] = None  # any import of it raises ImportError
import jax, numpy as np
directory, images_path, out_path = sys.argv[1:]
exp = jax.export.deserialize(bytearray(open(directory + "/model.stablehlo", "rb").read()))
images = np.load(images_path)
out = {}
for r in %r:
  out[f"r{r}"] = np.asarray(exp.call(images, np.float32(r)))
  out[f"r{r}_b3"] = np.asarray(exp.call(images[:3], np.float32(r)))  # another batch size, same module
out["nan"] = np.asarray(exp.call(images[:2], np.float32(1.5)))
assert not any(m == "flexiq_jax" or m.startswith("flexiq_jax.") for m in sys.modules if sys.modules[m] is not None)
np.savez(out_path, **out)
""" % (RATIOS,)


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory):
  """A copy of the finished smoke run, exported by `run.py --mode=export`."""
  workdir = str(tmp_path_factory.mktemp("export") / "wd")
  shutil.copytree(finished_run.workdir, workdir)
  run = dataclasses.replace(finished_run, workdir=workdir)
  stdout = run_py(*run.args("--mode=export")).check().stdout
  return workdir, stdout


def test_run_py_export_writes_every_file(exported):
  workdir, stdout = exported
  directory = os.path.join(workdir, "export")
  assert f"export: {directory}" in stdout and "finetune: reusing the finished run" in stdout
  assert sorted(os.listdir(directory)) == ["encodings.json", "manifest.json", "model.stablehlo",
                                           "weights.safetensors"]
  manifest = json.load(open(os.path.join(directory, "manifest.json")))
  assert manifest["inputs"][0]["shape"] == ["batch", 28, 28, 1] and manifest["platforms"] == ["cpu"]
  assert manifest["provenance"]["versions"]["jax"]


def test_fresh_process_without_flexiq_jax_gets_identical_logits(exported, tmp_path):
  workdir, _ = exported
  run = flexiq_jax.load_quantized(workdir)
  predict = run.predict()
  images = np.random.default_rng(3).uniform(0, 1, (7, 28, 28, 1)).astype(np.float32)
  np.save(tmp_path / "images.npy", images)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  subprocess.run([sys.executable, "-c", LOADER, os.path.join(workdir, "export"), str(tmp_path / "images.npy"),
                  str(tmp_path / "out.npz")], check=True, cwd=str(tmp_path), env=env, timeout=300)
  out = np.load(tmp_path / "out.npz")
  for r in RATIOS:
    expected = np.asarray(predict(images, r))
    np.testing.assert_array_equal(out[f"r{r}"], expected)
    np.testing.assert_array_equal(out[f"r{r}_b3"], np.asarray(predict(images[:3], r)))
  assert not np.array_equal(out["r0.0"], out["r1.0"])  # the ratio really is an input
  assert np.isnan(out["nan"]).all()  # a ratio outside [0, 1]: NaN logits, as QuantizedModel.apply


def test_weights_and_encodings_hold_the_serving_state(exported):
  workdir, _ = exported
  directory = os.path.join(workdir, "export")
  run = flexiq_jax.load_quantized(workdir)
  svars = run.qmodel.prepare(run.qvars)
  weights = load_file(os.path.join(directory, "weights.safetensors"))
  enc = json.load(open(os.path.join(directory, "encodings.json")))
  plan = run.qmodel.plan
  assert set(enc["layers"]) == set(plan.quantized) and enc["levels"] == [0.25, 0.5, 0.75, 1.0]
  for path in plan.quantized:
    key = "/".join(("params", *path.split("/"), "kernel"))
    assert weights[key].dtype == np.int8
    np.testing.assert_array_equal(weights[key], np.asarray(get_path(svars["params"], path)["kernel"]))
    entry, lq, layer = get_path(svars["integer"], path), get_path(run.qvars["quant"], path), enc["layers"][path]
    np.testing.assert_array_equal(weights["/".join(("integer", *path.split("/"), "scale"))], entry["scale"])
    assert layer["activation"]["scale"] == float(entry["act_scale"])
    assert layer["activation"]["signed"] == plan.signed[path]
    assert layer["activation"]["qmin"] == (-128 if plan.signed[path] else 0)
    assert layer["activation"]["extraction_positions"] == np.asarray(lq["act_e"]).tolist()
    assert layer["weight"]["extraction_positions"] == np.asarray(lq["weight_e"]).tolist()
    np.testing.assert_allclose(layer["weight"]["scale"], np.asarray(lq["weight_scale"]), rtol=0, atol=0)
    assert layer["lowerable"] == (path in plan.lowerable)
    if path in plan.lowerable:
      assert layer["channel_rank"] == np.asarray(lq["rank"]).tolist()
      assert layer["counts_per_level"] == np.asarray(lq["counts"]).tolist()
  assert "fill/threshold" in weights and "levels" in weights


def test_export_api_rejects_a_bad_image_shape(finished_run, tmp_path):
  run = flexiq_jax.load_quantized(finished_run.workdir)
  with pytest.raises(ValueError, match=r"image_shape must be \(H, W, C\)"):
    flexiq_jax.export_portable(run.qmodel, run.qvars, str(tmp_path), (28, 28))
  with pytest.raises(FileNotFoundError, match="no complete portable export"):
    flexiq_jax.load_portable(str(tmp_path))
