"""The method comparison (`run.py --mode=compare`): a registry of methods with one signature,
the uniform baselines, and the reports."""

from flexiq_jax.compare.harness import ALL_METHODS, METHODS, CompareContext, Row, run_compare, write_reports

__all__ = ["ALL_METHODS", "METHODS", "CompareContext", "Row", "main", "run_compare", "write_reports"]


def main(run, record=None) -> dict:
  """`run.py --mode=compare`: float model (trained or reused), its top-1, then every method.

  Args:
    run: the `pipeline.Run` (config, workdir, mesh).
    record: the invocation's `workdir.RunRecord` (None: results.json is written directly).

  Returns:
    The comparison's results dict (rows, float metrics, provenance).
  """
  from flexiq_jax import pipeline
  from flexiq_jax import records
  result = pipeline.run_until(run, "eval")
  results = run_compare(run, result.float_model, result.float_metrics, float_logits=result.float_logits)
  records.update_results(run.workdir, run.config, "compare", results["rows"], record=record)
  with open(f"{run.workdir}/compare/compare_table.md") as f:
    print(f.read())
  return results
