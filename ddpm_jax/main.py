"""The command line: train, sample, evaluate, or all three in a row.

  python -m ddpm_jax.main --config=configs/cifar10.py --workdir=DIR [--mode=train|sample|eval|all]
      [--config.training.batch_size=256 ...]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]  # multi-process off TPU
      [--coordinator_timeout=300]  # seconds to wait for every process to join, then exit 1

Exit statuses (`cli.py`; docs/reliability.md): 0 done; 1 a mistake the user can fix (its one
sentence alone on stderr); 70 an unexpected crash (traceback, then one sentence); 75
(EX_TEMPFAIL) stopped with nothing lost: training saves its current step on SIGTERM
(preemption) or Ctrl-C, sampling and evaluation keep their finished chunks and progress, and a
full disk leaves the previous checkpoint: rerun the same command to continue. The launch scripts'
loop reruns on 75 and on crashes, and stops on 0 and 1. The console is `cli.py`'s.
"""
import os

# TensorFlow (tf.data only) logs from C++ as it loads: its INFO lines, and the note that oneDNN's
# custom math kernels (which tf.data's decoding and resizing do not use) are on.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
# pylint: disable=wrong-import-position
import sys

import jax
import tensorflow as tf
from absl import app, flags, logging

from ddpm_jax import cli, evaluation, inference as inference_lib, parallel, sample_job, train
from ddpm_jax import xla_flags

EXIT_PREEMPTED = cli.EXIT_STOPPED  # 75, EX_TEMPFAIL: try again (the launch scripts' retry loop)

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
flags.adopt_module_key_flags(cli)  # --config in --help
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str, mode: str) -> bool:
  """Runs `mode`; with 'all', prints the sample grid's and the metrics' paths at the end.

  Returns False when training was preempted (its checkpoint is saved; a rerun resumes).
  """
  if mode in ('train', 'all'):
    state = train.train_and_evaluate(config, workdir)
    if int(state.step) < config.training.num_train_steps:
      return False
  # --mode=all restores the checkpoint and compiles the sampler once for both jobs.
  inference = (inference_lib.Inference(config, workdir, step=config.sampling.step)
               if mode == 'all' else None)
  if mode in ('sample', 'all'):
    sample_paths = sample_job.sample_from_workdir(config, workdir, inference=inference)
  if mode in ('eval', 'all'):
    eval_paths = evaluation.evaluate(config, workdir, inference=inference)
  if mode == 'all' and jax.process_index() == 0:
    print(sample_paths['grid_png'])
    print(eval_paths['metrics_json'])
  return True


def main(argv) -> None:
  cli.no_arguments(argv)
  xla_flags.apply()  # before JAX starts its backend
  cli.start(cli.CONFIG.value)
  tf.config.experimental.set_visible_devices([], 'GPU')  # tf.data only; JAX owns accelerators
  parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                      timeout_s=_COORDINATOR_TIMEOUT.value)
  parallel.check_same_config(cli.CONFIG.value, mode=_MODE.value, workdir=_WORKDIR.value)
  logging.info('JAX process %d of %d, %d local and %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  if not run(cli.CONFIG.value, cli.local_path(_WORKDIR.value), _MODE.value):
    sys.exit(EXIT_PREEMPTED)


if __name__ == '__main__':
  app.run(cli.with_user_errors(main), flags_parser=cli.parse_flags)
