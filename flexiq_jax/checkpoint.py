"""Orbax checkpoints. Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save never leaves a half-written checkpoint behind."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, tree, *, wait: bool = False) -> None:
  mngr.save(step, args=ocp.args.StandardSave(tree), force=True)
  if wait:
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, target, step: int | None = None):
  """Restores into the structure, dtypes and shardings of `target` (arrays or ShapeDtypeStructs)."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def save_tree(directory: str, tree) -> None:
  """One-off pytree (e.g. calibration statistics, quantized params), written atomically."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), tree, force=True)


def load_tree(directory: str, target=None):
  with ocp.StandardCheckpointer() as ckptr:
    if target is None:
      return ckptr.restore(os.path.abspath(directory))
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    return ckptr.restore(os.path.abspath(directory), abstract)
