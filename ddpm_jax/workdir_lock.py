"""One trainer per workdir: `hold(workdir)` keeps WORKDIR/train.lock while training runs.

The lock file holds the trainer's host, pid, process start time and a heartbeat that a thread
rewrites every LOCK_HEARTBEAT_S. A second trainer on the same workdir refuses with one sentence;
a lock whose process has ended (on this host: its pid is gone or reused; on another host: no
heartbeat for LOCK_STALE_S) is taken over with a warning.
"""
import contextlib
import json
import os
import socket
import threading
import time
from typing import Iterator, Optional

import jax
from absl import logging
from etils import epath

from ddpm_jax import checkpointing, errors
from ddpm_jax.errors import UserError

LOCK = 'train.lock'
LOCK_HEARTBEAT_S = 60  # how often the holder rewrites its lock
LOCK_STALE_S = 600  # a lock from another host that is older than this is taken over


def _process_start_time(pid: int) -> Optional[str]:
  """When process `pid` started (Linux: /proc/PID/stat field 22), or None if there is none."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _this_process() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'start': _process_start_time(os.getpid()), 'heartbeat': time.time()}


def _holder_runs(holder: dict) -> bool:
  """Whether the process that wrote a lock still runs: by its pid on this host, else by age."""
  if holder.get('host') != socket.gethostname():
    return time.time() - holder.get('heartbeat', 0) < LOCK_STALE_S
  start = _process_start_time(holder['pid'])
  if start is not None or holder.get('start') is not None:
    return start == holder.get('start')  # a reused pid is another process
  try:
    os.kill(holder['pid'], 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


def _is_lock(holder) -> bool:
  """Whether parsed JSON is a lock as `_this_process` writes it (host, pid, start, heartbeat)."""
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  return (isinstance(holder, dict) and isinstance(holder.get('host'), str)
          and isinstance(holder.get('pid'), int) and not isinstance(holder['pid'], bool)
          and holder['pid'] > 0 and isinstance(holder.get('start'), (str, type(None)))
          and number(holder.get('heartbeat', 0)))


def _read_lock(path: epath.Path) -> Optional[dict]:
  """The lock in `path`; None if there is none; {'unreadable': why} for anything that is not a
  lock (half written, garbage, or JSON of another shape): no live trainer leaves it so."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  except OSError as error:
    return {'unreadable': errors.one_line(error)}
  try:
    holder = json.loads(text)
  except ValueError:
    holder = None
  if not _is_lock(holder):
    excerpt = ' '.join(text.split())
    return {'unreadable': f'{excerpt[:80]}{"..." if len(excerpt) > 80 else ""}'}
  return holder


def _acquire(workdir) -> epath.Path:
  """Writes WORKDIR/train.lock for this process; a UserError when a live trainer holds it."""
  path = epath.Path(workdir) / LOCK
  holder = _read_lock(path)
  if holder is not None:
    if 'unreadable' in holder:
      logging.warning('Taking over %s, which is not a trainer\'s lock (%s).', path,
                      holder['unreadable'])
    elif _holder_runs(holder):
      raise UserError(f'Another trainer (pid {holder["pid"]} on {holder["host"]}) is using '
                      f'--workdir={workdir}; wait for it to finish, stop it, or pass another '
                      f'--workdir.')
    else:
      logging.warning('Taking over %s from a trainer that no longer runs (pid %d on %s).', path,
                      holder['pid'], holder['host'])
    path.unlink(missing_ok=True)
  draft = _lock_draft(path)
  if '://' in os.fspath(workdir):
    draft.replace(path)  # object stores have no exclusive create; the check above must do
    return path
  try:  # an exclusive, complete create: of two trainers starting together, one gets the lock
    os.link(draft, path)
  except FileExistsError:
    return _acquire(workdir)
  finally:
    draft.unlink()
  return path


def _lock_draft(path: epath.Path) -> epath.Path:
  """This process's lock, written whole beside `path`, to be moved there: a reader never sees
  a half-written lock."""
  draft = path.parent / f'{LOCK}.{os.getpid()}.tmp'
  draft.write_text(json.dumps(_this_process()))
  return draft


@contextlib.contextmanager
def hold(workdir) -> Iterator[None]:
  """Holds WORKDIR/train.lock (host, pid) while training, so a second trainer refuses.

  Creates the workdir: one that is a file or cannot be written is a UserError. A lock whose
  process has ended (on this host: its pid is gone; on another host: no heartbeat for
  LOCK_STALE_S) is taken over with a warning. Only process 0 of a multi-process run locks.
  """
  checkpointing.checkpoint_dir(workdir)  # a filesystem Orbax cannot write to is a UserError
  if jax.process_index() > 0:
    yield
    return
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    path = _acquire(workdir)
  except OSError as error:
    raise errors.unwritable_workdir(workdir, error) from None
  stop = threading.Event()

  def heartbeat():
    while not stop.wait(LOCK_HEARTBEAT_S):
      try:
        _lock_draft(path).replace(path)
      except Exception as error:  # pylint: disable=broad-except  (storage hiccups; try again)
        logging.warning('Could not refresh %s (%s).', path, errors.one_line(error))

  thread = threading.Thread(target=heartbeat, name='workdir_lock_heartbeat', daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
    path.unlink(missing_ok=True)
