"""The comparison harness (`run.py --mode=compare`) and its uniform baselines."""

from flexiq_jax.compare.harness import ALL_METHODS, run_compare, write_reports

__all__ = ["ALL_METHODS", "run_compare", "write_reports"]


def main(config, workdir, mesh=None) -> None:
  """`run.py --mode=compare`: float model (trained or reused), its top-1, then every method."""
  from flexiq_jax import experiment
  from flexiq_jax import reporting
  model, variables = experiment.train_float(config, workdir, mesh)
  float_metrics = experiment.evaluate_float(config, workdir, model, variables, mesh)
  results = run_compare(config, workdir, model, variables, mesh, float_metrics)
  reporting.update_results(workdir, config, "compare", results["rows"])
  print(open(f"{workdir}/compare/compare_table.md").read())
