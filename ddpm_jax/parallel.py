"""Data parallelism: one `Mesh` over every device of every process, batch on the `data` axis.

The same code runs on one CPU, eight TPU cores or a pod: arrays are global `jax.Array`s, the
batch is sharded over `data` and the parameters are replicated; `jax.jit` inserts the
collectives. Multi-process runs start with `initialize`, then `check_same_config`: every process
must run the same config and flags, or all of them stop with one sentence.
"""
import contextlib
import glob
import importlib.util
import json
import os
import shutil
import socket
import sys
import threading
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax.errors import UserError, flag_value

DATA_AXIS = 'data'


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1,
               timeout_s: int = 300) -> None:
  """Starts the multi-process runtime: from the flags off TPU, automatically on TPU pods.

  Waits at most `timeout_s` for every process to join; then (or for inconsistent flags) it
  exits with one sentence naming the coordinator and what to check, not JAX's abort.
  """
  if timeout_s < 1:
    raise UserError(f'--coordinator_timeout={timeout_s} must be at least 1 (seconds).')
  if coordinator_address:
    _check_process_flags(coordinator_address, num_processes, process_id)
    if process_id == 0:
      _check_port_is_free(coordinator_address)
      logging.info('Process 0 of %d: waiting up to %d s for the other %d process(es) to join '
                   'at %s.', num_processes, timeout_s, num_processes - 1, coordinator_address)
    else:
      logging.info('Process %d of %d: joining the coordinator at %s (up to %d s).', process_id,
                   num_processes, coordinator_address, timeout_s)
    try:
      with _exit_unless_joined_within(timeout_s, coordinator_address, num_processes):
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=timeout_s + _JAX_TIMEOUT_MARGIN_S)
    except jax.errors.JaxRuntimeError as error:  # e.g. process 0 cannot listen on the port
      check = ('that its port is free on this host (process 0 serves it)' if process_id == 0
               else 'the address')
      _exit_with(f'JAX\'s multi-process runtime did not start with the coordinator at '
                 f'{coordinator_address} ({" ".join(str(error).split())}); check {check}.')
  elif num_processes or process_id != -1:
    given = [f'--num_processes={num_processes}'] * bool(num_processes) + [
        f'--process_id={process_id}'] * (process_id != -1)
    raise UserError(f'{" and ".join(given)} {"need" if len(given) > 1 else "needs"} '
                    '--coordinator_address=HOST:PORT (process 0\'s host and a free port) on '
                    'every process; on a TPU pod leave all three out.')
  elif _on_tpu_pod():
    with _exit_unless_joined_within(timeout_s, "the TPU pod's worker 0", 0):
      jax.distributed.initialize(  # the TPU metadata tells each worker its peers
          initialization_timeout=timeout_s + _JAX_TIMEOUT_MARGIN_S)


# JAX's own deadline aborts the process (a C++ check failure); ours comes first and says why.
_JAX_TIMEOUT_MARGIN_S = 60


def _check_process_flags(coordinator_address: str, num_processes: int, process_id: int) -> None:
  host, _, port = coordinator_address.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f'--coordinator_address={coordinator_address} is not HOST:PORT; give '
                    'process 0\'s host name or IP address and a free port, e.g. 10.0.0.2:8476.')
  if num_processes < 1:
    raise UserError(f'--num_processes={num_processes}: with --coordinator_address, give the '
                    'number of processes (at least 1), the same on every process.')
  if not 0 <= process_id < num_processes:
    raise UserError(f'--process_id={process_id} is not in 0..{num_processes - 1} for '
                    f'--num_processes={num_processes}; give each process its own id in that '
                    'range (0 on the coordinator\'s host).')


def _check_port_is_free(address: str) -> None:
  """UserError when process 0 could not serve the coordinator: its port is taken here.

  Checked before JAX tries, since jaxlib 0.10 can crash (a segfault) instead of raising when the
  coordination service cannot listen.
  """
  port = int(address.rpartition(':')[2])
  with socket.socket() as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
    try:
      probe.bind(('', port))
    except OSError as error:
      raise UserError(f'Process 0 cannot serve the coordinator at {address}: port {port} is in '
                      f'use on this host ({error.strerror}); choose another port, or check that '
                      f'its port is free on this host (process 0 serves it).') from None


def _answers(address: str, timeout_s: float = 2) -> bool:
  """Whether something accepts TCP connections at HOST:PORT."""
  host, _, port = address.rpartition(':')
  try:
    socket.create_connection((host.strip('[]'), int(port)), timeout=timeout_s).close()
    return True
  except (OSError, ValueError):
    return False


def _not_joined_message(timeout_s: int, address: str, num_processes: int) -> str:
  if not num_processes:  # TPU pod
    return (f'The TPU pod\'s processes did not all start JAX\'s distributed runtime within '
            f'{timeout_s} s; check that the command runs on every worker (--worker=all).')
  if not _answers(address):
    return (f'Nothing answered at the coordinator address {address} within {timeout_s} s; '
            'start process 0 (--process_id=0) on that host, and check the host, the port and '
            'that the firewall lets this machine reach it.')
  return (f'Not all {num_processes} processes joined the coordinator at {address} within '
          f'{timeout_s} s; start every process with the same --coordinator_address and '
          f'--num_processes={num_processes} and its own --process_id in 0..{num_processes - 1}.')


def _exit_with(message: str) -> None:
  """Prints `message` and exits with status 1 at once, as a UserError would, but without
  Python's shutdown: the main thread may be inside JAX's C++ connect, and a runtime that failed
  to start can crash the interpreter's exit (a segfault)."""
  print(message, file=sys.stderr, flush=True)
  os._exit(1)


@contextlib.contextmanager
def _exit_unless_joined_within(timeout_s: int, address: str, num_processes: int):
  """Prints the sentence and exits with status 1 if the block runs longer than `timeout_s`."""
  timer = threading.Timer(
      timeout_s, lambda: _exit_with(_not_joined_message(timeout_s, address, num_processes)))
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    timer.cancel()


def _on_tpu_pod() -> bool:
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1


# What each accelerator needs besides jax: the package's extra, and the modules that plugin adds.
_ACCELERATOR_PLUGINS = {'tpu': ('libtpu',), 'cuda': ('jax_cuda12_plugin', 'jax_cuda13_plugin')}


def unused_accelerator_hint(backend: str, jax_platforms: str = '', *, glob_fn=glob.glob,
                            which=shutil.which, find_spec=importlib.util.find_spec
                            ) -> str | None:
  """One sentence when JAX computes on the CPU of a host with a TPU or an NVIDIA GPU, else None.

  `backend` is jax.default_backend(), `jax_platforms` the JAX_PLATFORMS setting (JAX_PLATFORMS=cpu
  is the user's choice: no hint). A TPU shows as /dev/accel* (v2-v4) or /dev/vfio/<group> (v5e
  and later), an NVIDIA GPU by `nvidia-smi` on PATH. The probes are arguments, for the tests.
  """
  if backend != 'cpu' or {p.strip() for p in jax_platforms.split(',') if p.strip()} == {'cpu'}:
    return None
  if glob_fn('/dev/accel*') or glob_fn('/dev/vfio/[0-9]*'):
    device, extra = 'a TPU', 'tpu'
  elif which('nvidia-smi'):
    device, extra = 'an NVIDIA GPU', 'cuda'
  else:
    return None
  plugins = [name for name in _ACCELERATOR_PLUGINS[extra] if find_spec(name) is not None]
  if plugins:
    return (f'JAX runs on the CPU although this host has {device} and {plugins[0]} is installed: '
            'JAX could not start it (its warning above says why; on a TPU, another process may '
            'hold it).')
  return (f'JAX runs on the CPU although this host has {device}: install JAX for it with '
          f"`pip install -e '.[{extra}]'` in the ddpm_jax checkout (docs/install.md).")


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


def _flat(tree, prefix: str = '') -> dict:
  """{'optim.learning_rate': 0.0002, ...}: the leaves of nested dicts, in their order."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = list(value) if isinstance(value, tuple) else value
  return out


def _first_difference(mine: dict, theirs: dict):
  """(key, mine, theirs) at the first key whose values differ (or that one lacks), else None."""
  for key in list(mine) + [k for k in theirs if k not in mine]:
    if mine.get(key, '<missing>') != theirs.get(key, '<missing>'):
      return key, mine.get(key, '<missing>'), theirs.get(key, '<missing>')
  return None


def check_same_config(config, **flags) -> None:
  """A UserError on every process unless every process runs process 0's config and `flags`.

  Before anything runs, each process's config and flags (say --mode and --workdir) go to every
  process as canonical JSON (two small all-gathers: the lengths, then the bytes), so every
  process names the same first difference: the first process that differs from process 0, and
  the first field (flags first, then the config's fields in sorted order). Without it, processes
  with another learning rate trained apart while their 'replicated' parameters diverged, and a
  shape-changing difference aborted every process inside a collective (status 134).
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  mine = {**{f'--{name}': value for name, value in flags.items()}, **_flat(config.to_dict())}
  data = json.dumps(mine, default=repr).encode()
  lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32)))
  lengths = lengths.reshape(-1)
  padded = np.frombuffer(data.ljust(int(lengths.max()), b' '), np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  settings = [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]
  for process, theirs in enumerate(settings[1:], start=1):
    difference = _first_difference(settings[0], theirs)
    if difference is not None:
      key, first, other = difference
      name = key if key.startswith('--') else f'--config.{key}'
      raise UserError(f'Process {process} was started with {name}={flag_value(other)} but '
                      f'process 0 with {name}={flag_value(first)}; start every process with the '
                      f'same --config file, --config.* overrides, --mode and --workdir.')
