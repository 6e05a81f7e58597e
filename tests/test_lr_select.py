"""flexiq_jax.lr_select: with finetune.lr_grid every QAT method trains once per rate and keeps the
candidate its held-out training images rank best (the stage output is that candidate's), never
reading the eval split; the held-out images are reached by no QAT method's batches; a finished
candidate is reused after a kill; grid () keeps every fingerprint, a grid changes the QAT ones."""

import dataclasses
import json
import os

import numpy as np
import pytest

from configs import quickstart
from flexiq_jax import checkpoint
from flexiq_jax import data
from flexiq_jax import finetune
from flexiq_jax import judge
from flexiq_jax import lr_select
from flexiq_jax import pipeline
from flexiq_jax import stage_cache
from flexiq_jax import stage_options
from flexiq_jax.compare import harness


# --------------------------------------------------------------------------------------------
# Held-out images, the grid's checks, fingerprints (no training).


def test_held_out_images_are_reached_by_no_qat_methods_batches():
  ds = data.Dataset("toy", "train", 100, 10, (1, 1, 1),
                    lambda idx, rng: {"image": np.zeros((len(idx), 1, 1, 1), np.float32), "label": np.asarray(idx)})
  seen = {int(i) for seed in (4, 5) for b in data.train_batches(ds, 8, seed=seed, num_steps=6, num_threads=1)
          for i in b["label"]}
  held = lr_select.unseen_by_all(100, 8, 6, (4, 5), limit=1000)
  assert len(held) > 0 and not seen & set(held.tolist()) and seen | set(held.tolist()) == set(range(100))
  assert len(lr_select.unseen_by_all(100, 8, 6, (4, 5), limit=3)) == 3
  assert len(lr_select.unseen_by_all(100, 8, 13, (4, 5), limit=1000)) == 0  # every image seen


def test_held_out_refuses_rather_than_read_the_eval_split(smoke_config, monkeypatch):
  smoke_config.finetune.lr_grid = (1e-3, 1e-2)
  smoke_config.finetune.num_epochs = 4.0  # every tiny training image is in some batch
  monkeypatch.setattr(data, "get_dataset", _no_eval_split(data.get_dataset, smoke_config.data.eval_split))
  with pytest.raises(ValueError, match="finetune.lr_grid needs held-out training images"):
    lr_select.held_out(smoke_config)


def test_every_qat_method_is_scored_on_the_same_held_out_images(smoke_config):
  """FlexiQ's 100%-only finetune makes exactly the multi-ratio finetune's passes (also where
  num_epochs x passes would round to another number of steps), so its held-out images are the same."""
  smoke_config.finetune.lr_grid = (1e-3, 1e-2)
  smoke_config.finetune.lr_select_images = 32
  smoke_config.finetune.num_epochs = 0.15  # 1.2 -> 2 steps of 32 on 256 images, 2 passes each: 4 passes
  smoke_config.finetune.every_step_ratios = (1.0,)
  only100 = smoke_config.copy_and_resolve_references()
  only100.finetune.every_step_ratios = ()
  only100.finetune.num_epochs = harness._one_pass_epochs(smoke_config)
  assert only100.finetune.num_epochs != 0.3  # 0.3 epochs would be 3 steps
  steps = finetune.pass_matched_steps(smoke_config.finetune, 256)
  assert finetune.pass_matched_steps(only100.finetune, 256) == steps == 4
  a, b = lr_select.held_out(smoke_config), lr_select.held_out(only100)
  assert len(a.labels) == 32 and a.source == b.source
  np.testing.assert_array_equal(a.images, b.images)


def test_the_grid_must_be_distinct_positive_rates():
  assert stage_options.check_lr_grid(()) == ()
  assert stage_options.check_lr_grid([1e-3, 3e-3]) == (1e-3, 3e-3)
  for bad in ((1e-3, 1e-3), (0.0, 1e-3), (-1e-3,), ("fast",)):
    with pytest.raises(ValueError, match="finetune.lr_grid"):
      stage_options.check_lr_grid(bad)
  config = quickstart.get_config("smoke")
  config.finetune.lr_grid = (1e-3, -1.0)
  with pytest.raises(ValueError, match="finetune.lr_grid"):
    pipeline.check_config(config)


def _all_fingerprints(config) -> dict:
  stages = {s: stage_cache.fingerprint(stage_options.stage_fields(config, s)) for s in stage_options.STAGES}
  methods = {m: stage_cache.fingerprint(harness.method_fields(config, m)) for m in harness.METHODS}
  return {**stages, **{f"compare/{m}": f for m, f in methods.items()}}


def test_an_empty_grid_keeps_every_fingerprint_of_a_config_without_the_fields():
  config = quickstart.get_config("smoke")
  assert config.finetune.lr_grid == ()
  now = _all_fingerprints(config)
  del config.finetune["lr_grid"]
  del config.finetune["lr_select_images"]
  assert _all_fingerprints(config) == now


def test_a_grid_changes_the_fingerprints_of_the_qat_methods_only():
  config = quickstart.get_config("smoke")
  before = _all_fingerprints(config)
  config.finetune.lr_grid = (1e-3, 3e-3)
  with_grid = _all_fingerprints(config)
  # The finetuned FlexiQ variants train at the rate the configured finetune chose.
  qat = ({"finetune", "compare/flexiq", "compare/flexiq_100only", "compare/lsq_qat", "compare/lsq_adaround",
          "compare/switchable_qat"}
         | {f"compare/{name}" for name in harness.FINETUNED_VARIANTS})
  assert {k for k in before if before[k] != with_grid[k]} == qat
  config.finetune.lr_select_images = 500
  assert {k for k in before if with_grid[k] != _all_fingerprints(config)[k]} == qat
  config.finetune.lr_grid = (1e-3, 1e-2)
  assert {k for k in before if with_grid[k] != _all_fingerprints(config)[k]} == qat


def test_the_fmnist_configs_choose_from_a_grid_around_both_former_rates():
  from configs import common
  cnn, vit = common.model_config("resnet18", fmnist=True), common.model_config("vit_small_patch16_224", fmnist=True)
  for config in (cnn, vit):
    assert config.finetune.learning_rate in config.finetune.lr_grid and 1e-3 in config.finetune.lr_grid
    assert len(config.finetune.lr_grid) == 3 and config.finetune.lr_grid_extend == 2
  assert quickstart.get_config().finetune.lr_grid == () and common.model_config("resnet18").finetune.lr_grid == ()


def test_next_rate_continues_the_grids_pattern_past_either_edge():
  assert lr_select.next_rate((3e-4, 1e-3, 3e-3), upward=True) == 1e-2
  assert lr_select.next_rate((3e-4, 1e-3, 3e-3, 1e-2), upward=True) == 3e-2
  assert lr_select.next_rate((3e-4, 1e-3, 3e-3), upward=False) == 1e-4
  assert lr_select.next_rate((1e-4, 3e-4, 1e-3, 3e-3), upward=False) == 3e-5
  assert lr_select.next_rate((1e-5, 1e-4, 1e-3), upward=True) == 1e-2
  assert lr_select.next_rate((1e-3, 5e-3), upward=True) == 2.5e-2


@pytest.mark.parametrize("peak, extend, tried, chosen", [
    (1e-2, 2, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], 1e-2),  # past the top edge until an inner rate wins
    (1.0, 2, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], 3e-2),  # still rising: stops after two added rates
    (1e-5, 2, [3e-5, 1e-4, 3e-4, 1e-3, 3e-3], 3e-5),  # past the bottom edge
    (1e-3, 2, [3e-4, 1e-3, 3e-3], 1e-3),  # an inner rate won: the grid only
    (1e-2, 0, [3e-4, 1e-3, 3e-3], 3e-3),  # no extension configured
])
def test_a_winning_edge_grows_the_grid_by_the_same_rule_for_every_method(tmp_path, monkeypatch, peak, extend,
                                                                          tried, chosen):
  config = quickstart.get_config("smoke")
  config.finetune.lr_grid = (3e-4, 1e-3, 3e-3)
  config.finetune.lr_grid_extend = extend
  monkeypatch.setattr(lr_select, "held_out",
                      lambda cfg: judge.JudgeImages(np.zeros((4, 2, 2, 1), np.float32), np.zeros(4, np.int32), "held"))
  trained = []

  def train_and_score(rate, path, held):
    trained.append(rate)
    return {"1": {"top1": 90.0 - abs(np.log10(rate) - np.log10(peak)), "kl": 0.1}}

  rate, path, record = lr_select.choose(config, str(tmp_path), ("1",), train_and_score)
  assert sorted(trained) == tried and record["grid"] == tried and rate == chosen == record["chosen"]
  assert record["added"] == [r for r in trained if r not in (3e-4, 1e-3, 3e-3)]
  assert path.endswith(lr_select.candidate_name(chosen))
  assert ("added beyond an edge" in lr_select.summary(record)) == bool(record["added"])
  # Rerun: every candidate, the added ones too, is reused.
  trained.clear()
  assert lr_select.choose(config, str(tmp_path), ("1",), train_and_score)[0] == chosen and trained == []


def test_a_candidate_that_diverges_loses_and_ends_the_growth_without_stopping_the_selection(tmp_path, monkeypatch):
  from flexiq_jax import train as train_lib
  config = quickstart.get_config("smoke")
  config.finetune.lr_grid = (3e-4, 1e-3, 3e-3)
  config.finetune.lr_grid_extend = 2
  monkeypatch.setattr(lr_select, "held_out",
                      lambda cfg: judge.JudgeImages(np.zeros((4, 2, 2, 1), np.float32), np.zeros(4, np.int32), "held"))
  trained = []

  def train_and_score(rate, path, held):  # rising with the rate, until 1e-2 diverges
    trained.append(rate)
    if rate > 5e-3:
      raise train_lib.DivergedError("QAT finetune: the loss diverged to 17.02")
    return {"1": {"top1": 80.0 + 1000 * rate, "kl": 0.1}}

  rate, path, record = lr_select.choose(config, str(tmp_path), ("1",), train_and_score)
  assert trained == [3e-4, 1e-3, 3e-3, 1e-2] and rate == 3e-3 and record["added"] == [1e-2]
  failed = [c for c in record["candidates"] if c.get("failed")]
  assert [c["learning_rate"] for c in failed] == [1e-2] and failed[0]["top1"] is None and "diverged" in failed[0]["failed"]
  assert "(0.01 diverged)" in lr_select.summary(record)
  trained.clear()  # rerun: the failed candidate is reused as failed, not trained again
  assert lr_select.choose(config, str(tmp_path), ("1",), train_and_score)[0] == 3e-3 and trained == []

  def always_fails(rate, path, held):
    raise train_lib.NonFiniteError("NaN loss")

  with pytest.raises(train_lib.NonFiniteError, match="every learning-rate candidate"):
    lr_select.choose(config, str(tmp_path / "all"), ("1",), always_fails)


def test_the_extension_needs_a_grid_to_step_from_and_is_in_the_qat_fingerprints():
  config = quickstart.get_config("smoke")
  config.finetune.lr_grid = (1e-3,)
  config.finetune.lr_grid_extend = 1
  with pytest.raises(ValueError, match="lr_grid_extend"):
    pipeline.check_config(config)
  config.finetune.lr_grid = (1e-3, 3e-3)
  config.finetune.lr_grid_extend = -1
  with pytest.raises(ValueError, match="lr_grid_extend"):
    pipeline.check_config(config)
  config.finetune.lr_grid_extend = 0
  before = _all_fingerprints(config)
  config.finetune.lr_grid_extend = 2
  changed = {k for k, v in _all_fingerprints(config).items() if before[k] != v}
  assert "finetune" in changed and "compare/lsq_qat" in changed and "calibrate" not in changed


def test_a_holdout_split_is_what_the_selection_and_the_judge_score_on(smoke_config):
  from flexiq_jax.data import fashion_mnist
  config = smoke_config
  before = _all_fingerprints(config)
  config.data.train_split = "train[:-56]"
  config.data.holdout_split = "train[-56:]"
  config.finetune.lr_select_images = 40
  tail, tail_labels = fashion_mnist.load("train[-56:]", config.data.data_dir)
  held = lr_select.held_out(config)
  assert len(held.labels) == 40 and np.array_equal(held.labels, tail_labels[:40])
  assert "train[-56:]" in held.source and "kept out of every training" in held.source
  judged = judge.judge_images(config, total_steps=1000, train_seed=1)  # the QAT saw every image: still the holdout
  assert np.array_equal(judged.labels, tail_labels[:min(56, config.finetune.judge_images)])
  # The holdout enters the fingerprints of what it chooses: the float model's changes only by the
  # training split.
  config.data.train_split = "train"
  with_holdout = _all_fingerprints(config)
  assert with_holdout["float"] == before["float"] and with_holdout["finetune"] != before["finetune"]
  config.data.holdout_split = "train"
  with pytest.raises(ValueError, match="slice them apart"):
    lr_select.held_out(config)


# --------------------------------------------------------------------------------------------
# FlexiQ's finetune stage and the LSQ baseline with a grid, on the tiny dataset.


def _no_eval_split(get_dataset, eval_split):
  def guarded(cfg, split, *args, **kwargs):
    if split == eval_split:
      raise AssertionError(f"the eval split {split!r} was read during the learning-rate selection")
    return get_dataset(cfg, split, *args, **kwargs)
  return guarded


def _fake_scorer(winner: int, calls: list):
  """A scorer that ranks the `winner`-th scored candidate best (top-1 90 at every point, else 50)."""
  def score(points, float_logits_fn, held, batch_size):
    calls.append(len(held.labels))
    top1 = 90.0 if len(calls) - 1 == winner else 50.0
    return {name: {"top1": top1, "kl": 0.1} for name in points}
  return score


@pytest.fixture(scope="module")
def quantized_run(make_smoke_config, tmp_path_factory):
  """A smoke workdir up to `quantize` (untrained float model, greedy selection), with a grid."""
  config = make_smoke_config()
  config.train.num_epochs = 0.0
  config.select.selector = "greedy"
  config.finetune.num_epochs = 0.5  # 4 steps of 32 on the 256 tiny images
  config.finetune.checkpoint_every_steps = 2
  config.finetune.lr_select_images = 32
  config.finetune.judge_top1_drop = 100.0  # judged (judge.json), never refused on the untrained model
  config.finetune.judge_kl_rise = 100.0
  run = pipeline.Run(config, str(tmp_path_factory.mktemp("lr_select") / "wd"))
  return run, pipeline.run_until(run, "quantize", evaluate=False)


def _with(run, workdir, **finetune_fields):
  config = run.config.copy_and_resolve_references()
  for key, value in finetune_fields.items():
    config.finetune[key] = value
  return pipeline.Run(config, str(workdir), run.mesh)


def test_flexiq_finetune_keeps_the_candidate_the_held_out_scores_rank_best(quantized_run, tmp_path, monkeypatch):
  base, result = quantized_run
  grid = (1e-3, 5e-3)
  run = _with(base, tmp_path / "wd", lr_grid=grid, eval_every_steps=2)  # no periodic eval while selecting
  calls = []
  monkeypatch.setattr(lr_select, "score", _fake_scorer(1, calls))  # the last candidate wins (the first elsewhere)
  monkeypatch.setattr(data, "get_dataset", _no_eval_split(data.get_dataset, run.config.data.eval_split))
  tuned = pipeline.finetune(run, result.float_model, result.quantized)
  assert len(calls) == 2 and set(calls) == {32}  # one score per candidate, on 32 held-out images
  record = json.load(open(tmp_path / "wd" / "finetune" / "lr_selection.json"))
  assert pipeline.lr_selection(run.workdir) == record
  assert record["grid"] == list(grid) and record["chosen"] == grid[1] and record["num_images"] == 32
  assert record["points"] == ["ratio 0", "ratio 1"]  # the multi-ratio finetune trains both ends
  assert [c["top1"] for c in record["candidates"]] == [50.0, 90.0]
  best = max(record["candidates"], key=lambda c: (c["top1"], -c["kl"]))
  assert best["learning_rate"] == record["chosen"]
  # The stage output is the chosen candidate's (not a retraining), judged against its start.
  chosen = checkpoint.load_tree(str(tmp_path / "wd" / "finetune" / "lr_0.005" / "qvars"), tuned.qvars)
  other = checkpoint.load_tree(str(tmp_path / "wd" / "finetune" / "lr_0.001" / "qvars"), tuned.qvars)
  kernel = lambda q: np.asarray(q["params"]["layer1_0"]["conv1"]["kernel"])
  np.testing.assert_array_equal(kernel(tuned.qvars), kernel(chosen))
  assert not np.array_equal(kernel(tuned.qvars), kernel(other))
  stage_out = checkpoint.load_tree(str(tmp_path / "wd" / "finetune" / "qvars"), tuned.qvars)
  np.testing.assert_array_equal(kernel(stage_out), kernel(chosen))
  judge = json.load(open(tmp_path / "wd" / "finetune" / "judge.json"))
  assert judge["accepted"] and "after_finetuning" in judge
  assert os.path.exists(tmp_path / "wd" / "finetune" / "refresh.json")  # the chosen candidate's
  assert json.load(open(tmp_path / "wd" / "finetune" / "done.json"))["total_steps"] == 4


def test_the_held_out_scores_of_a_finetuned_model_are_those_its_selection_recorded(quantized_run, tmp_path):
  """`pipeline.held_out_scores` (what T3 scores every finetuned variant by) gives the chosen
  candidate exactly the figures the selection recorded for it; a compare context without a grid
  has no selection figures."""
  base, result = quantized_run
  run = _with(base, tmp_path / "wd", lr_grid=(1e-3, 5e-3), judge_images=0)
  tuned = pipeline.finetune(run, result.float_model, result.quantized)
  record = pipeline.lr_selection(run.workdir)
  chosen = next(c for c in record["candidates"] if c["learning_rate"] == record["chosen"])
  held = lr_select.held_out(run.config)
  assert pipeline.held_out_scores(run.config, result.float_model, tuned, held) == chosen["scores"]
  ctx = lambda r: harness.CompareContext(r, result.float_model, None, [], [], ())
  assert harness.selection_figures(ctx(base), tuned) is None  # no grid
  # A grid without a holdout split: its images are only those the configured seeds' batches miss,
  # which a variant with other batches may have trained on: no figures either.
  assert harness.selection_figures(ctx(run), tuned) is None
  split = _with(base, tmp_path / "wd2", lr_grid=(1e-3, 5e-3))
  split.config.data.train_split, split.config.data.holdout_split = "train[:-56]", "train[-56:]"
  figures = harness.selection_figures(ctx(split), tuned)
  assert figures["num_images"] == 32 and "train[-56:]" in figures["images"]
  assert set(figures) == {"images", "num_images", "top1@0", "kl@0", "top1@1", "kl@1"}


def test_a_finetune_at_ratio_1_only_is_chosen_at_ratio_1(quantized_run, tmp_path, monkeypatch):
  base, result = quantized_run
  run = _with(base, tmp_path / "wd", lr_grid=(1e-3, 5e-3), levels=(1.0,), level_probs=(1.0,), uniform_prob=0.0,
              judge_images=0, refresh="never")
  monkeypatch.setattr(lr_select, "score", _fake_scorer(0, []))
  pipeline.finetune(run, result.float_model, result.quantized)
  record = pipeline.lr_selection(run.workdir)
  assert record["points"] == ["ratio 1"] and record["chosen"] == 1e-3 and "top-1 at ratio 1," in record["criterion"]


class Crash(Exception):
  pass


def test_a_killed_selection_reuses_finished_candidates_and_resumes_the_rest(quantized_run, tmp_path, monkeypatch):
  base, result = quantized_run
  run = _with(base, tmp_path / "wd", lr_grid=(1e-3, 5e-3), judge_images=0, refresh="never")
  calls, steps = [], []
  monkeypatch.setattr(lr_select, "score", _fake_scorer(1, calls))

  def crash_in_the_second_candidate(step):
    steps.append(step)
    if len(steps) == 4 + 3:  # the first candidate's 4 steps, then the second's third
      raise Crash()

  with pytest.raises(Crash):
    pipeline.finetune(run, result.float_model, result.quantized, on_step=crash_in_the_second_candidate)
  assert len(calls) == 1 and os.path.exists(tmp_path / "wd" / "finetune" / "lr_0.001" / "done.json")
  assert not os.path.exists(tmp_path / "wd" / "finetune" / "done.json")
  resumed = []
  pipeline.finetune(run, result.float_model, result.quantized, on_step=resumed.append)
  assert resumed == [3, 4]  # the first candidate reused, the second resumed from its step-2 checkpoint
  assert len(calls) == 2  # the first candidate's recorded score reused, not recomputed
  record = pipeline.lr_selection(run.workdir)
  assert record["chosen"] == 5e-3 and [c["top1"] for c in record["candidates"]] == [50.0, 90.0]


@pytest.fixture(scope="module")
def context(make_smoke_config, tmp_path_factory) -> harness.CompareContext:
  """A CompareContext of the smoke config (float model at its initial weights), with a grid."""
  config = make_smoke_config()
  config.train.num_epochs = 0.0
  config.select.selector = "greedy"
  config.compare.finetune = False
  config.finetune.num_epochs = 0.25  # 2 steps of 32 on the 256 tiny images
  config.finetune.lr_grid = (1e-3, 1e-2)
  config.finetune.lr_select_images = 32
  run = pipeline.Run(config, str(tmp_path_factory.mktemp("lr_select_compare") / "wd"))
  return harness.CompareContext.build(run, pipeline.train_float(run))


class _EvalData(list):
  """The eval batches, refusing to be read while `selecting` is set."""

  selecting = False

  def __iter__(self):
    if self.selecting:
      raise AssertionError("the eval batches were read during the learning-rate selection")
    return super().__iter__()


def _guard_selection(ctx, monkeypatch):
  """`ctx` whose eval batches (and eval split) cannot be read while lr_select.choose runs."""
  eval_data = _EvalData(ctx.eval_data)
  choose = lr_select.choose

  def guarded_choose(*args, **kwargs):
    eval_data.selecting = True
    try:
      return choose(*args, **kwargs)
    finally:
      eval_data.selecting = False

  monkeypatch.setattr(lr_select, "choose", guarded_choose)
  monkeypatch.setattr(data, "get_dataset", _no_eval_split(data.get_dataset, ctx.config.data.eval_split))
  return dataclasses.replace(ctx, eval_data=eval_data)


def test_lsq_keeps_the_candidate_the_held_out_scores_rank_best(context, tmp_path, monkeypatch):
  ctx = _guard_selection(dataclasses.replace(context, run=pipeline.Run(context.config, str(tmp_path / "wd"),
                                                                       context.run.mesh)), monkeypatch)
  calls = []
  monkeypatch.setattr(lr_select, "score", _fake_scorer(1, calls))
  (row,) = harness.lsq_qat(ctx)
  sel = row.extra["lr_selection"]
  assert len(calls) == 2 and sel["chosen"] == 1e-2 and sel["points"] == ["W4A4"]
  assert "lr 0.01 chosen on 32 held-out training images from {0.001, 0.01}" in row.setting
  directory = tmp_path / "wd" / "compare" / "lsq_qat" / stage_cache.fingerprint(
      harness.method_fields(ctx.config, "lsq_qat", ctx.calibration.plan))
  assert sorted(os.listdir(directory)) == ["lr_0.001", "lr_0.01", "lr_selection.json"]
  # The row is the chosen candidate's finished run, restored (its checkpoint at the last step).
  assert json.load(open(directory / "lr_0.01" / "done.json"))["scores"]["W4A4"]["top1"] == 90.0
  table = harness.lr_note([row.to_json()])
  assert "| lsq_qat |" in table and "50.00 / 0.1" in table and "| 0.01 |" in table


def test_switchable_chooses_by_the_mean_over_both_precisions(context, tmp_path, monkeypatch):
  ctx = _guard_selection(dataclasses.replace(context, run=pipeline.Run(context.config, str(tmp_path / "wd"),
                                                                       context.run.mesh)), monkeypatch)
  calls = []

  def score(points, float_logits_fn, held, batch_size):  # the first rate wins at W8A8, the second on the mean
    calls.append(sorted(points))
    first = len(calls) == 1
    return {"W8A8": {"top1": 80.0 if first else 70.0, "kl": 0.1}, "W4A4": {"top1": 40.0 if first else 60.0, "kl": 0.1}}

  monkeypatch.setattr(lr_select, "score", score)
  rows = harness.switchable_qat(ctx)
  assert calls == [["W4A4", "W8A8"]] * 2
  for row in rows:
    assert row.extra["lr_selection"]["chosen"] == 1e-2 and "lr 0.01 chosen" in row.setting


def test_an_own_rate_variant_chooses_its_rate_where_the_others_take_the_configured_pipelines(context, tmp_path,
                                                                                               monkeypatch):
  """flexiq_rounding_joint_lr learns its rounding once and trains every rate of the grid from it,
  keeping the one the held-out images rank best; flexiq_rounding_joint trains once, at the rate
  the configured pipeline's own selection chose."""
  config = context.config.copy_and_resolve_references()
  config.compare.adaround_iterations = 2
  config.compare.adaround_images = 32
  config.finetune.judge_top1_drop = 100.0  # judged, never refused on the untrained model
  config.finetune.judge_kl_rise = 100.0
  ctx = dataclasses.replace(context, run=pipeline.Run(config, str(tmp_path / "wd"), context.run.mesh))
  calls = []
  monkeypatch.setattr(lr_select, "score", _fake_scorer(1, calls))  # the second rate wins
  own = harness.METHODS["flexiq_rounding_joint_lr"](ctx)
  sel = own[0].extra["lr_selection"]
  assert sel["chosen"] == 1e-2 and [c["learning_rate"] for c in sel["candidates"]] == [1e-3, 1e-2]
  assert all(r.extra["lr_selection"] == sel for r in own)
  stage = tmp_path / "wd" / "compare" / "flexiq_rounding_joint_lr" / "finetune"
  assert sorted(p.name for p in stage.glob("lr_0*")) == ["lr_0.001", "lr_0.01"]
  assert (stage / "rounded").exists() and (stage / "rounding.json").exists()  # learnt once for both rates
  assert not (tmp_path / "wd" / "finetune").exists()  # the configured pipeline's finetune not needed
  assert "| flexiq_rounding_joint_lr |" in harness.lr_note([r.to_json() for r in own])
  calls.clear()
  monkeypatch.setattr(lr_select, "score", _fake_scorer(0, calls))  # the configured pipeline's selection: the first
  fixed = harness.METHODS["flexiq_rounding_joint"](ctx)
  assert json.load(open(tmp_path / "wd" / "finetune" / "lr_selection.json"))["chosen"] == 1e-3
  assert all("lr_selection" not in r.extra for r in fixed)
  fixed_stage = tmp_path / "wd" / "compare" / "flexiq_rounding_joint" / "finetune"
  assert not list(fixed_stage.glob("lr_*"))
  assert json.load(open(fixed_stage / "fingerprint.json"))["fields"]["finetune.learning_rate"] == 1e-3


def test_the_compare_table_says_when_the_rates_were_as_configured():
  rows = [{"method": "lsq_qat", "setting": "W4A4, 4 steps, lr 0.001", "top1": 80.0, "relative_bops": 0.26},
          {"method": "flexiq", "setting": "ratio 1 (finetuned)", "top1": 81.0, "relative_bops": 0.26, "finetuned": True},
          {"method": "ptq_mse", "setting": "W4A4", "top1": 70.0, "relative_bops": 0.26}]
  note = harness.lr_note(rows)
  assert "as configured, not chosen on held-out images (finetune.lr_grid=()): flexiq, lsq_qat" in note
  assert harness.lr_note(rows[2:]) == ""  # no QAT method ran


def test_the_compare_table_aligns_each_methods_candidates_and_marks_failed_ones():
  def sel(rates, chosen, failed=()):
    return {"grid": rates, "criterion": "c", "num_images": 5000, "chosen": chosen,
            "candidates": [{"learning_rate": r, "top1": None if r in failed else 90.0 + r, "kl": None if r in failed else 0.1,
                            **({"failed": "diverged"} if r in failed else {})} for r in rates]}
  rows = [{"method": "lsq_qat", "setting": "s", "top1": 80.0, "relative_bops": 0.26,
           "lr_selection": sel([3e-4, 1e-3, 3e-3], 1e-3)},
          {"method": "flexiq", "setting": "ratio 1 (finetuned)", "top1": 81.0, "relative_bops": 0.26, "finetuned": True,
           "lr_selection": sel([3e-4, 1e-3, 3e-3, 1e-2], 3e-3, failed=(1e-2,))}]
  note = harness.lr_note(rows)
  assert "| lr 0.0003 | lr 0.001 | lr 0.003 | lr 0.01 |" in note
  lsq = next(line for line in note.splitlines() if line.startswith("| lsq_qat"))
  flexiq = next(line for line in note.splitlines() if line.startswith("| flexiq"))
  assert lsq.split("|")[6].strip() == "-" and flexiq.split("|")[6].strip() == "failed"
