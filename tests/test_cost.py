import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from flexiq_jax import cost
from flexiq_jax import inspect_model
from flexiq_jax import models


class Tiny(nn.Module):
  """Hand-countable: conv 3x3 (3->8) on 8x8, depthwise 3x3 stride 2, grouped 1x1, tokens dense."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x)          # 8*8 * 3*8*9
    x = nn.BatchNorm(use_running_average=True, name="bn")(x)
    x = nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=8, name="dw")(x)  # 4*4 * 8*9
    x = nn.Conv(4, (1, 1), feature_group_count=2, name="grouped")(x)          # 4*4 * 8*4/2
    x = x.reshape(x.shape[0], 16, 4)                                          # 16 tokens
    x = nn.DenseGeneral((2, 3), name="qkv_like")(x)                           # 16 * 4*6
    x = nn.DenseGeneral(5, axis=(-2, -1), name="proj")(x)                     # 16 * 6*5
    return nn.Dense(10, name="head")(x.mean(1))                               # 5*10


def test_macs_against_hand_count():
  model = Tiny()
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  layers, bn_pairs = inspect_model.trace_layers(model, v, inspect_model.sample_input((8, 8, 3)))
  expected = {"conv": 64 * 3 * 8 * 9, "dw": 16 * 8 * 9, "grouped": 16 * 8 * 4 // 2,
              "qkv_like": 16 * 4 * 6, "proj": 16 * 6 * 5, "head": 5 * 10}
  assert {p: i.macs for p, i in layers.items()} == expected
  assert list(layers) == list(expected)  # call order
  assert layers["dw"].groups == 8 and layers["dw"].in_channels == 8
  assert layers["proj"].in_channels == 6 and layers["qkv_like"].out_channels == 6
  assert bn_pairs == {"bn": "conv"}
  assert cost.total_macs(layers) == sum(expected.values())


def test_bops_and_relative_bops():
  model = Tiny()
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  layers, _ = inspect_model.trace_layers(model, v, inspect_model.sample_input((8, 8, 3)))
  total = cost.total_macs(layers)
  assert cost.layerwise_bops(layers, {}) == 64 * total
  assert cost.layerwise_bops(layers, {"conv": (4, 4)}) == 64 * total - 48 * layers["conv"].macs
  all_low = {p: i.in_channels for p, i in layers.items()}
  assert cost.relative_bops(layers, all_low) == pytest.approx(0.25)
  assert cost.relative_bops(layers, {}) == 1.0
  half_conv = {"conv": 1.5}  # half of 3 channels
  assert cost.low_bit_mac_share(layers, half_conv) == pytest.approx(0.5 * layers["conv"].macs / total)
  with pytest.raises(ValueError, match="out of 3"):
    cost.channelwise_bops(layers, {"conv": 4})


def test_resnet18_macs_match_the_known_count():
  model = models.create("resnet18", num_classes=1000)
  shape = inspect_model.sample_input((224, 224, 3))
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape.shape)))
  layers, bn_pairs = inspect_model.trace_layers(model, v, shape)
  # ResNet-18 at 224: 1.814 GMACs (conv + fc), the figure every paper quotes as 1.8 GFLOPs.
  assert cost.total_macs(layers) == pytest.approx(1.814e9, rel=2e-3)
  assert len(layers) == 21 and len(bn_pairs) == 20  # every conv but none of fc is followed by BN
