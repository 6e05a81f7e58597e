"""Model registry: plain Flax linen modules that know nothing of quantization.

Every model is called as `model.apply(variables, images_nhwc, train=bool)` and returns logits.
Models with BatchNorm keep running statistics in the `batch_stats` collection.
"""

from __future__ import annotations

from flexiq_jax.models.registry import (ModelSpec, available, canonical_name, create, register,  # noqa: F401
                                        register_spec, spec, specs)

# Importing the model files fills the registry (in the order of the paper's tables).
from flexiq_jax.models import resnet  # noqa: E402,F401
from flexiq_jax.models import efficientnet  # noqa: E402,F401
from flexiq_jax.models import regnet  # noqa: E402,F401
from flexiq_jax.models import vit  # noqa: E402,F401
from flexiq_jax.models import swin  # noqa: E402,F401
from flexiq_jax.models.timm_import import load_timm  # noqa: E402,F401
from flexiq_jax.models.variants import small_kwargs  # noqa: E402,F401
