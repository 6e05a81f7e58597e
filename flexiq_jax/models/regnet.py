"""RegNetX (Radosavovic et al. 2020) as timm builds it (`regnetx_006`, i.e. RegNetX-600MF).

Module names follow timm's state dict (`stem_conv`, `stem_bn`, `s1_b1/conv1_conv`, `s1_b1/conv1_bn`,
`s1_b1/conv2_conv` (grouped 3x3), `s1_b1/downsample_conv`, `head_fc`).

The stage widths, depths and group widths are given explicitly: timm derives them from the
(w0, wa, wm, depth, group_size) parameters; for RegNetX-600MF (w0=48, wa=36.97, wm=2.24, depth=16,
group size 24) that gives widths (48, 96, 240, 528) and depths (1, 3, 5, 7), which
`tests/test_models_timm_import.py` checks against timm's model.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from flexiq_jax.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, register, register_spec
from flexiq_jax.models.layers import ResidualAdd, batch_norm, conv, global_avg_pool


class Bottleneck(nn.Module):
  """1x1 -> grouped 3x3 (stride) -> 1x1 (no act), + shortcut (1x1 conv + BN when the shape changes), ReLU."""

  features: int
  group_width: int
  strides: int = 1
  bottle_ratio: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool):
    mid = int(round(self.features * self.bottle_ratio))
    groups = mid // min(self.group_width, mid)  # timm clips the group width to the block width
    y = nn.relu(batch_norm(train, "conv1_bn")(conv(mid, 1, name="conv1_conv")(x)))
    y = conv(mid, 3, self.strides, groups=groups, name="conv2_conv")(y)
    y = nn.relu(batch_norm(train, "conv2_bn")(y))
    y = batch_norm(train, "conv3_bn", zero_init=True)(conv(self.features, 1, name="conv3_conv")(y))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = batch_norm(train, "downsample_bn")(conv(self.features, 1, self.strides, name="downsample_conv")(x))
    return ResidualAdd("relu", name="residual")(y, shortcut)


class RegNet(nn.Module):
  depths: Sequence[int] = (1, 3, 5, 7)
  widths: Sequence[int] = (48, 96, 240, 528)
  group_widths: Sequence[int] = (24, 24, 24, 24)
  stem_width: int = 32
  stem_stride: int = 2
  bottle_ratio: float = 1.0
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(batch_norm(train, "stem_bn")(conv(self.stem_width, 3, self.stem_stride, name="stem_conv")(x)))
    for s, (depth, width, group_width) in enumerate(zip(self.depths, self.widths, self.group_widths)):
      for i in range(depth):
        # Every stage halves the resolution in its first block (timm's RegNet stride 2 per stage).
        x = Bottleneck(width, group_width, 2 if i == 0 else 1, self.bottle_ratio, name=f"s{s + 1}_b{i + 1}")(x, train)
    return nn.Dense(self.num_classes, name="head_fc")(global_avg_pool(x))


@register("regnetx_006", aliases=("regnetx_600mf",))
def regnetx_006(num_classes=1000, **kw):
  """RegNetX-600MF (timm `regnetx_006`) with the `RegNet` defaults.

  Args:
    num_classes: the classifier's output size.
    **kw: further `RegNet` fields (`depths`, `widths`, `group_widths`, `stem_width`, ...), e.g. for
      the reduced variants.

  Returns:
    The `RegNet` module.
  """
  return RegNet(num_classes=num_classes, **kw)


register_spec(ModelSpec("regnetx_006", "regnetx_600mf", "regnetx_006.pycls_in1k", "regnet",
                        (0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
                        lambda image_size: dict(depths=(1, 1, 2, 1), widths=(16, 32, 64, 128),
                                                group_widths=(8, 8, 8, 8), stem_width=16, stem_stride=1)))
