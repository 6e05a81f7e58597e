r"""flexiq_jax entry point.

  python run.py --config=configs/quickstart.py [--workdir=workdirs/quickstart] [--mode=all]
  python run.py --config=vit_b.py:fmnist,smoke     # a bare name is looked up in configs/
  python run.py --version                           # the flexiq_jax release

Modes run the pipeline up to a stage: train -> eval -> calibrate -> select -> quantize -> finetune,
and `sweep` (evaluate config.sweep.ratios before and, if finetuned, after finetuning). `all` runs
every stage and the sweep; `compare` runs the method comparison; `export` runs up to finetune and
writes the portable export (jax.export module, weights, encodings) to <workdir>/export; `report`
writes the per-layer report of the finished run (--report_ratio=0.5) to <workdir>/report. Each stage
reuses the saved output of the stages before it. --workdir defaults to workdirs/<config name>[_<args>].
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

import flexiq_jax
from flexiq_jax import api
from flexiq_jax import cli
from flexiq_jax import evaluate
from flexiq_jax import host_memory
from flexiq_jax import parallel
from flexiq_jax import pipeline
from flexiq_jax import records
from flexiq_jax import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go "
                               "(default: workdirs/<config name>[_<args>]).")
_MODE = flags.DEFINE_enum("mode", "all", pipeline.STAGES + ("sweep", "all", "compare", "export", "report"),
                          "Pipeline stage(s) to run; 'report' writes the per-layer report of the finished run.")
_REPORT_RATIO = flags.DEFINE_float("report_ratio", 0.5, "--mode=report: the 4-bit ratio in [0, 1] the per-layer "
                                   "columns are given at.")
_FORCE_FROM = flags.DEFINE_enum("force_from", None, ["train", "calibrate", "select", "quantize", "finetune"],
                                "Redo this stage and the ones after it (their old outputs are moved to "
                                "<workdir>/replaced/; serving/ and export/ only once a new finetune is accepted).")
flags.mark_flags_as_required(["config"])


@cli.guarded
def main(argv):
  config, mode = _CONFIG.value, _MODE.value
  workdir = cli.start(argv, _WORKDIR.value)
  records.git_commit()  # pin the provenance to the code at start
  parallel.maybe_initialize_distributed(config.distributed)
  read_only = workdir_lib.read_only_reason(workdir) if workdir_lib.process_zero() else None
  if read_only:  # evaluate what the workdir holds, write nothing (no lock, record or results)
    workdir_lib.check_read_only_mode(workdir, read_only, mode, _FORCE_FROM.value)
    print(f"note: workdir {workdir} is read-only ({read_only}): --mode={mode} reuses the stages it holds and "
          "writes nothing there (no lock, run record, results.json, ratio table or TensorBoard events)")
    _run(pipeline.Run(config, workdir, read_only=True), mode, None)
    return
  run = pipeline.Run(config, workdir)
  # One run at a time per workdir; runs/<timestamp>.json records this one, and results.json is
  # derived from the finished runs only when it ends (a failed run leaves it untouched).
  with workdir_lib.locked(workdir), workdir_lib.RunRecord(workdir, config) as record:
    if _FORCE_FROM.value:
      pipeline.replace_stages(workdir, _FORCE_FROM.value)
    _run(run, mode, record)
  print(f"results: {os.path.join(workdir, 'results.json')}")


def _run(run, mode, record):
  config, workdir = run.config, run.workdir
  if mode == "compare":  # every method x ratio/BOPs point (flexiq_jax.compare)
    from flexiq_jax import compare
    compare.main(run, record)  # returns the results dict: not an exit status for app.run
    return
  if mode == "report":  # per-layer Markdown/JSON/plot of what the workdir holds (flexiq_jax.report)
    try:
      written = api.report(workdir, report_ratio=_REPORT_RATIO.value)
    except (FileNotFoundError, ValueError, TypeError) as e:
      raise SystemExit(f"error: {e}") from None
    print(f"report: {written.markdown_path}")
    return
  if mode == "export":  # the finetuned model as a portable jax.export artifact (flexiq_jax.export_run)
    pipeline.run_until(run, "finetune", evaluate=False)
    print(f"export: {api.export_run(workdir).directory}")
    return

  until = "finetune" if mode in ("all", "sweep") else mode
  if mode == "sweep":  # evaluate what exists; never train a finetune that is not there
    result = pipeline.run_until(run, "quantize")
    tuned = pipeline.finetuned_if_done(run, result.float_model, result.quantized)
  else:
    result = pipeline.run_until(run, until)
    tuned = result.finetuned
  if result.float_metrics is not None and not run.read_only:
    records.update_results(workdir, config, "float", result.float_metrics, record=record)
  if mode in ("sweep", "all"):
    before = pipeline.sweep(run, result.quantized, desc="before finetuning", float_logits=result.float_logits)
    after = pipeline.sweep(run, tuned, desc="after finetuning", float_logits=result.float_logits) if tuned else None
    rows = evaluate.ratio_rows(before, after)
    if run.read_only:
      return
    records.update_results(workdir, config, "ratio_sweep", rows, record=record)
    if workdir_lib.process_zero():
      print(evaluate.write_ratio_report(workdir, rows, result.float_metrics,
                                        f"FlexiQ ratio sweep: {config.model.name} on {config.data.name}"))


if __name__ == "__main__":
  if "--version" in sys.argv[1:]:  # before flag parsing: --config is not needed to ask the version
    print(f"flexiq_jax {flexiq_jax.__version__}")
    sys.exit(0)
  cli.print_help_and_exit(sys.argv, __doc__)
  host_memory.rerun_with_tcmalloc()  # where installed: XLA:CPU's buffers reused, not faulted in on every call
  sys.argv = cli.resolve_config_argv(sys.argv)
  app.run(main, flags_parser=cli.parse_flags)
