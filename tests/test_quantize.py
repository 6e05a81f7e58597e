"""flexiq_jax.quantize: the plan (rules, BN folding, signedness, JSON), FlexiQ's layer arithmetic
(integer path against fake quant and a numpy reference, bias correction), the FlexiQLayers
provider, the run-time ratio (no recompilation) and the int8 serving export."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexiq_jax import interception, quantize, serve
from flexiq_jax.interception import FloatLayers, LayerCall, get_path
from flexiq_jax import layer_ops
from flexiq_jax.quantize import integer

import smallnet


@pytest.fixture(scope="module")
def setup():
  return smallnet.make_setup()


# -- plan ------------------------------------------------------------------------------------------

def test_plan_keeps_first_and_last_8bit_and_folds_bn(setup):
  plan = setup.plan
  assert plan.quantized == ["stem", "dw", "grouped", "conv", "fc1", "head"]
  assert plan.lowerable == ["dw", "grouped", "conv", "fc1"]
  assert plan.folded_bn == {"stem_bn": "stem", "grouped_bn": "grouped"}
  assert plan.bn_epsilon == {"stem_bn": pytest.approx(1e-5), "grouped_bn": pytest.approx(1e-5)}
  assert plan.signed["stem"] and not plan.signed["grouped"]  # raw input vs after ReLU
  assert set(plan.signed) == set(plan.quantized)
  assert list(plan.layer_infos()) == plan.quantized
  assert list(plan.layer_infos(["fc1"])) == ["fc1"]


def test_unmatched_rule_is_reported(setup):
  model, variables = setup.model, setup.variables
  plan = quantize.build_plan(model, variables, (10, 10, 3), keep_8bit=("first", "no_such_layer"))
  assert plan.unmatched_rules == ["no_such_layer"]


def test_plan_rules_skip_and_regex(setup):
  model, variables = setup.model, setup.variables
  plan = quantize.build_plan(model, variables, (10, 10, 3), skip=("last",), keep_8bit=("first", "^conv$"))
  assert plan.quantized == ["stem", "dw", "grouped", "conv", "fc1"]
  assert plan.lowerable == ["dw", "grouped", "fc1"]
  assert plan.unmatched_rules == []
  assert list(plan.layers) == ["stem", "dw", "grouped", "conv", "fc1", "head"]  # every layer is traced


def test_plan_is_frozen_and_signedness_makes_a_new_plan(setup):
  model, variables, plan, calib = setup.model, setup.variables, setup.plan, setup.calib
  with pytest.raises(dataclasses.FrozenInstanceError):
    plan.lowerable = []
  fresh = quantize.build_plan(model, variables, (10, 10, 3))
  assert fresh.signed == {}
  signed = fresh.with_signedness(calib)
  assert fresh.signed == {} and signed.signed == plan.signed
  assert signed.quantized == fresh.quantized and signed.folded_bn == fresh.folded_bn


def test_plan_json_roundtrip(setup):
  import json

  plan = setup.plan
  back = quantize.QuantPlan.from_json(json.loads(json.dumps(plan.to_json())))
  assert back == plan


def test_folded_model_equals_original(setup):
  model, variables, plan, folded, images = setup.model, setup.variables, setup.plan, setup.folded, setup.images
  ref = model.apply(variables, images, train=False)
  assert float(jnp.std(ref)) > 1e-3  # a live network, not one whose ReLUs are all off
  out = interception.run_with_provider(model, plan, folded, images, FloatLayers())
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  # Folding adds a bias to the conv that had none and leaves the BatchNorm parameters unused.
  assert "bias" in folded["params"]["stem"] and "bias" not in variables["params"]["stem"]
  assert quantize.unfolded_batch_stats(folded, plan) == {}


def test_without_folding_the_batchnorms_run_at_apply_time(setup):
  model, variables = setup.model, setup.variables
  images = setup.images[:4]
  plan = quantize.build_plan(model, variables, (10, 10, 3), fold_bn=False)
  assert plan.folded_bn == {} and plan.bn_epsilon == {}
  assert quantize.fold_batchnorm(variables, plan) == variables
  assert jax.tree_util.tree_structure(quantize.unfolded_batch_stats(variables, plan)) == \
      jax.tree_util.tree_structure(variables["batch_stats"])
  out = interception.run_with_provider(model, plan, variables, images, FloatLayers())
  np.testing.assert_allclose(out, model.apply(variables, images, train=False), rtol=1e-5, atol=1e-6)


# -- layer arithmetic (layer_ops) ------------------------------------------------------------------

def test_int8_path_matches_fake_quant_and_is_really_int8(setup):
  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
  int_model = quantize.QuantizedModel(model, plan, mode="int")
  fake_model = int_model.with_mode("fake")
  int_apply, fake_apply = jax.jit(int_model.apply), jax.jit(fake_model.apply)
  for ratio in (0.0, 0.5, 1.0):
    a = int_apply(qvars, images, ratio)
    b = fake_apply(qvars, images, ratio)
    np.testing.assert_allclose(a, b, atol=2e-3 * float(jnp.abs(b).max()))
  def layer_ops(qmodel):
    closed = jax.make_jaxpr(lambda q, x: qmodel.apply(q, x, 0.5))(qvars, images[:2])
    ops = [(e.primitive.name, [str(v.aval.dtype) for v in e.invars], str(e.outvars[0].aval.dtype))
           for e in _equations(closed.jaxpr) if e.primitive.name in ("dot_general", "conv_general_dilated")]
    # The unsigned-input border correction is a small int32 einsum over the kernel, not a layer.
    return [op for op in ops if op[1] != ["int32", "int32"]]

  conv_out = quantize.default_conv_accumulator()  # int32 on CPU; XLA:GPU convs need float32
  plain = layer_ops(dataclasses.replace(int_model, conv_impls="int8"))
  assert len(plain) == len(plan.quantized), plain
  assert all(ins[1] == "int8" and ins[0] in ("int8", "uint8") and out == ("int32" if name == "dot_general" else conv_out)
             for name, ins, out in plain), plain
  # 'auto' on CPU: the convs with fewer than 32 input channels and the grouped/depthwise ones run on
  # the codes in float32 (exact: integer sums below 2^24), the rest as int8; a depthwise conv on
  # float32 codes is the sum of its k*k taps (no conv primitive: XLA:CPU's grouped conv is slower).
  auto = layer_ops(int_model)
  info = plan.layers
  depthwise = [info[p].kind == "conv" and info[p].groups > 1 and info[p].groups == info[p].in_channels
               == info[p].out_channels for p in plan.quantized]
  assert depthwise == [False, True, False, False, False, False]
  assert len(auto) == len(plan.quantized) - sum(depthwise), auto
  expect_float = [integer.default_conv_impl(info[p]) == "float32" for p, d in zip(plan.quantized, depthwise) if not d]
  assert [ins == ["float32", "float32"] for _, ins, _ in auto] == expect_float, auto
  if jax.default_backend() == "cpu":
    assert [integer.default_conv_impl(plan.layers[p]) for p in plan.quantized] == \
        ["float32", "float32", "float32", "float32", "int8", "int8"]


def test_float32_conv_accumulator_is_exact_here(setup):
  """A float32 accumulator (what GPUs need) gives the int32 result while sums stay below 2^24."""
  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
  a = jax.jit(quantize.QuantizedModel(model, plan, conv_accumulator="int32").apply)(qvars, images[:4], 0.5)
  b = jax.jit(quantize.QuantizedModel(model, plan, conv_accumulator="float32").apply)(qvars, images[:4], 0.5)
  np.testing.assert_array_equal(a, b)
  assert quantize.default_conv_accumulator() == ("float32" if jax.default_backend() == "gpu" else "int32")


def test_unknown_mode_is_an_error(setup):
  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
  with pytest.raises(ValueError, match="unknown mode 'int4'"):
    quantize.QuantizedModel(model, plan, mode="int4")
  with pytest.raises(ValueError, match="unknown mode 'float'"):
    quantize.QuantizedModel(model, plan).with_mode("float")


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from _equations(inner)


def _call(plan, folded, path):
  p = get_path(folded["params"], path)
  return LayerCall(plan.layers[path], None, p["kernel"], p["bias"])  # dense layers need no module


def test_dense_layer_against_numpy_reference(setup):
  """One Dense layer: codes, 4-bit extraction of the lowered channels, int32 GEMM, rescale."""
  plan, folded, qvars = setup.plan, setup.folded, setup.qvars
  info = plan.layers["fc1"]
  lq = get_path(qvars["quant"], "fc1")
  p = folded["params"]["fc1"]
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, info.in_channels)).astype(np.float32) * 2
  lowered = np.arange(info.in_channels) % 3 == 0
  y = layer_ops.quantized_forward(_call(plan, folded, "fc1"), jnp.asarray(x), lq, jnp.asarray(lowered),
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
  # The integer codes stored by a serving export are the same qw8 (and scale s_w).
  codes, scale = layer_ops.weight_codes(info, p["kernel"])
  assert codes.dtype == jnp.int8
  np.testing.assert_array_equal(codes, qw8)
  np.testing.assert_allclose(scale, s_w, rtol=1e-6)


@pytest.mark.parametrize("padding", [((1, 2), (2, 1)), ((0, -1), (1, 0))])
def test_input_dilated_conv_with_unsigned_input_matches_fake_quant(padding):
  """A transposed-conv-like layer (nn.Conv with input_dilation=2) on an unsigned input: the
  integer path inserts the shifted zero (-128) between the inputs as well as at the borders
  (negative borders crop), so it equals the fake path up to float rounding, as a signed input does."""

  class Up(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Conv(6, (3, 3), input_dilation=2, padding=padding, name="up")(x)

  rng = np.random.default_rng(0)
  x = jnp.asarray(np.maximum(rng.normal(size=(2, 5, 5, 4)), 0.0), jnp.float32)  # after a ReLU: unsigned
  model = Up()
  variables = model.init(jax.random.PRNGKey(0), x)
  info = interception.trace(model, variables, (5, 5, 4)).layers["up"]
  p = variables["params"]["up"]
  call = LayerCall(info, nn.Conv(6, (3, 3), input_dilation=2, padding=padding), p["kernel"], p["bias"])
  for signed in (False, True):
    lq = {"act_scale": jnp.float32(float(x.max()) / (127 if signed else 255)),
          "act_e": jnp.asarray([0, 1, 2, 4], jnp.int32), "weight_e": jnp.asarray([1, 0, 3, 2], jnp.int32)}
    for lowered in ([False] * 4, [True, False, True, False]):
      run = lambda mode: layer_ops.quantized_forward(call, x, lq, jnp.asarray(lowered), signed=signed, mode=mode)
      fake, integer = run("fake"), run("int")
      assert integer.shape == model.apply(variables, x).shape
      np.testing.assert_allclose(integer, fake, rtol=1e-5, atol=1e-5 * float(jnp.abs(fake).max()))


def test_grouped_and_depthwise_weight_channel_index(setup):
  plan = setup.plan
  dw, grouped, fc1 = plan.layers["dw"], plan.layers["grouped"], plan.layers["fc1"]
  # Depthwise (8 groups of 1): output channel o reads feature channel o.
  np.testing.assert_array_equal(layer_ops.weight_channel_index(dw), np.arange(8)[None, :])
  # Grouped 8 -> 16 in 2 groups: outputs 0-7 read channels 0-3, outputs 8-15 read 4-7.
  idx = layer_ops.weight_channel_index(grouped)
  assert idx.shape == (4, 16)
  np.testing.assert_array_equal(idx[:, 0], [0, 1, 2, 3])
  np.testing.assert_array_equal(idx[:, 15], [4, 5, 6, 7])
  np.testing.assert_array_equal(layer_ops.weight_channel_index(fc1), np.repeat(np.arange(16)[:, None], 12, 1))


class _Recorder:
  """Float provider that keeps the input of one layer."""

  def __init__(self, path):
    self.path, self.x = path, None

  def layer(self, call, x):
    if call.path == self.path:
      self.x = x
    return call.float_forward(x)


def _layer_inputs(model, plan, folded, images, path):
  recorder = _Recorder(path)
  interception.run_with_provider(model, plan, folded, images, recorder)
  return recorder.x


def test_bias_correction_keeps_the_mean_output_on_calibration_data(setup):
  """On the data it was calibrated on, a fully lowered Dense layer with bias correction has the
  8-bit layer's mean output (exactly, up to float roundoff); without it the mean shifts."""
  model, plan, folded, qvars, images = setup.model, setup.plan, setup.folded, setup.qvars, setup.images
  info = plan.layers["fc1"]
  lq = get_path(qvars["quant"], "fc1")
  call = _call(plan, folded, "fc1")
  x = _layer_inputs(model, plan, folded, images, "fc1")
  run = lambda lq, lowered: layer_ops.quantized_forward(
      call, x, lq, jnp.full((info.in_channels,), lowered), signed=plan.signed["fc1"], mode="int").mean(0)
  base = run(lq, False)
  corrected = run(lq, True)
  uncorrected = run({k: v for k, v in lq.items() if k not in ("mean_code", "mean_lowered")}, True)
  scale = float(jnp.abs(base).max())
  np.testing.assert_allclose(corrected, base, atol=1e-4 * scale)
  assert float(jnp.abs(uncorrected - base).max()) > 1e-3 * scale


def test_fake_quant_gradients_flow(setup):
  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
  fake = quantize.QuantizedModel(model, plan, mode="fake")
  grads = jax.jit(jax.grad(lambda params: jnp.sum(fake.apply({**qvars, "params": params}, images, 0.5) ** 2)))(
      qvars["params"])
  for path in plan.quantized:
    g = get_path(grads, path)["kernel"]
    assert np.isfinite(g).all() and np.abs(g).sum() > 0, path


# -- FlexiQLayers and the run-time ratio -----------------------------------------------------------

def test_flexiq_layers_provider_is_what_the_quantized_model_runs(setup):
  model, plan, folded, qvars, images = setup.model, setup.plan, setup.folded, setup.qvars, setup.images
  qm = quantize.QuantizedModel(model, plan, mode="int", conv_accumulator="int32")
  counts = {"dw": 3, "conv": 16}  # fc1 and grouped: no count, nothing lowered
  provider = quantize.FlexiQLayers(qvars["quant"], counts, plan.signed, "int", False, "int32")
  out = jax.jit(lambda v, x: interception.run_with_provider(model, plan, v, x, provider))(
      {"params": qvars["params"]}, images)
  np.testing.assert_array_equal(out, jax.jit(qm.apply_counts)(qvars, images, counts))
  # The provider lowers exactly the channels ranked below the count: on dw, lowering its first 3
  # channels by rank is the same as passing that mask to quantized_forward directly.
  x = _layer_inputs(model, plan, folded, images, "dw")
  p = get_path(qvars["params"], "dw")
  module = nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=8)
  call = LayerCall(plan.layers["dw"], module, p["kernel"], p["bias"])
  lq = get_path(qvars["quant"], "dw")
  mask = np.isin(np.arange(8), np.asarray(np.argsort(lq["rank"]))[:3])
  direct = layer_ops.quantized_forward(call, x, lq, jnp.asarray(mask), signed=plan.signed["dw"], mode="int")
  np.testing.assert_array_equal(provider.layer(call, x), direct)
  none = quantize.FlexiQLayers(qvars["quant"], {}, plan.signed, "int", False, "int32").layer(call, x)
  np.testing.assert_array_equal(none, layer_ops.quantized_forward(
      call, x, lq, jnp.zeros(8, bool), signed=plan.signed["dw"], mode="int"))
  assert not np.array_equal(none, direct)


def test_ratio_zero_is_plain_8bit_and_one_lowers_everything(setup):
  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
  qm = quantize.QuantizedModel(model, plan, mode="int")
  counts0 = qm.layer_counts(qvars, 0.0)
  counts1 = qm.layer_counts(qvars, 1.0)
  assert all(float(c) == 0 for c in counts0.values())
  assert {p: float(c) for p, c in counts1.items()} == {p: plan.layers[p].in_channels for p in plan.lowerable}
  no_lowering = jax.jit(qm.apply_counts)(qvars, images, {})  # the plain 8-bit model
  apply = jax.jit(qm.apply)
  np.testing.assert_array_equal(apply(qvars, images, 0.0), no_lowering)
  assert not np.allclose(apply(qvars, images, 1.0), no_lowering)
  assert quantize.relative_bops_at(qm, qvars, 0.0) == 1.0
  assert quantize.relative_bops_at(qm, qvars, 1.0) < 1.0


def test_counts_between_levels_and_cost_reports(setup):
  model, plan, qvars = setup.model, setup.plan, setup.qvars
  qm = quantize.QuantizedModel(model, plan, mode="int")
  # levels (0.5, 1.0) with counts C/2 and C (every C is a multiple of 4): every layer holds half
  # of its MACs at 0.5, so the channels filled in between levels give each layer a quarter (three
  # quarters) of its channels at 0.25 (0.75).
  assert quantize.lowered_channels(qm, qvars, 0.25) == {p: float(plan.layers[p].in_channels // 4)
                                                        for p in plan.lowerable}
  assert quantize.lowered_channels(qm, qvars, 0.75) == {p: float(3 * plan.layers[p].in_channels // 4)
                                                        for p in plan.lowerable}
  # layer_counts: above the last level its counts, below 0 or NaN none (apply makes those NaN).
  assert {p: float(c) for p, c in qm.layer_counts(qvars, 1.5).items()} == \
      {p: float(c) for p, c in qm.layer_counts(qvars, 1.0).items()}
  assert all(float(c) == 0 for c in qm.layer_counts(qvars, float("nan")).values())
  # At ratio 1 every lowerable channel is 4-bit; the 8-bit stem and head keep the share below 1.
  infos = plan.layer_infos()
  lowerable_macs = sum(infos[p].macs for p in plan.lowerable)
  assert quantize.low_bit_share_at(qm, qvars, 1.0) == pytest.approx(lowerable_macs / sum(i.macs for i in infos.values()))
  assert quantize.low_bit_share_at(qm, qvars, 0.0) == 0.0
  assert quantize.relative_bops_at(qm, qvars, 1.0) == pytest.approx(1 - 0.75 * quantize.low_bit_share_at(qm, qvars, 1.0))


def test_every_ratio_is_met_within_one_channel_nested_and_compiled_once(setup):
  """101 ratios 0, 0.01, ..., 1 on per-level counts from the random selector (nested, on budget,
  different per layer): the 4-bit share of the lowerable MACs is within one channel's MACs
  (tol = max_l (M_l / C_l) / sum_l M_l) of every ratio. At the levels themselves the counts are
  the selected ones, which the selector puts within that same tol of the level (its budget
  tolerance), not exactly on it. The counts never decrease with the ratio (nested), the host twin
  `lowered_channels` agrees, and one compilation serves all 101 ratios."""
  from flexiq_jax import cost, select

  model, plan, folded, calib, images = setup.model, setup.plan, setup.folded, setup.calib, setup.images[:2]
  infos = [plan.layers[p] for p in plan.lowerable]
  channels = np.array([i.in_channels for i in infos])
  macs = np.array([i.macs for i in infos], np.float64)
  assert len(set(macs)) == len(macs)  # layers of different sizes
  levels = [0.25, 0.5, 0.75, 1.0]
  per_level = select.select_random(levels, channels, macs, seed=0)
  assert len({round(f, 6) for f in per_level[0] / channels}) > 1  # not the same fraction in every layer
  orders = {p: np.argsort(np.asarray(get_path(setup.qvars["quant"], p)["rank"])) for p in plan.lowerable}
  qvars = quantize.build_qvars(plan, folded, calib, orders, {p: per_level[:, i] for i, p in enumerate(plan.lowerable)},
                               levels)
  qm = quantize.QuantizedModel(model, plan)
  traces = []

  def fn(q, x, r):
    traces.append(1)  # runs only while tracing
    return qm.apply(q, x, r), qm.layer_counts(q, r)

  jitted = jax.jit(fn)
  tol = select.budget_tolerance(channels, macs)
  previous = np.zeros_like(channels)
  for r in np.arange(101) / 100:
    logits, counts = jitted(qvars, images, jnp.float32(r))
    n = np.array([int(counts[p]) for p in plan.lowerable])
    assert np.all(n >= previous), r  # nested
    previous = n
    assert abs(cost.lowered_mac_share(n, channels, macs) - r) <= tol * (1 + 1e-6), r
    assert quantize.lowered_channels(qm, qvars, r) == {p: float(c) for p, c in zip(plan.lowerable, n)}
    if r in levels:
      np.testing.assert_array_equal(n, per_level[levels.index(r)])
    assert np.isfinite(np.asarray(logits)).all()
  assert len(traces) == 1
  np.testing.assert_array_equal(previous, channels)


def test_error_grows_with_ratio(setup):
  model, variables, plan, qvars, images = setup.model, setup.variables, setup.plan, setup.qvars, setup.images
  qm = quantize.QuantizedModel(model, plan, mode="int")
  ref = model.apply(variables, images, train=False)
  apply = jax.jit(qm.apply)
  errors = [float(jnp.mean((apply(qvars, images, r) - ref) ** 2)) for r in (0.0, 0.5, 1.0)]
  assert errors[0] < errors[1] < errors[2], errors


def test_changing_ratio_does_not_recompile(setup):
  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
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
  predict(images, 0.1)
  with serve.count_compilations() as compiled:  # lowerings: every compilation lowers first
    predict(images, 0.7), predict(images, 0.2)
  assert compiled.count == 0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval_is_an_error(setup, bad):
  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
  predict = quantize.make_predict(quantize.QuantizedModel(model, plan), qvars)
  with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\]"):
    predict(images, bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval_gives_nan_logits_under_jit(setup, bad):
  """On the traced path (a user's own jax.jit) an invalid ratio is not clipped: every logit is NaN;
  with checked=True, checkify raises."""
  from jax.experimental import checkify

  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images[:4]
  qm = quantize.QuantizedModel(model, plan)
  apply = jax.jit(qm.apply)
  assert np.isnan(np.asarray(apply(qvars, images, jnp.float32(bad)))).all()
  for good in (0.0, 0.5, 1.0):
    assert np.isfinite(np.asarray(apply(qvars, images, jnp.float32(good)))).all()
  checked = checkify.checkify(jax.jit(functools.partial(qm.apply, checked=True)))
  err, _ = checked(qvars, images, jnp.float32(bad))
  with pytest.raises(checkify.JaxRuntimeError, match=r"ratio must be in \[0, 1\]"):
    err.throw()
  err, out = checked(qvars, images, jnp.float32(0.5))
  err.throw()  # no error
  np.testing.assert_array_equal(out, apply(qvars, images, jnp.float32(0.5)))


def test_check_ratio():
  assert quantize.check_ratio(0) == 0.0 and quantize.check_ratio(np.float32(0.5)) == 0.5
  with pytest.raises(TypeError, match="must be a number"):
    quantize.check_ratio([0.1, 0.2])
  with pytest.raises(TypeError, match="must be a number"):
    quantize.check_ratio(None)


# -- quantized variables and the int8 export -------------------------------------------------------

def test_quantized_variables_tree_shapes(setup):
  variables, plan, calib, qvars = setup.variables, setup.plan, setup.calib, setup.qvars
  shapes = jax.eval_shape(lambda q: q, qvars)
  assert set(shapes) == {"params", "quant", "levels", "fill"}  # both BatchNorms folded: no batch_stats left
  assert shapes["levels"].shape == (2,)
  # The fill table: one entry per channel lowered at the last level (here all lowerable channels).
  n = sum(plan.layers[p].in_channels for p in plan.lowerable)
  assert shapes["fill"]["layer"].shape == (n,) and shapes["fill"]["layer"].dtype == jnp.int32
  assert shapes["fill"]["threshold"].shape == (n,) and shapes["fill"]["threshold"].dtype == jnp.float32
  for path in plan.quantized:
    entry = get_path(shapes["quant"], path)
    c = plan.layers[path].in_channels
    assert entry["act_scale"].shape == () and entry["act_scale"].dtype == jnp.float32
    assert entry["act_e"].shape == (c,) and entry["weight_e"].dtype == jnp.int32
    if path in plan.lowerable:
      assert entry["rank"].shape == (c,) and entry["counts"].shape == (2,) and entry["counts"].dtype == jnp.int32
      assert entry["mean_code"].shape == (c,) and entry["mean_lowered"].shape == (c,)
    else:
      assert "rank" not in entry and "counts" not in entry
  # The params keep the model's own structure (plus folded biases), so QAT trains them directly.
  assert set(shapes["params"]) == set(variables["params"])
  assert "bias" in shapes["params"]["stem"] and "bias" not in variables["params"]["stem"]
  # rank inverts the order: the channel ordered first has rank 0.
  for path in plan.lowerable:
    rank = np.asarray(get_path(qvars["quant"], path)["rank"])
    order = np.argsort(np.maximum(-calib[path]["ch_min"], calib[path]["ch_max"]), kind="stable")
    np.testing.assert_array_equal(rank[order], np.arange(len(order)))


def test_fill_table_is_state_and_can_be_added_to_older_qvars(setup):
  """qvars saved without the fill table fail with a clear error; add_fill_table rebuilds the same
  table from their per-level counts and levels."""
  model, plan, qvars = setup.model, setup.plan, setup.qvars
  qm = quantize.QuantizedModel(model, plan)
  old = {k: v for k, v in qvars.items() if k != "fill"}
  with pytest.raises(KeyError, match="add_fill_table"):
    qm.layer_counts(old, 0.5)
  again = quantize.add_fill_table(plan, old)
  for name in ("layer", "threshold"):
    np.testing.assert_array_equal(again["fill"][name], qvars["fill"][name])
  counts = {p: np.array([2, 1]) for p in plan.lowerable}  # not nested
  orders = {p: np.arange(plan.layers[p].in_channels) for p in plan.lowerable}
  with pytest.raises(ValueError, match="nested"):
    quantize.build_qvars(plan, setup.folded, setup.calib, orders, counts, [0.5, 1.0])


def test_qvars_without_bias_correction(setup):
  plan, folded, calib = setup.plan, setup.folded, setup.calib
  orders = {p: np.arange(plan.layers[p].in_channels) for p in plan.lowerable}
  counts = {p: np.array([1, 2]) for p in plan.lowerable}
  plain = quantize.build_qvars(plan, folded, calib, orders, counts, [0.5, 1.0], bias_correction=False)
  for path in plan.lowerable:
    assert "mean_code" not in get_path(plain["quant"], path)


def test_int8_export_drops_float_kernels_and_is_bit_identical(setup, tmp_path):
  from flexiq_jax import checkpoint

  model, plan, qvars, images = setup.model, setup.plan, setup.qvars, setup.images
  qm = quantize.QuantizedModel(model, plan, mode="int")
  served = quantize.export_int8(qm, qvars)
  for path in plan.quantized:
    assert get_path(served["params"], path)["kernel"].dtype == jnp.int8, path
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
  kernels = lambda v: [get_path(v["params"], p)["kernel"] for p in plan.quantized]
  assert nbytes(kernels(served)) * 4 == nbytes(kernels(qvars))
  checkpoint.save_tree(str(tmp_path / "served"), served)  # what a server loads
  served = checkpoint.load_tree(str(tmp_path / "served"), served)
  predict = quantize.make_predict(qm, served)
  for ratio in (0.0, 0.3, 1.0):
    np.testing.assert_array_equal(predict(images, ratio), qm.apply(qvars, images, ratio))
  with serve.count_compilations() as compiled:
    predict(images, 0.6)
  assert compiled.count == 0
  with pytest.raises(ValueError, match="already an int8 export"):
    quantize.export_int8(qm, served)
  with pytest.raises(ValueError, match="mode='int'"):
    quantize.export_int8(qm.with_mode("fake"), qvars)
