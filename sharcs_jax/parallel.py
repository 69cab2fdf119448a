"""Data parallelism on JAX's own runtime: one mesh axis over every device of every process.

Batches are sharded over the "data" axis; parameters, optimiser state and the hardness state are
replicated. The train step is one SPMD program: gradients are averaged by XLA's all-reduce, and
the step's scatter of confidences by example id writes into the replicated hardness state after
XLA gathers the ids, so every example is recorded exactly once per step on every replica (there
is no per-worker copy to merge, the reference code's stale-merge bug cannot arise).

Multi-host: `initialize` starts `jax.distributed` (coordinator from arguments, or detected from
SLURM / Cloud TPU / the JAX_COORDINATOR_ADDRESS environment). Every process plans the same global
batches from the same seed; each materialises only the rows of its own devices.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins a multi-process run; CPU processes talk through gloo collectives."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("process %d of %d: %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh() -> Mesh:
  """Auto axes: XLA propagates the batch sharding through the unannotated model code."""
  return jax.make_mesh((jax.device_count(),), (DATA,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA))


def check_divisible(name: str, batch_size: int, mesh: Mesh) -> None:
  if batch_size % mesh.size:
    raise ValueError(f"{name}={batch_size} must be a multiple of the {mesh.size} devices that "
                     "share each batch")


def to_global(value: Any, sharding: NamedSharding) -> jax.Array:
  """A global array from a value every process holds in full; each fills only its shards."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every leaf replicated on every device of the mesh (the same values on every process).

  Leaves already placed so are kept. A one-device mesh is placed the same way: a fresh and a
  restored state then lower to the same programs, so a resumed run hits the compilation cache.
  """
  sharding = replicated(mesh)
  return jax.tree_util.tree_map(
      lambda x: x if isinstance(x, jax.Array) and x.sharding == sharding
      else to_global(x, sharding), tree)


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
  """Arrays split over the data axis along their first dimension; scalars replicated."""
  if mesh.size == 1:
    return batch
  return {k: to_global(v, batch_sharded(mesh) if np.ndim(v) else replicated(mesh))
          for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """The whole array on this host, gathering the shards other processes hold."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_primary() -> bool:
  """Reports and logs that must be written once are written by process 0."""
  return jax.process_index() == 0
