"""Layer-wise mixed precision: phase-1 ordering, Pareto monotonicity, phase-3 searches, caching."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexiq_jax import calibrate as calibrate_lib
from flexiq_jax import cost
from flexiq_jax import quantize
from flexiq_jax.layerwise import amp
from flexiq_jax.layerwise import apply as apply_lib
from flexiq_jax.layerwise import candidates as cand_lib
from flexiq_jax.layerwise import search as search_lib


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16, name="fc0")(x))
    x = nn.relu(nn.Dense(16, name="fc1")(x))
    x = nn.relu(nn.Dense(16, name="fc2")(x))
    return nn.Dense(4, name="head")(x)


@pytest.fixture(scope="module")
def mlp():
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
  return model, variables, plan, calib, x


def _layer_problem(mlp, cands, counter):
  model, variables, plan, calib, x = mlp
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
  model, variables, plan, calib, x = mlp
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
  model, variables, plan, calib, x = mlp
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
