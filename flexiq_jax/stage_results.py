"""The typed results the pipeline's stages hand to each other (frozen dataclasses), shared by
the library packages that consume them (layerwise, compare) without importing the pipeline."""

from __future__ import annotations

import dataclasses

from flexiq_jax import quantize as quantize_lib
from flexiq_jax import train as train_lib


@dataclasses.dataclass(frozen=True)
class FloatModel:
  model: object  # flax.linen.Module
  variables: dict  # {'params', 'batch_stats'?}

  def logits(self, images):
    return train_lib.float_logits(self.model, self.variables, images)


@dataclasses.dataclass(frozen=True)
class Calibration:
  plan: quantize_lib.QuantPlan  # with each layer's input signedness
  folded: dict  # BN-folded float variables
  stats: dict  # {path: {name: array}} (see calibrate.calibrate)


@dataclasses.dataclass(frozen=True)
class Selection:
  orders: dict  # {lowerable path: (C,) channel order, lowered first}
  counts: dict  # {lowerable path: (K,) channels lowered at each level}
  levels: tuple[float, ...]
  selector: str


@dataclasses.dataclass(frozen=True)
class Quantized:
  qmodel: quantize_lib.QuantizedModel
  qvars: dict
  finetuned: bool = False


@dataclasses.dataclass(frozen=True)
class RatioPoint:
  """One evaluated 4-bit ratio. `ratio` is the share of 4-bit MACs among the lowerable layers;
  `low_bit_mac_share` the share among all quantized layers and 8-bit attention matmuls. Against
  the float model on the same images (None when its logits were not given): top-1 `agreement`
  (%), mean `kl` = KL(float || quantized) of the softmax outputs, output `sqnr_db`."""

  ratio: float
  top1: float
  top5: float
  relative_bops: float
  low_bit_mac_share: float
  agreement: float | None = None
  kl: float | None = None
  sqnr_db: float | None = None
