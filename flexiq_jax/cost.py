"""Cost accounting, the one place MACs and BOPs are computed (selection, the layer-wise
mixed-precision algorithm, reports and the latency model all call this module).

MACs are counted for every quantizable layer (`Dense`, `DenseGeneral`, `Conv`, found by
`interception.trace`) per example, including the token/pixel count: a ViT's `fc1` costs
tokens x C x O (a Swin window attention's layers: windows x tokens x C x O). BOPs = MACs x weight
bits x activation bits. A channel-wise configuration lowers `count` of a layer's C feature
channels to 4x4 bits; each feature channel carries MACs/C.

The activation x activation matmuls (`interception.MatmulInfo`: attention's q·kᵀ and attn·v,
heads x N x N x head_dim MACs each per ViT block) are counted where a function takes `matmuls`:
they run at 8 x 8 bits at every ratio, so they are in the denominator of relative BOPs and of the
4-bit share of all quantized MACs (and in the numerator at 8 x 8), but never in the lowerable
MACs that define FlexiQ's ratio (`lowered_mac_share` over the lowerable layers).

Not counted: element-wise ops (softmax, GELU, residual adds), pooling and normalisation. AIMET's
count differs: it counts only Conv/Linear modules and ignores the token count of Linear layers in
transformers.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from flexiq_jax.interception import LayerInfo, MatmulInfo

MATMUL_BITS = 8  # both operands of a quantized matmul, at every ratio


def total_macs(layers: Mapping[str, LayerInfo]) -> int:
  """MACs per example of all the given quantizable layers.

  Args:
    layers: {path: LayerInfo} of the layers to count (e.g. `Trace.layers`).

  Returns:
    Σ of `LayerInfo.macs` over `layers`, as an int.
  """
  return int(sum(info.macs for info in layers.values()))


def recorded_macs(plan_layers: Mapping[str, dict]) -> int:
  """MACs per image of layers as a results file records them (LayerInfo fields as dicts, lists for
  tuples): they change with a layer's width and the resolution it runs at, so a benchmark entry
  whose figure differs from `total_macs` of the model built now was measured on another variant.

  Args:
    plan_layers: {path: dict of LayerInfo fields}, as read back from JSON (tuple fields as lists).

  Returns:
    `total_macs` of the layers rebuilt as `LayerInfo`, as an int.
  """
  return total_macs({path: LayerInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in layer.items()})
                     for path, layer in plan_layers.items()})


def matmul_macs(matmuls: Mapping[str, MatmulInfo] | None) -> int:
  """MACs per example of the activation x activation matmuls (output elements x summed size).

  Args:
    matmuls: {path: MatmulInfo}, or None for a model without intercepted matmuls.

  Returns:
    Σ of `MatmulInfo.macs` (0 for None or an empty mapping), as an int.
  """
  return int(sum(info.macs for info in (matmuls or {}).values()))


def matmul_bops(matmuls: Mapping[str, MatmulInfo] | None, bits: int = MATMUL_BITS) -> float:
  """BOPs of the matmuls with both operands at `bits` (8: FlexiQ's integer path).

  Args:
    matmuls: {path: MatmulInfo}, or None.
    bits: bit width of both operands.

  Returns:
    `matmul_macs(matmuls) x bits x bits`, as a float.
  """
  return float(matmul_macs(matmuls)) * bits * bits


def layerwise_bops(layers: Mapping[str, LayerInfo], bits: Mapping[str, tuple[int, int]],
                   default: tuple[int, int] = (8, 8), matmuls: Mapping[str, MatmulInfo] | None = None) -> float:
  """BOPs per example of a layer-wise bit configuration; a layer at (32, 32) stands for float.

  Args:
    layers: {path: LayerInfo} of the quantizable layers.
    bits: {path: (weight_bits, activation_bits)}; layers not listed use `default`.
    default: (weight_bits, activation_bits) of the layers not in `bits`.
    matmuls: {path: MatmulInfo} added at 8 x 8 bits, or None.

  Returns:
    Σ MACs x weight bits x activation bits over `layers`, plus the matmuls' BOPs, as a float.
  """
  return float(sum(info.macs * np.prod(bits.get(path, default)) for path, info in layers.items())) + \
      matmul_bops(matmuls)


def channelwise_bops(layers: Mapping[str, LayerInfo], lowered: Mapping[str, float],
                     high: int = 8, low: int = 4, matmuls: Mapping[str, MatmulInfo] | None = None) -> float:
  """BOPs per example of a channel-wise configuration: `lowered[path]` feature channels of each layer at
  low x low bits, the others at high x high.

  Args:
    layers: {path: LayerInfo} of the quantizable layers.
    lowered: {path: number of feature channels at low x low bits}; layers not listed lower none.
    high: bit width of weights and activations of the channels that are not lowered.
    low: bit width of weights and activations of the lowered channels.
    matmuls: {path: MatmulInfo} added at 8 x 8 bits (never lowered), or None.

  Returns:
    Σ of `channelwise_layer_bops` over `layers` plus the matmuls' BOPs, as a float.

  Raises:
    ValueError: a lowered count is negative or above the layer's feature channels.
  """
  return matmul_bops(matmuls) + sum(channelwise_layer_bops(info, lowered.get(path, 0), high, low)
                                    for path, info in layers.items())


def channelwise_layer_bops(info: LayerInfo, lowered: float, high: int = 8, low: int = 4) -> float:
  """One layer's BOPs per example with `lowered` of its feature channels at low x low bits and the
  others at high x high.

  Args:
    info: the layer.
    lowered: number of its feature channels at low x low bits (may be fractional, e.g. an expectation).
    high: bit width of the channels that are not lowered.
    low: bit width of the lowered channels.

  Returns:
    MACs/C x (lowered x low² + (C - lowered) x high²), as a float.

  Raises:
    ValueError: `lowered` is outside [0, C].
  """
  n = float(lowered)
  if not 0 <= n <= info.in_channels:
    raise ValueError(f"{info.path}: {n} lowered channels out of {info.in_channels}")
  return info.macs_per_channel * (n * low * low + (info.in_channels - n) * high * high)


def relative_bops(layers: Mapping[str, LayerInfo], lowered: Mapping[str, float], high: int = 8,
                  low: int = 4, matmuls: Mapping[str, MatmulInfo] | None = None) -> float:
  """Channel-wise BOPs relative to the same model with every layer at high x high bits; the
  8-bit `matmuls` count in both.

  Args:
    layers: {path: LayerInfo} of the quantizable layers.
    lowered: {path: number of lowered feature channels}.
    high: bit width of the channels that are not lowered.
    low: bit width of the lowered channels.
    matmuls: {path: MatmulInfo} at 8 x 8 bits, or None.

  Returns:
    `channelwise_bops(lowered) / channelwise_bops({})`, a float in (0, 1] when low <= high.

  Raises:
    ValueError: a lowered count is outside [0, C].
  """
  return (channelwise_bops(layers, lowered, high, low, matmuls)
          / channelwise_bops(layers, {}, high, low, matmuls))


def macs_per_channel(channels, macs) -> np.ndarray:
  """MACs carried by one feature channel of each layer: M_l / C_l, (L,) float64.

  Args:
    channels: (L,) feature channel counts C_l.
    macs: (L,) MACs per example M_l.

  Returns:
    (L,) float64 array of M_l / C_l.
  """
  return np.asarray(macs, np.float64) / np.asarray(channels, np.float64)


def lowered_mac_share(counts, channels, macs):
  """Share of 4-bit MACs among the MACs of the given layers, with counts[l] of layer l's C_l
  channels lowered: Σ counts_l M_l / C_l / Σ M_l. counts (L,) -> float, (K, L) -> (K,).
  Over the lowerable layers this is FlexiQ's ratio; over all quantized layers, the 4-bit share.

  Args:
    counts: (L,) or (K, L) lowered channel counts, one column per layer.
    channels: (L,) feature channel counts C_l.
    macs: (L,) MACs per example M_l.

  Returns:
    A float for (L,) counts, a (K,) float64 array for (K, L) counts; clipped to at most 1 where no
    count exceeds its layer's channels.
  """
  counts = np.asarray(counts, np.float64)
  share = counts @ macs_per_channel(channels, macs) / np.sum(np.asarray(macs, np.float64))
  # With every channel lowered the sum can round to 1 + 1e-16; a share is never above 1.
  share = np.where(np.all(counts <= np.asarray(channels), axis=-1), np.minimum(share, 1.0), share)
  return float(share) if np.ndim(share) == 0 else share


def low_bit_mac_share(layers: Mapping[str, LayerInfo], lowered: Mapping[str, float],
                      matmuls: Mapping[str, MatmulInfo] | None = None) -> float:
  """Share of low-bit MACs among the MACs of `layers` and `matmuls` (which are never lowered).

  Args:
    layers: {path: LayerInfo} of the quantized layers.
    lowered: {path: lowered channel count}; layers not listed lower none.
    matmuls: {path: MatmulInfo} counted in the denominator only, or None.

  Returns:
    Σ lowered_l M_l / C_l / (Σ M_l + matmul MACs), as a float.
  """
  infos = list(layers.items())
  counts = [float(lowered.get(p, 0)) for p, _ in infos]
  low = float(np.dot(counts, macs_per_channel([i.in_channels for _, i in infos], [i.macs for _, i in infos])))
  return low / (float(total_macs(layers)) + matmul_macs(matmuls))


def layer_bops(info: LayerInfo, weight_bits: int, act_bits: int) -> float:
  """One layer's BOPs at (weight bits, activation bits); pass 32 for a float operand.

  Args:
    info: the layer.
    weight_bits: bit width of its weights.
    act_bits: bit width of its input activations.

  Returns:
    MACs x weight_bits x act_bits, as a float.
  """
  return float(info.macs) * weight_bits * act_bits


def layerwise_bops_table(layers: Mapping[str, LayerInfo], bits: list[tuple[int, int]]) -> np.ndarray:
  """(L, K) BOPs of each layer (in `layers` order) at each (weight bits, activation bits) in
  `bits`: the per-group cost table of the layer-wise mixed-precision search.

  Args:
    layers: {path: LayerInfo}; rows follow its order.
    bits: K candidate (weight_bits, activation_bits) pairs; columns follow its order.

  Returns:
    (L, K) float64 array of `layer_bops`.
  """
  return np.array([[layer_bops(info, w, a) for (w, a) in bits] for info in layers.values()], np.float64)


def channelwise_bops_table(layers: Mapping[str, LayerInfo], ratios: list[float], high: int = 8,
                           low: int = 4) -> np.ndarray:
  """(L, K) BOPs of each layer with floor(ratio x C) of its feature channels at low x low bits
  (FlexiQ's per-layer ratio candidates).

  Args:
    layers: {path: LayerInfo}; rows follow its order.
    ratios: K per-layer ratios in [0, 1]; columns follow its order.
    high: bit width of the channels that are not lowered.
    low: bit width of the lowered channels.

  Returns:
    (L, K) float64 array of each layer's channel-wise BOPs (matmuls not included).
  """
  return np.array([[channelwise_bops({p: info}, {p: lowered_count(info, r)}, high, low) for r in ratios]
                   for p, info in layers.items()], np.float64)


def lowered_count(info: LayerInfo, ratio: float) -> int:
  """Feature channels lowered at a per-layer ratio: floor(ratio x C) (ratio 1 = all).

  Args:
    info: the layer (its `in_channels` is C).
    ratio: per-layer share of feature channels to lower, in [0, 1].

  Returns:
    floor(ratio x C + 1e-9) as an int (the 1e-9 absorbs float rounding of ratio x C just below an integer).
  """
  return int(np.floor(ratio * info.in_channels + 1e-9))


class BopsLatencyModel:
  """Modelled time of one batch at a 4-bit ratio, for a target whose quantized layers run in
  time proportional to their BOPs (4-bit x 4-bit MACs at a quarter of the 8 x 8 cost):

      t(r) = t_fixed + t_8bit * relative_bops(r)

  `t_8bit` is the measured (or assumed) time of the quantized layers at ratio 0 and `t_fixed` the
  time that lowering does not change (data movement, unquantized ops). On machines without 4-bit
  arithmetic (CPUs, Hopper GPUs) lowered channels run inside the int8 GEMM and measured time does
  not fall with the ratio: there this model, not a stopwatch, says what the ratio buys.
  `relative_bops` maps a ratio to BOPs relative to ratio 0 (e.g. quantize.relative_bops_at).
  """

  def __init__(self, t_8bit: float, relative_bops, t_fixed: float = 0.0, grid_size: int = 101):
    if t_8bit <= 0 or t_fixed < 0:
      raise ValueError(f"need t_8bit > 0 and t_fixed >= 0, got {t_8bit}, {t_fixed}")
    self.t_8bit, self.t_fixed = float(t_8bit), float(t_fixed)
    # Tabulated once: relative_bops may be a host round trip per call.
    self.ratios = np.linspace(0.0, 1.0, grid_size)
    self.bops = np.array([relative_bops(float(r)) for r in self.ratios])
    if np.any(np.diff(self.bops) > 1e-9):
      raise ValueError("relative BOPs must not grow with the ratio")

  def __call__(self, ratio: float) -> float:
    return self.t_fixed + self.t_8bit * float(np.interp(ratio, self.ratios, self.bops))


# ----------------------------------------------------------------------------------------------
# Time: a roofline-style latency model of the integer path, fitted on measured layer times.

def integer_layer_bytes(info: LayerInfo, batch: int, lowered: float = 0.0, low_bytes: float = 1.0) -> float:
  """Bytes one integer layer moves for `batch` examples: its float input read once by the quantize
  pass (4 B), the activation codes written and read (2 x 1 B), the int8 weights (1 B), the int32
  accumulators written and read (2 x 4 B) and the float output (4 B). With `lowered` of the C
  feature channels lowered, their codes and weight rows take `low_bytes` (0.5: packed 4-bit).

  Args:
    info: the layer (input, output and kernel shapes are those of one example).
    batch: examples per call.
    lowered: number of lowered feature channels.
    low_bytes: bytes per lowered code or weight (1.0: stored as int8; 0.5: packed int4).

  Returns:
    Modelled bytes moved, as a float.
  """
  inputs = float(np.prod(info.input_shape)) * batch
  outputs = float(np.prod(info.output_shape)) * batch
  weights = float(np.prod(info.kernel_shape))
  narrow = 1.0 - (1.0 - low_bytes) * float(lowered) / info.in_channels
  return inputs * (4 + 2 * narrow) + weights * narrow + outputs * 12


@dataclasses.dataclass(frozen=True)
class RooflineModel:
  """Time of one integer layer: overhead_s + MACs / macs_per_s + bytes / bytes_per_s (an additive
  roofline: compute and data movement of XLA's separate fusions do not overlap much), fitted by
  non-negative least squares on measured layer times (`fit`). A 4-bit-capable target runs the
  lowered MACs `low_bits_speedup` times faster and moves their codes and weights at half a byte."""

  overhead_s: float
  macs_per_s: float
  bytes_per_s: float
  r2: float = float("nan")  # of the fit, on the layers it was fitted to

  @classmethod
  def fit(cls, macs, bytes_, seconds) -> "RooflineModel":
    import scipy.optimize
    a = np.stack([np.ones(len(macs)), np.asarray(macs, np.float64), np.asarray(bytes_, np.float64)], axis=1)
    t = np.asarray(seconds, np.float64)
    scale = a.max(axis=0)  # conditioning: MACs and bytes are ~1e9, the overhead ~1
    coef, _ = scipy.optimize.nnls(a / scale, t)
    coef = coef / scale
    residual = t - a @ coef
    r2 = 1.0 - float(residual @ residual) / float(((t - t.mean()) ** 2).sum()) if len(t) > 1 else float("nan")
    inv = lambda c: float("inf") if c <= 0 else 1.0 / float(c)
    return cls(float(coef[0]), inv(coef[1]), inv(coef[2]), r2)

  def layer_time(self, info: LayerInfo, batch: int, lowered: float = 0.0, low_bits_speedup: float = 1.0) -> float:
    share = float(lowered) / info.in_channels
    macs = float(info.macs) * batch * (1.0 - share + share / low_bits_speedup)
    low_bytes = 0.5 if low_bits_speedup > 1.0 else 1.0
    return self.overhead_s + macs / self.macs_per_s + integer_layer_bytes(info, batch, lowered, low_bytes) / self.bytes_per_s

  def model_time(self, layers: Mapping[str, LayerInfo], batch: int, lowered: Mapping[str, float],
                 low_bits_speedup: float = 1.0) -> float:
    """Σ of `layer_time` over the quantized layers, with lowered[path] channels lowered."""
    return float(sum(self.layer_time(info, batch, lowered.get(p, 0.0), low_bits_speedup) for p, info in layers.items()))
