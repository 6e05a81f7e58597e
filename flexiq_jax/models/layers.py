"""Small building blocks shared by the models, kept PyTorch/timm compatible."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp


def same_padding(kernel_size: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch's symmetric `padding=k//2`; JAX 'SAME' pads (0, 1) on even sizes with stride 2."""
  pad = dilation * (kernel_size - 1) // 2
  return ((pad, pad), (pad, pad))


def batch_norm(train: bool, name: str, eps: float = 1e-5, momentum: float = 0.9, zero_init: bool = False):
  return nn.BatchNorm(
      use_running_average=not train, momentum=momentum, epsilon=eps, name=name,
      scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones)


def conv(features: int, kernel_size: int, strides: int = 1, groups: int = 1, use_bias: bool = False,
         name: str | None = None, dilation: int = 1):
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(strides, strides),
      padding=same_padding(kernel_size, dilation), kernel_dilation=(dilation, dilation),
      feature_group_count=groups, use_bias=use_bias, name=name,
      kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))


def max_pool_3x3_s2(x):
  """timm/torchvision stem pool: kernel 3, stride 2, padding 1 (pads with -inf)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


global_avg_pool = functools.partial(jnp.mean, axis=(1, 2))


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
  """timm's channel rounding: nearest multiple of `divisor`, never more than 10% below `v`."""
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < round_limit * v:
    new_v += divisor
  return new_v


def layer_norm(eps: float, name: str | None = None):
  # Two-pass variance (mean of squared deviations) as PyTorch computes it; flax's default
  # E[x^2] - E[x]^2 loses precision on activations with a large mean.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


def dense(features: int, name: str | None = None, use_bias: bool = True):
  """Linear layer initialised as timm's transformers (truncated normal, std 0.02; zero bias)."""
  return nn.Dense(features, use_bias=use_bias, name=name,
                  kernel_init=nn.initializers.truncated_normal(0.02), bias_init=nn.initializers.zeros)


class AttentionMatmul(nn.Module):
  """An activation x activation matmul (attention's q·kᵀ and attn·v): `jnp.einsum(equation, a, b)`.

  It has no parameters (timm weight import is unaffected); it exists so that quantization can
  find and replace the call by interception (`interception.trace` records it as a `MatmulInfo`),
  as it does for `Dense` and `Conv`. A model written with plain einsums still runs, with those
  matmuls in float (`quantize.float_ops_in_int_path` lists them).
  """

  equation: str

  def __call__(self, a, b):
    return jnp.einsum(self.equation, a, b)


try:  # Flax NNX (every Flax this project supports has it; the guard keeps linen-only use working)
  from flax import nnx as _nnx
except ImportError:  # pragma: no cover
  _nnx = None

if _nnx is not None:

  class NNXAttentionMatmul(_nnx.Module):
    """The NNX form of `AttentionMatmul`: `jnp.einsum(equation, a, b)` with no parameters, for NNX
    models whose attention matmuls quantization should find (`interception_nnx` runs it as the
    linen `AttentionMatmul`)."""

    def __init__(self, equation: str):
      self.equation = equation

    def __call__(self, a, b):
      return jnp.einsum(self.equation, a, b)


def gelu(x):
  return nn.gelu(x, approximate=False)  # torch.nn.GELU default: the exact erf form


class Mlp(nn.Module):
  """timm's transformer MLP: fc1 -> GELU -> fc2 (dropout is identity at eval and omitted)."""

  hidden_features: int

  @nn.compact
  def __call__(self, x):
    out_features = x.shape[-1]
    x = gelu(dense(self.hidden_features, name="fc1")(x))
    return dense(out_features, name="fc2")(x)
