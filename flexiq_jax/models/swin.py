"""Swin Transformer (Liu et al. 2021) as timm (>= 0.9) builds it: NHWC stages, patch merging at the
start of stages 1..3, shifted-window attention with a learned relative-position bias.

Module names follow timm's state dict (`patch_embed_proj`, `patch_embed_norm`,
`layers_1/downsample/reduction`, `layers_0/blocks_1/attn/qkv`, `norm`, `head_fc`), so `load_timm`
maps keys one to one. The relative-position index and the shifted-window attention mask are
recomputed from the shapes (numpy constants at trace time), never stored, as in timm.

The window attention's two matmuls (q·kᵀ, attn·v) are parameter-free `AttentionMatmul` modules
(`.../attn/qk`, `.../attn/av`), which quantization intercepts like the Dense layers.

Like timm, a stage whose feature map is no larger than the window uses one window of the map's
size and no shift; maps not divisible by the window are zero-padded at the bottom/right.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexiq_jax.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, register, register_spec
from flexiq_jax.models.layers import AttentionMatmul, Mlp, dense, layer_norm


def window_partition(x, window):
  """(B, H, W, C) -> (B * num_windows, wh * ww, C), windows in row-major order.

  Args:
    x: [B, H, W, C] feature map; H and W must be multiples of the window's sides.
    window: the window size (wh, ww).

  Returns:
    The [B * num_windows, wh * ww, C] windows.
  """
  b, h, w, c = x.shape
  wh, ww = window
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, wh * ww, c)


def window_reverse(windows, window, h, w):
  """The inverse of `window_partition`: (B * num_windows, wh * ww, C) -> (B, H, W, C).

  Args:
    windows: the windows, [B * num_windows, wh * ww, C] (any shape with wh * ww * C trailing
      elements per window).
    window: the window size (wh, ww).
    h: the feature map's height.
    w: the feature map's width.

  Returns:
    The [B, h, w, C] feature map.
  """
  wh, ww = window
  c = windows.shape[-1]
  x = windows.reshape(-1, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


def relative_position_index(window) -> np.ndarray:
  """(wh*ww, wh*ww) index into the ((2wh-1)*(2ww-1), heads) bias table, as timm computes it.

  Args:
    window: the window size (wh, ww).

  Returns:
    The integer index array.
  """
  wh, ww = window
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  rel[:, :, 0] += wh - 1
  rel[:, :, 1] += ww - 1
  rel[:, :, 0] *= 2 * ww - 1
  return rel.sum(-1)


def shifted_window_mask(h, w, window, shift) -> np.ndarray:
  """(num_windows, N, N) additive mask: -100 between tokens that the cyclic shift brought together
  from different image regions (timm's value), 0 elsewhere. h, w are the padded map sizes.

  Args:
    h: the padded feature map's height.
    w: the padded feature map's width.
    window: the window size (wh, ww).
    shift: the cyclic shift (sh, sw), each > 0.

  Returns:
    The float32 mask, N = wh * ww.
  """
  img = np.zeros((1, h, w, 1), np.float32)
  cnt = 0
  for hs in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
    for ws in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
      img[:, hs, ws, :] = cnt
      cnt += 1
  m = np.asarray(window_partition(img, window))[..., 0]  # (nW, N)
  diff = m[:, None, :] - m[:, :, None]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
  num_heads: int
  window: tuple[int, int]

  @nn.compact
  def __call__(self, x, mask=None):
    bw, n, c = x.shape
    head_dim = c // self.num_heads
    wh, ww = self.window
    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       ((2 * wh - 1) * (2 * ww - 1), self.num_heads))
    bias = table[relative_position_index(self.window).reshape(-1)].reshape(n, n, -1).transpose(2, 0, 1)

    qkv = dense(3 * c, name="qkv")(x).reshape(bw, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    attn = AttentionMatmul("bqhd,bkhd->bhqk", name="qk")(q * head_dim**-0.5, k) + bias[None]
    if mask is not None:  # windows are ordered (batch, window): the mask repeats per image
      nw = mask.shape[0]
      attn = attn.reshape(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
      attn = attn.reshape(bw, self.num_heads, n, n)
    attn = jax.nn.softmax(attn, axis=-1)
    x = AttentionMatmul("bhqk,bkhd->bqhd", name="av")(attn, v).reshape(bw, n, c)
    return dense(c, name="proj")(x)


class SwinBlock(nn.Module):
  num_heads: int
  window_size: int = 7
  shifted: bool = False
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    # timm: a map no larger than the window is one unshifted window of the map's size.
    window = tuple(r if r <= self.window_size else self.window_size for r in (h, w))
    shift = tuple(0 if (r <= ws or not self.shifted) else ws // 2 for r, ws in zip((h, w), window))

    y = layer_norm(self.norm_eps, "norm1")(x)
    if any(shift):
      y = jnp.roll(y, (-shift[0], -shift[1]), axis=(1, 2))
    pad_h, pad_w = (-h) % window[0], (-w) % window[1]
    y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    mask = jnp.asarray(shifted_window_mask(hp, wp, window, shift)) if any(shift) else None
    y = WindowAttention(self.num_heads, window, name="attn")(window_partition(y, window), mask)
    y = window_reverse(y, window, hp, wp)[:, :h, :w]
    if any(shift):
      y = jnp.roll(y, shift, axis=(1, 2))
    x = x + y
    return x + Mlp(int(c * self.mlp_ratio), name="mlp")(layer_norm(self.norm_eps, "norm2")(x))


class PatchMerging(nn.Module):
  """2x2 neighbourhood -> 4C features (timm's order: (w-offset, h-offset, C)) -> LayerNorm -> Linear 2C."""

  out_dim: int
  norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    h, w = x.shape[1:3]
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
    x = layer_norm(self.norm_eps, "norm")(x)
    return dense(self.out_dim, name="reduction", use_bias=False)(x)


class SwinStage(nn.Module):
  dim: int
  depth: int
  num_heads: int
  window_size: int
  downsample: bool
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    if self.downsample:
      x = PatchMerging(self.dim, self.norm_eps, name="downsample")(x)
    for i in range(self.depth):
      x = SwinBlock(self.num_heads, self.window_size, shifted=i % 2 == 1, mlp_ratio=self.mlp_ratio,
                    norm_eps=self.norm_eps, name=f"blocks_{i}")(x)
    return x


class SwinTransformer(nn.Module):
  image_size: int = 224
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm; dropout/drop-path are identity at eval and omitted
    if x.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"SwinTransformer built for {self.image_size}x{self.image_size} inputs got "
                       f"{x.shape[1]}x{x.shape[2]}; create it with image_size={x.shape[1]}")
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", name="patch_embed_proj",
                kernel_init=nn.initializers.lecun_normal())(x)
    x = layer_norm(self.norm_eps, "patch_embed_norm")(x)
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      x = SwinStage(self.embed_dim * 2**i, depth, heads, self.window_size, downsample=i > 0,
                    mlp_ratio=self.mlp_ratio, norm_eps=self.norm_eps, name=f"layers_{i}")(x)
    x = layer_norm(self.norm_eps, "norm")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head_fc", kernel_init=nn.initializers.truncated_normal(0.02))(x)


@register("swin_tiny_patch4_window7_224", aliases=("swin_t",))
def swin_tiny_patch4_window7_224(num_classes=1000, **kw):
  """Swin-T (timm `swin_tiny_patch4_window7_224`): patch 4, window 7, embedding 96, depths
  (2, 2, 6, 2), heads (3, 6, 12, 24).

  Args:
    num_classes: the classifier's output size.
    **kw: further `SwinTransformer` fields, overriding those defaults (the reduced variants set
      `image_size`, `patch_size`, `embed_dim`, `depths` and `num_heads`).

  Returns:
    The `SwinTransformer` module.
  """
  kw = {"patch_size": 4, "window_size": 7, "embed_dim": 96, "depths": (2, 2, 6, 2),
        "num_heads": (3, 6, 12, 24), **kw}
  return SwinTransformer(num_classes=num_classes, **kw)


register_spec(ModelSpec("swin_tiny_patch4_window7_224", "swin_t", "swin_tiny_patch4_window7_224.ms_in1k", "swin",
                        (0.9, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
                        lambda image_size: dict(patch_size=2, window_size=7, embed_dim=32, depths=(2, 2, 2),
                                                num_heads=(2, 4, 8), image_size=image_size),
                        transformer=True))
