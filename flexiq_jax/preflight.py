"""Checks before any work: the inputs a run needs (its dataset, its pretrained weights) exist,
and the config values are usable. Each failure is one clear message with the exact commands that
fix it, raised before a stage starts (never a download attempt or a traceback from deep inside
TFDS after minutes of other work).
"""

from __future__ import annotations

import glob
import os

from flexiq_jax.data import fashion_mnist


class ConfigError(ValueError):
  """A config value no stage can use (named, with the values that are)."""


class MissingInput(FileNotFoundError):
  """A dataset or weights file the run needs is not there."""


WEIGHTS_COMMAND = (
    "mkdir -p {dir} && python -c \"import timm, safetensors.torch as st; m = timm.create_model('{tag}', "
    "pretrained=True); st.save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, '{path}')\"")


def check_weights(path: str) -> None:
  """Raises MissingInput naming the command that writes `path` (a timm checkpoint) when it is
  absent. A name `<dir>/<timm tag>.safetensors` (the per-model configs' `weights_path`) gives the
  exact command; other names the general one.

  Args:
    path: the config's `init_weights` path (empty: training from scratch, nothing to check).

  Raises:
    MissingInput: `path` is given and does not exist.
  """
  if not path or os.path.exists(path):
    return
  base = os.path.basename(path)
  tag = base[:-len(".safetensors")] if base.endswith(".safetensors") else "<timm model tag>"
  command = WEIGHTS_COMMAND.format(dir=os.path.dirname(path) or ".", tag=tag, path=path)
  raise MissingInput(f"the pretrained weights {path} (config init_weights) do not exist. Write them once, on a "
                     f"machine with timm and internet access: {command} -- or pass --config.init_weights=<a .safetensors/"
                     f".pth timm checkpoint>, or --config.init_weights='' to train from scratch.")


def _tfds_root(data_dir: str | None) -> str:
  return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def check_data(data_config) -> None:
  """Raises MissingInput when the config's dataset is not where the run will read it: the four
  Fashion-MNIST IDX files, or a prepared TFDS dataset (`tfds build`), with the commands that
  prepare it. Nothing is downloaded.

  Args:
    data_config: the config's `data` section (`name`, and the optional `data_dir` and `train_split`).

  Raises:
    MissingInput: the dataset files are missing, TFDS is not installed or does not know the name,
      or `data_dir` holds Fashion-MNIST files while `name` is another dataset.
  """
  name, data_dir = data_config.name, data_config.get("data_dir") or ""
  if name == "fashion_mnist":
    directory = data_dir or fashion_mnist.DEFAULT_DIR
    missing = [f for files in fashion_mnist._FILES.values() for f in files  # pylint: disable=protected-access
               if not os.path.exists(os.path.join(directory, f))]
    if missing:
      raise MissingInput(f"Fashion-MNIST is not in {directory} (missing {', '.join(missing)}). Install it with "
                         f"`apt-get install dataset-fashion-mnist` (it lands in {fashion_mnist.DEFAULT_DIR}), or put "
                         f"the four *-ubyte.gz files of https://github.com/zalandoresearch/fashion-mnist in a folder "
                         f"and pass --config.data.data_dir=<that folder>.")
    return
  root = _tfds_root(data_dir)
  if data_dir and glob.glob(os.path.join(data_dir, "*-ubyte.gz")):
    raise MissingInput(
        f"--config.data.data_dir={data_dir} holds Fashion-MNIST IDX files, not TFDS datasets, but data.name is "
        f"{name!r}. Prepare {name!r} with TFDS into its own folder (`tfds build {name} --file_format=array_record "
        f"--data_dir=$HOME/tensorflow_datasets`) and pass --config.data.data_dir=$HOME/tensorflow_datasets (or set "
        f"data.name='fashion_mnist').")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise MissingInput(f"data.name={name!r} is read through TFDS, which is not installed: `pip install "
                       f"tensorflow-datasets`, then prepare the dataset (`tfds build {name} --file_format="
                       f"array_record --data_dir={root}`).") from None
  try:
    builder = tfds.builder(name, data_dir=root)
  except Exception as e:  # noqa: BLE001  (TFDS's registry errors list every dataset: keep one line)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise MissingInput(f"TFDS has no dataset {name!r} ({first}). Check --config.data.name; 'fashion_mnist' reads "
                       f"the local IDX files.") from None
  if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    return
  try:  # not where TFDS keeps it by default: open it as the loader will, never downloading
    tfds.data_source(name, split=data_config.get("train_split", "train"), data_dir=data_dir or None, download=False)
    return
  except Exception:  # noqa: BLE001  (TFDS's errors for an unprepared dataset vary and mislead)
    pass
  where = f" --data_dir={root}"
  if name.startswith("imagenet2012"):
    steps = (f"download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (register at "
             f"https://image-net.org/download-images) into a folder <tars>, then run once, with TensorFlow "
             f"installed: `tfds build {name} --file_format=array_record{where} --manual_dir=<tars>`")
  else:
    steps = f"run once, with TensorFlow installed: `tfds build {name} --file_format=array_record{where}`"
  pass_dir = "" if data_dir else " (or prepare it elsewhere and pass --config.data.data_dir=<that folder>)"
  raise MissingInput(f"the TFDS dataset {name!r} is not prepared in {root} (no {builder.data_dir}). To prepare it: "
                     f"{steps}{pass_dir}. Nothing is downloaded automatically.")


def check_model(config) -> None:
  """Raises ConfigError for a model name the registry does not know (naming those it does).

  Args:
    config: a run.py config (its `model.name` is checked).

  Raises:
    ConfigError: the model name is not registered.
  """
  from flexiq_jax import models  # pylint: disable=g-import-not-at-top
  try:
    models.canonical_name(config.model.name)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_numbers(config) -> None:
  """Raises ConfigError for sizes and intervals that must be positive (batch sizes, checkpoint and
  log intervals, image counts) and epochs that must not be negative. Fields the config does not
  have are skipped.

  Args:
    config: a run.py config.

  Raises:
    ConfigError: a checked field is not a number (booleans included) or is out of range.
  """
  positive = ["train.batch_size", "eval_batch_size", "finetune.batch_size", "calib.batch_size", "calib.num_images",
              "train.checkpoint_every_steps", "train.log_every_steps", "finetune.checkpoint_every_steps",
              "data.image_size", "data.channels"]
  non_negative = ["train.num_epochs", "finetune.num_epochs", "train.learning_rate", "finetune.learning_rate"]
  for names, ok, what in ((positive, lambda v: v > 0, "a positive number"),
                          (non_negative, lambda v: v >= 0, "a number >= 0")):
    for name in names:
      value = config
      for key in name.split("."):
        value = value.get(key) if hasattr(value, "get") else None
      if value is None:
        continue
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ConfigError(f"{name} must be {what}, got {value!r}")


def check_inputs(config, *, weights: bool = True) -> None:
  """`check_data` and (`weights`: the float model is still to be made) `check_weights`, both
  before either fails: one MissingInput naming everything missing.

  Args:
    config: a run.py config (its `data` section and `init_weights`).
    weights: whether to check the pretrained weights too.

  Raises:
    MissingInput: the dataset or the weights are missing (the messages of both joined).
  """
  problems = []
  for check, arg in ((check_data, config.data), (check_weights, config.get("init_weights", "") if weights else "")):
    try:
      check(arg)
    except MissingInput as e:
      problems.append(str(e))
  if problems:
    raise MissingInput(" Also: ".join(problems))
