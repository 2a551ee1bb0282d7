"""Orbax checkpoints in `WORKDIR/checkpoints/<step>/`, and damaged-checkpoint handling.

A checkpoint holds the train state as a nested dict (`flax.serialization.to_state_dict` of
`train_step.TrainState`): `step`, `params`, `ema_params`, `opt_state`, `rng`. Saves are asynchronous
and atomic (Orbax writes a temporary directory and commits it), so a crash or a failed run never
overwrites a checkpoint. A checkpoint that cannot be read is skipped for the previous one with a
warning; training moves it to `WORKDIR/checkpoints_damaged/<step>/` so that it can be inspected
and the run can save that step again. A checkpoint holding a NaN or an infinity counts as
damaged, and none is ever written (`save` refuses). Each checkpoint also records the settings
it was trained as (`checkpoint_settings`), and resuming, sampling and evaluating refuse a config
that differs where it matters, before reading any array. Workdirs may be local or any
`etils.epath` path (`gs://`).
"""
import contextlib
import gc
import os
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Optional

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from ddpm_jax import checkpoint_settings, errors
from ddpm_jax.errors import UserError

PyTree = Any
CHECKPOINTS = 'checkpoints'
DAMAGED_CHECKPOINTS = 'checkpoints_damaged'


class NonFiniteError(ValueError):
  """A state holds a NaN or an infinity; `name` is the first such array ('opt_state/1/0/mu/...')."""

  def __init__(self, name: str):
    super().__init__(f'{name} holds NaN or infinite values')
    self.name = name


def checkpoint_dir(workdir) -> epath.Path:
  """WORKDIR/checkpoints, absolute; a UserError for a filesystem Orbax cannot write to.

  Orbax writes arrays through TensorStore, which takes absolute local paths and gs:// only.
  """
  text = os.fspath(workdir)
  scheme = text.split('://')[0] if '://' in text else ''
  if scheme not in ('', 'gs'):
    raise UserError(f'Checkpoints cannot be written to {text}: use a local directory or '
                    f'gs://BUCKET/PATH as --workdir.')
  path = epath.Path(text)
  return (path / CHECKPOINTS) if scheme else (path.resolve() / CHECKPOINTS)




def unfinished_saves(workdir) -> list[epath.Path]:
  """The partial checkpoints in WORKDIR/checkpoints that a killed save or import left (Orbax's
  `<step>.orbax-checkpoint-tmp-<time>` folders: never read as checkpoints)."""
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    return []
  return sorted(p for p in directory.iterdir() if _TMP_SUFFIX in p.name)


_TMP_SUFFIX = '.orbax-checkpoint-tmp'


class _Manager(ocp.CheckpointManager):
  """A CheckpointManager that knows the config its saves are trained as (or None)."""
  config = None
  written_by = 'train'


def create_manager(workdir, training_config, *, trained_as=None,
                   written_by: str = 'train') -> ocp.CheckpointManager:
  """The training run's manager: the `keep` latest plus every `keep_every`-th step (0: none).

  `trained_as`: the config its checkpoints are trained as; `save` records its settings and
  `restore_for_training` refuses a checkpoint trained otherwise (`checkpoint_settings`).
  A workdir that is a file, or cannot be written, is a UserError.
  """
  policies = [ocp.checkpoint_managers.LatestN(training_config.keep)]
  if training_config.keep_every > 0:
    policies.append(ocp.checkpoint_managers.EveryNSteps(training_config.keep_every))
  options = ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=True,
      cleanup_tmp_directories=True,  # saves that never committed (a crash mid-save)
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
  directory = checkpoint_dir(workdir)
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise errors.unwritable_workdir(workdir, error) from None
  manager = _Manager(directory, options=options, item_handlers=ocp.StandardCheckpointHandler())
  manager.config, manager.written_by = trained_as, written_by
  return manager


def _reader(workdir) -> ocp.CheckpointManager:
  """A manager for reading (sampling, evaluation): arrays come back as numpy."""
  return ocp.CheckpointManager(checkpoint_dir(workdir),
                               options=ocp.CheckpointManagerOptions(create=False),
                               item_handlers=ocp.PyTreeCheckpointHandler())


def _local_copy(x):
  """A replicated array's value from this process's first device (no collective, no compile)."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def _path_name(path) -> str:
  return '/'.join(str(getattr(key, 'key', getattr(key, 'idx', key))) for key in path)


def _check_finite(tree: PyTree) -> None:
  """A NonFiniteError naming the first array of `tree` (numpy or replicated) with a NaN or inf."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    value = _local_copy(leaf)
    if np.issubdtype(value.dtype, np.inexact) and not np.isfinite(value).all():
      raise NonFiniteError(_path_name(path))


def save(manager: ocp.CheckpointManager, step: int, state_dict: PyTree) -> None:
  """Starts an asynchronous save of the replicated `state_dict` as step `step`.

  The arrays are copied to host memory first: Orbax then writes them once, from process 0,
  without compiling a copy for every array shape (which costs minutes on a CPU mesh). A state
  with a NaN or an infinity anywhere is not saved: a NonFiniteError names the array.
  """
  host_state_dict = jax.tree.map(_local_copy, state_dict)
  _check_finite(host_state_dict)
  config = getattr(manager, 'config', None)
  custom = (None if config is None
            else checkpoint_settings.metadata(config, getattr(manager, 'written_by', 'train')))
  manager.save(step, args=ocp.args.StandardSave(host_state_dict), force=True,
               custom_metadata=custom)


def _shapes_by_name(tree: PyTree) -> dict[str, tuple[int, ...]]:
  return {_path_name(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_shapes(step: int, stored: PyTree, expected: PyTree) -> None:
  """UserError naming the first parameter whose shape (or presence) differs from the config's."""
  stored_shapes, expected_shapes = _shapes_by_name(stored), _shapes_by_name(expected)
  prefix = f'The checkpoint at step {step} was trained with a different config: '
  for name, shape in expected_shapes.items():
    if name not in stored_shapes:
      raise UserError(prefix + f'{name} is in this config\'s model but not in the checkpoint.')
    if stored_shapes[name] != shape:
      raise UserError(prefix + f'{name} has shape {stored_shapes[name]} in the checkpoint but '
                      f'{shape} in this config.')
  extra = sorted(stored_shapes.keys() - expected_shapes.keys())
  if extra:
    raise UserError(prefix + f'{extra[0]} is in the checkpoint but not in this config\'s model.')


def _check_settings(manager, step: int, config, purpose: str) -> None:
  """`checkpoint_settings.check` of step `step` against `config` (nothing if config is None)."""
  if config is not None:
    checkpoint_settings.check(manager.metadata(step).custom_metadata, config, purpose,
                              step=step, where=str(manager.directory))


def _restore_step(manager, step: int, args_fn: Callable[[PyTree], ocp.args.CheckpointArgs],
                  check: Callable[[int, PyTree], None]) -> PyTree:
  """Reads step `step`: its metadata, `check(step, metadata)`, then `args_fn(metadata)`.

  What was read must be finite (else a NonFiniteError: the step is damaged).
  """
  metadata = manager.item_metadata(step).tree
  check(step, metadata)
  tree = manager.restore(step, args=args_fn(metadata))
  _check_finite(tree)
  return tree


def _is_abandoned_read(unraisable) -> bool:
  """An 'Event loop is closed' report of TensorStore, or a never-awaited coroutine of Orbax's."""
  code = getattr(unraisable.object, 'cr_code', None)
  return ((code is not None and errors.in_orbax(code.co_filename))
          or errors.is_closed_loop_report(unraisable))


@contextlib.contextmanager
def quiet_abandoned_reads() -> Iterator[None]:
  """While checkpoints are read (a damaged one and the fallback after it), Python prints no
  traceback for the reads Orbax abandoned; the previous `sys.unraisablehook` is back on exit.
  The follower holds it while it follows (a checkpoint deleted while it is read).

  orbax-checkpoint 0.12.8 (the pinned range, <0.13): when one array of a checkpoint fails to read,
  `manager.restore` raises at once and closes its asyncio loop without cancelling the other
  reads; each then reports to the closed loop as TensorStore finishes it (during the fallback's
  read), and each pending coroutine warns when collected: dozens of tracebacks for one damaged
  file. Remove this when `test_a_damaged_latest_checkpoint_falls_back_and_is_kept` passes
  without it.
  """
  previous = sys.unraisablehook
  sys.unraisablehook = lambda u: None if _is_abandoned_read(u) else previous(u)
  try:
    yield
  finally:
    with warnings.catch_warnings():  # collected now, not inside a later `compile` (which can
      warnings.filterwarnings('ignore', "coroutine '.*' was never awaited", RuntimeWarning)
      gc.collect()  # crash Python 3.11); the errors of the failed reads must be dropped by then
    sys.unraisablehook = previous


def _restore_newest_readable(manager, args_fn, check) -> tuple[int, PyTree, list]:
  """(step, tree, [(newer step, its error in one line)]) from the newest checkpoint that reads.

  A step counts as damaged only when an older one reads: if none does, the cause is more
  likely the storage or the code than the files, and this raises a UserError naming the error.
  """
  unreadable = []  # (step, its error in one line): no traceback keeps Orbax's reads alive
  with quiet_abandoned_reads():
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        return step, _restore_step(manager, step, args_fn, check), unreadable
      except UserError:
        raise
      except Exception as error:  # pylint: disable=broad-except  (any failure to read)
        unreadable.append((step, errors.one_line(error)))
  step, reason = unreadable[0]
  raise UserError(f'No checkpoint in {manager.directory} can be used (step {step}: '
                  f'{reason}); check that its files are intact and readable, or move '
                  f'the directory away to start afresh.')


def _move_aside(workdir, step: int) -> epath.Path:
  """Moves a damaged step out of the checkpoint directory, keeping its files; returns where."""
  damaged_root = epath.Path(workdir) / DAMAGED_CHECKPOINTS
  destination = damaged_root / str(step)
  if destination.exists():
    destination = damaged_root / f'{step}_{int(time.time())}'
  if jax.process_index() == 0:
    damaged_root.mkdir(parents=True, exist_ok=True)
    (checkpoint_dir(workdir) / str(step)).rename(destination)
  return destination


def restore_for_training(manager: ocp.CheckpointManager, workdir,
                         abstract_state_dict: PyTree) -> Optional[tuple[int, PyTree]]:
  """(step, state_dict) of the newest readable checkpoint, sharded as the target; None if none.

  `abstract_state_dict` holds `jax.ShapeDtypeStruct`s (with shardings). A checkpoint trained
  as another config (`create_manager(trained_as=)`, `checkpoint_settings`) or with other
  parameter shapes is a UserError. Damaged newer steps are moved to
  `WORKDIR/checkpoints_damaged/` with a warning, so that training can save those steps again.
  """
  if not manager.all_steps():
    return None
  def check(step, stored):
    _check_settings(manager, step, getattr(manager, 'config', None),
                    checkpoint_settings.RESUME)
    _check_shapes(step, stored['params'], abstract_state_dict['params'])

  step, state_dict, unreadable = _restore_newest_readable(
      manager, lambda _: ocp.args.StandardRestore(abstract_state_dict), check)
  for bad_step, reason in unreadable:
    logging.warning('The checkpoint at step %d is damaged (%s); moved it to %s and resumed from '
                    'step %d.', bad_step, reason, _move_aside(workdir, bad_step), step)
  if unreadable:
    ocp.multihost.get_barrier_sync_fn()(key='ddpm_jax_moved_damaged', timeout_ms=600_000)
    manager.reload()
  return step, state_dict


def _host_restore(metadata: PyTree, *, partial: bool = False) -> ocp.args.PyTreeRestore:
  """Reads the arrays of `metadata` (a subtree if `partial`) as numpy, whatever the devices."""
  item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  return ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=partial)


def _restore_read_only(workdir, step: Optional[int], args_fn, check,
                       config=None) -> tuple[int, PyTree]:
  """(step, tree) of step `step`, or of the newest readable step if None; nothing is moved.

  With `config`, a checkpoint trained as another config is a UserError (`checkpoint_settings`).
  """
  with _reader(workdir) as manager:
    def check_all(step, metadata):
      _check_settings(manager, step, config, checkpoint_settings.USE)
      check(step, metadata)

    steps = manager.all_steps()
    if not steps:
      leftovers = unfinished_saves(workdir)
      if leftovers:
        raise UserError(f'No checkpoint in {checkpoint_dir(workdir)}: {leftovers[-1]} is a '
                        f'save that never completed (the run that wrote it was killed); rerun '
                        f'that training or import, which removes it.')
      raise UserError(f'No checkpoint in {checkpoint_dir(workdir)}; train first with '
                      f'--mode=train --workdir={workdir}.')
    if step is None:
      found, tree, unreadable = _restore_newest_readable(manager, args_fn, check_all)
      for bad_step, reason in unreadable:
        logging.warning('The checkpoint at step %d in %s is damaged (%s); using step %d.',
                        bad_step, checkpoint_dir(workdir), reason, found)
      return found, tree
    if step not in steps:
      raise UserError(f'No checkpoint at step {step} in {checkpoint_dir(workdir)}; the steps there '
                      f'are {", ".join(map(str, steps))}.')
    with quiet_abandoned_reads():
      try:
        return step, _restore_step(manager, step, args_fn, check_all)
      except UserError:
        raise
      except Exception as error:  # pylint: disable=broad-except  (any failure to read)
        reason = errors.one_line(error)
    raise UserError(f'The checkpoint at step {step} in {checkpoint_dir(workdir)} cannot be used '
                    f'({reason}); choose another step.')


def restore_state_dict(workdir, step: Optional[int] = None) -> dict:
  """A checkpoint's train state as numpy arrays: step, params, ema_params, opt_state, rng.

  `step=None` reads the newest readable checkpoint.
  """
  return _restore_read_only(workdir, step, _host_restore, lambda *_: None)[1]


def restore_ema_params(workdir, params_template: PyTree, step: Optional[int] = None, *,
                       config=None) -> tuple[int, PyTree]:
  """(step, the EMA parameters as numpy arrays, structured as `params_template`).

  Reads only the EMA parameters. A UserError when there is no checkpoint, when it was trained
  as a config that differs from `config` where sampling and evaluation cannot ignore it
  (`checkpoint_settings`), or when its shapes differ from the template's.
  """
  found, tree = _restore_read_only(
      workdir, step,
      lambda metadata: _host_restore({'ema_params': metadata['ema_params']}, partial=True),
      lambda step, stored: _check_shapes(step, stored['ema_params'], params_template),
      config=config)
  return found, flax.serialization.from_state_dict(params_template, tree['ema_params'])


def trained_as(workdir, step: int) -> tuple[Optional[dict], str]:
  """(the settings the checkpoint at `step` records, or None; who wrote it: 'train',
  'convert', or '' when it records nothing). See `checkpoint_settings`."""
  with _reader(workdir) as manager:
    custom = manager.metadata(step).custom_metadata or {}
  entry = custom.get(checkpoint_settings.METADATA_KEY) or {}
  return checkpoint_settings.recorded(custom), entry.get('by', '')
