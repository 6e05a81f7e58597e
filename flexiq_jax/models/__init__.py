"""Model registry: plain Flax linen modules that know nothing of quantization.

Every model is called as `model.apply(variables, images_nhwc, train=bool)` and returns logits.
Models with BatchNorm keep running statistics in the `batch_stats` collection.
"""

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


# Importing the model files fills the registry.
from flexiq_jax.models import resnet  # noqa: E402,F401
from flexiq_jax.models import efficientnet  # noqa: E402,F401
from flexiq_jax.models import regnet  # noqa: E402,F401
from flexiq_jax.models import swin  # noqa: E402,F401
from flexiq_jax.models import vit  # noqa: E402,F401
from flexiq_jax.models.timm_import import load_timm  # noqa: E402,F401
from flexiq_jax.models.variants import small_kwargs  # noqa: E402,F401
