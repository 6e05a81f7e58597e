"""Reduced variants of each family for small images (Fashion-MNIST's 28x28, CIFAR's 32x32).

`models.create(name, num_classes=10, **small_kwargs(name, 28))` builds a model of the same family,
with the same block types and module names, narrow and shallow enough to train on 2 CPU cores.
ResNet and RegNet keep their full-resolution early layers (stride-1 stem) since 28 px leaves no
room for a 4x stem; MobileNetV2 and EfficientNet keep their own stride-2 stem (a 2x stem leaves
14 px), because their depthwise convs at 28 px made each of them several times slower per step on
XLA:CPU, and the eleven-model sweep has to fit about three hours on 2 cores. The
variants are not shape-compatible with ImageNet checkpoints (use the default kwargs for those).
"""

from __future__ import annotations

from flexiq_jax.models import registry as models_lib

_CNN = {
    "resnet18": dict(depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem="small", stem_width=16),
    "resnet50": dict(depths=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem="small", stem_width=16),
    "mobilenetv2_100": dict(channel_multiplier=0.5, depth_multiplier=0.35, stem_stride=2),
    "efficientnet_b0": dict(channel_multiplier=0.5, depth_multiplier=0.35, stem_stride=2),
    "regnetx_006": dict(depths=(1, 1, 2, 1), widths=(16, 32, 64, 128), group_widths=(8, 8, 8, 8),
                        stem_width=16, stem_stride=1),
}

# ViT/DeiT keep timm's size ladder (tiny < small < base, head width 32, depth 4 in place of 12):
# the :fmnist variants of vit_b and vit_s (or deit_t and deit_s) are then different networks.
# Within one size ViT and DeiT are one architecture, as in timm; their configs differ in the
# float training recipe (configs/common.py).
_VIT = dict(patch_size=4, depth=4)
_VIT_SIZES = {"tiny": dict(embed_dim=64, num_heads=2), "small": dict(embed_dim=96, num_heads=3),
              "base": dict(embed_dim=128, num_heads=4)}
_SWIN = dict(patch_size=2, window_size=7, embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8))


def small_kwargs(name: str, image_size: int = 28) -> dict:
  """Constructor kwargs of a reduced variant of model `name` (or alias) for `image_size` inputs."""
  canonical = models_lib.canonical_name(name)
  if canonical in _CNN:
    return dict(_CNN[canonical])
  if canonical.startswith(("vit_", "deit_")):
    if image_size % _VIT["patch_size"]:
      raise ValueError(f"image_size {image_size} is not a multiple of patch size {_VIT['patch_size']}")
    size = canonical.split("_")[1]  # vit_small_patch16_224 -> small
    return dict(_VIT, **_VIT_SIZES[size], image_size=image_size)
  if canonical.startswith("swin_"):
    return dict(_SWIN, image_size=image_size)
  if canonical == "resnet_small":
    return {}
  raise ValueError(f"no reduced variant defined for {canonical!r}")
