"""Finetune stage: multi-ratio quantization-aware training (and the QAT step the baselines share)."""

from flexiq_jax.finetune.finetune import (QATState, RatioSampler, create_state, distill_step, kl_divergence, make_optimizer,
                                          merge_qvars, qat_step, split_qvars, state_from_parts)
