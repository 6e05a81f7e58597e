"""Layer-wise mixed precision: phase-1 ordering, Pareto monotonicity, phase-3 searches, caching, and
the driver (layer-wise bits; FlexiQ per-layer ratios) wired to a model."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexiq_jax
from flexiq_jax import calibrate as calibrate_lib
from flexiq_jax import cost
from flexiq_jax import numerics
from flexiq_jax import quantize
from flexiq_jax import serve
from flexiq_jax.layerwise import amp
from flexiq_jax.layerwise import apply as apply_lib
from flexiq_jax.layerwise import candidates as cand_lib
from flexiq_jax.layerwise import driver
from flexiq_jax.layerwise import search as search_lib
from flexiq_jax.stage_results import Calibration, FloatModel, Quantized


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16, name="fc0")(x))
    x = nn.relu(nn.Dense(16, name="fc1")(x))
    x = nn.relu(nn.Dense(16, name="fc2")(x))
    return nn.Dense(4, name="head")(x)


@dataclasses.dataclass(frozen=True)
class Mlp:
  model: nn.Module
  variables: dict
  plan: quantize.QuantPlan
  calib: dict
  x: jax.Array


@pytest.fixture(scope="module")
def mlp() -> Mlp:
  """fc1 gets one huge weight per output channel, on an input channel that is always 0 (fc0's
  unit 0 is dead): the output does not change, but at 4 bits fc1's other weights round to zero,
  so fc1 is by construction the most sensitive layer."""
  model = MLP()
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 4, 4, 1))
  variables = model.init(jax.random.PRNGKey(1), x)
  params = jax.tree_util.tree_map(np.array, variables["params"])
  params["fc0"]["kernel"][:, 0] = 0.0
  params["fc0"]["bias"][0] = -1.0
  params["fc1"]["kernel"][0, :] = 6.0
  variables = {"params": params}
  plan = quantize.build_plan(model, variables, (4, 4, 1), keep_8bit=())
  calib = calibrate_lib.calibrate(model, plan, variables, [x])
  return Mlp(model, variables, plan.with_signedness(calib), calib, x)


def _driver_config(**layerwise):
  from configs import quickstart
  config = quickstart.get_config("smoke")
  config.layerwise.update(layerwise)
  return config


def _score_data(mlp):
  """Labels are the float model's predictions (float top-1 = 100%)."""
  labels = np.argmax(np.asarray(mlp.model.apply(mlp.variables, mlp.x)), -1).astype(np.int32)
  return [{"image": mlp.x[:32], "label": labels[:32]}, {"image": mlp.x[32:], "label": labels[32:]}]


def _layer_problem(mlp, counter, **layerwise):
  """The driver's problem on the MLP, its callbacks counted."""
  config = _driver_config(sensitivity_images=64, **layerwise)
  lp = driver.layerwise_problem(config, FloatModel(mlp.model, mlp.variables),
                                Calibration(mlp.plan, mlp.variables, mlp.calib), [mlp.x], score_data=_score_data(mlp))
  problem = lp.problem
  sens, ev = problem.sensitivity_fn, problem.eval_fn

  def sensitivity(g, k):
    counter["phase1"] += 1
    return sens(g, k)

  def evaluate(a, baseline):
    counter["eval"] += 1
    return ev(a, baseline)

  problem.sensitivity_fn, problem.eval_fn = sensitivity, evaluate
  return problem, lp


def test_candidates_parse_and_cost():
  c = cand_lib.parse_candidates(["W8A8", "W4A8", "w4a4", "FP"])
  assert [x.name for x in c] == ["W8A8", "W4A8", "W4A4", "FP"]
  assert c[3].cost_bits == (32, 32) and c[2].bop_factor == 16
  with pytest.raises(ValueError, match="bad candidate"):
    cand_lib.parse_candidate("int8")


def test_apply_float_exact_and_w8a8_close_one_compilation(mlp):
  model, variables, plan, calib, x = mlp.model, mlp.variables, mlp.plan, mlp.calib, mlp.x
  tables = apply_lib.build_tables(model, plan, variables, calib)
  logits = jax.jit(apply_lib.make_apply(model, plan))
  ref = model.apply(variables, x)
  fp = logits(variables, tables, *apply_lib.bits_arrays(plan, {}), x)
  np.testing.assert_allclose(fp, ref, rtol=1e-5, atol=1e-5)
  w8 = logits(variables, tables, *apply_lib.bits_arrays(plan, {}, default=(8, 8)), x)
  w4_bits = apply_lib.bits_arrays(plan, {}, default=(4, 4))
  with serve.count_compilations() as compiled:
    w4 = logits(variables, tables, *w4_bits, x)
  assert compiled.count == 0  # bits are data: no recompilation
  assert apply_lib.sqnr_db(ref, w8) > apply_lib.sqnr_db(ref, w4) + 10


def test_mse_ranges_clip_4bit_only(mlp):
  model, variables, plan, calib, x = mlp.model, mlp.variables, mlp.plan, mlp.calib, mlp.x
  t = apply_lib.build_tables(model, plan, variables, calib, act_method="mse", weight_method="mse",
                             bits=(4,), batches=[x])
  mm = apply_lib.build_tables(model, plan, variables, calib)
  for p in plan.quantized:
    assert float(t[p]["act_clip"][4]) <= float(mm[p]["act_clip"][4]) + 1e-6
    assert float(t[p]["act_clip"][8]) == float(mm[p]["act_clip"][8])
    assert np.all(np.asarray(t[p]["weight_clip"][4]) <= np.asarray(mm[p]["weight_clip"][4]) + 1e-6)
    live = np.asarray(mm[p]["weight_clip"][4]) > 0  # fc0's output channel 0 is all zeros by construction
    assert np.all(np.asarray(t[p]["weight_clip"][4])[live] > 0)  # the symmetric extent, not a signed bound
  logits = jax.jit(apply_lib.make_apply(model, plan))
  ref = model.apply(variables, x)
  mse8 = logits(variables, t, *apply_lib.bits_arrays(plan, {}, default=(8, 8)), x)
  mm4 = logits(variables, mm, *apply_lib.bits_arrays(plan, {}, default=(4, 4)), x)
  assert apply_lib.sqnr_db(ref, mse8) > apply_lib.sqnr_db(ref, mm4) + 10


def test_phase1_ranks_the_outlier_layer_most_sensitive(mlp, tmp_path):
  counter = {"phase1": 0, "eval": 0}
  problem, _ = _layer_problem(mlp, counter)
  result = amp.run(problem, str(tmp_path), "fp", allowed_drop=10.0, log=lambda *a: None)
  assert result["phases_run"] == [1, 2, 3] and result["early_exit"] is None
  sens = result["sensitivity"]
  assert len(sens) == 2 * 4 and counter["phase1"] == 8
  assert [e["score"] for e in sens] == sorted((e["score"] for e in sens), reverse=True)
  w4a8 = [e for e in sens if e["candidate_name"] == "W4A8"]
  assert w4a8[-1]["group_name"] == "fc1"  # most sensitive W4A8 entry
  assert sens[-1]["group_name"] == "fc1"


def test_driver_phase1_scores_one_group_against_float_the_others_float(mlp):
  """The driver's phase-1 function: group g alone at candidate k (every other group float),
  SQNR of the logits against the float model, with the ranges recalibrated for candidate k."""
  problem, lp = _layer_problem(mlp, {"phase1": 0, "eval": 0})
  logits = jax.jit(apply_lib.make_apply(mlp.model, mlp.plan))
  ref = mlp.model.apply(mlp.variables, mlp.x)
  k = problem.candidates.index("W4A4")
  for g, members in enumerate(lp.members):
    alone = apply_lib.bits_arrays(mlp.plan, {p: (4, 4) for p in members})
    want = apply_lib.sqnr_db(ref, logits(mlp.variables, lp.tables_for("phase1", k), *alone, mlp.x))
    assert problem.sensitivity_fn(g, k) == pytest.approx(want, rel=1e-6)
  everything = apply_lib.bits_arrays(mlp.plan, {}, default=(4, 4))
  all_quantized = apply_lib.sqnr_db(ref, logits(mlp.variables, lp.tables_for("phase1", k), *everything, mlp.x))
  assert min(problem.sensitivity_fn(g, k) for g in range(len(lp.members))) > all_quantized
  # Float ranges unchanged by a recalibration with every layer float.
  flat = apply_lib.bits_arrays(mlp.plan, {})
  recal = apply_lib.make_recalibrate(mlp.model, mlp.plan)(mlp.variables, lp.tables_for("uniform", 0), *flat, mlp.x)
  for i, p in enumerate(mlp.plan.quantized):
    want = max(-float(np.min(mlp.calib[p]["ch_min"])), float(np.max(mlp.calib[p]["ch_max"])), 0.0)
    assert float(np.max(recal[i])) == pytest.approx(want, rel=1e-6)
    assert -float(recal[i][0]) == pytest.approx(float(np.min(mlp.calib[p]["ch_min"])), rel=1e-6)


def test_pareto_list_strictly_decreasing_in_cost():
  rng = np.random.default_rng(0)
  for _ in range(20):
    g, k = rng.integers(2, 7), rng.integers(2, 5)
    macs = rng.uniform(1, 100, g)
    factors = np.sort(rng.choice([4, 8, 16, 32, 64, 128], k, replace=False))[::-1]
    group_cost = macs[:, None] * factors[None]
    entries = [{"group": i, "candidate": j, "score": float(rng.normal()), "cost_reduction": 0.0}
               for i in range(g) for j in range(1, k)]
    pts = search_lib.pareto_list(search_lib.sort_sensitivity(entries, group_cost), g, 0, group_cost)
    costs = [p["cost"] for p in pts]
    assert pts[0]["relative_cost"] == 1.0
    assert all(a > b for a, b in zip(costs, costs[1:]))
    np.testing.assert_allclose(costs[-1], (macs * factors[-1]).sum())  # ends with every group cheapest


@pytest.mark.parametrize("name", ["binary", "interpolation"])
def test_phase3_search_matches_brute_force(name):
  rng = np.random.default_rng(1)
  for trial in range(200):
    n = int(rng.integers(1, 40))
    scores = np.sort(rng.uniform(50, 90, n))[::-1]
    if trial % 3 == 0:
      scores = np.round(scores)  # plateaus
    calls = []
    fn = lambda i: (calls.append(i), scores[i])[1]
    for target in (scores[0] + 1, scores[-1] - 1, rng.uniform(45, 95), float(scores[n // 2])):
      calls.clear()
      got = search_lib.search(name, fn, n, target)
      want = search_lib.brute_force_search(lambda i: scores[i], n, target)
      if scores[0] < target:
        want = 0
      assert got == want, (name, scores, target)
      if name == "binary":
        assert len(set(calls)) <= max(2, int(np.ceil(np.log2(max(n, 2)))) + 2)
      else:
        assert len(set(calls)) <= n
  if name == "interpolation":  # scores linear in the index: the first interpolated probe lands
    scores = np.linspace(90, 50, 33)
    calls = []
    assert search_lib.search(name, lambda i: (calls.append(i), scores[i])[1], 33, 70.2) == 15
    assert len(set(calls)) <= 4


def test_cache_reuse_counts_no_new_evaluations(mlp, tmp_path):
  counter = {"phase1": 0, "eval": 0}
  problem, _ = _layer_problem(mlp, counter)
  quiet = lambda *a: None
  first = amp.run(problem, str(tmp_path), "fp", allowed_drop=5.0, phase2_full=False, log=quiet)
  assert first["phases_run"] == [1, 2, 3]
  n = first["num_points"]
  uniform = len(problem.candidates)  # the baseline step scores every uniform candidate
  assert counter["phase1"] == 8 and uniform < counter["eval"] < uniform + n
  probed = counter["eval"]
  again = amp.run(problem, str(tmp_path), "fp", allowed_drop=5.0, phase2_full=False, log=quiet)
  assert counter == {"phase1": 8, "eval": probed} and again["chosen_index"] == first["chosen_index"]
  other = amp.run(problem, str(tmp_path), "fp", allowed_drop=20.0, search="brute_force", log=quiet)
  assert counter["phase1"] == 8 and counter["eval"] == uniform + n - 1  # point 0 is the uniform baseline
  assert other["chosen_index"] >= first["chosen_index"]
  amp.run(problem, str(tmp_path), "fp", allowed_drop=1.0, search="interpolation", log=quiet)
  assert counter == {"phase1": 8, "eval": uniform + n - 1}
  amp.run(problem, str(tmp_path), "other-fingerprint", allowed_drop=5.0, log=quiet)
  assert counter["phase1"] == 16  # a new fingerprint recomputes


def test_early_exits_and_automatic_baseline(mlp, tmp_path):
  """As AIMET: the baseline is the best uniform candidate; if it misses the target the search
  stops there (target missed); if the cheapest uniform candidate is within the drop, it is chosen."""
  counter = {"phase1": 0, "eval": 0}
  problem, _ = _layer_problem(mlp, counter)
  quiet = lambda *a: None
  strict = amp.run(problem, str(tmp_path), "fp", allowed_drop=0.0, log=quiet)
  uniform = strict["uniform_scores"]
  assert strict["baseline"] == max(uniform, key=uniform.get)
  if uniform[strict["baseline"]] < 100.0:
    assert strict["early_exit"] == "baseline_misses_target" and not strict["target_met"]
    assert strict["chosen_candidates"] == {g: strict["baseline"] for g in problem.groups}
  loose = amp.run(problem, str(tmp_path), "fp", allowed_drop=100.0, log=quiet)
  assert loose["early_exit"] == "lowest_within_drop" and loose["target_met"] and loose["phases_run"] == []
  assert loose["lowest"] == "W4A4" and set(loose["chosen_candidates"].values()) == {"W4A4"}
  assert loose["chosen"]["relative_cost"] < 1.0 and counter["phase1"] == 0


def test_shared_input_groups_tie_the_readers_of_one_tensor(tmp_path):
  class Fork(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = x.reshape(x.shape[0], -1)
      h = nn.relu(nn.Dense(8, name="stem")(x))
      a, b = nn.Dense(8, name="left")(h), nn.Dense(8, name="right")(h)
      return nn.Dense(3, name="head")(nn.relu(a + b))

  model = Fork()
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 2, 2, 1))
  variables = model.init(jax.random.PRNGKey(1), x)
  plan = quantize.build_plan(model, variables, (2, 2, 1), keep_8bit=())
  groups = cand_lib.quantizer_groups(plan, "shared_input", model, variables, (2, 2, 1))
  assert [g.layers for g in groups] == [("stem",), ("left", "right"), ("head",)]
  assert [g.layers for g in cand_lib.quantizer_groups(plan, "per_layer")] == [(p,) for p in plan.quantized]
  with pytest.raises(ValueError, match="unknown layerwise.grouping"):
    cand_lib.quantizer_groups(plan, "per_tensor")


def test_phase1_tie_break_is_aimets():
  """Equal scores: the larger bit-width sum first, then the larger cost reduction, then the
  earlier group."""
  group_cost = np.array([[64.0, 32.0, 16.0], [64.0, 32.0, 16.0], [128.0, 64.0, 32.0]])
  entries = [{"group": g, "candidate": k, "score": 1.0, "cost_reduction": float(group_cost[g, 0] - group_cost[g, k])}
             for g in range(3) for k in (1, 2)]
  tie_rank = [16, 12, 8]  # W8A8, W4A8, W4A4
  order = [(e["group"], e["candidate"]) for e in search_lib.sort_sensitivity(entries, group_cost, tie_rank)]
  assert order == [(2, 1), (0, 1), (1, 1), (2, 2), (0, 2), (1, 2)]


# --------------------------------------------------------------------------------------------
# The driver, on the MLP: labels are the float model's predictions (float top-1 = 100%).


def test_layerwise_search_returns_the_chosen_bits(mlp, tmp_path):
  config = _driver_config(allowed_drop=10.0, phase2_full=False)
  float_model = FloatModel(mlp.model, mlp.variables)
  calibration = Calibration(mlp.plan, mlp.variables, mlp.calib)
  score_data = _score_data(mlp)
  res = driver.layerwise_search(config, str(tmp_path), float_model, calibration, [mlp.x], score_data=score_data)
  assert isinstance(res, driver.LayerwiseSearch)
  s = res.summary
  assert s["reference_score"] == 100.0 and s["target"] == 90.0 and s["target_met"]
  assert s["chosen"]["relative_cost"] < 1.0  # something was lowered within a 10-point drop
  assert res.weight_bits.shape == res.act_bits.shape == (len(mlp.plan.quantized),)
  cands = cand_lib.parse_candidates(config.layerwise.candidates)
  by_name = {c.name: c for c in cands}
  assert res.weight_bits.tolist() == [by_name[s["chosen_candidates"][p]].weight_bits for p in mlp.plan.quantized]
  assert res.act_bits.tolist() == [by_name[s["chosen_candidates"][p]].act_bits for p in mlp.plan.quantized]
  # The bits evaluate to the chosen point's score.
  ev = driver.LayerwiseEvaluator(mlp.model, mlp.plan, mlp.variables, res.tables)
  assert ev.top1(score_data, res.weight_bits, res.act_bits) == pytest.approx(s["chosen"]["score"])
  for name in ("phase1.json", "phase2.json", "scores.json", "sensitivity.png", "pareto.png"):
    assert (tmp_path / "layerwise" / name).exists(), name
  # Another allowed drop reuses every score (nothing new evaluated). No drop at all is out of
  # reach even for the best uniform candidate (W8A8): the search stops there, chooses it and
  # reports the target missed.
  strict = driver.layerwise_search(config, str(tmp_path), float_model, calibration, [mlp.x], allowed_drop=0.0,
                                   score_data=score_data)
  ss = strict.summary
  assert ss["new_evaluations"] == 0 and ss["early_exit"] == "baseline_misses_target" and ss["phases_run"] == []
  assert ss["baseline"] == "W8A8" and not ss["target_met"]
  assert ss["chosen"]["score"] < 100.0 and ss["chosen"]["relative_cost"] == 1.0
  assert strict.weight_bits.tolist() == strict.act_bits.tolist() == [8] * len(mlp.plan.quantized)
  assert ev.top1(score_data, strict.weight_bits, strict.act_bits, strict.tables) == pytest.approx(ss["chosen"]["score"])
  assert set(s["seconds"]) == {"setup", "compile", "baseline", "phase1", "phase2", "phase3"}
  # early_exit=False runs the phases even where the baseline misses the target (the benchmark
  # times them so).
  forced = driver.layerwise_search(config, str(tmp_path), float_model, calibration, [mlp.x], allowed_drop=0.0,
                                   score_data=score_data, early_exit=False).summary
  assert forced["early_exit"] is None and forced["phases_run"] == [1, 2, 3]


def test_float_candidate_with_mse_ranges_runs(mlp, tmp_path):
  """An 'FP' candidate with MSE ranges (the width set once kept 0 and asked for a -1-bit fit)."""
  config = _driver_config(candidates=("W8A8", "W4A4", "FP"), act_range="mse", weight_range="mse",
                          allowed_drop=10.0, phase2_full=False)
  res = driver.layerwise_search(config, str(tmp_path), FloatModel(mlp.model, mlp.variables),
                                Calibration(mlp.plan, mlp.variables, mlp.calib), [mlp.x], score_data=_score_data(mlp))
  uniform = res.summary["uniform_scores"]
  assert uniform["FP"] == 100.0 and res.summary["baseline"] == max(uniform, key=uniform.get)  # the first best
  assert {e["candidate_name"] for e in res.summary["sensitivity"]} == {"W8A8", "W4A4"}  # cheaper than FP
  assert not res.summary["recalibrated"]  # MSE tables are not recomputed


def test_mse_weight_clip_is_fitted_on_the_narrow_grid():
  w = jax.random.normal(jax.random.PRNGKey(3), (64, 5)) ** 3
  clip = np.asarray(apply_lib.narrow_mse_clip(w, 4))
  absmax = np.abs(np.asarray(w)).max(0)

  def err(c):
    return np.asarray(jnp.sum((numerics.fake_quant_weight_traced_bits(w, jnp.asarray(c), 4) - w) ** 2, 0))

  brute = np.stack([err(a * absmax) for a in np.linspace(0.01, 1.0, 100)])  # (K, O)
  np.testing.assert_allclose(err(clip), brute.min(0), rtol=1e-5)
  assert np.all(clip < absmax)  # heavy tails: 4 bits clip


def test_flexiq_search_counts_reach_each_level(mlp, tmp_path):
  config = _driver_config(allowed_drop=100.0, flexiq_ratios=(0.0, 0.5, 1.0))
  config.select.levels = (0.5, 1.0)
  qmodel, qvars = flexiq_jax.quantize_model(mlp.model, mlp.variables, np.asarray(mlp.x), levels=(0.5, 1.0),
                                            selector="greedy", keep_8bit=())
  float_model = FloatModel(mlp.model, mlp.variables)
  calibration = Calibration(qmodel.plan, mlp.variables, mlp.calib)
  res = driver.flexiq_search(config, str(tmp_path), float_model, calibration, [mlp.x], Quantized(qmodel, qvars),
                             score_data=_score_data(mlp))
  levels = res["counts_at_level"]
  assert sorted(levels) == [0.5, 1.0]
  layers = mlp.plan.layer_infos(mlp.plan.lowerable)
  for level, sel in levels.items():
    counts = np.array([sel["counts"][p] for p in mlp.plan.lowerable])
    channels = np.array([layers[p].in_channels for p in mlp.plan.lowerable])
    macs = np.array([layers[p].macs for p in mlp.plan.lowerable], np.float64)
    assert np.all(counts <= channels) and sel["share"] >= level - 1e-9
    assert sel["share"] == pytest.approx(float((counts / channels * macs).sum() / macs.sum()))
  assert levels[1.0]["counts"] == {p: layers[p].in_channels for p in mlp.plan.lowerable}  # all lowered
  assert levels[0.5]["relative_cost"] > levels[1.0]["relative_cost"]
  assert (tmp_path / "layerwise_flexiq" / "counts_at_level.json").exists()
  with pytest.raises(ValueError, match="must start at 0"):
    driver.flexiq_search(_driver_config(flexiq_ratios=(0.5, 1.0)), str(tmp_path), float_model, calibration, [mlp.x],
                         Quantized(qmodel, qvars), score_data=_score_data(mlp))
