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
  plan, ext = run.qmodel.plan, enc["flexiq"]
  # AIMET's 0.6.1 schema: tensor name -> list of encodings with AIMET's own fields and types.
  assert enc["version"] == "0.6.1" and set(enc) >= {"activation_encodings", "param_encodings", "excluded_layers"}
  assert set(ext["layers"]) == set(plan.quantized) and ext["levels"] == [0.25, 0.5, 0.75, 1.0]
  assert ext["lowerable"] == list(plan.lowerable)
  for path in plan.quantized:
    key = "/".join(("params", *path.split("/"), "kernel"))
    layer = ext["layers"][path]
    assert layer["weight_tensor"] == key and key in enc["param_encodings"]
    assert weights[key].dtype == np.int8
    np.testing.assert_array_equal(weights[key], np.asarray(get_path(svars["params"], path)["kernel"]))
    entry, lq = get_path(svars["integer"], path), get_path(run.qvars["quant"], path)
    np.testing.assert_array_equal(weights["/".join(("integer", *path.split("/"), "scale"))], entry["scale"])
    (act,) = enc["activation_encodings"][layer["activation_tensor"]]
    assert set(act) == {"bitwidth", "dtype", "is_symmetric", "scale", "offset", "min", "max"}
    # A layer on the asymmetric grid (unsigned codes, real zero at code z) states its zero point.
    z = layer["activation"]["zero_point"]
    assert z == int(np.asarray(entry.get("zero_point", 0))) and (z == 0 or not plan.signed[path])
    assert act["bitwidth"] == 8 and act["dtype"] == "int" and act["is_symmetric"] == ("False" if z else "True")
    assert act["scale"] == float(entry["act_scale"]) and isinstance(act["offset"], int)
    assert act["offset"] == (-128 if plan.signed[path] else -z)
    assert act["min"] == pytest.approx(act["offset"] * act["scale"])
    assert act["max"] == pytest.approx((act["offset"] + 255) * act["scale"])
    assert layer["activation"]["qmin"] == (-128 if plan.signed[path] else 0) and isinstance(layer["weight"]["qmin"], int)
    assert layer["weight"]["qmin"] == -127 and layer["weight"]["qmax"] == 127
    per_channel = enc["param_encodings"][key]
    assert len(per_channel) == plan.layers[path].out_channels
    np.testing.assert_allclose([e["scale"] for e in per_channel], np.asarray(lq["weight_scale"]), rtol=0, atol=0)
    assert all(e["offset"] == -128 for e in per_channel)
    assert layer["activation"]["extraction_positions"] == np.asarray(lq["act_e"]).tolist()
    assert layer["weight"]["extraction_positions"] == np.asarray(lq["weight_e"]).tolist()
    assert layer["lowerable"] == (path in plan.lowerable)
    if path in plan.lowerable:
      assert layer["channel_rank"] == np.asarray(lq["rank"]).tolist()
      assert layer["counts_per_level"] == np.asarray(lq["counts"]).tolist()
  np.testing.assert_array_equal(ext["fill"]["layer"], weights["fill/layer"])
  assert "fill/threshold" in weights and "levels" in weights


def _lower(q, step, lo, hi):
  return np.clip(np.floor(q / step + 0.5), lo, hi) * step


@pytest.mark.parametrize("ratio", [0.3, 0.8])
def test_encodings_alone_rebuild_a_layer_at_any_ratio(exported, ratio):
  """A lowerable conv's output at a ratio between levels, rebuilt in NumPy from its input, its
  int8 kernel and bias (weights.safetensors) and encodings.json: the AIMET encodings for the 8-bit
  grids, the FlexiQ section for which channels are 4-bit (fill table, ranks) and how (extraction
  positions, bias correction). The layer's geometry (strides, padding) is the model's."""
  from jax import lax

  from flexiq_jax import interception
  from flexiq_jax.quantize import integer
  workdir, _ = exported
  directory = os.path.join(workdir, "export")
  enc = json.load(open(os.path.join(directory, "encodings.json")))
  weights = load_file(os.path.join(directory, "weights.safetensors"))
  run = flexiq_jax.load_quantized(workdir)
  qmodel, qvars, plan = run.qmodel, run.qvars, run.qmodel.plan
  path = next(p for p in plan.lowerable if plan.layers[p].kind == "conv" and plan.layers[p].in_channels >= 16)
  # The model's own input and output of the layer at this ratio (the serving form).
  svars = qmodel.prepare(qvars)
  provider = integer.IntegerLayers(svars["integer"], svars["quant"], qmodel.layer_counts(qvars, ratio), plan.signed,
                                   plan.matmul_signed, "int32", {path: "int8"})
  seen = {}

  class Recorder:
    def layer(self, call, x):
      y = provider.layer(call, x)
      if call.path == path:
        seen.update(x=np.asarray(x), y=np.asarray(y), call=call)
      return y

    def matmul(self, call, a, b):
      return provider.matmul(call, a, b)

  images = np.random.default_rng(5).uniform(0, 1, (3, 28, 28, 1)).astype(np.float32)
  interception.run_with_provider(qmodel.model, plan, {k: svars[k] for k in ("params", "batch_stats") if k in svars},
                                 images, Recorder())
  # Rebuilt from the files alone.
  ext, layer = enc["flexiq"], enc["flexiq"]["layers"][path]
  index = ext["lowerable"].index(path)
  count = sum(1 for l, t in zip(ext["fill"]["layer"], ext["fill"]["threshold"]) if l == index and
              np.float32(t) <= np.float32(ratio))
  lowered = np.asarray(layer["channel_rank"]) < count
  assert 0 < count < layer["in_channels"]  # some channels 4-bit, some 8-bit: the test sees both
  (act,) = enc["activation_encodings"][layer["activation_tensor"]]
  qmin, qmax = act["offset"], act["offset"] + 2 ** act["bitwidth"] - 1
  s_x = np.float32(act["scale"])
  q = np.clip(np.round(seen["x"] / s_x), qmin, qmax).astype(np.float64)
  e = 2.0 ** np.asarray(layer["activation"]["extraction_positions"])
  lo, hi = (-8, 7) if qmin < 0 else (0, 15)
  q = np.where(lowered, _lower(q, e, lo, hi), q)
  w = weights[layer["weight_tensor"]].astype(np.float64)  # (kh, kw, C, O)
  f = 2.0 ** np.asarray(layer["weight"]["extraction_positions"])[None, None, :, None]
  w_low = np.where(lowered[None, None, :, None], _lower(w, f, -8, 7), w)
  s_w = np.array([p["scale"] for p in enc["param_encodings"][layer["weight_tensor"]]])
  module = seen["call"].module
  assert np.prod(w.shape[:3]) * 255 * 128 < 2 ** 24  # the float32 conv of the codes below is exact
  acc = np.asarray(lax.conv_general_dilated(
      q.astype(np.float32), w_low.astype(np.float32), interception.spatial_pair(module.strides),
      interception.conv_padding(module, q.shape, w.shape), rhs_dilation=interception.spatial_pair(module.kernel_dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=layer["groups"]), np.float64)
  bc = layer["bias_correction"]
  lost = np.einsum("c,hwco->o", np.asarray(bc["mean_code"]) * lowered, w) - \
      np.einsum("c,hwco->o", np.asarray(bc["mean_lowered"]) * lowered, w_low)
  bias = weights[layer["bias_tensor"]] if layer["bias_tensor"] else 0.0
  y = acc * s_x * s_w + lost * s_x * s_w + bias
  np.testing.assert_allclose(y, seen["y"], rtol=1e-5, atol=1e-5 * np.abs(seen["y"]).max())


def test_export_api_rejects_a_bad_image_shape(finished_run, tmp_path):
  run = flexiq_jax.load_quantized(finished_run.workdir)
  with pytest.raises(ValueError, match=r"image_shape must be \(H, W, C\)"):
    flexiq_jax.export_portable(run.qmodel, run.qvars, str(tmp_path), (28, 28))
  with pytest.raises(FileNotFoundError, match="no complete portable export"):
    flexiq_jax.load_portable(str(tmp_path))
