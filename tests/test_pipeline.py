"""The pipeline's stages (flexiq_jax.pipeline) on the tiny dataset: typed results handed from stage
to stage, finished stages reused, killed training stages resumed to identical weights, a changed
config refused (training stages) or recomputed (the others), and `run_until`/`sweep`."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from flexiq_jax import pipeline
from flexiq_jax import quantize
from flexiq_jax import stage_cache
from flexiq_jax import train
from flexiq_jax.fitness import SelectionFitness
from flexiq_jax.stage_results import Calibration, FloatModel, Quantized, RatioPoint, Selection


@dataclasses.dataclass(frozen=True)
class Staged:
  """A workdir with every stage up to `quantize` done (greedy selector), and their results."""

  run: pipeline.Run
  result: pipeline.PipelineResult

  def copy_to(self, workdir, **changes) -> pipeline.Run:
    """A copy of the workdir (for tests that change it), with config `changes` ('a.b': value)."""
    shutil.copytree(self.run.workdir, workdir)
    config = self.run.config.copy_and_resolve_references()
    for dotted, value in changes.items():
      section, key = dotted.split(".")
      config[section][key] = value
    return pipeline.Run(config, str(workdir), self.run.mesh)


@pytest.fixture(scope="module")
def staged(make_smoke_config, tmp_path_factory) -> Staged:
  config = make_smoke_config()
  config.select.selector = "greedy"
  run = pipeline.Run(config, str(tmp_path_factory.mktemp("pipeline") / "wd"))
  return Staged(run, pipeline.run_until(run, "quantize"))


def _assert_trees_equal(a, b, **tol):
  check = (lambda x, y: np.testing.assert_allclose(x, y, **tol)) if tol else np.testing.assert_array_equal
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(check, jax.device_get(a), jax.device_get(b))


class Crash(Exception):
  pass


def _crash_at(n):
  def on_step(step):
    if step == n:
      raise Crash()
  return on_step


def test_run_until_hands_typed_results_from_stage_to_stage(staged):
  r = staged.result
  assert isinstance(r.float_model, FloatModel) and isinstance(r.calibration, Calibration)
  assert isinstance(r.selection, Selection) and isinstance(r.quantized, Quantized)
  assert r.finetuned is None and not r.quantized.finetuned  # not reached
  assert r.float_metrics["num_examples"] == 128
  # The float metrics are the model's on the 128 test images, counted by hand.
  batches = list(pipeline.eval_batches(staged.run.config))
  keep = np.concatenate([b["mask"] for b in batches]) > 0
  labels = np.concatenate([b["label"] for b in batches])[keep]
  logits = np.concatenate([np.asarray(r.float_model.logits(b["image"])) for b in batches])[keep]
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  assert r.float_metrics["top1"] == pytest.approx(100 * np.mean(np.argmax(logits, -1) == labels))
  assert r.float_metrics["top5"] == pytest.approx(100 * np.mean((top5 == labels[:, None]).any(-1)))
  assert r.selection.selector == "greedy" and r.selection.levels == (0.25, 0.5, 0.75, 1.0)
  plan = r.calibration.plan
  assert plan.lowerable and set(r.selection.orders) == set(plan.lowerable) == set(r.selection.counts)
  for p in plan.lowerable:
    counts = np.asarray(r.selection.counts[p])
    assert counts.shape == (4,) and np.all(np.diff(counts) >= 0)  # nested across levels
    assert sorted(np.asarray(r.selection.orders[p]).tolist()) == list(range(plan.layers[p].in_channels))
  assert r.quantized.qmodel.plan == plan and r.quantized.qmodel.mode == "int"
  with pytest.raises(dataclasses.FrozenInstanceError):
    r.quantized.finetuned = True  # stage results are frozen
  # Stopping earlier: the stages after `until` are not run; a bad name lists the stages.
  early = pipeline.run_until(staged.run, "calibrate", evaluate=False)
  assert early.float_metrics is None and early.selection is None and early.quantized is None
  np.testing.assert_array_equal(early.calibration.stats[plan.lowerable[0]]["ch_max"],
                                r.calibration.stats[plan.lowerable[0]]["ch_max"])
  with pytest.raises(ValueError, match="unknown stage 'quantise'; stages: train, eval, calibrate"):
    pipeline.run_until(staged.run, "quantise")


def test_float_eval_uses_eval_examples(staged):
  run = pipeline.Run(staged.run.config.copy_and_resolve_references(), staged.run.workdir, staged.run.mesh)
  run.config.data.eval_examples = 64
  metrics = pipeline.evaluate_float(run, staged.result.float_model)
  assert metrics["num_examples"] == 64


def test_killed_float_training_resumes_to_identical_params(staged, tmp_path):
  run = pipeline.Run(staged.run.config, str(tmp_path / "crash"), staged.run.mesh)
  with pytest.raises(Crash):
    pipeline.train_float(run, on_step=_crash_at(5))
  ckpts = os.path.join(run.workdir, "float", "checkpoints")
  assert sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())[-1] == 3  # every 3 steps; 5 never saved
  assert not os.path.exists(os.path.join(run.workdir, "float", "done.json"))
  resumed = pipeline.train_float(run)
  _assert_trees_equal(staged.result.float_model.variables, resumed.variables, rtol=1e-6, atol=1e-7)
  lines = [json.loads(line) for line in open(os.path.join(staged.run.workdir, "float", "metrics.jsonl"))]
  assert lines[-1]["step"] == 8 and lines[-1]["images_per_s"] > 0


def test_finished_float_model_is_reused_and_a_changed_config_refused(staged):
  calls = []
  config = staged.run.config.copy_and_resolve_references()
  config.train.log_every_steps = 1  # not a field of the float stage
  config.data.eval_examples = 32
  again = pipeline.train_float(pipeline.Run(config, staged.run.workdir, staged.run.mesh), on_step=calls.append)
  assert calls == []  # no training step ran
  _assert_trees_equal(staged.result.float_model.variables, again.variables)
  config.train.learning_rate = 0.5
  with pytest.raises(stage_cache.StageConfigChanged, match=r"train\.learning_rate: 0\.1 -> 0\.5"):
    pipeline.train_float(pipeline.Run(config, staged.run.workdir, staged.run.mesh))


def test_recomputable_stages_are_reused_or_redone_on_a_change(staged, tmp_path, capsys):
  fm, calibration = staged.result.float_model, staged.result.calibration
  capsys.readouterr()
  again = pipeline.calibrate(staged.run, fm)
  assert "calibrate: reusing" in capsys.readouterr().out
  assert again.plan == calibration.plan
  _assert_trees_equal(again.stats, calibration.stats)
  selection = pipeline.select(staged.run, fm, calibration)
  assert "select: reusing" in capsys.readouterr().out
  _assert_trees_equal(selection.counts, staged.result.selection.counts)
  quantized = pipeline.quantize(staged.run, fm, calibration, selection)
  _assert_trees_equal(quantized.qvars, staged.result.quantized.qvars)  # read back from quantized/

  # Other select.levels: calibration is still reused; selection and quantized variables redone.
  run = staged.copy_to(tmp_path / "wd", **{"select.levels": (0.5, 1.0)})
  assert pipeline.calibrate(run, fm).plan == calibration.plan
  assert "calibrate: reusing" in capsys.readouterr().out
  changed = pipeline.select(run, fm, calibration)
  assert "select: reusing" not in capsys.readouterr().out
  assert changed.levels == (0.5, 1.0) and all(len(c) == 2 for c in changed.counts.values())
  assert json.load(open(os.path.join(run.workdir, "select", "selection.json")))["levels"] == [0.5, 1.0]
  qvars = pipeline.quantize(run, fm, calibration, changed).qvars
  np.testing.assert_array_equal(qvars["levels"], [0.5, 1.0])
  # A select stage of an earlier config is not done for this one.
  assert not pipeline.Run(staged.run.config, run.workdir, run.mesh).stage("select").is_done()


def test_no_stale_calibration_or_selection_after_a_quant_or_select_change(staged, tmp_path, capsys):
  """A changed quant field redoes calibrate and select (not reused from the workdir), and gives
  what a fresh workdir computes; a changed select field redoes select and reuses calibrate."""
  fm, calibration = staged.result.float_model, staged.result.calibration
  changes = {"quant.act_calibration": "percentile", "quant.percentile": 99.0}
  run = staged.copy_to(tmp_path / "quant", **changes)
  capsys.readouterr()
  recalibrated = pipeline.calibrate(run, fm)
  assert "calibrate: reusing" not in capsys.readouterr().out
  fresh_run = pipeline.Run(run.config, str(tmp_path / "fresh"), run.mesh)
  fresh = pipeline.calibrate(fresh_run, fm)
  _assert_trees_equal(recalibrated.stats, fresh.stats)
  # A 99th-percentile clip gives smaller activation scales than the min/max ones it replaced.
  scale = lambda c, p: float(c.stats[p]["act_scale"])
  assert all(scale(recalibrated, p) <= scale(calibration, p) for p in calibration.plan.quantized)
  assert any(scale(recalibrated, p) < 0.99 * scale(calibration, p) for p in calibration.plan.quantized)
  reselected = pipeline.select(run, fm, recalibrated)
  assert "select: reusing" not in capsys.readouterr().out
  saved = json.load(open(os.path.join(run.workdir, "select", "fingerprint.json")))["fields"]
  assert saved["quant"]["act_calibration"] == "percentile"
  _assert_trees_equal(reselected.counts, pipeline.select(fresh_run, fm, fresh).counts)
  capsys.readouterr()
  # Only select.selector changes: calibrate is reused, select is redone with the new selector.
  run = staged.copy_to(tmp_path / "select", **{"select.selector": "uniform"})
  assert pipeline.calibrate(run, fm).plan == calibration.plan
  assert "calibrate: reusing" in capsys.readouterr().out
  uniform = pipeline.select(run, fm, calibration)
  assert "select: reusing" not in capsys.readouterr().out
  assert uniform.selector == "uniform"
  assert json.load(open(os.path.join(run.workdir, "select", "selection.json")))["selector"] == "uniform"
  assert any(not np.array_equal(uniform.counts[p], staged.result.selection.counts[p]) for p in uniform.counts)


def test_select_fitness_kl_and_ce(staged):
  """select.fitness: KL to the float model, or cross-entropy to its predicted labels."""
  config, fm, calibration = staged.run.config, staged.result.float_model, staged.result.calibration
  plan = calibration.plan
  orders = {p: np.arange(plan.layers[p].in_channels) for p in plan.lowerable}
  none = np.zeros(len(plan.lowerable), np.int32)
  every = np.array([plan.layers[p].in_channels for p in plan.lowerable], np.int32)
  images = jax.numpy.concatenate(pipeline.calibration_batches(config)[:config.select.fitness_batches])
  scores = {}
  for kind in ("kl", "ce"):
    fitness = SelectionFitness.build(fm, calibration, orders, [1.0], images, kind=kind)
    scores[kind] = (fitness(none), fitness(every))
  assert 0 <= scores["kl"][0] < scores["kl"][1]
  # 'ce' against the float model's labels, by hand, with every channel lowered.
  labels = np.argmax(fm.logits(images), -1)
  qmodel = quantize.QuantizedModel(fm.model, plan, mode="int")
  qvars = quantize.build_qvars(plan, calibration.folded, calibration.stats, orders,
                               {p: np.zeros(1, np.int32) for p in plan.lowerable}, [1.0])
  logits = qmodel.apply_counts(qvars, images, {p: int(c) for p, c in zip(plan.lowerable, every)})
  assert scores["ce"][1] == pytest.approx(float(train.cross_entropy(logits, labels)), rel=1e-4)
  with pytest.raises(ValueError, match="select.fitness"):
    SelectionFitness.build(fm, calibration, orders, [1.0], images, kind="mse")


def test_sweep_gives_a_point_per_ratio(staged):
  points = pipeline.sweep(staged.run, staged.result.quantized, ratios=(0.0, 0.5, 1.0))
  assert all(isinstance(p, RatioPoint) for p in points) and [p.ratio for p in points] == [0.0, 0.5, 1.0]
  assert points[0].relative_bops == pytest.approx(1.0) and points[0].low_bit_mac_share == 0.0
  assert points[0].relative_bops > points[1].relative_bops > points[2].relative_bops
  assert points[0].low_bit_mac_share < points[1].low_bit_mac_share < points[2].low_bit_mac_share < 1.0
  assert all(0 <= p.top1 <= p.top5 <= 100 for p in points)
  # The ratio-0 point is the quantized model at ratio 0, evaluated by hand.
  q = staged.result.quantized
  by_hand = train.evaluate(lambda x, qv: q.qmodel.apply(qv, x, 0.0), pipeline.eval_batches(staged.run.config),
                           args=(q.qvars,))
  assert points[0].top1 == pytest.approx(by_hand["top1"])
  with pytest.raises(ValueError, match="ratio must be in"):
    pipeline.sweep(staged.run, q, ratios=(1.5,))


def test_killed_finetune_resumes_to_identical_weights(staged, tmp_path):
  config = staged.run.config.copy_and_resolve_references()
  config.finetune.num_epochs = 0.75  # 6 steps of 32 on the tiny 256-image set
  config.finetune.checkpoint_every_steps = 2
  fm, quantized = staged.result.float_model, staged.result.quantized
  full_run = pipeline.Run(config, str(tmp_path / "full"), staged.run.mesh)
  assert pipeline.finetuned_if_done(full_run, fm, quantized) is None  # nothing trained yet
  full = pipeline.finetune(full_run, fm, quantized)
  assert full.finetuned and full.qmodel == quantized.qmodel
  assert json.load(open(tmp_path / "full" / "finetune" / "done.json"))["total_steps"] == 6
  refresh = json.load(open(tmp_path / "full" / "finetune" / "refresh.json"))  # state refreshed after QAT
  assert set(refresh["before_refresh"]) == set(refresh["after_refresh"]) == {"0", "0.5", "1"}
  assert all(v >= 0 for v in refresh["after_refresh"].values())
  mean = lambda d: sum(d.values()) / len(d)
  # 'auto' keeps the refreshed state exactly when it is no farther from the float model.
  assert refresh["kept"] == ("refreshed" if mean(refresh["after_refresh"]) <= mean(refresh["before_refresh"])
                             else "as trained")

  crash_run = pipeline.Run(config, str(tmp_path / "crash"), staged.run.mesh)
  with pytest.raises(Crash):
    pipeline.finetune(crash_run, fm, quantized, on_step=_crash_at(3))
  saved = [int(d) for d in os.listdir(tmp_path / "crash" / "finetune" / "checkpoints") if d.isdigit()]
  assert max(saved) == 2
  assert pipeline.finetuned_if_done(crash_run, fm, quantized) is None  # not finished
  resumed = pipeline.finetune(crash_run, fm, quantized)
  _assert_trees_equal(full.qvars, resumed.qvars, rtol=1e-6, atol=1e-7)
  # Finetuning changed the weights but not the selection.
  assert not np.allclose(full.qvars["params"]["layer1_0"]["conv1"]["kernel"],
                         quantized.qvars["params"]["layer1_0"]["conv1"]["kernel"])
  np.testing.assert_array_equal(full.qvars["quant"]["layer1_0"]["conv1"]["counts"],
                                quantized.qvars["quant"]["layer1_0"]["conv1"]["counts"])
  # Done: reloaded without training, with the serving export beside it.
  calls = []
  done = pipeline.finetuned_if_done(full_run, fm, quantized)
  assert done.finetuned
  _assert_trees_equal(done.qvars, full.qvars)
  again = pipeline.finetune(full_run, fm, quantized, on_step=calls.append)
  assert calls == []
  _assert_trees_equal(again.qvars, full.qvars)
  exported = quantize.export_int8(full.qmodel, full.qvars)
  from flexiq_jax import checkpoint
  _assert_trees_equal(checkpoint.load_tree(str(tmp_path / "full" / "serving" / "qvars_int8")), exported)
  # Another finetuning recipe in the same workdir is refused, naming the field.
  config.finetune.learning_rate = 0.05
  with pytest.raises(stage_cache.StageConfigChanged, match="finetune.learning_rate"):
    pipeline.finetune(pipeline.Run(config, full_run.workdir, full_run.mesh), fm, quantized)


def test_refresh_modes(staged, tmp_path):
  fm, quantized = staged.result.float_model, staged.result.quantized
  never = staged.copy_to(tmp_path / "never", **{"finetune.refresh": "never"})
  assert pipeline.refresh(never, fm, quantized) is quantized
  always = staged.copy_to(tmp_path / "always", **{"finetune.refresh": "always"})
  refreshed = pipeline.refresh(always, fm, quantized)
  assert json.load(open(tmp_path / "always" / "finetune" / "refresh.json"))["kept"] == "refreshed"
  assert refreshed is not quantized and refreshed.qmodel == quantized.qmodel
  bad = staged.copy_to(tmp_path / "bad", **{"finetune.refresh": "sometimes"})
  with pytest.raises(ValueError, match="finetune.refresh"):
    pipeline.refresh(bad, fm, quantized)
