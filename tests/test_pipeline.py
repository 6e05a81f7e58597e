"""The per-model configs run:

* every `:fmnist` variant trains a few steps on the real Fashion-MNIST (skipped where it is not
  installed) with a finite loss;
* run.py end to end (`--mode=sweep`: float eval -> calibrate -> select -> quantize -> ratio sweep,
  no finetuning) from the ImageNet configs of a CNN and a transformer, with `init_weights` a
  converted random timm model and TFDS's mock ImageNet; narrow and shallow (the same reduced
  architecture built in timm and in Flax), all at 32 px, so that they are fast; a ViT from 224-px weights at 32 px.

Runtime on 2 CPU cores (shared, load ~6) is mostly XLA compilation: with an empty XLA cache the
eleven training tests take ~6 min (EfficientNet, Swin, MobileNetV2 the slowest; the five ViT/DeiT
variants share one architecture) and the two run.py tests ~1.5 min; with conftest's persistent
XLA cache warm, ~1.5 min and ~30 s.
"""

import importlib.util
import json
import math
import os
import sys

import jax
import numpy as np
import pytest

from flexiq_jax import pipeline
from flexiq_jax import models
from flexiq_jax.data import fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_configs import MODEL_CONFIGS, load_config  # noqa: E402

REAL_FMNIST = os.path.exists(os.path.join(fashion_mnist.DEFAULT_DIR, "train-images-idx3-ubyte.gz"))


@pytest.mark.skipif(not REAL_FMNIST, reason=f"Fashion-MNIST is not installed in {fashion_mnist.DEFAULT_DIR}")
@pytest.mark.parametrize("file", sorted(MODEL_CONFIGS))
def test_fmnist_variant_trains_on_real_fashion_mnist(file, tmp_path):
  config = load_config(file, "fmnist,smoke")
  assert config.data.data_dir == fashion_mnist.DEFAULT_DIR
  config.train.batch_size = 16
  config.train.num_epochs = 2.5 * 16 / 60_000  # ceil -> 3 steps
  config.train.warmup_steps = 1
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 100
  config.data.num_threads = 1
  assert pipeline.total_train_steps(config, 60_000) == 3
  model, variables = pipeline.train_float(config, str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "float" / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records), records
  assert records[0]["loss"] > 0
  logits = model.apply(variables, np.zeros((2, 28, 28, 1), np.float32), train=False)
  assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()


# --------------------------------------------------------------------------------------------
# run.py --mode=sweep from timm weights on mock ImageNet.

TIMM = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("timm") is not None

# Reduced architectures built the same way in timm and Flax: (timm kwargs, Flax kwargs, image size),
# all at 32 px so that they are fast (the transformer with 8-pixel patches).
E2E_CASES = {
    "resnet18": (dict(layers=(1, 2, 1, 1), channels=(8, 16, 24, 32)),
                 dict(depths=(1, 2, 1, 1), widths=(8, 16, 24, 32)), 32),
    "deit_t": (dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3),
               dict(patch_size=8, embed_dim=48, depth=2, num_heads=3), 32),
}


def _random_timm_checkpoint(name, path, timm_kwargs):
  """timm's `name` with random weights (norm parameters and BN statistics made non-trivial), saved
  as .safetensors; 1000 classes as mock imagenet2012, so the checkpoint's head is used."""
  from safetensors.torch import save_file

  from flexiq_jax.models import timm_reference

  timm = timm_reference.import_timm()
  tmodel = timm.create_model(name, pretrained=False, num_classes=1000, **timm_kwargs)
  save_file(timm_reference.perturb_state_dict(tmodel.state_dict(), seed=0), path)


def _run_py(argv, monkeypatch, model_kwargs, num_examples=24):
  """run.py's main in this process (so TFDS's mock data applies), flags parsed from argv; the
  locked config's model.kwargs (empty for the full-size models, so not overridable from the
  command line) set to `model_kwargs`. Returns the parsed config."""
  import tensorflow_datasets as tfds
  from absl import flags

  import run

  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
  try:
    flags.FLAGS(argv)
    config = flags.FLAGS.config
    with config.unlocked():
      config.model.kwargs.update(model_kwargs)
    with tfds.testing.mock_data(num_examples=num_examples):
      run.main(["run.py"])
    return config
  finally:
    flags.FLAGS.unparse_flags()
    for flag in [f for f in flags.FLAGS if f.startswith("config.")]:  # config_flags adds one per override
      delattr(flags.FLAGS, flag)


def _sweep_argv(file, workdir, ckpt, image_size, selector):
  return ["run.py", f"--config={ROOT}/configs/{file}.py:smoke", f"--workdir={workdir}", "--mode=sweep",
          f"--config.init_weights={ckpt}", f"--config.data.image_size={image_size}",
          "--config.calib.num_images=16", "--config.calib.batch_size=8",
          f"--config.select.selector={selector}", "--config.select.population=3",
          "--config.select.generations=1", "--config.sweep.ratios=(0.0,0.5,1.0)",
          "--config.data.eval_examples=16", "--config.eval_batch_size=8", "--config.data.num_threads=1"]


@pytest.mark.skipif(not TIMM, reason="needs torch and timm (requirements-test.txt)")
@pytest.mark.parametrize("file,selector", [("resnet18", "greedy"), ("deit_t", "evolutionary")])
def test_run_py_sweep_from_timm_weights_on_mock_imagenet(file, selector, tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  name = MODEL_CONFIGS[file]
  timm_kwargs, flax_kwargs, image_size = E2E_CASES[file]
  ckpt = str(tmp_path / "weights.safetensors")
  _random_timm_checkpoint(name, ckpt, timm_kwargs)
  workdir = str(tmp_path / "workdir")
  config = _run_py(_sweep_argv(file, workdir, ckpt, image_size, selector), monkeypatch, flax_kwargs)
  assert config.data.name == "imagenet2012" and config.train.num_epochs == 0

  # num_epochs=0: the float model is the imported checkpoint, unchanged.
  with tfds.testing.mock_data(num_examples=24):
    _, variables = pipeline.train_float(config, workdir)
  imported = models.load_timm(name, ckpt, num_classes=1000, image_size=image_size, **flax_kwargs)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), jax.device_get(imported))

  results = json.load(open(os.path.join(workdir, "results.json")))
  # Transformer configs carry the input size in model.kwargs (it follows data.image_size).
  expected_kwargs = {**flax_kwargs, **({"image_size": image_size} if file == "deit_t" else {})}
  assert results["config"]["model"]["kwargs"] == json.loads(json.dumps(expected_kwargs))
  assert 0 <= results["metrics"]["float"]["top1"] <= 100
  assert results["metrics"]["float"]["num_examples"] == 16
  rows = results["metrics"]["ratio_sweep"]
  assert [r["ratio"] for r in rows] == [0.0, 0.5, 1.0]
  bops = [r["relative_bops"] for r in rows]
  assert bops[0] == pytest.approx(1.0) and all(a > b for a, b in zip(bops, bops[1:])), bops
  for r in rows:
    assert 0 <= r["top1_before"] <= 100 and 0 <= r["top5_before"] <= 100
    assert r["top1_after"] is None  # --mode=sweep without a finetuned model: no finetuning
  assert not os.path.exists(os.path.join(workdir, "finetune"))
  selection = json.load(open(os.path.join(workdir, "select", "selection.json")))
  assert selection["selector"] == selector
  ratios = selection["mac_ratio_per_level"]
  assert all(a < b for a, b in zip(ratios, ratios[1:])), ratios
  assert os.path.exists(os.path.join(workdir, "ratio_table.md"))


@pytest.mark.skipif(not TIMM, reason="needs torch and timm (requirements-test.txt)")
def test_vit_at_another_size_from_224_px_timm_weights(tmp_path, monkeypatch):
  """Weights trained at 224 px run a ViT config at 32 px: --config.data.image_size=32 reaches
  model.kwargs, and the import resizes the position embeddings (14x14 -> 2x2 patches)."""
  import tensorflow_datasets as tfds

  timm_kwargs = dict(embed_dim=48, depth=2, num_heads=3)  # img_size 224, patch 16
  ckpt = str(tmp_path / "weights.safetensors")
  _random_timm_checkpoint("vit_small_patch16_224", ckpt, timm_kwargs)
  workdir = str(tmp_path / "workdir")
  config = _run_py(_sweep_argv("vit_s", workdir, ckpt, 32, "greedy"), monkeypatch, timm_kwargs)
  assert config.model.kwargs.image_size == 32
  with tfds.testing.mock_data(num_examples=24):
    _, variables = pipeline.train_float(config, workdir)
  assert variables["params"]["pos_embed"].shape[1] == 1 + 2 * 2  # class token + 2x2 patches
  rows = json.load(open(os.path.join(workdir, "results.json")))["metrics"]["ratio_sweep"]
  assert [r["ratio"] for r in rows] == [0.0, 0.5, 1.0]
