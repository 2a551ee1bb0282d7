"""Tests of the input pipeline: shapes, determinism and resumption, sharding, errors."""
import itertools
import socket
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import cifar10 as cifar10_config
from configs import digits as digits_config
from configs import lsun_church256
from ddpm_jax import datasets, input_pipeline
from ddpm_jax.errors import UserError


@pytest.fixture(autouse=True)
def _fresh_sources():
  datasets.load_source.cache_clear()
  yield
  datasets.load_source.cache_clear()


def _digits_config(batch_size=64, seed=0, random_flip=False):
  config = digits_config.get_config()
  config.training.batch_size = batch_size
  config.seed = seed
  config.data.random_flip = random_flip
  return config


def _take(iterator, n):
  return [batch['image'] for batch in itertools.islice(iterator, n)]


def _uint8(images):
  return np.round((np.asarray(images) + 1) * 127.5).astype(np.uint8)


def _train_batches(config, n, start_step=0, process_index=0, process_count=1):
  ds = input_pipeline._train_dataset(config, start_step, process_index, process_count)
  return _take(ds.as_numpy_iterator(), n)


@pytest.fixture
def numbered(monkeypatch):
  """Replaces the data by `size` 2x2 images whose pixels say their index: row 0 is i // 256,
  row 1 is i % 256 (horizontal flips keep it readable)."""

  def use(size):
    def load(indices):
      rows = tf.cast(tf.stack([indices // 256, indices % 256], axis=1), tf.uint8)
      return tf.tile(rows[:, :, None, None], [1, 1, 2, 1])

    source = datasets.IndexedSource(size=size, load=load)
    monkeypatch.setattr(datasets, 'source', lambda config, split: source)

  return use


def _indices(images):
  images = _uint8(images)
  return images[:, 0, 0, 0].astype(np.int64) * 256 + images[:, 1, 0, 0]


def test_digits_batches_shape_dtype_range():
  config = _digits_config(batch_size=32)
  batch = next(input_pipeline.create_train_iterator(config))
  assert set(batch) == {'image'}
  image = batch['image']
  assert image.shape == (32, 8, 8, 1) and image.dtype == np.float32
  assert image.min() == -1.0 and image.max() == 1.0
  # uint8 v * 255 / 16, scaled x / 127.5 - 1: every value is on that grid.
  np.testing.assert_allclose(image, _uint8(image) / 127.5 - 1, atol=1e-6)
  assert input_pipeline.num_examples(config, 'train') == 1617
  assert input_pipeline.num_examples(config, 'test') == 180


def test_resume_sees_the_data_of_an_uninterrupted_run():
  config = _digits_config(batch_size=500, random_flip=True)  # 1617 images: epochs wrap
  uninterrupted = _take(input_pipeline.create_train_iterator(config), 10)
  resumed = _take(input_pipeline.create_train_iterator(config, start_step=5), 5)
  for a, b in zip(uninterrupted[5:], resumed):
    np.testing.assert_array_equal(a, b)
  again = _take(input_pipeline.create_train_iterator(config), 10)
  for a, b in zip(uninterrupted, again):
    np.testing.assert_array_equal(a, b)
  other_config = _digits_config(batch_size=500, seed=1, random_flip=True)
  other_seed = _take(input_pipeline.create_train_iterator(other_config), 1)
  assert not np.array_equal(uninterrupted[0], other_seed[0])


def test_flips_mirror_some_images_and_keep_the_order():
  plain = _take(input_pipeline.create_train_iterator(_digits_config(256)), 1)[0]
  flipped = _take(input_pipeline.create_train_iterator(_digits_config(256, random_flip=True)), 1)[0]
  same = np.all(plain == flipped, axis=(1, 2, 3))
  mirrored = np.all(plain[:, :, ::-1] == flipped, axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert 64 < np.sum(~same) < 192  # about half


def test_epochs_are_permutations_that_wrap_into_each_other(numbered):
  numbered(10)
  config = _digits_config(batch_size=4)  # 10 images: batches cross epoch boundaries
  stream = np.concatenate([_indices(b) for b in _train_batches(config, 10)])
  epochs = stream.reshape(4, 10)
  for epoch in epochs:
    assert sorted(epoch) == list(range(10))
  assert len({tuple(epoch) for epoch in epochs}) == 4  # reshuffled every epoch
  for start_step in range(1, 6):
    resumed = np.concatenate([_indices(b) for b in _train_batches(config, 2, start_step)])
    np.testing.assert_array_equal(resumed, stream[4 * start_step:4 * start_step + 8])


def test_process_shards_are_disjoint_and_cover_the_data(numbered):
  numbered(30)
  config = _digits_config(batch_size=6)  # 3 images per process and step
  shards = []
  for process_index in range(2):
    batches = _train_batches(config, 5, process_index=process_index, process_count=2)
    assert all(b.shape == (3, 2, 2, 1) for b in batches)
    shards.append(set(np.concatenate([_indices(b) for b in batches])))  # 15 = one epoch
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == set(range(30))


def test_global_batch_must_divide_over_processes():
  with pytest.raises(UserError, match='multiple of the 3 processes'):
    input_pipeline._train_dataset(_digits_config(batch_size=64), 0, 0, 3)


def test_eval_iterator_covers_num_images_with_a_mask(numbered):
  numbered(50)
  config = _digits_config()
  batches = list(input_pipeline.create_eval_iterator(config, 'test', batch_size=16,
                                                     num_images=37))
  assert len(batches) == 3
  assert all(b['image'].shape == (16, 2, 2, 1) and b['mask'].shape == (16,) for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  indices = np.concatenate([_indices(b['image']) for b in batches])
  assert mask.sum() == 37
  np.testing.assert_array_equal(indices[mask], np.arange(37))  # unshuffled, in order
  # Two processes: the same number of equal-size batches, together the first 37 images.
  seen = []
  for process_index in range(2):
    ds = input_pipeline._eval_dataset(config, 'test', 16, 37, process_index, 2)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 3 and all(b['mask'].shape == (8,) for b in batches)
    seen += [i for b in batches for i in _indices(b['image'])[b['mask']]]
  assert sorted(seen) == list(range(37))


def test_eval_iterator_on_digits_is_all_of_the_test_split():
  config = _digits_config()
  batches = list(input_pipeline.create_eval_iterator(config, 'test', batch_size=100))
  assert sum(b['mask'].sum() for b in batches) == 180
  assert batches[0]['image'].dtype == np.float32 and batches[0]['mask'].dtype == bool


def test_cifar10_through_mock_data(monkeypatch):
  monkeypatch.setattr(datasets, '_unreachable_host', lambda urls: None)  # mock: no download
  config = cifar10_config.get_config()
  config.training.batch_size = 8
  with tfds.testing.mock_data(num_examples=20):
    batch = next(input_pipeline.create_train_iterator(config))
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
    assert -1 <= batch['image'].min() and batch['image'].max() <= 1
    evaluation = list(input_pipeline.create_eval_iterator(config, 'test', batch_size=16))
    assert sum(b['mask'].sum() for b in evaluation) == 20
    assert evaluation[0]['image'].shape == (16, 32, 32, 3)


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def test_folder_of_images_of_different_sizes(tmp_path):
  wide = np.zeros((12, 36, 3), np.uint8)
  wide[:, 12:24] = 255  # the center square is white: center-cropped, all white
  _save(tmp_path / 'a.png', wide)
  _save(tmp_path / 'sub' / 'b.jpg', np.full((40, 20, 3), 128, np.uint8))
  _save(tmp_path / 'sub' / 'c.PNG', np.full((5, 5), 7, np.uint8))  # grayscale, upsampled
  _save(tmp_path / 'd.webp', np.full((16, 16, 3), 200, np.uint8))
  (tmp_path / 'notes.txt').write_text('not an image')
  config = _digits_config(batch_size=4)
  config.data.dataset = f'folder:{tmp_path}'
  config.data.channels = 3
  assert input_pipeline.num_examples(config, 'train') == 4
  assert input_pipeline.num_examples(config, 'test') == 4
  batch = next(input_pipeline.create_train_iterator(config))['image']
  assert batch.shape == (4, 8, 8, 3)
  images = [_uint8(b['image'][0]) for b in
            input_pipeline.create_eval_iterator(config, 'test', batch_size=1)]
  assert len(images) == 4
  # Sorted paths: a.png (its white center square), d.webp, sub/b.jpg, sub/c.PNG.
  assert images[0].min() == 255
  for image, value in zip(images[1:], (200, 128, 7)):
    assert np.abs(image.astype(int) - value).max() <= 2
  config.data.channels = 1
  datasets.load_source.cache_clear()
  assert next(input_pipeline.create_train_iterator(config))['image'].shape == (4, 8, 8, 1)


def test_an_image_that_fails_to_decode_is_named(tmp_path):
  _save(tmp_path / 'a.png', np.full((9, 9, 3), 10, np.uint8))
  _save(tmp_path / 'b.jpg', np.full((9, 9, 3), 20, np.uint8))
  _save(tmp_path / 'c.jpg', np.full((9, 9, 3), 30, np.uint8))
  truncated = tmp_path / 'c.jpg'
  truncated.write_bytes(truncated.read_bytes()[:200])
  config = _digits_config(batch_size=3)
  config.data.dataset = f'folder:{tmp_path}'
  config.data.channels = 3
  expected = (f'Cannot decode the image {truncated} (jpeg::Uncompress failed. Invalid JPEG data '
              'or crop window); repair or delete it, or move it out of the folder.')
  with pytest.raises(UserError) as error:
    next(input_pipeline.create_train_iterator(config))
  assert str(error.value) == expected
  with pytest.raises(UserError) as error:
    list(input_pipeline.create_eval_iterator(config, 'test', batch_size=1))
  assert str(error.value) == expected
  truncated.unlink()  # the others decode
  datasets.load_source.cache_clear()
  assert next(input_pipeline.create_train_iterator(config))['image'].shape == (3, 8, 8, 3)


def test_empty_or_missing_folder_is_a_user_error(tmp_path):
  (tmp_path / 'empty' / 'sub').mkdir(parents=True)
  (tmp_path / 'empty' / 'sub' / 'readme.txt').write_text('no images here')
  config = _digits_config()
  config.data.dataset = f'folder:{tmp_path / "empty"}'
  with pytest.raises(UserError, match='No images'):
    input_pipeline.create_train_iterator(config)
  config.data.dataset = f'folder:{tmp_path / "missing"}'
  with pytest.raises(UserError, match='does not exist'):
    input_pipeline.num_examples(config, 'train')


def test_unknown_dataset_lists_the_valid_ones():
  config = _digits_config()
  config.data.dataset = 'imagenet'
  with pytest.raises(UserError) as error:
    input_pipeline.create_train_iterator(config)
  message = str(error.value)
  assert "'imagenet'" in message
  for name in ('digits', 'cifar10', 'celebahq256', 'lsun_church', 'lsun_bedroom', 'lsun_cat',
               'folder:'):
    assert name in message


@pytest.mark.parametrize('dataset, hint', [('celebahq256', 'manual_dir'),
                                           ('lsun_church', 'data.py export'),
                                           ('lsun_bedroom', 'lsun/bedroom'),
                                           ('lsun_cat', 'folder:')])
def test_unprepared_tfds_datasets_say_how_to_prepare_them(tmp_path, dataset, hint):
  config = lsun_church256.get_config()
  config.data.dataset = dataset
  config.data.data_dir = str(tmp_path)
  with pytest.raises(UserError, match='is not prepared') as error:
    input_pipeline.create_train_iterator(config)
  assert hint in str(error.value) and 'tfds build' in str(error.value)


_PROXY_VARIABLES = ('https_proxy', 'HTTPS_PROXY', 'http_proxy', 'HTTP_PROXY', 'all_proxy',
                    'ALL_PROXY', 'no_proxy', 'NO_PROXY')


@pytest.fixture
def connections(monkeypatch):
  """socket.create_connection replaced (so nothing leaves the machine): it records each address
  and does what `connections.answer(address)` does. tfds' download never starts."""
  class Connections(list):
    answer = staticmethod(lambda address: socket.socket())  # a socket that connected

  tried = Connections()

  def create_connection(address, *args, **kwargs):
    tried.append(address)
    return tried.answer(address)

  monkeypatch.setattr(socket, 'create_connection', create_connection)
  for name in _PROXY_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      lambda *args, **kwargs: (_ for _ in ()).throw(OSError('downloading')))
  return tried


def _no_network(address):
  raise socket.gaierror(-3, 'Temporary failure in name resolution')


def _unprepared_cifar10(data_dir):
  config = cifar10_config.get_config()
  config.data.data_dir = str(data_dir)
  return config


def test_unprepared_cifar10_offline_is_one_sentence_at_once(tmp_path, connections):
  connections.answer = _no_network
  start = time.monotonic()
  with pytest.raises(UserError) as error:
    input_pipeline.create_train_iterator(_unprepared_cifar10(tmp_path))
  assert time.monotonic() - start < 30  # tfds alone retries the download for 340 s
  assert connections == [('www.cs.toronto.edu', 443)]  # cifar10's one download URL
  assert str(error.value) == (
      f"tfds 'cifar10' is not prepared in {tmp_path} and its download host "
      'www.cs.toronto.edu:443 cannot be reached (no network?); run `tfds build cifar10 '
      '--data_dir=DIR` where there is internet access and pass --config.data.data_dir=DIR.')


def test_a_name_lookup_that_hangs_is_given_up_after_the_probe_timeout(tmp_path, connections,
                                                                        monkeypatch):
  release = threading.Event()
  connections.answer = lambda address: release.wait(60) and _no_network(address)
  monkeypatch.setattr(datasets, '_PROBE_TIMEOUT_S', 0.5)
  start = time.monotonic()
  try:
    with pytest.raises(UserError, match='www.cs.toronto.edu:443 cannot be reached'):
      input_pipeline.create_train_iterator(_unprepared_cifar10(tmp_path))
  finally:
    release.set()
  assert time.monotonic() - start < 5


def test_the_probe_goes_to_the_proxy_and_a_reachable_host_downloads(tmp_path, connections,
                                                                     monkeypatch):
  monkeypatch.setenv('https_proxy', 'http://127.0.0.1:3128')
  with pytest.raises(UserError, match="Could not download and prepare tfds 'cifar10'"):
    input_pipeline.create_train_iterator(_unprepared_cifar10(tmp_path))
  assert connections == [('127.0.0.1', 3128)]


class DdpmTestImages(tfds.core.GeneratorBasedBuilder):
  """37 train and 5 validation images of varying sizes; image i is filled with the value i."""
  VERSION = tfds.core.Version('1.0.0')
  code_path = None  # no checksums file to look up (that needs `importlib_resources`)

  def _info(self):
    image = tfds.features.Image(shape=(None, None, 3))
    features = tfds.features.FeaturesDict({'image': image})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(37), 'validation': self._generate_examples(5)}

  def _generate_examples(self, num):
    for i in range(num):
      yield i, {'image': np.full((10 + i % 3, 12, 3), i, np.uint8)}


@pytest.fixture(scope='module')
def prepared_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  DdpmTestImages(data_dir=data_dir).download_and_prepare()
  return data_dir


def _values(images):
  return _uint8(images)[:, 0, 0, 0].astype(np.int64)


def test_streamed_tfds_dataset(prepared_data_dir, monkeypatch):
  monkeypatch.setitem(datasets.TFDS_STREAMED, 'lsun_church', 'ddpm_test_images')
  config = lsun_church256.get_config()
  config.data.data_dir = prepared_data_dir
  config.data.image_size = 4
  config.data.shuffle_buffer = 8
  config.training.batch_size = 8
  assert input_pipeline.num_examples(config, 'train') == 37

  # Process 0 of 2 holds 18 images: steps 0..4 are 20 images, across an epoch boundary.
  batches = _train_batches(config, 5, process_count=2)
  assert batches[0].shape == (4, 4, 4, 3)
  stream = np.concatenate([_values(b) for b in batches])
  assert len(set(stream[:18])) == 18 and set(stream[18:]) <= set(stream[:18])
  for start_step in (1, 4):
    resumed = _train_batches(config, 1, start_step, process_count=2)[0]
    np.testing.assert_array_equal(resumed, batches[start_step])
  other = np.concatenate([_values(b) for b in _train_batches(config, 5, 0, 1, 2)])
  assert not set(stream) & set(other)

  config.data.eval_split = 'validation'
  seen = []
  for process_index in range(2):
    ds = input_pipeline._eval_dataset(config, 'test', 4, None, process_index, 2)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 2 and all(b['image'].shape == (2, 4, 4, 3) for b in batches)
    seen += [v for b in batches for v in _values(b['image'])[b['mask']]]
  assert sorted(seen) == list(range(5))

  config.data.eval_split = 'test'
  with pytest.raises(UserError, match='eval_split'):
    input_pipeline.num_examples(config, 'test')


def test_a_random_eval_subset_is_fixed_by_its_seed_and_shared_by_the_processes(
    numbered, prepared_data_dir, monkeypatch):
  """subset_seed (the FID reference cap): the chosen images, in order, split over 2 processes
  that yield the same number of batches; indexed and streamed sources alike."""
  config = _digits_config()
  numbered(100)
  expected = np.sort(np.random.default_rng(3).choice(100, 30, replace=False))

  shares = []
  for process_index in range(2):
    batches = list(input_pipeline._eval_dataset(config, 'train', 8, 30, process_index, 2,
                                                subset_seed=3).as_numpy_iterator())
    assert len(batches) == 4  # 15 of the subset each, 4 a batch (8 over 2 processes)
    shares.append([v for b in batches for v in _indices(b['image'])[b['mask']]])
  assert sorted(shares[0] + shares[1]) == expected.tolist()
  assert shares[0] == expected[0::2].tolist()  # indexed: every 2nd of the subset

  monkeypatch.undo()  # the real sources again: a streamed tfds dataset of 37 images
  monkeypatch.setitem(datasets.TFDS_STREAMED, 'lsun_church', 'ddpm_test_images')
  config = lsun_church256.get_config()
  config.data.data_dir = prepared_data_dir
  config.data.image_size = 4
  in_order = [v for b in input_pipeline._eval_dataset(config, 'train', 37, None, 0, 1)
              .as_numpy_iterator() for v in _values(b['image'])]  # tfds' own order
  expected = np.array(in_order)[np.sort(np.random.default_rng(3).choice(37, 30,
                                                                         replace=False))]
  shares, counts = [], []
  for process_index in range(2):
    batches = list(input_pipeline._eval_dataset(config, 'train', 8, 30, process_index, 2,
                                                subset_seed=3).as_numpy_iterator())
    counts.append(len(batches))
    shares.append([v for b in batches for v in _values(b['image'])[b['mask']]])
  assert counts[0] == counts[1] == -(-max(map(len, shares)) // 4)
  assert shares[0] + shares[1] == expected.tolist()  # streamed: contiguous ranges, in order
