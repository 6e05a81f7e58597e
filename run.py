r"""flexiq_jax entry point.

  python run.py --config=configs/quickstart.py --workdir=workdirs/quickstart [--mode=all]

Modes run the pipeline up to a stage: train -> eval -> calibrate -> select -> quantize -> finetune,
and `sweep` (evaluate config.sweep.ratios before and, if finetuned, after finetuning). `all` runs
every stage and the sweep. Each stage reuses the saved output of the stages before it.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from flexiq_jax import evaluate
from flexiq_jax import experiment
from flexiq_jax import parallel
from flexiq_jax import reporting

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
STAGES = ("train", "eval", "calibrate", "select", "quantize", "finetune")
_MODE = flags.DEFINE_enum("mode", "all", STAGES + ("sweep", "all", "compare"), "Pipeline stage(s) to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  reporting.git_commit()  # pin the provenance to the code at start
  parallel.maybe_initialize_distributed(config.distributed)
  mesh = parallel.make_mesh()
  if mode == "compare":  # every method x ratio/BOPs point (flexiq_jax.compare)
    from flexiq_jax import compare
    return compare.main(config, workdir, mesh)
  last = len(STAGES) if mode in ("all", "sweep") else STAGES.index(mode) + 1
  finetuned = mode == "all" or (mode == "sweep" and os.path.isdir(os.path.join(workdir, "finetune", "checkpoints")))

  model, variables = experiment.train_float(config, workdir, mesh)
  float_metrics = None
  if last >= 2:
    float_metrics = experiment.evaluate_float(config, workdir, model, variables, mesh)
    reporting.update_results(workdir, config, "float", float_metrics)
  if last >= 3:
    plan, folded, calib = experiment.calibrate_stage(config, workdir, model, variables)
  if last >= 4:
    orders, counts, levels = experiment.select_stage(config, workdir, model, variables, plan, folded, calib)
  if last >= 5:
    qmodel, qvars = experiment.quantize_stage(config, workdir, model, plan, folded, calib, orders, counts, levels)
  if mode in ("sweep", "all"):
    before = experiment.sweep(config, qmodel, qvars, mesh, desc="before finetuning")
  if last >= 6 and (mode != "sweep" or finetuned):
    qvars = experiment.finetune_stage(config, workdir, model, variables, qmodel, qvars, mesh)
    experiment.save_finetuned(workdir, qvars)
    experiment.save_serving(workdir, qmodel, qvars)
  if mode in ("sweep", "all"):
    after = experiment.sweep(config, qmodel, qvars, mesh, desc="after finetuning") if finetuned else None
    rows = evaluate.ratio_rows(before, after)
    reporting.update_results(workdir, config, "ratio_sweep", rows)
    text = evaluate.write_ratio_report(workdir, rows, float_metrics,
                                       f"FlexiQ ratio sweep: {config.model.name} on {config.data.name}")
    print(text)
  print(f"results: {os.path.join(workdir, 'results.json')}")


if __name__ == "__main__":
  app.run(main)
