"""The side-by-side's AIMET path on a tiny model: a changed aimet-torch call fails here."""

import numpy as np

from experiments import aimet_side_by_side as sbs


def test_aimet_path_runs_on_a_tiny_model():
  import torch
  torch.manual_seed(0)
  SmallCNN, _ = sbs.torch_models()
  model = SmallCNN().eval()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(48, 28, 28, 1)).astype(np.float32)
  with torch.no_grad():  # labels: the float model's own predictions (float top-1 = 100%)
    y = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).argmax(-1).numpy()
  calib = [x[:16], x[16:32]]
  score = test = (x[32:], y[32:])
  # A drop no uniform candidate meets alone keeps AIMET in its phases; 100 points: its early exit.
  for drop, ran in ((100.0, False), (None, True)):
    r = sbs.run_aimet(model, calib, x[:16], score, test, drop if drop is not None else 0.0, ("fc",))
    assert r["float_score"] == 100.0 and set(r["uniform_scores"]) == {"W8A8", "W4A8", "W4A4"}
    assert set(r["chosen"]) == {"c0", "c1", "c2", "fc"}  # one group per layer: one reader per tensor
    if ran:
      # AIMET's phase 2 is the paper's phases 2 and 3 (the search evaluates Pareto points lazily).
      assert (r["phases_run"] == [] and r["early_exit"] == "baseline_misses_target"
              or r["phases_run"] == [1, 2, 3] and r["pareto_points_evaluated"] >= 1)
      assert r["convert_op_reduction"] is False
    else:
      assert r["early_exit"] == "lowest_within_drop" and set(r["chosen"].values()) == {"W4A4"}
    assert 0.0 <= r["test_top1"] <= 100.0 and r["seconds"]["baseline"] > 0


def test_weight_grid_check_on_a_tiny_model():
  import torch
  torch.manual_seed(0)
  SmallCNN, _ = sbs.torch_models()
  tmodel = SmallCNN().eval()
  model, variables = sbs.flax_twin("small_cnn", tmodel)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(sbs.SCORE_BATCH, 28, 28, 1)).astype(np.float32)
  y = np.argmax(np.asarray(model.apply(variables, x)), -1)  # the float model's own predictions
  g = sbs.weight_grid_check(model, variables, [x[:32]], (x, y))
  assert g["float"] == 100.0 and set(g["layers"]) == {"c0", "c1", "c2", "fc", "all"}
  k = np.asarray(variables["params"]["c0"]["kernel"]).reshape(-1, 16)
  assert g["layers"]["c0"]["negative_max_channels"] == int((-k.min(0) > k.max(0)).sum())
  assert g["layers"]["c0"]["weights_per_channel"] == 9 and g["layers"]["all"]["channels"] == 16 + 32 + 32 + 10
  for r in list(g["layers"].values()) + [g["all_with_activations"]]:
    assert all(0.0 <= v <= 100.0 for v in (r["flexiq_jax"], r["aimet"]))
