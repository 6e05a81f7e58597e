"""The model registry: constructors by canonical name (and aliases)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, aliases: tuple[str, ...] = ()):
  """Decorator registering a constructor `fn(num_classes=..., **kw) -> nn.Module`."""

  def wrap(fn):
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = fn
    for alias in aliases:
      _ALIASES[alias] = name
    return fn

  return wrap


def available() -> list[str]:
  """Canonical names of all registered models."""
  return sorted(_REGISTRY)


def canonical_name(name: str) -> str:
  if name in _REGISTRY:
    return name
  if name in _ALIASES:
    return _ALIASES[name]
  aliases = ", ".join(f"{a}->{n}" for a, n in sorted(_ALIASES.items()))
  raise ValueError(
      f"unknown model {name!r}. Known models: {', '.join(available())}."
      + (f" Aliases: {aliases}." if aliases else ""))


def create(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
  """Builds the registered model `name` (or an alias of it)."""
  return _REGISTRY[canonical_name(name)](num_classes=num_classes, **kwargs)
