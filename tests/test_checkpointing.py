"""Checkpoints: what they hold, damaged ones, clear errors, and SIGTERM (preemption) end to end."""
import logging
import os
import pathlib
import re
import signal
import subprocess

import flax.serialization
import jax
import numpy as np
import pytest

from ddpm_jax import checkpointing, train_step
from ddpm_jax.errors import UserError
from tests.conftest import ROOT, checkpoint_steps, tiny_digits_config, tiny_train_command



def _small_state_dict(step: int) -> dict:
  """A TrainState's dict with a two-layer stand-in for the U-Net (nothing to compile)."""
  params = {'dense_0': {'kernel': np.full((2, 3), float(step), np.float32),
                        'bias': np.zeros(3, np.float32)},
            'dense_1': {'kernel': np.ones((3, 1), np.float32)}}
  state = train_step.TrainState(
      step=np.int32(step), params=params, ema_params=params,
      opt_state=train_step.make_optimizer(tiny_digits_config()).init(params),
      rng=np.asarray(jax.random.PRNGKey(0)))
  return flax.serialization.to_state_dict(state)


def _write_checkpoints(workdir, steps) -> None:
  manager = checkpointing.create_manager(workdir, tiny_digits_config().training)
  for step in steps:
    checkpointing.save(manager, step, _small_state_dict(step))
  manager.wait_until_finished()
  manager.close()


def _damage(step_dir: pathlib.Path, how: str) -> None:
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


# Orbax leaves an asyncio callback behind after TensorStore fails to read truncated files.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('how', ['garbled', 'truncated'])
def test_a_damaged_latest_checkpoint_falls_back_and_is_kept(tmp_path, caplog, how):
  _write_checkpoints(tmp_path, [1, 2])
  damaged = tmp_path / 'checkpoints' / '2'
  _damage(damaged, how)
  files_before = sorted(str(p.relative_to(damaged)) for p in damaged.rglob('*'))

  with caplog.at_level(logging.WARNING):
    assert int(checkpointing.restore_state_dict(str(tmp_path))['step']) == 1
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


def _main_command(workdir, num_train_steps: int) -> list[str]:
  return tiny_train_command(workdir, {'training.num_train_steps': num_train_steps,
                                      'optim.warmup_steps': 4})


def _environment() -> dict:
  return dict(os.environ, PYTHONPATH=ROOT)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_0_and_a_rerun_resumes(tmp_path):
  process = subprocess.Popen(_main_command(tmp_path, 10_000), cwd=ROOT, env=_environment(),
                             stderr=subprocess.PIPE, text=True)
  seen = []
  for line in process.stderr:  # wait for the first checkpoint
    seen.append(line)
    if 'Saving the checkpoint at step 4.' in line:
      break
  process.send_signal(signal.SIGTERM)
  seen.append(process.communicate(timeout=300)[1])
  log = ''.join(seen)
  assert process.returncode == 0, log[-3000:]
  preempted_at = int(re.search(r'Preempted: saved the checkpoint at step (\d+)', log).group(1))
  assert checkpoint_steps(tmp_path)[-1] == preempted_at > 4

  rerun = subprocess.run(_main_command(tmp_path, preempted_at + 2), cwd=ROOT, env=_environment(),
                         stderr=subprocess.PIPE, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'Resuming from the checkpoint at step {preempted_at}.' in rerun.stderr
  assert checkpoint_steps(tmp_path)[-1] == preempted_at + 2
