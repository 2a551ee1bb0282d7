"""Where the images come from: each `config.data.dataset`, read at the configured size.

Datasets:
  digits        scikit-learn's 8x8 digits (1797 images, no download); a fixed 10% is 'test'.
  cifar10       tfds `cifar10` (train 50k, test 10k), held in memory.
  celebahq256   tfds `celeb_a_hq/256` (manual download), read from its files.
  lsun_church, lsun_bedroom, lsun_cat
                tfds `lsun/church_outdoor`, `lsun/bedroom`, `lsun/cat`, read from their files.
  folder:/path  your own images (png, jpg, jpeg, webp; recursively); train = test = all of them.
`config.data.data_dir` is the tfds data directory ('' uses tfds' default).

Images are center-cropped to a square and resized (antialiased) to `data.image_size` and
converted to `data.channels`, as uint8. Two kinds of source: an `IndexedSource` (digits and
cifar10 in memory, folders as files decoded on demand) loads images by index; a `StreamedSource`
(the 256x256 tfds datasets) reads its files in order or shuffled. `input_pipeline.py` turns them
into batches. A dataset that must be downloaded first, with no network, fails in seconds.
"""
import contextlib
import dataclasses
import functools
import os
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ddpm_jax.errors import UserError

FOLDER_PREFIX = 'folder:'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp')
# Datasets too large for memory, read from their tfds files (which need a manual preparation).
TFDS_STREAMED = {
    'celebahq256': 'celeb_a_hq/256',
    'lsun_church': 'lsun/church_outdoor',
    'lsun_bedroom': 'lsun/bedroom',
    'lsun_cat': 'lsun/cat',
}
DATASETS = ('digits', 'cifar10', *TFDS_STREAMED, FOLDER_PREFIX + '/path/to/images')
DIGITS_TEST_FRACTION = 0.1

_PROBE_TIMEOUT_S = 5  # for a download host to take a connection


@dataclasses.dataclass(frozen=True)
class IndexedSource:
  """Images addressable by index: held in memory, or files decoded on demand."""
  size: int
  load: Callable[[tf.Tensor], tf.Tensor]  # int64 indices [b] -> uint8 [b, H, W, C]


@dataclasses.dataclass(frozen=True)
class StreamedSource:
  """A prepared tfds dataset read sequentially from its files (too large for memory)."""
  builder: tfds.core.DatasetBuilder
  split: str  # the tfds split name
  size: int
  shuffle_buffer: int
  decode: Callable[[tf.Tensor], tf.Tensor]  # encoded image -> uint8 [H, W, C]

  def read(self, split: str, *, key: tf.Tensor | None = None) -> tf.data.Dataset:
    """Encoded images of `split` (a subsplit of self.split): in order, or shuffled by `key`."""
    if key is None:
      file_seed = buffer_seed = None
    else:
      seeds = tf.random.stateless_uniform([2], seed=key, minval=0, maxval=2**31 - 1,
                                          dtype=tf.int64)
      file_seed, buffer_seed = seeds[0], seeds[1]
    read_config = tfds.ReadConfig(shuffle_seed=file_seed, try_autocache=False,
                                  skip_prefetch=True)
    ds = self.builder.as_dataset(split=split, shuffle_files=key is not None,
                                 read_config=read_config,
                                 decoders={'image': tfds.decode.SkipDecoding()})
    ds = ds.map(lambda example: example['image'])
    if key is not None:
      ds = ds.shuffle(self.shuffle_buffer, seed=buffer_seed)
    return ds


def source(config, split: str) -> IndexedSource | StreamedSource:
  """The images of split 'train' or 'test' of config.data.dataset, at the configured size."""
  data = config.data
  if split not in ('train', 'test'):
    raise UserError(f"Unknown split {split!r}; use 'train' or 'test'.")
  if data.channels not in (1, 3):
    raise UserError(f'data.channels={data.channels} is not supported; use 1 or 3.')
  name = 'train' if split == 'train' else data.eval_split
  return load_source(data.dataset, data.data_dir, data.image_size, data.channels, name,
                      data.shuffle_buffer)


@functools.lru_cache(maxsize=8)
def load_source(dataset: str, data_dir: str, image_size: int, channels: int, split: str,
                 shuffle_buffer: int) -> IndexedSource | StreamedSource:
  fit = functools.partial(_fit, size=image_size, channels=channels)
  if dataset == 'digits':
    return _in_memory(fit(_digits(split)))
  if dataset == 'cifar10':
    return _in_memory(fit(_tfds_images('cifar10', split, data_dir)))
  if dataset.startswith(FOLDER_PREFIX):
    paths = tf.constant(_image_paths(dataset[len(FOLDER_PREFIX):]))
    decode = lambda path: fit(_decode(tf.io.read_file(path)))
    signature = tf.TensorSpec([image_size, image_size, channels], tf.uint8)
    load = lambda indices: tf.map_fn(decode, tf.gather(paths, indices),
                                     fn_output_signature=signature)
    return IndexedSource(size=len(paths), load=load)
  if dataset in TFDS_STREAMED:
    builder = _prepared_builder(TFDS_STREAMED[dataset], data_dir,
                                unprepared=_not_prepared_message(dataset))
    _check_split(builder, split)
    return StreamedSource(builder=builder, split=split,
                           size=builder.info.splits[split].num_examples,
                           shuffle_buffer=shuffle_buffer,
                           decode=lambda encoded: fit(_decode(encoded)))
  raise UserError(f'Unknown dataset {dataset!r}; valid datasets are {", ".join(DATASETS)}.')


def _in_memory(images: tf.Tensor) -> IndexedSource:
  return IndexedSource(size=int(images.shape[0]), load=lambda i: tf.gather(images, i))


def _digits(split: str) -> np.ndarray:
  """scikit-learn's digits as uint8 [N, 8, 8, 1]; 'test' is a fixed random 10%."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  if split not in ('train', 'test'):
    raise UserError(f"digits has the splits 'train' and 'test', not {split!r}; set "
                    "--config.data.eval_split=test.")
  images = np.round(load_digits().images * (255 / 16)).astype(np.uint8)[..., None]
  order = np.random.RandomState(0).permutation(len(images))
  num_test = round(len(images) * DIGITS_TEST_FRACTION)
  return images[np.sort(order[:num_test] if split == 'test' else order[num_test:])]


def _tfds_images(name: str, split: str, data_dir: str) -> np.ndarray:
  """All images of a (small) tfds split as uint8 [N, H, W, C]; downloads it if needed."""
  builder = _prepared_builder(name, data_dir)
  _check_split(builder, split)
  ds = builder.as_dataset(split=split, batch_size=10_000)
  return np.concatenate([batch['image'] for batch in tfds.as_numpy(ds)])


def _prepared_builder(name: str, data_dir: str,
                      unprepared: str | None = None) -> tfds.core.DatasetBuilder:
  """The tfds builder of `name`, prepared: downloaded here unless `unprepared` says how to."""
  builder = tfds.builder(name, data_dir=data_dir or None)
  if not builder.is_prepared():
    if unprepared:
      raise UserError(unprepared)
    unreachable = _unreachable_host(builder.url_infos or {})
    if unreachable:
      raise UserError(f'tfds {name!r} is not prepared in {builder.data_dir_root} and its '
                      f'download host {unreachable} cannot be reached (no network?); run '
                      f'`tfds build {name} --data_dir=DIR` where there is internet access and '
                      f'pass --config.data.data_dir=DIR.')
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'Could not download and prepare tfds {name!r} ({type(e).__name__}: '
                      f'{e}); run `tfds build {name} --data_dir=DIR` where there is internet '
                      f'access and pass --config.data.data_dir=DIR.') from e
  return builder


def _unreachable_host(urls) -> str | None:
  """'HOST:PORT' of the first of `urls`' hosts (or their proxy) that takes no connection.

  Each gets _PROBE_TIMEOUT_S, name lookup included; None if all connect. Offline, tfds' own
  download would retry for minutes before failing.
  """
  proxies = urllib.request.getproxies()
  addresses = {}
  for url in map(urllib.parse.urlsplit, urls):
    proxy = proxies.get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname):
      url = urllib.parse.urlsplit(proxy)
    addresses[url.hostname] = (url.hostname, url.port or (443 if url.scheme == 'https' else 80))
  connected = set()

  def connect(address):
    with contextlib.suppress(OSError), socket.create_connection(address, _PROBE_TIMEOUT_S):
      connected.add(address)

  threads = [threading.Thread(target=connect, args=(a,), daemon=True) for a in addresses.values()]
  for thread in threads:
    thread.start()
  deadline = time.monotonic() + _PROBE_TIMEOUT_S
  for thread in threads:  # a name lookup can outlast the socket's timeout: stop waiting anyway
    thread.join(max(0.0, deadline - time.monotonic()))
  return next((f'{host}:{port}' for host, port in addresses.values()
               if (host, port) not in connected), None)


def _check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
  splits = builder.info.splits  # empty under tfds.testing.mock_data
  if splits and split not in splits:
    raise UserError(f'tfds {builder.name!r} has no split {split!r} (it has '
                    f'{", ".join(splits)}); set --config.data.eval_split to one of them.')


def _not_prepared_message(dataset: str) -> str:
  name = TFDS_STREAMED[dataset]
  if dataset == 'celebahq256':
    return (f'tfds {name!r} is not prepared in --config.data.data_dir: put the CelebA-HQ tar '
            f'files (data2x2.tar ... data1024x1024.tar, made as in '
            f'github.com/tkarras/progressive_growing_of_gans) in a folder DIR and run '
            f'`tfds build {name} --manual_dir=DIR --data_dir=DATA_DIR`, or use '
            f'--config.data.dataset=folder:/path/to/celebahq256/images.')
  category = name.split('/')[-1]
  return (f'tfds {name!r} is not prepared in --config.data.data_dir: run `pip install '
          f'tensorflow-io lmdb && tfds build {name} --data_dir=DATA_DIR` (it downloads from '
          f'dl.yf.io), or export the LSUN lmdb to image files with `python data.py export '
          f'{category}_train_lmdb --out_dir DIR --flat` from github.com/fyu/lsun and use '
          f'--config.data.dataset=folder:DIR.')


def _image_paths(folder: str) -> list[str]:
  """The image files under `folder` (recursively), sorted so every process agrees."""
  if not tf.io.gfile.isdir(folder):
    raise UserError(f'The image folder {folder!r} does not exist; use '
                    f'--config.data.dataset=folder:/path/to/images.')
  paths = sorted(os.path.join(root, name)
                 for root, _, names in tf.io.gfile.walk(folder)
                 for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise UserError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) found in {folder!r}; put '
                    'images there or point dataset=folder:... at another folder.')
  return paths


def naming_undecodable_images(config, batches: Iterator[dict]) -> Iterator[dict]:
  """`batches`, where for a folder dataset a decode error becomes a UserError naming the file.

  TensorFlow's error names no file, so after one the folder's files are decoded one by one
  (nothing is checked up front: that would decode every image once more per run).
  """
  if not config.data.dataset.startswith(FOLDER_PREFIX):
    return batches
  return _undecodable_named(batches, config.data.dataset[len(FOLDER_PREFIX):])


def _undecodable_named(batches: Iterator[dict], folder: str) -> Iterator[dict]:
  try:
    yield from batches
  except tf.errors.InvalidArgumentError:
    for path in _image_paths(folder):  # only after a failure: decoding each file costs a scan
      try:
        _decode(tf.io.read_file(path))
      except tf.errors.InvalidArgumentError as decode_error:
        reason = re.sub(r'\{\{.*?\}\}', '', decode_error.message.split('[Op:')[0]).strip()
        raise UserError(f'Cannot decode the image {path} ({reason.rstrip(".")}); repair or '
                        'delete it, or move it out of the folder.') from None
    raise


def _decode(encoded: tf.Tensor) -> tf.Tensor:
  """A png/jpeg/webp/gif/bmp image -> uint8 [h, w, 3]."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def _fit(images, *, size: int, channels: int) -> tf.Tensor:
  """uint8 images [..., h, w, c] -> center-cropped squares, resized to size x size, `channels`."""
  images = tf.convert_to_tensor(images)
  if images.shape[-1] != channels:
    convert = tf.image.rgb_to_grayscale if channels == 1 else tf.image.grayscale_to_rgb
    images = convert(images)
  if tuple(images.shape[-3:-1]) == (size, size):
    return images
  height, width = tf.shape(images)[-3], tf.shape(images)[-2]
  side = tf.minimum(height, width)
  images = tf.image.crop_to_bounding_box(images, (height - side) // 2, (width - side) // 2,
                                         side, side)
  images = tf.image.resize(images, [size, size], method='bicubic', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
