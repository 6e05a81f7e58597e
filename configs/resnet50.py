r"""ResNet-50 (`resnet50`) with FlexiQ on ImageNet, from timm's pretrained weights.

  python run.py --config=configs/resnet50.py --workdir=workdirs/resnet50
  python run.py --config=configs/resnet50.py:fmnist --workdir=workdirs/resnet50_fmnist

Needs ImageNet prepared for TFDS (docs/configs.md, "ImageNet") and timm's `resnet50.a1_in1k` weights
converted once to `weights/resnet50.a1_in1k.safetensors` (the command is in configs/common.py).

No float training (`train.num_epochs=0`). It evaluates the imported model (top-1 should match timm's
ImageNet validation result for `resnet50.a1_in1k` at 224 px; timm's headline number, at 288 px and
crop 1.0, is higher), calibrates on 1024 training images, selects 4-bit channels at ratio levels
0.25/0.5/0.75/1.0 (evolutionary search), finetunes for 3 epochs of multi-ratio QAT with SGD (lr
5e-4), and writes <workdir>/results.json, ratio_table.md and ratio_plot.png: top-1 before and after
finetuning at 4-bit ratios 0/25/50/75/100% with relative BOPs.

Arguments: `:fmnist` = the same family reduced (`models.variants.small_kwargs`), trained from
scratch on real Fashion-MNIST (28x28x1), then the same FlexiQ pipeline; `:smoke` = a few steps of
every stage; combinable (`:fmnist,smoke`).
"""

from configs import common
from flexiq_jax.config_utils import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, fmnist=False, smoke=False)
  return common.model_config("resnet50", fmnist=args["fmnist"], smoke=args["smoke"])
