"""What the selectors read of a calibrated plan: per lowerable layer its channels, MACs, channel
ranges and lowering errors; and the per-layer channel orders."""

from __future__ import annotations

import dataclasses

import numpy as np

from flexiq_jax.select.ordering import channel_order, random_order


@dataclasses.dataclass(frozen=True)
class LowerableLayers:
  """Per lowerable layer (plan order): channels, MACs, ranges (|x| max per channel) and the
  summed activation + weight lowering error per channel: what the selectors read."""

  paths: list[str]
  channels: np.ndarray
  macs: np.ndarray
  ranges: list[np.ndarray]
  errors: list[np.ndarray]

  @classmethod
  def of(cls, plan, stats: dict) -> "LowerableLayers":
    paths = list(plan.lowerable)
    return cls(paths, np.array([plan.layers[p].in_channels for p in paths], np.int64),
               np.array([plan.layers[p].macs for p in paths], np.float64),
               [np.maximum(np.abs(stats[p]["ch_min"]), np.abs(stats[p]["ch_max"])) for p in paths],
               [stats[p]["act_lowering_error"] + stats[p]["weight_lowering_error"] for p in paths])


def channel_orders(kind: str, layers: LowerableLayers, seed: int = 0) -> dict:
  """{path: channel order, lowered first}: 'range' (small calibrated range first, lowering error
  breaks ties) or 'random' (the ablation).

  Args:
    kind: 'range' or 'random'.
    layers: The lowerable layers with their calibrated ranges and lowering errors.
    seed: Seed of the random orders (layer i uses the seed [seed, i]).

  Returns:
    A dict mapping each lowerable layer path to its (C,) int32 channel order.

  Raises:
    ValueError: If `kind` is neither 'range' nor 'random'.
  """
  if kind == "range":
    orders = [channel_order(r, e) for r, e in zip(layers.ranges, layers.errors)]
  elif kind == "random":
    orders = [random_order(len(r), [seed, i]) for i, r in enumerate(layers.ranges)]
  else:
    raise ValueError(f"unknown select.channel_order {kind!r}; use 'range' or 'random'")
  return dict(zip(layers.paths, orders))
