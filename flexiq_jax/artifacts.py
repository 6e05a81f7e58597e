"""The derived artefacts of a workdir and what they were made from.

`serving/` (the int8 serving variables, written when a finetune is accepted) is derived from the
finetuned model; `export/` (the portable export) is derived from `serving/`. Each records a
fingerprint of its source: `serving/manifest.json` the fingerprint of the serving variables and of
the float stage they were made with, `export/manifest.json` the serving fingerprint
(`serving_fingerprint`) and a SHA-256 of each of its files. A new serving model retires the old
`serving/` and `export/` together (moved to `replaced/<timestamp>/`), and the loaders refuse an
artefact whose fingerprint does not match its source.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import numpy as np

from flexiq_jax import records

SERVING_DIR = "serving"
EXPORT_DIR = "export"
SERVING_MANIFEST = "manifest.json"


class StaleArtifact(ValueError):
  """An artefact does not match the source it claims to be made from."""


def tree_fingerprint(tree, *extra) -> str:
  """SHA-256 (16 hex digits) of every leaf of `tree` (path, dtype, shape, bytes) and `extra`
  JSON-able values: equal for the same arrays however they were saved and loaded.

  Args:
    tree: A pytree of arrays (fetched to the host).
    *extra: JSON-able values hashed after the leaves (non-JSON values through str).

  Returns:
    The fingerprint, 16 hex digits.
  """
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    array = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
  for value in extra:
    h.update(json.dumps(json.loads(json.dumps(value, default=str)), sort_keys=True).encode())
  return h.hexdigest()[:16]


def file_sha256(path: str) -> str:
  """The SHA-256 of a file's bytes, read in 1 MiB blocks.

  Args:
    path: The file.

  Returns:
    The hex digest (64 digits).
  """
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def float_fingerprint(workdir: str) -> str | None:
  """The fingerprint recorded in <workdir>/float/done.json.

  Args:
    workdir: A run.py working directory.

  Returns:
    The float stage's fingerprint, or None when done.json is missing or has none.
  """
  done = records.read_json(os.path.join(workdir, "float", "done.json"))
  return done.get("fingerprint") if done else None


def retire(workdir: str, names=(SERVING_DIR, EXPORT_DIR), why: str = "") -> list[str]:
  """Moves the existing `names` of `workdir` to <workdir>/replaced/<timestamp>/ (kept, not
  deleted); returns the names moved.

  On processes other than 0 nothing is moved, and the names present are returned as well.

  Args:
    workdir: A run.py working directory.
    names: Directory names in `workdir` to retire.
    why: Optional reason, printed with the move.

  Returns:
    The names of the directories that were present.
  """
  present = [n for n in names if os.path.isdir(os.path.join(workdir, n))]
  if not present or jax.process_index() != 0:
    return present
  target = os.path.join(workdir, "replaced", records.utc_now().replace(":", ""))
  os.makedirs(target, exist_ok=True)
  for name in present:
    dest = os.path.join(target, name)
    if os.path.exists(dest):
      shutil.rmtree(dest)
    os.replace(os.path.join(workdir, name), dest)
  print(f"moved {', '.join(present)} to {target}" + (f" ({why})" if why else ""))
  return present


def serving_manifest(workdir: str) -> dict | None:
  """The content of <workdir>/serving/manifest.json.

  Args:
    workdir: A run.py working directory.

  Returns:
    The manifest dict, or None when it is missing.
  """
  return records.read_json(os.path.join(workdir, SERVING_DIR, SERVING_MANIFEST))


def check_serving(workdir: str, qvars_int8, plan_json: dict) -> str | None:
  """The serving fingerprint of the loaded `qvars_int8`; raises StaleArtifact when
  serving/manifest.json records another (None when serving/ predates manifests). A float stage
  redone since serving/ was written is a warning: the serving model is whole, only the float
  reference beside it is another.

  Args:
    workdir: The run's working directory.
    qvars_int8: The loaded int8 serving variables.
    plan_json: The loaded plan's JSON, hashed with the variables.

  Returns:
    The serving fingerprint, or None without a manifest.

  Raises:
    StaleArtifact: If the manifest records another fingerprint.
  """
  manifest = serving_manifest(workdir)
  if manifest is None:
    return None
  now = tree_fingerprint(qvars_int8, plan_json)
  if manifest.get("fingerprint") != now:
    raise StaleArtifact(
        f"{os.path.join(workdir, SERVING_DIR)} holds serving variables (fingerprint {now}) other than those its "
        f"manifest.json records ({manifest.get('fingerprint')}): the directory was changed or mixed after it was "
        f"written. Rerun `python run.py --mode=finetune --force_from=finetune` on this workdir to rebuild it.")
  float_now = float_fingerprint(workdir)
  if manifest.get("float_fingerprint") and float_now != manifest["float_fingerprint"]:
    print(f"warning: {workdir}/float was retrained since serving/ was written (float fingerprint "
          f"{manifest['float_fingerprint']} -> {float_now}); the serving model is the earlier run's, the float "
          f"model loaded beside it is the new one")
  return now


def check_export(directory: str, manifest: dict) -> None:
  """Raises StaleArtifact when the export's files differ from the SHA-256 its manifest records,
  or when it sits in a workdir whose serving/ holds another model than the one it was made from.

  Args:
    directory: The export directory (its parent is taken as the workdir).
    manifest: The export's manifest.json content ('sha256', 'serving_fingerprint').

  Raises:
    StaleArtifact: If a listed file is missing or differs from its SHA-256, or the workdir's
      serving manifest records another fingerprint than the export's source.
  """
  for name, digest in (manifest.get("sha256") or {}).items():
    path = os.path.join(directory, name)
    if not os.path.exists(path) or file_sha256(path) != digest:
      raise StaleArtifact(f"{path} does not match the SHA-256 in {directory}/manifest.json (missing, changed or "
                          f"half-written); write the export again (flexiq_jax.export_run or run.py --mode=export)")
  source = manifest.get("serving_fingerprint")
  serving = serving_manifest(os.path.dirname(os.path.abspath(directory)))
  if source and serving and serving.get("fingerprint") != source:
    raise StaleArtifact(
        f"{directory} was exported from serving variables with fingerprint {source}, but the workdir's serving/ now "
        f"holds {serving.get('fingerprint')} (the model was finetuned again): the export is stale. Write it again "
        f"with flexiq_jax.export_run(<workdir>) or run.py --mode=export.")


def write_serving(workdir: str, qmodel, qvars_int8, input_spec: dict | None = None) -> str:
  """<workdir>/serving from an accepted model: the int8 serving variables (`qvars_int8`, see
  quantize.export_int8), the plan and manifest.json, built in serving.partial and swapped in; the
  previous serving/ and the export/ derived from it are retired to replaced/ first.

  Args:
    workdir: The run's working directory.
    qmodel: The quantized model (its plan is written).
    qvars_int8: The int8 serving variables.
    input_spec: Optional description of the model input, stored in the manifest.

  Returns:
    The path of <workdir>/serving.
  """
  from flexiq_jax import checkpoint
  path = os.path.join(workdir, SERVING_DIR)
  partial = path + ".partial"
  plan_json = qmodel.plan.to_json()
  if jax.process_index() == 0 and os.path.isdir(partial):
    shutil.rmtree(partial)
  checkpoint.save_tree(os.path.join(partial, "qvars_int8"), qvars_int8)
  records.write_json_atomic(os.path.join(partial, "plan.json"), plan_json)
  manifest = {"fingerprint": tree_fingerprint(qvars_int8, plan_json), "float_fingerprint": float_fingerprint(workdir),
              "input": input_spec, **records.run_info()}
  records.write_json_atomic(os.path.join(partial, SERVING_MANIFEST), manifest)
  retire(workdir, (SERVING_DIR, EXPORT_DIR), "a new finetuned model replaces them")
  if jax.process_index() == 0:
    os.replace(partial, path)
  return path
