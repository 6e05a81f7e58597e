"""The numeric core of FlexiQ quantization: pure `jax.numpy`, no Flax (DESIGN §4).

* `quantizers`: integer grids, quantize/dequantize, fake quant with the clipped STE, LSQ, and
  scales from ranges.
* `calibration`: min-max, percentile and MSE ranges, exact or streamed through histograms.
* `extraction`: FlexiQ's 8 -> 4-bit lowering by bit extraction and its per-channel fit.

Conventions shared by all three: `axis` is the channel axis that is *kept* (None = per tensor);
codes are integers held in float arrays unless stated; every function is jit-compatible with its
Python-valued configuration (bits, flags, axis, candidates) static.
"""

from flexiq_jax.quant.calibration import (DEFAULT_NUM_BINS, histogram, histogram_edges, histogram_update,
                                          minmax_range, mse_range, mse_range_from_histogram, occupied_range,
                                          percentile_range, percentile_range_from_histogram, shrink_factors)
from flexiq_jax.quant.extraction import (DEFAULT_CANDIDATES, code_histogram, extraction_errors,
                                         extraction_errors_from_histogram, fit_extraction,
                                         fit_extraction_from_histogram, lower_codes, lower_codes_ste,
                                         lowering_error, lowering_error_from_histogram, naive_extraction)
from flexiq_jax.quant.quantizers import (MIN_RANGE, dequantize, fake_quant, int_range, lsq_default_grad_scale,
                                         lsq_fake_quant, quantize, round_ste, scale_from_range)
from flexiq_jax.quant.shapes import channels_first, expand_to_axis

__all__ = [
    "DEFAULT_CANDIDATES", "DEFAULT_NUM_BINS", "MIN_RANGE", "channels_first", "code_histogram", "dequantize",
    "expand_to_axis", "extraction_errors", "extraction_errors_from_histogram", "fake_quant", "fit_extraction",
    "fit_extraction_from_histogram", "histogram", "histogram_edges", "histogram_update", "int_range",
    "lower_codes", "lower_codes_ste", "lowering_error", "lowering_error_from_histogram",
    "lsq_default_grad_scale", "lsq_fake_quant", "minmax_range", "mse_range", "mse_range_from_histogram",
    "naive_extraction", "occupied_range", "percentile_range", "percentile_range_from_histogram", "quantize",
    "round_ste", "scale_from_range", "shrink_factors",
]
