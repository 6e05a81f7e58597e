"""flexiq_jax.stage_cache: each stage's fingerprint covers exactly its config fields; a changed
field is refused by training stages (named) and redone by the others; JsonCache keeps entries
under one fingerprint."""

import json
import os

import pytest

from configs import quickstart
from flexiq_jax import stage_cache
from flexiq_jax import stage_options
from flexiq_jax.stage_cache import JsonCache, Stage, StageConfigChanged


def _fingerprints(config) -> dict:
  return {s: stage_cache.fingerprint(stage_options.stage_fields(config, s)) for s in stage_options.STAGES}


def _changed(field, value) -> set:
  """The stages whose fingerprint changes when `field` is set to `value`."""
  config = quickstart.get_config("smoke")
  before = _fingerprints(config)
  section, key = field.split(".")
  config[section][key] = value
  after = _fingerprints(config)
  return {s for s in before if before[s] != after[s]}


ALL = {"float", "calibrate", "select", "quantize", "finetune"}


@pytest.mark.parametrize("field,value,stages", [
    # Results do not depend on logging, checkpoint frequency, eval size or threads.
    ("data.eval_examples", 100, set()),
    ("train.log_every_steps", 1, set()),
    ("train.checkpoint_every_steps", 1, set()),
    ("finetune.checkpoint_every_steps", 1, set()),
    ("train.eval_every_steps", 7, set()),
    ("finetune.eval_every_steps", 7, set()),
    ("data.num_threads", 1, set()),
    ("sweep.ratios", (0.0, 1.0), set()),
    # A field invalidates its stage and every stage after it.
    ("train.learning_rate", 0.5, ALL),
    ("model.name", "resnet18", ALL),
    ("data.data_dir", "/elsewhere", ALL),
    ("calib.num_images", 32, ALL - {"float"}),
    ("quant.extraction", "naive", ALL - {"float"}),
    ("select.levels", (0.5, 1.0), {"select", "quantize", "finetune"}),
    ("finetune.learning_rate", 0.1, {"finetune"}),
    ("finetune.level_probs", (0.4, 0.3, 0.1, 0.1, 0.1), {"finetune"}),
    ("finetune.every_step_ratios", (0.0, 1.0), {"finetune"}),
    ("quant.weight_scale", "joint", ALL - {"float"}),
    ("finetune.lsq_grad_scale", "effective", {"finetune"}),
    ("finetune.lsq_learning_rate", 1e-3, {"finetune"}),
    ("finetune.refresh_source", "quantized", {"finetune"}),
])
def test_fingerprint_follows_exactly_the_fields_a_stage_reads(field, value, stages):
  assert _changed(field, value) == stages


def test_a_field_added_later_keeps_older_workdirs_valid_at_its_old_behaviour():
  """finetune.every_step_ratios = () trains as before the field existed: the fingerprint is the
  one of a config without the field, so older finetune stages and compare caches are reused."""
  config = quickstart.get_config("smoke")
  assert config.finetune.every_step_ratios == ()
  now = stage_options.stage_fields(config, "finetune")
  del config.finetune["every_step_ratios"]
  assert stage_options.stage_fields(config, "finetune") == now and "finetune.every_step_ratios" not in now


def test_a_config_without_the_weight_grid_field_means_the_older_max127_grid():
  """Workdirs made before `quant.weight_scale` existed used the max127 grid: a config without the
  field keeps their fingerprints, and the max112 default is a different one from calibrate on."""
  config = quickstart.get_config("smoke")
  assert config.quant.weight_scale == "max112"
  default = _fingerprints(config)
  config.quant.weight_scale = "max127"
  explicit = _fingerprints(config)
  del config.quant["weight_scale"]
  assert _fingerprints(config) == explicit
  assert stage_options.CalibrateOptions.from_config(config).weight_scale == "max127"
  assert default["float"] == explicit["float"] and default["calibrate"] != explicit["calibrate"]


@pytest.mark.parametrize("field", ["finetune.lsq_grad_scale", "finetune.lsq_learning_rate",
                                   "finetune.refresh_source"])
def test_option_fields_at_their_default_keep_older_fingerprints(field):
  """The options added with their old behaviour as default leave every stage's fingerprint as
  it was without the field (a field inside a section the stage takes whole, 'quant', too)."""
  config = quickstart.get_config("smoke")
  now = _fingerprints(config)
  section, key = field.split(".")
  del config[section][key]
  assert _fingerprints(config) == now


def test_config_fields_are_plain_and_absent_ones_none():
  config = quickstart.get_config("smoke")
  fields = stage_cache.config_fields(config, ["select.levels", "model", "no.such_field", "seed"])
  assert fields == {"select.levels": [0.25, 0.5, 0.75, 1.0], "model": {"name": "resnet_small", "kwargs": {}},
                    "no.such_field": None, "seed": 0}
  json.dumps(fields)  # JSON-serialisable as written to fingerprint.json
  # The same values as a JSON round trip (config.json) give the same fingerprint.
  assert stage_cache.fingerprint(json.loads(json.dumps(fields))) == stage_cache.fingerprint(fields)
  assert stage_cache.fingerprint({"a": 1, "b": 2}) == stage_cache.fingerprint({"b": 2, "a": 1})
  with_extra = stage_options.fingerprint_fields(config, "float", "layerwise")
  assert "layerwise" in with_extra and "layerwise" not in stage_options.fingerprint_fields(config, "float")


def test_resumable_stage_refuses_a_changed_field_naming_it(tmp_path):
  fields = {"train.learning_rate": 0.1, "train.batch_size": 32, "seed": 0}
  stage = Stage(str(tmp_path), "float", fields)
  stage.begin(resumable=True)
  open(stage.file("checkpoint"), "w").write("step 3")
  # The same fields: the directory is kept (a killed run resumes from it).
  again = Stage(str(tmp_path), "float", dict(fields))
  assert again.changed_fields() == []
  again.begin(resumable=True)
  assert open(again.file("checkpoint")).read() == "step 3" and not again.is_done()
  changed = Stage(str(tmp_path), "float", {**fields, "train.learning_rate": 0.5})
  assert changed.changed_fields() == ["train.learning_rate"]
  with pytest.raises(StageConfigChanged, match=r"other values of train\.learning_rate: 0\.1 -> 0\.5\. Use a new"):
    changed.begin(resumable=True)
  assert os.path.exists(stage.file("checkpoint"))  # nothing was deleted
  assert issubclass(StageConfigChanged, ValueError)
  # A field that is new in this version is named too.
  with pytest.raises(StageConfigChanged, match="finetune.lsq"):
    Stage(str(tmp_path), "float", {**fields, "finetune.lsq": True}).begin(resumable=True)


def test_recomputable_stage_starts_afresh_on_a_change(tmp_path):
  stage = Stage(str(tmp_path), "select", {"select.levels": [0.5, 1.0]})
  stage.begin(resumable=False)
  open(stage.file("selection.json"), "w").write("{}")
  stage.mark_done(selector="greedy")
  assert stage.is_done() and json.load(open(stage.file("done.json")))["selector"] == "greedy"
  changed = Stage(str(tmp_path), "select", {"select.levels": [0.25, 1.0]})
  assert not changed.is_done()  # done under another fingerprint
  changed.begin(resumable=False)
  assert not changed.is_done() and not os.path.exists(changed.file("selection.json"))  # old output removed
  saved = json.load(open(changed.file("fingerprint.json")))
  assert saved == {"fingerprint": changed.fingerprint, "fields": {"select.levels": [0.25, 1.0]}}
  changed.mark_done()
  assert changed.is_done() and not stage.is_done()


def test_fingerprint_of_an_older_format_is_a_change(tmp_path):
  os.makedirs(tmp_path / "float")
  saved = tmp_path / "float" / "fingerprint.json"
  json.dump({"fingerprint": "0123"}, open(saved, "w"))  # no fields saved: every field counts as changed
  stage = Stage(str(tmp_path), "float", {"seed": 0})
  assert stage.changed_fields() == ["seed"]
  json.dump({"fingerprint": "0123", "fields": {"seed": 0}}, open(saved, "w"))  # same fields, another hash
  assert stage.changed_fields() == ["(fields of an older format)"]
  with pytest.raises(StageConfigChanged, match="older format"):
    stage.begin(resumable=True)


def test_json_cache_keeps_entries_under_one_fingerprint(tmp_path):
  path = str(tmp_path / "cache" / "rows.json")
  calls = []

  def compute(value):
    def f():
      calls.append(value)
      return {"value": value}
    return f

  cache = JsonCache(path, "fp1")
  assert cache.get("a", compute(1)) == {"value": 1} and cache.get("a", compute(2)) == {"value": 1}
  assert calls == [1]
  assert json.load(open(path))["data"] == {"a": {"value": 1}}  # saved at once, before any other entry
  cache.get(3, compute(3))  # keys are strings, as in JSON
  same = JsonCache(path, "fp1")
  assert same.get("a", compute(9)) == {"value": 1} and same.get("3", compute(9)) == {"value": 3}
  assert calls == [1, 3]
  other = JsonCache(path, "fp2")  # another fingerprint: the saved entries are dropped
  assert other.data == {} and other.get("a", compute(4)) == {"value": 4}
  assert calls == [1, 3, 4]
  assert JsonCache(path, "fp1").data == {}  # ... and overwritten on save
  # Each entry names the commit that computed it; a reload knows it was not this instance.
  assert other.made_by("a")["this_run"] and other.made_by("a")["commit"]
  reloaded = JsonCache(path, "fp2")
  assert reloaded.made_by("a") == {**other.made_by("a"), "this_run": False}
  assert reloaded.drop(["a", "absent"]) == ["a"] and JsonCache(path, "fp2").data == {}
  # A stage's caches are keyed by its fingerprint and a salt.
  stage = Stage(str(tmp_path), "layerwise", {"seed": 0})
  assert stage.cache("x.json", "a").fingerprint != stage.cache("x.json", "b").fingerprint
  assert stage.cache("x.json", "a").fingerprint != Stage(str(tmp_path), "layerwise", {"seed": 1}).cache(
      "x.json", "a").fingerprint
  assert stage.cache("x.json").path == os.path.join(str(tmp_path), "layerwise", "x.json")


def test_keyed_cache_add_missing_adds_only_absent_keys_and_leaves_the_legacy_form(tmp_path):
  path = str(tmp_path / "rows.json")
  cache = stage_cache.KeyedJsonCache(path, {"a": "fa"})
  cache.data["a"] = [1]
  cache.save()
  entries = {"fingerprints": {"a": "other", "b": "fb"}, "data": {"a": [9], "b": [2], "c": [3]},
             "made_by": {"b": {"commit": "x"}}}
  assert stage_cache.KeyedJsonCache.add_missing(path, entries) == ["b"]  # 'c' has no fingerprint
  again = stage_cache.KeyedJsonCache(path, {"a": "fa", "b": "fb"})
  assert again.data == {"a": [1], "b": [2]} and again.made["b"] == {"commit": "x"}
  assert stage_cache.KeyedJsonCache(path, {"b": "changed"}).data == {"a": [1]}  # b recomputed once its key moves
  legacy = str(tmp_path / "legacy.json")
  with open(legacy, "w") as f:
    json.dump({"fingerprint": "f", "data": {"a": [1]}}, f)
  assert stage_cache.KeyedJsonCache.add_missing(legacy, entries) == []
  assert json.load(open(legacy)) == {"fingerprint": "f", "data": {"a": [1]}}
