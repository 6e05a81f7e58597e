"""Data parallelism on `jax.sharding`: a 1-D mesh over all devices with axis 'data'.

The batch is sharded along 'data', parameters and optimizer state are replicated; XLA inserts
the gradient all-reduce (and computes BatchNorm statistics over the global batch).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def maybe_initialize_distributed(enabled: bool) -> None:
  """Multi-host: one process per host; coordinates come from the cluster environment
  (TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).

  Args:
    enabled: whether to call `jax.distributed.initialize()` (False: nothing happens).
  """
  if enabled:
    jax.distributed.initialize()


def sync(name: str) -> None:
  """A barrier across the processes of a multi-host run (nothing with one process).

  Args:
    name: the barrier's name, the same on every process.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def make_mesh() -> Mesh:
  """The data-parallel mesh: every device of every process on one axis.

  Returns:
    A 1-D `Mesh` over `jax.devices()` with axis name 'data'.
  """
  return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding that puts a full copy of an array on every device of `mesh`.

  Args:
    mesh: the device mesh.

  Returns:
    A `NamedSharding` with an empty partition spec.
  """
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The sharding that splits an array's leading (batch) axis over the 'data' axis of `mesh`.

  Args:
    mesh: the device mesh (with a 'data' axis).

  Returns:
    A `NamedSharding` with partition spec P('data').
  """
  return NamedSharding(mesh, P("data"))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  """Checks that a global batch divides evenly over the devices of `mesh`.

  Args:
    batch_size: the global batch size.
    mesh: the device mesh.
    what: the config field's name, for the error message.

  Raises:
    ValueError: `batch_size` is not a multiple of the mesh's device count.
  """
  if batch_size % mesh.size:
    raise ValueError(f"{what}={batch_size} is not divisible by the {mesh.size} devices of the mesh; "
                     f"use a multiple of {mesh.size}.")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded along 'data'.

  Args:
    batch: a dict of this process's arrays, each with the batch on its leading axis.
    mesh: the device mesh.

  Returns:
    A dict with the same keys of global arrays sharded with `batch_sharded(mesh)`.
  """
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def host_local(array) -> np.ndarray:
  """This process's rows of a batch-sharded (or replicated) global array, in order.

  Args:
    array: a global `jax.Array` sharded along its leading axis, or replicated.

  Returns:
    A numpy array of the rows held by this process's devices (each row once).
  """
  shards = {}
  for shard in array.addressable_shards:
    start = shard.index[0].start or 0 if shard.index else 0
    shards.setdefault(start, shard.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def replicate(tree, mesh: Mesh):
  """Puts a pytree on every device of `mesh`, replicated.

  Args:
    tree: a pytree of arrays (parameters, a train state, ...).
    mesh: the device mesh.

  Returns:
    The pytree of global arrays with the `replicated(mesh)` sharding.
  """
  return jax.device_put(tree, replicated(mesh))
