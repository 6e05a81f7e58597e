"""A small conv net that exercises every layer kind the quantizer handles (signed and unsigned
inputs, 3x3/stride-2 padding, depthwise, grouped and dense layers, folded BatchNorms), calibrated
once for the calibrate and quantize tests."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax import calibrate, quantize


class SmallNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="stem")(x)  # signed input
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
    x = nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=8, name="dw")(x)
    x = nn.relu(x)
    x = nn.Conv(16, (1, 1), feature_group_count=2, name="grouped")(x)  # unsigned input (after ReLU)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="grouped_bn")(x))
    x = nn.Conv(16, (3, 3), padding="SAME", name="conv")(x)
    x = x.mean(axis=(1, 2))
    x = nn.Dense(12, name="fc1")(x)
    return nn.Dense(5, name="head")(nn.gelu(x))


class SiluNet(nn.Module):
  """Inputs with a short negative side (after SiLU and GELU) into padded, strided, depthwise and
  dense layers, beside a signed stem input and a ReLU one. `bounded_dw`: the input of the depthwise
  layer is a SiLU of a bounded value (2·tanh) rather than of a long positive tail."""

  bounded_dw: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), padding="SAME", name="stem")(x)
    x = nn.silu(3.0 * x)
    x = nn.Conv(8, (3, 3), strides=2, padding="SAME", name="conv")(x)
    x = nn.silu(2.0 * jnp.tanh(x)) if self.bounded_dw else nn.silu(3.0 * x)
    x = nn.Conv(8, (3, 3), padding="SAME", feature_group_count=8, name="dw")(x)
    x = nn.relu(x)
    x = nn.Conv(12, (1, 1), name="pw")(x)
    x = nn.gelu(3.0 * x.mean(axis=(1, 2)))
    x = nn.Dense(16, name="fc")(x)
    return nn.Dense(5, name="head")(nn.gelu(3.0 * x))


@dataclasses.dataclass(frozen=True)
class Setup:
  model: nn.Module
  variables: dict  # with non-trivial BatchNorm statistics, so that folding is really tested
  plan: quantize.QuantPlan  # with signedness
  folded: dict
  calib: dict  # calibration statistics on `images`
  qvars: dict  # levels (0.5, 1.0): half of each lowerable layer's channels, then all, range order
  images: jax.Array  # (32, 10, 10, 3)


def make_setup() -> Setup:
  model = SmallNet()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(32, 10, 10, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), images[:1])
  stats = {name: {"mean": jnp.asarray(rng.normal(0, 0.05, s["mean"].shape), jnp.float32),
                  "var": jnp.asarray(rng.uniform(0.5, 1.5, s["var"].shape), jnp.float32)}
           for name, s in variables["batch_stats"].items()}
  variables = {"params": variables["params"], "batch_stats": stats}
  plan = quantize.build_plan(model, variables, (10, 10, 3))
  folded = quantize.fold_batchnorm(variables, plan)
  calib = calibrate.calibrate(model, plan, folded, [images[:16], images[16:]])
  plan = plan.with_signedness(calib)
  orders = {p: np.argsort(np.maximum(-calib[p]["ch_min"], calib[p]["ch_max"]), kind="stable")
            for p in plan.lowerable}
  counts = {p: np.array([plan.layers[p].in_channels // 2, plan.layers[p].in_channels]) for p in plan.lowerable}
  qvars = quantize.build_qvars(plan, folded, calib, orders, counts, [0.5, 1.0])
  return Setup(model, variables, plan, folded, calib, qvars, images)
