"""Vision Transformer (Dosovitskiy et al. 2021) and DeiT (Touvron et al. 2021) as timm builds them.

Module names follow timm's state dict (`patch_embed_proj`, `blocks_3/attn/qkv`, `blocks_3/mlp/fc1`,
`norm`, `head`; params `cls_token`, `pos_embed`), so `load_timm` maps keys one to one.

Quantizable layers are plain `nn.Conv`/`nn.Dense` submodules: the patch embedding, every block's
`attn/qkv` (one Dense of width 3*D whose output is laid out (3, heads, head_dim) like timm's),
`attn/proj`, `mlp/fc1`, `mlp/fc2` and the `head`. The two attention matmuls (q.k^T, attn.v) are
parameter-free `AttentionMatmul` modules (`attn/qk`, `attn/av`), which quantization intercepts too.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flexiq_jax.models.registry import (IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, ModelSpec,
                                        register, register_spec)
from flexiq_jax.models.layers import AttentionMatmul, Mlp, dense, layer_norm


class Attention(nn.Module):
  num_heads: int
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = dense(3 * d, name="qkv", use_bias=self.qkv_bias)(x)
    # timm: qkv(x).reshape(B, N, 3, heads, head_dim); the same order here.
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, head_dim)
    attn = AttentionMatmul("bqhd,bkhd->bhqk", name="qk")(q * head_dim**-0.5, k)
    attn = jax.nn.softmax(attn, axis=-1)
    x = AttentionMatmul("bhqk,bkhd->bqhd", name="av")(attn, v).reshape(b, n, d)
    return dense(d, name="proj")(x)


class Block(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = x + Attention(self.num_heads, self.qkv_bias, name="attn")(layer_norm(self.norm_eps, "norm1")(x))
    return x + Mlp(int(d * self.mlp_ratio), name="mlp")(layer_norm(self.norm_eps, "norm2")(x))


class VisionTransformer(nn.Module):
  """timm's VisionTransformer with a class token, learned position embedding that includes the class
  token's position, pre-norm blocks, a final LayerNorm and the class-token head (ViT augreg and DeiT)."""

  image_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  norm_eps: float = 1e-6
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm; dropout/drop-path are identity at eval and omitted
    if x.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"{type(self).__name__} built for {self.image_size}x{self.image_size} inputs got "
                       f"{x.shape[1]}x{x.shape[2]}; create it with image_size={x.shape[1]} (load_timm "
                       "resizes pretrained position embeddings)")
    p = self.patch_size  # non-overlapping patches: a conv with kernel = stride = patch size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", name="patch_embed_proj",
                kernel_init=nn.initializers.lecun_normal())(x)
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d))
    pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (1, gh * gw + 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, d)).astype(x.dtype), x], axis=1) + pos_embed
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.qkv_bias, self.norm_eps, name=f"blocks_{i}")(x)
    x = layer_norm(self.norm_eps, "norm")(x)
    return nn.Dense(self.num_classes, name="head", kernel_init=nn.initializers.truncated_normal(0.02))(x[:, 0])


# name -> (alias, embed_dim, num_heads); all are patch 16, depth 12 (timm's configs).
_VARIANTS = {
    "vit_small_patch16_224": ("vit_s", 384, 6),
    "vit_base_patch16_224": ("vit_b", 768, 12),
    "deit_tiny_patch16_224": ("deit_t", 192, 3),
    "deit_small_patch16_224": ("deit_s", 384, 6),
    "deit_base_patch16_224": ("deit_b", 768, 12),
}


def _constructor(embed_dim: int, num_heads: int):
  def create(num_classes=1000, **kw):
    defaults = dict(patch_size=16, embed_dim=embed_dim, depth=12, num_heads=num_heads)
    return VisionTransformer(num_classes=num_classes, **{**defaults, **kw})
  return create


for _name, (_alias, _dim, _heads) in _VARIANTS.items():
  register(_name, aliases=(_alias,))(_constructor(_dim, _heads))


# Reduced variants keep timm's size ladder (tiny < small < base, head width 32, depth 4 in place
# of 12): the :fmnist variants of vit_b and vit_s (or deit_t and deit_s) are different networks.
# Within one size ViT and DeiT are one architecture, as in timm; their configs differ in the
# float training recipe (configs/common.py).
_SMALL = dict(patch_size=4, depth=4)
_SMALL_SIZES = {"tiny": dict(embed_dim=64, num_heads=2), "small": dict(embed_dim=96, num_heads=3),
                "base": dict(embed_dim=128, num_heads=4)}


def _small(size: str):
  def kwargs(image_size: int) -> dict:
    if image_size % _SMALL["patch_size"]:
      raise ValueError(f"image_size {image_size} is not a multiple of patch size {_SMALL['patch_size']}")
    return dict(_SMALL, **_SMALL_SIZES[size], image_size=image_size)
  return kwargs


_AUGREG = (0.9, "bicubic", INCEPTION_MEAN, INCEPTION_STD)
_DEIT = (0.9, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
for _name, _config, _tag, _transform, _size in (
    ("vit_small_patch16_224", "vit_s", "vit_small_patch16_224.augreg_in21k_ft_in1k", _AUGREG, "small"),
    ("vit_base_patch16_224", "vit_b", "vit_base_patch16_224.augreg_in21k_ft_in1k", _AUGREG, "base"),
    ("deit_tiny_patch16_224", "deit_t", "deit_tiny_patch16_224.fb_in1k", _DEIT, "tiny"),
    ("deit_small_patch16_224", "deit_s", "deit_small_patch16_224.fb_in1k", _DEIT, "small"),
    ("deit_base_patch16_224", "deit_b", "deit_base_patch16_224.fb_in1k", _DEIT, "base")):
  register_spec(ModelSpec(_name, _config, _tag, "vit", _transform, _small(_size), transformer=True,
                          deit=_name.startswith("deit_")))
