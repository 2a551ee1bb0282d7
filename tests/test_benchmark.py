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
def test_benchmark_prints_json_last(tmp_path):
  tiny = ['--config.model.ch=32', '--config.model.ch_mult=(1,2)', '--config.model.num_res_blocks=1',
          '--config.diffusion.num_timesteps=40', '--config.training.batch_size=8',
          '--config.sampling.batch_size=8', '--config.sampling.sampler=ddim',
          '--config.sampling.num_steps=10']
  command = [sys.executable, '-m', 'ddpm_jax.benchmark', '--config=configs/digits.py', *tiny,
             '--steps=2', '--warmup=1', '--scan_steps=2', '--matmul_size=256',
             f'--profile={tmp_path}']
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

  # --profile: both steps traced, and their time attributed to pass and kind of work.
  profile = result['profile']
  for label in ('train', 'sample'):
    assert (tmp_path / label / 'program.hlo.txt').exists()
    assert list((tmp_path / label).glob('plugins/profile/*/perfetto_trace.json.gz'))
    assert sum(row['share'] for row in profile[label]) == pytest.approx(1.0)
    assert all(row['ms_per_call'] >= 0 for row in profile[label])
  train = {(row['pass_'], row['kind']): row['share'] for row in profile['train']}
  for row in (('forward', 'convolution 3x3'), ('backward', 'convolution 3x3'),
              ('backward', 'convolution: kernel gradient'), ('forward', 'GroupNorm'),
              ('backward', 'GroupNorm')):
    assert train.get(row, 0) > 0, (row, train)
  sample = {(row['pass_'], row['kind']) for row in profile['sample']}
  assert ('forward', 'convolution 3x3') in sample
  assert not any(pass_ == 'backward' for pass_, _ in sample)


def test_xla_flags_keep_what_the_user_set():
  environ = {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=+dot'}
  xla_flags.apply(environ)
  assert environ['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=+dot'
  environ = {'JAX_PLATFORMS': 'tpu'}
  xla_flags.apply(environ)
  assert 'XLA_FLAGS' not in environ


# Runs the benchmark with the modules an accelerator image may lack made unimportable.
_WITHOUT_EXTRAS = '''
import importlib.abc, runpy, sys
BLOCKED = {'tensorflow', 'tensorflow_datasets', 'clu', 'orbax', 'sklearn', 'matplotlib', 'etils',
           'tensorstore', 'PIL'}
class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError(f'{name} is not installed here')
sys.meta_path.insert(0, Blocker())
sys.argv = ['benchmark', *sys.argv[1:]]
runpy.run_module('ddpm_jax.benchmark', run_name='__main__', alter_sys=True)
'''


@pytest.mark.slow
def test_memory_report_compiles_only_and_needs_only_jax_flax_optax():
  tiny = ['--config.model.ch=32', '--config.model.ch_mult=(1,2)', '--config.model.num_res_blocks=1',
          '--config.diffusion.num_timesteps=20', '--config.training.batch_size=16',
          '--config.sampling.batch_size=8']
  command = [sys.executable, '-c', _WITHOUT_EXTRAS, '--config=configs/digits.py', *tiny,
             '--memory', '--devices=2', '--grad_accum_steps=1,8']
  out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert (result['devices'], result['train_batch_per_device'],
          result['sample_batch_per_device']) == (2, 8, 4)
  variants = {(r['dtype'], r['remat'], r['grad_accum_steps']) for r in result['train_step']}
  assert variants == {(d, r, k) for d in ('float32', 'bfloat16') for r in ('none', 'blocks')
                      for k in (1, 8)}
  assert [r['config'] for r in result['train_step']].count(True) == 1
  for row in result['train_step'] + result['sampler']:
    assert 0 < row['bytes'] < 2**30 and 'TPU v2 core' in row['fits']
