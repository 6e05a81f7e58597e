"""Layer-wise mixed precision: phase-1 ordering, Pareto monotonicity, phase-3 searches, caching, and
the driver (layer-wise bits; FlexiQ per-layer ratios) wired to a model."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

import flexiq_jax
from flexiq_jax import calibrate as calibrate_lib
from flexiq_jax import cost
from flexiq_jax import quantize
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


def _layer_problem(mlp, cands, counter):
  model, variables, plan, calib, x = mlp.model, mlp.variables, mlp.plan, mlp.calib, mlp.x
  tables = apply_lib.build_tables(model, plan, variables, calib)
  logits = jax.jit(apply_lib.make_apply(model, plan))
  ref = model.apply(variables, x)
  groups = cand_lib.quantizer_groups(plan)

  def sensitivity(g, k):
    counter["phase1"] += 1
    wb, ab = apply_lib.bits_arrays(plan, {groups[g]: cands[k]})
    return apply_lib.sqnr_db(ref, logits(variables, tables, wb, ab, x))

  def score(assignment):  # a stand-in for accuracy: SQNR of the whole configuration
    counter["eval"] += 1
    wb, ab = apply_lib.bits_arrays(plan, {p: cands[k] for p, k in zip(groups, assignment)})
    return apply_lib.sqnr_db(ref, logits(variables, tables, wb, ab, x))

  group_cost = cost.layerwise_bops_table({p: plan.layers[p] for p in groups}, [c.cost_bits for c in cands])
  problem = amp.AmpProblem(groups, [c.name for c in cands], 0, group_cost, sensitivity, score,
                           lambda: 60.0)
  return problem, logits, tables


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
  w4 = logits(variables, tables, *apply_lib.bits_arrays(plan, {}, default=(4, 4)), x)
  assert apply_lib.sqnr_db(ref, w8) > apply_lib.sqnr_db(ref, w4) + 10
  assert logits._cache_size() == 1  # bits are data: no recompilation


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
  cands = cand_lib.parse_candidates(["W8A8", "W4A8", "W4A4"])
  counter = {"phase1": 0, "eval": 0}
  problem, _, _ = _layer_problem(mlp, cands, counter)
  result = amp.run(problem, str(tmp_path), "fp", allowed_drop=10.0, log=lambda *a: None)
  sens = result["sensitivity"]
  assert len(sens) == 2 * 4 and counter["phase1"] == 8
  assert [e["score"] for e in sens] == sorted((e["score"] for e in sens), reverse=True)
  w4a8 = [e for e in sens if e["candidate_name"] == "W4A8"]
  assert w4a8[-1]["group_name"] == "fc1"  # most sensitive W4A8 entry
  assert sens[-1]["group_name"] == "fc1"


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
      assert len(set(calls)) <= max(2, int(np.ceil(np.log2(max(n, 2)))) + 2) or name == "interpolation"


def test_cache_reuse_counts_no_new_evaluations(mlp, tmp_path):
  cands = cand_lib.parse_candidates(["W8A8", "W4A8", "W4A4"])
  counter = {"phase1": 0, "eval": 0}
  problem, _, _ = _layer_problem(mlp, cands, counter)
  quiet = lambda *a: None
  first = amp.run(problem, str(tmp_path), "fp", allowed_drop=5.0, phase2_full=False, log=quiet)
  n = first["num_points"]
  assert counter["phase1"] == 8 and 0 < counter["eval"] < n + 1
  probed = counter["eval"]
  again = amp.run(problem, str(tmp_path), "fp", allowed_drop=5.0, phase2_full=False, log=quiet)
  assert counter == {"phase1": 8, "eval": probed} and again["chosen_index"] == first["chosen_index"]
  other = amp.run(problem, str(tmp_path), "fp", allowed_drop=20.0, search="brute_force", log=quiet)
  assert counter["phase1"] == 8 and counter["eval"] == n  # only the points not yet scored
  assert other["chosen_index"] >= first["chosen_index"]
  amp.run(problem, str(tmp_path), "fp", allowed_drop=1.0, search="interpolation", log=quiet)
  assert counter == {"phase1": 8, "eval": n}
  amp.run(problem, str(tmp_path), "other-fingerprint", allowed_drop=1.0, log=quiet)
  assert counter["phase1"] == 16  # a new fingerprint recomputes


# --------------------------------------------------------------------------------------------
# The driver, on the MLP: labels are the float model's predictions (float top-1 = 100%).


def _driver_config(**layerwise):
  from configs import quickstart
  config = quickstart.get_config("smoke")
  config.layerwise.update(layerwise)
  return config


def _score_data(mlp):
  labels = np.argmax(np.asarray(mlp.model.apply(mlp.variables, mlp.x)), -1).astype(np.int32)
  return [{"image": mlp.x[:32], "label": labels[:32]}, {"image": mlp.x[32:], "label": labels[32:]}]


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
  # Another allowed drop reuses phases 1-2 (nothing new evaluated). No drop at all is out of
  # reach even for the all-W8A8 baseline: it is chosen, and the target is reported missed.
  strict = driver.layerwise_search(config, str(tmp_path), float_model, calibration, [mlp.x], allowed_drop=0.0,
                                   score_data=score_data)
  assert strict.summary["new_evaluations"] == 0 and strict.summary["sensitivity"] == s["sensitivity"]
  assert strict.summary["chosen_index"] == 0 and not strict.summary["target_met"]
  assert strict.summary["chosen"]["score"] < 100.0 and strict.summary["chosen"]["relative_cost"] == 1.0
  assert strict.weight_bits.tolist() == strict.act_bits.tolist() == [8] * len(mlp.plan.quantized)


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
