"""The command line: train, sample, evaluate, or all three in a row.

  python -m ddpm_jax.main --config=configs/cifar10.py --workdir=DIR [--mode=train|sample|eval|all]
      [--config.training.batch_size=256 ...]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]  # multi-process off TPU
      [--coordinator_timeout=300]  # seconds to wait for every process to join, then exit 1

Exit statuses: 0 done; 1 a mistake the user can fix (a UserError, a config that does not load or
validate: its one-line message alone on stderr); 75 (EX_TEMPFAIL) training stopped early by
SIGTERM (preemption) or Ctrl-C after saving its current step: rerun the same command to resume;
130 Ctrl-C outside training. Anything else is a crash worth a retry (the launch scripts' loop
reruns on 75 and on crashes, and stops on 0 and 1).

The console shows this package's progress and every library's warnings; Orbax's, JAX's and
TensorFlow's INFO lines come back with --verbosity=1, their DEBUG lines with --verbosity=2.
"""
import os

# TensorFlow (tf.data only) logs from C++ as it loads: its INFO lines, and the note that oneDNN's
# custom math kernels (which tf.data's decoding and resizing do not use) are on.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
# pylint: disable=wrong-import-position
import logging as python_logging
import sys
import traceback

import jax
import tensorflow as tf
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import config_validation, evaluation, parallel, sample_job, train
from ddpm_jax.errors import UserError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: try again (the launch scripts' retry loop)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config (configs/<name>.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, summaries, samples and metrics.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'all'],
                          'train; sample or eval a checkpoint; all: train, sample, then eval.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '',
                                   'HOST:PORT of process 0, for multi-process runs off TPU.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'With --coordinator_address.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'With --coordinator_address.')
_COORDINATOR_TIMEOUT = flags.DEFINE_integer(
    'coordinator_timeout', 300, 'Seconds to wait for every process to join (multi-process '
    'runs); then exit with status 1 and a sentence saying what to check.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str, mode: str) -> bool:
  """Runs `mode`; with 'all', prints the sample grid's and the metrics' paths at the end.

  Returns False when training was preempted (its checkpoint is saved; a rerun resumes).
  """
  if mode in ('train', 'all'):
    state = train.train_and_evaluate(config, workdir)
    if int(state.step) < config.training.num_train_steps:
      return False
  if mode in ('sample', 'all'):
    sample_paths = sample_job.sample_from_workdir(config, workdir)
  if mode in ('eval', 'all'):
    eval_paths = evaluation.evaluate(config, workdir)
  if mode == 'all' and jax.process_index() == 0:
    print(sample_paths['grid_png'])
    print(eval_paths['metrics_json'])
  return True


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


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  start(_CONFIG.value)
  tf.config.experimental.set_visible_devices([], 'GPU')  # tf.data only; JAX owns accelerators
  parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                      timeout_s=_COORDINATOR_TIMEOUT.value)
  logging.info('JAX process %d of %d, %d local and %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  hint = parallel.unused_accelerator_hint(jax.default_backend(), jax.config.jax_platforms or '')
  if hint:
    logging.warning(hint)
  workdir = _WORKDIR.value
  if '://' not in workdir:
    workdir = os.path.expanduser(workdir)  # --workdir=~/x reaches us unexpanded
  if not run(_CONFIG.value, workdir, _MODE.value):
    sys.exit(EXIT_PREEMPTED)


def parse_flags(argv):
  """absl's parsing; a bad --config (no such file, an unknown field) is one line, status 1."""
  try:
    remaining = FLAGS(argv)
    _ = _CONFIG.value.seed  # config_flags defers a file's load error to the first access
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


if __name__ == '__main__':
  app.run(with_user_errors(main), flags_parser=parse_flags)
