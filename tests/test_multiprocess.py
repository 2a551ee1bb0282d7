"""Two processes on this machine train together (gloo collectives): one checkpoint, preemption."""
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from ddpm_jax import checkpointing, parallel
from ddpm_jax.errors import UserError
from tests.conftest import ROOT, checkpoint_steps, tiny_train_command

ENV = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
           JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_two_processes(workdir, log_dir, **overrides) -> list[subprocess.Popen]:
  """`python -m ddpm_jax.main` as processes 0 and 1 of a job; stderr in log_dir/<i>.log."""
  port = _free_port()
  processes = []
  for i in range(2):
    command = tiny_train_command(
        workdir, {'optim.warmup_steps': 2, **overrides},
        f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}')
    with open(log_dir / f'{i}.log', 'w') as log:
      processes.append(subprocess.Popen(command, cwd=ROOT, env=ENV, stderr=log))
  return processes


def _wait(processes, log_dir, status: int = 0) -> list[str]:
  """The processes' logs once both have exited (each must exit with `status`)."""
  try:
    for p in processes:
      p.wait(timeout=600)
  finally:
    for p in processes:
      p.kill()
  logs = [(log_dir / f'{i}.log').read_text() for i in range(2)]
  for p, log in zip(processes, logs):
    assert p.returncode == status, log[-3000:]
  return logs


@pytest.mark.slow
def test_two_processes_train_together_and_write_one_checkpoint(tmp_path):
  workdir = tmp_path / 'workdir'
  logs = _wait(_start_two_processes(workdir, tmp_path, **{
      'training.num_train_steps': 4, 'training.sample_every': 4,
      'training.num_grid_samples': 6}), tmp_path)
  assert 'JAX process 0 of 2, 2 local and 4 global devices.' in logs[0]
  assert 'JAX process 1 of 2, 2 local and 4 global devices.' in logs[1]
  assert checkpoint_steps(workdir) == [4]
  assert int(checkpointing.restore_state_dict(str(workdir))['step']) == 4
  events = list(workdir.glob('events.out.tfevents.*'))
  assert len(events) == 1  # only process 0 writes summaries
  assert b'samples' in events[0].read_bytes()  # the sample grid, drawn on all 4 devices


@pytest.mark.slow
def test_sigterm_to_both_processes_saves_one_step_and_exits_75(tmp_path):
  workdir = tmp_path / 'workdir'
  processes = _start_two_processes(workdir, tmp_path, **{'training.num_train_steps': 10_000})
  deadline = time.time() + 600
  while 'Saving the checkpoint at step 4.' not in (tmp_path / '0.log').read_text():
    assert time.time() < deadline and processes[0].poll() is None, 'no checkpoint at step 4'
    time.sleep(1)
  for p in processes:  # as a TPU pod's hosts get it: JAX's preemption service picks the step
    p.send_signal(signal.SIGTERM)
  logs = _wait(processes, tmp_path, status=75)  # main.EXIT_PREEMPTED: a rerun resumes
  saved = [int(re.search(r'Stopped by SIGTERM: saved the checkpoint at step (\d+)', log).group(1))
           for log in logs]
  assert saved[0] == saved[1] == checkpoint_steps(workdir)[-1] > 4


@pytest.mark.slow
def test_processes_started_with_other_settings_stop_with_one_sentence(tmp_path):
  """Issue 21: the second process with another learning rate and seed trained apart (both
  exited 0, their 'replicated' parameters diverging); now each process names the first
  difference before anything runs, and exits 1."""
  port = _free_port()
  processes = []
  for i, extra in enumerate([(), ('--config.optim.learning_rate=0.01', '--config.seed=7')]):
    command = tiny_train_command(tmp_path / 'workdir', {}, f'--coordinator_address=127.0.0.1:'
                                 f'{port}', '--num_processes=2', f'--process_id={i}', *extra)
    with open(tmp_path / f'{i}.log', 'w') as log:
      processes.append(subprocess.Popen(command, cwd=ROOT, env=ENV, stderr=log))
  logs = _wait(processes, tmp_path, status=1)
  for log in logs:
    assert 'Traceback' not in log, log[-3000:]
    assert log.strip().splitlines()[-1] == (
        'Process 1 was started with --config.optim.learning_rate=0.01 but process 0 with '
        '--config.optim.learning_rate=0.001; start every process with the same --config file, '
        '--config.* overrides, --mode and --workdir.')
  assert not (tmp_path / 'workdir' / 'checkpoints').exists()


def _start_alone(tmp_path, process_id: int, port: int) -> subprocess.Popen:
  """One process of a 2-process job whose other process never starts; a 3 s timeout."""
  command = tiny_train_command(tmp_path / f'workdir_{process_id}', {},
                               f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                               f'--process_id={process_id}', '--coordinator_timeout=3')
  return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_a_missing_coordinator_or_peer_exits_1_with_a_sentence_within_the_timeout(tmp_path):
  """Process 1 with nothing at the address; process 0 whose peer never comes; process 0 on a
  port that is taken (all three at once)."""
  start = time.time()
  with socket.socket() as taken:
    taken.bind(('0.0.0.0', 0))
    taken.listen()
    processes = [_start_alone(tmp_path, 1, _free_port()), _start_alone(tmp_path, 0, _free_port()),
                 _start_alone(tmp_path, 0, taken.getsockname()[1])]
    outputs = [p.communicate(timeout=120) for p in processes]
  assert time.time() - start < 90  # JAX alone waits 300 s, then aborts with status 134
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 1, stderr[-2000:]
    assert 'Traceback' not in stderr and 'Check failure' not in stderr, stderr[-2000:]
  unreachable_err, lonely_err, busy_err = (stderr for _, stderr in outputs)
  address = re.search(r'127\.0\.0\.1:\d+', unreachable_err).group(0)
  assert unreachable_err.strip().splitlines()[-1] == (
      f'Nothing answered at the coordinator address {address} within 3 s; start process 0 '
      '(--process_id=0) on that host, and check the host, the port and that the firewall lets '
      'this machine reach it.')
  assert 'Process 0 of 2: waiting up to 3 s for the other 1 process(es) to join' in lonely_err
  assert lonely_err.strip().splitlines()[-1].startswith(
      'Not all 2 processes joined the coordinator at 127.0.0.1:')
  assert busy_err.strip().splitlines()[-1].endswith(
      'check that its port is free on this host (process 0 serves it).')


@pytest.mark.parametrize('flags, sentence', [
    ({'num_processes': 2, 'process_id': 1},
     '--num_processes=2 and --process_id=1 need --coordinator_address=HOST:PORT'),
    ({'process_id': 0}, '^--process_id=0 needs --coordinator_address'),
    ({'num_processes': 4}, '^--num_processes=4 needs --coordinator_address'),
    ({'coordinator_address': '127.0.0.1:1234', 'num_processes': 2, 'process_id': 2},
     r'--process_id=2 is not in 0\.\.1 for --num_processes=2;'),
    ({'coordinator_address': '127.0.0.1:1234', 'num_processes': 2, 'process_id': -1},
     r'--process_id=-1 is not in 0\.\.1'),
    ({'coordinator_address': '127.0.0.1:1234', 'process_id': 0}, '--num_processes=0: with'),
    ({'coordinator_address': '127.0.0.1', 'num_processes': 2, 'process_id': 0},
     '--coordinator_address=127.0.0.1 is not HOST:PORT'),
    ({'coordinator_address': 'host:99999', 'num_processes': 2, 'process_id': 0},
     '--coordinator_address=host:99999 is not HOST:PORT'),
    ({'coordinator_address': '127.0.0.1:1234', 'num_processes': 2, 'process_id': 0,
      'timeout_s': 0}, '--coordinator_timeout=0 must be at least 1'),
])
def test_inconsistent_process_flags_are_one_sentence_before_anything_starts(flags, sentence):
  with pytest.raises(UserError, match=sentence):
    parallel.initialize(**flags)
