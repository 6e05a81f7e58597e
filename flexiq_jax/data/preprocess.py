"""Image preprocessing: one table of each model family's eval transform, timm conventions.

Eval: resize the short side to floor(size / crop_pct), centre-crop `size`, scale to [0, 1],
normalise by mean/std. Train: random-resized-crop (scale 0.08-1, aspect 3/4-4/3) and a flip.
All functions work on one uint8 HWC numpy image, so they run in data-loader threads.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from flexiq_jax import models
from flexiq_jax.models.registry import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD  # noqa: F401

@dataclasses.dataclass(frozen=True)
class EvalTransform:
  crop_pct: float
  interpolation: str  # 'bicubic' | 'bilinear' | 'nearest'
  mean: tuple[float, ...]
  std: tuple[float, ...]


# Each ImageNet architecture's eval transform: timm's pretrained configs (see the design notes,
# section 7), declared in its `models.ModelSpec`; keyed by canonical model name.
EVAL_TRANSFORMS: dict[str, EvalTransform] = {
    **{spec.name: EvalTransform(*spec.eval_transform) for spec in models.specs()},
    "torchvision_v1": EvalTransform(224 / 256, "bilinear", IMAGENET_MEAN, IMAGENET_STD),
    # Small images (Fashion-MNIST, CIFAR): no crop, single-channel statistics broadcast.
    "fashion_mnist": EvalTransform(1.0, "bilinear", (0.2860,), (0.3530,)),
}

_PIL_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def get_eval_transform(name: str) -> EvalTransform:
  """The eval transform of a model family or dataset.

  Args:
    name: a key of EVAL_TRANSFORMS: a canonical model name, 'torchvision_v1' or 'fashion_mnist'.

  Returns:
    The `EvalTransform`.

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  if name not in EVAL_TRANSFORMS:
    raise ValueError(f"no eval preprocessing named {name!r}; known: {', '.join(sorted(EVAL_TRANSFORMS))}")
  return EVAL_TRANSFORMS[name]


def resize(image: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
  """Resizes one image with PIL (unchanged if it already has the size).

  Args:
    image: a uint8 HW or HWC image (HW1 is handled as grey).
    height: the output height.
    width: the output width.
    interpolation: 'bicubic', 'bilinear' or 'nearest'.

  Returns:
    The resized image, with the input's layout.
  """
  if image.shape[0] == height and image.shape[1] == width:
    return image
  squeeze = image.ndim == 3 and image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((width, height), _PIL_INTERP[interpolation]))
  return out[..., None] if squeeze else out


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == channels:
    return image
  if image.shape[-1] == 1:
    return np.repeat(image, channels, axis=-1)
  raise ValueError(f"cannot turn a {image.shape[-1]}-channel image into {channels} channels")


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
  """uint8 HWC (or NHWC) -> float32, (x/255 - mean) / std; 1-value stats broadcast to all channels.

  Args:
    image: uint8 pixels, channels last.
    mean: the per-channel means in [0, 1] units (one value or one per channel).
    std: the per-channel standard deviations, likewise.

  Returns:
    The float32 normalized array, the same shape.
  """
  x = image.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def eval_image(image: np.ndarray, size: int, transform: EvalTransform, channels: int = 3) -> np.ndarray:
  """Resize short side to floor(size / crop_pct), centre-crop size x size, normalise.

  Args:
    image: a uint8 HW or HWC image.
    size: the output's side.
    transform: the eval transform (crop_pct, interpolation, mean, std).
    channels: the output channels (a grey image is replicated).

  Returns:
    The float32 [size, size, channels] image.

  Raises:
    ValueError: the image has neither 1 nor `channels` channels.
  """
  image = _to_channels(image, channels)
  h, w = image.shape[:2]
  short = math.floor(size / transform.crop_pct)
  if h <= w:
    new_h, new_w = short, max(short, round(w * short / h))
  else:
    new_h, new_w = max(short, round(h * short / w)), short
  image = resize(image, new_h, new_w, transform.interpolation)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  image = image[top:top + size, left:left + size]
  return normalize(image, transform.mean, transform.std)


def train_image(image: np.ndarray, size: int, transform: EvalTransform, rng: np.random.Generator,
                channels: int = 3, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True) -> np.ndarray:
  """Inception-style random-resized-crop + horizontal flip (torchvision's sampling rule): up to 10
  tries at a crop of random area and aspect, else a centre crop with the aspect clamped.

  Args:
    image: a uint8 HW or HWC image.
    size: the output's side.
    transform: the eval transform whose interpolation and mean/std are used.
    rng: the random generator of the crop and flip.
    channels: the output channels (a grey image is replicated).
    scale: the range of the crop's area, as fractions of the image's.
    ratio: the range of the crop's aspect (width / height).
    flip: whether to flip horizontally with probability 0.5.

  Returns:
    The float32 [size, size, channels] image.

  Raises:
    ValueError: the image has neither 1 nor `channels` channels.
  """
  image = _to_channels(image, channels)
  h, w = image.shape[:2]
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      break
  else:  # fall back to a centre crop with the aspect clamped into range
    in_ratio = w / h
    if in_ratio < ratio[0]:
      cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
      ch, cw = h, round(h * ratio[1])
    else:
      cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
  image = resize(image[top:top + ch, left:left + cw], size, size, transform.interpolation)
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return normalize(image, transform.mean, transform.std)
