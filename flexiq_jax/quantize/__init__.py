"""Quantize stage: the plan (which layers and matmuls, BN folding), FlexiQ's layer arithmetic,
the run-time-ratio transform, its serving form (`integer`, weights prepared once; per-conv
implementations tuned by `tuning`) and the report of what stays float in the integer path."""

from flexiq_jax.plan import ATTENTION_MODES, QuantPlan, build_plan, fold_batchnorm, unfolded_batch_stats
from flexiq_jax.quantize.report import (FloatOp, float_dot_ops, float_ops_in_int_path, float_ops_of_plan,
                                        format_float_ops)
from flexiq_jax.quantize.transform import (FlexiQLayers, add_fill_table, add_lsq_weight_scales, add_ratio_affine,
                                           QuantizedModel,
                                           build_qvars, check_ratio,
                                           default_conv_accumulator, export_int8, low_bit_share_at,
                                           lowered_channels, make_predict, relative_bops_at)
from flexiq_jax.quantize.tuning import tune_conv_impls
