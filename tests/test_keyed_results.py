"""Result files record their settings, are reused only for the same settings, and are never
replaced by results of other settings (inference.py's rule, docs/reliability.md).

Issue 15, scenario 6 (sampler settings in file names, truncated sample files, FID reference
statistics keyed by data and weights); issue 21: `--mode=eval` redrew the user's 1,000 samples at
its own 400 under the same name, and any run asking for another count, seed or setting under a
name destroyed what was there (samples, chunks, eval JSON, bits/dim progress, FID statistics).
"""
import copy
import json
import logging
import os
import shutil
import subprocess

import numpy as np
import pytest
from etils import epath

from ddpm_jax import evaluation, inference as inference_lib, sample_job
from ddpm_jax.errors import UserError
from tests.conftest import ROOT, tiny_train_command


@pytest.fixture
def workdir(trained_digits, tmp_path):
  """A private copy of the trained tiny digits workdir's checkpoints (not the results other
  tests wrote there), so files written here stay here."""
  _, source = trained_digits
  shutil.copytree(source, tmp_path / 'w', ignore=shutil.ignore_patterns('eval', 'samples'))
  return str(tmp_path / 'w')


def _with(config, **changes):
  config = copy.deepcopy(config)
  for name, value in changes.items():
    if name == 'seed':
      config.seed = value
    else:
      section, field = name.split('__')
      config[section][field] = value
  return config


def sample(config, workdir, **changes):
  path = epath.Path(sample_job.sample_from_workdir(_with(config, **changes),
                                                   workdir)['samples_npz'])
  return path, inference_lib.read_samples(path)


def test_a_samples_file_of_other_settings_is_kept_and_named_in_one_sentence(trained_digits,
                                                                            workdir):
  config, _ = trained_digits
  path, seed0 = sample(config, workdir)
  assert path.name == 'samples_30.npz'
  before = path.read_bytes()
  for changes, setting, theirs, ours in (
      ({'seed': 1}, 'seed', 0, 1), ({'sampling__num_samples': 12}, 'num_samples', 10, 12),
      ({'sampling__clip_denoised': False}, 'clip_denoised', 'True', 'False')):
    with pytest.raises(UserError) as error:
      sample(config, workdir, **changes)
    assert str(error.value) == (
        f'{path} holds results computed with {setting}={theirs}, but this run has '
        f'{setting}={ours}; it is kept: rerun with its settings, set --config.sampling.name to '
        f'another name to keep both, or move it away to draw these.')
    assert path.read_bytes() == before
  other, seed1 = sample(config, workdir, seed=1, sampling__name='seed1')
  assert other.name == 'seed1_30.npz' and not np.array_equal(seed1, seed0)
  ddim_path, ddim = sample(config, workdir, sampling__sampler='ddim', sampling__num_steps=10)
  assert ddim_path.name == 'samples_30_ddim10.npz' and path.read_bytes() == before
  np.testing.assert_array_equal(sample(config, workdir)[1], seed0)  # the same settings: reused


def test_chunks_of_other_settings_are_never_drawn_over(trained_digits, workdir):
  """A preempted run leaves chunks; a run with another setting that the old chunk folder's
  name did not carry (clip_denoised) redrew them in place."""
  config, _ = trained_digits
  inference = inference_lib.Inference(config, workdir)
  original = inference.sample

  def preempted(rng, n):
    inference.sample = lambda rng, n: (_ for _ in ()).throw(KeyboardInterrupt)
    return original(rng, n)
  inference.sample = preempted
  with pytest.raises(KeyboardInterrupt):
    inference_lib.generate(inference, workdir, name='s', num_samples=10, batch_size=4, seed=0)
  chunks = sorted(epath.Path(workdir, 'samples').glob('s_chunks_*/chunk_*.npz'))
  assert len(chunks) == 1
  first = chunks[0].read_bytes()
  unclipped = inference_lib.Inference(_with(config, sampling__clip_denoised=False), workdir)
  inference_lib.generate(unclipped, workdir, name='t', num_samples=10, batch_size=4, seed=0)
  inference_lib.generate(unclipped, workdir, name='s', num_samples=10, batch_size=4, seed=0)
  assert chunks[0].read_bytes() == first  # the clipped run's chunk, untouched


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
  settings_dict = inference.sample_settings(seed=config.seed, num_samples=10, batch_size=4)
  chunk_dir = out / 'samples' / (
      f's_chunks_n10_b4_s0_{inference_lib.settings_digest(settings_dict)}')
  chunk_dir.mkdir()
  settings = inference_lib.fingerprint(settings_dict)
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


def test_eval_refuses_the_users_samples_of_another_count_before_computing_anything(
    trained_digits, workdir):
  """The issue's scenario: 12 samples drawn by --mode=sample; --mode=eval asks for 10."""
  config, _ = trained_digits
  path, _ = sample(config, workdir, sampling__num_samples=12)
  before = path.read_bytes()
  with pytest.raises(UserError, match=r'samples_30.npz holds results computed with '
                                      r'num_samples=12, but this run has num_samples=10;'):
    evaluation.evaluate(config, workdir)
  assert path.read_bytes() == before
  assert not list(epath.Path(workdir, 'eval').glob('*.progress.json'))  # nothing computed


@pytest.mark.slow
def test_eval_json_records_its_settings_and_counts_and_is_kept_for_other_settings(
    trained_digits, workdir, monkeypatch):
  config, _ = trained_digits
  monkeypatch.setattr(evaluation, 'digits_metrics', lambda c, s: {'num_samples': len(s)})
  config = _with(config, eval__bpd_num_images=8)
  eval_dir = epath.Path(workdir) / 'eval'
  metrics = evaluation.evaluate(config, workdir)['metrics']
  assert (metrics['bpd_num_images_asked'], metrics['bpd_num_images_test'],
          metrics['bpd_num_images_train'], metrics['num_samples_asked'],
          metrics['num_samples_used']) == (8, 8, 8, 10, 10)
  saved = json.loads((eval_dir / '30.json').read_text())
  assert saved['settings']['bpd_num_images'] == 8 and saved['settings']['seed'] == 0
  rd = json.loads((eval_dir / 'rate_distortion_30.json').read_text())
  assert rd['num_images'] == 8 and rd['settings']['bpd_num_images'] == 8
  progress = sorted(p.name for p in eval_dir.glob('*.progress.json'))
  assert len(progress) == 2 and all(p.startswith(('30_bpd_test_', '30_bpd_train_'))
                                    for p in progress)
  before = {p.name: p.read_bytes() for p in eval_dir.iterdir()}
  for changes, setting in (({'eval__bpd_num_images': 16}, 'bpd_num_images'),
                           ({'seed': 3}, 'seed')):
    with pytest.raises(UserError, match=rf'30.json holds results computed with {setting}='):
      evaluation.evaluate(_with(config, **changes), workdir)
  assert {p.name: p.read_bytes() for p in eval_dir.iterdir()} == before

  # Another sampler: its own metrics file; the rate-distortion file (bits/dim only) is shared.
  out = evaluation.evaluate(_with(config, sampling__sampler='ddim', sampling__num_steps=5,
                                  sampling__name='ddim'), workdir)
  assert out['metrics_json'] == str(eval_dir / '30_ddim5.json')
  ddim = json.loads((eval_dir / '30_ddim5.json').read_text())
  assert (ddim['sampler'], ddim['num_steps'], ddim['bpd_test']) == ('ddim', 5, metrics['bpd_test'])
  assert (eval_dir / '30.json').read_bytes() == before['30.json']


def test_bits_per_dim_progress_of_other_settings_goes_to_another_file(trained_digits, workdir):
  config, _ = trained_digits
  inference = inference_lib.Inference(config, workdir)
  progress = epath.Path(workdir) / 'eval' / '30_bpd_test.progress.json'
  evaluation.bits_per_dim(inference, 'test', 8, batch_size=8, progress_path=progress)
  first = {p.name: p.read_bytes() for p in progress.parent.glob('*.progress.json')}
  assert len(first) == 1 and next(iter(first)).startswith('30_bpd_test_')
  evaluation.bits_per_dim(inference, 'test', 16, batch_size=8, progress_path=progress)
  both = {p.name: p.read_bytes() for p in progress.parent.glob('*.progress.json')}
  assert len(both) == 2 and all(both[name] == data for name, data in first.items())


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
  cached = next((tmp_path / 'cache' / 'fid_stats').glob('*.npz'))
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

  # A file under this name but of another key (a digest collision) is kept, not rebuilt over.
  with np.load(cached) as npz:
    key = json.loads(str(npz['key']))
  np.savez(cached, mu=np.zeros(2), sigma=np.eye(2), key=np.array(json.dumps(
      {**key, 'data_dir': '/elsewhere'}, sort_keys=True)))
  before = cached.read_bytes()
  with pytest.raises(UserError, match=r"holds results computed with data_dir=/elsewhere, but "
                                      r"this run has data_dir=''; it is kept"):
    stats()
  assert cached.read_bytes() == before and len(computed) == 5


def test_a_folder_dataset_has_no_held_out_split(trained_digits):
  config, _ = trained_digits
  assert evaluation._splits(config) == ('test', 'train')
  assert evaluation._splits(_with(config, data__dataset='folder:/photos')) == ('train',)
  assert evaluation._splits(_with(config, data__eval_split='train')) == ('train',)


def test_an_eval_dir_that_cannot_be_written_is_one_sentence_before_anything_runs(
    trained_digits, workdir):
  config, _ = trained_digits
  (epath.Path(workdir) / 'eval').write_text('a file where the folder goes')
  with pytest.raises(UserError, match=rf'^Cannot write to {workdir}/eval \(FileExistsError: '):
    evaluation.evaluate(config, workdir)
  (epath.Path(workdir) / 'samples').write_text('a file where the folder goes')
  with pytest.raises(UserError, match=rf'^Cannot write to {workdir}/samples \(FileExistsError: '):
    sample_job.sample_from_workdir(config, workdir)


def _environment():
  return dict(os.environ, PYTHONPATH=ROOT)


@pytest.mark.slow
def test_cli_samples_of_another_seed_are_refused_and_a_read_only_samples_dir_is_one_sentence(
    workdir):
  """Scenario 6 as a user types it, with issue 21's rule: --config.seed=1 after a seed-0 run
  keeps the seed-0 file and says how to keep both; a samples/ the job may not write (root
  runs it without CAP_DAC_OVERRIDE, as tests/test_checkpointing.py does) is one sentence."""
  tiny = {'diffusion.num_timesteps': 40, 'sampling.num_samples': 10, 'sampling.batch_size': 4}
  npz = epath.Path(workdir) / 'samples' / 'samples_30.npz'

  def sample_cli(*prefix, **overrides):
    command = list(prefix) + tiny_train_command(workdir, {**tiny, **overrides}, '--mode=sample')
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=_environment())

  assert sample_cli().returncode == 0
  seed0 = npz.read_bytes()
  refused = sample_cli(seed=1)
  assert refused.returncode == 1 and 'Traceback' not in refused.stderr
  assert refused.stderr.strip().splitlines()[-1].startswith(
      f'{npz} holds results computed with seed=0, but this run has seed=1; it is kept:')
  assert npz.read_bytes() == seed0
  bad = sample_cli(**{'sampling.sampler': 'ddim', 'sampling.num_steps': 41})
  assert bad.returncode == 1 and 'Traceback' not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1] == (
      'sampling.num_steps must be in [0, 40] (0 runs all diffusion.num_timesteps=40 steps), '
      'got 41.')

  import pathlib
  samples_dir = pathlib.Path(npz.parent)
  samples_dir.chmod(0o555)
  without_override = ['setpriv', '--bounding-set=-dac_override'] if os.geteuid() == 0 else []
  try:
    read_only = sample_cli(*without_override, **{'sampling.name': 'other'})
  finally:
    samples_dir.chmod(0o755)
  assert read_only.returncode == 1, read_only.stderr[-3000:]
  assert 'Traceback' not in read_only.stderr
  assert read_only.stderr.strip().splitlines()[-1].startswith(
      f'Cannot write to {samples_dir} (PermissionError: '), read_only.stderr[-2000:]
