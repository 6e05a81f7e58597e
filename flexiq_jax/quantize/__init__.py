"""Quantize stage: the plan (which layers, BN folding), FlexiQ's layer arithmetic and the
run-time-ratio transform."""

from flexiq_jax.quantize.plan import QuantPlan, build_plan, fold_batchnorm, unfolded_batch_stats
from flexiq_jax.quantize.transform import (FlexiQLayers, add_lsq_weight_scales, QuantizedModel, build_qvars, check_ratio,
                                           default_conv_accumulator, export_int8, low_bit_share_at,
                                           lowered_channels, make_predict, relative_bops_at)
