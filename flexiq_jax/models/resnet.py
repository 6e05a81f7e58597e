"""ResNet (He et al. 2016) with timm's parameter names, plus small variants for Fashion-MNIST.

Module names follow timm's state dict (`conv1`, `bn1`, `layer1_0/conv1`, `layer1_0/downsample_conv`,
`fc`) so that `load_timm` maps keys one to one.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from flexiq_jax.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, register, register_spec
from flexiq_jax.models.layers import ResidualAdd, batch_norm, conv, global_avg_pool, max_pool_3x3_s2


class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    shortcut = x
    y = conv(self.features, 3, self.strides, name="conv1")(x)
    y = nn.relu(batch_norm(train, "bn1")(y))
    y = conv(self.features, 3, name="conv2")(y)
    y = batch_norm(train, "bn2", zero_init=True)(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.strides, name="downsample_conv")(x)
      shortcut = batch_norm(train, "downsample_bn")(shortcut)
    return ResidualAdd("relu", name="residual")(y, shortcut)


class Bottleneck(nn.Module):
  features: int  # width of the 3x3 conv; the block outputs 4x this
  strides: int = 1
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    out_features = self.features * self.expansion
    shortcut = x
    y = conv(self.features, 1, name="conv1")(x)
    y = nn.relu(batch_norm(train, "bn1")(y))
    y = conv(self.features, 3, self.strides, name="conv2")(y)
    y = nn.relu(batch_norm(train, "bn2")(y))
    y = conv(out_features, 1, name="conv3")(y)
    y = batch_norm(train, "bn3", zero_init=True)(y)
    if self.strides != 1 or x.shape[-1] != out_features:
      shortcut = conv(out_features, 1, self.strides, name="downsample_conv")(x)
      shortcut = batch_norm(train, "downsample_bn")(shortcut)
    return ResidualAdd("relu", name="residual")(y, shortcut)


class ResNet(nn.Module):
  """stem='imagenet': 7x7/2 conv + 3x3/2 max-pool (timm); stem='small': 3x3/1 conv, no pool."""

  depths: Sequence[int]
  widths: Sequence[int] = (64, 128, 256, 512)
  block: str = "basic"
  stem: str = "imagenet"
  stem_width: int = 64
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
    if self.stem == "imagenet":
      x = conv(self.stem_width, 7, 2, name="conv1")(x)
      x = nn.relu(batch_norm(train, "bn1")(x))
      x = max_pool_3x3_s2(x)
    elif self.stem == "small":
      x = conv(self.stem_width, 3, 1, name="conv1")(x)
      x = nn.relu(batch_norm(train, "bn1")(x))
    else:
      raise ValueError(f"unknown stem {self.stem!r}; use 'imagenet' or 'small'")
    for stage, (depth, width) in enumerate(zip(self.depths, self.widths)):
      for i in range(depth):
        strides = 2 if stage > 0 and i == 0 else 1
        x = block_cls(width, strides, name=f"layer{stage + 1}_{i}")(x, train)
    x = global_avg_pool(x)
    return nn.Dense(self.num_classes, name="fc")(x)


@register("resnet18", aliases=("r18",))
def resnet18(num_classes=1000, **kw):
  """ResNet-18 (timm `resnet18`): basic blocks, depths (2, 2, 2, 2).

  Args:
    num_classes: the classifier's output size.
    **kw: further `ResNet` fields, overriding those defaults (e.g. `depths`, `widths`, `stem`).

  Returns:
    The `ResNet` module.
  """
  return ResNet(num_classes=num_classes, **{"depths": (2, 2, 2, 2), **kw})


@register("resnet50", aliases=("r50",))
def resnet50(num_classes=1000, **kw):
  """ResNet-50 (timm `resnet50`): bottleneck blocks, depths (3, 4, 6, 3).

  Args:
    num_classes: the classifier's output size.
    **kw: further `ResNet` fields, overriding those defaults (e.g. `depths`, `widths`, `stem`).

  Returns:
    The `ResNet` module.
  """
  return ResNet(num_classes=num_classes, **{"depths": (3, 4, 6, 3), "block": "bottleneck", **kw})


@register("resnet_small")
def resnet_small(num_classes=10, **kw):
  """The quickstart model: a CIFAR-style ResNet-8 for 28x28 inputs (~0.08M params).

  Args:
    num_classes: the classifier's output size.
    **kw: further `ResNet` fields, overriding the quickstart's.

  Returns:
    The `ResNet` module.
  """
  kw = {"depths": (1, 1, 1), "widths": (16, 32, 64), "stem": "small", "stem_width": 16, **kw}
  return ResNet(num_classes=num_classes, **kw)


def _small(depths_widths):
  return lambda image_size: dict(depths_widths, stem="small", stem_width=16)


# Reduced variants keep the full-resolution early layers (stride-1 stem): 28 px leaves no room
# for a 4x stem.
register_spec(ModelSpec("resnet18", "resnet18", "resnet18.a1_in1k", "resnet",
                        (0.95, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
                        _small(dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 128)))))
register_spec(ModelSpec("resnet50", "resnet50", "resnet50.a1_in1k", "resnet",
                        (0.95, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
                        _small(dict(depths=(1, 1, 1, 1), widths=(8, 16, 32, 64)))))
