"""The exception types the commands turn into exit statuses, and the sentences errors become.

UserError: a mistake to fix, status 1. Stopped and Interrupted: stopped before finishing with
nothing lost (a full disk; SIGTERM, Ctrl-C), status 75: rerunning the same command continues.
Anything else is a crash, status 70 (`cli.with_user_errors`).
"""
import os
import re
import shutil
from typing import Iterator, NoReturn, Optional


class UserError(ValueError):
  """Bad input (a config value, a path, a checkpoint): the message says what to do.

  The commands (`ddpm_jax.cli`) print the message alone (no traceback) and exit with status 1.
  """


class Stopped(Exception):
  """Stopped before finishing, nothing lost: the message says what was left and to rerun.

  The commands (`ddpm_jax.cli`) print the message alone and exit with status 75 (EX_TEMPFAIL).
  """


class Interrupted(BaseException):
  """A signal (SIGTERM, Ctrl-C) stopped the job; the message says what is kept. Status 75.

  A BaseException, as KeyboardInterrupt is, so that no `except Exception` (say, one that takes a
  failed read for a damaged checkpoint) mistakes it for an error. Signal handlers raise it (and
  the follower's `Stopped`) through `interrupt`, which notes it: where the raise is lost (a
  handler can run inside a callback or a destructor, such as JAX's gc callback, which report
  exceptions to `sys.unraisablehook` and go on), `raise_if_interrupted` raises it again at the
  next safe point (each sample chunk, before a checkpoint is written).
  """


_PENDING: list[BaseException] = []  # a signal's exception, raised but maybe swallowed


def interrupt(error: BaseException) -> NoReturn:
  """From a signal handler: notes `error`, then raises it."""
  _PENDING[:] = [error]
  raise error


def raise_if_interrupted() -> None:
  """Raises the noted exception of a signal again (its first raise may have been swallowed)."""
  if _PENDING:
    raise _PENDING[0]


def clear_interrupt() -> None:
  """Forgets the noted signal, once its exception has been handled (the job goes on)."""
  _PENDING.clear()


def is_noted_interrupt(unraisable) -> bool:
  """A signal's exception swallowed where it was raised, as `sys.unraisablehook` receives it:
  no traceback is due, `raise_if_interrupted` raises it again."""
  return bool(_PENDING) and unraisable.exc_value is _PENDING[0]


def in_orbax(filename: str) -> bool:
  """Whether a source file (of a log record, a frame, a coroutine) is Orbax's."""
  return f'{os.sep}orbax{os.sep}' in filename


def is_closed_loop_report(unraisable) -> bool:
  """TensorStore's report, through a `sys.unraisablehook`, of a read or write that Orbax
  abandoned when it closed its asyncio loop after an error ('Event loop is closed'; one per
  array): the error itself reaches the main thread."""
  return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == 'Event loop is closed')


def flag_value(value) -> str:
  """A value as --config.<field>=VALUE takes it: eps, 0.0002, True, (1,2), '' for empty."""
  if isinstance(value, (list, tuple)):
    return '(' + ','.join(map(flag_value, value)) + (',)' if len(value) == 1 else ')')
  if isinstance(value, str):
    return value if value else "''"
  return str(value)


def one_line(error: Exception) -> str:
  """`Type: message` on one line, at most 300 characters of the message."""
  text = ' '.join(str(error).split())
  return f'{type(error).__name__}: {text[:300]}'


def unwritable_workdir(workdir, error: OSError) -> UserError:
  return UserError(f'Cannot write to --workdir={workdir} ({one_line(error)}); pass a directory '
                   f'you can write to.')


_DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT (Linux)
_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='28'")
_WRITTEN_PATH = re.compile(r'(?:Failed (?:writing|to write|to create)[^"]*|local file) "([^"]+)"')


def _chain(error: BaseException) -> Iterator[BaseException]:
  """`error`, then its causes and contexts (each once)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or what caused it) is a full disk or quota, as OSError or TensorStore
  (Orbax) report it."""
  return any((isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS)
             or _DISK_FULL_TEXT.search(str(e)) for e in _chain(error))


def _written_path(error: BaseException) -> Optional[str]:
  for e in _chain(error):
    if isinstance(e, OSError) and e.filename:
      return os.fspath(e.filename)
    match = _WRITTEN_PATH.search(str(e))
    if match:
      return match.group(1)
  return None


def _mount_of(path: str) -> tuple[str, str]:
  """(device, mount point) of the filesystem holding `path` (its nearest existing parent)."""
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  while not os.path.ismount(path):
    path = os.path.dirname(path)
  device = path
  try:
    with open('/proc/mounts', encoding='utf-8') as f:
      for line in f:
        fields = line.split()
        if len(fields) > 1 and fields[1] == path:
          device = fields[0]
  except OSError:
    pass
  return device, path


def _size_of(path: str) -> int:
  total = 0
  for root, _, names in os.walk(path):
    for name in names:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:
        pass
  return total


def human_bytes(n: float) -> str:
  for unit in ('bytes', 'KB', 'MB', 'GB', 'TB'):
    if n < 1000 or unit == 'TB':
      return f'{n:.0f} {unit}' if unit == 'bytes' else f'{n:.1f} {unit}'
    n /= 1000
  return ''


def _newest_checkpoint(directory: str) -> Optional[str]:
  steps = [name for name in os.listdir(directory) if name.isdigit()] if os.path.isdir(
      directory) else []
  return os.path.join(directory, max(steps, key=int)) if steps else None


def disk_full(error: BaseException, needed_bytes: Optional[int] = None) -> Stopped:
  """The one sentence for a full disk: the device, its free space, what is safe, what to free.

  Under a `checkpoints` folder the space needed is the newest complete checkpoint's size (the
  save that failed wrote as much), and that checkpoint is what is safe.
  """
  path = _written_path(error)
  if path is None or '://' in path:
    return Stopped(f'No space left on the device being written ({one_line(error)}); free space '
                   f'there and rerun the same command to continue.')
  parts = path.split(os.sep)
  safe = 'the files written before are kept'
  if 'checkpoints' in parts:
    directory = os.sep.join(parts[:len(parts) - parts[::-1].index('checkpoints')])
    newest = _newest_checkpoint(directory)
    if newest is not None:
      safe = f'the checkpoint at step {os.path.basename(newest)} is safe'
      needed_bytes = needed_bytes or _size_of(newest)
  device, mount = _mount_of(path)
  try:
    free = f', {human_bytes(shutil.disk_usage(mount).free)} free'
  except OSError:
    free = ''
  needed = (f'at least {human_bytes(needed_bytes)}' if needed_bytes
            else 'space')
  return Stopped(f'No space left on {device} (mounted at {mount}{free}) while writing {path}: '
                 f'{safe}; free {needed} there and rerun the same command to continue.')
