"""flexiq_jax: adaptive mixed-precision (8/4-bit, channel-wise) quantization of vision models.

Pipeline, one subpackage per stage:
  models -> calibrate -> select -> quantize -> finetune -> evaluate
with `data` feeding every stage, `train` for the float model and `cost` for MACs/BOPs.
"""

__version__ = "0.1.0"
