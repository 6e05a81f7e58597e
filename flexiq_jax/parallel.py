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
  (TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""
  if enabled:
    jax.distributed.initialize()


def sync(name: str) -> None:
  """A barrier across the processes of a multi-host run (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  if batch_size % mesh.size:
    raise ValueError(f"{what}={batch_size} is not divisible by the {mesh.size} devices of the mesh; "
                     f"use a multiple of {mesh.size}.")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded along 'data'."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def host_local(array) -> np.ndarray:
  """This process's rows of a batch-sharded (or replicated) global array, in order."""
  shards = {}
  for shard in array.addressable_shards:
    start = shard.index[0].start or 0 if shard.index else 0
    shards.setdefault(start, shard.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))
