"""Calibration stage: per-layer activation statistics, 8-bit scales and 4-bit extraction positions."""

from flexiq_jax.calibrate.calibrate import (AbsHistograms, ChannelRanges, CodeHistograms, calibrate, collect,
                                            weight_extraction)
