"""Finetune stage: multi-ratio quantization-aware training."""

from flexiq_jax.finetune.finetune import QATState, create_state, kl_divergence, merge_qvars, qat_step, split_qvars
