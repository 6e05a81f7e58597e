"""Calibration stage: per-layer activation statistics, 8-bit scales and 4-bit extraction positions."""

from flexiq_jax.calibrate.calibrate import calibrate, weight_extraction
