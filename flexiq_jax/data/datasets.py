"""Datasets and deterministic, resumable batch streams.

A `Dataset` gives random access to examples. `train_batches` yields the batch of global step s
from (seed, s) alone, so a resumed run sees exactly the batches an uninterrupted run would.
Batch assembly runs in grain's thread pool (decoding and resizing release the GIL).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import grain
import jax
import numpy as np

from flexiq_jax.data import fashion_mnist
from flexiq_jax.data import preprocess

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Dataset:
  """An image-classification split: `load(indices, rng)` -> {'image': f32 NHWC, 'label': i32 N}."""

  name: str
  split: str
  num_examples: int
  num_classes: int
  image_shape: tuple[int, int, int]
  load: Any  # Callable[[np.ndarray, np.random.Generator | None], Batch]; rng None = eval transform


def fashion_mnist_dataset(split: str, data_dir: str = fashion_mnist.DEFAULT_DIR, image_size: int = 28,
                          channels: int = 1, augment: bool = False,
                          normalization: str = "fashion_mnist") -> Dataset:
  """Real Fashion-MNIST held in memory; optional resize and channel replication for
  ImageNet-shaped models; training augmentation = random flip + 2-pixel shift (the flip drawn per
  image, the shift once per batch).

  Args:
    split: 'train' or 'test'.
    data_dir: the folder of the IDX files.
    image_size: the square image size (the 28x28 images are resized once, at load, if different).
    channels: the output channels (the grey channel is replicated).
    augment: whether batches loaded with an rng are augmented.
    normalization: the name of the eval transform whose mean/std (and interpolation) are used
      (`preprocess.EVAL_TRANSFORMS`).

  Returns:
    The `Dataset` (10 classes).

  Raises:
    ValueError: an unknown `normalization` or split, or a damaged file.
    FileNotFoundError: the files are missing.
  """
  images, labels = fashion_mnist.load(split, data_dir)
  transform = preprocess.get_eval_transform(normalization)
  if image_size != images.shape[1]:
    images = np.stack([preprocess.resize(im[..., None], image_size, image_size, transform.interpolation)[..., 0]
                       for im in images])

  def load(indices, rng=None):
    batch = images[indices]
    if rng is not None and augment:
      flip = rng.random(len(batch)) < 0.5
      batch = np.where(flip[:, None, None], batch[:, :, ::-1], batch)
      pad = np.pad(batch, ((0, 0), (2, 2), (2, 2)))
      dy, dx = rng.integers(0, 5, size=2)
      batch = pad[:, dy:dy + image_size, dx:dx + image_size]
    # Grey replicated to `channels`; per-channel statistics (e.g. ImageNet's) already broadcast
    # the one grey channel to three.
    x = preprocess.normalize(batch[..., None], transform.mean, transform.std)
    if x.shape[-1] != channels:
      x = np.repeat(x, channels, axis=-1)
    return {"image": x, "label": labels[indices]}

  return Dataset("fashion_mnist", split, len(labels), fashion_mnist.NUM_CLASSES,
                 (image_size, image_size, channels), load)


def tfds_dataset(name: str, split: str, *, data_dir: str | None = None, image_size: int = 224,
                 channels: int = 3, eval_transform: str = "resnet50", augment: bool = True,
                 image_key: str = "image", label_key: str = "label") -> Dataset:
  """Any TFDS image-classification dataset read with `tfds.data_source` (array_record, no TF).

  Training batches (loaded with an rng) get random-resized-crop + flip when `augment`, else the
  eval preprocessing. Nothing is downloaded.

  Args:
    name: the TFDS dataset name, e.g. 'imagenet2012'.
    split: the TFDS split, e.g. 'train' or 'validation'.
    data_dir: the TFDS data directory (None: TFDS's default).
    image_size: the square output size.
    channels: the output channels (grey images are replicated).
    eval_transform: the name of the eval preprocessing (`preprocess.EVAL_TRANSFORMS`), whose
      interpolation and mean/std the training preprocessing uses too.
    augment: whether batches loaded with an rng are augmented.
    image_key: the feature holding the image.
    label_key: the feature holding the class label.

  Returns:
    The `Dataset`; its size comes from the data source.

  Raises:
    ValueError: TFDS does not know `name`, or `eval_transform` is unknown.
    FileNotFoundError: the split is not prepared in the data directory.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises DatasetNotFoundError / various registry errors
    # TFDS's own message lists every registered dataset (hundreds of lines): keep its first line.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise ValueError(f"TFDS has no dataset {name!r} ({first}). Check --config.data.name; "
                     "'fashion_mnist' reads the local IDX files.") from None
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)  # never a surprise download
  except Exception as e:
    looked = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    raise FileNotFoundError(
        f"TFDS dataset {name!r} split {split!r} is not prepared in {looked!r} ({type(e).__name__}: {e}). "
        f"Prepare it once with TensorFlow installed: `tfds build {name} --file_format=array_record "
        f"--data_dir={looked}` (ImageNet needs the manual download; see docs/configs.md, 'ImageNet'), or set "
        "--config.data.data_dir.") from e
  info = getattr(source, "dataset_info", None) or builder.info
  num_classes = info.features[label_key].num_classes
  transform = preprocess.get_eval_transform(eval_transform)

  def load(indices, rng=None):
    images, labels = [], []
    for i in indices:
      example = source[int(i)]
      image = np.asarray(example[image_key])
      if rng is None or not augment:
        images.append(preprocess.eval_image(image, image_size, transform, channels))
      else:
        images.append(preprocess.train_image(image, image_size, transform, rng, channels))
      labels.append(example[label_key])
    return {"image": np.stack(images), "label": np.asarray(labels, np.int32)}

  # With mock data `info.splits` is empty, so the length comes from the source itself.
  return Dataset(name, split, len(source), num_classes, (image_size, image_size, channels), load)


def get_dataset(data_config, split: str, *, train: bool = False) -> Dataset:
  """Builds a split from a config's `data` section (see configs/quickstart.py).

  Args:
    data_config: the config's `data` section (`name`, `image_size`, `channels` and the optional
      `data_dir`, `augment` and `eval_transform`).
    split: the split's name.
    train: for Fashion-MNIST, whether the split is augmented (with `data.augment`); TFDS datasets
      follow `data.augment` (default True) whatever `train` says.

  Returns:
    The `Dataset`.
  """
  if data_config.name == "fashion_mnist":
    return fashion_mnist_dataset(
        split, data_dir=data_config.get("data_dir") or fashion_mnist.DEFAULT_DIR,
        image_size=data_config.image_size, channels=data_config.channels,
        augment=train and data_config.get("augment", False),
        normalization=data_config.get("eval_transform", "fashion_mnist"))
  return tfds_dataset(
      data_config.name, split, data_dir=data_config.get("data_dir") or None,
      image_size=data_config.image_size, channels=data_config.channels,
      eval_transform=data_config.eval_transform, augment=data_config.get("augment", True))


def _read_options(num_threads: int):
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * max(num_threads, 1))


def _process_slice(batch_size: int, process_index: int | None, process_count: int | None):
  """(this process's index, rows per process) of a global batch: in a multi-host run each process
  reads only its slice; `parallel.shard_batch` assembles the global batch."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if batch_size % count:
    raise ValueError(f"batch size {batch_size} is not divisible by the {count} processes; use a multiple of {count}")
  return index, batch_size // count


def train_batches(dataset: Dataset, batch_size: int, *, seed: int, start_step: int = 0,
                  num_steps: int, num_threads: int = 4, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[Batch]:
  """This process's slice of the global batches (of `batch_size`) for global steps
  [start_step, num_steps): reshuffled every epoch, batches may straddle epochs; step s depends
  only on (seed, s), and the global batch not on the number of processes (augmentation draws do).

  Args:
    dataset: the training split.
    batch_size: the global batch size.
    seed: the shuffling and augmentation seed.
    start_step: the first step to yield (a resumed run's step).
    num_steps: the step to stop before.
    num_threads: grain's reading threads.
    process_index: this process's index (default `jax.process_index()`).
    process_count: the number of processes (default `jax.process_count()`).

  Returns:
    An iterator of batch dicts ('image', 'label') of batch_size / process_count rows; empty when
    `num_steps <= start_step`.

  Raises:
    ValueError: `batch_size` is not divisible by the process count.
  """
  if num_steps <= start_step:
    return iter(())
  index, rows = _process_slice(batch_size, process_index, process_count)
  epochs = -(-num_steps * batch_size // dataset.num_examples)
  indices = grain.MapDataset.range(dataset.num_examples).shuffle(seed=seed).repeat(epochs)
  indices = indices.batch(batch_size, drop_remainder=True)
  rng_key = [] if rows == batch_size else [index]  # one process: the seeds of earlier versions

  def make(step, idx):
    idx = np.asarray(idx)[index * rows:(index + 1) * rows]
    return dataset.load(idx, np.random.default_rng([seed, step, *rng_key]))

  stream = indices.map_with_index(make).slice(slice(start_step, num_steps))
  return iter(stream.to_iter_dataset(_read_options(num_threads)))


def eval_batches(dataset: Dataset, batch_size: int, *, num_examples: int | None = None,
                 num_threads: int = 4, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[Batch]:
  """Every example once, in order, as this process's slice of global batches of `batch_size`;
  the last batch is padded and carries `mask` = 0 on padding, so all batches have one shape (one
  compilation) and the masked sums over the global batch count every example once.

  Args:
    dataset: the eval split.
    batch_size: the global batch size.
    num_examples: how many examples from the start of the split (None: all of them).
    num_threads: grain's reading threads.
    process_index: this process's index (default `jax.process_index()`).
    process_count: the number of processes (default `jax.process_count()`).

  Returns:
    An iterator of batch dicts ('image', 'label', 'mask' float32) of batch_size / process_count rows.

  Raises:
    ValueError: `batch_size` is not divisible by the process count.
  """
  n = dataset.num_examples if num_examples is None else min(num_examples, dataset.num_examples)
  num_batches = -(-n // batch_size)
  index, rows = _process_slice(batch_size, process_index, process_count)

  def make(b):
    start = b * batch_size + index * rows
    idx = np.arange(start, max(start, min(start + rows, n)))
    # A slice that is all padding still loads one example for the shapes, then drops it.
    batch = {k: v[:len(idx)] for k, v in dataset.load(idx if len(idx) else np.arange(1), None).items()}
    pad = rows - len(idx)
    mask = np.concatenate([np.ones(len(idx), np.float32), np.zeros(pad, np.float32)])
    batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    return {**batch, "mask": mask}

  stream = grain.MapDataset.range(num_batches).map(make)
  return iter(stream.to_iter_dataset(_read_options(num_threads)))


def calibration_images(dataset: Dataset, num_images: int, *, seed: int, batch_size: int) -> list[np.ndarray]:
  """`num_images` unlabelled images drawn without replacement from `dataset` (seeded), in batches,
  preprocessed with the eval transform (as at deployment).

  Args:
    dataset: the split to draw from (usually the training split).
    num_images: how many images.
    seed: the seed of the draw.
    batch_size: the images per batch (the last batch may be smaller).

  Returns:
    A list of float32 [batch, H, W, C] image arrays, in index order.

  Raises:
    ValueError: `num_images` exceeds the split's size.
  """
  if num_images > dataset.num_examples:
    raise ValueError(f"asked for {num_images} calibration images but {dataset.name}/{dataset.split} "
                     f"has only {dataset.num_examples}")
  idx = np.sort(np.random.default_rng(seed).choice(dataset.num_examples, num_images, replace=False))
  return [dataset.load(idx[i:i + batch_size], None)["image"] for i in range(0, num_images, batch_size)]
