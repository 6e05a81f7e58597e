"""Selectors by name (for configs: `config.select.method = 'evolutionary'`)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from flexiq_jax.select.evolutionary import SearchResult, evolutionary_search
from flexiq_jax.select.selectors import select_greedy_by_range, select_random, select_uniform

SELECTORS: dict[str, Callable] = {
    "evolutionary": evolutionary_search,
    "uniform": select_uniform,
    "greedy": select_greedy_by_range,
    "random": select_random,
}


def get_selector(name: str) -> Callable:
  """The selector function registered as `name`; the error lists the valid names.

  Args:
    name: A key of SELECTORS: 'evolutionary', 'uniform', 'greedy' or 'random'.

  Returns:
    The selector callable.

  Raises:
    ValueError: If `name` is not registered.
  """
  if name not in SELECTORS:
    raise ValueError(f"unknown selector {name!r}; valid names: {sorted(SELECTORS)}")
  return SELECTORS[name]


def select(name: str, levels, channels, macs, *, ranges=None, lowering_error=None,
           fitness_fn=None, seed=0, **options) -> tuple[np.ndarray, SearchResult | None]:
  """Runs selector `name` with the inputs it needs; returns (counts (K, L) int32, the
  SearchResult for 'evolutionary' else None). `options` go to the selector as keywords
  ('greedy': normalize, rtol; 'evolutionary': population, generations, ...).

  Args:
    name: Selector name (see `get_selector`).
    levels: Ratio levels (K,), strictly increasing in [0, 1].
    channels: Feature channels per lowerable layer (L,).
    macs: MACs per lowerable layer (L,).
    ranges: Per-layer channel ranges; required by 'greedy', seeds 'evolutionary'.
    lowering_error: Per-layer channel lowering errors ('greedy' and 'evolutionary').
    fitness_fn: Fitness of a count vector, lower is better; required by 'evolutionary'.
    seed: Seed for 'random' and 'evolutionary'.
    **options: Further keywords for the selector.

  Returns:
    Tuple (counts (K, L) int32, SearchResult or None).

  Raises:
    ValueError: If `name` is unknown, 'evolutionary' lacks fitness_fn or 'greedy' lacks ranges.
  """
  fn = get_selector(name)
  if name == "evolutionary":
    if fitness_fn is None:
      raise ValueError("selector 'evolutionary' needs fitness_fn")
    result = fn(levels, channels, macs, fitness_fn, ranges=ranges, lowering_error=lowering_error,
                seed=seed, **options)
    return result.counts, result
  if name == "greedy":
    if ranges is None:
      raise ValueError("selector 'greedy' needs ranges")
    return fn(levels, channels, macs, ranges, lowering_error=lowering_error, **options), None
  if name == "random":
    return fn(levels, channels, macs, seed=seed, **options), None
  return fn(levels, channels, macs, **options), None
