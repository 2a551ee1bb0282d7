"""Two processes on this machine train together (gloo collectives): one checkpoint, preemption."""
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from ddpm_jax import checkpointing
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
