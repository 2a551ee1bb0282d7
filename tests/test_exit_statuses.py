"""Exit statuses (issue 21): 1 a mistake, 70 a crash, 75 stopped with nothing lost.

The launch scripts' retry loop reads them (tests/test_launch.py): it stops on 1, reruns 70 up
to --max-restarts, and always reruns 75.
"""
import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from ddpm_jax import checkpointing, cli, errors
from ddpm_jax.errors import UserError
from tests.conftest import ROOT, checkpoint_steps, signal_when_collected, tiny_train_command

ENV = dict(os.environ, PYTHONPATH=ROOT)

TENSORSTORE_DISK_FULL = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "params.conv_in.kernel/0.0" in OCDBT database at local '
    'file "/mnt/w/checkpoints/8.orbax-checkpoint-tmp/default.orbax-checkpoint-tmp/ocdbt.'
    'process_0/": Failed writing: "/mnt/w/checkpoints/8.orbax-checkpoint-tmp/d/47": Failed to '
    "write 3837447 bytes to file 5: No space left on device [os_error_code='28']")


@pytest.mark.parametrize('error, status', [
    (UserError('Fix it.'), 1),
    (PermissionError(errno.EACCES, 'Permission denied', '/w/samples/x.npz'), 1),
    (OSError(errno.EROFS, 'Read-only file system', '/w/eval/1.json'), 1),
    (errors.Stopped('No space left on /dev/sda1 ...'), 75),
    (errors.Interrupted('Stopped by SIGTERM.'), 75),
    (KeyboardInterrupt(), 75),
    (OSError(errno.ENOSPC, 'No space left on device', '/tmp/x.npz'), 75),
    (TENSORSTORE_DISK_FULL, 75),
    (RuntimeError('unexpected'), 70),
    (KeyError('params'), 70),
])
def test_each_way_a_command_ends_has_its_status_and_one_sentence(error, status):
  got, sentence = cli.exit_status(error)
  assert got == status and sentence and '\n' not in sentence


def test_a_full_disk_names_the_device_the_safe_checkpoint_and_the_space_to_free(tmp_path):
  checkpoints = tmp_path / 'w' / 'checkpoints'
  (checkpoints / '4' / 'default').mkdir(parents=True)
  (checkpoints / '4' / 'default' / 'data').write_bytes(bytes(2_500_000))
  failed = checkpoints / '8.orbax-checkpoint-tmp' / 'd' / 'x'
  error = OSError(errno.ENOSPC, 'No space left on device', str(failed))
  device, mount = errors._mount_of(str(tmp_path))
  assert str(errors.disk_full(error)).startswith(
      f'No space left on {device} (mounted at {mount}, ')
  assert str(errors.disk_full(error)).endswith(
      f' free) while writing {failed}: the checkpoint at step 4 is safe; free at least 2.5 MB '
      f'there and rerun the same command to continue.')


def test_an_unexpected_crash_exits_70_with_the_traceback_then_one_sentence():
  """It exited 1, which the launch scripts read as a mistake and never retried."""
  crash = ('from ddpm_jax import cli\n'
           'def main(argv):\n'
           '  return {}["params"]\n'
           'cli.with_user_errors(main)([])\n')
  result = subprocess.run([sys.executable, '-c', crash], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 70, result.stderr
  assert 'Traceback (most recent call last):' in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "ddpm_jax crashed (KeyError: 'params'); this is a bug or a fault of the machine, not of "
      'the command: the launch scripts rerun it (exit status 70), and if it repeats, report the '
      'traceback above.')


def _mounted_tmpfs(path, size: str) -> bool:
  """Mounts a tmpfs of `size` at `path` (as root, where allowed); False where it cannot."""
  path.mkdir()
  if os.geteuid() != 0 or not shutil.which('mount'):
    return False
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                        capture_output=True, check=False).returncode == 0


@pytest.mark.slow
def test_a_full_disk_while_training_exits_75_with_one_sentence(tmp_path):
  """A 16 MB disk holds one 11 MB checkpoint of the tiny model but not a second: the save of
  step 8 fails. It printed 50 to 575 Orbax and asyncio tracebacks, no sentence, and exited 1.
  Then the disk grows and the same command finishes the run, cleaning up the unfinished save."""
  disk = tmp_path / 'disk'
  if not _mounted_tmpfs(disk, '16m'):
    pytest.skip('needs root and mount to make a small filesystem')
  try:
    command = tiny_train_command(disk / 'w', {'training.num_train_steps': 12})
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 75, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f'No space left on tmpfs (mounted at {disk}, '), last
    assert f'while writing {disk}/w/checkpoints/8.orbax-checkpoint-tmp' in last, last
    assert re.search(r': the checkpoint at step 4 is safe; free at least 1\d\.\d MB there '
                     r'and rerun the same command to continue\.$', last), last
    assert len(result.stderr.strip().splitlines()) < 20, result.stderr[-3000:]
    assert checkpoint_steps(disk / 'w') == [4]
    assert (disk / 'w' / 'checkpoints' / '8.orbax-checkpoint-tmp').exists()
    subprocess.run(['mount', '-o', 'remount,size=64m', 'tmpfs', str(disk)], check=True)
    rerun = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert 'Resuming from the checkpoint at step 4.' in rerun.stderr, rerun.stderr[-3000:]
    assert checkpoint_steps(disk / 'w')[-1] == 12
    assert not list((disk / 'w' / 'checkpoints').glob('*.orbax-checkpoint-tmp*'))
  finally:
    subprocess.run(['umount', str(disk)], check=False)


def test_asyncio_reports_of_abandoned_orbax_writes_are_not_printed():
  """A full disk fails every pending write; the writes Orbax abandoned are logged by asyncio as
  'Future exception was never retrieved' when collected, a traceback each, at any time before
  exit (once in a loaded CI run)."""
  def record(name, pathname, raised_in):
    try:
      exec(compile('raise ValueError("RESOURCE_EXHAUSTED: ... No space left on device")',
                   raised_in, 'exec'))
    except ValueError:
      return logging.LogRecord(name, logging.ERROR, pathname, 1771,
                               'Future exception was never retrieved', None, sys.exc_info())
  asyncio_py = os.path.join(os.path.dirname(logging.__file__), '..', 'asyncio', 'base_events.py')
  orbax_py = os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint', 'type_handlers.py')
  assert cli._is_orbax_thread_failure(record('asyncio', asyncio_py, orbax_py))
  assert cli._is_orbax_thread_failure(record('orbax', orbax_py, orbax_py))
  assert not cli._is_orbax_thread_failure(record('asyncio', asyncio_py, asyncio_py))
  assert not cli._is_orbax_thread_failure(logging.LogRecord(
      'asyncio', logging.ERROR, asyncio_py, 1, 'no traceback', None, None))


@pytest.mark.parametrize('signum, sentence', [
    (signal.SIGTERM, 'Stopped by SIGTERM; what was finished is kept'),
    (signal.SIGINT, 'Interrupted by Ctrl-C; what was finished is kept')])
def test_a_signal_whose_raise_a_callback_swallows_stops_the_command_at_the_next_chunk(
    monkeypatch, capsys, signum, sentence):
  reached = []

  def command(argv):
    del argv
    signal_when_collected(signum)
    reached.append('after the signal')
    errors.raise_if_interrupted()  # what each sample chunk and bits/dim batch does
    reached.append('the next chunk')

  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  monkeypatch.setattr(errors, '_PENDING', [])
  cli._quiet_unraisable_reports()
  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    with pytest.raises(SystemExit) as exited:
      cli.with_user_errors(command)(['command'])
  finally:
    for s, handler in handlers.items():
      signal.signal(s, handler)
  assert exited.value.code == 75 and reached == ['after the signal']
  assert capsys.readouterr().err.startswith(sentence)
  assert reported == []  # no traceback for the swallowed raise


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_sampling_exits_75_and_keeps_the_finished_chunks(trained_digits, tmp_path,
                                                                        signum):
  """SIGTERM killed sampling (status -15, a 'crash' to the launch scripts) and Ctrl-C exited
  130; both now say what is kept and exit 75, and the chunks drawn so far stay."""
  _, source = trained_digits
  workdir = tmp_path / 'w'
  shutil.copytree(source, workdir, ignore=shutil.ignore_patterns('eval', 'samples'))
  command = tiny_train_command(workdir, {'diffusion.num_timesteps': 40, 'seed': 3,
                                         'sampling.num_samples': 400,
                                         'sampling.batch_size': 8}, '--mode=sample')
  process = subprocess.Popen(command, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
  seen = []
  for line in process.stderr:
    seen.append(line)
    if 'chunk 2/50' in line:
      break
  process.send_signal(signum)
  seen.append(process.communicate(timeout=300)[1])
  log = ''.join(seen)
  assert process.returncode == 75, log[-3000:]
  assert 'Traceback' not in log, log[-3000:]
  name = 'SIGTERM' if signum == signal.SIGTERM else 'Ctrl-C'
  assert log.strip().splitlines()[-1].startswith(
      f'{"Stopped by" if name == "SIGTERM" else "Interrupted by"} {name}; what was finished is '
      f'kept'), log[-3000:]
  chunks = list((workdir / 'samples').glob('*_chunks_*/chunk_*.npz'))
  assert len(chunks) >= 2, log[-3000:]


@pytest.mark.slow
def test_sigterm_during_a_convert_leaves_nothing_partial_and_says_so(tmp_path):
  from tests.test_convert import _diffusers_folder
  _, _, folder = _diffusers_folder(tmp_path)
  workdir = tmp_path / 'workdir'
  command = [sys.executable, '-m', 'ddpm_jax.convert', '--config=configs/cifar10.py',
             '--config.model.ch=32', f'--workdir={workdir}', f'--from={folder}']
  process = subprocess.Popen(command, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
  seen = []
  for line in process.stderr:
    seen.append(line)
    if 'Importing' in line:
      break
  process.send_signal(signal.SIGTERM)
  seen.append(process.communicate(timeout=300)[1])
  log = ''.join(seen)
  last = log.strip().splitlines()[-1]
  checkpoints = sorted(os.listdir(workdir / 'checkpoints')) if (
      workdir / 'checkpoints').exists() else []
  if process.returncode == 75:  # stopped before the write
    assert last == (f'Stopped by SIGTERM before anything was written: {workdir} holds no '
                    f'checkpoint; rerun the same command to import {folder}.'), log[-3000:]
    assert checkpoints == []
  else:  # the write had begun (it was completed first, and a warning says so) or had ended
    assert process.returncode == 0, log[-3000:]
    assert checkpoints == ['0']
    assert int(checkpointing.restore_state_dict(str(workdir))['step']) == 0
  assert 'Traceback' not in log, log[-3000:]
