"""Checks a Flax model against timm's PyTorch model: shared by the tests and
`experiments/verify_timm_import.py`. Needs torch and timm (imported only when called).

The check builds timm's model with random weights, makes every normalisation parameter and running
statistic non-trivial (timm initialises BN to identity and zero-inits some, which would hide a
wrong mapping), saves the state dict as .safetensors, imports it with `load_timm`, and compares
the two models' eval-mode logits on the same random input.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Callable, NamedTuple

import numpy as np


def import_torchvision():
  """Imports torchvision beside a CPU-only torch. PyPI's torchvision wheels are linked against CUDA
  torch; beside a CPU-only torch their C++ ops fail to load, which torchvision tolerates except for
  two fake-kernel registrations (`nms`, `qnms`) that then raise at import. Neither timm nor
  aimet_torch uses a torchvision op, so the two op schemas are declared and the import retried."""
  import torch
  try:
    import torchvision
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")  # kept alive in the module: dropping it undefines
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    globals()["_TORCHVISION_SCHEMA_LIB"] = lib
    import torchvision
  return torchvision


def import_timm():
  """Imports timm (which imports torchvision for its transforms and FrozenBatchNorm2d)."""
  import_torchvision()
  import timm
  return timm


class Case(NamedTuple):
  """A timm model and the Flax kwargs that describe the same architecture."""
  build_timm: Callable[[Any, int], Any]  # (timm module, num_classes) -> torch model
  flax_kwargs: Callable[[Any], dict]  # (torch model) -> kwargs for models.create
  image_size: int


def regnet_kwargs_from_timm(model) -> dict:
  """Stage depths, widths and group widths of a timm RegNet (timm derives them from w0/wa/wm)."""
  depths, widths, group_widths = [], [], []
  for i in range(1, 5):
    stage = getattr(model, f"s{i}")
    blocks = list(stage.children())
    conv2 = blocks[0].conv2.conv
    depths.append(len(blocks))
    widths.append(blocks[0].conv3.conv.out_channels)
    group_widths.append(conv2.out_channels // conv2.groups)
  return dict(depths=tuple(depths), widths=tuple(widths), group_widths=tuple(group_widths),
              stem_width=model.stem.conv.out_channels)


def full_case(name: str) -> Case:
  """The model at its real size (224x224 input) with its default Flax kwargs."""
  def build(timm, num_classes):
    return timm.create_model(name, pretrained=False, num_classes=num_classes)
  return Case(build, lambda m: {}, 224)


def _resnet_small(name):
  def build(timm, num_classes):
    # timm's plain 7x7 stem is always 64 wide (its stem_width applies to the deep stems only).
    return timm.create_model(name, pretrained=False, num_classes=num_classes, layers=(1, 2, 1, 1),
                             channels=(8, 16, 24, 32))
  return Case(build, lambda m: dict(depths=(1, 2, 1, 1), widths=(8, 16, 24, 32)), 32)


def _effnet_small(name, gen):
  def build(timm, num_classes):
    from timm.models import efficientnet
    # timm's `tf_` entry points add TF's BN eps and 'SAME' padding before calling the generator.
    tf = dict(bn_eps=efficientnet.BN_EPS_TF_DEFAULT, pad_type="same") if name.startswith("tf_") else {}
    return getattr(efficientnet, gen)(name, channel_multiplier=0.25, depth_multiplier=0.35,
                                      num_classes=num_classes, **tf)
  return Case(build, lambda m: dict(channel_multiplier=0.25, depth_multiplier=0.35), 32)


def _regnet_small():
  def build(timm, num_classes):
    from timm.models.regnet import RegNet, RegNetCfg
    return RegNet(RegNetCfg(w0=8, wa=8.0, wm=2.0, group_size=4, depth=7, stem_width=8), num_classes=num_classes)
  return Case(build, regnet_kwargs_from_timm, 32)


_VIT_SMALL = dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)


def _vit_small(name):
  def build(timm, num_classes):
    return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=32, **_VIT_SMALL)
  return Case(build, lambda m: dict(image_size=32, **_VIT_SMALL), 32)


# 28x28 with window 4 exercises padding to a window multiple, shifted windows with the mask,
# patch merging of an odd (7x7) map, and a last stage no larger than its window (no shift).
_SWIN_SMALL = dict(patch_size=2, window_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4))


def _swin_small(name):
  def build(timm, num_classes):
    return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=28, **_SWIN_SMALL)
  return Case(build, lambda m: dict(image_size=28, **_SWIN_SMALL), 28)


SMALL_CASES: dict[str, Case] = {
    "resnet18": _resnet_small("resnet18"),
    "resnet50": _resnet_small("resnet50"),
    "mobilenetv2_100": _effnet_small("mobilenetv2_100", "_gen_mobilenet_v2"),
    "efficientnet_b0": _effnet_small("efficientnet_b0", "_gen_efficientnet"),
    "tf_efficientnet_lite0": _effnet_small("tf_efficientnet_lite0", "_gen_efficientnet_lite"),
    "regnetx_006": _regnet_small(),
    "vit_small_patch16_224": _vit_small("vit_small_patch16_224"),
    "vit_base_patch16_224": _vit_small("vit_base_patch16_224"),
    "deit_tiny_patch16_224": _vit_small("deit_tiny_patch16_224"),
    "deit_small_patch16_224": _vit_small("deit_small_patch16_224"),
    "deit_base_patch16_224": _vit_small("deit_base_patch16_224"),
    "swin_tiny_patch4_window7_224": _swin_small("swin_tiny_patch4_window7_224"),
}


def perturb_state_dict(state_dict, seed: int = 0) -> dict:
  """Random, non-trivial values for everything timm initialises to constants: norm scales/biases,
  BN running statistics, biases, class token, position embeddings, relative-position tables."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  out = {}
  for key, v in state_dict.items():
    if not torch.is_floating_point(v):
      out[key] = v
      continue
    noise = torch.randn(v.shape, generator=gen, dtype=v.dtype)
    if key.endswith("running_var"):
      v = 0.5 + torch.rand(v.shape, generator=gen, dtype=v.dtype)
    elif key.endswith(("running_mean", "cls_token", "pos_embed", "relative_position_bias_table")) or v.ndim == 1:
      v = v + 0.2 * noise
    out[key] = v.contiguous()
  return out


def compare(name: str, case: Case, *, num_classes: int = 10, batch_size: int = 2, seed: int = 0,
            workdir: str | None = None) -> dict:
  """Runs timm and the imported Flax model on one input; returns the logit differences."""
  import jax
  import torch
  from safetensors.torch import save_file

  from flexiq_jax import models

  timm = import_timm()
  torch.manual_seed(seed)
  tmodel = case.build_timm(timm, num_classes).eval()
  state = perturb_state_dict(tmodel.state_dict(), seed)
  tmodel.load_state_dict(state)
  x = np.random.default_rng(seed).standard_normal((batch_size, case.image_size, case.image_size, 3)).astype(np.float32)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()

  kwargs = case.flax_kwargs(tmodel)
  with tempfile.TemporaryDirectory(dir=workdir) as tmp:
    path = os.path.join(tmp, f"{name}.safetensors")
    # Non-persistent buffers are not in state_dict(); persistent ones (BN statistics) are.
    save_file(state, path)
    variables = models.load_timm(name, path, **kwargs)
  model = models.create(name, num_classes=num_classes, **kwargs)
  out = np.asarray(jax.jit(lambda v, a: model.apply(v, a, train=False))(variables, x))
  max_abs = float(np.max(np.abs(out - ref)))
  scale = float(np.max(np.abs(ref)))
  return dict(model=name, image_size=case.image_size, flax_kwargs=kwargs, batch_size=batch_size,
              num_params=int(sum(p.numel() for p in tmodel.parameters())),
              max_abs_logit=scale, max_abs_diff=max_abs, rel_diff=max_abs / scale if scale else float("inf"),
              passed=bool(max_abs <= 1e-4 * scale))
