r"""Quickstart: real Fashion-MNIST, a small ResNet, the whole FlexiQ pipeline on 2 CPU cores.

  python run.py --config=configs/quickstart.py --workdir=workdirs/quickstart

The Fashion-MNIST config of the model family (`configs/common.py`, `:fmnist`) with the overrides
below: a small ResNet built for 28 px inputs, a longer float training, more calibration images,
a longer finetuning at a higher rate, the whole test split. Every field and its meaning:
docs/configs.md. Arguments: `:smoke` shrinks everything to a few steps (for tests).
"""

import ml_collections

from configs import common
from flexiq_jax.config_utils import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, smoke=False)
  config = common.model_config("resnet18", fmnist=True)

  config.model.name = "resnet_small"  # 3 stages of 2 basic blocks, 16-64 channels
  config.model.kwargs = ml_collections.ConfigDict()
  config.data.eval_examples = -1  # the whole test split (10,000 images)
  # Every training image trains (no learning-rate selection here; the judge scores on the training
  # images its finetune did not reach).
  config.data.train_split = "train"
  config.data.holdout_split = ""
  config.finetune.lr_select_images = 1000
  config.eval_batch_size = 500

  config.data.augment = False  # with 2 epochs: the quick start's float model in a few minutes
  config.train.num_epochs = 2.0
  config.train.warmup_steps = 100
  config.train.checkpoint_every_steps = 200
  config.train.eval_every_steps = 200  # periodic eval in eval.jsonl and TensorBoard

  config.calib.num_images = 512

  # The evolutionary search at 12 x 6 (`:fmnist`'s size; select's own default is 16 x 10).
  config.select.population = 12
  config.select.generations = 6

  config.finetune.num_epochs = 0.5
  config.finetune.learning_rate = 0.005
  config.finetune.checkpoint_every_steps = 100
  config.finetune.eval_every_steps = 100
  # No learning-rate selection (one training per QAT method): the README's ~12 minute budget.
  config.finetune.lr_grid = ()
  config.finetune.lr_grid_extend = 0

  config.layerwise.sensitivity_images = 256
  config.layerwise.score_examples = 2000
  config.compare.adaround_iterations = 500

  if args["smoke"]:
    common.shrink_to_smoke(config, fmnist=True)
  return config
