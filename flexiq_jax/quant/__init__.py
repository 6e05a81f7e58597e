"""Numeric core of the quantization (no Flax): grids, STE, LSQ, bit extraction, range fits."""

from flexiq_jax.quant.core import (code_histogram, extraction_errors_from_histogram,
                                   fit_extraction_from_histogram, int_range, lower_codes, lower_codes_ste,
                                   lsq_fake_quant, mse_range_from_histogram, percentile_range_from_histogram,
                                   round_ste)
