"""flexiq_jax.cost: MACs, BOPs (layer-wise and channel-wise, attention matmuls at 8 bits), MAC
shares and the BOPs latency model, checked against counts done by hand. (How `interception.trace` fills LayerInfo is tested
in test_interception.py.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexiq_jax import cost
from flexiq_jax import interception
from flexiq_jax import models
from flexiq_jax.interception import LayerInfo, MatmulInfo


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


# MACs per example of Tiny's layers, counted by hand.
TINY_MACS = {"conv": 64 * 3 * 8 * 9, "dw": 16 * 8 * 9, "grouped": 16 * 8 * 4 // 2,
             "qkv_like": 16 * 4 * 6, "proj": 16 * 6 * 5, "head": 5 * 10}
TINY_TOTAL = 13824 + 1152 + 256 + 384 + 480 + 50  # = 16146


@pytest.fixture(scope="module")
def tiny_layers():
  model = Tiny()
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  traced = interception.trace(model, v, (8, 8, 3))
  assert traced.foldable_bn == {"bn": "conv"}
  return traced.layers


def test_total_macs_against_hand_count(tiny_layers):
  assert {p: i.macs for p, i in tiny_layers.items()} == TINY_MACS
  assert list(tiny_layers) == list(TINY_MACS)  # call order
  assert cost.total_macs(tiny_layers) == sum(TINY_MACS.values()) == TINY_TOTAL


def test_bops_and_relative_bops(tiny_layers):
  layers = tiny_layers
  total = cost.total_macs(layers)
  assert cost.layerwise_bops(layers, {}) == 64 * total
  assert cost.layerwise_bops(layers, {"conv": (4, 4)}) == 64 * total - 48 * layers["conv"].macs
  assert cost.layerwise_bops(layers, {"head": (32, 32)}, default=(4, 8)) == 32 * (total - 50) + 1024 * 50
  all_low = {p: i.in_channels for p, i in layers.items()}
  assert cost.relative_bops(layers, all_low) == pytest.approx(0.25)
  assert cost.relative_bops(layers, all_low, high=8, low=2) == pytest.approx(4 / 64)
  # Nothing lowered: every MAC at 8 x 8 bits.
  assert cost.channelwise_bops(layers, {}) == 64 * TINY_TOTAL
  # One of conv's 3 input channels (4608 of its 13824 MACs) and all 6 of proj's (480 MACs) at 4 x 4:
  # (4608 * 16 + 480 * 16 + (16146 - 4608 - 480) * 64) / (16146 * 64), by hand.
  lowered = {"conv": 1, "proj": 6}
  assert cost.channelwise_bops(layers, lowered) == 4608 * 16 + 480 * 16 + (16146 - 4608 - 480) * 64
  assert cost.relative_bops(layers, lowered) == pytest.approx(789120 / 1033344)
  half_conv = {"conv": 1.5}  # half of 3 channels
  assert cost.low_bit_mac_share(layers, half_conv) == pytest.approx(0.5 * layers["conv"].macs / total)
  assert cost.low_bit_mac_share(layers, lowered) == pytest.approx((4608 + 480) / 16146)
  with pytest.raises(ValueError, match="out of 3"):
    cost.channelwise_bops(layers, {"conv": 4})
  with pytest.raises(ValueError, match="out of 3"):
    cost.channelwise_bops(layers, {"conv": -1})


def test_lowered_mac_share_and_macs_per_channel_by_hand():
  channels, macs = [4, 10], [400.0, 600.0]  # 100 and 60 MACs per channel
  np.testing.assert_array_equal(cost.macs_per_channel(channels, macs), [100.0, 60.0])
  assert cost.macs_per_channel(channels, macs).dtype == np.float64
  assert cost.lowered_mac_share([2, 5], channels, macs) == pytest.approx((200 + 300) / 1000)
  assert isinstance(cost.lowered_mac_share([2, 5], channels, macs), float)
  np.testing.assert_allclose(cost.lowered_mac_share([[0, 0], [4, 10], [1, 0]], channels, macs), [0.0, 1.0, 0.1])


def _dense(path, c, o, tokens=None):
  in_shape = (1, c) if tokens is None else (1, tokens, c)
  out_shape = (1, o) if tokens is None else (1, tokens, o)
  return LayerInfo(path, "dense", 0, c, o, 1, (c, o), in_shape, out_shape, 1)


def test_matmuls_count_at_8_bits_in_bops_and_share_by_hand(tiny_layers):
  """Two attention matmuls of heads·N·N·head_dim = 2·16·16·2 = 1024 MACs each (never lowered)."""
  layers = tiny_layers
  mm = {p: MatmulInfo(p, eq, i, (1, 16, 2, 2), (1, 16, 2, 2), out, k)
        for i, (p, eq, out, k) in enumerate((("qk", "bqhd,bkhd->bhqk", (1, 2, 16, 16), 2),
                                             ("av", "bhqk,bkhd->bqhd", (1, 16, 2, 2), 16)))}
  assert mm["qk"].macs == 2 * 16 * 16 * 2 == 1024 and mm["av"].macs == 16 * 2 * 2 * 16 == 1024
  assert cost.matmul_macs(mm) == 2048 and cost.matmul_macs(None) == 0
  assert cost.matmul_bops(mm) == 2048 * 64
  lowered = {"conv": 1, "proj": 6}  # 4608 + 480 MACs at 4 x 4 (test_bops_and_relative_bops)
  assert cost.channelwise_bops(layers, lowered, matmuls=mm) == cost.channelwise_bops(layers, lowered) + 2048 * 64
  assert cost.relative_bops(layers, lowered, matmuls=mm) == pytest.approx(
      (789120 + 2048 * 64) / ((16146 + 2048) * 64))
  assert cost.low_bit_mac_share(layers, lowered, mm) == pytest.approx((4608 + 480) / (16146 + 2048))
  assert cost.layerwise_bops(layers, {"conv": (4, 4)}, matmuls=mm) == 64 * (16146 + 2048) - 48 * 13824
  # Every channel lowered: the layers' MACs at 4 x 4 bits, the matmuls' still at 8 x 8.
  all_low = {p: i.in_channels for p, i in layers.items()}
  assert cost.relative_bops(layers, all_low, matmuls=mm) == pytest.approx(
      (16146 * 16 + 2048 * 64) / ((16146 + 2048) * 64))


def test_tables_and_lowered_count():
  layers = {"a": _dense("a", 4, 3), "b": _dense("b", 10, 2, tokens=5)}  # 12 and 100 MACs
  assert layers["b"].macs == 100 and cost.layer_bops(layers["b"], 4, 8) == 3200.0
  np.testing.assert_array_equal(cost.layerwise_bops_table(layers, [(8, 8), (4, 8), (32, 32)]),
                                [[768, 384, 12288], [6400, 3200, 102400]])
  assert [cost.lowered_count(layers["b"], r) for r in (0.0, 0.15, 0.3, 0.99, 1.0)] == [0, 1, 3, 9, 10]
  # floor(r x C) channels at 4 x 4: a at 0.5 lowers 2 of 4 channels (6 of 12 MACs).
  np.testing.assert_allclose(cost.channelwise_bops_table(layers, [0.0, 0.5, 1.0]),
                             [[768, 6 * 16 + 6 * 64, 192], [6400, 50 * 16 + 50 * 64, 1600]])
  # Rows follow the layers' order; other bit widths (8 -> 2); floor(0.3 x 4) = 1 of a's 4
  # channels (3 of 12 MACs) and floor(0.3 x 10) = 3 of b's 10 (30 of 100 MACs).
  np.testing.assert_allclose(cost.channelwise_bops_table({"b": layers["b"], "a": layers["a"]}, [0.3], low=2),
                             [[30 * 4 + 70 * 64], [3 * 4 + 9 * 64]])
  # ratio x C that float arithmetic puts just below an integer still lowers that many channels
  # (0.29 x 100 = 28.999999999999996, 0.57 x 100 = 56.99999999999999).
  hundred = _dense("c", 100, 1)
  assert [cost.lowered_count(hundred, r) for r in (0.29, 0.57, 0.999, 0.001)] == [29, 57, 99, 0]
  assert sum(cost.lowered_count(hundred, k / 100) == k for k in range(101)) == 101


def test_bops_latency_model():
  layers = {"a": _dense("a", 4, 3), "b": _dense("b", 10, 2, tokens=5)}
  rel = lambda r: cost.relative_bops(layers, {p: cost.lowered_count(i, r) for p, i in layers.items()})
  model = cost.BopsLatencyModel(2.0, rel, t_fixed=0.5)
  assert model(0.0) == pytest.approx(2.5)
  assert model(1.0) == pytest.approx(0.5 + 2.0 * 0.25)
  assert model(0.0) > model(0.5) > model(1.0)
  with pytest.raises(ValueError, match="t_8bit > 0"):
    cost.BopsLatencyModel(0.0, rel)
  with pytest.raises(ValueError, match="must not grow"):
    cost.BopsLatencyModel(1.0, lambda r: r)


def test_resnet18_macs_match_the_known_count():
  model = models.create("resnet18", num_classes=1000)
  shape = interception.sample_input((224, 224, 3))
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape.shape)))
  traced = interception.trace(model, v, (224, 224, 3))
  # ResNet-18 at 224: 1.814 GMACs (conv + fc), the figure every paper quotes as 1.8 GFLOPs.
  assert cost.total_macs(traced.layers) == pytest.approx(1.814e9, rel=2e-3)
  # every conv but none of fc is followed by BN
  assert len(traced.layers) == 21 and len(traced.foldable_bn) == 20


def test_recorded_macs_tell_a_stale_benchmark_entry_from_a_current_one():
  """Layers as a results file records them (JSON: lists for tuples) give the plan's MACs; the same
  layers at twice the output positions (an earlier variant, e.g. a stride-1 stem) do not."""
  import json
  from conftest import quickstart_plan_layers
  plan, layers, earlier = quickstart_plan_layers()
  assert cost.recorded_macs(json.loads(json.dumps(layers))) == cost.total_macs(plan.layer_infos()) > 0
  assert cost.recorded_macs(json.loads(json.dumps(earlier))) > 1.9 * cost.total_macs(plan.layer_infos())
  assert cost.recorded_macs({}) == 0
