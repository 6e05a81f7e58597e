"""flexiq_jax.calibrate: the streamed statistics of every quantized layer's input (ranges, scales,
code histograms), the fitted 4-bit extraction positions against naive extraction, and the
percentile / MSE activation ranges."""

import numpy as np
import pytest

from flexiq_jax import calibrate, interception, numerics
from flexiq_jax.calibrate import statistics
from flexiq_jax.interception import get_path
from flexiq_jax import layer_ops

import smallnet

CANDIDATES = statistics.EXTRACTION_CANDIDATES


@pytest.fixture(scope="module")
def setup():
  return smallnet.make_setup()


class _Inputs:
  """Float provider keeping every quantized layer's input as (N, C)."""

  def __init__(self):
    self.x = {}

  def layer(self, call, x):
    self.x[call.path] = interception.flat_features(call.info, x)
    return call.float_forward(x)


def _layer_inputs(model, plan, folded, images):
  provider = _Inputs()
  interception.run_with_provider(model, plan, folded, images, provider)
  return {p: np.asarray(x) for p, x in provider.x.items()}


def test_calibration_statistics_match_the_layer_inputs(setup):
  """Ranges merged over two batches are those of all the images; min-max scales are |x|max/qmax;
  mean codes are those of the 8-bit codes at that scale."""
  model, plan, folded, calib, images = setup.model, setup.plan, setup.folded, setup.calib, setup.images
  inputs = _layer_inputs(model, plan, folded, images)
  assert set(calib) == set(plan.quantized)
  for p in plan.quantized:
    x, c, s = inputs[p], calib[p], plan.layers[p].in_channels
    assert x.shape[1] == s
    np.testing.assert_allclose(c["ch_min"], x.min(0), rtol=1e-5, atol=1e-6, err_msg=p)
    np.testing.assert_allclose(c["ch_max"], x.max(0), rtol=1e-5, atol=1e-6, err_msg=p)
    signed = bool(x.min() < 0)
    qmin, qmax = numerics.int_range(8, signed)
    assert c["act_scale"] == pytest.approx(np.abs(x).max() / qmax, rel=1e-5), p
    codes = np.clip(np.round(x / c["act_scale"]), qmin, qmax)
    np.testing.assert_allclose(c["act_mean_code"], codes.mean(0), rtol=1e-4, atol=1e-3, err_msg=p)
    low = np.asarray(numerics.lower_codes(codes, c["act_e"], signed=signed))
    np.testing.assert_allclose(c["act_mean_lowered"], low.mean(0), rtol=1e-4, atol=1e-3, err_msg=p)
    err = ((codes - low) ** 2).mean(0) * c["act_scale"] ** 2
    np.testing.assert_allclose(c["act_lowering_error"], err, rtol=1e-4, atol=1e-9, err_msg=p)
    for name in ("act_e", "weight_e"):
      assert c[name].shape == (s,) and c[name].dtype == np.int32
      assert set(np.unique(c[name])) <= set(CANDIDATES)
  signed_plan = plan.with_signedness(calib)
  assert signed_plan.signed["stem"] and not signed_plan.signed["grouped"]  # raw input vs after ReLU


def test_negative_inputs_are_counted_and_decide_signedness(setup):
  """Calibration counts each layer input's negative values; a layer that saw any is signed, and
  the plan records the count and fraction (plan.json 'input_negatives') and says how many are
  unsigned."""
  model, plan, folded, calib, images = setup.model, setup.plan, setup.folded, setup.calib, setup.images
  inputs = _layer_inputs(model, plan, folded, images)
  for p in plan.quantized:
    x = inputs[p]
    np.testing.assert_array_equal(calib[p]["negative_count"], (x < 0).sum(0), err_msg=p)
    assert calib[p]["negative_count"].dtype == np.int32 and int(calib[p]["input_rows"]) == x.shape[0]
    evidence = plan.input_negatives[p]
    assert evidence["negative_count"] == int((x < 0).sum()) and evidence["values"] == x.size
    assert evidence["negative_fraction"] == pytest.approx((x < 0).mean())
    assert plan.signed[p] == (evidence["negative_count"] > 0), p
  # The raw image input of the stem has negatives (about half); after ReLU there are none.
  assert plan.signed["stem"] and 0.3 < plan.input_negatives["stem"]["negative_fraction"] < 0.7
  assert not plan.signed["grouped"] and plan.input_negatives["grouped"]["negative_count"] == 0
  unsigned = sum(not plan.signed[p] for p in plan.quantized)
  assert plan.signedness_summary().startswith(f"{unsigned} of {len(plan.quantized)} quantized layers have unsigned inputs")
  # Statistics without counts (written before they existed): the minimum decides alone.
  old = {p: {k: v for k, v in calib[p].items() if k not in ("negative_count", "input_rows")} for p in plan.quantized}
  old_plan = plan.with_signedness(old)
  assert old_plan.signed == plan.signed and old_plan.input_negatives == {}


def test_weight_extraction_is_the_per_channel_argmin(setup):
  """Brute force over the candidates on the weight codes of a dense and a grouped conv layer."""
  plan, folded, calib = setup.plan, setup.folded, setup.calib
  for p in ("fc1", "grouped"):
    info = plan.layers[p]
    kernel = get_path(folded["params"], p)["kernel"]
    w = np.asarray(interception.kernel_matrix(info, kernel))
    s_w = np.abs(w.reshape(-1, w.shape[-1])).max(0) / 127
    q = np.clip(np.round(w / s_w), -127, 127)
    index = np.broadcast_to(layer_ops.weight_channel_index(info), q.shape)
    errors = np.zeros((len(CANDIDATES), info.in_channels))
    for k, f in enumerate(CANDIDATES):
      per_elem = (q - np.asarray(numerics.lower_codes(q, f, signed=True))) ** 2 * s_w ** 2
      np.add.at(errors[k], index.reshape(-1), per_elem.reshape(-1))
    f, err = calibrate.weight_extraction(info, kernel)
    np.testing.assert_allclose(err, errors.min(0), rtol=1e-5, atol=1e-12, err_msg=p)
    np.testing.assert_allclose(errors[np.asarray(f), np.arange(info.in_channels)], errors.min(0),  # candidates are 0..4
                               rtol=1e-5, atol=1e-12, err_msg=p)
    np.testing.assert_array_equal(calib[p]["weight_e"], f)
    np.testing.assert_allclose(calib[p]["weight_lowering_error"], err, rtol=1e-6)


def test_fitted_extraction_beats_naive_on_calibration_data(setup):
  model, plan, folded, calib, images = setup.model, setup.plan, setup.folded, setup.calib, setup.images
  naive = calibrate.calibrate(model, plan, folded, [images[:16], images[16:]], extraction="naive")
  for p in plan.quantized:
    assert np.all(naive[p]["act_e"] == 4)
    assert np.all(naive[p]["weight_e"] == 4)
    assert np.all(calib[p]["act_lowering_error"] <= naive[p]["act_lowering_error"] * (1 + 1e-5) + 1e-12)
    assert np.all(calib[p]["weight_lowering_error"] <= naive[p]["weight_lowering_error"] * (1 + 1e-5) + 1e-12)
  assert sum(calib[p]["act_lowering_error"].sum() for p in plan.quantized) < \
      sum(naive[p]["act_lowering_error"].sum() for p in plan.quantized)


def test_unknown_calibration_options_are_errors(setup):
  model, plan, folded = setup.model, setup.plan, setup.folded
  with pytest.raises(ValueError, match="'minmax', 'percentile' or 'mse'"):
    calibrate.calibrate(model, plan, folded, [], method="kl")
  with pytest.raises(ValueError, match="'fitted' or 'naive'"):
    calibrate.calibrate(model, plan, folded, [], extraction="best")
  with pytest.raises(ValueError, match="no batches"):
    calibrate.calibrate(model, plan, folded, [])


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_percentile_and_mse_clip_tighter_than_minmax(setup, method):
  model, plan, folded, calib, images = setup.model, setup.plan, setup.folded, setup.calib, setup.images
  other = calibrate.calibrate(model, plan, folded, [images], method=method, percentile=99.0)
  for p in plan.quantized:
    assert 0 < other[p]["act_scale"] <= calib[p]["act_scale"] * (1 + 1e-6)
  if method == "percentile":
    # The 99th percentile of |x| clips below the maximum wherever the input is not constant.
    assert any(other[p]["act_scale"] < calib[p]["act_scale"] * (1 - 1e-3) for p in plan.quantized)
    # Ranges (and so signedness) do not depend on the method (to float rounding: the two passes are
    # compiled with different statistics, so XLA may fuse the layers' sums differently).
    for p in plan.quantized:
      np.testing.assert_allclose(other[p]["ch_min"], calib[p]["ch_min"], rtol=1e-6, atol=0)
      np.testing.assert_array_equal(np.sign(other[p]["ch_min"]), np.sign(calib[p]["ch_min"]))


def test_collect_merges_batches(setup):
  """Histograms add over batches: the code histogram of two halves is that of the whole."""
  model, plan, folded, calib, images = setup.model, setup.plan, setup.folded, setup.calib, setup.images
  scales = {p: float(calib[p]["act_scale"]) for p in plan.quantized}
  signed = plan.with_signedness(calib).signed
  stats = calibrate.CodeHistograms(scales, signed)
  halves = calibrate.collect(model, plan, folded, [images[:16], images[16:]], stats)
  whole = calibrate.collect(model, plan, folded, [images], stats)
  for p in plan.quantized:
    np.testing.assert_array_equal(halves[p]["codes"], whole[p]["codes"])
    counts = np.asarray(whole[p]["codes"]).sum(1)
    assert np.all(counts == counts[0])  # every channel sees every position
