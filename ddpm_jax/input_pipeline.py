"""Input pipeline: training and evaluation batches from tf.data, as numpy.

The images come from `datasets.py` (`config.data.dataset`), uint8 at the configured size; here
they are scaled as the authors did (`x / 127.5 - 1`, range [-1, 1]), batched and, for
training, flipped horizontally at random if `data.random_flip`. Each process reads its own shard.

Determinism: the training batch of step s is a pure function of (config, s, process layout), so a
resumed run sees exactly the data an uninterrupted one would. Each process's shard is read as an
endless stream of epochs, epoch e shuffled by a key derived from (seed, e); the stream is cut
into batches, and the flips of step s are keyed by (seed, process, s). Resuming at step s starts
at the epoch holding position s * local_batch and skips into it. Two kinds of source:
  * indexed (digits and cifar10 in memory, folders as files decoded on demand): each epoch is an
    exact permutation of the shard's indices (every process_count-th image), and resuming skips
    indices only;
  * streamed (the 256x256 tfds datasets; a shard is a contiguous range of the split): file order
    and a buffer of `data.shuffle_buffer` images are shuffled per epoch; resuming reads, without
    decoding, at most one epoch.
"""
from typing import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf

from ddpm_jax import datasets
from ddpm_jax.errors import UserError

_FOREVER = 2**62
_SHUFFLE, _FLIP = 0, 1  # independent random streams
_AUTOTUNE = tf.data.AUTOTUNE

try:  # tf.data only: keep TensorFlow off the accelerators that JAX uses
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TensorFlow was initialized already
  pass


# ---------------------------------------------------------------------------------------------
# Public API


def create_train_iterator(config, *, start_step: int = 0) -> Iterator[dict]:
  """Yields {'image': np.float32 [B_local, H, W, C] in [-1, 1]} forever.

  B_local = config.training.batch_size // jax.process_count(). The k-th batch yielded is the data
  of step start_step + k. Raises UserError if the global batch is not divisible by
  jax.process_count().
  """
  ds = _train_dataset(config, start_step, jax.process_index(), jax.process_count())
  return datasets.naming_undecodable_images(config, ds.as_numpy_iterator())


def create_eval_iterator(config, split: str, *, batch_size: int,
                         num_images: int | None = None,
                         subset_seed: int | None = None) -> Iterator[dict]:
  """One deterministic pass over the first `num_images` images (all if None) of `split`.

  `split` is 'train' or 'test' (config.data.eval_split names the test split). Unshuffled, no
  flips, this process's shard. Yields {'image': float32 [b_local, H, W, C] in [-1, 1],
  'mask': bool [b_local]}, b_local = batch_size // jax.process_count(); every process yields
  the same number of batches, all of size b_local, and `mask` is False on the padding.
  With `subset_seed`, the `num_images` are a random subset of the split fixed by that seed
  (in the split's order) instead of its first images; streamed sources then read, without
  decoding, the whole split to pick them out.
  """
  ds = _eval_dataset(config, split, batch_size, num_images,
                     jax.process_index(), jax.process_count(), subset_seed)
  return datasets.naming_undecodable_images(config, ds.as_numpy_iterator())


def num_examples(config, split: str) -> int:
  """The number of images in `split` ('train' or 'test'), over all processes."""
  return datasets.source(config, split).size


# ---------------------------------------------------------------------------------------------
# Pipelines


def _train_dataset(config, start_step: int, process_index: int,
                   process_count: int) -> tf.data.Dataset:
  """The training batches of steps start_step, start_step + 1, ... for one process."""
  batch = _local_batch_size(config.training.batch_size, process_count, 'training.batch_size')
  source = datasets.source(config, 'train')
  seed = config.seed
  start = start_step * batch  # position in this process's stream of images

  if isinstance(source, datasets.IndexedSource):
    shard = _shard_indices(source.size, process_index, process_count)
    _nonempty(len(shard), config)
    indices = _index_batches(shard, seed, start, batch)
    images = indices.map(source.load, _AUTOTUNE)
  else:
    begin, end = _shard_range(source.size, process_index, process_count)
    split = f'{source.split}[{begin}:{end}]'
    encoded = _epochs(lambda e: source.read(split, key=_key(seed, _SHUFFLE, e)), start,
                      _nonempty(end - begin, config))
    images = encoded.map(source.decode, _AUTOTUNE).batch(batch, drop_remainder=True)

  def finish(step, images):
    if config.data.random_flip:
      key = _key(seed, _FLIP, process_index, step)
      images = _flip(images, tf.random.stateless_uniform([batch], seed=key) < 0.5)
    return {'image': _to_float(images)}

  steps = tf.data.Dataset.range(start_step, _FOREVER)
  ds = tf.data.Dataset.zip((steps, images)).map(finish, _AUTOTUNE)
  return ds.prefetch(_AUTOTUNE).with_options(_options())


def _eval_dataset(config, split: str, batch_size: int, num_images: int | None,
                  process_index: int, process_count: int,
                  subset_seed: int | None = None) -> tf.data.Dataset:
  """One pass over the first num_images images of `split` (or a random subset of that many
  when `subset_seed` is given), this process's shard, padded."""
  batch = _local_batch_size(batch_size, process_count, 'batch_size')
  source = datasets.source(config, split)
  total = source.size if num_images is None else max(0, min(num_images, source.size))
  subset = None
  if subset_seed is not None and total < source.size:
    subset = np.sort(np.random.default_rng(subset_seed).choice(source.size, total,
                                                               replace=False))
  # Every process yields the same number of full batches (collectives need that).
  per_process = -(-total // process_count)
  if subset is not None and not isinstance(source, datasets.IndexedSource):
    ranges = [_shard_range(source.size, p, process_count) for p in range(process_count)]
    per_process = max(np.count_nonzero((subset >= b) & (subset < e)) for b, e in ranges)
  padded = -(-per_process // batch) * batch

  if isinstance(source, datasets.IndexedSource):
    shard = (_shard_indices(total, process_index, process_count) if subset is None
             else subset[process_index::process_count])
    indices = np.zeros(padded, np.int64)
    indices[:len(shard)] = shard
    mask = np.arange(padded) < len(shard)
    ds = tf.data.Dataset.from_tensor_slices((indices, mask)).batch(batch)
    ds = ds.map(lambda i, m: (source.load(i), m), _AUTOTUNE)
  else:
    size, channels = config.data.image_size, config.data.channels
    padding = tf.data.Dataset.from_tensors((tf.zeros([size, size, channels], tf.uint8), False))
    ds = padding.repeat()
    if subset is None:
      begin, end = _shard_range(total, process_index, process_count)
      keep = None
    else:  # this process reads its range of the whole split and keeps the chosen images
      begin, end = _shard_range(source.size, process_index, process_count)
      keep = np.zeros(end - begin, bool)
      keep[subset[(subset >= begin) & (subset < end)] - begin] = True
    if end > begin:
      encoded = source.read(f'{source.split}[{begin}:{end}]')
      if keep is not None:
        keep = tf.constant(keep)
        encoded = encoded.enumerate().filter(lambda i, _: keep[i]).map(lambda _, x: x)
      images = encoded.map(source.decode, _AUTOTUNE)
      ds = images.map(lambda x: (x, True)).concatenate(ds)
    ds = ds.take(padded).batch(batch)

  ds = ds.map(lambda images, mask: {'image': _to_float(images), 'mask': mask})
  return ds.prefetch(_AUTOTUNE).with_options(_options())


def _index_batches(shard: np.ndarray, seed: int, start: int, batch: int) -> tf.data.Dataset:
  """Batches of indices into the data from position `start` of the stream of epochs.

  Epoch e is the permutation of `shard` keyed by (seed, e). Epochs are cut into batches and
  rebatched, which crosses epoch boundaries as a flat stream would, without per-element work.
  """
  start_epoch, offset = divmod(start, len(shard))
  shard = tf.constant(shard, tf.int64)

  def epoch(e):
    order = tf.random.experimental.stateless_shuffle(shard, seed=_key(seed, _SHUFFLE, e))
    skip = tf.where(e == start_epoch, tf.constant(offset, tf.int64), 0)
    return tf.data.Dataset.from_tensor_slices(order[skip:]).batch(batch)

  epochs = tf.data.Dataset.range(start_epoch, _FOREVER)
  return epochs.flat_map(epoch).rebatch(batch, drop_remainder=True)


def _epochs(epoch_fn: Callable[[tf.Tensor], tf.data.Dataset], start: int,
            size: int) -> tf.data.Dataset:
  """The stream of elements of epoch_fn(0), epoch_fn(1), ... (each `size` long) from `start`."""
  epoch_fn = tf.autograph.experimental.do_not_convert(epoch_fn)
  return tf.data.Dataset.range(start // size, _FOREVER).flat_map(epoch_fn).skip(start % size)


def _flip(images: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
  """Mirrors images [B, H, W, C] left-right where flip [B] is True (a gather: faster than where)."""
  width = images.shape[2]
  columns = tf.range(width)
  columns = tf.where(flip[:, None], width - 1 - columns, columns)
  return tf.gather(images, columns, axis=2, batch_dims=1)


def _to_float(images: tf.Tensor) -> tf.Tensor:
  """uint8 [0, 255] -> float32 [-1, 1], as the authors scaled images."""
  return tf.cast(images, tf.float32) / 127.5 - 1.0


def _key(seed: int, *data) -> tf.Tensor:
  """A stateless-RNG seed ([2] int64) for the random stream named by (seed, *data)."""
  key = tf.constant([seed, 0], tf.int64)
  for d in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
  return key


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def _local_batch_size(global_batch: int, process_count: int, what: str) -> int:
  if global_batch < 1 or global_batch % process_count:
    raise UserError(f'{what}={global_batch} must be a positive multiple of the '
                    f'{process_count} processes.')
  return global_batch // process_count


def _shard_indices(size: int, process_index: int, process_count: int) -> np.ndarray:
  """This process's share of range(size): every process_count-th index."""
  return np.arange(process_index, size, process_count, dtype=np.int64)


def _shard_range(size: int, process_index: int, process_count: int) -> tuple[int, int]:
  """This process's share of range(size) for data read in order: [begin, end)."""
  return size * process_index // process_count, size * (process_index + 1) // process_count


def _nonempty(size: int, config) -> int:
  if size < 1:
    raise UserError(f'Dataset {config.data.dataset!r} has fewer training images than '
                    'processes; use more images.')
  return size
