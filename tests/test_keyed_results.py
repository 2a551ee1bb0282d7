"""Cached results are keyed by their settings: a changed setting recomputes, never reuses.

Issue 15, scenario 6: samples after a seed or T change, bits/dim and rate-distortion after a T
change, sampler settings in file names, truncated sample files, FID reference statistics.
"""
import copy
import logging
import shutil

import numpy as np
import pytest
from etils import epath

from ddpm_jax import evaluation, inference as inference_lib, sample_job
from ddpm_jax.errors import UserError


@pytest.fixture
def workdir(trained_digits, tmp_path):
  """A private copy of the trained tiny digits workdir, so files written here stay here."""
  _, source = trained_digits
  shutil.copytree(source, tmp_path / 'w')
  return str(tmp_path / 'w')


def sample(config, workdir, **sampling):
  config = copy.deepcopy(config)
  for name, value in sampling.items():
    if name == 'num_timesteps':
      config.diffusion.num_timesteps = value
    elif name == 'seed':
      config.seed = value
    else:
      config.sampling[name] = value
  path = epath.Path(sample_job.sample_from_workdir(config, workdir)['samples_npz'])
  return path, inference_lib.read_samples(path)


@pytest.mark.slow
def test_samples_are_redrawn_when_a_setting_changes(trained_digits, workdir):
  config, _ = trained_digits
  path, seed0 = sample(config, workdir)
  assert path.name == 'samples_30.npz'
  path1, seed1 = sample(config, workdir, seed=1)
  assert path1 == path and not np.array_equal(seed1, seed0)
  with pytest.raises(UserError, match='was trained with diffusion.num_timesteps=40'):
    sample(config, workdir, num_timesteps=20)  # issue 21: T is the checkpoint's
  before = path.read_bytes()
  ddim_path, ddim = sample(config, workdir, sampler='ddim', num_steps=10)
  assert ddim_path.name == 'samples_30_ddim10.npz' and path.read_bytes() == before
  assert not np.array_equal(ddim, seed0)


def test_truncated_sample_files_are_named_and_drawn_again(trained_digits, workdir, caplog):
  config, _ = trained_digits
  path, samples = sample(config, workdir)
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(UserError, match=f'The samples file {path} is damaged or truncated') as e:
    inference_lib.read_samples(path)
  assert '\n' not in str(e.value)
  with caplog.at_level(logging.WARNING):
    np.testing.assert_array_equal(sample(config, workdir)[1], samples)
  assert f'{path} is damaged or truncated' in caplog.text

  # A chunk cut short (say, a disk full): drawn again with a warning, the same samples.
  inference = inference_lib.Inference(config, workdir)
  out = epath.Path(workdir) / 'chunked'
  first = inference_lib.generate(inference, out, name='s', num_samples=10, batch_size=4,
                                 seed=config.seed)
  reference = inference_lib.read_samples(first)
  first.unlink()
  chunk_dir = out / 'samples' / 's_chunks_n10_b4_s0'
  chunk_dir.mkdir()
  settings = inference_lib.fingerprint(inference.sample_settings(seed=config.seed,
                                                                 num_samples=10, batch_size=4))
  inference_lib.write_npz(chunk_dir / 'chunk_00000_of_00003.npz', samples=reference[:4],
                          settings=np.array(settings))
  chunk = chunk_dir / 'chunk_00001_of_00003.npz'
  chunk.write_bytes(b'PK\x03\x04 cut short')
  calls, original = [], inference.sample
  inference.sample = lambda rng, n: calls.append(n) or original(rng, n)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    again = inference_lib.generate(inference, out, name='s', num_samples=10, batch_size=4,
                                   seed=config.seed)
  assert f'{chunk} is damaged or truncated' in caplog.text
  assert calls == [4, 2]  # chunk 0 was good and is kept
  np.testing.assert_array_equal(inference_lib.read_samples(again), reference)


@pytest.mark.slow
def test_eval_recomputes_bits_per_dim_after_a_change_of_T(trained_digits, workdir, monkeypatch):
  config, _ = trained_digits
  monkeypatch.setattr(evaluation, 'digits_metrics', lambda c, s: {'num_samples': len(s)})
  config = copy.deepcopy(config)
  config.eval.bpd_num_images = 8
  eval_dir = epath.Path(workdir) / 'eval'
  t40 = evaluation.evaluate(config, workdir)['metrics']
  rd40 = evaluation._read_json_or_none(eval_dir / 'rate_distortion_30.json')
  assert len(rd40['t']) == 40 and t40['num_timesteps'] == 40
  config.diffusion.num_timesteps = 20
  with pytest.raises(UserError, match='was trained with diffusion.num_timesteps=40'):
    evaluation.evaluate(config, workdir)  # issue 21: T is the checkpoint's, never the config's
  config.diffusion.num_timesteps = 40
  t20 = t40

  # Another sampler: its own metrics file, with its settings; bits/dim is the same bound.
  default_json = (eval_dir / '30.json').read_text()
  config.sampling.update(sampler='ddim', num_steps=5)
  out = evaluation.evaluate(config, workdir)
  assert out['metrics_json'] == str(eval_dir / '30_ddim5.json')
  ddim = evaluation._read_json_or_none(eval_dir / '30_ddim5.json')
  assert (ddim['sampler'], ddim['num_steps'], ddim['eta'], ddim['spacing']) == (
      'ddim', 5, 0.0, 'uniform')
  assert ddim['bpd_test'] == t20['bpd_test']
  assert (eval_dir / '30.json').read_text() == default_json
  assert evaluation._read_json_or_none(eval_dir / '30.json')['sampler'] == 'ancestral'


def test_fid_reference_statistics_are_keyed_by_data_and_inception_weights(
    trained_digits, tmp_path, monkeypatch):
  from ddpm_jax import fid
  config, _ = trained_digits
  monkeypatch.setenv('DDPM_JAX_CACHE', str(tmp_path / 'cache'))
  computed = []
  real = lambda c, split, **_: iter([np.full((4, 2), len(c.data.data_dir) + 1, np.float32)])
  monkeypatch.setattr(evaluation, '_reference_batches', real)

  def features(images, *, batch_size, params):
    computed.append(1)
    return {'pool3': images * float(params['w'].sum()) + np.arange(8).reshape(4, 2)}
  monkeypatch.setattr(fid, 'inception_features', features)

  def stats(data_dir='', weight=1., cap=50_000, c=config):
    c = copy.deepcopy(c)
    c.data.data_dir = data_dir
    c.eval.fid_reference_images = cap
    return evaluation.reference_statistics(c, 'train', {'w': np.full(3, weight)},
                                           batch_size=4)['mu']

  first = stats()
  np.testing.assert_array_equal(stats(), first)
  assert len(computed) == 1  # cached
  assert not np.array_equal(stats(data_dir='/other'), first) and len(computed) == 2
  assert not np.array_equal(stats(weight=2.), first) and len(computed) == 3
  stats(cap=4096)  # the cap is part of the key (the split holds fewer images)
  assert len(computed) == 4
  c = copy.deepcopy(config)
  c.data.image_size = 16
  stats(c=c)
  assert len(computed) == 5
  stats()
  assert len(computed) == 5


@pytest.mark.slow
def test_cli_sample_after_a_seed_change_and_bad_sampler_settings(workdir):
  """Scenario 6 as a user types it: --config.seed=1 after a seed-0 run gives other samples."""
  import subprocess
  from tests.conftest import ROOT, tiny_train_command
  tiny = {'diffusion.num_timesteps': 40, 'sampling.num_samples': 10, 'sampling.batch_size': 4}
  npz = epath.Path(workdir) / 'samples' / 'samples_30.npz'

  def sample_cli(**overrides):
    command = tiny_train_command(workdir, {**tiny, **overrides}, '--mode=sample')
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)

  assert sample_cli().returncode == 0
  seed0 = npz.read_bytes()
  assert sample_cli(seed=1).returncode == 0
  assert npz.read_bytes() != seed0
  bad = sample_cli(**{'sampling.sampler': 'ddim', 'sampling.num_steps': 41})
  assert bad.returncode == 1 and 'Traceback' not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1] == (
      'sampling.num_steps must be in [0, 40] (0 runs all diffusion.num_timesteps=40 steps), '
      'got 41.')
