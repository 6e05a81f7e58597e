"""Cross-layer equalization: the float function is kept, paired ranges are equalised, pairs through
non-homogeneous functions or residual sums are refused, and the option's fingerprint."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexiq_jax import equalize
from flexiq_jax import quantize
from flexiq_jax import stage_cache
from flexiq_jax import stage_options
from flexiq_jax import stages
from flexiq_jax.interception import FloatLayers, get_path, run_with_provider
from flexiq_jax.stage_results import FloatModel


class TwoConv(nn.Module):
  act: str = "relu"

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), name="a")(x)
    x = nn.BatchNorm(use_running_average=not train, name="a_bn")(x)
    x = {"relu": nn.relu, "silu": nn.silu, "gelu": nn.gelu, "relu6": nn.relu6, "identity": lambda v: v}[self.act](x)
    x = nn.Conv(6, (3, 3), name="b")(x)
    return nn.Dense(4, name="head")(jnp.tanh(x.mean(axis=(1, 2))))


class DepthwiseNet(nn.Module):
  """stem -> ReLU -> depthwise -> ReLU -> grouped 1x1 -> ReLU -> pointwise -> mean -> dense."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(nn.Conv(8, (3, 3), name="stem")(x)))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, name="dw")(x))
    x = nn.relu(nn.Conv(12, (1, 1), feature_group_count=4, name="grouped")(x))
    x = nn.Conv(10, (1, 1), name="pw")(x)
    return nn.Dense(5, name="head")(x.mean(axis=(1, 2)))


class Residual(nn.Module):
  """a's output goes to b and around it into a sum: rescaling a alone changes the sum."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(8, (3, 3), name="a")(x))
    y = nn.Conv(8, (3, 3), name="b")(x)
    return nn.Dense(4, name="head")((x + y).mean(axis=(1, 2)))


def _setup(model, seed=0):
  images = jnp.asarray(np.random.default_rng(seed).normal(size=(16, 8, 8, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(seed), images[:1])
  rng = np.random.default_rng(seed + 1)
  # Uneven per-channel weights (what equalization is for) and non-trivial BatchNorm statistics.
  params = jax.tree.map(lambda w: w * jnp.asarray(rng.uniform(0.05, 3.0, w.shape[-1:]), w.dtype), variables["params"])
  variables = {"params": params}
  if "batch_stats" in model.init(jax.random.PRNGKey(seed), images[:1]):
    stats = model.init(jax.random.PRNGKey(seed), images[:1])["batch_stats"]
    variables["batch_stats"] = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), stats)
  plan = quantize.build_plan(model, variables, images.shape[1:], keep_8bit=())
  return plan, quantize.fold_batchnorm(variables, plan), images, variables


def _logits(model, plan, variables, images):
  return run_with_provider(model, plan, variables, images, FloatLayers())


def _close(a, b, rtol):
  return float(jnp.max(jnp.abs(a - b))) <= rtol * float(jnp.max(jnp.abs(a)))


def test_single_pair_through_relu_keeps_the_function_and_equalises_the_ranges():
  model = TwoConv("relu")
  plan, folded, images, _ = _setup(model)
  eq = equalize.equalize(model, plan, folded, images)
  assert [(p.a, p.b) for p in eq.pairs] == [("a", "b")]
  assert _close(_logits(model, plan, folded, images), _logits(model, plan, eq.variables, images), 1e-5)
  before, after = folded["params"], eq.variables["params"]
  r1, r2 = equalize.output_ranges(before["a"]["kernel"]), equalize.input_ranges(before["b"]["kernel"], plan.layers["b"])
  n1, n2 = equalize.output_ranges(after["a"]["kernel"]), equalize.input_ranges(after["b"]["kernel"], plan.layers["b"])
  # s_i = sqrt(r1_i / r2_i): both ranges become sqrt(r1_i r2_i).
  np.testing.assert_allclose(n1, np.sqrt(r1 * r2), rtol=1e-5)
  np.testing.assert_allclose(n2, np.sqrt(r1 * r2), rtol=1e-5)
  assert equalize.range_ratio(n1) < equalize.range_ratio(r1)
  # The bias follows its kernel column.
  s = r1 / n1
  np.testing.assert_allclose(after["a"]["bias"], before["a"]["bias"] / s, rtol=1e-5, atol=1e-7)
  # The last layer pairs with nothing: tanh is not homogeneous.
  assert "b -> head" in eq.refused and eq.refused["b -> head"] > 1e-4


@pytest.mark.parametrize("act", ["silu", "gelu", "relu6"])
def test_pairs_through_non_homogeneous_functions_are_refused(act):
  model = TwoConv(act)
  plan, folded, images, _ = _setup(model)
  eq = equalize.equalize(model, plan, folded, images)
  assert eq.pairs == ()
  assert eq.refused["a -> b"] > 1e-4
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), eq.variables["params"], folded["params"]))


def test_identity_pair_is_taken():
  model = TwoConv("identity")
  plan, folded, images, _ = _setup(model)
  assert [(p.a, p.b) for p in equalize.equalize(model, plan, folded, images).pairs] == [("a", "b")]


def test_residual_sum_is_refused():
  model = Residual()
  plan, folded, images, _ = _setup(model)
  eq = equalize.equalize(model, plan, folded, images)
  assert "a -> b" in eq.refused and eq.pairs == ()


def test_depthwise_and_grouped_chain_keeps_the_function_and_converges():
  model = DepthwiseNet()
  plan, folded, images, _ = _setup(model)
  eq = equalize.equalize(model, plan, folded, images)
  assert [(p.a, p.b) for p in eq.pairs] == [("stem", "dw"), ("dw", "grouped"), ("grouped", "pw"), ("pw", "head")]
  assert _close(_logits(model, plan, folded, images), _logits(model, plan, eq.variables, images), 1e-5)
  assert eq.last_move <= 1e-4 and eq.deviation <= 1e-5
  params = eq.variables["params"]
  for p in eq.pairs:  # converged: every pair's two ranges agree channel by channel
    r1 = equalize.output_ranges(get_path(params, p.a)["kernel"])
    r2 = equalize.input_ranges(get_path(params, p.b)["kernel"], plan.layers[p.b])
    np.testing.assert_allclose(r1, r2, rtol=1e-3)
  # A depthwise B's input channel c is its filter c; a grouped B's is row c % 2 of group c // 2's filters.
  k = np.asarray(folded["params"]["grouped"]["kernel"])  # (1, 1, 2, 12): 4 groups of 2 inputs, 3 outputs
  want = [np.abs(k[0, 0, c % 2, 3 * (c // 2):3 * (c // 2) + 3]).max() for c in range(8)]
  np.testing.assert_allclose(equalize.input_ranges(jnp.asarray(k), plan.layers["grouped"]), want)
  dw = np.asarray(folded["params"]["dw"]["kernel"])
  np.testing.assert_allclose(equalize.input_ranges(jnp.asarray(dw), plan.layers["dw"]), np.abs(dw).max(axis=(0, 1, 2)))


def test_stages_plan_equalizes_only_when_on():
  model = TwoConv("relu")
  _, folded, images, variables = _setup(model)
  fm = FloatModel(model, variables)
  off = stage_options.CalibrateOptions(keep_8bit=())
  on = stage_options.CalibrateOptions(keep_8bit=(), equalize=True)
  plan, f_off, report = stages.plan_with_report(fm, images.shape[1:], off)
  assert report is None and jnp.array_equal(f_off["params"]["a"]["kernel"], folded["params"]["a"]["kernel"])
  with pytest.raises(ValueError, match="quant.equalize needs images"):
    stages.plan(fm, images.shape[1:], on)
  _, f_on, report = stages.plan_with_report(fm, images.shape[1:], on, images)
  assert len(report.pairs) == 1 and not jnp.allclose(f_on["params"]["a"]["kernel"], f_off["params"]["a"]["kernel"])
  # The saved pairs give the same variables without the check.
  _, again, _ = stages.plan_with_report(fm, images.shape[1:], on, images, pairs=report.pairs)
  assert jnp.array_equal(again["params"]["b"]["kernel"], f_on["params"]["b"]["kernel"])
  # Calibration (what every method reads) runs on the equalized variables.
  calibration = stages.calibrate(fm, [images], on)
  assert jnp.array_equal(calibration.folded["params"]["a"]["kernel"], f_on["params"]["a"]["kernel"])


def test_option_enters_the_fingerprint_only_when_on():
  from configs import quickstart
  config = quickstart.get_config("smoke")
  assert config.quant.equalize is False
  fp = lambda c: {s: stage_cache.fingerprint(stage_options.stage_fields(c, s)) for s in stage_options.STAGES}
  default = fp(config)
  del config.quant["equalize"]
  assert fp(config) == default  # off: as if the field did not exist
  config.quant.equalize = True
  on = fp(config)
  assert on["float"] == default["float"]
  assert all(on[s] != default[s] for s in ("calibrate", "select", "quantize", "finetune"))


def test_pipeline_calibration_is_equalized_and_a_reused_stage_gives_the_same_variables(smoke_config, tmp_path):
  from flexiq_jax import pipeline, records
  smoke_config.quant.equalize = True
  model = pipeline.build_model(smoke_config, 10)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 28, 28, 1)), train=False))(jax.random.PRNGKey(0))
  fm = FloatModel(model, variables)
  run = pipeline.Run(smoke_config, str(tmp_path))
  first = pipeline.calibrate(run, fm)
  report = records.read_json(str(tmp_path / "calibrate" / "equalize.json"))
  assert report["pairs"] and report["deviation"] <= 1e-4
  opts = stage_options.stage_options(smoke_config, "calibrate")
  _, want, _ = stages.plan_with_report(fm, pipeline.image_shape(smoke_config), opts,
                                       pipeline.calibration_batches(smoke_config)[0])
  again = pipeline.calibrate(run, fm)  # reused: the saved pairs, no check
  for calibration in (first, again):
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.allclose(x, y, rtol=1e-6, atol=0)),
                                     calibration.folded["params"], want["params"]))
