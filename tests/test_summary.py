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
