"""Small building blocks shared by the models, kept PyTorch/timm compatible."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def same_padding(kernel_size: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch's symmetric `padding=k//2`; JAX 'SAME' pads (0, 1) on even sizes with stride 2.

  Args:
    kernel_size: the (square) kernel's size.
    dilation: the kernel's dilation.

  Returns:
    ((pad, pad), (pad, pad)) for the height and width axes, pad = dilation * (kernel_size - 1) // 2.
  """
  pad = dilation * (kernel_size - 1) // 2
  return ((pad, pad), (pad, pad))


def batch_norm(train: bool, name: str, eps: float = 1e-5, momentum: float = 0.9, zero_init: bool = False):
  """A BatchNorm layer as timm's CNNs use it (PyTorch's momentum 0.1 is flax's 0.9).

  Args:
    train: whether batch statistics are used and the running averages updated (False: the
      running averages are used).
    name: the layer's name.
    eps: the variance epsilon.
    momentum: the running averages' decay.
    zero_init: whether the scale starts at zero (a residual block's last norm) instead of one.

  Returns:
    The `nn.BatchNorm` module.
  """
  return nn.BatchNorm(
      use_running_average=not train, momentum=momentum, epsilon=eps, name=name,
      scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones)


_NHWC = ("NHWC", "HWIO", "NHWC")


def depthwise_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                                   dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated` for `nn.Conv`, computing a depthwise NHWC conv as the sum of its
  k*k taps (strided slices of the padded input times one weight per channel).

  The same sums as the conv (to float rounding), several times faster than XLA:CPU's grouped
  convolution, forward and (more so) backward. Any other conv goes to `lax.conv_general_dilated`.

  Args:
    lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
    feature_group_count, precision: as `lax.conv_general_dilated` (flax passes NHWC/HWIO).
    **kwargs: passed on to `lax.conv_general_dilated` in the general case.

  Returns:
    The conv output.
  """
  channels = lhs.shape[-1] if lhs.ndim == 4 else None
  dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC) if lhs.ndim == 4 else None
  ones = lambda d: d is None or all(v == 1 for v in d)
  if not (channels and feature_group_count == channels == rhs.shape[3] and rhs.shape[2] == 1 and not kwargs
          and ones(lhs_dilation) and ones(rhs_dilation) and dimension_numbers in (dims, _NHWC)):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision, **kwargs)
  (kh, kw), (sh, sw) = rhs.shape[:2], tuple(window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (sh, sw), padding)
  x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(x, (0, i, j, 0), (x.shape[0], i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, channels),
                      (1, sh, sw, 1)) * rhs[i, j, 0]
      out = tap if out is None else out + tap
  return out


def conv(features: int, kernel_size: int, strides: int = 1, groups: int = 1, use_bias: bool = False,
         name: str | None = None, dilation: int = 1, padding: str = "symmetric"):
  """A bias-free conv initialised as timm's CNNs (He normal, fan-out); a depthwise conv (groups ==
  features) computes with `depthwise_conv_general_dilated`.

  Args:
    features: the output channels.
    kernel_size: the (square) kernel's size.
    strides: the stride on both spatial axes.
    groups: the feature groups (== features, with as many input channels: depthwise).
    use_bias: whether the conv has a bias.
    name: the layer's name.
    dilation: the kernel's dilation.
    padding: 'symmetric' (PyTorch's `k//2` on both sides) or 'tf' (TensorFlow's 'SAME': the total
      padding split with the extra pixel after, e.g. (0, 1) for a 3x3 stride-2 conv on an even size;
      the ports of TF checkpoints, timm's `tf_` models, need it).

  Returns:
    The `nn.Conv` module.

  Raises:
    ValueError: `padding` is neither 'symmetric' nor 'tf'.
  """
  if padding not in ("symmetric", "tf"):
    raise ValueError(f"padding must be 'symmetric' or 'tf', not {padding!r}")
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(strides, strides),
      padding=same_padding(kernel_size, dilation) if padding == "symmetric" else "SAME",
      kernel_dilation=(dilation, dilation),
      feature_group_count=groups, use_bias=use_bias, name=name,
      conv_general_dilated=depthwise_conv_general_dilated if groups > 1 and groups == features else None,
      kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))


def _max_pool_3x3_s2_window(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@jax.custom_vjp
def max_pool_3x3_s2(x):
  """timm/torchvision stem pool: kernel 3, stride 2, padding 1 (pads with -inf).

  The forward pass is the maximum of the nine strided taps of the input, each tap sliced from the
  unpadded input and padded with -inf only where its window leaves the image, so XLA fuses the nine
  taps and their producer (e.g. the stem's ReLU) into one pass over the input. Padding the input
  first made XLA:CPU write the padded copy out (a second pass over the largest activation of the
  network), and its reduce-window took several times longer. The values are the same (a maximum is
  exact); the gradient is the reduce-window's (on ties it goes to one element of the window, where
  an elementwise maximum would split it).

  Args:
    x: [batch, H, W, C] activations.

  Returns:
    The pooled [batch, ceil(H / 2), ceil(W / 2), C] activations.
  """
  n, h, w, c = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  ninf = jnp.array(-jnp.inf, x.dtype)
  out = None
  for a in range(3):
    for b in range(3):
      # Tap (a, b) reads rows 2i - 1 + a and columns 2j - 1 + b; `lo_*` outputs at the top/left and
      # whatever is left at the bottom/right fall outside the image and get -inf.
      lo_r, lo_c = int(a == 0), int(b == 0)
      r0, c0 = a - 1 + 2 * lo_r, b - 1 + 2 * lo_c
      nr, nc = min(ho - lo_r, (h - 1 - r0) // 2 + 1), min(wo - lo_c, (w - 1 - c0) // 2 + 1)
      if nr <= 0 or nc <= 0:  # a tap wholly outside the image (H or W of 1): -inf everywhere
        continue
      tap = lax.slice(x, (0, r0, c0, 0), (n, r0 + 2 * (nr - 1) + 1, c0 + 2 * (nc - 1) + 1, c), (1, 2, 2, 1))
      tap = lax.pad(tap, ninf, ((0, 0, 0), (lo_r, ho - lo_r - nr, 0), (lo_c, wo - lo_c - nc, 0), (0, 0, 0)))
      out = tap if out is None else jnp.maximum(out, tap)
  return out


def _max_pool_fwd(x):
  return max_pool_3x3_s2(x), x


def _max_pool_bwd(x, g):
  return jax.vjp(_max_pool_3x3_s2_window, x)[1](g)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


global_avg_pool = functools.partial(jnp.mean, axis=(1, 2))


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
  """timm's channel rounding: nearest multiple of `divisor`, never more than 10% below `v`.

  Args:
    v: the unrounded channel count.
    divisor: the multiple to round to.
    min_value: the smallest result (default `divisor`).
    round_limit: a result below `round_limit * v` is raised by one `divisor`.

  Returns:
    The rounded channel count.
  """
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < round_limit * v:
    new_v += divisor
  return new_v


def layer_norm(eps: float, name: str | None = None):
  """A LayerNorm with PyTorch's two-pass variance.

  Args:
    eps: the variance epsilon.
    name: the layer's name.

  Returns:
    The `nn.LayerNorm` module.
  """
  # Two-pass variance (mean of squared deviations) as PyTorch computes it; flax's default
  # E[x^2] - E[x]^2 loses precision on activations with a large mean.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


def dense(features: int, name: str | None = None, use_bias: bool = True):
  """Linear layer initialised as timm's transformers (truncated normal, std 0.02; zero bias).

  Args:
    features: the output size.
    name: the layer's name.
    use_bias: whether the layer has a bias.

  Returns:
    The `nn.Dense` module.
  """
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


class ResidualAdd(nn.Module):
  """A residual sum, `activation(y + shortcut)` ('none' or 'relu').

  It has no parameters (checkpoints and timm weight import are unaffected); it exists so that a
  quantization provider can compute the sum by interception: the serving form on oneDNN adds the
  shortcut inside the kernel of the conv that produced one of the two terms, so the residual
  stream is written once, by that kernel (`integer.IntegerLayers.residual_add`). A model written
  with a plain `y + shortcut` runs the same values without that fusion.
  """

  activation: str = "none"

  def __call__(self, y, shortcut):
    if self.activation not in ("none", "relu"):
      raise ValueError(f"unknown residual activation {self.activation!r}; use 'none' or 'relu'")
    out = y + shortcut
    return nn.relu(out) if self.activation == "relu" else out


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
  """The exact (erf) GELU, as torch.nn.GELU computes it by default.

  Args:
    x: an array.

  Returns:
    GELU(x), elementwise.
  """
  return nn.gelu(x, approximate=False)  # torch.nn.GELU default: the exact erf form


class Mlp(nn.Module):
  """timm's transformer MLP: fc1 -> GELU -> fc2 (dropout is identity at eval and omitted)."""

  hidden_features: int

  @nn.compact
  def __call__(self, x):
    out_features = x.shape[-1]
    x = gelu(dense(self.hidden_features, name="fc1")(x))
    return dense(out_features, name="fc2")(x)
