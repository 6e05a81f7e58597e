"""Multi-ratio QAT: the step trains, samples configured levels, LSQ scales learn, resume is exact."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flexiq_jax import pipeline, finetune, inspect_model, quantize
from tests.test_flexiq import setup  # noqa: F401  (module-scoped fixture)


def _batch(images):
  labels = jnp.asarray(np.arange(images.shape[0]) % 5, jnp.int32)
  return {"image": images, "label": labels}


@pytest.mark.parametrize("lsq", [False, True])
def test_qat_step_reduces_loss_and_samples_levels(setup, lsq):  # noqa: F811
  model, variables, plan, folded, calib, qvars, images = setup
  fake = quantize.QuantizedModel(model, plan, mode="fake", lsq=lsq)
  tx = optax.adam(3e-3)
  state = finetune.create_state(qvars, tx, lsq)
  teacher = lambda x: model.apply(variables, x, train=False)
  step = jax.jit(functools.partial(finetune.qat_step, qmodel=fake, tx=tx, levels=[0.5, 1.0],
                                   level_probs=[0.0, 1.0], rng_key=jax.random.PRNGKey(0), teacher_fn=teacher,
                                   distill_weight=0.3))
  batch = _batch(images)
  first = None
  for _ in range(25):
    state, metrics = step(state, batch)
    first = first if first is not None else float(metrics["loss"])
    assert float(metrics["ratio"]) == 1.0  # probability 1 on level 1.0
  assert float(metrics["loss"]) < first
  merged = finetune.merge_qvars(state.trainable, state.frozen)
  old = inspect_model.get_path(qvars["quant"], "conv")["act_scale"]
  new = inspect_model.get_path(merged["quant"], "conv")["act_scale"]
  assert (float(new) != float(old)) == lsq  # scales learn only under LSQ
  np.testing.assert_array_equal(inspect_model.get_path(merged["quant"], "conv")["rank"],
                                inspect_model.get_path(qvars["quant"], "conv")["rank"])


class Crash(Exception):
  pass


def test_killed_finetune_resumes_to_identical_weights(smoke_config, tmp_path):
  smoke_config.finetune.num_epochs = 0.75  # 6 steps of 32 on the tiny 256-image set
  smoke_config.finetune.batch_size = 32
  smoke_config.finetune.checkpoint_every_steps = 2
  smoke_config.select.selector = "greedy"
  workdir = str(tmp_path / "pipeline")
  model, variables = pipeline.train_float(smoke_config, workdir)
  plan, folded, calib = pipeline.calibrate_stage(smoke_config, workdir, model, variables)
  orders, counts, levels = pipeline.select_stage(smoke_config, workdir, model, variables, plan, folded, calib)
  qmodel, qvars = pipeline.quantize_stage(smoke_config, workdir, model, plan, folded, calib, orders, counts,
                                            levels)
  full = pipeline.finetune_stage(smoke_config, str(tmp_path / "full"), model, variables, qmodel, qvars)

  def crash_at_3(step):
    if step == 3:
      raise Crash()

  crash_dir = str(tmp_path / "crash")
  with pytest.raises(Crash):
    pipeline.finetune_stage(smoke_config, crash_dir, model, variables, qmodel, qvars, on_step=crash_at_3)
  saved = [int(d) for d in os.listdir(os.path.join(crash_dir, "finetune", "checkpoints")) if d.isdigit()]
  assert max(saved) == 2
  resumed = pipeline.finetune_stage(smoke_config, crash_dir, model, variables, qmodel, qvars)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), full, resumed)
  # Finetuning changed the weights but not the selection.
  assert not np.allclose(full["params"]["layer1_0"]["conv1"]["kernel"], qvars["params"]["layer1_0"]["conv1"]["kernel"])
  np.testing.assert_array_equal(full["quant"]["layer1_0"]["conv1"]["counts"], qvars["quant"]["layer1_0"]["conv1"]["counts"])
