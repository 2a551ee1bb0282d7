"""--mode=eval --follow: evaluates a training run's checkpoints as they appear, beside the trainer.

The authors' eval worker (`diffusion_tf/tpu_utils/tpu_utils.py`, `EvalWorker.run`) on a second
machine: it polls WORKDIR/checkpoints (local or gs://) every `poll_s` seconds and evaluates the
newest checkpoint that it has not evaluated, with `evaluation.evaluate` (the same files, and
TensorBoard in WORKDIR/eval, best<tag>.json). Checkpoints it was too slow for are skipped and
named in one line (`--config.sampling.step=N --mode=eval` evaluates one later). It stops after
the checkpoint of step `training.num_train_steps`, or after `timeout_s` seconds without a new
one. It takes no lock and only reads the checkpoints: one that the trainer deletes (its `keep`
policy) while it is read is a warning. A restarted follower recomputes nothing that WORKDIR/eval
holds for the same settings; SIGTERM or Ctrl-C stop it at once, and bits/dim progress and sample
chunks continue where they were.
"""
import contextlib
import signal
import threading
import time
from typing import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from ddpm_jax import (checkpointing, errors, evaluation, inference as inference_lib, parallel,
                      sampling)
from ddpm_jax.errors import UserError

DEFAULT_POLL_S = 60
DEFAULT_TIMEOUT_S = 6 * 3600


class Stopped(BaseException):
  """SIGTERM or SIGINT arrived (a BaseException: no `except Exception` on the way swallows it)."""

  def __init__(self, signal_name: str):
    super().__init__(signal_name)
    self.signal_name = signal_name


_DEFERRED: list = []  # while reading a checkpoint: [True, signal names that arrived meanwhile]


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
  """SIGTERM and SIGINT raise `Stopped` in the main thread, wherever it is (one process in the
  main thread only; otherwise nothing changes). Files are written atomically, so a stop loses
  at most the batch or chunk in progress."""
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield
    return

  def stop(signum, frame):
    del frame
    name = signal.Signals(signum).name
    if _DEFERRED:
      _DEFERRED.append(name)
    else:
      errors.interrupt(Stopped(name))

  previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
    errors.raise_if_interrupted()  # a stop that a callback swallowed
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    errors.clear_interrupt()  # the caller handles the Stopped raised


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
  """A signal waits for the end of the block (Orbax's reads are not to be interrupted), and
  then stops the follower even if the read failed meanwhile (else the failure, taken for a
  checkpoint deleted or half-written, would swallow the stop)."""
  _DEFERRED[:] = [True]
  try:
    yield
  finally:
    names = _DEFERRED[1:]
    _DEFERRED.clear()
    if names:
      raise Stopped(names[0])  # pylint: disable=lost-exception


def check_flags(config, *, mode: str, poll_s: int, timeout_s: int) -> None:
  """UserError, one sentence, for --follow flags that cannot work (before anything starts)."""
  if mode != 'eval':
    raise UserError(f'--follow evaluates checkpoints as they appear, so it needs --mode=eval, '
                    f'not --mode={mode}.')
  if poll_s < 1:
    raise UserError(f'--follow_poll={poll_s} must be at least 1 (seconds between looks for a '
                    f'new checkpoint).')
  if timeout_s < 0:
    raise UserError(f'--follow_timeout={timeout_s} must be 0 or more (seconds to wait for a new '
                    f'checkpoint before stopping).')
  if config.sampling.step != -1:
    raise UserError(f'--follow picks the checkpoints itself; leave out '
                    f'--config.sampling.step={config.sampling.step} (or evaluate that one step '
                    f'without --follow).')


def checkpoint_steps(workdir) -> list[int]:
  """The finished checkpoints' steps in WORKDIR/checkpoints, ascending (Orbax's own test: no
  temporary directory, and on gs:// only committed steps), as process 0 sees them."""
  directory = checkpointing.checkpoint_dir(workdir)
  steps = []
  for attempt in range(3):  # a listing can race with the trainer's deletions
    try:
      steps = sorted(ocp.path.step.checkpoint_steps(directory))
      break
    except (OSError, ValueError) as error:
      if attempt == 2:
        logging.warning('Cannot list %s (%s); looking again later.', directory, error)
      time.sleep(1)
  count = int(parallel.agree_with_process_0(np.array([len(steps)]))[0])
  agreed = steps[:count] + [0] * (count - len(steps))
  return [int(s) for s in parallel.agree_with_process_0(np.array(agreed, np.int64))]


def _agreed(flag: bool) -> bool:
  return bool(parallel.agree_with_process_0(np.array([flag]))[0])


class _Follower:
  """The loop's state: which steps it has seen, handled and retried."""

  def __init__(self, config, workdir, mesh):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.writer = None  # the TensorBoard writer, made at the first evaluation (no empty files)
    self.handled = 0  # the newest step evaluated or found evaluated
    self.retried = set()  # steps whose reading failed once

  def evaluate(self, steps: list[int]) -> str:
    """Evaluates steps[-1]: 'done', 'gone' (deleted while read) or 'retry' (unreadable once)."""
    step = steps[-1]
    skipped = [s for s in steps[:-1] if s > self.handled
               and not evaluation.is_evaluated(self.config, self.workdir, s)]
    if skipped:
      logging.info('Skipping the older checkpoints %s for the newest, %d (evaluate one later '
                   'with --mode=eval --config.sampling.step=N).',
                   ', '.join(map(str, skipped)), step)
    try:
      with _signals_deferred():
        inference = inference_lib.Inference(self.config, self.workdir, step=step,
                                            mesh=self.mesh)
    except Exception as error:  # pylint: disable=broad-except  (any failure to read)
      if step not in checkpoint_steps(self.workdir):
        logging.warning('The checkpoint of step %d disappeared while it was read (the trainer '
                        'keeps the latest training.keep); going on.', step)
        return 'gone'
      if step in self.retried or not isinstance(error, (UserError, OSError)):
        raise
      self.retried.add(step)
      logging.warning('Cannot read the checkpoint of step %d yet (%s); trying again in the next '
                      'look.', step, ' '.join(str(error).split()))
      return 'retry'
    self.writer = self.writer or evaluation.create_writer(self.workdir)
    evaluation.evaluate(self.config, self.workdir, inference=inference, writer=self.writer)
    self.handled = step
    return 'done'


def follow(config, workdir, *, poll_s: int = DEFAULT_POLL_S,
           timeout_s: int = DEFAULT_TIMEOUT_S, mesh=None) -> bool:
  """Evaluates each new checkpoint of `workdir` until the last one (see the module docstring).

  Returns True when done (the last step evaluated, or `timeout_s` without a new checkpoint),
  False when SIGTERM or Ctrl-C stopped it (a rerun continues).
  """
  mesh = mesh or parallel.make_mesh()
  evaluation.check_can_evaluate(config, mesh)
  final = config.training.num_train_steps
  follower = _Follower(config, workdir, mesh)
  logging.info('Following %s: evaluating each new checkpoint up to step %d (%s), looking every '
               '%d s, for at most %d s without a new one.', checkpointing.checkpoint_dir(workdir),
               final, sampling.settings(config), poll_s, timeout_s)
  seen, waiting_since = set(), time.monotonic()
  try:
    with stopping_on_signals(), checkpointing.quiet_abandoned_reads():
      while True:
        errors.raise_if_interrupted()  # a stop swallowed during the last evaluation
        steps = checkpoint_steps(workdir)
        if set(steps) - seen:
          seen.update(steps)
          waiting_since = time.monotonic()
        if steps:
          step = steps[-1]
          done = _agreed(evaluation.is_evaluated(config, workdir, step))
          if not done:
            outcome = follower.evaluate(steps)
            if outcome == 'gone':
              continue
            done = outcome == 'done'
            waiting_since = time.monotonic()
          else:
            follower.handled = max(follower.handled, step)
          if done and step >= final:
            logging.info('Evaluated the checkpoint of the last step, %d; done.', step)
            return True
        if time.monotonic() - waiting_since > timeout_s:
          logging.warning('No new checkpoint in %s for %d s (--follow_timeout); stopping.',
                          checkpointing.checkpoint_dir(workdir), timeout_s)
          return True
        time.sleep(poll_s)
  except Stopped as stop:
    logging.warning('Stopped by %s; rerun the same command to continue: finished evaluations '
                    'are kept, bits/dim and samples resume where they were.', stop.signal_name)
    return False
  finally:
    if follower.writer:
      follower.writer.close()
