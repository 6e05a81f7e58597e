"""Calibration stage: per-layer activation statistics, 8-bit scales and 4-bit extraction positions."""

from flexiq_jax.calibrate.statistics import (AbsHistograms, ChannelRanges, CodeHistograms, calibrate, check_finite,
                                             code_moments, collect, weight_extraction)
