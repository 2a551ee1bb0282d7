"""What the commands (`main`, `convert`, `benchmark`) share: the --config flag, the exit
statuses with their one-line messages, and a console that shows this package's progress.

Exit statuses (`with_user_errors`; docs/reliability.md has the table):
  0   done.
  1   a mistake to fix (a UserError, a config that does not load or validate, a path that cannot
      be written): its one sentence alone on stderr; rerunning the same command cannot help.
  70  (EX_SOFTWARE) an unexpected crash: the traceback, then one sentence; worth a retry.
  75  (EX_TEMPFAIL) stopped before finishing with nothing lost: SIGTERM (preemption), Ctrl-C, or
      a full disk (the sentence names the device and the space to free); rerun the same command
      to continue from what was kept (checkpoints, sample chunks, bits/dim progress).
The console shows this package's INFO lines and every library's warnings; other libraries' INFO
lines come back with --verbosity=1, their DEBUG lines with --verbosity=2.
"""
import logging as python_logging
import os
import signal
import sys
import threading
import traceback

from absl import flags, logging
from ml_collections import config_flags

from ddpm_jax import config_validation, errors
from ddpm_jax.errors import UserError

EXIT_MISTAKE = 1
EXIT_CRASH = 70  # EX_SOFTWARE from sysexits.h: the launch scripts retry up to --max-restarts
EXIT_STOPPED = 75  # EX_TEMPFAIL from sysexits.h: try again (the launch scripts always rerun)

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

FLAGS = flags.FLAGS
CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config (configs/<name>.py).',
                                         lock_config=True)


class _LibraryInfoFilter(python_logging.Filter):
  """Other packages' INFO only with --verbosity=1 or more, their DEBUG with 2 or more.

  Orbax's background threads log each failure of an asynchronous save with its traceback (as
  many as three copies) before the main thread gets it again (from `wait_until_finished` or the
  next save), where `with_user_errors` reports it once, and asyncio logs the writes abandoned
  after it as futures whose exception was never retrieved: these records show only with
  --verbosity=1.
  """

  def filter(self, record: python_logging.LogRecord) -> bool:
    if _is_orbax_thread_failure(record):
      return FLAGS.verbosity >= 1
    if record.levelno >= python_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR):
      return True
    return FLAGS.verbosity >= (1 if record.levelno >= python_logging.INFO else 2)


def _is_orbax_thread_failure(record: python_logging.LogRecord) -> bool:
  """Orbax's record of a failed asynchronous write, or asyncio's 'Future exception was never
  retrieved' for one of the writes it abandoned (logged when the future is collected)."""
  if not record.exc_info:
    return False
  if errors.in_orbax(record.pathname):
    return True
  trace = record.exc_info[2]
  return record.name == 'asyncio' and trace is not None and any(
      errors.in_orbax(frame.filename) for frame in traceback.extract_tb(trace))


def _quiet_unraisable_reports() -> None:
  """No traceback for Orbax's abandoned writes, nor for a signal's exception swallowed by a
  callback (it is raised again at the next safe point)."""
  previous = sys.unraisablehook
  sys.unraisablehook = lambda u: None if (errors.is_closed_loop_report(u)
                                          or errors.is_noted_interrupt(u)) else previous(u)


def start(config) -> None:
  """What every command does first: the quiet console, then the whole config validated."""
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  _quiet_unraisable_reports()
  config_validation.validate(config)


def parse_flags(argv):
  """absl's parsing; a bad --config (no such file, an unknown field) is one line, status 1."""
  try:
    remaining = FLAGS(argv)
    _ = CONFIG.value.seed  # config_flags defers a file's load error to the first access
    return remaining
  except flags.Error as error:
    message = str(error)
  except OSError as error:  # the last line names the file: "[Errno 2] No such file ...: 'x.py'"
    message = (f'Cannot load the --config file ({str(error).strip().splitlines()[-1].strip()}); '
               f'pass --config=configs/<name>.py.')
  except Exception as error:  # pylint: disable=broad-except  (whatever the config file raises)
    message = _config_error(error, _config_argument(argv))
  print(message, file=sys.stderr)
  sys.exit(1)


def _config_argument(argv) -> str:
  """The value of --config in `argv` (the flag is not parsed when its file fails to load)."""
  for i, arg in enumerate(argv):
    if arg.startswith(('--config=', '-config=')):
      return arg.split('=', 1)[1]
    if arg in ('--config', '-config') and i + 1 < len(argv):
      return argv[i + 1]
  return ''


def _config_error(error: Exception, filename: str) -> str:
  """One line for an error raised while loading the config file or applying an override."""
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(frame.filename) == os.path.abspath(filename)]
  if isinstance(error, SyntaxError) or lines:
    where = f', line {lines[-1]}' if lines else ''
    text = ' '.join(str(error).split())
    return (f'Cannot load the --config file {filename}{where}: '
            f'{type(error).__name__}: {text}')
  if isinstance(error, (AttributeError, KeyError)):
    return f'Unknown config field in a --config.<field>=value override: {error}.'
  raise error


def _stop_on_sigterm(signum, frame) -> None:
  """SIGTERM outside training (which saves first, `train.watch_for_preemption`): stop now."""
  del signum, frame
  errors.interrupt(errors.Interrupted(
      'Stopped by SIGTERM; what was finished is kept (checkpoints, sample chunks, bits/dim '
      'progress): rerun the same command to continue.'))


def _stop_on_ctrl_c(signum, frame) -> None:
  """Ctrl-C outside training: Python's KeyboardInterrupt, noted (`errors.interrupt`)."""
  del signum, frame
  errors.interrupt(KeyboardInterrupt())


def exit_status(error: BaseException) -> tuple[int, str]:
  """(exit status, the one sentence for stderr) of an exception that ended a command."""
  if isinstance(error, UserError):
    return EXIT_MISTAKE, str(error)
  if isinstance(error, (errors.Stopped, errors.Interrupted)):
    return EXIT_STOPPED, str(error)
  if isinstance(error, KeyboardInterrupt):
    return EXIT_STOPPED, ('Interrupted by Ctrl-C; what was finished is kept (checkpoints, sample '
                          'chunks, bits/dim progress): rerun the same command to continue.')
  if errors.is_disk_full(error):
    return EXIT_STOPPED, str(errors.disk_full(error))
  if isinstance(error, PermissionError) or (
      isinstance(error, OSError) and error.errno == 30):  # EROFS: a read-only filesystem
    where = f' {error.filename}' if error.filename else ''
    return EXIT_MISTAKE, (f'Cannot access{where} ({errors.one_line(error)}); make it writable, '
                          f'or pass another --workdir.')
  return EXIT_CRASH, (f'ddpm_jax crashed ({errors.one_line(error)}); this is a bug or a fault '
                      f'of the machine, not of the command: the launch scripts rerun it (exit '
                      f'status {EXIT_CRASH}), and if it repeats, report the traceback above.')


def with_user_errors(main_fn):
  """`main_fn(argv)` with the exit statuses of the module docstring: a one-sentence message on
  stderr (after the traceback for a crash), then status 1, 70 or 75."""
  def main_or_exit(argv) -> None:
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, _stop_on_sigterm)
      signal.signal(signal.SIGINT, _stop_on_ctrl_c)
    try:
      main_fn(argv)
    except (Exception, KeyboardInterrupt, errors.Interrupted) as error:  # pylint: disable=W0703
      status, sentence = exit_status(error)
      if status == EXIT_CRASH:
        traceback.print_exc()
      print(sentence, file=sys.stderr, flush=True)
      sys.exit(status)
  return main_or_exit


def no_arguments(argv) -> None:
  """Commands take flags only."""
  if len(argv) > 1:
    raise UserError(f'Unexpected arguments: {" ".join(argv[1:])}; every option is a --flag.')


def local_path(path: str) -> str:
  """`path` with a leading ~ expanded unless it is a URL such as gs://bucket/dir."""
  return path if '://' in path else os.path.expanduser(path)
