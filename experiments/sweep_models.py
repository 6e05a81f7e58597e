"""The sweep's models: the registered architectures' config names in the tables' and the sweep's
order, each one's Fashion-MNIST config argument and label, and the config a sweep run uses
(`model_config`). Read by `experiments.paper_tables` and `experiments.float_store`."""

from __future__ import annotations

import importlib

from flexiq_jax import models

# The config names of the registered architectures in the tables' order (the registry's: eleven
# trained from scratch on Fashion-MNIST and EfficientNet-Lite0 ImageNet-pretrained), and the
# sweep's default order: the depthwise models, the slowest on a CPU, last, so an interrupted sweep
# has the most. The quickstart (`--models=quickstart,...`) is its own reference, reported in
# experiments/results/README.md.
TABLE_ORDER = tuple(spec.config for spec in models.specs())
SWEEP_ORDER = tuple(spec.config for spec in sorted(models.specs(), key=lambda spec: spec.depthwise))
SPECS_BY_CONFIG = {spec.config: spec for spec in models.specs()}


def fmnist_arg(name: str) -> str:
  """The config argument of model config `name`'s Fashion-MNIST row ('fmnist' or 'fmnist_pretrained')."""
  spec = SPECS_BY_CONFIG.get(name)
  return spec.fmnist_arg if spec else "fmnist"


def model_label(name: str) -> str:
  """`name` as the tables show it: rows that start from ImageNet-trained weights say so."""
  spec = SPECS_BY_CONFIG.get(name)
  return f"{name} (ImageNet-pretrained)" if spec and spec.pretrained_fmnist else name


def model_config(name: str, seed: int, methods, ratios, smoke: bool, imagenet: bool = False):
  """configs/<name>.py at its Fashion-MNIST (or ImageNet) setting, with the seed and the methods of
  this sweep."""
  from flexiq_jax import cli
  cli.resolve_config(name)  # an unknown name is an error listing the configs
  module = importlib.import_module(f"configs.{name}")
  args = [] if name == "quickstart" or imagenet else [fmnist_arg(name)]
  config = module.get_config(",".join(args + (["smoke"] if smoke else [])))
  config.seed = seed
  config.compare.methods = tuple(methods)
  config.compare.ablation_ratios = (0.5, 1.0)  # T3's ratios: the ablation variants need no full sweep
  if ratios:
    config.sweep.ratios = tuple(float(r) for r in ratios)
  return config
