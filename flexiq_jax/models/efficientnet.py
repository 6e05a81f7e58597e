"""MobileNetV2 (Sandler et al. 2018), EfficientNet-B0 (Tan & Le 2019) and EfficientNet-Lite0 as timm's
`EfficientNet` class builds them (`mobilenetv2_100`, `efficientnet_b0`, `tf_efficientnet_lite0`).

Module names follow timm's state dict (`conv_stem`, `bn1`, `blocks_1_0/conv_pw`, `blocks_1_0/conv_dw`,
`blocks_1_0/se/conv_reduce`, `blocks_1_0/conv_pwl`, `conv_head`, `bn2`, `classifier`).

Depthwise convs are `nn.Conv(feature_group_count=C)`: each of the C input ("feature") channels is
read by its own filter, which produces output channel C as well. BatchNorm eps is 1e-5 for the
first two: timm builds them with torch's default BatchNorm2d.

`tf_efficientnet_lite0` is the port of TensorFlow's EfficientNet-Lite0 checkpoint, in timm's `tf_`
convention: TF 'SAME' padding (the extra pixel after: (0, 1) for a 3x3 stride-2 conv on an even
size, (1, 2) for a 5x5 one, where PyTorch pads (1, 1) and (2, 2)) and BatchNorm eps 1e-3 (TF's).
Lite is EfficientNet-B0's block list without squeeze-and-excitation, with ReLU6, and with the stem
(32) and head (1280) widths and the first and last stages' repeats not scaled by the multipliers.

`channel_multiplier` and `depth_multiplier` scale widths and repeats with timm's rounding rules, so
a reduced model is the one timm builds with the same multipliers.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flexiq_jax.models.registry import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, ModelSpec, register, register_spec
from flexiq_jax.models.layers import ResidualAdd, batch_norm, conv, global_avg_pool, make_divisible


class StageDef(NamedTuple):
  """One line of timm's arch_def, e.g. 'ir_r2_k3_s2_e6_c24_se0.25'."""
  block: str  # 'ds' depthwise-separable, 'ir' inverted residual
  repeats: int
  kernel: int
  stride: int
  exp_ratio: float
  out_chs: int
  se_ratio: float = 0.0


class BlockDef(NamedTuple):
  block: str
  kernel: int
  stride: int
  exp_ratio: float
  out_chs: int
  se_ratio: float


MOBILENETV2_ARCH = (
    StageDef("ds", 1, 3, 1, 1, 16),
    StageDef("ir", 2, 3, 2, 6, 24),
    StageDef("ir", 3, 3, 2, 6, 32),
    StageDef("ir", 4, 3, 2, 6, 64),
    StageDef("ir", 3, 3, 1, 6, 96),
    StageDef("ir", 3, 3, 2, 6, 160),
    StageDef("ir", 1, 3, 1, 6, 320),
)

# EfficientNet-Lite: B0's stages without SE (timm `_gen_efficientnet_lite`, TF `efficientnet_lite_builder`).
EFFICIENTNET_LITE_ARCH = (
    StageDef("ds", 1, 3, 1, 1, 16),
    StageDef("ir", 2, 3, 2, 6, 24),
    StageDef("ir", 2, 5, 2, 6, 40),
    StageDef("ir", 3, 3, 2, 6, 80),
    StageDef("ir", 3, 5, 1, 6, 112),
    StageDef("ir", 4, 5, 2, 6, 192),
    StageDef("ir", 1, 3, 1, 6, 320),
)

EFFICIENTNET_B0_ARCH = (
    StageDef("ds", 1, 3, 1, 1, 16, 0.25),
    StageDef("ir", 2, 3, 2, 6, 24, 0.25),
    StageDef("ir", 2, 5, 2, 6, 40, 0.25),
    StageDef("ir", 3, 3, 2, 6, 80, 0.25),
    StageDef("ir", 3, 5, 1, 6, 112, 0.25),
    StageDef("ir", 4, 5, 2, 6, 192, 0.25),
    StageDef("ir", 1, 3, 1, 6, 320, 0.25),
)

_ACTS = {"relu6": jax.nn.relu6, "swish": jax.nn.silu, "relu": jax.nn.relu}


def round_channels(channels: int, multiplier: float = 1.0, divisor: int = 8) -> int:
  """A channel count scaled by the width multiplier and rounded as timm does (`make_divisible`).

  Args:
    channels: the unscaled channel count.
    multiplier: the width multiplier (0: `channels` unchanged, unrounded).
    divisor: the multiple to round to.

  Returns:
    The scaled, rounded channel count.
  """
  return make_divisible(channels * multiplier, divisor) if multiplier else channels


def decode_arch(arch: Sequence[StageDef], channel_multiplier: float, depth_multiplier: float,
                fix_first_last: bool = False):
  """Per-stage block lists, with timm's 'ceil' depth scaling and channel rounding.

  Args:
    arch: the stage definitions.
    channel_multiplier: width scaling (rounded to multiples of 8).
    depth_multiplier: repeat scaling (rounded up).
    fix_first_last: keep the first and last stages' repeats unscaled (EfficientNet-Lite).

  Returns:
    A tuple of stages, each a tuple of `BlockDef`.
  """
  stages = []
  for stage_index, s in enumerate(arch):
    fixed = fix_first_last and stage_index in (0, len(arch) - 1)
    repeats = s.repeats if fixed else int(math.ceil(s.repeats * depth_multiplier))
    out_chs = round_channels(s.out_chs, channel_multiplier)
    blocks = [BlockDef(s.block, s.kernel, s.stride if i == 0 else 1, s.exp_ratio, out_chs, s.se_ratio)
              for i in range(repeats)]
    stages.append(tuple(blocks))
  return tuple(stages)


class SqueezeExcite(nn.Module):
  """timm's EfficientNet SE: global mean -> 1x1 conv (reduce) -> act -> 1x1 conv (expand) -> sigmoid gate."""

  rd_channels: int
  act: str

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = _ACTS[self.act](nn.Conv(self.rd_channels, (1, 1), name="conv_reduce")(s))
    s = nn.Conv(x.shape[-1], (1, 1), name="conv_expand")(s)
    return x * jax.nn.sigmoid(s)


class DepthwiseSeparable(nn.Module):
  """conv_dw -> bn1 -> act -> [se] -> conv_pw -> bn2 (no act); residual when shapes allow."""

  spec: BlockDef
  act: str
  padding: str = "symmetric"
  bn_eps: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    s, in_chs = self.spec, x.shape[-1]
    act = _ACTS[self.act]
    y = conv(in_chs, s.kernel, s.stride, groups=in_chs, name="conv_dw", padding=self.padding)(x)
    y = act(batch_norm(train, "bn1", self.bn_eps)(y))
    if s.se_ratio:
      y = SqueezeExcite(round(in_chs * (s.se_ratio / s.exp_ratio)), self.act, name="se")(y)
    y = conv(s.out_chs, 1, name="conv_pw")(y)
    y = batch_norm(train, "bn2", self.bn_eps)(y)
    return ResidualAdd(name="residual")(y, x) if (s.stride == 1 and in_chs == s.out_chs) else y


class InvertedResidual(nn.Module):
  """conv_pw (expand) -> bn1 -> act -> conv_dw -> bn2 -> act -> [se] -> conv_pwl -> bn3; residual."""

  spec: BlockDef
  act: str
  padding: str = "symmetric"
  bn_eps: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    s, in_chs = self.spec, x.shape[-1]
    act = _ACTS[self.act]
    mid = make_divisible(in_chs * s.exp_ratio)
    y = act(batch_norm(train, "bn1", self.bn_eps)(conv(mid, 1, name="conv_pw")(x)))
    y = conv(mid, s.kernel, s.stride, groups=mid, name="conv_dw", padding=self.padding)(y)
    y = act(batch_norm(train, "bn2", self.bn_eps)(y))
    if s.se_ratio:
      # timm sizes the SE from the block's input width: round(mid * se_ratio / exp_ratio).
      y = SqueezeExcite(round(mid * (s.se_ratio / s.exp_ratio)), self.act, name="se")(y)
    y = batch_norm(train, "bn3", self.bn_eps)(conv(s.out_chs, 1, name="conv_pwl")(y))
    return ResidualAdd(name="residual")(y, x) if (s.stride == 1 and in_chs == s.out_chs) else y


class EfficientNet(nn.Module):
  """Stem conv (3x3/2) -> stages of DS/IR blocks -> 1x1 head conv -> avg pool -> classifier."""

  stages: Sequence[Sequence[BlockDef]]
  stem_size: int = 32
  num_features: int = 1280
  act: str = "swish"
  stem_stride: int = 2
  num_classes: int = 1000
  padding: str = "symmetric"  # 'symmetric' (PyTorch) | 'tf' (TF 'SAME', the `tf_` ports): layers.conv
  bn_eps: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = False):
    act = _ACTS[self.act]
    x = conv(self.stem_size, 3, self.stem_stride, name="conv_stem", padding=self.padding)(x)
    x = act(batch_norm(train, "bn1", self.bn_eps)(x))
    for i, stage in enumerate(self.stages):
      for j, spec in enumerate(stage):
        block = DepthwiseSeparable if spec.block == "ds" else InvertedResidual
        x = block(spec, self.act, self.padding, self.bn_eps, name=f"blocks_{i}_{j}")(x, train)
    x = act(batch_norm(train, "bn2", self.bn_eps)(conv(self.num_features, 1, name="conv_head")(x)))
    return nn.Dense(self.num_classes, name="classifier")(global_avg_pool(x))


@register("mobilenetv2_100", aliases=("mbv2",))
def mobilenetv2_100(num_classes=1000, channel_multiplier=1.0, depth_multiplier=1.0, **kw):
  """timm `_gen_mobilenet_v2`: ReLU6, no SE, head width max(1280, rounded 1280).

  Args:
    num_classes: the classifier's output size.
    channel_multiplier: width scaling (1.0: MobileNetV2-1.0).
    depth_multiplier: repeat scaling.
    **kw: further `EfficientNet` fields (e.g. `stem_stride`, `padding`, `bn_eps`).

  Returns:
    The `EfficientNet` module.
  """
  return EfficientNet(
      stages=decode_arch(MOBILENETV2_ARCH, channel_multiplier, depth_multiplier),
      stem_size=round_channels(32, channel_multiplier),
      num_features=max(1280, round_channels(1280, channel_multiplier)),
      act="relu6", num_classes=num_classes, **kw)


@register("efficientnet_b0", aliases=("effnet_b0",))
def efficientnet_b0(num_classes=1000, channel_multiplier=1.0, depth_multiplier=1.0, **kw):
  """timm `_gen_efficientnet`: SiLU ('swish'), SE ratio 0.25 of the block input width.

  Args:
    num_classes: the classifier's output size.
    channel_multiplier: width scaling (1.0: B0).
    depth_multiplier: repeat scaling (1.0: B0).
    **kw: further `EfficientNet` fields (e.g. `stem_stride`, `padding`, `bn_eps`).

  Returns:
    The `EfficientNet` module.
  """
  return EfficientNet(
      stages=decode_arch(EFFICIENTNET_B0_ARCH, channel_multiplier, depth_multiplier),
      stem_size=round_channels(32, channel_multiplier),
      num_features=round_channels(1280, channel_multiplier),
      act="swish", num_classes=num_classes, **kw)


@register("tf_efficientnet_lite0", aliases=("efficientnet_lite0_tf",))
def tf_efficientnet_lite0(num_classes=1000, channel_multiplier=1.0, depth_multiplier=1.0, **kw):
  """timm `_gen_efficientnet_lite` as `tf_efficientnet_lite0` (the TF checkpoint's port): ReLU6, no
  SE, stem 32 and head 1280 fixed, first/last stage repeats fixed, TF 'SAME' padding, BN eps 1e-3.
  Lite0 is width 1.0, depth 1.0; other multipliers give reduced variants of the same family.

  Args:
    num_classes: the classifier's output size.
    channel_multiplier: width scaling of the blocks.
    depth_multiplier: repeat scaling of the middle stages.
    **kw: further `EfficientNet` fields; `padding` and `bn_eps` given here override 'tf' and 1e-3.

  Returns:
    The `EfficientNet` module.
  """
  return EfficientNet(
      stages=decode_arch(EFFICIENTNET_LITE_ARCH, channel_multiplier, depth_multiplier, fix_first_last=True),
      stem_size=32, num_features=1280, act="relu6", num_classes=num_classes,
      **{"padding": "tf", "bn_eps": 1e-3, **kw})


# Reduced variants: a stride-1 stem, as the other families' reduced variants have. With ImageNet's
# stride-2 stem (total stride 32) the last stages ran on 1x1 maps at 28 px and the reduced
# MobileNetV2 underfit (83.6 % after 5 epochs, train accuracy no higher; 84.0 % after one epoch at
# stride 1). The price: about 4x the compute per step (depthwise convs at 28 px are slow on XLA:CPU).
_SMALL = lambda image_size: dict(channel_multiplier=0.5, depth_multiplier=0.35, stem_stride=1)
register_spec(ModelSpec("mobilenetv2_100", "mobilenetv2", "mobilenetv2_100.ra_in1k", "efficientnet",
                        (0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD), _SMALL, depthwise=True))
register_spec(ModelSpec("efficientnet_b0", "efficientnet_b0", "efficientnet_b0.ra_in1k", "efficientnet",
                        (0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD), _SMALL, depthwise=True))
register_spec(ModelSpec("tf_efficientnet_lite0", "efficientnet_lite0", "tf_efficientnet_lite0", "efficientnet",
                        (0.875, "bicubic", INCEPTION_MEAN, INCEPTION_STD), _SMALL, depthwise=True,
                        fmnist_arg="fmnist_pretrained"))
