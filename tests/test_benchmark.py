"""The integer-path benchmark's bookkeeping (its timings are never asserted)."""

import dataclasses

import jax
import jax.numpy as jnp

from benchmarks import integer_path
from flexiq_jax import models
from flexiq_jax import quantize


def test_resume_measures_again_an_entry_of_an_earlier_variant():
  """--resume keeps an entry only if its layers have the MACs of the model as built now: an entry
  from when the model ran at twice the output positions (a stride-1 stem) is measured again, as is
  one without layer records."""
  net = models.create("resnet_small", num_classes=10)
  variables = jax.jit(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False))()
  plan = quantize.build_plan(net, variables, (28, 28, 1))
  layers = {p: dataclasses.asdict(plan.layers[p]) for p in plan.quantized}
  earlier = {p: {**l, "output_shape": [1, 2 * l["output_shape"][1]] + list(l["output_shape"][2:])}
             for p, l in layers.items()}
  assert integer_path.measured_on_this_variant({"plan_layers": layers}, plan)
  assert not integer_path.measured_on_this_variant({"plan_layers": earlier}, plan)
  assert not integer_path.measured_on_this_variant({}, plan)
