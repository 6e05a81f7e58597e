"""flexiq_jax.stage_options: every options field is either in its stage's fingerprint or declared
result-free; every config field has a home; fingerprints of existing workdirs are kept."""

import dataclasses

import pytest

from configs import common
from configs import quickstart
from flexiq_jax import stage_cache
from flexiq_jax import stage_options
from flexiq_jax.stage_options import Options


def _fields_of(cls):
  """(field, options class) of every field, nested options expanded."""
  out = []
  for f in dataclasses.fields(cls):
    if isinstance(f.default_factory, type) and issubclass(f.default_factory, Options):
      out += _fields_of(f.default_factory)
    else:
      out.append((f, cls))
  return out


def _other_value(value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value + 1
  if isinstance(value, str):
    return value + "_other"
  if isinstance(value, tuple):
    return value + (0.5,) if not value else value[:-1]
  if isinstance(value, dict):
    return {**value, "other": 1}
  raise AssertionError(f"no other value for {value!r}")


def _unchecked(obj, **changes):
  """A copy of frozen options `obj` with `changes`, without running their validation."""
  new = object.__new__(type(obj))
  for f in dataclasses.fields(obj):
    object.__setattr__(new, f.name, changes.get(f.name, getattr(obj, f.name)))
  return new


ALL_FIELDS = [(name, f, cls) for name, (cls, _) in stage_options.STAGES.items() for f, cls in _fields_of(cls)]


@pytest.mark.parametrize("stage,field,cls", ALL_FIELDS, ids=[f"{s}.{f.name}" for s, f, _ in ALL_FIELDS])
def test_every_options_field_is_fingerprinted_or_declared_result_free(stage, field, cls):
  """A field added to an options class without `option(default, "<config field>", ...)` fails
  here; a declared field changes its stage's fingerprint exactly when it is not result-free."""
  meta = field.metadata
  assert meta.get("config"), f"{cls.__name__}.{field.name}: declare it with option(default, '<config field>')"
  assert isinstance(meta.get("result_free"), bool)
  options = stage_options.STAGES[stage][0]()
  # The instance holding the field (the options or a nested one such as `data`).
  path = [f.name for f in dataclasses.fields(options) if isinstance(getattr(options, f.name), cls)]
  owner = getattr(options, path[0]) if path and cls is not type(options) else options
  value = getattr(owner, field.name)
  if meta["omit_when"] and value in meta["omit_when"]:
    value = (0.0, 1.0)  # a value other than the behaviour from before the field existed
    owner = _unchecked(owner, **{field.name: value})
  changed = _unchecked(owner, **{field.name: _other_value(value)})  # unvalidated: the fingerprint alone
  if owner is options or cls is type(options):
    before, after = owner, changed
  else:
    before, after = _unchecked(options, **{path[0]: owner}), _unchecked(options, **{path[0]: changed})
  differs = before.fingerprint_fields() != after.fingerprint_fields()
  assert differs != meta["result_free"], (
      f"{cls.__name__}.{field.name}: result_free={meta['result_free']} but the fingerprint "
      f"{'changes' if differs else 'does not change'}")


@pytest.mark.parametrize("config", [
    quickstart.get_config(), quickstart.get_config("smoke"),
    *[common.model_config(name, fmnist=fmnist) for name in common.TIMM_TAGS for fmnist in (False, True)]],
    ids=["quickstart", "quickstart:smoke"] + [f"{n}{':fmnist' * f}" for n in common.TIMM_TAGS for f in (False, True)])
def test_every_config_field_has_a_stage_or_is_declared_stage_free(config):
  assert stage_options.unmapped_config_fields(config) == []
  stage_options.check_config(config)


def test_an_unmapped_config_field_is_refused_by_name():
  config = quickstart.get_config("smoke")
  config.finetune.new_knob = 3
  assert stage_options.unmapped_config_fields(config) == ["finetune.new_knob"]
  with pytest.raises(ValueError, match="finetune.new_knob are read by no stage"):
    stage_options.check_config(config)


# Fingerprints computed by the hand-written field lists these options replaced: the same
# values give the same fingerprints, so existing workdirs keep every finished stage.
KNOWN = {
    "quickstart": {"float": "9d6e7cb2b367d5d9", "calibrate": "0ca20020f2f5adcd", "select": "6c00a0f18922d546",
                   "quantize": "ae3bdec77ab9ca7f", "finetune": "cc8fce7fcb784beb"},
    "quickstart:smoke": {"float": "7fe3aa3734134759", "calibrate": "455e293894375245",
                         "select": "e9ed630c133c064c", "quantize": "6ba54dcf75f0dac0",
                         "finetune": "685455b98c5da7b3"},
    "vit_small_patch16_224": {"float": "fc3ce05bf84ff065", "calibrate": "8b836f0342f6cc4e",
                              "select": "4487d2e5cdd4dd99", "quantize": "d0cf997c4d29e135",
                              "finetune": "422f59f56e3857b0"},
    "resnet18:fmnist": {"float": "a01af59293d2256f", "calibrate": "29cd241d9d5a933d",
                        "select": "5ff0c9f24f1c44c6", "quantize": "f2da5a3aef234d80",
                        "finetune": "13ac84580e26d3b6"},
}


# The defaults that changed since those workdirs were made, as overrides that give their behaviour
# back: with them, every stage's fingerprint is the old one (the workdirs stay valid for a run
# that asks for the old settings).
EARLIER_DEFAULTS = {"quant.weight_scale": "max127", "quant.act_grid": "symmetric"}
EARLIER_FMNIST_RECIPE = {"train.num_epochs": 1.0, "data.augment": False, "finetune.lr_grid": (),
                         "finetune.lr_grid_extend": 0, "data.train_split": "train", "data.holdout_split": "",
                         "finetune.lr_select_images": 1000}


def _config(name):
  if name.startswith("quickstart"):
    return quickstart.get_config("smoke" if name.endswith("smoke") else None)
  model, _, arg = name.partition(":")
  return common.model_config(model, fmnist=arg == "fmnist")


def _with(config, overrides: dict):
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    config[section][key] = value
  return config


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_fingerprints_of_existing_workdirs_are_kept(name):
  config = _with(_config(name), {**EARLIER_DEFAULTS, **(EARLIER_FMNIST_RECIPE if name.endswith(":fmnist") else {})})
  got = {s: stage_cache.fingerprint(stage_options.stage_fields(config, s)) for s in stage_options.STAGES}
  assert got == KNOWN[name]
  # The defaults of today are other fingerprints from calibration on (float too for :fmnist).
  now = {s: stage_cache.fingerprint(stage_options.stage_fields(_config(name), s)) for s in stage_options.STAGES}
  assert now["calibrate"] != got["calibrate"] and (now["float"] != got["float"]) == name.endswith(":fmnist")
  # The comparison's rows cache too (a stage's fields plus fields of its own).
  fields = stage_options.fingerprint_fields(_with(quickstart.get_config("smoke"), EARLIER_DEFAULTS), "finetune",
                                            "layerwise", "sweep", "compare.finetune")
  assert stage_cache.fingerprint(fields) == "3b02545228c2acd9"


def test_options_validate_once_for_every_caller():
  with pytest.raises(ValueError, match=r"select.levels must be increasing values in \(0, 1\]"):
    stage_options.SelectOptions(levels=(0.5, 0.25))
  with pytest.raises(ValueError, match="needs select.channel_order='range'"):
    stage_options.SelectOptions(selector="greedy", channel_order="random")
  with pytest.raises(ValueError, match="unknown finetune.refresh 'sometimes'"):
    stage_options.FinetuneOptions(refresh="sometimes")
  with pytest.raises(ValueError, match="unknown select.selector 'best'"):
    stage_options.SelectOptions(selector="best")
  assert stage_options.SelectOptions(selector="greedy").search_kwargs == {}
  assert stage_options.SelectOptions(population=5).search_kwargs == {"population": 5, "generations": 10}
  # Options read like a config section where the libraries expect one.
  assert stage_options.FinetuneOptions().get("grad_clip_norm") == 0.0
  assert stage_options.FinetuneOptions.from_config(quickstart.get_config()).learning_rate == 0.005


def test_seed_offset_moves_the_qat_seed_and_the_finetune_fingerprint_only():
  from flexiq_jax import finetune
  base, moved = quickstart.get_config("smoke"), quickstart.get_config("smoke")
  moved.finetune.seed_offset = 1
  a, b = stage_options.FinetuneOptions.from_config(base), stage_options.FinetuneOptions.from_config(moved)
  assert b.qat_seed() == a.qat_seed() + 1 == base.seed + finetune.FLEXIQ_SEED_OFFSET + 1
  for stage in ("float", "calibrate", "select", "quantize"):
    assert stage_options.stage_fields(base, stage) == stage_options.stage_fields(moved, stage), stage
  assert stage_options.stage_fields(base, "finetune") != stage_options.stage_fields(moved, "finetune")
