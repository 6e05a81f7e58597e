import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from flexiq_jax import data
from flexiq_jax.data import fashion_mnist, preprocess

REAL_FMNIST = fashion_mnist.DEFAULT_DIR


def test_idx_reader_roundtrip(tiny_fmnist):
  images, labels = fashion_mnist.load("train", tiny_fmnist)
  assert images.shape == (256, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (256,) and labels.dtype == np.int32 and labels.max() < 10
  # The fixture paints a bright band at rows 2+2k for class k.
  assert np.all(images[np.arange(256), 2 + 2 * labels, 0] == 250)


def test_a_sliced_split_is_a_slice_of_the_images_and_the_two_halves_make_the_whole(tiny_fmnist):
  images, labels = fashion_mnist.load("train", tiny_fmnist)
  head, head_labels = fashion_mnist.load("train[:-56]", tiny_fmnist)
  tail, tail_labels = fashion_mnist.load("train[-56:]", tiny_fmnist)
  assert len(head) == 200 and len(tail) == 56
  assert np.array_equal(np.concatenate([head, tail]), images)
  assert np.array_equal(np.concatenate([head_labels, tail_labels]), labels)
  assert np.array_equal(fashion_mnist.load("test[10:20]", tiny_fmnist)[0], fashion_mnist.load("test", tiny_fmnist)[0][10:20])
  ds = data.get_dataset(_fmnist_config(tiny_fmnist, "train[-56:]"), "train[-56:]")
  assert ds.num_examples == 56
  for bad in ("train[5]", "train[a:b]", "train[:3", "train[1:2:3]"):
    with pytest.raises(ValueError, match="slice of image indices"):
      fashion_mnist.load(bad, tiny_fmnist)
  with pytest.raises(ValueError, match="holds no image"):
    fashion_mnist.load("train[:-256]", tiny_fmnist)


def _fmnist_config(data_dir, split):
  import ml_collections
  return ml_collections.ConfigDict({"name": "fashion_mnist", "data_dir": data_dir, "train_split": split,
                                    "image_size": 28, "channels": 1, "eval_transform": "fashion_mnist"})


@pytest.mark.skipif(not os.path.isdir(REAL_FMNIST), reason="dataset-fashion-mnist not installed")
def test_the_fmnist_configs_keep_a_holdout_slice_out_of_training():
  from configs import common
  config = common.model_config("resnet18", fmnist=True)
  train_x, _ = fashion_mnist.load(config.data.train_split)
  held_x, held_y = fashion_mnist.load(config.data.holdout_split)
  assert len(train_x) == common.FMNIST_TRAIN_EXAMPLES and len(held_x) == common.FMNIST_HOLDOUT
  assert len(train_x) + len(held_x) == 60000 and np.bincount(held_y).min() > 400  # every class held out
  assert config.finetune.lr_select_images == common.FMNIST_HOLDOUT
  for split, images in ((config.data.train_split, train_x), (config.data.holdout_split, held_x), ("test[100:250]", None)):
    assert fashion_mnist.split_size(split) == len(images if images is not None else fashion_mnist.load(split)[0])
  with pytest.raises(ValueError, match="splits"):
    fashion_mnist.split_size("validation")


@pytest.mark.skipif(not os.path.isdir(REAL_FMNIST), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_is_complete():
  train_x, train_y = fashion_mnist.load("train")
  test_x, test_y = fashion_mnist.load("test")
  assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
  assert np.bincount(train_y).tolist() == [6000] * 10
  assert np.bincount(test_y).tolist() == [1000] * 10
  # Normalisation constants match the data.
  assert abs(train_x.mean() / 255 - fashion_mnist.MEAN) < 1e-3
  assert abs(train_x.std() / 255 - fashion_mnist.STD) < 1e-3


def test_missing_dataset_says_where_and_how(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    fashion_mnist.load("train", str(tmp_path))
  assert str(tmp_path) in str(e.value) and "apt-get install dataset-fashion-mnist" in str(e.value)
  with pytest.raises(ValueError, match="splits"):
    fashion_mnist.load("validation", str(tmp_path))


def test_idx_reader_error_paths(tmp_path):
  """A missing file is named (only that one), and a wrong magic, a truncated payload or a count
  mismatch between images and labels are errors, not silently wrong arrays."""
  import gzip
  import shutil

  from conftest import make_fmnist_dir, write_idx

  good = make_fmnist_dir(str(tmp_path / "good"), num_train=8, num_test=4)
  images_name, labels_name = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"

  def broken(name):
    d = tmp_path / name
    shutil.copytree(good, d)
    return d

  d = broken("missing")
  os.remove(d / labels_name)
  with pytest.raises(FileNotFoundError) as e:
    fashion_mnist.load("train", str(d))
  assert labels_name in str(e.value) and images_name not in str(e.value)
  fashion_mnist.load("test", str(d))  # the other split is still readable

  d = broken("magic")  # 0x0D = float32 payload, not unsigned bytes
  raw = gzip.open(d / images_name).read()
  with gzip.open(d / images_name, "wb") as f:
    f.write(bytes([0, 0, 0x0D]) + raw[3:])
  with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
    fashion_mnist.load("train", str(d))

  d = broken("truncated")  # the header says 8 x 28 x 28, the payload stops 100 bytes short
  with gzip.open(d / images_name, "wb") as f:
    f.write(raw[:-100])
  with pytest.raises(ValueError, match="truncated"):
    fashion_mnist.load("train", str(d))
  with gzip.open(d / images_name, "wb") as f:  # ... or has bytes beyond what the header says
    f.write(raw + b"\0" * 28)
  with pytest.raises(ValueError, match="truncated"):
    fashion_mnist.load("train", str(d))

  d = broken("counts")  # 8 images but 7 labels
  write_idx(d / labels_name, np.zeros(7, np.uint8))
  with pytest.raises(ValueError, match="8 images but 7 labels"):
    fashion_mnist.load("train", str(d))


def test_resize_and_three_channels(tiny_fmnist):
  ds = data.fashion_mnist_dataset("test", tiny_fmnist, image_size=32, channels=3)
  batch = ds.load(np.arange(4), None)
  assert batch["image"].shape == (4, 32, 32, 3) and ds.image_shape == (32, 32, 3)
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])


def test_three_channels_with_per_channel_statistics(tiny_fmnist):
  """Grey replicated to RGB and normalised with ImageNet's per-channel mean/std: three channels
  (not nine), each (g/255 - mean_c) / std_c of the same grey value."""
  from flexiq_jax.data import preprocess

  ds = data.fashion_mnist_dataset("test", tiny_fmnist, image_size=32, channels=3, normalization="resnet18")
  image = ds.load(np.arange(2), None)["image"]
  assert image.shape == (2, 32, 32, 3)
  grey = image[..., 0] * preprocess.IMAGENET_STD[0] + preprocess.IMAGENET_MEAN[0]
  for c in range(3):
    np.testing.assert_allclose(image[..., c], (grey - preprocess.IMAGENET_MEAN[c]) / preprocess.IMAGENET_STD[c],
                               atol=1e-5)


def test_train_batches_deterministic_and_resumable(tiny_fmnist):
  ds = data.fashion_mnist_dataset("train", tiny_fmnist, augment=True)
  run1 = list(data.train_batches(ds, 32, seed=3, num_steps=12, num_threads=2))
  run2 = list(data.train_batches(ds, 32, seed=3, num_steps=12, num_threads=1))
  resumed = list(data.train_batches(ds, 32, seed=3, start_step=7, num_steps=12))
  other_seed = list(data.train_batches(ds, 32, seed=4, num_steps=12))
  assert len(run1) == 12
  for a, b in zip(run1, run2):
    np.testing.assert_array_equal(a["image"], b["image"])
  for a, b in zip(run1[7:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(run1[0]["label"], other_seed[0]["label"])
  # Each epoch (8 batches of 32 = 256) visits every example exactly once.
  no_aug = data.fashion_mnist_dataset("train", tiny_fmnist)
  labels = np.concatenate([b["label"] for b in data.train_batches(no_aug, 32, seed=3, num_steps=8)])
  assert sorted(labels.tolist()) == sorted(fashion_mnist.load("train", tiny_fmnist)[1].tolist())
  # Consecutive epochs are shuffled differently.
  epoch2 = np.concatenate([b["label"] for b in data.train_batches(no_aug, 32, seed=3, start_step=8,
                                                                    num_steps=16)])
  assert not np.array_equal(labels, epoch2)


def test_eval_batches_pad_and_mask(tiny_fmnist):
  ds = data.fashion_mnist_dataset("test", tiny_fmnist)
  batches = list(data.eval_batches(ds, 50))
  assert [b["image"].shape[0] for b in batches] == [50, 50, 50]
  assert batches[-1]["mask"].sum() == 128 - 100 and batches[0]["mask"].sum() == 50
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(labels, fashion_mnist.load("test", tiny_fmnist)[1])


def test_calibration_images_seeded_unlabelled(tiny_fmnist):
  ds = data.fashion_mnist_dataset("train", tiny_fmnist)
  a = data.calibration_images(ds, 70, seed=1, batch_size=32)
  b = data.calibration_images(ds, 70, seed=1, batch_size=32)
  c = data.calibration_images(ds, 70, seed=2, batch_size=32)
  assert [x.shape[0] for x in a] == [32, 32, 6]
  assert all(isinstance(x, np.ndarray) for x in a)  # images only, no labels
  np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
  assert not np.array_equal(np.concatenate(a), np.concatenate(c))
  # Without replacement: 70 distinct images.
  flat = np.concatenate(a).reshape(70, -1)
  assert len(np.unique(flat, axis=0)) == 70
  with pytest.raises(ValueError, match="only 256"):
    data.calibration_images(ds, 1000, seed=0, batch_size=32)


def test_eval_transform_geometry():
  from PIL import Image

  image = np.random.default_rng(0).integers(0, 255, size=(300, 400, 3), dtype=np.uint8)
  t = preprocess.get_eval_transform("resnet50")  # crop_pct 0.95
  out = preprocess.eval_image(image, 224, t)
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  # By hand: short side 300 -> floor(224 / 0.95) = 235, long side 400 * 235 / 300 = 313.3 -> 313
  # (bicubic), then the centre 224 x 224: rows (235 - 224) // 2 = 5.., columns (313 - 224) // 2 = 44..
  resized = np.asarray(Image.fromarray(image).resize((313, 235), Image.BICUBIC))
  np.testing.assert_allclose(out, preprocess.normalize(resized[5:229, 44:268], t.mean, t.std), atol=1e-6)
  # No resize (crop_pct 1, short side already the size): exactly the centre window of the image,
  # for a wide image (columns 6..33 of 40) and a tall one (rows 11..38 of 50).
  fm = preprocess.get_eval_transform("fashion_mnist")
  wide = np.random.default_rng(1).integers(0, 255, size=(28, 40), dtype=np.uint8)
  tall = np.random.default_rng(2).integers(0, 255, size=(50, 28), dtype=np.uint8)
  np.testing.assert_allclose(preprocess.eval_image(wide, 28, fm, channels=1)[..., 0],
                             (wide[:, 6:34] / 255 - 0.2860) / 0.3530, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(preprocess.eval_image(tall, 28, fm, channels=1)[..., 0],
                             (tall[11:39, :] / 255 - 0.2860) / 0.3530, rtol=1e-5, atol=1e-5)
  # mean/std normalisation: a uniform grey image maps to (v/255 - mean)/std.
  grey = np.full((256, 256, 3), 128, np.uint8)
  vit = preprocess.eval_image(grey, 224, preprocess.get_eval_transform("vit_base_patch16_224"))
  np.testing.assert_allclose(vit, (128 / 255 - 0.5) / 0.5, atol=1e-6)
  with pytest.raises(ValueError, match="known"):
    preprocess.get_eval_transform("no_such_model")


def test_train_transform_shapes_and_determinism():
  image = np.random.default_rng(0).integers(0, 255, size=(60, 90, 3), dtype=np.uint8)
  t = preprocess.get_eval_transform("resnet50")
  a = preprocess.train_image(image, 32, t, np.random.default_rng(5))
  b = preprocess.train_image(image, 32, t, np.random.default_rng(5))
  assert a.shape == (32, 32, 3)
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name,split", [("cifar10", "train"), ("imagenet2012", "validation")])
def test_tfds_mock_data(name, split):
  with tfds.testing.mock_data(num_examples=12):
    ds = data.tfds_dataset(name, split, image_size=32, eval_transform="deit_small_patch16_224")
    assert ds.num_examples == 12
    assert ds.num_classes == {"cifar10": 10, "imagenet2012": 1000}[name]
    train = list(data.train_batches(ds, 4, seed=0, num_steps=3, num_threads=1))
    assert train[0]["image"].shape == (4, 32, 32, 3) and train[0]["label"].dtype == np.int32
    evals = list(data.eval_batches(ds, 5))
    assert len(evals) == 3 and evals[-1]["mask"].tolist() == [1, 1, 0, 0, 0]
    assert np.isfinite(evals[0]["image"]).all()


def test_tfds_augment_switch():
  """augment=False: training batches get the eval preprocessing; True: random crops/flips."""
  with tfds.testing.mock_data(num_examples=8):
    plain = data.tfds_dataset("cifar10", "train", image_size=32, eval_transform="resnet50", augment=False)
    augmented = data.tfds_dataset("cifar10", "train", image_size=32, eval_transform="resnet50", augment=True)
    idx = np.arange(4)
    np.testing.assert_array_equal(plain.load(idx, np.random.default_rng(0))["image"], plain.load(idx, None)["image"])
    assert not np.array_equal(augmented.load(idx, np.random.default_rng(0))["image"],
                              augmented.load(idx, None)["image"])


def test_tfds_unprepared_dataset_error(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    data.tfds_dataset("cifar10", "train", data_dir=str(tmp_path))
  assert str(tmp_path) in str(e.value) and "tfds build cifar10" in str(e.value)


def test_a_bad_fashion_mnist_split_is_refused_when_the_config_is_checked():
  from configs import quickstart
  from flexiq_jax import pipeline
  for field, value, match in (("train_split", "train[x]", "data.train_split: split 'train\\[x\\]'"),
                              ("holdout_split", "valid", "data.holdout_split: Fashion-MNIST has splits")):
    config = quickstart.get_config("smoke")
    config.data[field] = value
    with pytest.raises(ValueError, match=match):
      pipeline.check_config(config)
