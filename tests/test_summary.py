"""TensorBoard event files (flexiq_jax/summary.py): readable scalars, only from process 0, and in a
finished run for every stage that logs metrics (float training, QAT, the evolutionary search per
generation, the sweep per ratio), agreeing with metrics.jsonl."""

import glob
import json
import os
import struct

import jax
import pytest
from tensorboardX.proto import event_pb2

from flexiq_jax import summary


def read_scalars(logdir: str) -> dict:
  """{tag: {step: value}} from every event file in `logdir` (TFRecord framing: length, its CRC,
  the Event proto, its CRC), read without TensorFlow or TensorBoard."""
  out = {}
  files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
  assert files, f"no event file in {logdir}"
  for path in files:
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def test_scalar_writer_writes_numbers_only(tmp_path):
  summary.write_scalars(str(tmp_path), [(1, {"loss": 2.5, "name": "x", "flag": True}), (2, {"loss": 1.5})],
                        prefix="train/")
  assert read_scalars(str(tmp_path)) == {"train/loss": {1: 2.5, 2: 1.5}}


def test_nothing_written_leaves_no_file(tmp_path):
  summary.ScalarWriter(str(tmp_path)).close()
  assert os.listdir(tmp_path) == []


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  summary.write_scalars(str(tmp_path), [(1, {"loss": 2.5})])
  assert os.listdir(tmp_path) == []


def test_finished_run_has_curves_for_every_logging_stage(finished_run):
  workdir = finished_run.workdir
  for stage in ("float", "finetune"):
    scalars = read_scalars(os.path.join(workdir, stage))
    logged = [json.loads(line) for line in open(os.path.join(workdir, stage, "metrics.jsonl"))]
    assert logged and {r["step"]: pytest.approx(r["loss"]) for r in logged} == scalars["loss"]
    assert set(scalars) >= {"loss", "accuracy", "images_per_s"}
  search = json.load(open(os.path.join(workdir, "select", "selection.json")))["search"]
  scalars = read_scalars(os.path.join(workdir, "select"))
  for level, hist in zip(search["levels"], search["history"]):
    if hist["best"]:
      assert scalars[f"fitness_best/level_{level:g}"] == {g: pytest.approx(b) for g, b in enumerate(hist["best"])}
  rows = json.load(open(os.path.join(workdir, "results.json")))["metrics"]["ratio_sweep"]
  scalars = read_scalars(os.path.join(workdir, "sweep"))
  assert set(scalars["after_finetuning/top1"]) == {round(100 * r["ratio"]) for r in rows}
  assert scalars["before_finetuning/top1"][50] == pytest.approx(next(r for r in rows if r["ratio"] == 0.5)["top1_before"])


def test_run_loop_logs_the_learning_rate_and_periodic_evaluations(tmp_path):
  """Each logged record carries the rate its last update used; eval_fn runs every eval_every
  steps and at the end, to eval.jsonl and TensorBoard eval/<name>."""
  import functools

  import ml_collections
  import numpy as np

  from flexiq_jax import models
  from flexiq_jax import train as train_lib
  cfg = ml_collections.ConfigDict(dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, nesterov=True,
                                       weight_decay=0.0, schedule="cosine", warmup_steps=2, grad_clip_norm=0.0))
  schedule = train_lib.make_schedule(cfg, 7)
  tx = train_lib.make_optimizer(cfg, 7)
  model = models.create("resnet_small", num_classes=4)
  state = train_lib.create_train_state(model, jax.random.PRNGKey(0), (12, 12, 1), tx)
  rng = np.random.default_rng(0)
  batches = iter([{"image": rng.normal(size=(4, 12, 12, 1)).astype(np.float32),
                   "label": rng.integers(0, 4, 4).astype(np.int32)} for _ in range(7)])
  seen = []

  def eval_fn(s):
    seen.append(int(s.step))
    return {"top1": 10.0 * int(s.step)}

  train_lib.run_loop(state, functools.partial(train_lib.train_step, apply_fn=model.apply, tx=tx), batches,
                     total_steps=7, ckpt_dir=str(tmp_path / "ckpt"), checkpoint_every=100,
                     metrics_path=str(tmp_path / "metrics.jsonl"), log_every=2, learning_rate=schedule,
                     eval_fn=eval_fn, eval_every=3)
  scalars = read_scalars(str(tmp_path))
  assert scalars["learning_rate"] == {s: pytest.approx(float(schedule(s - 1))) for s in (2, 4, 6, 7)}
  assert scalars["learning_rate"][2] > 0 and scalars["learning_rate"][7] < scalars["learning_rate"][4]
  assert seen == [3, 6, 7] and scalars["eval/top1"] == {3: 30.0, 6: 60.0, 7: 70.0}
  assert [json.loads(l) for l in open(tmp_path / "eval.jsonl")] == [{"step": s, "top1": 10.0 * s} for s in seen]


def test_training_and_qat_log_learning_rate_eval_accuracy_and_kl(tiny_fmnist, tmp_path):
  """A run with periodic evaluation on: float training logs the learning rate and eval/top1; QAT
  the learning rate, KL to the float model per step and eval top-1/KL/agreement at ratios 0, 0.5, 1."""
  from conftest import run_py, smoke_args
  workdir = str(tmp_path / "wd")
  run_py(*smoke_args(workdir, tiny_fmnist, "--mode=finetune", "--config.select.selector=greedy",
                     "--config.train.eval_every_steps=4", "--config.finetune.eval_every_steps=1",
                     "--config.train.log_every_steps=2", "--config.train.num_epochs=1.0")).check()
  float_tags = read_scalars(os.path.join(workdir, "float"))
  assert {"learning_rate", "loss", "eval/top1", "eval/top5", "eval/loss"} <= set(float_tags)
  assert set(float_tags["eval/top1"]) == {4, 8}  # every 4 of the 8 steps (and the end)
  qat_tags = read_scalars(os.path.join(workdir, "finetune"))
  expected = {"learning_rate", "kl_to_float"} | {f"eval/{m}/r{r}" for m in ("top1", "kl", "agreement")
                                                  for r in ("0", "0.5", "1")}
  assert expected <= set(qat_tags), sorted(qat_tags)
  assert all(v >= 0 for v in qat_tags["kl_to_float"].values())
  evals = [json.loads(l) for l in open(os.path.join(workdir, "finetune", "eval.jsonl"))]
  assert [e["step"] for e in evals] == sorted(qat_tags["eval/top1/r0"])
  assert all(0 <= e["agreement/r1"] <= 100 for e in evals)
