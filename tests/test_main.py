"""The command line end to end: one sentence and status 1 for mistakes, 75 after Ctrl-C."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from ddpm_jax import workdir_lock
from tests.conftest import ROOT, checkpoint_steps, signal_after_first_checkpoint, tiny_train_command


def _run(command, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                        capture_output=True, text=True, timeout=300, **kwargs)


def _assert_one_sentence(result, expected: str) -> None:
  """Status 1; stderr: the sentence, after this package's INFO lines (if it got that far)."""
  assert result.returncode == 1, result.stderr[-3000:]
  *progress, last = result.stderr.splitlines()
  assert last == expected
  assert all(re.match(r'I\d{4} [\d:.]+ +\d+ main\.py:\d+\] ', line) for line in progress), progress


@pytest.mark.parametrize('overrides, expected', [
    ({'training.ema_decay': 1.5},
     'training.ema_decay=1.5 is not allowed: use a number in [0, 1).'),
    ({'training.keep': 0}, 'training.keep=0 is not allowed: use an integer >= 1.'),
])
def test_a_bad_setting_is_refused_before_anything_starts(tmp_path, overrides, expected):
  _assert_one_sentence(_run(tiny_train_command(tmp_path / 'w', overrides)), expected)
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('body, expected', [
    ('def get_config(:\n', 'SyntaxError: invalid syntax (broken.py, line 1)'),
    ('def get_config():\n  raise RuntimeError("no such dataset")\n',
     ', line 2: RuntimeError: no such dataset'),
])
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, body, expected):
  config = tmp_path / 'broken.py'
  config.write_text(body)
  result = _run([sys.executable, '-m', 'ddpm_jax.main', f'--config={config}',
                 f'--workdir={tmp_path}/w'])
  assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr[-3000:]
  assert result.stderr.startswith(f'Cannot load the --config file {config}')
  assert expected in result.stderr


def test_a_workdir_that_is_a_file_is_one_sentence(tmp_path):
  workdir = tmp_path / 'file'
  workdir.write_text('kept')
  result = _run(tiny_train_command(workdir, {}))
  message = result.stderr.splitlines()[-1]
  assert re.fullmatch(rf'Cannot write to --workdir={workdir} \(FileExistsError: .*\); pass a '
                      r'directory you can write to.', message)
  _assert_one_sentence(result, message)
  assert workdir.read_text() == 'kept'


def test_a_second_trainer_on_a_workdir_refuses(tmp_path):
  """The lock of a live trainer (this test's process) stops a second one, whatever its seed."""
  workdir = tmp_path / 'w'
  workdir.mkdir()
  lock = workdir / workdir_lock.LOCK
  lock.write_text(json.dumps(workdir_lock._this_process()))
  result = _run(tiny_train_command(workdir, {'seed': 1}))
  holder = json.loads(lock.read_text())
  _assert_one_sentence(result, f'Another trainer (pid {os.getpid()} on {holder["host"]}) is using '
                               f'--workdir={workdir}; wait for it to finish, stop it, or pass '
                               f'another --workdir.')
  assert sorted(p.name for p in workdir.iterdir()) == [workdir_lock.LOCK]


@pytest.mark.slow
def test_ctrl_c_saves_exits_75_quietly_and_leaves_no_temporary_checkpoint(tmp_path):
  status, log = signal_after_first_checkpoint(
      tiny_train_command(tmp_path, {'training.num_train_steps': 10_000}), signal.SIGINT)
  assert status == 75, log[-3000:]
  stopped_at = int(re.search(r'Stopped by SIGINT: saved the checkpoint at step (\d+); rerun the '
                             r'same command to resume.', log).group(1))
  assert checkpoint_steps(tmp_path)[-1] == stopped_at > 4
  assert not list(tmp_path.rglob('*.orbax-checkpoint-tmp*'))
  assert not (tmp_path / workdir_lock.LOCK).exists()
  assert 'Traceback' not in log and 'Interrupted' not in log
  # The quiet console: this package's lines (one per log step) and no library's INFO.
  lines = log.splitlines()
  assert all(re.match(r'[IWE]\d{4} [\d:.]+ +\d+ (main|train|checkpointing)\.py:\d+\] ', line)
             for line in lines), log[-3000:]
  assert len([line for line in lines if re.search(r'\] \[\d+/10000\] loss=', line)]) >= 2
