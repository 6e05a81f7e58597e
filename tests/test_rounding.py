"""finetune.rounding: the 8-bit code placed in a 4-bit code's extraction bin, and the learnt 4-bit
rounding of a small net keeping its scales, the extraction contract and a lower reconstruction
error than rounding to nearest."""

import dataclasses
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from flexiq_jax import layer_ops
from flexiq_jax import numerics
from flexiq_jax import quantize
from flexiq_jax.finetune import rounding
from flexiq_jax.interception import get_path, kernel_matrix
from flexiq_jax.numerics.adaround import AdaRoundSettings

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import smallnet  # noqa: E402


@pytest.mark.parametrize("qmax", [127.0, 112.0, 100.0])
@pytest.mark.parametrize("e", [0, 1, 3, 4])
def test_code_in_bin_extracts_to_the_chosen_code_and_keeps_agreeing_codes(qmax, e):
  q8 = jnp.arange(-qmax, qmax + 1)
  lo, hi = rounding.reachable_codes(qmax, e)
  for q4 in range(int(lo), int(hi) + 1):
    placed = rounding.code_in_bin(q8, jnp.full_like(q8, q4), e, qmax)
    assert bool(jnp.all(jnp.abs(placed) <= qmax))
    np.testing.assert_array_equal(numerics.lower_codes(placed, e, signed=True), q4 * 2 ** e)
    agrees = numerics.lower_codes(q8, e, signed=True) == q4 * 2 ** e
    np.testing.assert_array_equal(placed[agrees], q8[agrees])
    # Elsewhere the nearest code of the bin: no code of the bin is closer to q8.
    members = q8[numerics.lower_codes(q8, e, signed=True) == q4 * 2 ** e]
    best = jnp.min(jnp.abs(q8[:, None] - members[None, :]), axis=1)
    np.testing.assert_array_equal(jnp.abs(placed - q8), best)


@pytest.fixture(scope="module")
def rounded():
  s = smallnet.make_setup()
  qmodel = quantize.QuantizedModel(s.model, s.plan, mode="fake")
  qvars, report = rounding.round_extraction(qmodel, s.qvars, s.images, AdaRoundSettings(iterations=100))
  return s, qmodel, qvars, report


def test_learnt_rounding_keeps_the_scales_and_lowers_the_layer_error(rounded):
  s, _, qvars, report = rounded
  assert set(report) == set(s.plan.lowerable)
  for path in s.plan.lowerable:
    info, lq = s.plan.layers[path], get_path(s.qvars["quant"], path)
    before = kernel_matrix(info, get_path(s.qvars["params"], path)["kernel"])
    after = kernel_matrix(info, get_path(qvars["params"], path)["kernel"])
    qmax = layer_ops.weight_qmax(lq)
    scale = numerics.per_channel_weight_scale(before, qmax)
    np.testing.assert_allclose(numerics.per_channel_weight_scale(after, qmax), scale, rtol=1e-6)
    codes = after / scale
    np.testing.assert_allclose(codes, jnp.round(codes), atol=1e-3)  # on the 8-bit grid
    assert 0 < report[path]["flipped_share"] < 0.5
    assert report[path]["mse_rounded"][0] < report[path]["mse_nearest"][0]


def test_learnt_rounding_moves_8bit_codes_only_where_the_4bit_code_changed(rounded):
  s, _, qvars, _ = rounded
  for path in s.plan.lowerable:
    info, lq = s.plan.layers[path], get_path(s.qvars["quant"], path)
    before = kernel_matrix(info, get_path(s.qvars["params"], path)["kernel"])
    after = kernel_matrix(info, get_path(qvars["params"], path)["kernel"])
    scale = numerics.per_channel_weight_scale(before, layer_ops.weight_qmax(lq))
    q0, q1 = jnp.round(before / scale), jnp.round(after / scale)
    e = layer_ops.gather_channel(lq["weight_e"], info)
    low0, low1 = numerics.lower_codes(q0, e, signed=True), numerics.lower_codes(q1, e, signed=True)
    assert bool(jnp.all((q0 == q1) | (low0 != low1)))
    # A moved code is at most half a 4-bit step (2^(e-1)) plus one code from where it was.
    assert bool(jnp.all(jnp.abs(q1 - q0) <= jnp.exp2(e.astype(jnp.float32) - 1) + 1))


def test_learnt_rounding_lowers_the_output_error_at_ratio_1(rounded):
  s, qmodel, qvars, _ = rounded
  reference = s.model.apply(s.variables, s.images)
  error = lambda v: float(jnp.mean((qmodel.apply(v, s.images, 1.0) - reference) ** 2))
  assert error(qvars) < error(s.qvars)


@pytest.mark.parametrize("name", ["vit_s", "swin_t"])
def test_learnt_rounding_runs_on_transformer_dense_layers(name):
  """Token-shaped inputs (B, T, C) and multi-axis outputs (the qkv DenseGeneral): every lowerable
  layer is rounded (or keeps nearest where its learnt rounding reconstructs worse: never a worse
  layer), keeps its scales, and most layers gain."""
  import test_attention  # the tiny ViT and Swin with their quantized variables
  tiny = test_attention.make_tiny(name)
  qmodel = dataclasses.replace(tiny.qmodel, mode="fake")
  qvars, report = rounding.round_extraction(qmodel, tiny.qvars, tiny.images, AdaRoundSettings(iterations=30))
  assert set(report) == set(tiny.plan.lowerable) and report
  assert sum(r["mse_rounded"][0] < r["mse_nearest"][0] for r in report.values()) > len(report) / 2
  for path, r in report.items():
    assert r["mse_rounded"][0] <= r["mse_nearest"][0], path
    assert not r["kept_nearest"] or r["flipped_share"] == 0  # a layer that kept nearest flipped nothing
    info, lq = tiny.plan.layers[path], get_path(tiny.qvars["quant"], path)
    before = kernel_matrix(info, get_path(tiny.qvars["params"], path)["kernel"])
    after = kernel_matrix(info, get_path(qvars["params"], path)["kernel"])
    qmax = layer_ops.weight_qmax(lq)
    np.testing.assert_allclose(numerics.per_channel_weight_scale(after, qmax),
                               numerics.per_channel_weight_scale(before, qmax), rtol=1e-6)


def test_joint_rounding_reconstructs_every_ratio_it_is_given():
  """With ratios (0, 0.5, 1) each layer reports an error per ratio, and the kept rounding's mean
  error over them is never above nearest's (a layer whose learnt rounding is worse keeps nearest)."""
  s = smallnet.make_setup()
  qmodel = quantize.QuantizedModel(s.model, s.plan, mode="fake")
  _, report = rounding.round_extraction(qmodel, s.qvars, s.images, AdaRoundSettings(iterations=60),
                                        ratios=(0.0, 0.5, 1.0))
  for path, r in report.items():
    assert len(r["mse_nearest"]) == len(r["mse_rounded"]) == 3
    assert r["mse_nearest"][0] < r["mse_nearest"][1] < r["mse_nearest"][2], path  # more lowered, more error
    assert np.mean(r["mse_rounded"]) <= np.mean(r["mse_nearest"]), path
