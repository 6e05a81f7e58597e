"""The serving contract: what `make_predict` / `LoadedRun.predict` accept, and the input spec that
`manifest.json` and `encodings.json` publish (docs/serving.md).

A model is served on images of one shape (H, W, C), float32, normalised as in training:
`(pixel / 255 - mean) / std` per channel, so every value lies in
`[(0 - mean) / std, (1 - mean) / std]`. `check_images` refuses anything else (wrong rank, shape or
dtype, NaN/Inf pixels, values outside that range: raw 0..255 pixels, say) with one ValueError
naming what was given and what is expected; `preprocess` turns raw uint8 images into that form
with the training pipeline's own functions (`flexiq_jax.data.preprocess`). `check_ratio` accepts a
real number in [0, 1] only (not a string, a bool or an array of several values).
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from flexiq_jax.data import preprocess as preprocess_lib

# Slack on the value range: a normalised pixel computed in another precision or order may land
# this far outside the exact bounds.
RANGE_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """One served image: shape (H, W, C), dtype, and the normalisation that maps uint8 pixels into
  the model's input range (mean/std None when unknown, e.g. a model quantized in memory)."""

  shape: tuple[int, ...] | None  # (H, W, C); None: any H, W (channels still checked when known)
  dtype: str = "float32"
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  channels: int | None = None
  transform: str | None = None  # the name in data.preprocess.EVAL_TRANSFORMS

  @classmethod
  def from_config(cls, config) -> "InputSpec":
    """The spec of a run.py config: data.image_size, data.channels and data.eval_transform."""
    transform = config.data.get("eval_transform", "fashion_mnist")
    t = preprocess_lib.get_eval_transform(transform)
    c = int(config.data.channels)
    return cls((int(config.data.image_size), int(config.data.image_size), c), "float32",
               tuple(float(m) for m in t.mean), tuple(float(s) for s in t.std), c, transform)

  @classmethod
  def from_json(cls, doc: dict) -> "InputSpec":
    """The inverse of `to_json` (as manifest.json and encodings.json hold it)."""
    shape = list(doc.get("shape") or [])
    if shape and shape[0] == "batch":
      shape = shape[1:]
    norm = doc.get("normalization") or {}
    return cls(tuple(int(d) for d in shape) or None, doc.get("dtype", "float32"),
               tuple(norm["mean"]) if norm.get("mean") else None, tuple(norm["std"]) if norm.get("std") else None,
               int(shape[-1]) if shape else None, doc.get("transform"))

  @property
  def value_range(self) -> tuple[float, float] | None:
    """(lowest, highest) value a normalised pixel can take, over all channels (None if unknown)."""
    if self.mean is None or self.std is None:
      return None
    mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
    return float(np.min((0 - mean) / std)), float(np.max((1 - mean) / std))

  def to_json(self) -> dict:
    """The spec as manifest.json and encodings.json carry it."""
    low_high = self.value_range
    return {"shape": ["batch", *self.shape] if self.shape else None, "layout": "NHWC", "dtype": self.dtype,
            "value_range": list(low_high) if low_high else None,
            "normalization": None if self.mean is None else {
                "mean": list(self.mean), "std": list(self.std),
                "formula": "(uint8_pixel / 255 - mean) / std, per channel (one value: every channel)"},
            "transform": self.transform}


def _describe(images) -> str:
  return f"shape {tuple(np.shape(images))}, dtype {getattr(images, 'dtype', type(images).__name__)}"


def check_images(images, spec: InputSpec | None, *, values: bool = True) -> None:
  """Raises one ValueError if `images` break the contract of `spec` (module docstring).

  Args:
    images: a batch (N, H, W, C), numpy or jax.
    spec: the model's input spec; None checks rank, dtype and finiteness only.
    values: also check the values on the host (NaN/Inf, range); False leaves them to
      `check_values` on statistics computed with the model (`make_predict` does so).

  Raises:
    ValueError: If `images` is not 4-D, not floating point, has another shape or channel count
      than `spec`, or (with `values`) holds NaN/Inf or values outside the spec's range.
  """
  shape = tuple(np.shape(images))
  dtype = np.dtype(getattr(images, "dtype", np.asarray(images).dtype))
  expected = f"(batch, {', '.join(map(str, spec.shape))})" if spec and spec.shape else "(batch, H, W, C)"
  hint = " For raw uint8 images pass preprocess=True." if spec and spec.mean is not None else ""
  if len(shape) != 4:
    raise ValueError(f"images must be a batch {expected} float32 (NHWC), got {_describe(images)}."
                     + (" Add a batch axis for one image." if len(shape) == 3 else "") + hint)
  if dtype.kind != "f":
    raise ValueError(f"images must be float32 normalised pixels {expected}, got {_describe(images)}.{hint}")
  if spec is not None and spec.shape and shape[1:] != tuple(spec.shape):
    layout = " (NCHW? the model takes NHWC)" if shape[1:] == (spec.shape[2], *spec.shape[:2]) else ""
    raise ValueError(f"images must have shape {expected}, got {_describe(images)}{layout}.{hint}")
  if spec is not None and spec.channels and shape[-1] != spec.channels:
    raise ValueError(f"images must have {spec.channels} channel(s) in the last axis (NHWC), got "
                     f"{_describe(images)}.{hint}")
  if values:
    array = np.asarray(images, np.float32)
    check_values(images, spec, (bool(np.isfinite(array).all()), float(array.min(initial=0.0)),
                                float(array.max(initial=0.0))))


def value_stats(images):
  """(all finite, min, max) of a batch, traced: computed on the device in the serving call.

  Args:
    images: A batch of images, any shape (jax or numpy).

  Returns:
    A (3,) float32 jax array: 1.0 if every value is finite else 0.0, the minimum and the maximum.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = images.astype(jnp.float32)
  return jnp.stack([jnp.all(jnp.isfinite(x)).astype(jnp.float32), jnp.min(x), jnp.max(x)])


def check_values(images, spec: InputSpec | None, stats) -> None:
  """Raises one ValueError for NaN/Inf pixels or values outside the spec's normalised range,
  from `stats` = (all finite, min, max) of `images` (`value_stats`).

  Args:
    images: The batch the statistics were computed on (read again on the host only to locate
      NaN/Inf pixels).
    spec: The model's input spec; None checks finiteness only.
    stats: (all finite, min, max) of `images`, as `value_stats` returns them.

  Raises:
    ValueError: If `images` holds NaN/Inf, or its values leave the spec's normalised range by more
      than RANGE_TOLERANCE.
  """
  finite, lo, hi = (float(v) for v in np.asarray(stats, np.float64))
  shape = tuple(np.shape(images))
  hint = " For raw uint8 images pass preprocess=True." if spec and spec.mean is not None else ""
  if not finite:
    bad = ~np.isfinite(np.asarray(images, np.float32).reshape(shape[0], -1))
    rows = np.unique(np.nonzero(bad)[0])
    raise ValueError(f"images hold NaN or Inf pixels (in {len(rows)} of {shape[0]} images, the first at "
                     f"index {int(rows[0])}); the model's output on them would be meaningless")
  low_high = spec.value_range if spec is not None else None
  if low_high is not None and (lo < low_high[0] - RANGE_TOLERANCE or hi > low_high[1] + RANGE_TOLERANCE):
    raise ValueError(f"image values lie in [{lo:.4g}, {hi:.4g}], outside the normalised range "
                     f"[{low_high[0]:.4g}, {low_high[1]:.4g}] the model was trained on ((pixel/255 - mean)/std "
                     f"with mean {list(spec.mean)}, std {list(spec.std)}).{hint}")


def check_ratio(ratio) -> float:
  """`ratio` as a float if it is a real number in [0, 1] (a Python/NumPy number or a 0-d array);
  one ValueError otherwise (a string, a bool, None, NaN, several values, outside [0, 1]).

  Args:
    ratio: the share of the lowerable layers' MACs in 4 bits.

  Returns:
    The ratio as a Python float.

  Raises:
    ValueError: If `ratio` is not a single real number (or is a bool) or lies outside [0, 1]
      (NaN included).
  """
  value = ratio
  if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy / jax arrays
    if np.shape(value) != ():
      raise ValueError(f"ratio must be one number in [0, 1], got an array of shape {tuple(np.shape(value))}")
    if np.dtype(value.dtype).kind not in "iuf":
      raise ValueError(f"ratio must be a number in [0, 1], got an array of dtype {value.dtype}")
    value = np.asarray(value).item()
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"ratio must be a number in [0, 1] (the share of 4-bit MACs), got {ratio!r} of type "
                     f"{type(ratio).__name__}")
  r = float(value)
  if not 0.0 <= r <= 1.0:  # NaN fails both comparisons
    raise ValueError(f"ratio must be in [0, 1] (the share of 4-bit MACs), got {r}")
  return r


def preprocess(images, spec: InputSpec) -> np.ndarray:
  """Raw uint8 images -> the model's normalised float32 input, with the training pipeline's eval
  transform (`data.preprocess.eval_image`: resize, centre crop, normalise).

  Args:
    images: uint8, (N, H, W) or (N, H, W, C), any H and W.
    spec: the model's input spec (needs its normalisation and shape).

  Returns:
    float32 (N, *spec.shape).

  Raises:
    ValueError: If `spec` lacks its normalisation or shape, or `images` is not uint8, not 3-D or
      4-D, or has a channel count other than 1 or the spec's.
  """
  images = np.asarray(images)
  if spec.mean is None or not spec.shape:
    raise ValueError("preprocess=True needs the model's input normalisation (mean/std) and shape; this "
                     "predict function was made without an input_spec")
  if images.dtype != np.uint8:
    raise ValueError(f"preprocess=True takes raw uint8 pixels (N, H, W[, C]), got dtype {images.dtype}; "
                     "pass normalised float32 images with preprocess=False")
  if images.ndim not in (3, 4):
    raise ValueError(f"preprocess=True takes a batch of uint8 images (N, H, W) or (N, H, W, C), got shape "
                     f"{images.shape}")
  if images.ndim == 4 and images.shape[-1] not in (1, spec.shape[2]):
    raise ValueError(f"preprocess=True takes NHWC images with 1 or {spec.shape[2]} channel(s), got shape "
                     f"{images.shape}")
  if spec.transform is not None:
    transform = preprocess_lib.get_eval_transform(spec.transform)
  else:
    transform = preprocess_lib.EvalTransform(1.0, "bilinear", spec.mean, spec.std)
  size, channels = spec.shape[0], spec.shape[2]
  if images.shape[1:3] == tuple(spec.shape[:2]):
    x = images if images.ndim == 4 else images[..., None]
    x = preprocess_lib.normalize(x, transform.mean, transform.std)
    return np.ascontiguousarray(np.broadcast_to(x, (*x.shape[:3], channels)) if x.shape[-1] != channels else x)
  return np.stack([preprocess_lib.eval_image(im, size, transform, channels) for im in images]).astype(np.float32)
