"""The notebook API: quantize a linen model in memory, or load a finished run back.

  qmodel, qvars = flexiq_jax.quantize_model(model, variables, calib_images)
  predict = flexiq_jax.make_predict(qmodel, qvars)
  logits = predict(images, 0.5)   # half of the lowerable MACs in 4 bits; any ratio, one compilation

  run = flexiq_jax.load_quantized("workdirs/quickstart")   # float + quantized model of a finished run
  flexiq_jax.export_run("workdirs/quickstart")             # portable jax.export artifact in <workdir>/export
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flexiq_jax import calibrate as calibrate_lib
from flexiq_jax import checkpoint
from flexiq_jax import models
from flexiq_jax import quantize as quantize_lib
from flexiq_jax import records
from flexiq_jax import select as select_lib
from flexiq_jax import train as train_lib
from flexiq_jax.quantize import make_predict  # noqa: F401  (re-exported)
from flexiq_jax.quantize.export import PortableExport, export_portable, load_portable  # noqa: F401  (re-exported)
from flexiq_jax.fitness import SelectionFitness
from flexiq_jax.stage_results import Calibration, FloatModel


def quantize_model(model, variables, calib_images, *, levels: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
                   selector: str = "evolutionary", channel_order: str = "range", act_calibration: str = "minmax",
                   extraction: str = "fitted", bias_correction: bool = True,
                   keep_8bit: Sequence[str] = ("first", "last"), skip: Sequence[str] = (), fold_bn: bool = True,
                   attention: str = "int8", calib_batch_size: int = 128, fitness: str = "kl", fitness_images: int = 256,
                   population: int = 12, generations: int = 6, seed: int = 0):
  """FlexiQ on a linen model, in memory: calibrate on `calib_images` (N, H, W, C, unlabelled),
  select the 4-bit channels at each ratio level, and return `(qmodel, qvars)`: a
  `quantize.QuantizedModel` (integer path) and its variables. `qmodel.apply(qvars, images, ratio)`
  takes the ratio as a traced argument. The model is called as `model.apply(variables, images,
  train=False)`; the options mirror the config fields of `run.py` (configs/quickstart.py).
  """
  calib_images = np.asarray(calib_images, np.float32)
  if calib_images.ndim != 4:
    raise ValueError(f"calib_images must be (N, H, W, C), got shape {calib_images.shape}")
  levels = [float(l) for l in levels]
  if sorted(levels) != levels or not all(0 < l <= 1 for l in levels):
    raise ValueError(f"levels must be increasing values in (0, 1], got {levels}")
  float_model = FloatModel(model, variables)
  plan = quantize_lib.build_plan(model, variables, calib_images.shape[1:], skip=tuple(skip),
                                 keep_8bit=tuple(keep_8bit), fold_bn=fold_bn, attention=attention)
  folded = quantize_lib.fold_batchnorm(variables, plan)
  batches = [jnp.asarray(calib_images[i:i + calib_batch_size]) for i in range(0, len(calib_images), calib_batch_size)]
  stats = calibrate_lib.calibrate(model, plan, folded, batches, method=act_calibration, extraction=extraction)
  calibration = Calibration(plan.with_signedness(stats), folded, stats)
  layers = select_lib.LowerableLayers.of(calibration.plan, stats)
  orders = select_lib.channel_orders(channel_order, layers, seed)
  fitness_fn, options = None, {}
  if selector == "evolutionary":
    fitness_fn = SelectionFitness.build(float_model, calibration, orders, levels,
                                        jnp.asarray(calib_images[:fitness_images]), kind=fitness,
                                        bias_correction=bias_correction)
    options = {"population": population, "generations": generations}
  counts, _ = select_lib.select(selector, levels, layers.channels, layers.macs,
                                ranges=layers.ranges if channel_order == "range" else None,
                                lowering_error=layers.errors, fitness_fn=fitness_fn, seed=seed, **options)
  counts = {p: np.asarray(counts)[:, i] for i, p in enumerate(layers.paths)}
  qvars = quantize_lib.build_qvars(calibration.plan, folded, stats, orders, counts, levels,
                                   bias_correction=bias_correction)
  return quantize_lib.QuantizedModel(model, calibration.plan, mode="int"), qvars


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  """A finished run read back from its workdir: the resolved config, the float model and the
  quantized model with its int8 serving variables (no float kernels)."""

  config: ml_collections.ConfigDict
  float_model: FloatModel
  qmodel: quantize_lib.QuantizedModel
  qvars: dict

  def predict(self, tune_images=None):
    """`quantize.make_predict` on the serving variables (`tune_images`: choose each conv's
    implementation by measurement at that batch shape first)."""
    return make_predict(self.qmodel, self.qvars, tune_images=tune_images)


def _require(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {what}")
  return path


def load_quantized(workdir: str) -> LoadedRun:
  """Reads <workdir>/config.json, the float checkpoint in float/ and the serving export in
  serving/ (written when a run's finetuning finishes) back into models and variables."""
  config = ml_collections.ConfigDict(records.read_json(_require(
      os.path.join(workdir, "config.json"), "is this the --workdir of a run.py run?")))
  plan = quantize_lib.QuantPlan.from_json(records.read_json(_require(
      os.path.join(workdir, "serving", "plan.json"), "the run has no serving export; run.py writes it after finetuning")))
  float_done = records.read_json(_require(os.path.join(workdir, "float", "done.json"),
                                          "the float model was never trained here"))
  model = models.create(config.model.name, num_classes=float_done["num_classes"], **config.model.kwargs.to_dict())
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  tx = train_lib.make_optimizer(config.train, 1)
  abstract = jax.eval_shape(lambda: train_lib.create_train_state(model, jax.random.PRNGKey(0), shape, tx))
  state = checkpoint.restore(checkpoint.manager(os.path.join(workdir, "float", "checkpoints")), abstract)
  qvars = checkpoint.load_tree(os.path.join(workdir, "serving", "qvars_int8"))
  if "fill" not in qvars:  # an export written before the fill table existed
    qvars = quantize_lib.add_fill_table(plan, qvars)
  return LoadedRun(config, FloatModel(model, state.variables()), quantize_lib.QuantizedModel(model, plan, mode="int"),
                   qvars)


EXPORT_DIR = "export"


def export_run(workdir: str, directory: str | None = None, *, platforms=None) -> PortableExport:
  """The portable export (`quantize.export.export_portable`: a `jax.export` module of the integer
  path with the ratio as an input, the serving weights as safetensors, the encodings JSON) of the
  finished run in `workdir`, to `directory` (default <workdir>/export)."""
  run = load_quantized(workdir)
  shape = (run.config.data.image_size, run.config.data.image_size, run.config.data.channels)
  return export_portable(run.qmodel, run.qvars, directory or os.path.join(workdir, EXPORT_DIR), shape,
                         platforms=platforms)
