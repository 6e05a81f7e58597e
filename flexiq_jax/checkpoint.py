"""Orbax checkpoints. Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save never leaves a half-written checkpoint behind; a step damaged
afterwards (a truncated or deleted file) is skipped for the newest intact one, with a warning."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from etils import epath


class CorruptCheckpoint(RuntimeError):
  """A checkpoint cannot be read back."""


def _path(directory) -> epath.Path:
  # Orbax wants absolute paths; gs:// and other remote paths are absolute already.
  directory = str(directory)
  return epath.Path(directory if "://" in directory else os.path.abspath(directory))


def _reason(error: Exception) -> str:
  """The first line of an (often very long) Orbax/TensorStore error."""
  lines = str(error).strip().splitlines() or [type(error).__name__]
  return f"{type(error).__name__}: {lines[0][:300]}"


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """An Orbax checkpoint manager for `directory`, which it creates if needed.

  Args:
    directory: the checkpoint directory (relative local paths are made absolute; gs:// works).
    max_to_keep: how many of the newest steps are kept; older ones are deleted on save.

  Returns:
    The `ocp.CheckpointManager`; close it when done.
  """
  return ocp.CheckpointManager(
      _path(directory), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, tree, *, wait: bool = False) -> None:
  """Saves `tree` as step `step` (asynchronously unless `wait`), replacing an existing save of that step.

  Args:
    mngr: the checkpoint manager.
    step: the step number.
    tree: the pytree to save (e.g. a `TrainState`).
    wait: whether to block until the save is finished.
  """
  mngr.save(step, args=ocp.args.StandardSave(tree), force=True)
  if wait:
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, target, step: int | None = None):
  """Restores into the structure, dtypes and shardings of `target` (arrays or ShapeDtypeStructs).

  Args:
    mngr: the checkpoint manager.
    target: a pytree like the saved one, giving the structure, dtypes and shardings.
    step: the step to restore (default: the newest).

  Returns:
    The restored pytree.

  Raises:
    FileNotFoundError: there is no checkpoint.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_newest_intact(mngr: ocp.CheckpointManager, target, *, remove_damaged: bool = True):
  """(step, restored) of the newest step that reads back, or (None, target) when there is no
  checkpoint. A damaged step is skipped with a warning naming it, and (remove_damaged) removed
  once an older step has read back (so that the resumed run can save that step again).

  Args:
    mngr: the checkpoint manager.
    target: a pytree like the saved one, giving the structure, dtypes and shardings.
    remove_damaged: whether to delete the damaged newer steps once an older step has read back.

  Returns:
    A tuple (step, restored pytree), or (None, target) when there is no checkpoint.

  Raises:
    CorruptCheckpoint: every checkpoint step is damaged.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  damaged = []
  for step in steps:
    try:
      restored = restore(mngr, target, step)
    except Exception as e:  # noqa: BLE001 (any damage: truncated arrays, missing metadata, ...)
      print(f"warning: checkpoint step {step} in {mngr.directory} is damaged ({_reason(e)}); "
            f"trying the previous step")
      damaged.append(step)
      continue
    if damaged and remove_damaged:
      for bad in damaged:
        mngr.delete(bad)
      print(f"warning: resuming from step {step}; removed the damaged step(s) {damaged}")
    elif damaged:
      print(f"warning: using step {step}; the damaged step(s) {damaged} were left as they are")
    return step, restored
  if steps:
    raise CorruptCheckpoint(f"every checkpoint in {mngr.directory} (steps {steps}) is damaged; delete that "
                            f"directory to start the stage again")
  return None, target


def save_tree(directory: str, tree) -> None:
  """One-off pytree (e.g. calibration statistics, quantized params), written atomically.

  Args:
    directory: the directory to write (replaced if it exists; relative local paths are made absolute).
    tree: the pytree of arrays.
  """
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(_path(directory), tree, force=True)


def load_tree(directory: str, target=None):
  """Reads back a pytree written by `save_tree`.

  Args:
    directory: the directory `save_tree` wrote.
    target: optional pytree giving the structure, dtypes and shardings to restore into (None: as saved).

  Returns:
    The restored pytree.

  Raises:
    CorruptCheckpoint: the arrays cannot be read (damaged files, another version, or no such directory).
  """
  try:
    with ocp.StandardCheckpointer() as ckptr:
      if target is None:
        return ckptr.restore(_path(directory))
      abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
      return ckptr.restore(_path(directory), abstract)
  except Exception as e:  # noqa: BLE001
    raise CorruptCheckpoint(
        f"cannot read the saved arrays in {directory} ({_reason(e)}); the files are damaged or from another "
        f"version. Delete the stage directory that holds them (or pass run.py --force_from=<that stage>) "
        f"to recompute it.") from e


def tree_digest(tree) -> str:
  """A hash of a pytree's arrays (paths, dtypes, shapes and bytes): equal exactly when two trees
  hold the same values, e.g. a float model trained twice, bit for bit, at the same commit.

  Args:
    tree: a pytree of arrays (jax or numpy).

  Returns:
    The first 16 hex digits of a SHA-256 over the leaves in path order.
  """
  import hashlib

  import numpy as np
  h = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    value = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
    h.update(value.tobytes())
  return h.hexdigest()[:16]
