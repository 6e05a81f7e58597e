"""The model registry: constructors by canonical name (and aliases)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, aliases: tuple[str, ...] = ()):
  """Decorator registering a constructor `fn(num_classes=..., **kw) -> nn.Module`.

  Args:
    name: the canonical model name.
    aliases: other names that resolve to it.

  Returns:
    The decorator; it returns the constructor unchanged.

  Raises:
    ValueError: `name` is already registered (raised when the decorator is applied).
  """

  def wrap(fn):
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = fn
    for alias in aliases:
      _ALIASES[alias] = name
    return fn

  return wrap


def available() -> list[str]:
  """Canonical names of all registered models.

  Returns:
    The names, sorted.
  """
  return sorted(_REGISTRY)


def canonical_name(name: str) -> str:
  """The canonical name of a registered model or alias.

  Args:
    name: a canonical model name or an alias.

  Returns:
    The canonical name.

  Raises:
    ValueError: the name is unknown (the message lists the models and aliases).
  """
  if name in _REGISTRY:
    return name
  if name in _ALIASES:
    return _ALIASES[name]
  aliases = ", ".join(f"{a}->{n}" for a, n in sorted(_ALIASES.items()))
  raise ValueError(
      f"unknown model {name!r}. Known models: {', '.join(available())}."
      + (f" Aliases: {aliases}." if aliases else ""))


def create(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
  """Builds the registered model `name` (or an alias of it).

  Args:
    name: a canonical model name or an alias.
    num_classes: the classifier's output size.
    **kwargs: passed on to the model's constructor.

  Returns:
    The Flax module.

  Raises:
    ValueError: the name is unknown.
  """
  return _REGISTRY[canonical_name(name)](num_classes=num_classes, **kwargs)


# Eval normalisation statistics of timm's pretrained configs.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the rest of the code base knows of a registered ImageNet architecture: every model list
  (configs, eval transforms, reduced variants, timm import, experiments, benchmarks) derives
  from these, so adding an architecture touches its module and its config.

  Attributes:
    name: the canonical model name (as registered).
    config: the config file `configs/<config>.py`.
    timm_tag: timm's pretrained weights that the config expects (`weights/<tag>.safetensors`).
    timm_family: the key mapping of `models.timm_import` ('resnet', 'efficientnet', 'regnet',
      'vit', 'swin').
    eval_transform: (crop_pct, interpolation, mean, std) of timm's pretrained config.
    small_kwargs: image_size -> constructor kwargs of the reduced variant (`:fmnist`).
    transformer: ViT/DeiT/Swin (attention; image size in the kwargs; AdamW recipes).
    deit: a DeiT (its float recipe adds label smoothing).
    depthwise: built of depthwise convolutions (MobileNetV2, EfficientNet): the slowest family on
      XLA:CPU, so the sweep runs these last.
    fmnist_arg: the config argument of the model's Fashion-MNIST row in the sweep: 'fmnist' (the
      reduced variant trained from scratch) or 'fmnist_pretrained' (the ImageNet-trained network
      finetuned on Fashion-MNIST; its rows are marked ImageNet-pretrained).
  """

  name: str
  config: str
  timm_tag: str
  timm_family: str
  eval_transform: tuple
  small_kwargs: Callable[[int], dict]
  transformer: bool = False
  deit: bool = False
  depthwise: bool = False
  fmnist_arg: str = "fmnist"

  @property
  def pretrained_fmnist(self) -> bool:
    """Whether the Fashion-MNIST sweep row starts from ImageNet-trained weights."""
    return self.fmnist_arg == "fmnist_pretrained"


_SPECS: dict[str, ModelSpec] = {}


def register_spec(spec: ModelSpec) -> ModelSpec:
  """Registers the spec of a registered model (beside its constructor).

  Args:
    spec: the `ModelSpec`; its `name` must already have a constructor.

  Returns:
    `spec`, unchanged.

  Raises:
    ValueError: the model has no constructor, or already has a spec.
  """
  if spec.name not in _REGISTRY:
    raise ValueError(f"model {spec.name!r} has a spec but no constructor")
  if spec.name in _SPECS:
    raise ValueError(f"model {spec.name!r} has two specs")
  _SPECS[spec.name] = spec
  return spec


def specs() -> list[ModelSpec]:
  """The specs of every ImageNet architecture, in registration order.

  Returns:
    A new list of the `ModelSpec`s.
  """
  return list(_SPECS.values())


def spec(name: str) -> ModelSpec:
  """The spec of model `name` (or an alias).

  Args:
    name: a canonical model name or an alias.

  Returns:
    Its `ModelSpec`.

  Raises:
    ValueError: the name is unknown, or the model has no spec.
  """
  canonical = canonical_name(name)
  if canonical not in _SPECS:
    raise ValueError(f"model {canonical!r} has no ModelSpec; specs: {', '.join(_SPECS)}")
  return _SPECS[canonical]
