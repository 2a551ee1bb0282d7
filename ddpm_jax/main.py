"""The command line: train, sample, evaluate, or all three in a row.

  python -m ddpm_jax.main --config=configs/cifar10.py --workdir=DIR [--mode=train|sample|eval|all]
      [--config.training.batch_size=256 ...]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]  # multi-process off TPU
      [--coordinator_timeout=300]  # seconds to wait for every process to join, then exit 1

A mistake the user can fix (a UserError, a config file that is missing or does not load) prints
its message alone on stderr and exits with status 1.
"""
import os
import sys

import jax
import tensorflow as tf
from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import evaluation, parallel, sample_job, train
from ddpm_jax.errors import UserError

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


def run(config, workdir: str, mode: str) -> None:
  """Runs `mode`; with 'all', prints the sample grid's and the metrics' paths at the end."""
  if mode in ('train', 'all'):
    state = train.train_and_evaluate(config, workdir)
    if int(state.step) < config.training.num_train_steps:
      return  # preempted: the checkpoint is saved; a rerun resumes
  if mode in ('sample', 'all'):
    sample_paths = sample_job.sample_from_workdir(config, workdir)
  if mode in ('eval', 'all'):
    eval_paths = evaluation.evaluate(config, workdir)
  if mode == 'all' and jax.process_index() == 0:
    print(sample_paths['grid_png'])
    print(eval_paths['metrics_json'])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  tf.config.experimental.set_visible_devices([], 'GPU')  # tf.data only; JAX owns accelerators
  parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                      timeout_s=_COORDINATOR_TIMEOUT.value)
  logging.info('JAX process %d of %d, %d local and %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  workdir = _WORKDIR.value
  if '://' not in workdir:
    workdir = os.path.expanduser(workdir)  # --workdir=~/x reaches us unexpanded
  run(_CONFIG.value, workdir, _MODE.value)


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
  except (AttributeError, KeyError) as error:
    message = f'Unknown config field in a --config.<field>=value override: {error}.'
  print(message, file=sys.stderr)
  sys.exit(1)


def with_user_errors(main_fn):
  """`main_fn(argv)`, printing a UserError's message alone on stderr and exiting with status 1."""
  def main_or_exit(argv) -> None:
    try:
      main_fn(argv)
    except UserError as error:
      print(error, file=sys.stderr)
      sys.exit(1)
  return main_or_exit


if __name__ == '__main__':
  app.run(with_user_errors(main), flags_parser=parse_flags)
