r"""Quickstart: real Fashion-MNIST, a small ResNet, the whole FlexiQ pipeline on 2 CPU cores.

  python run.py --config=configs/quickstart.py --workdir=workdirs/quickstart

Arguments: `:smoke` shrinks everything to a few steps (for tests).
"""

import ml_collections

from flexiq_jax.config_utils import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, smoke=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.distributed = False  # True: jax.distributed.initialize() for multi-host runs

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet_small"
  config.model.kwargs = ml_collections.ConfigDict()
  config.init_weights = ""  # path to a timm checkpoint (.safetensors/.pth); "" = train from scratch

  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist"
  config.data.data_dir = "/usr/share/datasets/fashion-mnist"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.image_size = 28
  config.data.channels = 1
  config.data.eval_transform = "fashion_mnist"
  config.data.augment = False
  config.data.num_threads = 2
  config.data.eval_examples = -1  # -1: the whole eval split

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128
  config.train.num_epochs = 2.0
  config.train.optimizer = "sgd"
  config.train.learning_rate = 0.1
  config.train.momentum = 0.9
  config.train.nesterov = True
  config.train.weight_decay = 5e-4
  config.train.schedule = "cosine"
  config.train.warmup_steps = 100
  config.train.label_smoothing = 0.0
  config.train.grad_clip_norm = 0.0
  config.train.checkpoint_every_steps = 200
  config.train.log_every_steps = 50
  config.eval_batch_size = 500

  if args["smoke"]:
    config.train.num_epochs = 0.02
    config.train.checkpoint_every_steps = 5
    config.train.log_every_steps = 5
    config.train.warmup_steps = 2
    config.data.eval_examples = 500
  return config
