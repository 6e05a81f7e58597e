"""The notebook API (flexiq_jax.api, exported at the top level): quantize_model in memory,
make_predict (any ratio, one compilation), load_quantized of a finished run.py run, and the
README's example executed as written."""

import dataclasses
import os
import re

import jax
import numpy as np
import pytest

import flexiq_jax
from conftest import ROOT
from flexiq_jax import checkpoint
from flexiq_jax import models
from flexiq_jax import pipeline
from flexiq_jax import quantize
from flexiq_jax.interception import get_path


@dataclasses.dataclass(frozen=True)
class TracedModel(quantize.QuantizedModel):
  """A QuantizedModel that records each trace of `apply`: jit traces once per compilation."""

  traces: list = dataclasses.field(default_factory=list, compare=False)

  def apply(self, qvars, x, ratio):
    self.traces.append(ratio)
    return super().apply(qvars, x, ratio)


@pytest.fixture(scope="module")
def resnet_small():
  model = models.create("resnet_small", num_classes=10)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32), train=False)
  images = np.random.default_rng(0).uniform(0, 1, (64, 28, 28, 1)).astype(np.float32)
  return model, variables, images


def test_quantize_model_and_make_predict_serve_every_ratio_with_one_compilation(resnet_small):
  model, variables, images = resnet_small
  qmodel, qvars = flexiq_jax.quantize_model(model, variables, images, levels=(0.5, 1.0), selector="greedy")
  assert isinstance(qmodel, quantize.QuantizedModel) and qmodel.mode == "int"
  assert qmodel.plan.lowerable and qmodel.plan.quantized[0] not in qmodel.plan.lowerable  # 'first' kept 8-bit
  np.testing.assert_array_equal(qvars["levels"], [0.5, 1.0])
  traced = TracedModel(qmodel.model, qmodel.plan, qmodel.mode)
  predict = flexiq_jax.make_predict(traced, qvars)
  x = images[:8]
  logits = {r: np.asarray(predict(x, r)) for r in (0.0, 0.5, 1.0)}
  assert len(traced.traces) == 1  # the ratio is data: one trace, one compilation for all three
  for out in logits.values():
    assert out.shape == (8, 10) and np.isfinite(out).all()
  assert not np.allclose(logits[0.0], logits[1.0])
  np.testing.assert_allclose(logits[0.5], qmodel.apply(qvars, x, 0.5), rtol=1e-5, atol=1e-6)  # = the plain apply
  # 8 bits everywhere is closer to the float model than 4 bits on every lowerable channel.
  ref = np.asarray(model.apply(variables, x, train=False))
  assert np.abs(logits[0.0] - ref).max() < np.abs(logits[1.0] - ref).max()
  with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\]"):
    predict(x, 1.5)
  assert len(traced.traces) == 1


def test_quantize_model_rejects_bad_arguments(resnet_small):
  model, variables, images = resnet_small
  with pytest.raises(ValueError, match=r"calib_images must be \(N, H, W, C\)"):
    flexiq_jax.quantize_model(model, variables, images[..., 0], selector="greedy")
  with pytest.raises(ValueError, match="levels must be increasing"):
    flexiq_jax.quantize_model(model, variables, images, levels=(1.0, 0.5), selector="greedy")


def test_load_quantized_gives_the_runs_logits(finished_run):
  loaded = flexiq_jax.load_quantized(finished_run.workdir)
  assert isinstance(loaded, flexiq_jax.LoadedRun)
  assert loaded.config.model.name == "resnet_small" and loaded.config.train.batch_size == 32
  x = np.random.default_rng(1).uniform(0, 1, (8, 28, 28, 1)).astype(np.float32)
  # The serving variables hold int8 kernels, not the float weights ...
  first = loaded.qmodel.plan.quantized[0]
  assert str(get_path(loaded.qvars["params"], first)["kernel"].dtype) == "int8"
  # ... and give the finetuned model's logits at every ratio.
  tuned = checkpoint.load_tree(os.path.join(finished_run.workdir, "finetune", "qvars"))
  predict, reference = loaded.predict(), jax.jit(loaded.qmodel.apply)
  for ratio in (0.0, 0.5, 1.0):
    np.testing.assert_allclose(predict(x, ratio), reference(tuned, x, ratio), rtol=1e-6, atol=1e-6)
  # The config read back from config.json keys the same stages: the float model is reused as is.
  run = pipeline.Run(loaded.config, finished_run.workdir)
  calls = []
  float_model = pipeline.train_float(run, on_step=calls.append)
  assert calls == []
  jax.tree.map(np.testing.assert_array_equal, loaded.float_model.variables, float_model.variables)


def test_load_quantized_of_a_workdir_without_a_run(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json not found: is this the --workdir of a run.py run"):
    flexiq_jax.load_quantized(str(tmp_path))


def readme_api_example() -> str:
  """The ```python block after README.md's `<!-- api-example -->` marker."""
  text = open(os.path.join(ROOT, "README.md")).read()
  marker = "<!-- api-example -->"
  if marker not in text:
    pytest.fail(f"README.md has no {marker} marker before its API example")
  match = re.match(r"\s*```python\n(.*?)\n```", text[text.index(marker) + len(marker):], re.S)
  if match is None:
    pytest.fail(f"README.md's {marker} marker is not followed by a ```python block")
  return match.group(1)


def test_readme_api_example_runs_as_written():
  code = readme_api_example()
  assert "flexiq_jax.quantize_model" in code and "make_predict" in code
  namespace = {"__name__": "readme_example"}
  exec(compile(code, "README.md:api-example", "exec"), namespace)
  logits = np.asarray(namespace["logits"])
  assert logits.ndim == 2 and logits.shape[-1] == 10 and np.isfinite(logits).all()
