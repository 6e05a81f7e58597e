r"""flexiq_jax entry point.

  python run.py --config=configs/quickstart.py --workdir=workdirs/quickstart [--mode=all]

Modes run pipeline stages; each stage reuses the saved output of the stages before it.
"""

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

from flexiq_jax import experiment
from flexiq_jax import parallel
from flexiq_jax import reporting

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
MODES = ("train", "eval", "all")
_MODE = flags.DEFINE_enum("mode", "all", MODES, "Pipeline stage(s) to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  parallel.maybe_initialize_distributed(config.distributed)
  mesh = parallel.make_mesh()
  model, variables = experiment.train_float(config, workdir, mesh)
  if mode in ("eval", "all"):
    metrics = experiment.evaluate_float(config, workdir, model, variables, mesh)
    reporting.update_results(workdir, config, "float", metrics)
  print(f"results: {workdir}/results.json")


if __name__ == "__main__":
  app.run(main)
