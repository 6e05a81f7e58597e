"""The numeric core of FlexiQ quantization: pure `jax.numpy`, no Flax (DESIGN §4).

* `quantizers`: integer grids, quantize/dequantize, fake quant with the clipped STE, LSQ, and
  scales from ranges.
* `ranges`: min-max, percentile and MSE ranges, exact or streamed through histograms.
* `extraction`: FlexiQ's 8 -> 4-bit lowering by bit extraction and its per-channel fit.
* `packing`: 4-bit values packed two per byte (lowered weight rows at half the bytes).

Conventions shared by all three: `axis` is the channel axis that is *kept* (None = per tensor);
codes are integers held in float arrays unless stated; every function is jit-compatible with its
Python-valued configuration (bits, flags, axis, candidates) static.
"""

from flexiq_jax.numerics.ranges import (DEFAULT_NUM_BINS, histogram, histogram_edges, histogram_update,
                                          minmax_range, mse_range, mse_range_from_histogram, occupied_range,
                                          percentile_range, percentile_range_from_histogram, shrink_factors)
from flexiq_jax.numerics.extraction import (DEFAULT_CANDIDATES, code_histogram, extraction_errors,
                                         extraction_errors_from_histogram, fit_extraction,
                                         fit_extraction_from_histogram, lower_codes, lower_codes_ste,
                                         lowering_error, zero_point_candidates)
from flexiq_jax.numerics.quantizers import (MIN_RANGE, WEIGHT_QMAX_8BIT, dequantize, fake_quant,
                                            fake_quant_traced_bits, fake_quant_weight_traced_bits, int_range,
                                            lsq_default_grad_scale, lsq_fake_quant, per_channel_weight_scale,
                                            quantize, round_ste, scale_from_range, traced_int_range)
from flexiq_jax.numerics.packing import pack_int4, unpack_int4
from flexiq_jax.numerics.shapes import channels_first, expand_to_axis

__all__ = [
    "DEFAULT_CANDIDATES", "DEFAULT_NUM_BINS", "MIN_RANGE", "WEIGHT_QMAX_8BIT", "channels_first", "code_histogram", "dequantize",
    "expand_to_axis", "extraction_errors", "extraction_errors_from_histogram", "fake_quant",
    "fake_quant_traced_bits", "fake_quant_weight_traced_bits", "fit_extraction",
    "fit_extraction_from_histogram", "histogram", "histogram_edges", "histogram_update", "int_range",
    "lower_codes", "lower_codes_ste", "lowering_error",
    "lsq_default_grad_scale", "lsq_fake_quant", "minmax_range", "mse_range", "mse_range_from_histogram",
    "occupied_range", "pack_int4", "per_channel_weight_scale", "percentile_range", "percentile_range_from_histogram", "quantize",
    "round_ste", "scale_from_range", "shrink_factors", "traced_int_range", "unpack_int4", "zero_point_candidates",
]
