"""The training loop (the paper's Algorithm 1 over many steps), around `train_step.py`'s step.

`train_and_evaluate` is the loop of the Flax imagenet example: restore or initialise, step, log,
sample, checkpoint, stop cleanly on preemption or divergence, and with `training.eval_every`
evaluate saved checkpoints in between (`evaluation.evaluate`, as --mode=eval does). The train
state and the pure, jitted train step live in `train_step.py`.
"""
import contextlib
import functools
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from jax.sharding import Mesh

from ddpm_jax import checkpointing, config_validation, evaluation, follower, images
from ddpm_jax import input_pipeline, parallel, sampling, seeds, workdir_lock
from ddpm_jax.errors import UserError
from ddpm_jax.train_step import TrainState, create_train_state, jit_train_step

PyTree = Any
TrainIteratorFn = Callable[..., Iterator[dict]]  # (config, *, start_step) -> local batches


def _abstract_train_state(config, mesh: Mesh) -> TrainState:
  abstract = jax.eval_shape(functools.partial(create_train_state, config),
                            jax.random.PRNGKey(config.seed))
  replicated = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      abstract)


def _replicate_host_values(mesh: Mesh, tree: PyTree) -> PyTree:
  """Global replicated arrays from values every process holds alike (no collective)."""
  replicated = parallel.replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x)), tree)


def restore_or_create_train_state(config, workdir, mesh: Mesh, manager) -> TrainState:
  """The newest readable checkpoint's state, or a fresh one from `config.seed`."""
  abstract = _abstract_train_state(config, mesh)
  restored = checkpointing.restore_for_training(manager, workdir,
                                                flax.serialization.to_state_dict(abstract))
  if restored is None:
    logging.info('No checkpoint in %s; starting from scratch.',
                 checkpointing.checkpoint_dir(workdir))
    # Initialised on one device, then replicated: one program whatever the mesh.
    state = jax.jit(functools.partial(create_train_state, config))(jax.random.PRNGKey(config.seed))
    return _replicate_host_values(mesh, state)
  step, state_dict = restored
  logging.info('Resuming from the checkpoint at step %d.', step)
  return flax.serialization.from_state_dict(abstract, state_dict)


def _divergence_error(what: str, step: int, last_good_step: Optional[int]) -> UserError:
  kept = ('no checkpoint was written' if last_good_step is None
          else f'the last good checkpoint (step {last_good_step}) is kept')
  return UserError(f'Training diverged: {what} at step {step}; {kept}; lower '
                   f'optim.learning_rate or raise optim.warmup_steps and rerun.')


def _raise_if_diverged(history: list[tuple[int, dict]], last_good_step: Optional[int]) -> None:
  """UserError at the first step whose loss or gradient norm is NaN or infinite."""
  for step, metrics in jax.device_get(history):
    if not (np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])):
      raise _divergence_error(f'the loss is {metrics["loss"]} and the gradient norm '
                              f'{metrics["grad_norm"]}', step, last_good_step)


def train_and_evaluate(config, workdir, *, mesh: Optional[Mesh] = None,
                       create_train_iterator: TrainIteratorFn = input_pipeline.create_train_iterator
                       ) -> TrainState:
  """Trains to `config.training.num_train_steps`, resuming from `workdir`; returns the state.

  A run stopped by preemption (SIGTERM) or Ctrl-C (SIGINT) saves its current step and returns
  early (the returned state's step is short of num_train_steps); rerunning with the same
  workdir resumes from it. The workdir is locked meanwhile (a second trainer refuses).
  `mesh` defaults to all devices; `create_train_iterator(config, start_step=s)` yields the local
  batches of steps s, s + 1, ... (the input pipeline by default).
  """
  config_validation.validate(config)
  mesh = mesh or parallel.make_mesh()
  parallel.check_divisible(config.training.batch_size, mesh)
  if config.training.eval_every:
    evaluation.check_can_evaluate(config, mesh)
  with workdir_lock.hold(workdir):  # checks that the workdir can be written first
    manager = checkpointing.create_manager(workdir, config.training, trained_as=config)
    input_pipeline.num_examples(config, 'train')  # then the data (cached), before the model
    writer = _create_writer(workdir)
    try:
      with watch_for_preemption(manager) as preempted:
        state = restore_or_create_train_state(config, workdir, mesh, manager)
        _warn_if_another_seed(config, state)
        logging.info('Training to step %d: checkpoints go to %s, TensorBoard metrics to %s.',
                     config.training.num_train_steps, checkpointing.checkpoint_dir(workdir),
                     workdir)
        return _train_loop(config, state, mesh, manager, writer, preempted,
                           create_train_iterator(config, start_step=int(state.step)), workdir)
    finally:
      manager.wait_until_finished()
      manager.close()
      writer.flush()


@contextlib.contextmanager
def watch_for_preemption(manager: ocp.CheckpointManager) -> Iterator[Callable[[int], str]]:
  """Yields `preempted(step) -> str`: '' while training goes on, the signal's name once the job
  should save and stop.

  One process: handlers of SIGTERM (preemption) and SIGINT (Ctrl-C), installed for the
  duration, note the signal; a second Ctrl-C interrupts at once (KeyboardInterrupt), without
  saving. Several processes: JAX's preemption service (it watches SIGTERM on every host) says
  'SIGTERM' at the same step on all of them, so they save together; Ctrl-C interrupts.
  """
  if jax.process_count() > 1:
    yield lambda step: 'SIGTERM' if manager.reached_preemption(step) else ''
    return
  if threading.current_thread() is not threading.main_thread():  # signals reach the main thread
    yield lambda step: ''
    return
  received = []

  def note(signum, frame):
    del frame
    received.append(signal.Signals(signum).name)
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)

  previous = {signum: signal.signal(signum, note) for signum in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield lambda step: received[0] if received else ''
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def _create_writer(workdir) -> metric_writers.MetricWriter:
  """TensorBoard summaries in the workdir, from process 0 (the console gets `_log`'s lines)."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(os.fspath(workdir)))


def _warn_if_another_seed(config, state: TrainState) -> None:
  """A resumed run continues the checkpoint's random stream, whatever config.seed says."""
  if int(state.step) == 0:
    return
  _, expected = jax.random.split(jax.random.PRNGKey(config.seed))
  if not np.array_equal(jax.device_get(state.rng.addressable_data(0)), np.asarray(expected)):
    logging.warning('The checkpoint at step %d was trained with another seed than config.seed='
                    '%d; training continues with the checkpoint\'s random numbers.',
                    int(state.step), config.seed)


def _compile_on_every_process(config, mesh: Mesh, state: TrainState, grid_rng):
  """(train step, sample-grid sampler or None), compiled ahead, then a barrier of all processes.

  CPU (gloo) collectives give up when processes reach their first one more than 30 s apart,
  as compiling at different speeds can make them; the barrier goes through the coordination
  service instead, which waits as long as it takes.
  """
  d = config.data
  batch = {'image': jax.ShapeDtypeStruct(
      (config.training.batch_size, d.image_size, d.image_size, d.channels), jnp.float32,
      sharding=parallel.data_sharding(mesh))}
  train_step_fn = jit_train_step(config, mesh).lower(state, batch).compile()
  sample_grid_fn = None
  if config.training.sample_every > 0:  # num_grid_samples, rounded up to fill every device
    num_samples = -(-config.training.num_grid_samples // mesh.size) * mesh.size
    sample_grid_fn = sampling.jit_sampler(config, mesh).lower(
        state.ema_params, grid_rng, num_samples).compile()
  ocp.multihost.get_barrier_sync_fn()(key=f'ddpm_jax_compiled_{int(state.step)}',
                                      timeout_ms=3_600_000)
  return train_step_fn, sample_grid_fn


def _evaluate_saved_step(config, workdir, mesh: Mesh, manager, step: int) -> str:
  """training.eval_every: evaluates the checkpoint of `step` as --mode=eval would (the same
  function, on this mesh; nothing of the train state changes). Returns '' when done, else the
  name of the signal (SIGTERM, SIGINT) that stopped it: the checkpoint is saved, and the rerun
  that resumes from it evaluates it again, continuing the bits/dim and sample files. The last
  step's evaluation is not stopped (a stopped run there would look finished): a signal is
  noted as during training, a second Ctrl-C interrupts."""
  manager.wait_until_finished()  # the evaluation reads the checkpoint written asynchronously
  stoppable = step < config.training.num_train_steps
  try:
    with follower.stopping_on_signals() if stoppable else contextlib.nullcontext():
      evaluation.evaluate(config, workdir, mesh=mesh, step=step)
  except follower.Stopped as stop:
    return stop.signal_name
  # Hosts finish their own work (the digits classifier) at different times; CPU (gloo)
  # collectives would give up at the next step if they were far apart.
  ocp.multihost.get_barrier_sync_fn()(key=f'ddpm_jax_evaluated_{step}', timeout_ms=3_600_000)
  return ''


def _evaluation_pending(config, workdir, step: int) -> bool:
  """Whether `step` is an eval_every step whose evaluation a stopped run did not finish."""
  every = config.training.eval_every
  return bool(step and _every(step, every) and not parallel.agree_with_process_0(
      np.array([evaluation.is_evaluated(config, workdir, step)]))[0])


def _train_loop(config, state, mesh, manager, writer, preempted, train_iter,
                workdir) -> TrainState:
  """Steps to num_train_steps; logs every log_every steps, saves every checkpoint_every (either
  0: only at the last step), evaluates every eval_every, stops early when `preempted(step)` names
  a signal."""
  tc = config.training
  if _evaluation_pending(config, workdir, int(state.step)):
    signal_name = _evaluate_saved_step(config, workdir, mesh, manager, int(state.step))
    if signal_name:
      logging.warning('Stopped by %s while evaluating step %d; rerun the same command to '
                      'resume.', signal_name, int(state.step))
      return state
  grid_rng = _replicate_host_values(  # the same x_T every time
      mesh, seeds.key(config.seed, seeds.TRAINING_GRID))
  p_train_step, sample_grid = _compile_on_every_process(config, mesh, state, grid_rng)
  last_good_step = int(state.step) or None  # restored checkpoints are checked finite
  history = []  # (step, metrics) not yet checked for divergence
  throughput = _Throughput(int(state.step), tc.num_train_steps)
  for step in range(int(state.step) + 1, tc.num_train_steps + 1):  # `step`: updates done
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      state, metrics = p_train_step(state, parallel.global_batch(mesh, next(train_iter)))
    history.append((step, metrics))
    last = step == tc.num_train_steps
    if last or _every(step, tc.log_every):
      _raise_if_diverged(history, last_good_step)
      _log(writer, step, [metrics for _, metrics in history], throughput)
      history = []
    if sample_grid is not None and step % tc.sample_every == 0:
      samples = parallel.to_host(sample_grid(state.ema_params, grid_rng))
      grid = images.image_grid(images.to_uint8(samples[:tc.num_grid_samples]))
      writer.write_images(step, {'samples': grid[None]})
    signal_name = preempted(step)
    if signal_name or last or _every(step, tc.checkpoint_every):
      _save_if_finite(manager, step, state, history, last_good_step)
      last_good_step = step
      if not tc.log_every:
        history = []  # checked; no log step will need them
      if not signal_name and _every(step, tc.eval_every):
        signal_name = _evaluate_saved_step(config, workdir, mesh, manager, step)
    if signal_name:
      logging.warning('Stopped by %s: saved the checkpoint at step %d; rerun the same command '
                      'to resume.', signal_name, step)
      break
  return state


def _every(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


class _Throughput:
  """Steps per second since the previous report, and the time the remaining steps need."""

  def __init__(self, step: int, num_train_steps: int):
    self._step, self._time = step, time.monotonic()
    self.num_train_steps = num_train_steps

  def report(self, step: int) -> tuple[float, float]:
    now = time.monotonic()
    steps_per_sec = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    return steps_per_sec, (self.num_train_steps - step) / steps_per_sec


def _format_seconds(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


def _log(writer, step: int, metrics: list[dict], throughput: _Throughput) -> None:
  """The mean metrics since the last log step, to TensorBoard and as one console line."""
  host_metrics = jax.device_get(metrics)
  names = sorted(host_metrics[0], key=lambda name: name != 'loss')  # the loss first
  means = {name: float(np.mean([m[name] for m in host_metrics])) for name in names}
  steps_per_sec, eta_seconds = throughput.report(step)
  writer.write_scalars(step, {**means, 'steps_per_sec': steps_per_sec})
  logging.info('[%d/%d] %s, %.1f steps/s, ETA %s', step, throughput.num_train_steps,
               ', '.join(f'{name}={value:.4g}' for name, value in means.items()), steps_per_sec,
               _format_seconds(eta_seconds))


def _save_if_finite(manager, step: int, state: TrainState, history,
                    last_good_step: Optional[int]) -> None:
  """Saves `state` unless a step since the last check diverged or it holds a NaN or an
  infinity (then a UserError naming the last good checkpoint)."""
  _raise_if_diverged(history, last_good_step)
  logging.info('Saving the checkpoint at step %d.', step)
  try:
    checkpointing.save(manager, step, flax.serialization.to_state_dict(state))
  except checkpointing.NonFiniteError as error:
    raise _divergence_error(str(error), step, last_good_step) from None
