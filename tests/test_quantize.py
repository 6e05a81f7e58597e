"""FlexiQ core: folding, the integer path against fake quant, run-time ratio, no recompilation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexiq_jax import calibrate, inspect_model, quantize
from flexiq_jax.quantize import layer_ops


class SmallNet(nn.Module):
  """Covers signed and unsigned inputs, 3x3/stride-2 padding, depthwise, grouped and dense layers."""

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


@pytest.fixture(scope="module")
def setup():
  model = SmallNet()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(32, 10, 10, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), images[:1])
  # Non-trivial BatchNorm statistics so folding is really tested.
  stats = {name: {"mean": jnp.asarray(rng.normal(0, 0.05, s["mean"].shape), jnp.float32),
                  "var": jnp.asarray(rng.uniform(0.5, 1.5, s["var"].shape), jnp.float32)}
           for name, s in variables["batch_stats"].items()}
  variables = {"params": variables["params"], "batch_stats": stats}
  plan = quantize.build_plan(model, variables, (10, 10, 3))
  folded = quantize.fold_batchnorm(variables, plan, quantize.bn_epsilons(model, variables, plan, (10, 10, 3)).get)
  calib = calibrate.calibrate(model, plan, folded, [images[:16], images[16:]])
  orders = {p: np.argsort(np.maximum(-calib[p]["ch_min"], calib[p]["ch_max"]), kind="stable")
            for p in plan.eligible}
  levels = [0.5, 1.0]
  counts = {p: np.array([plan.layers[p].in_channels // 2, plan.layers[p].in_channels]) for p in plan.eligible}
  qvars = quantize.build_qvars(plan, folded, calib, orders, counts, levels)
  return model, variables, plan, folded, calib, qvars, images


def test_plan_keeps_first_and_last_8bit_and_folds_bn(setup):
  model, variables, plan, folded, calib, qvars, images = setup
  assert plan.quantized == ["stem", "dw", "grouped", "conv", "fc1", "head"]
  assert plan.eligible == ["dw", "grouped", "conv", "fc1"]
  assert plan.folded_bn == {"stem_bn": "stem", "grouped_bn": "grouped"}
  assert plan.signed["stem"] and not plan.signed["grouped"]  # raw input vs after ReLU


def test_unmatched_rule_is_reported(setup):
  model, variables, *_ = setup
  plan = quantize.build_plan(model, variables, (10, 10, 3), keep_8bit=("first", "no_such_layer"))
  assert plan.unmatched_rules == ["no_such_layer"]


def test_folded_model_equals_original(setup):
  model, variables, plan, folded, calib, qvars, images = setup
  ref = model.apply(variables, images, train=False)
  assert float(jnp.std(ref)) > 1e-3  # a live network, not one whose ReLUs are all off
  out = quantize.apply_with_layers(model, plan, folded, images, layer_ops.float_forward)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_int8_path_matches_fake_quant_and_is_really_int8(setup):
  model, variables, plan, folded, calib, qvars, images = setup
  int_model = quantize.QuantizedModel(model, plan, mode="int")
  fake_model = int_model.with_mode("fake")
  for ratio in (0.0, 0.5, 1.0):
    a = int_model.apply(qvars, images, ratio)
    b = fake_model.apply(qvars, images, ratio)
    np.testing.assert_allclose(a, b, atol=2e-3 * float(jnp.abs(b).max()))
  closed = jax.make_jaxpr(lambda q, x: int_model.apply(q, x, 0.5))(qvars, images[:2])
  ops = [(e.primitive.name, [str(v.aval.dtype) for v in e.invars], str(e.outvars[0].aval.dtype))
         for e in _equations(closed.jaxpr) if e.primitive.name in ("dot_general", "conv_general_dilated")]
  assert len(ops) == len(plan.quantized), ops
  assert all(ins == ["int8", "int8"] and out == "int32" for _, ins, out in ops), ops


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from _equations(inner)


def test_dense_layer_against_numpy_reference(setup):
  """One Dense layer: codes, 4-bit extraction of the lowered channels, int32 GEMM, rescale."""
  model, variables, plan, folded, calib, qvars, images = setup
  info = plan.layers["fc1"]
  lq = inspect_model.get_path(qvars["quant"], "fc1")
  p = folded["params"]["fc1"]
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, info.in_channels)).astype(np.float32) * 2
  lowered = np.arange(info.in_channels) % 3 == 0
  y = layer_ops.quantized_forward(info, None, jnp.asarray(x), p["kernel"], p["bias"], lq, jnp.asarray(lowered),
                                  signed=plan.signed["fc1"], mode="int")
  s_x = float(lq["act_scale"])
  lo, hi = (-128, 127) if plan.signed["fc1"] else (0, 255)
  qx = np.clip(np.round(x / s_x), lo, hi)
  e = np.asarray(lq["act_e"])
  lo4, hi4 = (-8, 7) if plan.signed["fc1"] else (0, 15)
  qx = np.where(lowered, np.clip(np.floor(qx / 2.0 ** e + 0.5), lo4, hi4) * 2.0 ** e, qx)
  w = np.asarray(p["kernel"])
  s_w = np.abs(w).max(0) / 127
  qw = np.clip(np.round(w / s_w), -127, 127)
  f = np.asarray(lq["weight_e"])[:, None]
  qw = np.where(lowered[:, None], np.clip(np.floor(qw / 2.0 ** f + 0.5), -8, 7) * 2.0 ** f, qw)
  qw8 = np.clip(np.round(w / s_w), -127, 127)
  # Bias correction: the calibrated mean output each lowered channel loses.
  lost = lowered[:, None] * (np.asarray(lq["mean_code"])[:, None] * qw8 - np.asarray(lq["mean_lowered"])[:, None] * qw)
  ref = (qx.astype(np.int64) @ qw.astype(np.int64)) * s_x * s_w + np.asarray(p["bias"]) + lost.sum(0) * s_x * s_w
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def _layer_inputs(model, plan, folded, images, path):
  seen = {}

  def layer_fn(info, module, x, kernel, bias):
    if info.path == path:
      seen["x"] = x
    return layer_ops.float_forward(info, module, x, kernel, bias)

  quantize.apply_with_layers(model, plan, folded, images, layer_fn)
  return seen["x"]


def test_bias_correction_keeps_the_mean_output_on_calibration_data(setup):
  """On the data it was calibrated on, a fully lowered Dense layer with bias correction has the
  8-bit layer's mean output (exactly, up to float roundoff); without it the mean shifts."""
  model, variables, plan, folded, calib, qvars, images = setup
  info = plan.layers["fc1"]
  lq = inspect_model.get_path(qvars["quant"], "fc1")
  p = folded["params"]["fc1"]
  x = _layer_inputs(model, plan, folded, images, "fc1")
  run = lambda lq, lowered: layer_ops.quantized_forward(
      info, None, x, p["kernel"], p["bias"], lq, jnp.full((info.in_channels,), lowered), signed=plan.signed["fc1"],
      mode="int").mean(0)
  base = run(lq, False)
  corrected = run(lq, True)
  uncorrected = run({k: v for k, v in lq.items() if k not in ("mean_code", "mean_lowered")}, True)
  scale = float(jnp.abs(base).max())
  np.testing.assert_allclose(corrected, base, atol=1e-4 * scale)
  assert float(jnp.abs(uncorrected - base).max()) > 1e-3 * scale


def test_fake_quant_gradients_flow(setup):
  model, variables, plan, folded, calib, qvars, images = setup
  fake = quantize.QuantizedModel(model, plan, mode="fake")
  grads = jax.grad(lambda params: jnp.sum(fake.apply({**qvars, "params": params}, images, 0.5) ** 2))(
      qvars["params"])
  for path in plan.quantized:
    g = inspect_model.get_path(grads, path)["kernel"]
    assert np.isfinite(g).all() and np.abs(g).sum() > 0, path


def test_ratio_zero_is_plain_8bit_and_one_lowers_everything(setup):
  model, variables, plan, folded, calib, qvars, images = setup
  qm = quantize.QuantizedModel(model, plan, mode="int")
  counts0 = qm.layer_counts(qvars, 0.0)
  counts1 = qm.layer_counts(qvars, 1.0)
  assert all(float(c) == 0 for c in counts0.values())
  assert {p: float(c) for p, c in counts1.items()} == {p: plan.layers[p].in_channels for p in plan.eligible}
  no_lowering = qm.apply_counts(qvars, images, {})  # the plain 8-bit model
  np.testing.assert_array_equal(qm.apply(qvars, images, 0.0), no_lowering)
  assert not np.allclose(qm.apply(qvars, images, 1.0), no_lowering)
  assert quantize.relative_bops_at(qm, qvars, 0.0) == 1.0
  assert quantize.relative_bops_at(qm, qvars, 1.0) < 1.0


def test_error_grows_with_ratio(setup):
  model, variables, plan, folded, calib, qvars, images = setup
  qm = quantize.QuantizedModel(model, plan, mode="int")
  ref = model.apply(variables, images, train=False)
  errors = [float(jnp.mean((qm.apply(qvars, images, r) - ref) ** 2)) for r in (0.0, 0.5, 1.0)]
  assert errors[0] < errors[1] < errors[2], errors


def test_changing_ratio_does_not_recompile(setup):
  model, variables, plan, folded, calib, qvars, images = setup
  qm = quantize.QuantizedModel(model, plan, mode="int")
  traces = []

  def fn(q, x, r):
    traces.append(1)  # runs only when jax traces (and so compiles) the function
    return qm.apply(q, x, r)

  predict = quantize.make_predict(quantize.QuantizedModel(model, plan), qvars)
  jitted = jax.jit(fn)
  outs = [jitted(qvars, images, jnp.float32(r)) for r in (0.0, 0.3, 0.5, 0.9, 1.0)]
  assert len(traces) == 1
  assert not np.allclose(outs[0], outs[-1])
  for r in (0.1, 0.7):
    predict(images, r)
  assert predict.jitted._cache_size() == 1


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval_is_an_error(setup, bad):
  model, variables, plan, folded, calib, qvars, images = setup
  predict = quantize.make_predict(quantize.QuantizedModel(model, plan), qvars)
  with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\]"):
    predict(images, bad)


def test_fitted_extraction_beats_naive_on_calibration_data(setup):
  model, variables, plan, folded, calib, qvars, images = setup
  naive = calibrate.calibrate(model, plan, folded, [images[:16], images[16:]], extraction="naive")
  for p in plan.quantized:
    assert np.all(naive[p]["act_e"] == 4)
    assert np.all(calib[p]["act_lowering_error"] <= naive[p]["act_lowering_error"] * (1 + 1e-5) + 1e-12)
    assert np.all(calib[p]["weight_lowering_error"] <= naive[p]["weight_lowering_error"] * (1 + 1e-5) + 1e-12)
  assert sum(calib[p]["act_lowering_error"].sum() for p in plan.quantized) < \
      sum(naive[p]["act_lowering_error"].sum() for p in plan.quantized)


def test_unknown_calibration_options_are_errors(setup):
  model, variables, plan, folded, *_ = setup
  with pytest.raises(ValueError, match="'minmax', 'percentile' or 'mse'"):
    calibrate.calibrate(model, plan, folded, [], method="kl")
  with pytest.raises(ValueError, match="'fitted' or 'naive'"):
    calibrate.calibrate(model, plan, folded, [], extraction="best")


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_percentile_and_mse_clip_tighter_than_minmax(setup, method):
  model, variables, plan, folded, calib, qvars, images = setup
  other = calibrate.calibrate(model, plan, folded, [images], method=method, percentile=99.0)
  for p in plan.quantized:
    assert 0 < other[p]["act_scale"] <= calib[p]["act_scale"] * (1 + 1e-6)


def test_quantized_variables_tree_shapes(setup):
  model, variables, plan, folded, calib, qvars, images = setup
  shapes = jax.eval_shape(lambda q: q, qvars)
  assert set(shapes) == {"params", "quant", "levels"}  # both BatchNorms folded: no batch_stats left
  assert shapes["levels"].shape == (2,)
  for path in plan.quantized:
    entry = inspect_model.get_path(shapes["quant"], path)
    c = plan.layers[path].in_channels
    assert entry["act_scale"].shape == () and entry["act_scale"].dtype == jnp.float32
    assert entry["act_e"].shape == (c,) and entry["weight_e"].dtype == jnp.int32
    if path in plan.eligible:
      assert entry["rank"].shape == (c,) and entry["counts"].shape == (2,) and entry["counts"].dtype == jnp.int32
    else:
      assert "rank" not in entry and "counts" not in entry
  # The params keep the model's own structure (plus folded biases), so QAT trains them directly.
  assert set(shapes["params"]) == set(variables["params"])
  assert "bias" in shapes["params"]["stem"] and "bias" not in variables["params"]["stem"]


def test_int8_export_drops_float_kernels_and_is_bit_identical(setup, tmp_path):
  from flexiq_jax import checkpoint

  model, variables, plan, folded, calib, qvars, images = setup
  qm = quantize.QuantizedModel(model, plan, mode="int")
  served = quantize.export_int8(qm, qvars)
  for path in plan.quantized:
    assert inspect_model.get_path(served["params"], path)["kernel"].dtype == jnp.int8, path
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
  kernels = lambda v: [inspect_model.get_path(v["params"], p)["kernel"] for p in plan.quantized]
  assert nbytes(kernels(served)) * 4 == nbytes(kernels(qvars))
  checkpoint.save_tree(str(tmp_path / "served"), served)  # what a server loads
  served = checkpoint.load_tree(str(tmp_path / "served"), served)
  predict = quantize.make_predict(qm, served)
  for ratio in (0.0, 0.3, 1.0):
    np.testing.assert_array_equal(predict(images, ratio), qm.apply(qvars, images, ratio))
  assert predict.jitted._cache_size() == 1
  with pytest.raises(ValueError, match="already an int8 export"):
    quantize.export_int8(qm, served)
  with pytest.raises(ValueError, match="mode='int'"):
    quantize.export_int8(qm.with_mode("fake"), qvars)
