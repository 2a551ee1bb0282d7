"""Shared test setup: CPU only, 8 host devices, no network."""
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Compiling takes most of the tests' time on 2 CPU cores: keep the programs on disk, for this
# process and the subprocesses the tests start, so repeats reuse them.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'ddpm_jax_test_xla_cache'))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # so `configs.<name>` imports in tests

from ddpm_jax import xla_flags  # pylint: disable=wrong-import-position

xla_flags.apply()  # as the commands do, before JAX starts its backend


def tiny_train_command(workdir, overrides: dict, *flags: str) -> list[str]:
  """`python -m ddpm_jax.main --mode=train` on a tiny digits U-Net, with config `overrides`."""
  config = {'model.ch': 32, 'model.ch_mult': '(1,2)', 'model.num_res_blocks': 1,
            'diffusion.num_timesteps': 20, 'training.batch_size': 16,
            'training.log_every': 2, 'training.checkpoint_every': 4, **overrides}
  return [sys.executable, '-m', 'ddpm_jax.main', '--config=configs/digits.py',
          f'--workdir={workdir}', '--mode=train', *flags,
          *(f'--config.{name}={value}' for name, value in config.items())]


def signal_after_first_checkpoint(command: list[str], signum: int) -> tuple[int, str]:
  """Runs a training `command`, sends `signum` once it saves step 4; (exit status, its log)."""
  process = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                             stderr=subprocess.PIPE, text=True)
  seen = []
  for line in process.stderr:
    seen.append(line)
    if 'Saving the checkpoint at step 4.' in line:
      break
  process.send_signal(signum)
  seen.append(process.communicate(timeout=300)[1])
  return process.returncode, ''.join(seen)


def signal_when_collected(signum: int = signal.SIGTERM) -> None:
  """Sends `signum` to this process from inside a destructor, as when the handler runs inside
  JAX's gc callback: Python reports the handler's exception to sys.unraisablehook and goes on."""
  class SignalWhenCollected:
    def __del__(self):
      os.kill(os.getpid(), signum)
  SignalWhenCollected()


def checkpoint_steps(workdir) -> list[int]:
  """The steps saved in WORKDIR/checkpoints, oldest first (not the unfinished saves that Orbax
  names `<step>.orbax-checkpoint-tmp*`, which the next run cleans up)."""
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / 'checkpoints').iterdir()
                if '.orbax-checkpoint-tmp' not in p.name)


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: end-to-end tests (run in CI too)')


def tiny_digits_config(num_timesteps: int = 40, num_train_steps: int = 30):
  """configs/digits.py with a tiny U-Net and a short chain: seconds on 2 CPU cores."""
  from configs import digits
  config = digits.get_config()
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.diffusion.num_timesteps = num_timesteps
  config.training.batch_size = 16
  config.training.num_train_steps = num_train_steps
  config.training.log_every = 10
  config.training.checkpoint_every = num_train_steps
  config.optim.warmup_steps = 5
  config.sampling.num_samples = 10
  config.sampling.batch_size = 4
  config.eval.bpd_num_images = 16
  config.eval.bpd_batch_size = 8
  return config


@pytest.fixture(scope='session')
def trained_digits(tmp_path_factory):
  """(config, workdir) of a tiny digits model trained for a few steps, shared by the tests."""
  from ddpm_jax import train
  config = tiny_digits_config()
  workdir = tmp_path_factory.mktemp('digits')
  train.train_and_evaluate(config, str(workdir))
  return config, str(workdir)
