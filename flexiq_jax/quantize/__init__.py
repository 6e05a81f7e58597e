"""Quantize stage: the plan (which layers, BN folding), layer ops and the run-time-ratio transform."""

from flexiq_jax.quantize.plan import QuantPlan, apply_with_layers, bn_epsilons, build_plan, fold_batchnorm
from flexiq_jax.quantize.transform import (QuantizedModel, build_qvars, check_ratio, export_int8,
                                           low_bit_share_at, lowered_channels, make_predict,
                                           relative_bops_at)
