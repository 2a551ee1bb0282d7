"""The command line: train, sample, evaluate, or all three in a row.

  python -m ddpm_jax.main --config=configs/cifar10.py --workdir=DIR [--mode=train|sample|eval|all]
      [--config.training.batch_size=256 ...]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]  # multi-process off TPU
      [--coordinator_timeout=300]  # seconds to wait for every process to join, then exit 1
  python -m ddpm_jax.main --config=... --workdir=DIR --mode=eval --follow \
      [--follow_poll=60 --follow_timeout=21600]  # evaluate each new checkpoint (follower.py;
      # SIGTERM or Ctrl-C stop it with status 75, as training: rerunning continues)

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

from ddpm_jax import cli, evaluation, follower, inference as inference_lib, parallel, sample_job
from ddpm_jax import train, xla_flags

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
_FOLLOW = flags.DEFINE_bool('follow', False, 'With --mode=eval: evaluate each new checkpoint as '
                            'training writes it, until the last step (ddpm_jax/follower.py).')
_FOLLOW_POLL = flags.DEFINE_integer('follow_poll', follower.DEFAULT_POLL_S,
                                    'With --follow: seconds between looks for a new checkpoint.')
_FOLLOW_TIMEOUT = flags.DEFINE_integer(
    'follow_timeout', follower.DEFAULT_TIMEOUT_S,
    'With --follow: stop (status 0) after this many seconds without a new checkpoint.')
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
  if _FOLLOW.value:
    follower.check_flags(cli.CONFIG.value, mode=_MODE.value, poll_s=_FOLLOW_POLL.value,
                         timeout_s=_FOLLOW_TIMEOUT.value)
  tf.config.experimental.set_visible_devices([], 'GPU')  # tf.data only; JAX owns accelerators
  parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                      timeout_s=_COORDINATOR_TIMEOUT.value)
  parallel.check_same_config(cli.CONFIG.value, mode=_MODE.value, workdir=_WORKDIR.value)
  logging.info('JAX process %d of %d, %d local and %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  hint = parallel.unused_accelerator_hint(jax.default_backend(), jax.config.jax_platforms or '')
  if hint:
    logging.warning(hint)
  workdir = cli.local_path(_WORKDIR.value)
  if _FOLLOW.value:
    done = follower.follow(cli.CONFIG.value, workdir, poll_s=_FOLLOW_POLL.value,
                           timeout_s=_FOLLOW_TIMEOUT.value)
  else:
    done = run(cli.CONFIG.value, workdir, _MODE.value)
  if not done:
    sys.exit(EXIT_PREEMPTED)


if __name__ == '__main__':
  app.run(cli.with_user_errors(main), flags_parser=cli.parse_flags)
