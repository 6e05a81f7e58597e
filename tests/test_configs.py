"""The per-model configs (`configs/<model>.py`): they load in every variant, name a registered model
and a known eval transform, have exactly quickstart's fields (names and types), and survive
run.py's locked command-line overrides. No training here (tests/test_models_fmnist.py trains each
`:fmnist` variant)."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from flexiq_jax import models
from flexiq_jax.data import preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# config file -> the canonical model name it runs.
MODEL_CONFIGS = {spec.config: spec.name for spec in models.specs()}
VARIANTS = ("", "smoke", "fmnist", "fmnist,smoke")


def load_config(file: str, arg: str = ""):
  """get_config(arg) of configs/<file>.py, loaded by path as config_flags does."""
  path = os.path.join(ROOT, "configs", f"{file}.py")
  spec = importlib.util.spec_from_file_location(f"_config_{file}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def flat(config, prefix="") -> dict:
  """{'train.batch_size': 128, ...} with references resolved; model.kwargs is per model, so skipped."""
  out = {}
  for key, value in config.items():
    name = prefix + key
    if name == "model.kwargs":
      continue
    if hasattr(value, "items"):
      out.update(flat(value, name + "."))
    else:
      out[name] = value
  return out


def _quickstart():
  return flat(load_config("quickstart"))


def test_every_model_has_a_config():
  assert set(MODEL_CONFIGS.values()) == set(models.available()) - {"resnet_small"}
  for file in MODEL_CONFIGS:
    assert os.path.exists(os.path.join(ROOT, "configs", f"{file}.py"))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("file", sorted(MODEL_CONFIGS))
def test_config_loads_and_matches_quickstart_fields(file, variant):
  config = load_config(file, variant)
  assert models.canonical_name(config.model.name) == MODEL_CONFIGS[file]
  assert config.data.eval_transform in preprocess.EVAL_TRANSFORMS
  ours, reference = flat(config), _quickstart()
  assert sorted(ours) == sorted(reference), (
      f"missing: {sorted(set(reference) - set(ours))}, extra: {sorted(set(ours) - set(reference))}")
  # Same types, so that `--config.x=...` overrides parse the same way (a float field given an int
  # default would reject `--config.train.num_epochs=0.5`). Tuples may differ in length.
  wrong = {k: (type(ours[k]).__name__, type(reference[k]).__name__) for k in reference
           if type(ours[k]) is not type(reference[k])}
  assert not wrong, wrong
  fmnist = "fmnist" in variant
  assert config.data.name == ("fashion_mnist" if fmnist else "imagenet2012")
  if fmnist:
    assert config.init_weights == "" and config.train.num_epochs > 0
    assert config.data.eval_transform == "fashion_mnist" and config.data.channels == 1
    assert config.data.image_size == 28 and config.data.eval_split == "test"
  else:
    assert config.data.eval_transform == MODEL_CONFIGS[file]  # the timm preprocessing of the weights
    assert (config.data.train_split, config.data.eval_split) == ("train", "validation")
    assert (config.data.image_size, config.data.channels) == (224, 3)
    assert config.train.num_epochs == 0.0  # pretrained: no float training
    assert config.init_weights.startswith("weights/" + MODEL_CONFIGS[file] + ".")
    assert config.init_weights.endswith(".safetensors")
    # The architecture of the timm weights; transformers carry the input size (pos-embed resize).
    kwargs = config.model.kwargs.to_dict()
    assert kwargs == ({"image_size": 224} if kwargs else {})
  assert tuple(config.select.levels) == (0.25, 0.5, 0.75, 1.0)
  assert config.sweep.ratios[0] == 0.0 and config.sweep.ratios[-1] == 1.0
  for batch in ("train.batch_size", "finetune.batch_size", "eval_batch_size", "calib.batch_size"):
    assert ours[batch] % 8 == 0, batch  # divisible by the device count of 1-8 GPU machines
  if "smoke" in variant:
    train_examples = 60_000 if fmnist else 1_281_167
    steps = math.ceil(config.finetune.num_epochs * train_examples / config.finetune.batch_size)
    assert 1 <= steps <= 12
    assert config.calib.num_images <= 64 and config.data.eval_examples <= 500


@pytest.mark.parametrize("file", sorted(MODEL_CONFIGS))
def test_config_model_builds_for_its_input(file):
  """model.kwargs and data.image_size agree: the model traces on the configured input (no compute).
  `:fmnist` is the same family reduced: its top-level modules are among the full model's (so the
  same quantization rules apply), with under 1M parameters and at most a fifth of the full one's."""
  num_params, modules = {}, {}
  for variant in ("", "fmnist"):
    config = load_config(file, variant)
    num_classes = 10 if variant else 1000
    model = models.create(config.model.name, num_classes=num_classes, **config.model.kwargs.to_dict())
    x = jnp.zeros((1, config.data.image_size, config.data.image_size, config.data.channels))
    variables = jax.eval_shape(lambda m=model, x=x: m.init(jax.random.PRNGKey(0), x))
    out = jax.eval_shape(lambda v, m=model, x=x: m.apply(v, x), variables)
    assert out.shape == (1, num_classes)
    num_params[variant] = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))
    modules[variant] = set(variables["params"])
  assert modules["fmnist"] <= modules[""], sorted(modules["fmnist"] - modules[""])
  assert num_params["fmnist"] < min(1_000_000, num_params[""] / 5), num_params


def test_unknown_argument_is_an_error():
  with pytest.raises(ValueError, match="unknown config argument 'fmnsit'.*fmnist"):
    load_config("vit_b", "fmnsit")


def _parse(monkeypatch, argv):
  """run.py's flag: lock_config=True; config_flags reads the overrides from sys.argv."""
  monkeypatch.setattr("sys.argv", argv)
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  fv(argv)
  return holder.value


def test_command_line_overrides_on_the_locked_config(monkeypatch):
  """Overrides of several types, and a ViT's image size that follows data.image_size."""
  config = _parse(monkeypatch, [
      "run.py", f"--config={ROOT}/configs/vit_s.py:fmnist,smoke", "--config.data.image_size=32",
      "--config.train.num_epochs=0.5", "--config.sweep.ratios=(0.0,0.5)", "--config.select.selector=greedy",
      "--config.init_weights=/tmp/w.safetensors"])
  assert config.model.kwargs.image_size == 32 and config.data.image_size == 32
  assert config.train.num_epochs == 0.5 and tuple(config.sweep.ratios) == (0.0, 0.5)
  assert config.to_dict()["model"]["kwargs"]["image_size"] == 32  # what pipeline.build_model reads
  assert config.init_weights == "/tmp/w.safetensors" and config.select.selector == "greedy"
  config = _parse(monkeypatch, ["run.py", f"--config={ROOT}/configs/resnet18.py",
                                "--config.finetune.num_epochs=1"])
  assert config.finetune.num_epochs == 1.0


def test_eval_transform_and_tag_match_timm_pretrained_cfg():
  """The weights each config expects exist in timm, and their eval preprocessing is the table's
  (timm's pretrained configs are metadata; nothing is downloaded)."""
  import importlib.util as util
  if util.find_spec("torch") is None or util.find_spec("timm") is None:
    pytest.skip("needs torch and timm (requirements-test.txt)")
  import timm_reference
  timm = timm_reference.import_timm()
  for file, name in MODEL_CONFIGS.items():
    config = load_config(file)
    tag = os.path.basename(config.init_weights)[:-len(".safetensors")]
    cfg = timm.models.get_pretrained_cfg(tag)
    assert cfg is not None, tag
    ours = preprocess.get_eval_transform(config.data.eval_transform)
    assert (ours.crop_pct, ours.interpolation, ours.mean, ours.std) == (
        cfg.crop_pct, cfg.interpolation, tuple(cfg.mean), tuple(cfg.std)), tag
    assert tuple(cfg.input_size) == (3, config.data.image_size, config.data.image_size), tag


def test_lite0_transfer_config():
  """`efficientnet_lite0.py:fmnist_pretrained`: the ImageNet checkpoint's architecture and
  normalisation on Fashion-MNIST resized and replicated to RGB, a 10-class head; quickstart's fields."""
  config = load_config("efficientnet_lite0", "fmnist_pretrained,size=72")
  ours = flat(config)
  assert sorted(ours) == sorted(_quickstart())
  assert config.init_weights == "weights/tf_efficientnet_lite0.safetensors" and config.train.num_epochs > 0
  assert (config.data.name, config.data.image_size, config.data.channels) == ("fashion_mnist", 72, 3)
  assert config.data.eval_transform == "tf_efficientnet_lite0" and config.model.kwargs.to_dict() == {}
  model = models.create(config.model.name, num_classes=10, **config.model.kwargs.to_dict())
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, 72, 72, 3)))[0])
  assert out.shape == (1, 10)
  assert load_config("efficientnet_lite0", "fmnist_pretrained,smoke").train.num_epochs <= 0.02
  with pytest.raises(ValueError, match="choose one"):
    load_config("efficientnet_lite0", "fmnist,fmnist_pretrained")


def test_config_arguments_parse_booleans_and_refuse_other_words():
  from flexiq_jax.config_utils import parse_arg
  assert parse_arg("smoke=false,fmnist", smoke=True, fmnist=False) == {"smoke": False, "fmnist": True}
  assert parse_arg("smoke=True", smoke=False) == {"smoke": True}
  with pytest.raises(ValueError, match="expected true or false"):
    parse_arg("smoke=maybe", smoke=False)
