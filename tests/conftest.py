"""Shared fixtures: a tiny Fashion-MNIST-format dataset written as real IDX files, and a smoke config."""

import gzip
import os
import tempfile

os.environ.setdefault("FLEXIQ_NO_PROGRESS", "1")
# Many tests compile the same small computations (and subprocess tests recompile what the parent
# did): a persistent XLA cache makes the suite several times faster on 2 cores.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "flexiq_jax_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def write_idx(path, array: np.ndarray) -> None:
  """Writes an unsigned-byte IDX file (the Fashion-MNIST format), gzip-compressed."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_fmnist_dir(root, num_train=256, num_test=128, seed=0):
  """Class k images are noisy stripes at row band k, so a small model can learn them quickly."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  for split, n, prefix in (("train", num_train, "train"), ("test", num_test, "t10k")):
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
      images[i, 2 + 2 * k:4 + 2 * k, :] = 250
    write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels)
  return str(root)


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory):
  return make_fmnist_dir(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture
def smoke_config(tiny_fmnist):
  """The quickstart config shrunk to a few steps on the tiny dataset."""
  from configs import quickstart

  config = quickstart.get_config("smoke")
  config.data.data_dir = tiny_fmnist
  config.train.batch_size = 32
  config.train.num_epochs = 1.0  # 8 steps on 256 images
  config.train.checkpoint_every_steps = 3
  config.train.log_every_steps = 2
  config.eval_batch_size = 64
  config.data.eval_examples = -1
  return config
