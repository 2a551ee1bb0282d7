"""--mode=eval: bits/dim, rate-distortion, the digits sample check, TensorBoard and best.json on a
tiny trained model; FID's streaming reference statistics with a stand-in Inception network."""
import json

import numpy as np
import pytest
from etils import epath

from ddpm_jax import evaluation
from ddpm_jax.errors import UserError


def test_rate_distortion_from_terms():
  bpd = {'terms_bpd': np.array([3.0, 0.5, 0.25, 0.125]), 'prior_bpd': 0.01,
         'mse': np.array([0.0, 0.01, 0.04, 0.09]), 'total_bpd': 3.885}
  rd = evaluation.rate_distortion(bpd)
  # At step t the receiver holds latent t: the prior and the terms T-1 .. t+1 were sent.
  np.testing.assert_allclose(rd['rate_bpd'], [0.885, 0.385, 0.135, 0.01])
  np.testing.assert_allclose(rd['distortion_rmse'], [0.0, 12.75, 25.5, 38.25])


def test_eval_writes_bpd_rate_distortion_and_the_digits_check(trained_digits):
  config, workdir = trained_digits
  out = evaluation.evaluate(config, workdir)
  metrics = json.loads(epath.Path(out['metrics_json']).read_text())
  step = metrics['step']
  assert step == config.training.num_train_steps
  for key in ('bpd_test', 'bpd_train', 'prior_bpd_test', 'l0_bpd_test', 'digits'):
    assert key in metrics
  assert 0 < metrics['bpd_test'] < 20 and np.isfinite(metrics['bpd_train'])
  digits = metrics['digits']
  assert len(digits['class_shares']) == 10 and abs(sum(digits['class_shares']) - 1) < 1e-3
  assert digits['classifier_test_accuracy'] > 0.9

  rd = json.loads((epath.Path(workdir) / 'eval' / f'rate_distortion_{step}.json').read_text())
  assert (epath.Path(workdir) / 'eval' / f'rate_distortion_{step}.png').exists()
  rate, distortion = np.array(rd['rate_bpd']), np.array(rd['distortion_rmse'])
  assert len(rate) == config.diffusion.num_timesteps
  assert np.all(np.diff(rate) <= 0)  # rate falls with t
  # Distortion rises with t (up to the Monte-Carlo noise of one q sample per t on 16 images).
  ranks = np.argsort(np.argsort(distortion))
  assert np.corrcoef(ranks, np.arange(len(ranks)))[0, 1] > 0.95
  assert np.all(np.diff(np.convolve(distortion, np.ones(8) / 8, 'valid')[::8]) > 0)
  assert distortion[-1] > 5 * distortion[0]
  np.testing.assert_allclose(rd['total_bpd'], metrics['bpd_test'], rtol=1e-6)


def test_the_rate_distortion_plot_keeps_the_users_matplotlib_backend(tmp_path):
  import matplotlib
  before = matplotlib.get_backend()
  matplotlib.use('svg')  # a notebook's backend stands in: any but the Agg a plot would switch to
  try:
    rd = evaluation.rate_distortion({'terms_bpd': np.array([3.0, 0.5]), 'prior_bpd': 0.01,
                                     'mse': np.array([0.0, 0.01]), 'total_bpd': 3.51})
    path = evaluation.plot_rate_distortion(rd, epath.Path(tmp_path) / 'rd.png')
    assert matplotlib.get_backend() == 'svg'
    assert epath.Path(path).read_bytes().startswith(b'\x89PNG')
  finally:
    matplotlib.use(before)


def test_without_a_held_out_split_nothing_is_reported_as_test(trained_digits, tmp_path):
  """data.eval_split='train' (LSUN cat, CelebA-HQ): train numbers only, named train."""
  import shutil
  config, workdir = trained_digits
  workdir = shutil.copytree(workdir, tmp_path / 'workdir',  # the checkpoints, not the results
                             ignore=shutil.ignore_patterns('eval', 'samples'))
  config = config.copy_and_resolve_references()
  config.data.eval_split = 'train'
  config.sampling.num_samples = 20
  out = evaluation.evaluate(config, str(workdir))
  metrics = json.loads(epath.Path(out['metrics_json']).read_text())
  assert 'bpd_train' in metrics and not [key for key in metrics if key.endswith('_test')]
  step = metrics['step']
  rd = json.loads((epath.Path(workdir) / 'eval' / f'rate_distortion_{step}.json').read_text())
  assert rd['split'] == 'train'
  np.testing.assert_allclose(rd['total_bpd'], metrics['bpd_train'], rtol=1e-6)


# === Bits/dim compiled once, TensorBoard, best.json ===


def _event_values(directory) -> dict[str, dict[int, object]]:
  """{tag: {step: value}} of the TensorBoard events in `directory` (scalars as floats, images
  as the number of summaries)."""
  import tensorflow as tf
  values = {}
  for path in sorted(epath.Path(directory).glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        tensor = tf.make_ndarray(value.tensor)
        values.setdefault(value.tag, {})[event.step] = (
            float(tensor) if tensor.ndim == 0 else tensor.shape)
  return values


@pytest.mark.slow
def test_eval_compiles_bits_per_dim_once_and_writes_tensorboard_and_best(trained_digits,
                                                                         tmp_path):
  import shutil
  config, workdir = trained_digits
  # Without the fixture's results: they hold other settings, which this evaluation may not replace.
  workdir = str(shutil.copytree(workdir, tmp_path / 'w',
                                ignore=shutil.ignore_patterns('eval', 'samples')))
  config = config.copy_and_resolve_references()
  config.eval.bpd_num_images = 8
  evaluation._BPD_FNS.clear()
  out = evaluation.evaluate(config, workdir)
  [fn] = evaluation._BPD_FNS.values()
  assert fn._cache_size() == 1  # test, then train: one compiled scan
  evaluation.evaluate(config, workdir)  # a second evaluation reuses it too
  assert len(evaluation._BPD_FNS) == 1 and fn._cache_size() == 1

  metrics = out['metrics']
  events = _event_values(epath.Path(workdir) / 'eval')
  for name in ('bpd_test', 'bpd_train', 'sample_seconds', 'confidence', 'class_share_spread',
               'nn_distance'):
    assert 30 in events[name], name
  np.testing.assert_allclose(events['bpd_test'][30], metrics['bpd_test'], rtol=1e-6)
  np.testing.assert_allclose(events['confidence'][30], metrics['digits']['confidence'],
                             rtol=1e-6)
  assert events['samples'][30][0] == 3  # an encoded image: width, height, PNG
  best = json.loads((epath.Path(workdir) / 'eval' / 'best.json').read_text())
  assert (best['step'], best['metric'], best['higher_is_better']) == (30, 'confidence', True)
  assert best['value'] == metrics['digits']['confidence']
  assert evaluation.is_evaluated(config, workdir, 30)
  config.seed = 1
  assert not evaluation.is_evaluated(config, workdir, 30)  # other settings: not this one's


def test_the_best_checkpoint_follows_the_metric_and_resets_for_other_settings(tmp_path):
  from tests.conftest import tiny_digits_config
  config = tiny_digits_config()
  config.eval.best_metric = 'bpd_test'
  workdir = str(tmp_path)

  def evaluated(step, value, c=config):
    metrics = {**evaluation._settings(c, step), 'bpd_test': value}
    return evaluation.update_best(c, workdir, metrics, f'{step}.json')

  assert evaluated(10, 5.0)['step'] == 10
  assert evaluated(20, 4.0)['step'] == 20  # lower bits/dim is better
  assert evaluated(30, 4.5)['step'] == 20
  assert evaluated(40, float('nan'))['step'] == 20
  assert evaluated(20, 4.7)['step'] == 20  # the best step evaluated again: its new value
  assert json.loads((tmp_path / 'eval' / 'best.json').read_text())['value'] == 4.7
  other = config.copy_and_resolve_references()
  other.eval.bpd_num_images = 32  # numbers of other settings do not compare: a new best
  assert evaluated(50, 9.0, other)['step'] == 50
  other.sampling.update(sampler='ddim', num_steps=10)  # another sampler has its own file
  assert evaluated(60, 9.5, other)['step'] == 60
  assert json.loads((tmp_path / 'eval' / 'best.json').read_text())['step'] == 50
  assert json.loads((tmp_path / 'eval' / 'best_ddim10.json').read_text())['step'] == 60
  assert evaluation.summary_scalars({'bpd_test': 1., 'fid_train': 2., 'sample_seconds': 3.},
                                    '_ddim10') == {'bpd_test': 1., 'fid_train/ddim10': 2.,
                                                   'sample_seconds/ddim10': 3.}


# === FID: streaming reference statistics ===


def _rgb_folder(directory, num_images: int, seed: int = 1) -> np.ndarray:
  """`num_images` random 32x32 RGB PNGs in `directory` (sorted names); returns them."""
  from PIL import Image
  directory.mkdir(parents=True, exist_ok=True)
  pictures = np.random.default_rng(seed).integers(0, 256, (num_images, 32, 32, 3), np.uint8)
  for i, picture in enumerate(pictures):
    Image.fromarray(picture).save(directory / f'{i:05d}.png')
  return pictures


def _folder_config(folder):
  from configs import cifar10
  config = cifar10.get_config()
  config.data.dataset = f'folder:{folder}'
  config.eval.inception_batch_size = 64
  return config


def _assert_statistics_equal(reference: dict, features: np.ndarray) -> None:
  from ddpm_jax import fid
  mu, sigma = fid.feature_statistics(features)
  scale = np.abs(sigma).max()
  # Relative 1e-6, elementwise and against the covariance's scale (measured: 1e-15).
  np.testing.assert_allclose(reference['mu'], mu, rtol=1e-6, atol=1e-6 * np.abs(mu).max())
  np.testing.assert_allclose(reference['sigma'], sigma, rtol=1e-6, atol=1e-6 * scale)
  assert reference['sigma'].dtype == np.float64


@pytest.fixture
def stub_inception(monkeypatch, tmp_path):
  """The cheap stand-in network, and a private cache directory."""
  from tests import fid_stub
  from ddpm_jax import datasets
  fid_stub.install(monkeypatch)
  monkeypatch.setenv('DDPM_JAX_CACHE', str(tmp_path / 'cache'))
  datasets.load_source.cache_clear()
  yield fid_stub
  datasets.load_source.cache_clear()


def test_streaming_statistics_equal_all_at_once_on_a_folder(stub_inception, tmp_path):
  from ddpm_jax import seeds
  pictures = _rgb_folder(tmp_path / 'images', 2100)
  config = _folder_config(tmp_path / 'images')
  reference = evaluation.reference_statistics(config, 'train', stub_inception.PARAMS,
                                              batch_size=64, kid_images=100)
  assert reference['num_images'] == 2100
  _assert_statistics_equal(reference, stub_inception.features(pictures)['pool3'])
  np.testing.assert_allclose(reference['kid_features'],
                             stub_inception.features(pictures[:100])['pool3'], rtol=1e-6)

  # Capped at 2,048: a random subset fixed by seeds.FID_REFERENCE_SUBSET, with its own cache.
  config.eval.fid_reference_images = 2048
  capped = evaluation.reference_statistics(config, 'train', stub_inception.PARAMS,
                                           batch_size=64)
  subset = np.sort(np.random.default_rng(seeds.FID_REFERENCE_SUBSET).choice(2100, 2048,
                                                                             replace=False))
  assert capped['num_images'] == 2048
  _assert_statistics_equal(capped, stub_inception.features(pictures[subset])['pool3'])
  names = sorted(p.name for p in (tmp_path / 'cache' / 'fid_stats').iterdir())
  assert len(names) == 3 and sum('_n2048_cap2048_' in name for name in names) == 1


def test_streaming_statistics_equal_all_at_once_on_mock_cifar10(stub_inception, monkeypatch):
  import tensorflow_datasets as tfds
  from configs import cifar10
  from ddpm_jax import datasets
  monkeypatch.setattr(datasets, '_unreachable_host', lambda urls: None)  # mock: no download
  config = cifar10.get_config()
  with tfds.testing.mock_data(num_examples=150):
    reference = evaluation.reference_statistics(config, 'test', stub_inception.PARAMS,
                                                batch_size=32)
    real = evaluation._real_images(config, 'test')
  assert reference['num_images'] == len(real) == 150
  _assert_statistics_equal(reference, stub_inception.features(real)['pool3'])


def _smooth_folder(directory, num_images: int) -> np.ndarray:
  """`num_images` 32x32 RGB pictures of 4x4 colour blocks in `directory`; returns them."""
  from PIL import Image
  directory.mkdir(parents=True)
  coarse = np.random.default_rng(2).integers(0, 256, (num_images, 4, 4, 3), np.uint8)
  pictures = np.kron(coarse, np.ones((1, 8, 8, 1), np.uint8))
  for i, picture in enumerate(pictures):
    Image.fromarray(picture).save(directory / f'{i:03d}.png')
  return pictures


@pytest.mark.slow
def test_end_to_end_fid_on_rgb_data(stub_inception, tmp_path, monkeypatch, caplog):
  """--mode=eval on RGB data (a folder): FID, KID and IS of a (1-step) model's samples in the
  JSON, TensorBoard and best.json; the reference statistics and KID features read from the
  cache at the second evaluation; FID of the split against itself ~0 and of noise large."""
  import logging
  from ddpm_jax import train
  monkeypatch.setattr(stub_inception, 'WIDTH', 64)  # 2048-wide FIDs take seconds each here
  pictures = _smooth_folder(tmp_path / 'smooth', 200)
  config = _folder_config(tmp_path / 'smooth')
  config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1)
  config.diffusion.num_timesteps = 10
  config.training.update(batch_size=8, num_train_steps=1, sample_every=0)
  config.sampling.batch_size = 8
  config.eval.update(num_samples=20, bpd_num_images=0, inception_batch_size=8)
  workdir = str(tmp_path / 'w')
  streamed = []
  stream = evaluation._stream_reference
  monkeypatch.setattr(evaluation, '_stream_reference',
                      lambda *a, **k: streamed.append(a[1]) or stream(*a, **k))
  train.train_and_evaluate(config, workdir)
  metrics = evaluation.evaluate(config, workdir)['metrics']
  assert streamed == ['train']  # a folder has no held-out split: no test metrics, none invented
  for name in ('fid_train', 'kid', 'is'):
    assert np.isfinite(metrics[name]), name
  assert 'fid_test' not in metrics
  assert metrics['num_samples'] == 20 and metrics['fid_train_reference_images'] == 200
  with caplog.at_level(logging.INFO):
    again = evaluation.evaluate(config, workdir)['metrics']
  assert streamed == ['train']  # statistics and KID features from the cache
  assert 'FID reference of train: 200 images, read from the cache' in caplog.text
  assert again['kid'] == metrics['kid'] and again['fid_train'] == metrics['fid_train']
  events = _event_values(epath.Path(workdir) / 'eval')
  assert events['fid_train'][1] == pytest.approx(metrics['fid_train'], rel=1e-6)
  assert 1 in events['samples'] and 1 in events['is'] and 1 in events['kid']
  best = json.loads((epath.Path(workdir) / 'eval' / 'best.json').read_text())
  assert (best['metric'], best['step'], best['higher_is_better']) == ('fid_train', 1, False)

  itself = evaluation.fid_metrics(config, pictures)
  noise = evaluation.fid_metrics(
      config, np.random.default_rng(0).integers(0, 256, pictures.shape, np.uint8))
  # Measured: 7e-14 and 16.7 (the KID of a set with itself is -2/N of its kernel's diagonal).
  assert abs(itself['fid_train']) < 1e-6 and noise['fid_train'] > 10, (itself, noise)
  assert noise['kid'] > 0 > itself['kid']


def test_sample_files_are_written_and_read_a_chunk_at_a_time(tmp_path):
  """50,000 samples at 256x256 are 9.8 GB: `generate` writes its file from the chunk files one
  at a time, and FID reads it `rows` at a time; the file is what np.savez would write."""
  from ddpm_jax import inference
  rng = np.random.default_rng(0)
  chunks = [rng.integers(0, 256, (n, 4, 4, 3), np.uint8) for n in (4, 4, 2)]
  paths = [epath.Path(tmp_path) / f'c{i}.npz' for i in range(3)]
  for path, chunk in zip(paths, chunks):
    inference.write_npz(path, samples=chunk, settings=np.array('s'))
  final = epath.Path(tmp_path) / 'all.npz'
  inference._write_samples_from_chunks(final, paths, 'settings', (10, 4, 4, 3))
  with np.load(final) as npz:
    np.testing.assert_array_equal(npz['samples'], np.concatenate(chunks))
    assert str(npz['settings']) == 'settings'
  parts = list(inference.iter_samples(final, 3))
  assert [len(p) for p in parts] == [3, 3, 3, 1]
  np.testing.assert_array_equal(np.concatenate(parts), np.concatenate(chunks))
  final.write_bytes(final.read_bytes()[:300])
  with pytest.raises(UserError, match=f'The samples file {final} is damaged or truncated'):
    list(inference.iter_samples(final, 3))


_TWO_PROCESS_SCRIPT = '''
import os, sys
import numpy as np
from configs import cifar10
from ddpm_jax import evaluation, fid, parallel
from tests import fid_stub
folder, out, port, process_id = sys.argv[1:]
fid.inception_features = fid_stub.features
parallel.initialize(f'127.0.0.1:{port}', 2, int(process_id))
config = cifar10.get_config()
config.data.dataset = f'folder:{folder}'
reference = evaluation.reference_statistics(config, 'train', fid_stub.PARAMS, batch_size=16,
                                            kid_images=40)
np.savez(f'{out}_{process_id}.npz', mu=reference['mu'], sigma=reference['sigma'],
         kid=reference['kid_features'])
'''


@pytest.mark.slow
def test_two_processes_compute_the_statistics_of_one(stub_inception, tmp_path):
  """Each process runs the network on its shard; float64 moments summed across processes."""
  import subprocess
  import sys
  from tests.conftest import ROOT
  from tests.test_multiprocess import ENV, _free_port
  pictures = _rgb_folder(tmp_path / 'images', 301)  # odd: the processes' shards differ by one
  config = _folder_config(tmp_path / 'images')
  one = evaluation.reference_statistics(config, 'train', stub_inception.PARAMS, batch_size=16,
                                        kid_images=40)
  script = tmp_path / 'stats.py'
  script.write_text(_TWO_PROCESS_SCRIPT)
  port = _free_port()
  env = dict(ENV, DDPM_JAX_CACHE=str(tmp_path / 'cache2'))
  processes = [subprocess.Popen([sys.executable, str(script), str(tmp_path / 'images'),
                                 str(tmp_path / 'two'), str(port), str(i)], cwd=ROOT, env=env,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
  for process in processes:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
  for i in range(2):
    two = np.load(tmp_path / f'two_{i}.npz')
    np.testing.assert_allclose(two['mu'], one['mu'], rtol=1e-12)
    np.testing.assert_allclose(two['sigma'], one['sigma'], rtol=1e-9,
                               atol=1e-12 * np.abs(one['sigma']).max())
    # The KID set: the first 20 of each process's share (every 2nd image): the first 40.
    np.testing.assert_allclose(np.sort(two['kid'], axis=0), np.sort(one['kid_features'], axis=0),
                               rtol=1e-6)
  _assert_statistics_equal(one, stub_inception.features(pictures)['pool3'])


_PEAK_MEMORY_SCRIPT = '''
import os, resource, sys
from configs import cifar10
from ddpm_jax import evaluation, fid
from tests import fid_stub
fid.inception_features = fid_stub.features
config = cifar10.get_config()
config.data.dataset = 'folder:' + sys.argv[1]
evaluation.reference_statistics(config, 'train', fid_stub.PARAMS, batch_size=200,
                                kid_images=1000)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)  # MiB
'''


@pytest.mark.slow
def test_peak_memory_of_the_statistics_does_not_grow_with_the_images(tmp_path):
  """5,000 and 20,000 32x32 images, 2048-wide features: the same peak resident memory.

  Measured: 955 and 957 MiB alone (gathering the images and features first, as before: 1063 and
  1572 MiB); in a loaded full run once 3644 and 3644 MiB. The growth is the property; the fixed
  bound only catches a process that holds far more than its imports and compiled programs.
  """
  import os
  import subprocess
  import sys
  from tests.conftest import ROOT
  _rgb_folder(tmp_path / 'f20000', 20_000)
  (tmp_path / 'f5000').mkdir()
  for i in range(5000):
    os.link(tmp_path / 'f20000' / f'{i:05d}.png', tmp_path / 'f5000' / f'{i:05d}.png')
  script = tmp_path / 'peak.py'
  script.write_text(_PEAK_MEMORY_SCRIPT)
  peaks = {}
  for count in (5000, 20_000):
    env = dict(os.environ, PYTHONPATH=ROOT, DDPM_JAX_CACHE=str(tmp_path / f'cache{count}'))
    result = subprocess.run([sys.executable, str(script), str(tmp_path / f'f{count}')],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks[count] = int(result.stdout.split()[-1])
  assert peaks[20_000] - peaks[5000] < 40, peaks  # 15,000 more images and features: 170 MiB
  assert peaks[20_000] < 4096, peaks
