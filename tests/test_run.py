"""run.py end to end: every stage on a tiny Fashion-MNIST-format dataset with saved outputs reused,
clear errors, and `--mode=sweep` from the ImageNet configs with `init_weights` a converted random
timm model on TFDS's mock ImageNet.

The timm cases are narrow and shallow (the same reduced architecture built in timm and in Flax),
all at 32 px, so that they are fast; a ViT from 224-px weights runs at 32 px. Runtime on 2 CPU
cores is mostly XLA compilation (conftest's persistent XLA cache makes reruns fast).
"""

import dataclasses
import importlib.util
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, FinishedRun, run_py
from flexiq_jax import models
from flexiq_jax import pipeline
from test_configs import MODEL_CONFIGS


def test_all_mode_writes_ratio_table_and_provenance(finished_run):
  workdir, stdout = finished_run.workdir, finished_run.stdout
  results = json.load(open(os.path.join(workdir, "results.json")))
  for key in ("command", "commit", "device", "date", "config", "metrics"):
    assert key in results
  assert "--config.train.batch_size=32" in results["command"]
  assert results["config"]["train"]["batch_size"] == 32  # the command-line override took effect
  # config.json: the resolved config, written at start (load_quantized rebuilds the model from it).
  assert json.load(open(os.path.join(workdir, "config.json"))) == results["config"]
  rows = results["metrics"]["ratio_sweep"]
  assert [r["ratio"] for r in rows] == [0.0, 0.1, 0.25, 0.37, 0.5, 0.62, 0.75, 0.9, 1.0]
  assert all(r["top1_after"] is not None for r in rows)
  bops = [r["relative_bops"] for r in rows]
  assert bops[0] == 1.0 and all(a > b for a, b in zip(bops, bops[1:]))
  # Distance to the float model at every ratio, before and after finetuning.
  for r in rows:
    for when in ("before", "after"):
      assert 0 <= r[f"agreement_{when}"] <= 100 and r[f"kl_{when}"] >= 0 and np.isfinite(r[f"sqnr_db_{when}"])
  assert rows[-1]["sqnr_db_before"] < rows[0]["sqnr_db_before"]  # 4 bits everywhere is further from float
  table = open(os.path.join(workdir, "ratio_table.md")).read()
  assert "| 50% |" in table and "Commit:" in table and "KL before / after" in table
  assert os.path.getsize(os.path.join(workdir, "ratio_plot.png")) > 1000
  selection = json.load(open(os.path.join(workdir, "select", "selection.json")))
  assert selection["selector"] == "evolutionary" and selection["search"]["evaluations"] > 0
  assert os.path.exists(os.path.join(workdir, "select", "search_history.png"))
  assert "ratio 0.50" in stdout
  # Every stage directory is marked done under its fingerprint.
  for stage in ("float", "calibrate", "select", "quantized", "finetune"):
    done = json.load(open(os.path.join(workdir, stage, "done.json")))
    assert done["fingerprint"] == json.load(open(os.path.join(workdir, stage, "fingerprint.json")))["fingerprint"]
  # The serving export: int8 kernels for every quantized layer, float weights not shipped.
  from flexiq_jax import checkpoint
  from flexiq_jax.interception import get_path
  plan = json.load(open(os.path.join(workdir, "serving", "plan.json")))
  served = checkpoint.load_tree(os.path.join(workdir, "serving", "qvars_int8"))
  assert plan["quantized"] and all(
      str(get_path(served["params"], p)["kernel"].dtype) == "int8" for p in plan["quantized"])


def test_rerun_reuses_every_stage(finished_run):
  # Logging and checkpoint frequency are not part of any stage's fingerprint.
  stdout = run_py(*finished_run.args("--mode=sweep", "--config.train.log_every_steps=1",
                                     "--config.train.checkpoint_every_steps=1")).check().stdout
  assert "reusing the finished checkpoint" in stdout
  assert "calibrate: reusing" in stdout and "select: reusing" in stdout
  assert "finetune: reusing the finished run" in stdout


def _copy(finished_run, tmp_path) -> FinishedRun:
  """A copy of the finished run, for tests that run.py may change (the session's run stays as is)."""
  workdir = str(tmp_path / "wd")
  shutil.copytree(finished_run.workdir, workdir)
  return dataclasses.replace(finished_run, workdir=workdir)


def test_changed_training_config_is_refused_naming_the_field(finished_run, tmp_path):
  run = _copy(finished_run, tmp_path)
  out = run_py(*run.args("--mode=train", "--config.train.learning_rate=0.5"))
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "train.learning_rate: 0.1 -> 0.5" in last, out.stderr[-3000:]
  assert "Traceback" not in out.stderr
  assert "Use a new --workdir" in out.stderr


def test_refused_config_leaves_the_runs_config_json(finished_run, tmp_path):
  """config.json is what load_quantized rebuilds the run's models from: a refused invocation must
  not replace it with a config that the workdir does not hold."""
  run = _copy(finished_run, tmp_path)
  before = json.load(open(os.path.join(run.workdir, "config.json")))
  assert run_py(*run.args("--mode=train", "--config.train.learning_rate=0.5")).returncode != 0
  assert json.load(open(os.path.join(run.workdir, "config.json"))) == before


def test_bad_config_values_are_clear_errors(tiny_fmnist, tmp_path):
  args = ["--config=configs/quickstart.py:smoke", f"--workdir={tmp_path}", f"--config.data.data_dir={tiny_fmnist}"]
  out = run_py(*args, "--config.model.name=resnet_huge", timeout=300)
  assert out.returncode != 0 and "unknown model 'resnet_huge'" in out.stderr and "resnet18" in out.stderr
  out = run_py(*args[:2], f"--config.data.data_dir={tmp_path}/nowhere", timeout=300)
  assert out.returncode != 0 and "apt-get install dataset-fashion-mnist" in out.stderr


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

  import timm_reference

  timm = timm_reference.import_timm()
  tmodel = timm.create_model(name, pretrained=False, num_classes=1000, **timm_kwargs)
  save_file(timm_reference.perturb_state_dict(tmodel.state_dict(), seed=0), path)


def _run_py_in_process(argv, monkeypatch, model_kwargs, num_examples=24):
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


def _float_variables(config, workdir):
  """The workdir's float model (num_epochs=0: reused, never trained)."""
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=24):
    return pipeline.train_float(pipeline.Run(config, workdir)).variables


def _float_metrics_by_hand(config, variables) -> dict:
  """top1/top5 (%) and mean loss of the float model on the run's (mock) eval examples, in numpy."""
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=24):
    batches = list(pipeline.eval_batches(config))
  keep = np.concatenate([b["mask"] for b in batches]) > 0
  labels = np.concatenate([b["label"] for b in batches])[keep]
  model = pipeline.build_model(config, 1000)
  logits = np.concatenate([np.asarray(jax.jit(lambda x: model.apply(variables, x, train=False))(b["image"]))
                           for b in batches])[keep].astype(np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  top5 = np.argsort(-logits, -1)[:, :5]
  return {"top1": 100 * np.mean(top5[:, 0] == labels), "top5": 100 * np.mean((top5 == labels[:, None]).any(-1)),
          "loss": -np.mean(logp[np.arange(len(labels)), labels]), "num_examples": len(labels)}


@pytest.mark.skipif(not TIMM, reason="needs torch and timm (requirements-test.txt)")
@pytest.mark.parametrize("file,selector", [("resnet18", "greedy"), ("deit_t", "evolutionary")])
def test_run_py_sweep_from_timm_weights_on_mock_imagenet(file, selector, tmp_path, monkeypatch):
  name = MODEL_CONFIGS[file]
  timm_kwargs, flax_kwargs, image_size = E2E_CASES[file]
  ckpt = str(tmp_path / "weights.safetensors")
  _random_timm_checkpoint(name, ckpt, timm_kwargs)
  workdir = str(tmp_path / "workdir")
  config = _run_py_in_process(_sweep_argv(file, workdir, ckpt, image_size, selector), monkeypatch, flax_kwargs)
  assert config.data.name == "imagenet2012" and config.train.num_epochs == 0

  # num_epochs=0: the float model is the imported checkpoint, unchanged.
  variables = _float_variables(config, workdir)
  imported = models.load_timm(name, ckpt, num_classes=1000, image_size=image_size, **flax_kwargs)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), jax.device_get(imported))

  results = json.load(open(os.path.join(workdir, "results.json")))
  # Transformer configs carry the input size in model.kwargs (it follows data.image_size).
  expected_kwargs = {**flax_kwargs, **({"image_size": image_size} if file == "deit_t" else {})}
  assert results["config"]["model"]["kwargs"] == json.loads(json.dumps(expected_kwargs))
  # The float metrics are the imported model's on the 16 mock eval examples, counted by hand.
  assert results["metrics"]["float"] == pytest.approx(_float_metrics_by_hand(config, variables), rel=1e-4)
  assert results["metrics"]["float"]["num_examples"] == 16
  rows = results["metrics"]["ratio_sweep"]
  assert [r["ratio"] for r in rows] == [0.0, 0.5, 1.0]
  bops = [r["relative_bops"] for r in rows]
  assert bops[0] == pytest.approx(1.0) and all(a > b for a, b in zip(bops, bops[1:])), bops
  for r in rows:
    assert r["top1_before"] <= r["top5_before"]  # a top-1 hit is a top-5 hit
    for key in ("top1_before", "top5_before"):  # hits counted over the 16 examples
      assert r[key] * 16 / 100 == pytest.approx(round(r[key] * 16 / 100)), (key, r)
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
  timm_kwargs = dict(embed_dim=48, depth=2, num_heads=3)  # img_size 224, patch 16
  ckpt = str(tmp_path / "weights.safetensors")
  _random_timm_checkpoint("vit_small_patch16_224", ckpt, timm_kwargs)
  workdir = str(tmp_path / "workdir")
  config = _run_py_in_process(_sweep_argv("vit_s", workdir, ckpt, 32, "greedy"), monkeypatch, timm_kwargs)
  assert config.model.kwargs.image_size == 32
  variables = _float_variables(config, workdir)
  assert variables["params"]["pos_embed"].shape[1] == 1 + 2 * 2  # class token + 2x2 patches
  rows = json.load(open(os.path.join(workdir, "results.json")))["metrics"]["ratio_sweep"]
  assert [r["ratio"] for r in rows] == [0.0, 0.5, 1.0]
