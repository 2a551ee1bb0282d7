"""What the commands (`main`, `convert`, `benchmark`) share: the --config flag, flag errors and
user errors as one line on stderr with status 1, and a console that shows this package's progress.

Exit statuses: 0 done; 1 a mistake the user can fix (a UserError, a config that does not load or
validate: its one-line message alone on stderr); 130 Ctrl-C. The console shows this package's
INFO lines and every library's warnings; other libraries' INFO lines come back with
--verbosity=1, their DEBUG lines with --verbosity=2.
"""
import logging as python_logging
import os
import sys
import traceback

from absl import flags, logging
from ml_collections import config_flags

from ddpm_jax import config_validation
from ddpm_jax.errors import UserError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

FLAGS = flags.FLAGS
CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config (configs/<name>.py).',
                                         lock_config=True)


class _LibraryInfoFilter(python_logging.Filter):
  """Other packages' INFO only with --verbosity=1 or more, their DEBUG with 2 or more."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    if record.levelno >= python_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR):
      return True
    return FLAGS.verbosity >= (1 if record.levelno >= python_logging.INFO else 2)


def start(config) -> None:
  """What every command does first: the quiet console, then the whole config validated."""
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
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


def with_user_errors(main_fn):
  """`main_fn(argv)`: a UserError's message alone on stderr and status 1; Ctrl-C status 130."""
  def main_or_exit(argv) -> None:
    try:
      main_fn(argv)
    except UserError as error:
      print(error, file=sys.stderr)
      sys.exit(1)
    except KeyboardInterrupt:
      print('Interrupted.', file=sys.stderr)
      sys.exit(130)
  return main_or_exit


def no_arguments(argv) -> None:
  """Commands take flags only."""
  if len(argv) > 1:
    raise UserError(f'Unexpected arguments: {" ".join(argv[1:])}; every option is a --flag.')


def local_path(path: str) -> str:
  """`path` with a leading ~ expanded unless it is a URL such as gs://bucket/dir."""
  return path if '://' in path else os.path.expanduser(path)
