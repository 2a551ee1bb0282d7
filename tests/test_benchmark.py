"""The benchmark CLI on a tiny U-Net: its last line is one JSON object with the promised keys."""
import json
import math
import os
import subprocess
import sys

import pytest

from ddpm_jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ('train_images_per_sec', 'train_steps_per_sec', 'sample_steps_per_sec',
        'sample_images_per_sec', 'compile_seconds', 'params', 'devices', 'device_kind',
        'batch_size', 'sample_batch_size', 'train_flops_per_step', 'achieved_tflops',
        'matmul_peak_tflops', 'peak_fraction', 'peak_memory_bytes', 'dtype')


@pytest.mark.slow
def test_benchmark_prints_json_last():
  tiny = ['--config.model.ch=32', '--config.model.ch_mult=(1,2)', '--config.model.num_res_blocks=1',
          '--config.diffusion.num_timesteps=40', '--config.training.batch_size=8',
          '--config.sampling.batch_size=8', '--config.sampling.sampler=ddim',
          '--config.sampling.num_steps=10']
  command = [sys.executable, '-m', 'ddpm_jax.benchmark', '--config=configs/digits.py', *tiny,
             '--steps=2', '--warmup=1', '--scan_steps=2', '--matmul_size=256']
  out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(KEYS) <= set(result)
  assert (result['batch_size'], result['sample_batch_size'], result['dtype']) == (8, 8, 'float32')
  for key in KEYS:
    if key not in ('device_kind', 'dtype'):
      assert math.isfinite(result[key]) and result[key] > 0, key
  # The configured sampler: 10 DDIM steps of the 40.
  assert (result['sampler'], result['sample_num_steps']) == ('ddim', 10)
  assert result['sample_images_per_sec'] == pytest.approx(result['sample_steps_per_sec'] * 8 / 10)
  assert result['sample_seconds_per_sample'] == pytest.approx(1 / result['sample_images_per_sec'])


def test_xla_flags_keep_what_the_user_set():
  environ = {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=+dot'}
  xla_flags.apply(environ)
  assert environ['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=+dot'
  environ = {'JAX_PLATFORMS': 'tpu'}
  xla_flags.apply(environ)
  assert 'XLA_FLAGS' not in environ
