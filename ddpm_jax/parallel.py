"""Data parallelism: one `Mesh` over every device of every process, batch on the `data` axis.

The same code runs on one CPU, eight TPU cores or a pod: arrays are global `jax.Array`s, the
batch is sharded over `data` and the parameters are replicated; `jax.jit` inserts the
collectives. Multi-process runs start with `initialize`.
"""
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax.errors import UserError

DATA_AXIS = 'data'


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1) -> None:
  """Starts the multi-process runtime: from the flags off TPU, automatically on TPU pods."""
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise UserError('With --coordinator_address, give --num_processes=N and '
                      '--process_id=I with 0 <= I < N on every process.')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif _on_tpu_pod():
    jax.distributed.initialize()  # the TPU metadata tells each worker its peers


def _on_tpu_pod() -> bool:
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1


def make_mesh() -> Mesh:
  """A 1-D mesh over all devices (all processes) with the `data` axis."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_divisible(global_batch: int, mesh: Mesh, what: str = 'training.batch_size') -> None:
  if global_batch % mesh.size:
    raise UserError(f'{what}={global_batch} is not divisible by the {mesh.size} devices; '
                    f'use a multiple of {mesh.size}.')


def global_batch(mesh: Mesh, local_batch: Any) -> Any:
  """Assembles each process's numpy batch into global arrays sharded over `data`."""
  sharding = data_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Puts a pytree (the same on every process) on every device."""
  return jax.device_put(tree, replicated(mesh))


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-process sharded) global array, on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def agree_with_process_0(x: np.ndarray) -> np.ndarray:
  """Process 0's value of a small host array on every process (e.g. which files exist)."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(x))
