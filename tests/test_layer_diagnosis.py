"""experiments/layer_diagnosis.py: the per-layer switches reproduce FlexiQ's own model at ratio 1
(everything lowered) and ratio 0 (nothing), and one layer back to 8 bits changes only that layer;
experiments/flexiq_fixes.py: variant overrides."""

import jax.numpy as jnp
import numpy as np
import pytest

from flexiq_jax import interception, quantize
from experiments import fixes_variants
from experiments import layer_diagnosis

import smallnet


@pytest.fixture(scope="module")
def setup():
  return smallnet.make_setup()


def _logits(setup, act, weight):
  plan, qvars = setup.plan, setup.qvars
  provider = layer_diagnosis.DiagnosisLayers(qvars["quant"], plan.signed, act, weight, plan.matmul_signed)
  variables = {k: v for k, v in qvars.items() if k in ("params", "batch_stats")}
  return interception.run_with_provider(setup.model, plan, variables, setup.images, provider)


def test_switches_reproduce_ratio_1_and_ratio_0(setup):
  fake = quantize.QuantizedModel(setup.model, setup.plan, mode="fake")
  on = {p: jnp.bool_(True) for p in setup.plan.lowerable}
  off = {p: jnp.bool_(False) for p in setup.plan.lowerable}
  np.testing.assert_allclose(_logits(setup, on, on), fake.apply(setup.qvars, setup.images, 1.0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_logits(setup, off, off), fake.apply(setup.qvars, setup.images, 0.0), rtol=1e-5, atol=1e-5)
  first = setup.plan.lowerable[0]
  act_only = _logits(setup, {**on, first: jnp.bool_(False)}, on)
  weight_only = _logits(setup, on, {**on, first: jnp.bool_(False)})
  assert not np.allclose(act_only, _logits(setup, on, on)) and not np.allclose(weight_only, act_only)


def test_layer_kinds(setup):
  kinds = {p: layer_diagnosis.layer_kind(p, setup.plan.layers[p]) for p in setup.plan.quantized}
  assert kinds["dw"] == "depthwise" and kinds["grouped"] == "grouped conv" and kinds["conv"] == "conv 3x3"
  assert kinds["fc1"] == "dense"


def test_fixes_variants_override_only_their_fields():
  from configs import quickstart
  base = quickstart.get_config("smoke")
  config = fixes_variants.override(base, fixes_variants.VARIANTS["joint_sandwich_lsq"])
  assert config.quant.weight_scale == "joint" and tuple(config.finetune.every_step_ratios) == (0.0, 1.0)
  assert config.finetune.lsq and config.finetune.lsq_grad_scale == "effective"
  assert config.finetune.lsq_learning_rate == base.compare.lsq_learning_rate
  assert base.quant.weight_scale == "max112" and not base.finetune.lsq  # the base config is untouched


def test_a_variant_the_judge_refused_is_reported_and_the_others_still_render():
  from configs import quickstart
  base = quickstart.get_config("smoke")
  info = {"command": "python -m experiments.flexiq_fixes", "commit": "c0ffee", "device": "cpu", "date": "d"}
  point = lambda r, t: {"ratio": r, "top1": t, "kl": 0.01}
  rows = {"max112": {"overrides": {}, "before": [point(0.0, 88.0), point(1.0, 80.0)],
                     "after": [point(0.0, 88.5), point(1.0, 84.0)]},
          "lsq": {"overrides": {"finetune.lsq": True}, "refused": "ratio 1: top-1 fell 5.00 points (> 2.0)"}}
  text = fixes_variants.render(base, info, {"top1": 88.6, "num_examples": 500}, rows, [0.0, 1.0])
  assert "| max112 |" in text and "88.50 / 0.0100" in text
  assert "Refused by the finetune judge" in text and "- lsq: ratio 1: top-1 fell 5.00 points" in text
  assert "| lsq | finetune.lsq=True | - | - | - | - |" in text
