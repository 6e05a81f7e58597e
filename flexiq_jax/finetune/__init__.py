"""Finetune stage: multi-ratio quantization-aware training (and the QAT step the baselines share),
and the refresh of the weight-dependent state after it."""

from flexiq_jax.finetune.finetune import (BASELINE_SEED_OFFSET, FLEXIQ_SEED_OFFSET, QATState, RatioSampler,
                                          apply_gradients, create_state, distill_step, kl_divergence, make_loss_fn,
                                          make_optimizer, merge_qvars, pass_matched_steps, passes_per_step, qat_step,
                                          split_qvars, state_from_parts, teacher_logits_of)
from flexiq_jax.finetune.refresh import REFRESH_QUANTIZED_RATIOS, collect_quantized, refresh_after_finetuning
