"""Evaluate stage: ratio sweeps and their reports."""

from flexiq_jax.evaluate.report import ratio_rows, write_ratio_report
