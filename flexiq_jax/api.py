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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.typing import ArrayLike

from flexiq_jax import artifacts
from flexiq_jax import adapt as adapt_lib
from flexiq_jax import checkpoint
from flexiq_jax import contract
from flexiq_jax import models
from flexiq_jax import quantize as quantize_lib
from flexiq_jax import records
from flexiq_jax import stage_options
from flexiq_jax import stages
from flexiq_jax import train as train_lib
from flexiq_jax.quantize import make_predict  # noqa: F401  (re-exported)
from flexiq_jax.evaluate.layer_report import LayerReport, report  # noqa: F401  (re-exported)
from flexiq_jax.quantize.export import PortableExport, export_portable, load_portable  # noqa: F401  (re-exported)
from flexiq_jax.fitness import SelectionFitness
from flexiq_jax.stage_results import Calibration, FloatModel


def quantize_model(model: Any, variables: Any = None, calib_images: ArrayLike | None = None, *,
                   apply_fn: Callable | None = None, calibrate: stage_options.CalibrateOptions | None = None,
                   select: stage_options.SelectOptions | None = None,
                   quantize: stage_options.QuantizeOptions | None = None, fitness_images: int = 256,
                   **options: Any) -> tuple[quantize_lib.QuantizedModel, dict]:
  """FlexiQ on a model, in memory: the pipeline's calibrate, select and quantize stages
  (`flexiq_jax.stages`), chained without a workdir.

  `qmodel.apply(qvars, images, ratio)` takes the ratio as a traced argument.

  Args:
    model: a Flax linen module, called as `model.apply(variables, images, train=False)` (`train`
      only where its `__call__` takes it), or a Flax NNX module (`quantize_model(nnx_model,
      calib_images)`; its layers are intercepted as linen ones, `flexiq_jax.interception_nnx`).
    variables: the linen model's variables ({'params', 'batch_stats'?}); an NNX module holds its own.
    calib_images: (N, H, W, C) unlabelled calibration images.
    apply_fn: the call to make instead of the default: `(variables, images) -> logits` for a linen
      model, `(module, images) -> logits` for an NNX module.
    calibrate: CalibrateOptions (default: its defaults; `batch_size` splits `calib_images`).
    select: SelectOptions (default: its defaults: evolutionary search at levels 0.25..1).
    quantize: QuantizeOptions.
    fitness_images: how many of `calib_images` the evolutionary search scores candidates on.
    **options: keyword convenience: any field of the three options classes by name (`levels`,
      `selector`, `population`, `act_calibration`, `bias_correction`, `keep_8bit`, ...; the
      calibration batch size as `calib_batch_size`), replacing the field in every class that
      has it.

  Returns:
    (qmodel, qvars): a `quantize.QuantizedModel` (integer path) and its variables.

  Raises:
    ValueError: If `calib_images` is not 4-D.
    TypeError: If `options` names an unknown field, or `model` / `variables` / `calib_images` do
      not fit the model kind (`adapt.adapt`).
  """
  model, variables, calib_images = adapt_lib.adapt(model, variables, calib_images, apply_fn=apply_fn)
  calib_images = np.asarray(calib_images, np.float32)
  if calib_images.ndim != 4:
    raise ValueError(f"calib_images must be (N, H, W, C), got shape {calib_images.shape}")
  if "calib_batch_size" in options:
    options["batch_size"] = options.pop("calib_batch_size")
  classes = ((stage_options.CalibrateOptions, calibrate), (stage_options.SelectOptions, select),
             (stage_options.QuantizeOptions, quantize))
  known = {f.name for cls, _ in classes for f in dataclasses.fields(cls)}
  unknown = sorted(set(options) - known)
  if unknown:
    raise TypeError(f"quantize_model() got unknown option(s) {', '.join(unknown)}")
  calibrate, select, quantize = (_with(cls, given, options) for cls, given in classes)
  float_model = FloatModel(model, variables)
  size = calibrate.batch_size
  batches = [jnp.asarray(calib_images[i:i + size]) for i in range(0, len(calib_images), size)]
  calibration = stages.calibrate(float_model, batches, calibrate)
  selection = stages.select(float_model, calibration, calib_images[:fitness_images], select).selection
  quantized = stages.quantize(float_model, calibration, selection, quantize)
  return quantized.qmodel, quantized.qvars


def _with(cls, given, options: dict):
  """`given` (or the defaults of `cls`) with those keyword `options` that are fields of `cls`."""
  names = {f.name for f in dataclasses.fields(cls)}
  return dataclasses.replace(given or cls(), **{k: v for k, v in options.items() if k in names})


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  """A finished run read back from its workdir: the resolved config, the float model and the
  quantized model with its int8 serving variables (no float kernels)."""

  config: ml_collections.ConfigDict
  float_model: FloatModel
  qmodel: quantize_lib.QuantizedModel
  qvars: dict
  serving_fingerprint: str | None = None  # of serving/ (artifacts.tree_fingerprint); None: written before manifests

  @property
  def input_spec(self) -> contract.InputSpec:
    """The serving contract's input spec (shape, dtype, normalisation; docs/serving.md)."""
    return contract.InputSpec.from_config(self.config)

  def predict(self, tune_images: ArrayLike | None = None) -> Callable[..., jax.Array]:
    """`quantize.make_predict` on the serving variables, checking its inputs against
    `input_spec` (`predict(images, ratio, preprocess=True)` takes raw uint8 images).

    Args:
      tune_images: if given, each conv's implementation is chosen by measurement at that batch
        shape first.

    Returns:
      `predict(images, ratio, preprocess=False) -> logits`.
    """
    return make_predict(self.qmodel, self.qvars, tune_images=tune_images, input_spec=self.input_spec)


def _require(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {what}")
  return path


def load_quantized(workdir: str) -> LoadedRun:
  """Reads <workdir>/config.json, the float checkpoint in float/ and the serving export in
  serving/ (written when a run's finetuning finishes) back into models and variables.

  Args:
    workdir: The --workdir of a run.py run whose finetuning finished.

  Returns:
    The LoadedRun: config, float model, integer-path QuantizedModel, int8 serving variables (with
    their fill table) and the serving fingerprint (None for a serving/ without manifest).

  Raises:
    FileNotFoundError: If config.json, serving/plan.json, float/done.json or an intact float
      checkpoint is missing.
    artifacts.StaleArtifact: If serving/ does not match its manifest.
  """
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
  state = _restore_float(os.path.join(workdir, "float", "checkpoints"), abstract, float_done.get("total_steps"))
  qvars = checkpoint.load_tree(os.path.join(workdir, "serving", "qvars_int8"))
  fingerprint = artifacts.check_serving(workdir, qvars, records.read_json(os.path.join(workdir, "serving", "plan.json")))
  if "fill" not in qvars:  # an export written before the fill table existed
    qvars = quantize_lib.add_fill_table(plan, qvars)
  return LoadedRun(config, FloatModel(model, state.variables()), quantize_lib.QuantizedModel(model, plan, mode="int"),
                   qvars, fingerprint)


def _restore_float(ckpt_dir: str, abstract, final_step: int | None):
  """The float model from the newest intact checkpoint of `ckpt_dir` (a damaged newer step is
  skipped with a warning, as run.py does; the workdir is only read)."""
  mngr = checkpoint.manager(ckpt_dir)
  try:
    step, state = checkpoint.restore_newest_intact(mngr, abstract, remove_damaged=False)
  finally:
    mngr.close()
  if step is None:
    raise FileNotFoundError(f"{ckpt_dir} holds no float checkpoint: the float model was never trained here")
  if final_step is not None and step != final_step:
    print(f"warning: the float model loaded is step {step}, not the final step {final_step} (damaged); it is only "
          f"the float reference: the serving model does not depend on it")
  return state


EXPORT_DIR = "export"


def export_run(workdir: str, directory: str | None = None, *,
               platforms: Sequence[str] | None = None) -> PortableExport:
  """The portable export (`quantize.export.export_portable`: a `jax.export` module of the integer
  path with the ratio as an input, the serving weights as safetensors, the encodings JSON) of the
  finished run in `workdir`, to `directory` (default <workdir>/export).

  Args:
    workdir: The --workdir of a finished run.py run.
    directory: Output directory; default <workdir>/export.
    platforms: Optional jax.export platforms to lower for (export_portable's default otherwise).

  Returns:
    The PortableExport written.

  Raises:
    FileNotFoundError: If the run cannot be loaded (`load_quantized`).
    artifacts.StaleArtifact: If serving/ does not match its manifest.
  """
  run = load_quantized(workdir)
  shape = (run.config.data.image_size, run.config.data.image_size, run.config.data.channels)
  return export_portable(run.qmodel, run.qvars, directory or os.path.join(workdir, EXPORT_DIR), shape,
                         platforms=platforms, input_spec=run.input_spec.to_json(),
                         serving_fingerprint=run.serving_fingerprint)
