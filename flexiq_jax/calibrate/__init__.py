"""Calibration stage: per-layer activation statistics, 8-bit scales and 4-bit extraction positions."""

from flexiq_jax.calibrate.statistics import (AbsHistograms, ChannelRanges, CodeHistograms, calibrate, code_moments,
                                             collect, collect_quantized, refresh_after_finetuning,
                                             weight_extraction)
