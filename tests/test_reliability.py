"""A workdir that never lies: run records and results.json from finished runs only, checks before
any work, non-finite guards, damaged checkpoints, the workdir lock and clear load errors.
(Multi-host runs: test_multihost.py.)"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, run_py, smoke_args
from flexiq_jax import checkpoint
from flexiq_jax import cli
from flexiq_jax import data
from flexiq_jax import models
from flexiq_jax import pipeline
from flexiq_jax import stage_cache
from flexiq_jax import stage_options
from flexiq_jax import train
from flexiq_jax import workdir as workdir_lib
from flexiq_jax.stage_cache import Stage, StageConfigChanged
from flexiq_jax.stage_results import FloatModel


def _tree_of_files(root) -> dict:
  """{relative path: bytes} of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      path = os.path.join(dirpath, f)
      out[os.path.relpath(path, root)] = open(path, "rb").read()
  return out


# 1. results.json and stage outputs never mix runs.


def test_results_json_comes_from_finished_runs_whose_stages_are_still_there(tmp_path, smoke_config):
  wd = str(tmp_path)
  Stage(wd, "float", {"a": 1}).begin(resumable=True)
  Stage(wd, "float", {"a": 1}).mark_done()
  with workdir_lib.RunRecord(wd, smoke_config, ["run.py", "first"]) as record:
    record.add("float", {"top1": 50.0})
  results = json.load(open(tmp_path / "results.json"))
  assert results["metrics"] == {"float": {"top1": 50.0}} and results["command"] == "python run.py first"
  assert results["sources"]["float"].startswith("runs/")
  before = open(tmp_path / "results.json").read()
  # A failed run: its record says so, results.json is untouched.
  with pytest.raises(RuntimeError):
    with workdir_lib.RunRecord(wd, smoke_config, ["run.py", "second"]) as record:
      record.add("float", {"top1": 10.0})
      raise RuntimeError("boom")
  assert open(tmp_path / "results.json").read() == before
  runs = [json.load(open(tmp_path / "runs" / f)) for f in sorted(os.listdir(tmp_path / "runs"))]
  assert [r["status"] for r in runs] == ["finished", "failed"] and "boom" in runs[1]["error"]
  # A finished run after the float stage changed: the old float metrics are not shown beside it.
  shutil.rmtree(tmp_path / "float")
  Stage(wd, "float", {"a": 2}).begin(resumable=True)
  Stage(wd, "float", {"a": 2}).mark_done()
  with workdir_lib.RunRecord(wd, smoke_config, ["run.py", "third"]) as record:
    record.add("compare", [])
  results = json.load(open(tmp_path / "results.json"))
  assert set(results["metrics"]) == {"compare"} and results["command"] == "python run.py third"


def test_a_fresh_stage_output_replaces_the_old_only_when_done(tmp_path):
  old = Stage(str(tmp_path), "select", {"select.population": 4})
  old.begin(resumable=False)
  open(old.file("selection.json"), "w").write("population 4")
  old.mark_done()
  assert open(tmp_path / "select" / "selection.json").read() == "population 4"
  new = Stage(str(tmp_path), "select", {"select.population": 6})
  new.begin(resumable=False)
  open(new.file("selection.json"), "w").write("population 6")
  # Killed here: the workdir still holds the old, consistent output.
  again = Stage(str(tmp_path), "select", {"select.population": 4})
  assert again.is_done() and open(tmp_path / "select" / "selection.json").read() == "population 4"
  new.mark_done()
  assert open(tmp_path / "select" / "selection.json").read() == "population 6"
  assert new.path == str(tmp_path / "select") and not os.path.exists(tmp_path / "select.partial")
  assert Stage(str(tmp_path), "select", {"select.population": 6}).is_done()


def test_refused_run_leaves_results_and_every_stage_untouched(finished_run, tmp_path):
  workdir = str(tmp_path / "wd")
  shutil.copytree(finished_run.workdir, workdir)
  before = _tree_of_files(workdir)
  run = run_py(*smoke_args(workdir, finished_run.data_dir, "--config.select.selector=evolutionary",
                          "--config.select.population=6"))
  assert run.returncode != 0
  assert "select.population: 4 -> 6" in run.stderr and "--force_from=finetune" in run.stderr
  after = _tree_of_files(workdir)
  runs = [p for p in after if p.startswith("runs/") and p not in before]
  assert len(runs) == 1 and json.loads(after[runs[0]])["status"] == "failed"
  before.pop(".lock"), after.pop(".lock")  # the pid of the last run that held the workdir
  assert {p: v for p, v in after.items() if p not in runs} == before


# 2. Checks before work.


def test_a_bad_sweep_ratio_is_refused_before_any_stage(smoke_config, tmp_path):
  smoke_config.sweep.ratios = (0.5, 1.5)
  with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\].*1\.5"):
    pipeline.run_until(pipeline.Run(smoke_config, str(tmp_path)), "train")
  assert not os.path.exists(tmp_path / "float")


def test_an_unknown_option_is_refused_before_any_stage(smoke_config, tmp_path):
  smoke_config.quant.act_calibration = "minmx"
  with pytest.raises(ValueError, match=r"unknown quant\.act_calibration 'minmx'; use one of 'minmax'"):
    pipeline.run_until(pipeline.Run(smoke_config, str(tmp_path)), "calibrate")
  assert not os.path.exists(tmp_path / "float")


def test_a_non_finite_override_is_a_clear_error():
  with pytest.raises(SystemExit, match=r"--config.sweep.ratios=\(nan,\): NaN and Inf are not valid"):
    cli.resolve_config_argv(["run.py", "--config=configs/quickstart.py", "--config.sweep.ratios=(nan,)"])
  # A path that merely contains "nan" is not an error.
  cli.resolve_config_argv(["run.py", "--config.init_weights=/w/nan.safetensors"])


def test_a_changed_finetune_is_refused_before_any_stage_runs(smoke_config, tmp_path):
  old = smoke_config.copy_and_resolve_references()
  Stage(str(tmp_path), "finetune", stage_options.fingerprint_fields(old, "finetune")).begin(resumable=True)
  smoke_config.select.population = 6
  with pytest.raises(StageConfigChanged, match=r"select\.population: 4 -> 6.*--force_from=finetune"):
    pipeline.run_until(pipeline.Run(smoke_config, str(tmp_path)), "finetune")
  assert sorted(os.listdir(tmp_path)) == ["finetune"]  # no float training, no selection redone


# 3. Non-finite guards.


def _toy_state():
  params = {"w": jnp.ones((2,))}
  tx = optax.sgd(0.1)
  return train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=tx.init(params))


def _toy_step(bad_step=None):
  def step_fn(state, batch):
    loss = jnp.sum(state.params["w"]) + jnp.sum(batch["image"]) * 0
    if bad_step is not None:
      loss = jnp.where(state.step + 1 == bad_step, jnp.nan, loss)
    params = {"w": state.params["w"] * 0.5}
    return state.replace(step=state.step + 1, params=params), {"loss": loss, "grad_norm": loss}
  return step_fn


def _toy_batches(start, total):
  return iter([{"image": np.zeros((2, 1), np.float32), "label": np.zeros(2, np.int32)}] * (total - start))


def test_training_stops_at_the_first_non_finite_step_and_saves_nothing_from_it(tmp_path):
  ckpt = str(tmp_path / "ckpt")
  with pytest.raises(train.NonFiniteError, match=r"non-finite loss and grad_norm .* at step 3"):
    train.run_loop(_toy_state(), _toy_step(bad_step=3), _toy_batches(0, 6), total_steps=6, ckpt_dir=ckpt,
                   checkpoint_every=1, metrics_path=str(tmp_path / "m.jsonl"), log_every=4)
  mngr = checkpoint.manager(ckpt)
  assert max(mngr.all_steps()) == 2
  mngr.close()


def test_diverging_float_training_is_stopped_and_not_marked_done(smoke_config, tmp_path):
  smoke_config.train.learning_rate = 1e6
  smoke_config.train.warmup_steps = 0
  run = pipeline.Run(smoke_config, str(tmp_path))
  with pytest.raises(train.NonFiniteError, match=r"at step \d+; training stopped"):
    pipeline.train_float(run)
  assert not os.path.exists(tmp_path / "float" / "done.json")


def test_calibration_rejects_non_finite_activations_naming_layer_and_batch(smoke_config, tmp_path):
  model = pipeline.build_model(smoke_config, 10)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 28, 28, 1)), train=False))(jax.random.PRNGKey(0))
  good = np.random.default_rng(0).normal(size=(8, 28, 28, 1)).astype(np.float32)
  bad = good.copy()
  bad[3, 5, 5, 0] = np.inf
  run = pipeline.Run(smoke_config, str(tmp_path))
  with pytest.raises(FloatingPointError, match=r"non-finite activations at the input of layer\(s\) '.+' in "
                     r"calibration batch 1"):
    pipeline.calibrate(run, FloatModel(model, variables), batches=[jnp.asarray(good), jnp.asarray(bad)])
  assert not run.stage("calibrate").is_done() and not os.path.exists(tmp_path / "calibrate")


# 4. Damaged checkpoints.


def _two_steps(tmp_path):
  ckpt = str(tmp_path / "ckpt")
  mngr = checkpoint.manager(ckpt)
  state = _toy_state()
  for step in (1, 2):
    state = state.replace(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full((2,), float(step))})
    checkpoint.save(mngr, step, state)
  mngr.wait_until_finished()
  mngr.close()
  return ckpt


@pytest.mark.parametrize("damage", ["truncate_arrays", "delete_metadata"])
def test_restore_falls_back_to_the_newest_intact_step(tmp_path, capsys, damage):
  ckpt = _two_steps(tmp_path)
  step_dir = os.path.join(ckpt, "2")
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  if damage == "truncate_arrays":
    for f in files:
      if os.sep + "d" + os.sep in f:  # the array data files
        open(f, "r+b").truncate(3)
  else:
    for f in files:
      if os.path.basename(f) == "_METADATA":
        os.remove(f)
  restored = train.restore_latest(ckpt, _toy_state())
  assert int(restored.step) == 1 and np.all(np.asarray(restored.params["w"]) == 1.0)
  out = capsys.readouterr().out
  assert "checkpoint step 2" in out and "damaged" in out and "resuming from step 1" in out
  # The damaged step is gone, so the resumed run can save step 2 again.
  mngr = checkpoint.manager(ckpt)
  assert mngr.all_steps() == [1]
  mngr.close()


def test_a_damaged_saved_tree_is_a_short_clear_error(tmp_path):
  path = str(tmp_path / "stats")
  checkpoint.save_tree(path, {"a": np.arange(1000.0)})
  for d, _, fs in os.walk(path):
    for f in fs:
      if os.sep + "d" + os.sep in os.path.join(d, f):
        open(os.path.join(d, f), "r+b").truncate(3)
  with pytest.raises(checkpoint.CorruptCheckpoint, match=r"cannot read the saved arrays in .*stats") as e:
    checkpoint.load_tree(path, {"a": np.zeros(1000)})
  assert len(str(e.value).splitlines()) == 1


# 5. Fingerprints: named fields and what to do.


def test_refusal_names_the_field_and_the_force_from_stage(tmp_path):
  Stage(str(tmp_path), "float", {"train.learning_rate": 0.1}).begin(resumable=True)
  with pytest.raises(StageConfigChanged, match=r"train\.learning_rate: 0\.1 -> 0\.5\. Use a new --workdir, or pass "
                     r"--force_from=train"):
    Stage(str(tmp_path), "float", {"train.learning_rate": 0.5}).begin(resumable=True)


def test_force_from_moves_the_stage_and_later_ones_aside(tmp_path):
  for name in ("float", "calibrate", "select", "quantized", "finetune", "serving"):
    os.makedirs(tmp_path / name)
    open(tmp_path / name / "x", "w").write(name)
  moved = pipeline.replace_stages(str(tmp_path), "select")
  assert moved == ["select", "quantized", "finetune", "serving"]
  assert sorted(os.listdir(tmp_path)) == ["calibrate", "float", "replaced"]
  (stamp,) = os.listdir(tmp_path / "replaced")
  assert open(tmp_path / "replaced" / stamp / "select" / "x").read() == "select"  # kept, not deleted


# 6. The workdir lock; metrics after a resume.


def test_a_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
  code = ("import sys, time; sys.path.insert(0, %r)\nfrom flexiq_jax import workdir\n"
          "with workdir.locked(%r):\n  print('locked', flush=True); time.sleep(60)\n") % (ROOT, str(tmp_path))
  holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirLocked, match=rf"in use by another run \(pid {holder.pid}"):
      with workdir_lib.locked(str(tmp_path)):
        pass
  finally:
    holder.kill()
    holder.wait()
  with workdir_lib.locked(str(tmp_path)):  # free again once the holder is gone
    pass


def test_metrics_after_a_resume_do_not_repeat_replayed_steps(tmp_path):
  ckpt, metrics = str(tmp_path / "ckpt"), str(tmp_path / "metrics.jsonl")

  def crash(step):
    if step == 5:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    train.run_loop(_toy_state(), _toy_step(), _toy_batches(0, 8), total_steps=8, ckpt_dir=ckpt,
                   checkpoint_every=3, metrics_path=metrics, log_every=1, on_step=crash)
  state = train.restore_latest(ckpt, _toy_state())
  assert int(state.step) == 3
  train.run_loop(state, _toy_step(), _toy_batches(3, 8), total_steps=8, ckpt_dir=ckpt, checkpoint_every=3,
                 metrics_path=metrics, log_every=1)
  assert [json.loads(l)["step"] for l in open(metrics)] == list(range(1, 9))


# 7. Clear messages.


def test_a_truncated_fashion_mnist_file_is_named(tmp_path, tiny_fmnist):
  shutil.copytree(tiny_fmnist, tmp_path / "d")
  path = tmp_path / "d" / "t10k-images-idx3-ubyte.gz"
  blob = open(path, "rb").read()
  open(path, "wb").write(blob[:len(blob) // 2])
  with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz is damaged"):
    data.fashion_mnist.load("test", str(tmp_path / "d"))


def test_an_unknown_tfds_name_is_a_short_error():
  with pytest.raises(ValueError, match=r"TFDS has no dataset 'no_such_dataset_xyz'") as e:
    data.tfds_dataset("no_such_dataset_xyz", "train")
  assert len(str(e.value).splitlines()) <= 3 and e.value.__cause__ is None


def _save_safetensors(path, tensors):
  from safetensors.numpy import save_file
  save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, path)


def test_load_timm_on_foreign_keys_does_not_ask_for_num_classes_already_given(tmp_path):
  path = str(tmp_path / "w.safetensors")
  _save_safetensors(path, {"foo.weight": np.ones((3, 3)), "bar.bias": np.ones(3)})
  with pytest.raises(ValueError) as e:
    models.load_timm("resnet18", path, num_classes=10)
  assert "pass num_classes explicitly" not in str(e.value) and "foo.weight" in str(e.value)


def test_load_timm_refuses_nan_weights(tmp_path):
  path = str(tmp_path / "w.safetensors")
  _save_safetensors(path, {"fc.weight": np.full((10, 4), np.nan), "fc.bias": np.zeros(10)})
  with pytest.raises(ValueError, match=r"w\.safetensors: 1 tensor\(s\) hold NaN or Inf values \(fc\.weight\)"):
    models.load_timm("resnet18", path)


def test_a_text_file_as_pth_is_a_clear_error(tmp_path):
  pytest.importorskip("torch")
  path = tmp_path / "w.pth"
  path.write_text("this is not a checkpoint\n")
  with pytest.raises(ValueError, match=r"cannot read .*w\.pth as a PyTorch checkpoint"):
    models.load_timm("resnet18", str(path))


def test_a_file_that_is_not_a_config_is_one_clear_error(monkeypatch):
  monkeypatch.chdir(ROOT)
  with pytest.raises(SystemExit, match=r"'README.md' is not a config file"):
    cli.resolve_config_argv(["run.py", "--config=README.md"])


def test_a_python_file_without_get_config_is_one_clear_error(tmp_path):
  (tmp_path / "no_get.py").write_text("config = {'seed': 0}\n")
  with pytest.raises(SystemExit, match=r"defines no get_config\(arg\) function"):
    cli.resolve_config_argv(["run.py", f"--config={tmp_path / 'no_get.py'}:smoke"])
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  with pytest.raises(SystemExit, match=r"is not valid Python \(line 1"):
    cli.resolve_config(str(tmp_path / "broken.py"))


# 8. (Multi-host runs: test_multihost.py.) Remote workdirs reach Orbax as given.


def test_checkpoint_paths_keep_remote_workdirs_remote(tmp_path, monkeypatch):
  assert str(checkpoint._path("gs://bucket/wd/float/checkpoints")) == "gs://bucket/wd/float/checkpoints"
  monkeypatch.chdir(tmp_path)
  assert str(checkpoint._path("wd/stats")) == str(tmp_path / "wd" / "stats")  # local: absolute
