"""The serving contract (flexiq_jax/contract.py, docs/serving.md): `LoadedRun.predict` and
`make_predict` refuse what the model cannot serve with one ValueError, publish the input spec in
manifest.json and encodings.json, take raw uint8 images with preprocess=True, and the portable
export gives predict's logits bit for bit on real Fashion-MNIST test images."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

import flexiq_jax
from flexiq_jax import contract
from flexiq_jax.data import fashion_mnist
from flexiq_jax.data import preprocess

from conftest import run_py

FMNIST = fashion_mnist.DEFAULT_DIR


@pytest.fixture(scope="module")
def loaded(finished_run):
  return flexiq_jax.load_quantized(finished_run.workdir)


@pytest.fixture(scope="module")
def predict(loaded):
  return loaded.predict()


def _good(n=4):
  raw = np.random.default_rng(0).integers(0, 256, (n, 28, 28), np.uint8)
  return raw, preprocess.normalize(raw[..., None], (0.2860,), (0.3530,))


@pytest.mark.parametrize("images,message", [
    (np.zeros((2, 32, 32, 1), np.float32), r"images must have shape \(batch, 28, 28, 1\), got shape \(2, 32, 32, 1\)"),
    (np.zeros((2, 1, 28, 28), np.float32), r"\(NCHW\? the model takes NHWC\)"),
    (np.zeros((28, 28, 1), np.float32), r"must be a batch .* Add a batch axis for one image"),
    (np.zeros((2, 28, 28, 1), np.uint8), r"must be float32 normalised pixels .* pass preprocess=True"),
    (np.full((2, 28, 28, 1), 200.0, np.float32), r"image values lie in \[200, 200\], outside the normalised range "
                                                 r"\[-0\.81.*, 2\.02.*\].*mean \[0\.286\], std \[0\.353\]"),
])
def test_predict_refuses_images_the_model_cannot_serve(predict, images, message):
  with pytest.raises(ValueError, match=message):
    predict(images, 0.5)


def test_predict_refuses_nan_and_inf_pixels_naming_the_image(predict):
  _, x = _good(4)
  x = x.copy()
  x[2, 3, 3, 0] = np.nan
  with pytest.raises(ValueError, match=r"NaN or Inf pixels \(in 1 of 4 images, the first at index 2\)"):
    predict(x, 0.5)
  x[2, 3, 3, 0] = np.inf
  with pytest.raises(ValueError, match=r"NaN or Inf pixels"):
    predict(x, 0.0)


@pytest.mark.parametrize("ratio", ["0.5", True, None, [0.5], np.array([0.1, 0.2]), 1.5, -0.1, float("nan")])
def test_predict_refuses_a_ratio_that_is_not_a_number_in_the_unit_interval(predict, ratio):
  _, x = _good(2)
  with pytest.raises(ValueError, match=r"ratio must be (a|one) number in \[0, 1\]|ratio must be in \[0, 1\]"):
    predict(x, ratio)


def test_predict_takes_numbers_of_any_real_type(predict):
  _, x = _good(2)
  reference = np.asarray(predict(x, 0.5))
  for r in (np.float32(0.5), np.float64(0.5), np.asarray(0.5), 0.5):
    np.testing.assert_array_equal(np.asarray(predict(x, r)), reference)
  assert np.asarray(predict(x, 1)).shape == (2, 10)


def test_preprocess_true_takes_raw_uint8_images(predict):
  raw, x = _good(3)
  np.testing.assert_array_equal(np.asarray(predict(raw, 0.5, preprocess=True)), np.asarray(predict(x, 0.5)))
  np.testing.assert_array_equal(np.asarray(predict(raw[..., None], 1.0, preprocess=True)), np.asarray(predict(x, 1.0)))
  with pytest.raises(ValueError, match=r"preprocess=True takes raw uint8 pixels"):
    predict(x, 0.5, preprocess=True)


def test_the_input_spec_is_the_training_normalisation(loaded):
  spec = loaded.input_spec
  assert spec.shape == (28, 28, 1) and spec.mean == (0.2860,) and spec.std == (0.3530,)
  lo, hi = spec.value_range
  assert lo == pytest.approx(-0.2860 / 0.3530) and hi == pytest.approx((1 - 0.2860) / 0.3530)


def test_make_predict_without_a_spec_still_checks_rank_channels_and_finiteness(loaded):
  predict = flexiq_jax.make_predict(loaded.qmodel, loaded.qvars)
  with pytest.raises(ValueError, match=r"1 channel\(s\)"):
    predict(np.zeros((2, 28, 28, 3), np.float32), 0.5)
  with pytest.raises(ValueError, match=r"NaN or Inf"):
    predict(np.full((2, 28, 28, 1), np.nan, np.float32), 0.5)
  assert np.asarray(predict(np.full((1, 28, 28, 1), 200.0, np.float32), 0.5)).shape == (1, 10)  # no range known


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("contract") / "wd")
  shutil.copytree(finished_run.workdir, workdir)
  flexiq_jax.export_run(workdir)
  return workdir


def test_manifest_and_encodings_publish_the_input_spec(exported):
  for name in ("manifest.json", "encodings.json"):
    doc = json.load(open(os.path.join(exported, "export", name)))
    spec = doc["input"]
    assert spec["shape"] == ["batch", 28, 28, 1] and spec["dtype"] == "float32" and spec["layout"] == "NHWC"
    assert spec["normalization"]["mean"] == [0.286] and spec["normalization"]["std"] == [0.353]
    assert spec["value_range"][0] == pytest.approx(-0.286 / 0.353)
  again = contract.InputSpec.from_json(doc["input"])
  assert again.shape == (28, 28, 1) and again.value_range == pytest.approx(tuple(doc["input"]["value_range"]))


@pytest.mark.skipif(not os.path.exists(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz")),
                    reason="real Fashion-MNIST not installed")
def test_the_export_gives_predicts_logits_bit_for_bit_on_real_images(exported):
  """Real Fashion-MNIST test images (not uniform noise), several batch sizes and ratios: the
  exported module and LoadedRun.predict run the same arithmetic."""
  run = flexiq_jax.load_quantized(exported)
  predict = run.predict()
  module = flexiq_jax.load_portable(os.path.join(exported, "export"))
  images, _ = fashion_mnist.load("test", FMNIST)
  x = preprocess.normalize(images[:96, ..., None], (0.2860,), (0.3530,))
  # predict compiles the serving variables in as constants, as the export does (with them as
  # arguments XLA rounds some logits differently: 7 of 2000 test images of a finetuned
  # quickstart model at ratio 0, up to 0.025 in a logit).
  np.testing.assert_array_equal(np.asarray(predict.jitted(x[:5], np.float32(0.0))),
                                np.asarray(module.call(x[:5], np.float32(0.0))))
  for ratio in (0.0, 0.37, 0.5, 1.0):
    for batch in (1, 7, 32):
      n = 14 if batch == 1 else len(x)
      ours = np.concatenate([np.asarray(predict(x[i:i + batch], ratio)) for i in range(0, n, batch)])
      theirs = np.concatenate([np.asarray(module.call(x[i:i + batch], np.float32(ratio))) for i in range(0, n, batch)])
      np.testing.assert_array_equal(theirs, ours, err_msg=f"ratio {ratio}, batch {batch}")
