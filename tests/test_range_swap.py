"""experiments/range_swap.py: one layer's ranges swapped, the others kept; the diagnosis finds the
layer whose range breaks the model."""

import jax.numpy as jnp
import numpy as np

from experiments import range_swap


def _tables():
  base = {"a": {"act_clip": jnp.full(17, 1.0), "weight_clip": jnp.ones((17, 2))},
          "b": {"act_clip": jnp.full(17, 2.0), "act_zero": jnp.full(17, 3.0), "weight_clip": jnp.ones((17, 2))}}
  other = {"a": {"act_clip": jnp.full(17, 5.0), "weight_clip": jnp.full((17, 2), 7.0)},
           "b": {"act_clip": jnp.full(17, 6.0), "act_zero": jnp.full(17, 4.0), "weight_clip": jnp.full((17, 2), 8.0)}}
  return base, other


def test_swap_one_changes_only_that_layer_and_part():
  base, other = _tables()
  t = range_swap.swap_one(base, other, "b", "act")
  assert float(t["b"]["act_clip"][4]) == 6.0 and float(t["b"]["act_zero"][4]) == 4.0
  assert float(t["b"]["weight_clip"][4, 0]) == 1.0 and t["a"] is base["a"]
  t = range_swap.swap_one(base, other, "a", "weight")
  assert float(t["a"]["weight_clip"][4, 1]) == 7.0 and float(t["a"]["act_clip"][4]) == 1.0
  assert float(base["a"]["weight_clip"][4, 1]) == 1.0  # the inputs are not changed


def test_diagnose_ranks_the_breaking_layer_first():
  base, other = _tables()

  def metrics(tables):  # a model that fails while layer b's activation clip is narrow
    ok = float(tables["b"]["act_clip"][4]) > 3.0
    return {"top1": 90.0 if ok else 50.0, "kl": 0.1 if ok else 1.0}

  res = range_swap.diagnose(metrics, ["a", "b"], base, other)
  assert res["base"]["top1"] == 50.0 and res["swap"]["top1"] == 90.0
  assert [r["layer"] for r in res["layers"]] == ["b", "a"]
  assert res["layers"][0]["act"]["top1"] == 90.0 and res["layers"][0]["weight"]["top1"] == 50.0
  md = range_swap.render("t", {"command": "c", "commit": "x", "device": "cpu", "date": "d"}, res,
                         {"a": (1.0, 5.0), "b": (2.0, 6.0)}, "mse", "minmax", 8)
  assert "| b | 2 / 6 | 90.00 |" in md and np.isfinite(res["layers"][1]["act"]["kl"])
