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
  assert run.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in run.stderr
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
  # serving/ (and export/) stay until a new finetune is accepted (artifacts.write_serving).
  assert moved == ["select", "quantized", "finetune"]
  assert sorted(os.listdir(tmp_path)) == ["calibrate", "float", "replaced", "serving"]
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


# 9. A run that goes wrong never replaces a good model.


def test_non_finite_figures_are_written_as_valid_json_with_the_reason(tmp_path):
  from flexiq_jax import records
  path = str(tmp_path / "r.json")
  records.write_json_atomic(path, {"rows": [{"kl": float("inf"), "sqnr_db": float("-inf"), "top1": 10.0}],
                                   "curve": [1.0, float("nan")]})
  doc = json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"invalid JSON token {c}"))
  assert doc["rows"][0] == {"kl": None, "kl_non_finite": "Infinity", "sqnr_db": None,
                            "sqnr_db_non_finite": "-Infinity", "top1": 10.0}
  assert doc["curve"] == [1.0, None] and doc["non_finite"] == ["curve[1]: NaN"]


def _growing_step(state, batch):
  """A finite loss that grows 100x per step (a diverging run that never reaches NaN)."""
  loss = 2.0 * 100.0 ** state.step.astype(jnp.float32) + jnp.sum(batch["image"]) * 0
  return state.replace(step=state.step + 1), {"loss": loss, "grad_norm": jnp.float32(1.0)}


def test_a_loss_far_above_its_start_stops_training_without_saving_it(tmp_path):
  ckpt = str(tmp_path / "ckpt")
  with pytest.raises(train.DivergedError, match=r"the loss diverged to 200 \(started at 2.*at step 2; training stopped"):
    train.run_loop(_toy_state(), _growing_step, _toy_batches(0, 6), total_steps=6, ckpt_dir=ckpt,
                   checkpoint_every=1, metrics_path=str(tmp_path / "m.jsonl"), log_every=1, divergence_factor=10.0)
  mngr = checkpoint.manager(ckpt)
  assert mngr.all_steps() == [1]  # the diverged step was not saved
  mngr.close()
  assert issubclass(train.DivergedError, train.NonFiniteError)  # run.py prints it as one error line


def test_held_out_images_are_training_images_the_finetune_never_saw():
  from flexiq_jax import judge
  ds = data.Dataset("toy", "train", 100, 10, (1, 1, 1),
                    lambda idx, rng: {"image": np.zeros((len(idx), 1, 1, 1), np.float32), "label": np.asarray(idx)})
  seen = {int(i) for b in data.train_batches(ds, 8, seed=3, num_steps=9, num_threads=1) for i in b["label"]}
  held = judge.unseen_train_indices(100, 8, 9, seed=3, limit=1000)
  assert len(held) == 100 - 72 and not seen & set(held.tolist()) and seen | set(held.tolist()) == set(range(100))
  assert len(judge.unseen_train_indices(100, 8, 13, seed=3, limit=1000)) == 0  # every image seen


def test_the_judge_refuses_worse_figures_and_any_non_finite_one():
  from flexiq_jax import judge
  before = {"0": {"top1": 88.0, "kl": 0.001}, "1": {"top1": 87.0, "kl": 0.02}}
  assert judge.failures(before, {"0": {"top1": 86.5, "kl": 0.05}, "1": {"top1": 88.0, "kl": 0.01}}, 2.0, 0.1) == []
  assert judge.failures(before, {"0": {"top1": 85.0, "kl": 0.001}, "1": {"top1": 87.0, "kl": 0.5}}, 2.0, 0.1) == [
      "ratio 0 top-1", "ratio 1 KL"]
  assert judge.failures(before, {"0": {"top1": 88.0, "kl": float("inf")}, "1": before["1"]}, 2.0, 0.1) == [
      "ratio 0 top-1", "ratio 0 KL"]
  # A finetune for ratio 1 only is judged there: its ratio 0 may fall.
  assert judge.failures(before, {"0": {"top1": 80.0, "kl": 0.3}, "1": before["1"]}, 2.0, 0.1, ratios=("1",)) == []


def test_flexiq_100only_is_judged_at_ratio_1_only(smoke_config):
  from flexiq_jax import judge, stage_options
  from flexiq_jax.compare import harness
  cfg = harness.flexiq_100only_config(smoke_config)
  sampler = stage_options.FinetuneOptions.from_config(cfg).sampler()
  assert [r for r in judge.JUDGE_RATIOS if sampler.trains(r)] == [1.0]
  configured = stage_options.FinetuneOptions.from_config(smoke_config).sampler()
  assert [r for r in judge.JUDGE_RATIOS if configured.trains(r)] == [0.0, 1.0]


def test_finished_run_records_an_accepted_judgement_on_held_out_training_images(finished_run):
  report = json.load(open(os.path.join(finished_run.workdir, "finetune", "judge.json")))
  assert report["accepted"] and "training images the finetune never saw" in report["images"]
  assert set(report["before_finetuning"]) == {"0", "1"} and report["num_images"] == 192  # 256 - 2 steps x 32
  manifest = json.load(open(os.path.join(finished_run.workdir, "serving", "manifest.json")))
  assert manifest["fingerprint"] and manifest["input"]["normalization"]["mean"] == [0.286]


@pytest.fixture
def workdir_copy(finished_run, tmp_path):
  """A copy of the finished smoke run and its resolved config (as config.json holds it)."""
  import ml_collections
  from flexiq_jax import records
  workdir = str(tmp_path / "wd")
  shutil.copytree(finished_run.workdir, workdir)
  return workdir, ml_collections.ConfigDict(records.read_json(os.path.join(workdir, "config.json")))


def test_a_worse_finetune_is_refused_and_the_serving_model_and_export_stay(workdir_copy, capsys):
  workdir, config = workdir_copy
  os.makedirs(os.path.join(workdir, "export"))
  open(os.path.join(workdir, "export", "manifest.json"), "w").write("{}")
  serving_before, export_before = _tree_of_files(os.path.join(workdir, "serving")), _tree_of_files(os.path.join(workdir, "export"))
  pipeline.replace_stages(workdir, "finetune")
  # A huge step with clipped gradients: the weights are wrecked but every figure stays finite, so
  # neither the NaN guard nor the divergence stop catches it; the judge must.
  config.finetune.learning_rate = 500.0
  config.finetune.grad_clip_norm = 1.0
  config.finetune.divergence_factor = 0.0
  with pytest.raises(Exception) as e:
    pipeline.run_until(pipeline.Run(config, workdir), "finetune", evaluate=False)
  from flexiq_jax import judge
  assert isinstance(e.value, judge.FinetuneRefused), e.value
  message = str(e.value)
  assert len(message.splitlines()) == 1
  assert "ratio 0: top-1" in message and "finetune.learning_rate" in message and "finetune.judge_top1_drop" in message
  assert _tree_of_files(os.path.join(workdir, "serving")) == serving_before
  assert _tree_of_files(os.path.join(workdir, "export")) == export_before
  assert not os.path.exists(os.path.join(workdir, "finetune"))
  kept = [os.path.join(d, "judge.json") for d, _, fs in os.walk(os.path.join(workdir, "replaced")) if "judge.json" in fs]
  # The finetune --force_from moved aside (accepted) and the refused one, both kept.
  assert sorted(json.load(open(k))["accepted"] for k in kept) == [False, True]


# 10. Derived artefacts are invalidated with their source.


def test_an_accepted_finetune_retires_the_old_serving_model_and_its_export(workdir_copy):
  from flexiq_jax import artifacts
  workdir, _ = workdir_copy
  loaded = flexiq_jax_load(workdir)
  os.makedirs(os.path.join(workdir, "export"))
  open(os.path.join(workdir, "export", "model.stablehlo"), "w").write("old")
  artifacts.write_serving(workdir, loaded.qmodel, loaded.qvars)
  assert not os.path.exists(os.path.join(workdir, "export"))  # stale with the old serving model: moved away
  (stamp,) = os.listdir(os.path.join(workdir, "replaced"))
  assert sorted(os.listdir(os.path.join(workdir, "replaced", stamp))) == ["export", "serving"]


def flexiq_jax_load(workdir):
  import flexiq_jax
  return flexiq_jax.load_quantized(workdir)


def test_loaders_refuse_serving_variables_or_an_export_that_do_not_match(workdir_copy):
  import flexiq_jax
  from flexiq_jax import artifacts, records
  workdir, _ = workdir_copy
  flexiq_jax.export_run(workdir)
  flexiq_jax.load_portable(os.path.join(workdir, "export"))  # matches
  manifest_path = os.path.join(workdir, "serving", "manifest.json")
  manifest = records.read_json(manifest_path)
  records.write_json_atomic(manifest_path, {**manifest, "fingerprint": "0123456789abcdef"})
  with pytest.raises(artifacts.StaleArtifact, match=r"other than those its manifest.json records"):
    flexiq_jax.load_quantized(workdir)
  with pytest.raises(artifacts.StaleArtifact, match=r"was exported from serving variables with fingerprint .* the "
                     r"export is stale"):
    flexiq_jax.load_portable(os.path.join(workdir, "export"))
  records.write_json_atomic(manifest_path, manifest)
  with open(os.path.join(workdir, "export", "model.stablehlo"), "ab") as f:
    f.write(b"\0")
  with pytest.raises(artifacts.StaleArtifact, match=r"model.stablehlo does not match the SHA-256"):
    flexiq_jax.load_portable(os.path.join(workdir, "export"))


# 11. Interrupts keep work.


def test_a_signal_stops_training_at_the_next_step_with_a_checkpoint_there(tmp_path):
  import signal
  from flexiq_jax import signals
  ckpt = str(tmp_path / "ckpt")
  before = signal.getsignal(signal.SIGTERM)

  def send(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  with signals.graceful():
    with pytest.raises(signals.Interrupted, match=r"SIGTERM received; stopped train at step 3/50, checkpointed"):
      train.run_loop(_toy_state(), _toy_step(), _toy_batches(0, 50), total_steps=50, ckpt_dir=ckpt,
                     checkpoint_every=100, metrics_path=str(tmp_path / "m.jsonl"), log_every=100, on_step=send)
  mngr = checkpoint.manager(ckpt)
  assert mngr.all_steps() == [3]
  mngr.close()
  assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


def test_an_interrupted_run_is_recorded_as_such_and_a_dead_one_found(tmp_path, smoke_config):
  from flexiq_jax import signals
  wd = str(tmp_path)
  with pytest.raises(signals.Interrupted):
    with workdir_lib.RunRecord(wd, smoke_config, ["run.py"]):
      raise signals.Interrupted("SIGINT received")
  (first,) = os.listdir(tmp_path / "runs")
  assert json.load(open(tmp_path / "runs" / first))["status"] == "interrupted"
  # A run killed with SIGKILL (or SIGHUP before this code) left `running` behind: its pid is gone.
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  record = {"status": "running", "pid": gone.pid, "hostname": __import__("socket").gethostname()}
  open(tmp_path / "runs" / "20000101T000000.000000Z.json", "w").write(json.dumps(record))
  with workdir_lib.RunRecord(wd, smoke_config, ["run.py"]):
    pass
  dead = json.load(open(tmp_path / "runs" / "20000101T000000.000000Z.json"))
  assert dead["status"] == "died" and f"process {gone.pid} ended without finishing" in dead["error"]


def test_the_checkpoint_interval_never_exceeds_the_stage(smoke_config, tmp_path):
  assert train.checkpoint_interval(500, 469) < 469 and train.checkpoint_interval(200, 469) == 200
  smoke_config.train.checkpoint_every_steps = 1000  # longer than the 8-step stage
  pipeline.train_float(pipeline.Run(smoke_config, str(tmp_path)))
  mngr = checkpoint.manager(str(tmp_path / "float" / "checkpoints"))
  assert min(mngr.all_steps()) < 8  # a checkpoint inside the stage, not only at its end
  mngr.close()


def test_the_entry_point_turns_an_interrupt_into_one_line_and_status_130(capsys):
  from flexiq_jax import signals

  @cli.guarded
  def main(argv):
    raise signals.Interrupted("SIGINT received; stopped float train at step 3/8, checkpointed in x")

  with pytest.raises(SystemExit) as e:
    main(["run.py"])
  assert e.value.code == 130
  assert capsys.readouterr().err.strip().startswith("interrupted: SIGINT received")


# 12. load_quantized falls back to the newest intact float checkpoint.


def test_load_quantized_falls_back_to_the_newest_intact_float_checkpoint(workdir_copy, capsys):
  import flexiq_jax
  workdir, _ = workdir_copy
  ckpt = os.path.join(workdir, "float", "checkpoints")
  (last,) = [int(s) for s in os.listdir(ckpt) if s.isdigit()]  # the smoke run trains 1 step
  shutil.copytree(os.path.join(ckpt, str(last)), os.path.join(ckpt, str(last + 1)))  # a newer step ...
  for d, _, fs in os.walk(os.path.join(ckpt, str(last + 1))):  # ... damaged
    for f in fs:
      if os.sep + "d" + os.sep in os.path.join(d, f):
        open(os.path.join(d, f), "r+b").truncate(3)
  loaded = flexiq_jax.load_quantized(workdir)
  out = capsys.readouterr().out
  assert f"checkpoint step {last + 1}" in out and "damaged" in out and f"using step {last}" in out
  assert loaded.qvars and sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) == [last, last + 1]  # only read


def test_load_quantized_on_damaged_serving_variables_is_one_clear_line(workdir_copy):
  import flexiq_jax
  workdir, _ = workdir_copy
  for d, _, fs in os.walk(os.path.join(workdir, "serving", "qvars_int8")):
    for f in fs:
      if os.sep + "d" + os.sep in os.path.join(d, f):
        open(os.path.join(d, f), "r+b").truncate(3)
  with pytest.raises(checkpoint.CorruptCheckpoint, match=r"cannot read the saved arrays in .*serving/qvars_int8") as e:
    flexiq_jax.load_quantized(workdir)
  assert len(str(e.value).splitlines()) == 1 and isinstance(e.value, cli.user_errors())


# 13. Clear, early errors.


def test_a_missing_imagenet_is_reported_before_any_work_with_the_commands(tmp_path, monkeypatch):
  from configs import vit_b
  from flexiq_jax import preflight
  config = vit_b.get_config(None)
  config.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(preflight.MissingInput) as e:
    pipeline.run_until(pipeline.Run(config, str(tmp_path / "wd")), "finetune")
  message = str(e.value)
  assert "not prepared in" in message and "tfds build imagenet2012 --file_format=array_record" in message
  assert "--manual_dir=" in message and not os.path.exists(tmp_path / "wd")
  # The weights are checked in the same pass (not after the data), from $TFDS_DATA_DIR too.
  config.data.data_dir = ""
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  config.init_weights = str(tmp_path / "weights" / "vit_base_patch16_224.augreg_in21k_ft_in1k.safetensors")
  with pytest.raises(preflight.MissingInput) as e:
    pipeline.run_until(pipeline.Run(config, str(tmp_path / "wd")), "finetune")
  assert f"not prepared in {tmp_path / 'tfds'}" in str(e.value) and "Also: the pretrained weights" in str(e.value)
  assert "timm.create_model('vit_base_patch16_224.augreg_in21k_ft_in1k', pretrained=True)" in str(e.value)


def test_missing_weights_name_the_command_that_writes_them(tmp_path):
  from flexiq_jax import preflight
  path = str(tmp_path / "weights" / "resnet18.a1_in1k.safetensors")
  with pytest.raises(preflight.MissingInput, match=r"timm.create_model\('resnet18.a1_in1k', pretrained=True\)"):
    preflight.check_weights(path)


def test_a_tfds_name_with_the_fashion_mnist_folder_is_not_told_to_build_there(smoke_config, tiny_fmnist):
  from flexiq_jax import preflight
  smoke_config.data.name = "cifar10"
  with pytest.raises(preflight.MissingInput) as e:
    preflight.check_data(smoke_config.data)
  message = str(e.value)
  assert "holds Fashion-MNIST IDX files, not TFDS datasets" in message
  assert f"--data_dir={tiny_fmnist}" not in message.replace(f"--config.data.data_dir={tiny_fmnist}", "")


@pytest.mark.parametrize("field,value", [("train.batch_size", 0), ("eval_batch_size", -8),
                                         ("finetune.checkpoint_every_steps", 0)])
def test_sizes_that_must_be_positive_are_config_errors(smoke_config, tmp_path, field, value):
  from flexiq_jax import preflight
  section, _, name = field.rpartition(".")
  (smoke_config[section] if section else smoke_config)[name] = value
  with pytest.raises(preflight.ConfigError, match=rf"{field} must be a positive number, got {value}"):
    pipeline.run_until(pipeline.Run(smoke_config, str(tmp_path)), "train")


def test_user_errors_of_run_py_are_one_error_line_and_help_exits_0(tiny_fmnist, tmp_path):
  helped = run_py("--help")
  assert helped.returncode == 0 and "--mode" in helped.stdout
  zero = run_py(*smoke_args(str(tmp_path / "a"), tiny_fmnist, "--config.train.batch_size=0"))
  assert zero.returncode == 1 and zero.stderr.strip().splitlines()[-1] == (
      "error: train.batch_size must be a positive number, got 0") and "Traceback" not in zero.stderr
  imagenet = run_py("--config=vit_b.py", f"--workdir={tmp_path / 'b'}", f"--config.data.data_dir={tmp_path / 'tfds'}")
  lines = imagenet.stderr.strip().splitlines()
  assert imagenet.returncode == 1 and lines[-1].startswith("error: the TFDS dataset 'imagenet2012' is not prepared")
  assert "Traceback" not in imagenet.stderr and "Downloading" not in imagenet.stdout + imagenet.stderr
  with workdir_lib.locked(str(tmp_path / "c")):  # this process holds the lock
    locked = run_py(*smoke_args(str(tmp_path / "c"), tiny_fmnist))
  assert locked.returncode == 1 and locked.stderr.strip().splitlines()[-1].startswith(
      f"error: workdir {tmp_path / 'c'} is in use by another run") and "Traceback" not in locked.stderr


def test_a_signal_outside_a_training_loop_stops_at_once():
  import signal
  import time
  from flexiq_jax import signals
  with signals.graceful():
    with pytest.raises(signals.Interrupted, match=r"SIGINT received; stopped at once"):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)  # calibration or evaluation: no step to finish


# 14. A read-only workdir can be evaluated; everything else is one error line.

# Runs run.py with every Python-level write under one directory failing as on a read-only mount
# (root ignores chmod, so the file system's refusal is simulated where Python asks for it).
_READ_ONLY_LAUNCHER = r'''
import builtins, errno, io, os, runpy, sys
root, script = os.path.realpath(sys.argv[1]), sys.argv[2]
sys.argv = [script] + sys.argv[3:]

def inside(path):
  try:
    real = os.path.realpath(os.fspath(path))
  except TypeError:
    return False
  return real == root or real.startswith(root + os.sep)

def deny(path):
  raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

real_open, real_os_open = builtins.open, os.open

def ro_open(file, mode="r", *args, **kwargs):
  if not isinstance(file, int) and any(c in mode for c in "wax+") and inside(file):
    deny(file)
  return real_open(file, mode, *args, **kwargs)

def ro_os_open(path, flags, *args, **kwargs):
  if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC) and inside(path):
    deny(path)
  return real_os_open(path, flags, *args, **kwargs)

def guard(name):
  fn = getattr(os, name)
  def wrapped(path, *args, **kwargs):
    if inside(path):
      if name == "mkdir" and os.path.exists(path):
        raise FileExistsError(errno.EEXIST, "File exists", os.fspath(path))
      deny(path)
    return fn(path, *args, **kwargs)
  setattr(os, name, wrapped)

builtins.open = io.open = ro_open
os.open = ro_os_open
for name in ("mkdir", "remove", "unlink", "rmdir", "rename", "replace", "truncate", "utime"):
  guard(name)
runpy.run_path(script, run_name="__main__")
'''


def _run_py_read_only(workdir, *args):
  from conftest import RunPy
  env = dict(os.environ, FLEXIQ_NO_PROGRESS="1", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", _READ_ONLY_LAUNCHER, workdir, os.path.join(ROOT, "run.py"), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  return RunPy(out.returncode, out.stdout, out.stderr)


def test_a_read_only_workdir_is_evaluated_with_a_note_and_refuses_what_writes(finished_run, tmp_path):
  workdir = str(tmp_path / "wd")
  shutil.copytree(finished_run.workdir, workdir)
  before = _tree_of_files(workdir)
  args = smoke_args(workdir, finished_run.data_dir, "--config.select.selector=evolutionary")
  swept = _run_py_read_only(workdir, *args, "--mode=sweep")
  assert swept.returncode == 0, swept.stderr[-3000:]
  notes = [l for l in swept.stdout.splitlines() if l.startswith("note:")]
  assert len(notes) == 1 and "is read-only (Read-only file system)" in notes[0] and "writes nothing" in notes[0]
  assert "after finetuning: ratio 1.00" in swept.stdout and "Traceback" not in swept.stderr
  assert _tree_of_files(workdir) == before  # no lock, run record, results, table or events written
  for extra in (["--mode=report"], ["--mode=finetune", "--force_from=finetune"]):
    refused = _run_py_read_only(workdir, *args, *extra)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: workdir {workdir} is read-only")
  # A stage the workdir does not hold cannot be computed there: one line naming the path.
  missing = _run_py_read_only(workdir, *args, "--mode=sweep", "--config.select.population=6")
  assert missing.returncode == 1 and "Traceback" not in missing.stderr
  assert missing.stderr.strip().splitlines()[-1].startswith(f"error: {workdir}/select.partial: Read-only file system")
  assert _tree_of_files(workdir) == before


def test_a_reused_stage_rewrites_no_file(tmp_path):
  from flexiq_jax import records
  path = str(tmp_path / "done.json")
  records.write_json_atomic(path, {"fingerprint": "abc", "total_steps": 8})
  os.utime(path, (0, 0))
  records.write_json_atomic(path, {"fingerprint": "abc", "total_steps": 8})
  assert os.stat(path).st_mtime == 0  # the same content: not written again
  records.write_json_atomic(path, {"fingerprint": "abc", "total_steps": 9})
  assert json.load(open(path))["total_steps"] == 9


@pytest.mark.parametrize("args,line", [
    (["--config.nosuchkey=1"], "error: --config.nosuchkey=1: the config has no field 'nosuchkey'"),
    (["--config.train.batch_sze=1"], "error: --config.train.batch_sze=1: the config has no field 'batch_sze' "
                                     "(Did you mean \"batch_size\" instead of \"batch_sze\"?)"),
    (["--config.train.batch_size=abc"], "error: flag --config.train.batch_size=abc: invalid literal for int()"),
    (["--config.sweep.ratios=(abc,)"], "error: sweep.ratios: ratio must be a number in [0, 1], got '(abc,)'"),
    (["--mode=nosuch"], "error: flag --mode=nosuch: value should be one of <train|"),
    (["--nosuchflag=1"], "error: Unknown command line flag 'nosuchflag'"),
    (["stray"], "error: unexpected arguments ['stray']"),
])
def test_flag_and_override_errors_are_one_error_line(tmp_path, args, line):
  out = run_py("--config=configs/quickstart.py:smoke", f"--workdir={tmp_path / 'wd'}", *args)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith(line), out.stderr[-2000:]
  assert not os.path.exists(tmp_path / "wd" / "float")


def test_a_config_argument_that_get_config_refuses_is_one_error_line(tmp_path):
  out = run_py("--config=configs/quickstart.py:nosucharg", f"--workdir={tmp_path / 'wd'}")
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr
  assert lines[0].endswith("ValueError: unknown config argument 'nosucharg'; known: smoke (python run.py --help "
                           "lists the flags)")


def test_os_errors_of_the_user_are_one_line_others_are_not():
  import errno
  line = cli.user_os_error(OSError(errno.EROFS, "Read-only file system", "/wd/runs/x.json"))
  assert line.startswith("error: /wd/runs/x.json: Read-only file system. A read-only workdir can only be evaluated")
  assert cli.user_os_error(OSError(errno.EACCES, "Permission denied", "/wd/.lock")).startswith(
      "error: /wd/.lock: Permission denied.")
  assert cli.user_os_error(OSError(errno.EIO, "Input/output error", "/wd/x")) is None  # a fault, not the user's
  assert cli.user_os_error(ValueError("x")) is None


def test_ctrl_c_on_run_py_checkpoints_at_the_next_step_and_records_interrupted(tiny_fmnist, tmp_path):
  import signal
  import time
  workdir = tmp_path / "wd"
  args = ["--config=configs/quickstart.py:smoke", f"--workdir={workdir}", f"--config.data.data_dir={tiny_fmnist}",
          "--config.train.batch_size=32", "--config.train.num_epochs=100", "--config.train.log_every_steps=1",
          "--config.train.checkpoint_every_steps=100000", "--mode=train"]  # 800 steps: stopped long before the end
  env = dict(os.environ, FLEXIQ_NO_PROGRESS="1", PYTHONPATH=ROOT)
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while not os.path.exists(workdir / "float" / "metrics.jsonl") and time.time() < deadline and proc.poll() is None:
      time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # the first Ctrl-C is heard
    _, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  lines = err.strip().splitlines()
  assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
  assert lines[-1].startswith("interrupted: SIGINT received; stopped float train at step ")
  assert lines[-1].count("rerun the same command to resume") == 1
  step = int(lines[-1].split(" at step ")[1].split("/")[0])
  assert 0 < step < 800
  (record,) = [json.load(open(workdir / "runs" / f)) for f in os.listdir(workdir / "runs")]
  assert record["status"] == "interrupted" and "SIGINT" in record["error"]
  mngr = checkpoint.manager(str(workdir / "float" / "checkpoints"))
  assert max(mngr.all_steps()) == step  # saved at the step the signal stopped
  mngr.close()
