"""flexiq_jax.compare: run.py --mode=compare on the tiny dataset (two fast methods), the method
registry and its per-method row cache, FlexiQ through the registry, the resumable LSQ baseline,
and the report writer."""

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_py, smoke_args
from flexiq_jax import compare
from flexiq_jax import finetune
from flexiq_jax import pipeline
from flexiq_jax import train
from flexiq_jax.compare import harness
from flexiq_jax.stage_results import Calibration


def _run_compare_py(workdir, data_dir, *extra):
  return run_py(*smoke_args(workdir, data_dir, "--config.compare.methods=layerwise_amp,ptq_minmax", "--mode=compare",
                            *extra)).check().stdout


def test_compare_mode_smoke_and_phase_reuse(tiny_fmnist, tmp_path):
  workdir = str(tmp_path / "wd")
  prefix = str(tmp_path / "results" / "compare_tiny")
  # Allowed drop 0: the search runs its phases (at 1 point uniform W4A4 can already be within it).
  _run_compare_py(workdir, tiny_fmnist, f"--config.compare.results_prefix={prefix}", "--config.compare.allowed_drops=0")
  results = json.load(open(prefix + ".json"))
  for key in ("command", "commit", "device", "date", "rows", "float_top1"):
    assert key in results
  assert results["eval_examples"] == 128
  methods = {r["method"] for r in results["rows"]}
  assert methods == {"layerwise_amp", "ptq_minmax"}
  ptq = {r["setting"]: r for r in results["rows"] if r["method"] == "ptq_minmax"}
  assert ptq["W8A8"]["relative_bops"] == 1.0 and ptq["W4A4 (ends W8A8)"]["relative_bops"] < 0.3
  table = open(os.path.join(workdir, "compare", "compare_table.md")).read()
  assert "Commit:" in table and "| layerwise_amp |" in table
  assert os.path.getsize(prefix + ".png") > 1000
  for name in ("sensitivity.png", "pareto.png", "phase1.json", "phase2.json", "scores.json"):
    assert os.path.exists(os.path.join(workdir, "layerwise", name))
  # Another allowed drop: the layer-wise phases come from the cache, nothing is re-evaluated.
  stdout = _run_compare_py(workdir, tiny_fmnist, "--config.compare.allowed_drops=0.1,5")
  assert stdout.count(", 0 new evaluations") == 3, stdout[-3000:]  # the two drops and the 4-bit budget's point
  rows = json.load(open(os.path.join(workdir, "compare", "compare.json")))["rows"]
  amp = {r["setting"]: r for r in rows if r["method"] == "layerwise_amp"}
  budget = ptq["W4A4 (ends W8A8)"]["relative_bops"]
  assert sorted(amp) == [f"Pareto point at the 4-bit budget (relative BOPs <= {budget:.3f})",
                         "allowed drop 0.1", "allowed drop 5"]
  # The matched point: within the budget, and no cheaper than any other AMP point that fits it.
  matched = amp[f"Pareto point at the 4-bit budget (relative BOPs <= {budget:.3f})"]
  assert matched["relative_bops"] <= budget + 1e-9
  assert all(r["relative_bops"] <= matched["relative_bops"] + 1e-9 for r in amp.values()
             if r["relative_bops"] <= budget + 1e-9)


# --------------------------------------------------------------------------------------------
# In process: the registry, FlexiQ and LSQ on the untrained float model (train.num_epochs=0).


@pytest.fixture(scope="module")
def context(make_smoke_config, tmp_path_factory) -> harness.CompareContext:
  """A CompareContext of the smoke config: float model at its initial weights, calibrated."""
  config = make_smoke_config()
  config.train.num_epochs = 0.0
  config.select.selector = "greedy"
  config.sweep.ratios = (0.0, 1.0)
  config.compare.finetune = False
  config.finetune.num_epochs = 0.5  # 4 steps of 32 on the 256 tiny images
  config.finetune.checkpoint_every_steps = 2
  run = pipeline.Run(config, str(tmp_path_factory.mktemp("compare") / "wd"))
  float_model = pipeline.train_float(run)
  return harness.CompareContext.build(run, float_model)


def _in(ctx, workdir, **changes) -> harness.CompareContext:
  """`ctx` in another workdir, with config `changes` ('section.key': value)."""
  config = ctx.config.copy_and_resolve_references()
  for dotted, value in changes.items():
    section, key = dotted.split(".")
    config[section][key] = value
  return dataclasses.replace(ctx, run=pipeline.Run(config, str(workdir), ctx.run.mesh))


def test_registry_runs_methods_with_one_signature_and_caches_their_rows(context, tmp_path, monkeypatch):
  assert list(compare.METHODS) == list(compare.ALL_METHODS) == list(context.config.compare.methods)
  seen = []

  def fake(ctx: harness.CompareContext):
    seen.append(ctx)
    return [harness.Row("fake", "setting A", 42.0, 0.5, {"note": "x"})]

  monkeypatch.setitem(harness.METHODS, "fake", fake)
  ctx = _in(context, tmp_path / "wd", **{"compare.methods": ("fake", "flexiq")})
  results = harness.run_compare(ctx.run, ctx.float_model, {"top1": 12.5})
  assert len(seen) == 1
  got = seen[0]
  assert got.config is ctx.run.config and isinstance(got.calibration, Calibration)
  assert sum(len(b) for b in got.calib_batches) == ctx.config.calib.num_images
  assert sum(float(np.sum(b["mask"])) for b in got.eval_data) == 128 == results["eval_examples"]
  rows = results["rows"]
  assert rows[0] == {"method": "fake", "setting": "setting A", "top1": 42.0, "relative_bops": 0.5, "note": "x"}
  flexiq = [r for r in rows if r["method"] == "flexiq"]
  assert [r["setting"] for r in flexiq] == ["ratio 0", "ratio 1"] and not any(r["finetuned"] for r in flexiq)
  assert flexiq[0]["relative_bops"] == pytest.approx(1.0) and flexiq[1]["relative_bops"] < 0.3
  # Distance to the float model, from the context's float logits, in every evaluated row.
  for r in flexiq:
    assert 0 <= r["agreement"] <= 100 and r["kl"] >= 0 and np.isfinite(r["sqnr_db"])
  assert flexiq[1]["sqnr_db"] < flexiq[0]["sqnr_db"] and flexiq[1]["kl"] > flexiq[0]["kl"]
  assert len(got.float_logits) == len(got.eval_data) and got.float_logits[0].shape == (len(got.eval_data[0]["label"]), 10)
  # The flexiq method ran the pipeline's stages in the run's own workdir.
  assert json.load(open(tmp_path / "wd" / "select" / "selection.json"))["selector"] == "greedy"
  assert results["float_top1"] == 12.5
  assert json.load(open(tmp_path / "wd" / "compare" / "compare.json"))["rows"] == rows
  assert "Rows reused" not in open(tmp_path / "wd" / "compare" / "compare_table.md").read()  # all computed now
  # A rerun takes every method's rows from compare/rows.json, also with another list of methods
  # or another results prefix (neither changes a method's rows) ...
  monkeypatch.setitem(harness.METHODS, "flexiq", lambda ctx: pytest.fail("flexiq rows were not reused"))
  assert harness.run_compare(ctx.run, ctx.float_model)["rows"] == rows and len(seen) == 1
  fewer = _in(ctx, tmp_path / "wd", **{"compare.methods": ("flexiq",),
                                       "compare.results_prefix": str(tmp_path / "elsewhere")})
  assert harness.run_compare(fewer.run, fewer.float_model)["rows"] == flexiq
  assert os.path.exists(tmp_path / "elsewhere.json")
  # The report written from cached rows says which earlier run computed them.
  assert "Rows reused from the workdir's cache (computed by an earlier run): flexiq (commit" in open(
      tmp_path / "elsewhere.md").read()
  assert harness.run_compare(ctx.run, ctx.float_model)["rows"] == rows and len(seen) == 1
  # ... until a field they depend on changes.
  changed = _in(ctx, tmp_path / "wd", **{"compare.methods": ("fake",), "compare.keep_ends": False})
  harness.run_compare(changed.run, changed.float_model)
  assert len(seen) == 2


def test_unknown_method_lists_the_registry(context, tmp_path):
  ctx = _in(context, tmp_path, **{"compare.methods": ("flexiq", "qat_magic")})
  with pytest.raises(ValueError, match=r"unknown compare.methods \['qat_magic'\]; valid: \['flexiq'"):
    harness.run_compare(ctx.run, ctx.float_model)
  assert harness.as_list("flexiq, ptq_mse") == ["flexiq", "ptq_mse"]
  assert harness.as_list(("flexiq,ptq_mse", "lsq_qat")) == ["flexiq", "ptq_mse", "lsq_qat"]


def test_lsq_baseline_resumes_after_a_kill(context, tmp_path, monkeypatch):
  """LSQ QAT trains through train.run_loop with checkpoints in <workdir>/compare/lsq_qat/<fingerprint>:
  a run killed after step 3 (checkpoints every 2) resumes to the uninterrupted run's numbers, and
  a finished run is never restored for another recipe."""
  full_ctx = _in(context, tmp_path / "full")
  [row] = harness.lsq_qat(full_ctx)
  assert row.method == "lsq_qat" and row.setting == "W4A4 (ends W8A8), 4 steps, lr 0.001"
  assert 0 < row.relative_bops < 0.3
  assert row.top1 * 128 / 100 == pytest.approx(round(row.top1 * 128 / 100))  # hits counted over 128 images
  assert 0 <= row.extra["agreement"] <= 100 and row.extra["kl"] > 0 and np.isfinite(row.extra["sqnr_db"])
  [fingerprint] = os.listdir(tmp_path / "full" / "compare" / "lsq_qat")
  lsq_dir = tmp_path / "full" / "compare" / "lsq_qat" / fingerprint
  full_log = [json.loads(line) for line in open(lsq_dir / "metrics.jsonl")]
  assert [r["step"] for r in full_log] == [2, 4]

  real_loop = train.run_loop

  def crash_at_3(*args, **kwargs):
    def on_step(step):
      if step == 3:
        raise KeyboardInterrupt
    return real_loop(*args, **{**kwargs, "on_step": on_step})

  crash_ctx = _in(context, tmp_path / "crash")
  monkeypatch.setattr(train, "run_loop", crash_at_3)
  with pytest.raises(KeyboardInterrupt):
    harness.lsq_qat(crash_ctx)
  monkeypatch.setattr(train, "run_loop", real_loop)
  crash_dir = tmp_path / "crash" / "compare" / "lsq_qat" / fingerprint
  assert max(int(d) for d in os.listdir(crash_dir / "checkpoints") if d.isdigit()) == 2
  [resumed] = harness.lsq_qat(crash_ctx)
  crash_log = [json.loads(line) for line in open(crash_dir / "metrics.jsonl")]
  assert [r["step"] for r in crash_log] == [2, 4]
  assert crash_log[1]["loss"] == pytest.approx(full_log[1]["loss"], rel=1e-5)
  assert resumed.top1 == pytest.approx(row.top1)
  # Finished: a rerun evaluates the saved weights without training.
  monkeypatch.setattr(train, "run_loop", lambda *a, **k: pytest.fail("a finished LSQ run was retrained"))
  assert harness.lsq_qat(full_ctx)[0].top1 == pytest.approx(row.top1)
  # Another learning rate trains afresh beside the finished run (which stays for its recipe).
  trained = []
  monkeypatch.setattr(train, "run_loop", lambda state, *a, **k: trained.append(1) or state)
  other = _in(context, tmp_path / "full", **{"compare.lsq_learning_rate": 0.01})
  assert harness.lsq_qat(other)[0].setting.endswith("lr 0.01") and trained == [1]
  assert len(os.listdir(tmp_path / "full" / "compare" / "lsq_qat")) == 2


def test_selector_and_bias_correction_variants_run_in_their_own_workdirs(context, tmp_path):
  ctx = _in(context, tmp_path / "wd")
  uniform = harness.flexiq_uniform(ctx)
  no_bias = harness.flexiq_no_bias_correction(ctx)
  assert [r.setting for r in uniform] == ["ratio 0", "ratio 1"] and uniform[0].method == "flexiq_uniform"
  selection = json.load(open(tmp_path / "wd" / "compare" / "flexiq_uniform" / "select" / "selection.json"))
  assert selection["selector"] == "uniform"
  fields = json.load(open(tmp_path / "wd" / "compare" / "flexiq_no_bias_correction" / "quantized" / "fingerprint.json"))
  assert fields["fields"]["quant"]["bias_correction"] is False
  assert all("kl" in r.extra for r in uniform + no_bias)


def test_adaround_baseline_rounds_the_4bit_layers_onto_their_grid(context, tmp_path):
  ctx = _in(context, tmp_path / "wd")
  [row] = harness.adaround(ctx)
  assert row.method == "adaround" and row.setting == "W4A4 (ends W8A8), 20 iterations/layer"
  assert row.relative_bops == pytest.approx(harness.ptq_mse(ctx)[1].relative_bops)  # the same W4A4 BOPs
  assert 0 < row.extra["flipped_share"] < 0.5 and row.extra["images"] == 64
  assert 0 <= row.extra["agreement"] <= 100 and row.extra["kl"] > 0


def test_write_reports_same_ratio_table(tmp_path):
  rows = [{"method": "flexiq", "setting": "ratio 0.5", "top1": 80.0, "relative_bops": 0.63, "ratio": 0.5,
           "finetuned": False},
          {"method": "flexiq_amp", "setting": "ratio 0.5 (AMP)", "top1": 81.0, "relative_bops": 0.60, "ratio": 0.5},
          {"method": "ptq_mse", "setting": "W4A4", "top1": 70.0, "relative_bops": 0.25}]
  results = {"command": "python run.py", "commit": "abc", "device": "cpu", "date": "today", "model": "m",
             "dataset": "d", "float_top1": 82.0, "eval_examples": 10, "rows": rows}
  os.makedirs(tmp_path / "compare")
  text = compare.write_reports(results, str(tmp_path), str(tmp_path / "out" / "x"))
  assert "| 0.5 | 80.00 | 0.630 | 81.00 | 0.600 |" in text
  assert os.path.getsize(tmp_path / "compare" / "compare_pareto.png") > 1000
  assert open(tmp_path / "out" / "x.md").read() == text
  assert json.load(open(tmp_path / "out" / "x.json")) == results
  assert os.path.getsize(tmp_path / "out" / "x.png") > 1000


def test_a_refused_qat_row_is_reported_with_its_reason_and_left_out_of_the_pareto_plot(tmp_path):
  verdict = {"accepted": False, "failed": ["W4A4 top-1"], "images": "64 held-out images",
             "before_qat": {"top1": 70.0, "kl": 0.3}, "after_qat": {"top1": 12.0, "kl": 2.1},
             "margins": {"judge_top1_drop": 2.0, "judge_kl_rise": 0.1}}
  extra = harness._judged({"kl": 2.0}, verdict)
  assert extra["refused"].startswith("worse than its PTQ start (W4A4 top-1) on 64 held-out images: top-1 70.00% -> "
                                     "12.00%, KL 0.3 -> 2.1 (margins: top-1 drop 2.0, KL rise 0.1)")
  assert "refused" not in harness._judged({}, {**verdict, "accepted": True})
  # Rows cached before the reason was stored are recognised by their verdict.
  assert harness.row_refusal({"judge": verdict}) == extra["refused"] and harness.row_refusal({"top1": 1.0}) is None
  rows = [{"method": "ptq_mse", "setting": "W4A4", "top1": 70.0, "relative_bops": 0.25},
          {"method": "lsq_qat", "setting": "W4A4, 4 steps (refused: worse than its PTQ start on held-out images)",
           "top1": 12.0, "relative_bops": 0.25, **extra}]
  results = {"command": "python run.py", "commit": "abc", "device": "cpu", "date": "today", "model": "m",
             "dataset": "d", "float_top1": 82.0, "eval_examples": 10, "rows": rows}
  os.makedirs(tmp_path / "compare")
  text = compare.write_reports(results, str(tmp_path))
  assert "| lsq_qat | W4A4, 4 steps (refused" in text  # reported ...
  assert f"- lsq_qat W4A4, 4 steps (refused: worse than its PTQ start on held-out images): {extra['refused']}" in text

  class Axes:  # ... and not drawn
    def __init__(self):
      self.lines = []

    def plot(self, x, y, *args, label=None, **kwargs):
      self.lines.append(label)

    def axhline(self, *args, **kwargs):
      pass

  ax = Axes()
  harness.draw_pareto(ax, rows)
  assert ax.lines == ["ptq_mse"]


def test_rows_round_trip_through_json():
  row = harness.Row("ptq_mse", "W4A4", np.float32(70.5), 0.25, {"ratio": 1.0})
  assert harness.Row.from_json(json.loads(json.dumps(row.to_json()))) == harness.Row("ptq_mse", "W4A4", 70.5, 0.25,
                                                                                     {"ratio": 1.0})


def _method_fingerprints(config) -> dict:
  from flexiq_jax import stage_cache
  return {m: stage_cache.fingerprint(harness.method_fields(config, m)) for m in harness.METHODS}


_FT_VARIANTS = set(harness.FINETUNED_VARIANTS)


@pytest.mark.parametrize("field,value,methods", [
    # AdaRound's budget: its rows, the LSQ run started from its weights, FlexiQ's learnt rounding.
    ("compare.adaround_iterations", 7, {"adaround", "lsq_adaround", "flexiq_rounding", "flexiq_rounding_joint",
                                              "flexiq_rounding_joint_lr"}),
    ("compare.lsq_learning_rate", 0.5, {"lsq_qat", "lsq_adaround", "switchable_qat"}),
    ("compare.allowed_drops", (2.0,), {"layerwise_amp"}),
    ("compare.amp_at_4bit_budget", False, {"layerwise_amp"}),
    ("compare.ablation_ratios", (0.0, 1.0), set(harness.METHODS) - {"flexiq", "flexiq_amp", "layerwise_amp",
                                                                    "ptq_minmax", "ptq_mse", "adaround", "lsq_qat",
                                                                    "lsq_adaround", "switchable_qat",
                                                                    "flexiq_100only"} - _FT_VARIANTS),
    # A FlexiQ-only finetuning knob: FlexiQ's rows only (LSQ QAT shares the recipe, not the sampler).
    ("finetune.uniform_prob", 0.1, {"flexiq"} | _FT_VARIANTS),
    ("finetune.learning_rate", 0.1, {"flexiq", "lsq_qat", "lsq_adaround", "switchable_qat", "flexiq_100only"}
     | _FT_VARIANTS),
    # Sandwich passes: FlexiQ's training and the QAT baselines' pass-matched budget.
    ("finetune.every_step_ratios", (0.0, 1.0), {"flexiq", "lsq_qat", "lsq_adaround", "switchable_qat",
                                                "flexiq_100only"} | _FT_VARIANTS),
    ("select.population", 3, {"flexiq", "flexiq_naive", "flexiq_random", "flexiq_uniform", "flexiq_greedy",
                              "flexiq_no_bias_correction", "flexiq_amp", "flexiq_100only"} | _FT_VARIANTS),
    ("quant.extraction", "naive", set(harness.METHODS)),
    # Cross-layer equalization is a pre-step of every method (they all read the calibration's variables).
    ("quant.equalize", True, set(harness.METHODS)),
    ("data.eval_examples", 10, set(harness.METHODS)),
    ("compare.methods", ("flexiq",), set()),
])
def test_a_methods_knob_changes_only_its_rows_fingerprint(field, value, methods):
  from configs import quickstart
  config = quickstart.get_config("smoke")
  before = _method_fingerprints(config)
  section, key = field.split(".")
  config[section][key] = value
  after = _method_fingerprints(config)
  assert {m for m in before if before[m] != after[m]} == methods
  assert set(harness.METHOD_DEPENDS) == set(harness.METHODS)  # every method declares what it reads


def test_rows_cache_keeps_each_methods_rows_under_its_own_fingerprint(tmp_path):
  from flexiq_jax import stage_cache
  path = str(tmp_path / "rows.json")
  cache = stage_cache.KeyedJsonCache(path, {"a": "fa", "b": "fb"})
  cache.get("a", lambda: [1])
  cache.get("b", lambda: [2])
  again = stage_cache.KeyedJsonCache(path, {"a": "fa", "b": "fb2"})  # b's inputs changed
  assert again.data == {"a": [1]} and again.get("b", lambda: [3]) == [3]
  only_a = stage_cache.KeyedJsonCache(path, {"a": "fa"})  # b not run now: kept as saved
  assert only_a.data == {"a": [1], "b": [3]}
  only_a.get("a", lambda: pytest.fail("recomputed"))
  assert stage_cache.KeyedJsonCache(path, {"b": "fb2"}).data["b"] == [3]
  # A cache saved under one fingerprint for every key is adopted when that fingerprint is the
  # one the same values gave then, and dropped otherwise.
  stage_cache.JsonCache(str(tmp_path / "old.json"), "legacy").get("a", lambda: [9])
  assert stage_cache.KeyedJsonCache(str(tmp_path / "old.json"), {"a": "fa"}, "legacy").data == {"a": [9]}
  assert stage_cache.KeyedJsonCache(str(tmp_path / "old.json"), {"a": "fa"}, "other").data == {}


def test_qat_baselines_get_flexiq_s_forward_backward_passes(context, tmp_path, monkeypatch):
  """With the sandwich rule FlexiQ makes 1 + len(every_step_ratios) passes per step; LSQ then runs
  that many times more steps, the switchable network (two passes per step) half of LSQ's."""
  cfg = context.config.finetune
  assert finetune.passes_per_step(cfg) == 1 and finetune.pass_matched_steps(cfg, 256) == 4
  sandwich = _in(context, tmp_path / "sandwich", **{"finetune.every_step_ratios": (0.0, 1.0)})
  assert finetune.passes_per_step(sandwich.config.finetune) == 3
  assert finetune.pass_matched_steps(sandwich.config.finetune, 256, passes=2) == 6
  monkeypatch.setattr(train, "run_loop", lambda state, *a, **k: state)  # the budget only, no training
  assert harness.lsq_qat(sandwich)[0].setting.startswith("W4A4 (ends W8A8), 12 steps")
  assert harness.method_fields(sandwich.config, "lsq_qat") != harness.method_fields(context.config, "lsq_qat")


def test_switchable_baseline_trains_one_network_for_both_precisions(context, tmp_path):
  """One set of weights, two sets of LSQ scales: a W8A8 row at full BOPs and a W4A4 row at
  LSQ's BOPs, from the same checkpoint, with half of LSQ's steps; each step logs both accuracies."""
  ctx = _in(context, tmp_path / "sw")
  rows = harness.switchable_qat(ctx)
  assert [r.method for r in rows] == ["switchable_qat"] * 2
  assert rows[0].setting.startswith("W8A8 (ends W8A8), switchable, 2 steps")
  assert rows[1].setting.startswith("W4A4 (ends W8A8), switchable, 2 steps")
  assert rows[0].relative_bops == pytest.approx(1.0)
  assert rows[1].relative_bops == pytest.approx(harness.lsq_qat(_in(context, tmp_path / "lsq"))[0].relative_bops)
  for row in rows:
    assert 0 <= row.top1 <= 100 and row.extra["kl"] >= 0 and "accepted" in row.extra["judge"]
  # The 8-bit network agrees with float more closely than the 4-bit one.
  assert rows[0].extra["kl"] < rows[1].extra["kl"]
  [fingerprint] = os.listdir(tmp_path / "sw" / "compare" / "switchable_qat")
  log = [json.loads(line) for line in open(tmp_path / "sw" / "compare" / "switchable_qat" / fingerprint / "metrics.jsonl")]
  assert log[-1]["step"] == 2 and {"accuracy_w8a8", "accuracy_w4a4"} <= set(log[-1])


def test_switchable_baseline_learns_a_w4a4_output_affine_with_flexiqs_ratio_affine(context, tmp_path):
  """With finetune.ratio_affine the switchable network's W4A4 precision learns a gain and bias per
  output channel (W8A8 none), as FlexiQ's ratio affine at ratio 1; its fingerprint changes only then."""
  from flexiq_jax import checkpoint
  from flexiq_jax.compare import baselines
  ctx = _in(context, tmp_path / "sw", **{"finetune.ratio_affine": True})
  assert harness.method_fields(ctx.config, "switchable_qat") != harness.method_fields(context.config, "switchable_qat")
  assert harness.method_fields(ctx.config, "lsq_qat") == harness.method_fields(context.config, "lsq_qat")
  rows = harness.switchable_qat(ctx)
  assert [r.setting.split(" ")[0] for r in rows] == ["W8A8", "W4A4"]
  assert all("switchable, W4A4 output affine," in r.setting for r in rows)
  [fingerprint] = os.listdir(tmp_path / "sw" / "compare" / "switchable_qat")
  ckpt = tmp_path / "sw" / "compare" / "switchable_qat" / fingerprint / "checkpoints"
  saved = checkpoint.load_tree(str(ckpt / max(os.listdir(ckpt), key=lambda d: int(d) if d.isdigit() else -1) / "default"))
  affine = saved["trainable"]["affine"]
  plan = ctx.calibration.plan
  assert set(affine[1]) == {k.replace("/", ".") for k in plan.lowerable} and not affine[0]
  moved = np.concatenate([np.asarray(v["bias"]) for v in affine[1].values()])
  assert np.abs(moved).max() > 0 and (moved < 0).any()  # learnt, with the weights (no floor)
  # Zero gain and bias are the identity: the forward equals the one without an affine.
  forward = baselines.LsqForward(ctx.float_model.model, plan, {p: (4, 4) for p in plan.quantized}, {})
  scales = {k.replace("/", "."): {"act": jnp.float32(0.05), "weight": jnp.full((plan.layers[k].out_channels,), 0.01)}
            for k in plan.quantized}
  params = ctx.calibration.folded["params"]
  images = jnp.asarray(ctx.calib_batches[0][:4])
  plain = forward({"params": params, "scales": scales}, {}, images)
  zero = forward({"params": params, "scales": scales, "affine": baselines.switchable_affine(plan)}, {}, images)
  np.testing.assert_array_equal(plain, zero)


def test_flexiq_finetuned_for_100_only_gets_the_passes_of_the_multi_ratio_finetuning(context, tmp_path):
  """FlexiQ's quantized model trained at ratio 1 only, no every-step ratios, with the passes of
  FlexiQ's (here sandwich) finetuning as steps: 4 steps x 3 passes = 12 steps of one pass."""
  ctx = _in(context, tmp_path / "wd", **{"finetune.every_step_ratios": (0.0, 1.0)})
  rows = harness.flexiq_100only(ctx)
  assert [(r.method, r.extra["ratio"], r.extra["finetuned"]) for r in rows] == [
      ("flexiq_100only", q, True) for q in harness.ONLY100_RATIOS]
  stage = tmp_path / "wd" / "compare" / "flexiq_100only" / "finetune"
  fields = json.load(open(stage / "fingerprint.json"))["fields"]
  assert fields["finetune.levels"] == [1.0] and fields["finetune.level_probs"] == [1.0]
  assert fields["finetune.uniform_prob"] == 0.0 and not fields.get("finetune.every_step_ratios")
  assert json.load(open(stage / "done.json"))["total_steps"] == 12
  # It reuses FlexiQ's quantized model: no calibration or selection of its own.
  assert not os.path.exists(tmp_path / "wd" / "compare" / "flexiq_100only" / "select")


def test_a_finetuning_variant_shares_the_main_runs_selection_and_a_grid_variant_makes_its_own(context, tmp_path):
  """A finetuned variant runs the whole pipeline with its change, finetuned, swept at 0 / 0.5 / 1:
  one that changes only finetuning takes the main run's calibration, selection and quantized
  model over (same fingerprints; no second search); one that changes the weight grid computes
  its own calibration and quantized model."""
  ctx = _in(context, tmp_path / "wd", **{"select.selector": "greedy"})
  shutil.copytree(os.path.join(context.run.workdir, "calibrate"), tmp_path / "wd" / "calibrate")  # as compare mode has it
  rows = harness.METHODS["flexiq_refresh_quantized"](ctx)
  assert [(r.method, r.extra["ratio"], r.extra["finetuned"]) for r in rows] == [
      ("flexiq_refresh_quantized", q, True) for q in harness.FINETUNED_VARIANT_RATIOS]
  main, variant = tmp_path / "wd", tmp_path / "wd" / "compare" / "flexiq_refresh_quantized"
  for directory in ("calibrate", "select", "quantized"):
    assert json.load(open(variant / directory / "done.json")) == json.load(open(main / directory / "done.json"))
  fields = json.load(open(variant / "finetune" / "fingerprint.json"))["fields"]
  assert fields["finetune.refresh_source"] == "quantized"
  harness.METHODS["flexiq_max127"](ctx)
  grid = tmp_path / "wd" / "compare" / "flexiq_max127"
  assert (json.load(open(grid / "calibrate" / "done.json"))["fingerprint"]
          != json.load(open(main / "calibrate" / "done.json"))["fingerprint"])
  assert "weight_scale" not in json.load(open(grid / "calibrate" / "fingerprint.json"))["fields"]["quant"]


def test_a_finetuned_variant_the_judge_refuses_is_reported_as_trained_and_marked_refused(context, tmp_path,
                                                                                          monkeypatch):
  """An ablation whose finetune the judge refuses does not stop the comparison: its rows are the
  refused model's figures, each marked with the judge's reason (left out of summaries)."""
  from flexiq_jax import judge
  real = judge.judge_finetune
  monkeypatch.setattr(judge, "judge_finetune", lambda *a, **k: {**real(*a, **k), "accepted": False,
                                                                  "failed": ["ratio 1 top-1"]})
  ctx = _in(context, tmp_path / "wd", **{"select.selector": "greedy"})
  rows = harness.METHODS["flexiq_sandwich"](ctx)
  assert [r.extra["ratio"] for r in rows] == list(harness.FINETUNED_VARIANT_RATIOS)
  assert all(harness.row_refusal(r.to_json()).startswith("refused by the finetune judge") for r in rows)
  kept = list((tmp_path / "wd" / "compare" / "flexiq_sandwich" / "replaced").glob("*/finetune/qvars"))
  assert len(kept) == 1 and not (tmp_path / "wd" / "compare" / "flexiq_sandwich" / "finetune").exists()


def test_the_long_variant_makes_the_sandwich_variants_passes_one_ratio_a_step():
  """flexiq_long trains as many one-pass steps as flexiq_sandwich makes passes (3 a step), with no
  every-step ratio; flexiq_sandwich_w4 weighs the 4-bit end 2."""
  from configs import quickstart
  from flexiq_jax import pipeline, train as train_lib
  config = quickstart.get_config()
  long = harness.resolve_variant_changes("flexiq_long", config)
  assert long["finetune.every_step_ratios"] == () and long["finetune.every_step_weights"] == ()
  size, batch = pipeline.train_examples(config), config.finetune.batch_size
  configured = train_lib.total_steps_of(config.finetune.num_epochs, size, batch)
  assert train_lib.total_steps_of(long["finetune.num_epochs"], size, batch) == 3 * configured
  weighted = harness.resolve_variant_changes("flexiq_sandwich_w4", config)
  assert weighted["finetune.every_step_ratios"] == (0.0, 1.0) and weighted["finetune.every_step_weights"] == (1.0, 2.0)
  ends = harness.resolve_variant_changes("flexiq_ends", config)
  levels, probs, uniform = ends["finetune.levels"], ends["finetune.level_probs"], ends["finetune.uniform_prob"]
  assert levels == (0.0,) + tuple(config.select.levels) and sum(probs) == pytest.approx(1.0)
  share = dict(zip(levels, (1 - uniform) * np.asarray(probs)))
  assert share[1.0] == pytest.approx(0.36) and share[0.0] == pytest.approx(0.2)  # configured: 0.1 each
  top = harness.resolve_variant_changes("flexiq_top", config)
  share = dict(zip(top["finetune.levels"], (1 - top["finetune.uniform_prob"]) * np.asarray(top["finetune.level_probs"])))
  assert share[1.0] == pytest.approx(0.36) and share[0.0] == pytest.approx(0.1)  # ratio 0 as configured
  assert sum(top["finetune.level_probs"]) == pytest.approx(1.0)
  lsq = harness.resolve_variant_changes("flexiq_lsq", config)
  assert lsq["finetune.lsq_grad_scale"] == lsq["finetune.lsq_weight_grad_scale"] == "effective"
  assert lsq["finetune.lsq_learning_rate"] == 0.0  # the scales at the weights' rate


def test_a_finetuned_variant_that_diverges_is_reported_failed_and_a_finished_one_carries_held_out_figures(
    context, tmp_path, monkeypatch):
  """A variant whose finetuning diverges at the configured rate gives one failed row per ratio (no
  figures, the reason kept) instead of stopping the comparison; a finished variant's rows carry its
  finetune judge's held-out top-1 and KL at ratios 0 and 1."""
  from flexiq_jax import pipeline, train as train_lib
  ctx = _in(context, tmp_path / "wd", **{"select.selector": "greedy"})
  rows = harness.METHODS["flexiq_ends"](ctx)
  holdout = rows[0].extra["holdout"]
  assert set(holdout) >= {"top1@0", "kl@0", "top1@1", "kl@1", "images"} and all(r.extra["holdout"] == holdout for r in rows)
  # A changed definition redoes the variant's finetune; the earlier one is kept under replaced/.
  monkeypatch.setattr(harness, "ENDS_LEVEL_PROBS", {1.0: 0.5, 0.0: 0.2})
  redone = harness.METHODS["flexiq_ends"](ctx)
  variant_dir = tmp_path / "wd" / "compare" / "flexiq_ends"
  assert [p.name for p in (variant_dir / "replaced").glob("*/finetune")] == ["finetune"]
  assert len(redone) == len(rows)
  real = pipeline.finetune

  def diverging(run, *a, **k):
    if run.workdir.endswith("flexiq_distill"):
      raise train_lib.DivergedError("loss 18.5 at step 7 is above 10 x the start loss")
    return real(run, *a, **k)
  monkeypatch.setattr(pipeline, "finetune", diverging)
  failed = [r.to_json() for r in harness.METHODS["flexiq_distill"](ctx)]
  assert [r["ratio"] for r in failed] == list(harness.FINETUNED_VARIANT_RATIOS)
  assert all(r["top1"] is None and harness.row_failure(r).startswith("DivergedError: loss 18.5") for r in failed)


def test_cached_finetuned_rows_without_held_out_figures_get_them_from_their_stages_judge(tmp_path):
  """Rows cached before rows carried held-out figures take them from the judge report of the
  finetune stage that made them: flexiq's from the run's, a variant's from compare/<name>; a stage
  without a finished finetune, a failed row and a non-FlexiQ method are left as they are."""
  from flexiq_jax import records
  report = {"images": "the first 1000 images of train[-5000:]", "num_images": 1000,
            "after_finetuning": {"0": {"top1": 90.0, "kl": 0.01}, "1": {"top1": 88.0, "kl": 0.05}}}
  for where in (tmp_path, tmp_path / "compare" / "flexiq_sandwich"):
    records.write_json_atomic(str(where / "finetune" / "judge.json"), report)
    records.write_json_atomic(str(where / "finetune" / "done.json"), {"total_steps": 4})
  row = {"method": "flexiq", "setting": "ratio 1 (finetuned)", "top1": 87.0, "relative_bops": 0.26, "ratio": 1.0,
         "finetuned": True}
  before = {**row, "finetuned": False}
  got = harness._with_holdout(str(tmp_path), "flexiq", [before, row])
  assert "holdout" not in got[0] and got[1]["holdout"]["top1@1"] == 88.0 and got[1]["holdout"]["kl@0"] == 0.01
  assert harness._with_holdout(str(tmp_path), "flexiq_sandwich", [row])[0]["holdout"]["top1@0"] == 90.0
  assert "holdout" not in harness._with_holdout(str(tmp_path), "flexiq_long", [row])[0]  # no finished stage
  assert "holdout" not in harness._with_holdout(str(tmp_path), "lsq_qat", [row])[0]
  failed = {**row, "top1": None, "failed": "DivergedError: loss 18.5"}
  assert "holdout" not in harness._with_holdout(str(tmp_path), "flexiq", [failed])[0]


def test_cached_finetuned_rows_without_selection_figures_are_made_again():
  lacking = [{"method": "flexiq", "finetuned": True, "holdout": {}}, {"method": "flexiq", "finetuned": False}]
  assert harness._lacks_selection_figures(lacking)
  assert not harness._lacks_selection_figures([{**lacking[0], "holdout_select": {}}, lacking[1]])
  assert not harness._lacks_selection_figures([{"finetuned": True, "failed": "DivergedError"}])  # nothing to score


def test_a_finetune_option_at_its_off_value_keeps_flexiq_100onlys_fingerprint(smoke_config):
  from flexiq_jax import stage_cache
  key = lambda c: stage_cache.fingerprint(harness.method_fields(c, "flexiq_100only"))
  without = smoke_config.copy_and_resolve_references()
  del without.finetune["ratio_affine"]
  assert key(without) == key(smoke_config)
  smoke_config.finetune.ratio_affine = True
  assert key(smoke_config) != key(without)
