"""One cache protocol for every stage that writes into a workdir.

A stage directory holds the stage's output beside `fingerprint.json`: the config fields the
stage's result depends on (exactly those, derived from the stage's options by
`stage_options.stage_fields`) and their hash. `done.json` marks a
finished stage with the same hash. So a rerun reuses what is done, a killed training stage
resumes, and a changed field is named when a stage refuses to mix two configs.

Stages that can be recomputed cheaply (calibrate, select, quantize) are redone when their
fields change; training stages (float, finetune) refuse, because their checkpoints would mix
two runs. `JsonCache` keeps keyed JSON results (the layer-wise search's phases, the comparison's
rows) under the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

from etils import epath

from flexiq_jax import parallel
from flexiq_jax import records


def _process_zero() -> bool:
  import jax
  return jax.process_index() == 0

# The run.py stage that redoes a stage directory (`--force_from`).
FORCE_FROM = {"float": "train", "calibrate": "calibrate", "select": "select", "quantized": "quantize",
              "finetune": "finetune"}


def _plain(value):
  if hasattr(value, "to_dict"):
    return value.to_dict()
  if isinstance(value, tuple):
    return list(value)
  return value


def config_fields(config, names) -> dict:
  """{dotted name: plain value} of `names` in `config` (absent fields read as None).

  Args:
    config: a ConfigDict or nested dicts.
    names: dotted field names, e.g. 'train.learning_rate'.

  Returns:
    A dict of each name's value, with ConfigDicts as dicts and tuples as lists.
  """
  out = {}
  for name in names:
    value = config
    for key in name.split("."):
      value = value.get(key) if hasattr(value, "get") else None
    out[name] = _plain(value)
  return out


def fingerprint(fields) -> str:
  """A short hash of JSON-serialisable `fields` (key order does not matter).

  Args:
    fields: a JSON-serialisable value (values JSON cannot encode are hashed as their `str`).

  Returns:
    The first 16 hex digits of the SHA-256 of its sorted-key JSON.
  """
  blob = json.dumps(fields, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageConfigChanged(ValueError):
  """A training stage holds a run made with other config values; `changed` names them (each field
  with its saved and its current value)."""

  def __init__(self, message: str, changed: str = ""):
    super().__init__(message)
    self.changed = changed


def _flat(fields: dict) -> dict:
  """{dotted name: value} with sections expanded and values as saved in JSON (tuples as lists),
  so that a change is named by its field and a tuple never differs from its saved list."""
  out = {}
  for key, value in json.loads(json.dumps(fields, default=str)).items():
    if isinstance(value, dict) and value:
      out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
    else:
      out[key] = value
  return out


def _changed(old: dict, new: dict) -> list[str]:
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


class Stage:
  """A stage directory `<workdir>/<name>` keyed by the config fields it depends on."""

  def __init__(self, workdir: str, name: str, fields: dict):
    self.path = os.path.join(workdir, name)
    self.name, self.fields, self.fingerprint = name, fields, fingerprint(fields)
    self._final_path = None  # set while a fresh output is built beside the old one

  def file(self, *parts) -> str:
    return os.path.join(self.path, *parts)

  def _saved(self, filename):
    return records.read_json(self.file(filename))

  def is_done(self) -> bool:
    done = self._saved("done.json")
    return done is not None and done.get("fingerprint") == self.fingerprint

  def changed_fields(self) -> list[str]:
    """Fields whose saved value differs from now ([] for a new or matching stage)."""
    saved = self._saved("fingerprint.json")
    if saved is None or saved.get("fingerprint") == self.fingerprint:
      return []
    return _changed(_flat(saved.get("fields", {})), _flat(self.fields)) or ["(fields of an older format)"]

  def refusal(self) -> "StageConfigChanged | None":
    """The error a resumable (training) stage raises for a saved run made with other values
    (None if there is none): it names each changed field and what to do."""
    changed = self.changed_fields()
    if not changed:
      return None
    saved, now = _flat(self._saved("fingerprint.json").get("fields", {})), _flat(self.fields)
    shown = ", ".join(f"{k}: {saved[k]!r} -> {now.get(k)!r}" if k in saved else k for k in changed)
    return StageConfigChanged(
        f"{self.path} holds a {self.name} run made with other values of {shown}. Use a new --workdir, or "
        f"pass --force_from={FORCE_FROM.get(self.name, self.name)} to redo this stage and the ones after it "
        f"(the old outputs are moved to <workdir>/replaced/).", changed=shown)

  def begin(self, *, resumable: bool) -> None:
    """Claims the directory for this config. A resumable (training) stage whose saved run used
    other values refuses, naming them. Any other stage starts afresh in `<name>.partial` beside
    the old output, which `mark_done` swaps in: a failed run leaves the old output whole."""
    if resumable:
      error = self.refusal()
      if error is not None:
        raise error
    else:
      self._final_path, self.path = self.path, self.path + ".partial"
      if _process_zero() and epath.Path(self.path).is_dir():
        epath.Path(self.path).rmtree()
    if _process_zero():
      epath.Path(self.path).mkdir(parents=True, exist_ok=True)
    records.write_json_atomic(self.file("fingerprint.json"), {"fingerprint": self.fingerprint, "fields": self.fields})
    parallel.sync(f"begin {self.path}")  # the other processes write into it only after this

  def mark_done(self, **info) -> None:
    """Marks the stage done once its outputs are complete (and swaps a fresh output in)."""
    records.write_json_atomic(self.file("done.json"), {"fingerprint": self.fingerprint, **info})
    final = self._final_path
    if final is None:
      return
    parallel.sync(f"done {self.path}")  # every process has finished writing into it
    if _process_zero():  # etils.epath: local and gs:// workdirs alike
      old, new, final_path = epath.Path(final + ".old"), epath.Path(self.path), epath.Path(final)
      if old.is_dir():
        old.rmtree()
      if final_path.is_dir():
        final_path.rename(old)
      new.rename(final_path)
      if old.is_dir():
        old.rmtree()
    parallel.sync(f"swapped {final}")
    self.path, self._final_path = final, None

  def cache(self, filename: str, *salt) -> "JsonCache":
    return JsonCache(self.file(filename), fingerprint([self.fingerprint, *map(str, salt)]))


class JsonCache:
  """Keyed JSON results persisted to `path`, valid only for `fingerprint` (a mismatch discards
  them). Each computed entry is saved at once, so a killed run keeps what it finished, with the
  commit and date that computed it (`made_by`): the fingerprint holds config fields, not code, so
  a result reused after a code change says which code made it."""

  def __init__(self, path: str, fingerprint_: str):
    self.path, self.fingerprint = path, fingerprint_
    saved = records.read_json(path)
    valid = saved and saved.get("fingerprint") == fingerprint_
    self.data = saved["data"] if valid else {}
    self.made = saved.get("made_by", {}) if valid else {}
    self.computed_now: set[str] = set()

  def get(self, key, compute: Callable):
    key = str(key)
    if key not in self.data:
      self.data[key] = compute()
      # Not run_info(): it also reads device and package versions, for every cached entry.
      self.made[key] = {"commit": records.git_commit(), "date": records.utc_now()}
      self.computed_now.add(key)
      self.save()
    return self.data[key]

  def made_by(self, key) -> dict:
    """{'commit', 'date'} of the run that computed `key` (None for entries saved before this was
    recorded), and 'this_run': whether this process computed it."""
    key = str(key)
    made = self.made.get(key, {"commit": None, "date": None})
    return {**made, "this_run": key in self.computed_now}

  def drop(self, keys) -> list[str]:
    """Forgets the entries `keys` (they are recomputed on the next `get`); returns those present."""
    present = [str(k) for k in keys if str(k) in self.data]
    for key in present:
      del self.data[key]
      self.made.pop(key, None)
    if present:
      self.save()
    return present

  def save(self):
    records.write_json_atomic(self.path, {"fingerprint": self.fingerprint, "data": self.data, "made_by": self.made})


class KeyedJsonCache(JsonCache):
  """A JsonCache whose entries each have their own fingerprint (`fingerprints`: {key: hash}),
  so that a change that concerns one key recomputes that key only.

  A saved entry is reused while its fingerprint equals the key's now; entries of keys not in
  `fingerprints` are kept as saved. A file in the one-fingerprint form of JsonCache is adopted
  whole if its fingerprint is `legacy_fingerprint` (the same values, hashed the older way)."""

  def __init__(self, path: str, fingerprints: dict, legacy_fingerprint: str | None = None):
    self.path, self.fingerprints = path, {str(k): v for k, v in fingerprints.items()}
    self.fingerprint = None
    saved = records.read_json(path) or {}
    if "fingerprints" in saved:
      saved_fps = saved["fingerprints"]
    elif legacy_fingerprint is not None and saved.get("fingerprint") == legacy_fingerprint:
      saved_fps = {k: self.fingerprints.get(k) for k in saved.get("data", {})}
    else:
      saved_fps = {}
    keep = [k for k in saved_fps if k in saved.get("data", {})
            and (k not in self.fingerprints or saved_fps[k] == self.fingerprints[k])]
    self.saved_fingerprints = {k: saved_fps[k] for k in keep}
    self.data = {k: saved["data"][k] for k in keep}
    self.made = {k: saved.get("made_by", {})[k] for k in keep if k in saved.get("made_by", {})}
    self.computed_now: set[str] = set()

  def save(self):
    fps = {k: self.fingerprints.get(k, self.saved_fingerprints.get(k)) for k in self.data}
    records.write_json_atomic(self.path, {"fingerprints": fps, "data": self.data, "made_by": self.made})

  @staticmethod
  def add_missing(path: str, entries: dict) -> list[str]:
    """Writes into the cache file at `path` the entries of `entries` it lacks, with their
    fingerprints and makers; a later KeyedJsonCache on that file reuses each while its key's
    fingerprint equals the saved one. A file of the older one-fingerprint form is left as it is.

    Args:
      path: The cache file (created if absent).
      entries: Entries in this cache's file form: {'fingerprints': {key: hash}, 'data': {key:
        value}, 'made_by': {key: ...}} ('made_by' optional; keys without a fingerprint are skipped).

    Returns:
      The keys added.
    """
    cache = records.read_json(path) or {"fingerprints": {}, "data": {}, "made_by": {}}
    if "fingerprints" not in cache:
      return []
    fps, made = entries.get("fingerprints", {}), entries.get("made_by", {})
    added = [k for k in entries.get("data", {}) if k not in cache.get("data", {}) and k in fps]
    for k in added:
      cache.setdefault("fingerprints", {})[k] = fps[k]
      cache.setdefault("data", {})[k] = entries["data"][k]
      if k in made:
        cache.setdefault("made_by", {})[k] = made[k]
    if added:
      records.write_json_atomic(path, cache)
    return added

