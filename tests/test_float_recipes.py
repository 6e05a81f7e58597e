"""experiments/float_recipes.py: the float models' recipes, curves and whether each meets its aim."""

import json
import os

from experiments import float_recipes


def _workdir(tmp_path, name, evals, total_steps):
  workdir = tmp_path / name
  (workdir / "float").mkdir(parents=True)
  with open(workdir / "float" / "eval.jsonl", "w") as f:
    for step, top1 in evals:
      f.write(json.dumps({"step": step, "top1": top1, "top5": 99.0, "loss": 0.3}) + "\n")
  if total_steps is not None:
    (workdir / "float" / "done.json").write_text(json.dumps({"fingerprint": "abc", "total_steps": total_steps}))
    (workdir / "float" / "fingerprint.json").write_text(json.dumps({"fingerprint": "abc"}))
    (workdir / "runs").mkdir()
    (workdir / "runs" / "a.json").write_text(json.dumps(
        {"command": "python run.py --mode=train", "commit": "c0ffee", "host": "h", "date": "d", "status": "finished",
         "stages": {"float": "abc"}}))
  return str(workdir)


def test_a_finished_model_is_judged_against_its_aim_from_its_last_evaluation(tmp_path):
  done = float_recipes.model_row("resnet18", _workdir(tmp_path, "r", [(430, 80.0), (860, 89.5)], 860))
  assert done["top1"] == 89.5 and done["met"] is False and done["target"] == float_recipes.TARGET_CNN
  assert done["curve"] == [(1.0, 80.0), (2.0, 89.5)] and done["record"]["commit"] == "c0ffee"
  vit = float_recipes.model_row("vit_s", _workdir(tmp_path, "v", [(430, 86.5)], 430))
  assert vit["met"] is True and vit["target"] == float_recipes.TARGET_TRANSFORMER


def test_a_later_run_still_running_on_the_workdir_leaves_the_training_record(tmp_path):
  workdir = _workdir(tmp_path, "r", [(469, 91.0)], 469)
  # A pipeline run started on the finished float model: its record has no stages yet.
  (tmp_path / "r" / "runs" / "b.json").write_text(json.dumps(
      {"command": "python run.py", "commit": "beef", "status": "running", "stages": None}))
  assert float_recipes.model_row("resnet18", workdir)["record"]["commit"] == "c0ffee"


def test_a_model_still_training_has_its_curve_but_no_result(tmp_path):
  row = float_recipes.model_row("resnet50", _workdir(tmp_path, "t", [(430, 80.0)], None))
  assert row["top1"] is None and row["met"] is None and row["curve"] == [(1.0, 80.0)]
  text = float_recipes.render({"command": "x", "commit": "y", "device": "z", "date": "w"}, [row])
  assert "| resnet50 | CNN |" in text and "training" in text


def test_unknown_models_are_one_error_line(capsys, tmp_path):
  assert float_recipes.main(["--models=nosuch", f"--out={os.path.join(tmp_path, 'x')}"]) == 2
  assert capsys.readouterr().err.startswith("error: unknown model nosuch")


def test_train_runs_each_unfinished_model_at_its_sweep_rows_config(tmp_path):
  _workdir(tmp_path, "resnet18", [(469, 91.0)], 469)  # finished: not trained again
  commands = float_recipes.train_commands(["resnet18", "vit_s", "efficientnet_lite0"], str(tmp_path))
  assert [c[2:] for c in commands] == [
      ["--config=configs/vit_s.py:fmnist", f"--workdir={tmp_path / 'vit_s'}", "--mode=train"],
      ["--config=configs/efficientnet_lite0.py:fmnist_pretrained", f"--workdir={tmp_path / 'efficientnet_lite0'}",
       "--mode=train"]]


def test_a_replaced_recipe_is_listed_with_its_curve_and_run(tmp_path, monkeypatch):
  workdir = _workdir(tmp_path, "old", [(469, 59.4), (938, 82.6)], 938)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"train": {"batch_size": 128}}, f)
  with open(os.path.join(workdir, "float", "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 938, "accuracy": 0.808}) + "\n")
  monkeypatch.setitem(float_recipes.EARLIER_RUNS, "mobilenetv2", [(workdir, "weight decay 5e-4"),
                                                                    (str(tmp_path / "gone"), "absent")])
  rows = float_recipes.earlier_rows("mobilenetv2")
  assert len(rows) == 1 and rows[0]["top1"] == 82.6 and abs(rows[0]["train_accuracy"] - 80.8) < 1e-9
  assert rows[0]["curve"] == [(1.0, 59.4), (2.0, 82.6)] and rows[0]["record"]["commit"] == "c0ffee"
  row = {**float_recipes.model_row("mobilenetv2", str(tmp_path / "new")), "earlier": rows}
  text = float_recipes.render({"command": "x", "commit": "y", "device": "z", "date": "w"}, [row])
  assert "Recipes tried and replaced" in text and "| mobilenetv2 | weight decay 5e-4 | 82.60 | 80.8 |" in text


def test_a_finished_model_whose_workdir_is_gone_keeps_the_earlier_reports_row(tmp_path):
  out = str(tmp_path / "report")
  _workdir(tmp_path / "root", "resnet18", [(469, 88.0), (938, 91.2)], 938)
  assert float_recipes.main(["--models=resnet18,vit_s", f"--workroot={tmp_path / 'root'}", f"--out={out}"]) == 0
  first = json.load(open(out + ".json"))
  assert first["models"][0]["top1"] == 91.2 and not first["models"][0].get("kept")
  os.rename(tmp_path / "root", tmp_path / "gone")  # a new machine: the workdirs are not there
  _workdir(tmp_path / "root", "resnet18", [(430, 87.5)], None)  # training again, one epoch in
  assert float_recipes.main(["--models=resnet18,vit_s", f"--workroot={tmp_path / 'root'}", f"--out={out}"]) == 0
  again = json.load(open(out + ".json"))
  row = again["models"][0]
  assert row["top1"] == 91.2 and row["done"] and row["kept"]["commit"] == first["commit"]
  assert row["retraining"] == [[1.0, 87.5]]
  assert again["models"][1]["top1"] is None  # never finished: nothing to keep
  text = open(out + ".md").read()
  assert "| resnet18 * |" in text and "training again here: 87.5" in text and "Kept from the report of" in text
  # A finished stage on disk replaces the kept row.
  _workdir(tmp_path / "root2", "resnet18", [(469, 85.0), (938, 90.1)], 938)
  assert float_recipes.main(["--models=resnet18", f"--workroot={tmp_path / 'root2'}", f"--out={out}"]) == 0
  third = json.load(open(out + ".json"))["models"][0]
  assert third["top1"] == 90.1 and not third.get("kept")


def test_a_finished_row_of_a_recipe_since_changed_is_listed_among_the_replaced(tmp_path, monkeypatch):
  out = str(tmp_path / "report")
  _workdir(tmp_path / "root", "resnet18", [(469, 88.0), (938, 91.2)], 938)
  assert float_recipes.main(["--models=resnet18", f"--workroot={tmp_path / 'root'}", f"--out={out}"]) == 0
  original = float_recipes.common_config

  def longer(name):
    config = original(name)
    config.train.num_epochs = 9.0
    return config

  monkeypatch.setattr(float_recipes, "common_config", longer)
  os.rename(tmp_path / "root", tmp_path / "gone")
  assert float_recipes.main(["--models=resnet18", f"--workroot={tmp_path / 'root'}", f"--out={out}"]) == 0
  row = json.load(open(out + ".json"))["models"][0]
  assert row["top1"] is None and not row.get("kept")  # another recipe: not shown as today's
  (replaced,) = row["earlier"]
  assert replaced["top1"] == 91.2 and replaced["change"] == "epochs 5.0 (today 9.0)"
  assert "| resnet18 | epochs 5.0 (today 9.0) | 91.20 |" in open(out + ".md").read()
