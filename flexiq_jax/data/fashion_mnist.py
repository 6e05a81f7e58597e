"""Fashion-MNIST from the four standard IDX files (`*-ubyte.gz`), no download.

Debian's `dataset-fashion-mnist` installs them at /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10
SPLIT_SIZES = {"train": 60_000, "test": 10_000}  # images in each split of the standard files
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Per-pixel statistics of the training split, in [0, 1] units.
MEAN, STD = 0.2860, 0.3530


def _read_idx(path: str) -> np.ndarray:
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except (EOFError, OSError, gzip.BadGzipFile) as e:
    raise ValueError(f"{path} is damaged ({type(e).__name__}: {e or 'the gzip stream ends early'}); "
                     "replace it with an intact copy of the Fashion-MNIST file") from e
  magic = int.from_bytes(data[0:4], "big")
  if magic >> 8 != 0x08:  # 0x08 = unsigned byte payload
    raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
  ndim = magic & 0xFF
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says {shape} but holds {array.size} bytes (truncated?)")
  return array.reshape(shape)


def parse_split(split: str) -> tuple[str, slice]:
  """A split name with an optional slice of image indices, as TFDS writes them.

  Args:
    split: 'train', 'test', or either with a slice of whole numbers: 'train[:-5000]' (all but
      the last 5000), 'train[-5000:]' (the last 5000), 'test[100:200]'.

  Returns:
    (the split's name, the slice).

  Raises:
    ValueError: a slice that is not [start:stop] of optional integers.
  """
  name, bracket, rest = split.partition("[")
  if not bracket:
    return split, slice(None)
  body = rest[:-1] if rest.endswith("]") else None
  parts = body.split(":") if body is not None else []
  try:
    if len(parts) != 2:
      raise ValueError
    start, stop = (int(p) if p.strip() else None for p in parts)
  except ValueError:
    raise ValueError(f"split {split!r}: write a slice of image indices as name[start:stop], e.g. "
                     f"'train[:-5000]' or 'train[-5000:]'") from None
  return name, slice(start, stop)


def _known_split(split: str) -> tuple[str, slice]:
  """`parse_split`, with one clear error for a split name the standard files do not have."""
  name, part = parse_split(split)
  if name not in _FILES:
    raise ValueError(f"Fashion-MNIST has splits {sorted(_FILES)}, not {split!r}")
  return name, part


def split_size(split: str) -> int:
  """The number of images of `split` ('train', 'test', or sliced as `parse_split` reads it).

  Args:
    split: The split, e.g. 'train[:-5000]'.

  Returns:
    How many images `load(split)` returns (e.g. 55000), without reading the files.

  Raises:
    ValueError: an unknown split name or a malformed slice.
  """
  name, part = _known_split(split)
  return len(range(SPLIT_SIZES[name])[part])


def load(split: str, data_dir: str = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, 28, 28], labels int32 [N]) for split 'train' or 'test'.

  Args:
    split: 'train' or 'test', optionally sliced ('train[:-5000]', `parse_split`).
    data_dir: the folder holding the four standard *-ubyte.gz files.

  Returns:
    The tuple (images, labels), read from the IDX files (nothing is downloaded).

  Raises:
    ValueError: an unknown split, a damaged or truncated file, or image and label counts that differ.
    FileNotFoundError: a file of the split is missing.
  """
  name, part = _known_split(split)
  paths = [os.path.join(data_dir, f) for f in _FILES[name]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST files not found: {', '.join(missing)}. Looked in {data_dir!r}. "
        "Install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; puts them "
        f"in {DEFAULT_DIR}), or set --config.data.data_dir to a folder holding the four "
        "standard *-ubyte.gz files.")
  images, labels = (_read_idx(p) for p in paths)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
  images, labels = images[part], labels[part]
  if not len(images):
    raise ValueError(f"split {split!r} holds no image")
  return images, labels.astype(np.int32)
