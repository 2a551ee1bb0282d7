"""Checkpoints: what they hold, damaged ones, clear errors, the workdir lock, and SIGTERM and
Ctrl-C (preemption) end to end."""
import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import flax.serialization
import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing, train_step, workdir_lock
from ddpm_jax.errors import UserError
from tests.conftest import ROOT, checkpoint_steps, signal_after_first_checkpoint, tiny_digits_config
from tests.conftest import tiny_train_command


def _small_state_dict(step: int) -> dict:
  """A TrainState's dict with a stand-in for the U-Net (nothing to compile); its 300x100 random
  layer is too large for OCDBT to inline, so its data goes to the per-process folder."""
  params = {'dense_0': {'kernel': np.full((2, 3), float(step), np.float32),
                        'bias': np.zeros(3, np.float32)},
            'dense_1': {'kernel': np.ones((3, 1), np.float32)},
            'dense_2': {'kernel': np.random.RandomState(step).randn(300, 100).astype(np.float32)}}
  state = train_step.TrainState(
      step=np.int32(step), params=params, ema_params=params,
      opt_state=train_step.make_optimizer(tiny_digits_config()).init(params),
      rng=np.asarray(jax.random.PRNGKey(0)))
  return flax.serialization.to_state_dict(state)


def _write_checkpoints(workdir, steps, state_dict_fn=_small_state_dict) -> None:
  """Saves `state_dict_fn(step)` for each step through Orbax (even one that is not finite)."""
  manager = checkpointing.create_manager(workdir, tiny_digits_config().training)
  for step in steps:
    manager.save(step, args=checkpointing.ocp.args.StandardSave(state_dict_fn(step)))
  manager.wait_until_finished()
  manager.close()


def _damage(step_dir: pathlib.Path, how: str) -> None:
  if how == 'no_process_folder':
    for folder in step_dir.rglob('ocdbt.process_0'):
      for path in sorted(folder.rglob('*'), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
      folder.rmdir()
    return
  for path in step_dir.rglob('*'):
    if path.is_file() and (how == 'garbled' or path.parent.name == 'd'):
      data = path.read_bytes()
      path.write_bytes(b'\x00garbage' if how == 'garbled' else data[:len(data) // 2])


def test_restore_state_dict_holds_the_whole_train_state(tmp_path):
  _write_checkpoints(tmp_path, [3])
  state = checkpointing.restore_state_dict(str(tmp_path))
  assert set(state) == {'step', 'params', 'ema_params', 'opt_state', 'rng'}
  assert int(state['step']) == 3
  np.testing.assert_array_equal(state['params']['dense_0']['kernel'], np.full((2, 3), 3.))
  assert isinstance(state['ema_params']['dense_1']['kernel'], np.ndarray)


def test_restore_ema_params_in_the_template_structure(tmp_path):
  _write_checkpoints(tmp_path, [1, 2])
  template = jax.tree.map(np.zeros_like, _small_state_dict(0)['params'])
  step, ema = checkpointing.restore_ema_params(str(tmp_path), template)
  assert step == 2 and jax.tree.structure(ema) == jax.tree.structure(template)
  np.testing.assert_array_equal(ema['dense_0']['kernel'], np.full((2, 3), 2.))
  assert checkpointing.restore_ema_params(str(tmp_path), template, step=1)[0] == 1


def test_no_checkpoint_is_one_clear_sentence(tmp_path):
  with pytest.raises(UserError) as error:
    checkpointing.restore_ema_params(str(tmp_path), {'w': np.zeros(2)})
  assert str(error.value) == (f'No checkpoint in {tmp_path}/checkpoints; train first with '
                              f'--mode=train --workdir={tmp_path}.')


def test_a_checkpoint_of_another_config_names_the_parameter(tmp_path):
  _write_checkpoints(tmp_path, [5])
  template = _small_state_dict(0)['params']
  template['dense_1']['kernel'] = np.ones((3, 2), np.float32)
  with pytest.raises(UserError, match=re.escape(
      'The checkpoint at step 5 was trained with a different config: dense_1/kernel has shape '
      '(3, 1) in the checkpoint but (3, 2) in this config.')):
    checkpointing.restore_ema_params(str(tmp_path), template)


# TensorStore reports reads that finish after Orbax gave up on a damaged step to Orbax's closed
# asyncio loop; checkpointing drops those tracebacks ("Event loop is closed"), nothing else.
@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('how', ['garbled', 'truncated', 'no_process_folder'])
def test_a_damaged_latest_checkpoint_falls_back_and_is_kept(tmp_path, caplog, how):
  _write_checkpoints(tmp_path, [1, 2])
  damaged = tmp_path / 'checkpoints' / '2'
  _damage(damaged, how)
  files_before = sorted(str(p.relative_to(damaged)) for p in damaged.rglob('*'))

  hook = sys.unraisablehook
  with caplog.at_level(logging.WARNING):
    assert int(checkpointing.restore_state_dict(str(tmp_path))['step']) == 1
  assert sys.unraisablehook is hook  # the quieting ends with the restore
  assert 'The checkpoint at step 2' in caplog.text and 'damaged' in caplog.text
  assert damaged.exists()  # reading never deletes

  manager = checkpointing.create_manager(str(tmp_path), tiny_digits_config().training)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                        _small_state_dict(0))
  step, _ = checkpointing.restore_for_training(manager, str(tmp_path), target)
  assert step == 1 and manager.all_steps() == [1]  # training may save step 2 again
  moved = tmp_path / 'checkpoints_damaged' / '2'
  assert sorted(str(p.relative_to(moved)) for p in moved.rglob('*')) == files_before
  manager.close()


def _with_nan(where: str, value=np.nan):
  """_small_state_dict with `value` in one entry of `where` ('opt_state' or 'ema_params')."""
  def state_dict_fn(step):
    state = _small_state_dict(step)
    arrays = state['opt_state']['1']['0']['mu'] if where == 'opt_state' else state['ema_params']
    arrays['dense_0']['kernel'] = np.array(arrays['dense_0']['kernel'])
    arrays['dense_0']['kernel'][1, 2] = value
    return state
  return state_dict_fn


@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_a_checkpoint_with_nan_or_inf_counts_as_damaged(tmp_path, caplog):
  _write_checkpoints(tmp_path, [1])
  _write_checkpoints(tmp_path, [2], _with_nan('opt_state'))  # Adam's mu, as flipped bytes do
  _write_checkpoints(tmp_path, [3], _with_nan('ema_params', np.inf))
  template = jax.tree.map(np.zeros_like, _small_state_dict(0)['params'])
  with caplog.at_level(logging.WARNING):
    assert checkpointing.restore_ema_params(str(tmp_path), template)[0] == 2  # its EMA is fine
  assert re.search(r'The checkpoint at step 3 .* is damaged \(NonFiniteError: '
                   r'ema_params/dense_0/kernel holds NaN or infinite values\); using step 2.',
                   caplog.text)
  with pytest.raises(UserError, match=r'The checkpoint at step 2 .* cannot be used \(NonFinite'
                                      r'Error: opt_state/1/0/mu/dense_0/kernel holds NaN'):
    checkpointing.restore_state_dict(str(tmp_path), step=2)
  assert int(checkpointing.restore_state_dict(str(tmp_path))['step']) == 1
  assert checkpoint_steps(tmp_path) == [1, 2, 3]  # reading never moves

  manager = checkpointing.create_manager(str(tmp_path), tiny_digits_config().training)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                        _small_state_dict(0))
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    step, state = checkpointing.restore_for_training(manager, str(tmp_path), target)
  manager.close()
  assert step == 1 and checkpoint_steps(tmp_path) == [1]
  assert sorted(p.name for p in (tmp_path / 'checkpoints_damaged').iterdir()) == ['2', '3']
  assert caplog.text.count('resumed from step 1.') == 2
  np.testing.assert_array_equal(state['params']['dense_0']['kernel'], np.full((2, 3), 1.))


def test_only_nan_checkpoints_are_one_sentence_and_nothing_is_moved(tmp_path):
  _write_checkpoints(tmp_path, [2], _with_nan('opt_state'))
  manager = checkpointing.create_manager(str(tmp_path), tiny_digits_config().training)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                        _small_state_dict(0))
  with pytest.raises(UserError, match=r'^No checkpoint in .* can be used \(step 2: '
                                      r'NonFiniteError: opt_state/1/0/mu/dense_0/kernel'):
    checkpointing.restore_for_training(manager, str(tmp_path), target)
  manager.close()
  assert checkpoint_steps(tmp_path) == [2]


def test_save_refuses_a_state_that_is_not_finite(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path), tiny_digits_config().training)
  with pytest.raises(checkpointing.NonFiniteError, match='ema_params/dense_0/kernel'):
    checkpointing.save(manager, 5, _with_nan('ema_params')(5))
  manager.close()
  assert checkpoint_steps(tmp_path) == []


def _lock_of(pid: int, host: str = socket.gethostname(), start=None, heartbeat=None) -> str:
  return json.dumps({'host': host, 'pid': pid, 'start': start,
                     'heartbeat': time.time() if heartbeat is None else heartbeat})


def test_the_workdir_lock_refuses_a_live_trainer_and_takes_over_dead_ones(tmp_path, caplog):
  lock = tmp_path / workdir_lock.LOCK
  lock.write_text(_lock_of(os.getpid(), start=workdir_lock._process_start_time(os.getpid())))
  with pytest.raises(UserError, match=re.escape(
      f'Another trainer (pid {os.getpid()} on {socket.gethostname()}) is using '
      f'--workdir={tmp_path}; wait for it to finish, stop it, or pass another --workdir.')):
    with workdir_lock.hold(str(tmp_path)):
      pass
  with pytest.raises(UserError, match='Another trainer'):  # another host, heartbeat fresh
    lock.write_text(_lock_of(1, host='elsewhere'))
    with workdir_lock.hold(str(tmp_path)):
      pass

  dead = subprocess.Popen(['true'])
  dead.wait()
  stale = [_lock_of(dead.pid), _lock_of(os.getpid(), start='0'),  # a reused pid is not it
           _lock_of(1, host='elsewhere', heartbeat=time.time() - workdir_lock.LOCK_STALE_S - 1),
           '{"host": "half written']
  for text in stale:
    lock.write_text(text)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      with workdir_lock.hold(str(tmp_path)):
        assert json.loads(lock.read_text())['pid'] == os.getpid()
    assert 'Taking over' in caplog.text
    assert ('no longer runs' if text[-1] == '}' else "not a trainer's lock") in caplog.text
    assert not lock.exists()  # released


def test_a_lock_file_that_is_json_but_not_a_lock_is_taken_over_with_one_warning(tmp_path,
                                                                                caplog):
  """Issue 21: valid JSON that no trainer writes was a KeyError or TypeError traceback."""
  lock = tmp_path / workdir_lock.LOCK
  host = socket.gethostname()
  for text in (json.dumps({'host': host}), '[1, 2]', json.dumps({'host': host, 'pid': 'x'}),
               json.dumps({'host': 'elsewhere', 'pid': 1, 'heartbeat': 'soon'}), 'null', '7',
               json.dumps({'host': host, 'pid': True}), json.dumps({'host': 3, 'pid': 1})):
    lock.write_text(text)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      with workdir_lock.hold(str(tmp_path)):
        assert json.loads(lock.read_text())['pid'] == os.getpid()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and 'is not a trainer\'s lock' in warnings[0], (text, warnings)
    assert not lock.exists()


def test_the_lock_holder_keeps_its_heartbeat_fresh(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, 'LOCK_HEARTBEAT_S', 0.05)
  with workdir_lock.hold(str(tmp_path)):
    first = json.loads((tmp_path / workdir_lock.LOCK).read_text())['heartbeat']
    time.sleep(0.5)
    assert json.loads((tmp_path / workdir_lock.LOCK).read_text())['heartbeat'] > first


def test_a_workdir_that_is_a_file_is_one_sentence(tmp_path):
  workdir = tmp_path / 'file'
  workdir.write_text('not a directory')
  for workdir_text in (str(workdir), str(workdir / 'below')):
    with pytest.raises(UserError, match=rf'^Cannot write to --workdir={re.escape(workdir_text)} '
                                        r'\((FileExistsError|NotADirectoryError): .*\); pass a '
                                        r'directory you can write to.$'):
      with workdir_lock.hold(workdir_text):
        pass
  assert workdir.read_text() == 'not a directory'


def test_a_read_only_workdir_is_one_sentence(tmp_path):
  """The trainer on a directory the kernel will not let it write: one sentence and status 1.

  Root writes through a mode of 0555 by CAP_DAC_OVERRIDE (and CI runs as root), so as root the
  command runs without that capability (setpriv drops it from the bounding set; util-linux is
  in every Debian image); the mode then binds as it does for any other user.
  """
  workdir = tmp_path / 'read_only'
  workdir.mkdir()
  workdir.chmod(0o555)
  without_override = ['setpriv', '--bounding-set=-dac_override'] if os.geteuid() == 0 else []
  try:
    result = subprocess.run(
        without_override + tiny_train_command(workdir, {'training.num_train_steps': 1}),
        cwd=ROOT, env=_environment(), capture_output=True, text=True, timeout=300)
  finally:
    workdir.chmod(0o755)
  assert result.returncode == 1, result.stderr[-3000:]
  *progress, last = result.stderr.splitlines()
  draft = re.escape(f"'{workdir / workdir_lock.LOCK}.") + r'\d+\.tmp\''
  assert re.fullmatch(rf'Cannot write to --workdir={re.escape(str(workdir))} \(PermissionError: '
                      rf'\[Errno 13\] Permission denied: {draft}\); pass a directory you can '
                      r'write to\.', last), result.stderr[-3000:]
  assert all(re.match(r'I\d{4} [\d:.]+ +\d+ main\.py:\d+\] ', line) for line in progress), progress
  assert not list(workdir.iterdir())


def _main_command(workdir, num_train_steps: int) -> list[str]:
  return tiny_train_command(workdir, {'training.num_train_steps': num_train_steps,
                                      'optim.warmup_steps': 4})


def _environment() -> dict:
  return dict(os.environ, PYTHONPATH=ROOT)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_75_and_a_rerun_resumes(tmp_path):
  status, log = signal_after_first_checkpoint(_main_command(tmp_path, 10_000), signal.SIGTERM)
  assert status == 75, log[-3000:]  # main.EXIT_PREEMPTED: a rerun resumes
  preempted_at = int(re.search(r'Stopped by SIGTERM: saved the checkpoint at step (\d+)',
                               log).group(1))
  assert checkpoint_steps(tmp_path)[-1] == preempted_at > 4

  rerun = subprocess.run(_main_command(tmp_path, preempted_at + 2), cwd=ROOT, env=_environment(),
                         stderr=subprocess.PIPE, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'Resuming from the checkpoint at step {preempted_at}.' in rerun.stderr
  assert checkpoint_steps(tmp_path)[-1] == preempted_at + 2
