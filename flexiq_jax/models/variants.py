"""Reduced variants of each family for small images (Fashion-MNIST's 28x28, CIFAR's 32x32).

`models.create(name, num_classes=10, **small_kwargs(name, 28))` builds a model of the same family,
with the same block types and module names, narrow and shallow enough to train on 2 CPU cores.
ResNet and RegNet keep their full-resolution early layers (stride-1 stem) since 28 px leaves no
room for a 4x stem; MobileNetV2 and EfficientNet keep their own stride-2 stem (a 2x stem leaves
14 px), because their depthwise convs at 28 px made each of them several times slower per step on
XLA:CPU, and the eleven-model sweep has to fit about three hours on 2 cores. Each variant is
its family's `ModelSpec.small_kwargs`, beside the model. The variants are not shape-compatible with ImageNet checkpoints (use the default kwargs for those).
"""

from __future__ import annotations

from flexiq_jax.models import registry as models_lib


def small_kwargs(name: str, image_size: int = 28) -> dict:
  """Constructor kwargs of a reduced variant of model `name` (or alias) for `image_size` inputs.

  Args:
    name: a registered model name or alias.
    image_size: the input size.

  Returns:
    The kwargs (`ModelSpec.small_kwargs`; {} for the quickstart's resnet_small, small already).
  """
  canonical = models_lib.canonical_name(name)
  if canonical == "resnet_small":
    return {}
  try:
    return models_lib.spec(canonical).small_kwargs(image_size)
  except ValueError as e:
    if "has no ModelSpec" in str(e):
      raise ValueError(f"no reduced variant defined for {canonical!r}") from None
    raise
