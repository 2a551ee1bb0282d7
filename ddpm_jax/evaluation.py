"""--mode=eval: the paper's numbers for a checkpoint's EMA weights.

* bits/dim (Table 1, 2): the full variational bound, `calc_bpd_loop` (T network evaluations per
  image), on the test set and a train subset, sharded over devices, resumable batch by batch;
* rate-distortion and progressive lossy compression (Table 4, Fig. 5) from the same test pass;
* FID against the train and test sets, IS and KID (Table 1, 3) for RGB datasets, on
  `eval.num_samples` samples from the resumable sampler;
* for the embedded digits: a digit classifier's view of the samples (confidence against held-out
  real digits, class shares, distance to the nearest training image).

Results go to WORKDIR/eval/<step>.json (<step>_ddim50.json and so on for another sampler; they
record the sampler settings) and WORKDIR/eval/rate_distortion_<step>.{json,png}; the scalars and
a grid of the samples to a TensorBoard run in WORKDIR/eval/ (the sampler tag in their names, e.g.
`fid_train/ddim50`), and the best evaluated checkpoint by `eval.best_metric` to
WORKDIR/eval/best<tag>.json. Bits/dim is the full T-step bound whatever the sampler. The
metrics JSON records the settings, and the numbers of bits/dim images and samples asked for and
used. Without a held-out split (data.eval_split='train', or a folder:/path dataset) only train
metrics are reported, named `*_train`.

Every file follows `inference.py`'s rule: it records its settings, and none is replaced by one
of other settings (bits/dim progress, FID reference statistics and KID reference features carry
a digest of their settings in their names; the metrics and rate-distortion JSON and the samples
refuse, before anything is computed, with one sentence).

The FID reference statistics are streamed: each process runs the Inception network over its
shard of at most `eval.fid_reference_images` images of a split (a fixed random subset of a larger
split), batch by batch, into float64 sums of the features and of their outer products, summed
over processes. Samples are featurised chunk by chunk from their file. `follower.py` runs
`evaluate` on each new checkpoint of a training run (--mode=eval --follow).
"""
import hashlib
import json
import os
import time
import zipfile
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath

from ddpm_jax import (datasets, errors, fid, images, inference as inference_lib, input_pipeline,
                      parallel)
from ddpm_jax import sampling, seeds
from ddpm_jax.config_validation import BEST_METRICS
from ddpm_jax.errors import UserError


def _write_json(path: epath.Path, data: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_text(json.dumps(data, indent=1))
  tmp.replace(path)


def _write_npz(path: epath.Path, **arrays) -> None:
  """Atomically, through a temporary name of this process's own: processes whose caches are
  one shared directory may write the same file at once."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'{path.name}.tmp{jax.process_index()}_{os.getpid()}'
  with tmp.open('wb') as f:
    np.savez(f, **arrays)
  tmp.replace(path)


def _on_every_process(flag: bool) -> bool:
  """Whether `flag` holds on every process (each may see its own local files)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.all(multihost_utils.process_allgather(np.array([flag]))))


def _after_process_0_wrote(name: str) -> None:
  """Waits until every process is here: then what process 0 wrote before it can be read."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(f'ddpm_jax_{name}')


def _read_json_or_none(path: epath.Path):
  """The JSON in `path`; None if there is none or it is damaged (with a warning naming it)."""
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    logging.warning('Ignoring the damaged %s (%s); computing it again.', path, e)
    return None


def _json_or_none(text: str):
  try:
    return json.loads(text)
  except ValueError:
    return None


def _splits(config) -> tuple[str, ...]:
  """('test', 'train'); ('train',) without a held-out split: data.eval_split='train', or a
  folder:/path dataset (whose 'test' split is its training images)."""
  no_test = (config.data.eval_split == 'train'
             or config.data.dataset.startswith(datasets.FOLDER_PREFIX))
  return ('train',) if no_test else ('test', 'train')


# === Bits/dim ===

_BPD_FNS: dict = {}  # (model and diffusion settings, devices) -> the jitted function


def _bpd_fn(inference: inference_lib.Inference):
  """Jitted (params, images, mask, rng) -> masked sums over the batch of the bound's parts.

  One function per model, diffusion and mesh, so the T-step scan is compiled once for both
  splits and for every checkpoint that the follower or `training.eval_every` evaluates.
  """
  settings = {k: v for k, v in inference.model_settings().items() if k != 'step'}
  key = (inference_lib.fingerprint(settings), tuple(inference.mesh.devices.flat))
  if key not in _BPD_FNS:
    _BPD_FNS[key] = _new_bpd_fn(inference.model, inference.diffusion)
  return _BPD_FNS[key]


def _new_bpd_fn(model, diffusion):
  """(Keeps the model and diffusion only: no checkpoint's parameters stay alive with it.)"""
  @jax.jit
  def fn(params, x, mask, rng):
    model_fn = lambda x_t, t: model.apply({'params': params}, x_t, t, train=False)
    out = diffusion.calc_bpd_loop(model_fn, x, rng, clip_denoised=True)
    w = mask.astype(jnp.float32)
    return dict(count=w.sum(), total_bpd=w @ out['total_bpd'], prior_bpd=w @ out['prior_bpd'],
                terms_bpd=w @ out['terms_bpd'], mse=w @ out['mse'])
  return fn


def bits_per_dim(inference: inference_lib.Inference, split: str, num_images: int, *,
                 batch_size: int, progress_path: epath.Path) -> dict:
  """Means over `num_images` images of `split`: total, prior, per-t terms, per-t x0 MSE.

  Progress is saved after every batch with the settings it depends on (the checkpoint step,
  model, diffusion, data, seed, counts) to `progress_path` with a digest of those settings
  added to its name (<step>_bpd_<split>_<digest>.progress.json): a rerun with the same settings
  continues there, and one with other settings writes another file. `num_images` in the result
  is the number of images used.
  """
  parallel.check_divisible(batch_size, inference.mesh, 'eval.bpd_batch_size')
  num_images = min(num_images, input_pipeline.num_examples(inference.config, split))
  num_batches = -(-num_images // batch_size)
  d = inference.config.data
  settings = inference_lib.fingerprint({
      **inference.model_settings(), 'seed': inference.config.seed,
      'data': [d.dataset, d.data_dir, d.image_size, d.channels], 'split': split,
      'num_images': num_images, 'batch_size': batch_size})
  progress_path = progress_path.parent / progress_path.name.replace(
      '.progress.json', f'_{inference_lib.settings_digest(json.loads(settings))}.progress.json')
  sums = _read_json_or_none(progress_path)
  if sums is not None and sums.get('settings') != settings:
    logging.info('%s is for other settings; computing bits/dim afresh.', progress_path)
  if sums is None or sums.get('settings') != settings:
    sums = {'batches_done': 0, 'settings': settings}
  fn = _bpd_fn(inference)
  rng = seeds.key(inference.config.seed, seeds.BITS_PER_DIM)
  batches = input_pipeline.create_eval_iterator(inference.config, split, batch_size=batch_size,
                                                num_images=num_images)
  resumed_at, start = sums['batches_done'], time.time()
  for i, batch in enumerate(batches):
    if i < sums['batches_done']:
      continue
    errors.raise_if_interrupted()  # a SIGTERM whose raise was lost inside JAX
    batch = parallel.global_batch(inference.mesh, batch)
    out = jax.tree.map(lambda v: parallel.to_host(v).tolist(),
                       fn(inference.params, batch['image'], batch['mask'],
                          jax.random.fold_in(rng, i)))
    for k, v in out.items():
      sums[k] = (np.asarray(sums[k]) + np.asarray(v)).tolist() if k in sums else v
    sums['batches_done'] = i + 1
    if jax.process_index() == 0:
      _write_json(progress_path, sums)
    seconds_per_batch = (time.time() - start) / (i + 1 - resumed_at)
    logging.info('bits/dim on %s: batch %d/%d, %.3f bits/dim so far, ETA %.0f s.', split, i + 1,
                 num_batches, sums['total_bpd'] / sums['count'],
                 seconds_per_batch * (num_batches - i - 1))
  count = sums['count']
  return {**{k: np.asarray(sums[k]) / count for k in ('total_bpd', 'prior_bpd', 'terms_bpd',
                                                      'mse')}, 'num_images': int(count)}


def rate_distortion(bpd: dict) -> dict:
  """Table 4 / Fig. 5 from the mean bound terms and x0 errors of a test pass.

  At step t (0-indexed: the receiver holds the latent q_sample(x0, t)), the rate is what was
  sent so far, the prior plus the KL terms T-1 .. t+1, and the distortion is the RMSE of the
  model's x0 prediction from that latent on the [0, 255] scale.
  """
  terms = np.asarray(bpd['terms_bpd'])
  sent_after = np.concatenate([np.cumsum(terms[::-1])[::-1][1:], [0.]])  # sum of terms[t+1:]
  rate = float(bpd['prior_bpd']) + sent_after
  distortion = np.sqrt(np.asarray(bpd['mse'])) * 127.5
  return {'t': list(range(len(terms))), 'rate_bpd': rate.tolist(),
          'distortion_rmse': distortion.tolist(), 'total_bpd': float(bpd['total_bpd'])}


def plot_rate_distortion(rd: dict, path: epath.Path) -> str:
  """Fig. 5's three panels as a PNG; a bare Figure, so pyplot's backend (a notebook's) is kept."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(13, 3.6))
  axes = fig.subplots(1, 3)
  axes[0].plot(rd['rate_bpd'], rd['distortion_rmse'])
  axes[0].set(xlabel='rate (bits/dim)', ylabel='distortion (RMSE, [0, 255])',
              title='Rate-distortion')
  axes[1].plot(rd['t'], rd['rate_bpd'])
  axes[1].set(xlabel='reverse process step t', ylabel='rate (bits/dim)', title='Rate')
  axes[2].plot(rd['t'], rd['distortion_rmse'])
  axes[2].set(xlabel='reverse process step t', ylabel='distortion (RMSE)', title='Distortion')
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    fig.savefig(f, format='png', dpi=100)
  return str(path)


# === Sample quality ===

KID_REFERENCE_IMAGES = 10_000  # the first ones of the reference set (in each process's share)
_FID_CHUNK_BATCHES = 4  # samples are read and featurised this many Inception batches at a time


def _real_images(config, split: str, num_images=None) -> np.ndarray:
  """uint8 [N, H, W, C] images of a split, all processes' shards gathered (small splits only:
  the digits check; FID streams its reference images)."""
  mesh = parallel.make_mesh()
  batch_size = 250 * mesh.size
  out = []
  for batch in input_pipeline.create_eval_iterator(config, split, batch_size=batch_size,
                                                   num_images=num_images):
    batch = parallel.global_batch(mesh, batch)
    keep = parallel.to_host(batch['mask'])
    out.append(images.to_uint8(parallel.to_host(batch['image']))[keep])
  return np.concatenate(out)


def _reference_batches(config, split: str, *, num_images: int,
                       batch_size: int) -> Iterator[np.ndarray]:
  """This process's share of the FID reference images of `split` as uint8 [<= batch_size, H, W,
  C]: the first `num_images`, or when the split is larger a random subset of that many fixed by
  `seeds.FID_REFERENCE_SUBSET`. Nothing is gathered: host memory holds a batch or two."""
  for batch in input_pipeline.create_eval_iterator(
      config, split, batch_size=batch_size * jax.process_count(), num_images=num_images,
      subset_seed=seeds.FID_REFERENCE_SUBSET):
    real = images.to_uint8(batch['image'][batch['mask']])
    if len(real):
      yield real


_DIGEST: list = []  # [(params, digest)] of the last parameters hashed


def _params_digest(params) -> str:
  """A short hash of a parameter tree's values: which Inception weights computed a statistic."""
  if _DIGEST and _DIGEST[0][0] is params:
    return _DIGEST[0][1]
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  _DIGEST[:] = [(params, digest.hexdigest()[:16])]
  return _DIGEST[0][1]


def _read_cached(path: epath.Path, key: str, names: tuple[str, ...]) -> Optional[dict]:
  """The arrays `names` of a cache file written for `key`; None if absent or damaged (rebuilt).

  Its name carries a digest of the key, so one of another key is a digest collision: it is kept
  (`inference.py`'s rule), with one sentence.
  """
  if not path.exists():
    return None
  try:
    with path.open('rb') as f, np.load(f) as npz:
      stored = str(npz['key'])
      if stored == key:
        return {name: npz[name] for name in names}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    logging.warning('Rebuilding the damaged %s (%s).', path, e)
    return None
  raise inference_lib.refusal(path, _json_or_none(stored), json.loads(key),
                              'move it away to compute these')


def reference_statistics(config, split: str, inception_params, *, batch_size: int,
                         kid_images: int = 0) -> dict:
  """The FID reference of a split: {'mu', 'sigma', 'num_images'} and with `kid_images`,
  'kid_features' (float32 [<= kid_images, D]), each computed once and cached.

  The reference set is min(eval.fid_reference_images, the split's size) images (see
  `_reference_batches`). Each process runs the network over its share, batch by batch, into
  `fid.FeatureMoments`; the moments are summed over processes. The KID features are the first
  kid_images / process_count of each process's share, gathered. The cache files, in
  `fid.weights.cache_dir()/fid_stats/`, are keyed by the dataset, split, image size, data_dir,
  the Inception weights and the reference count and cap, which their names also carry.
  """
  d = config.data
  cap = config.eval.fid_reference_images
  num_images = min(cap, input_pipeline.num_examples(config, split))
  key = inference_lib.fingerprint({
      'dataset': d.dataset, 'split': split, 'size': d.image_size, 'data_dir': d.data_dir,
      'inception': _params_digest(inception_params), 'num_images': num_images,
      'fid_reference_images': cap, 'subset_seed': seeds.FID_REFERENCE_SUBSET})
  name = (f'{d.dataset}_{split}_{d.image_size}_n{num_images}_cap{cap}_'
          f'{hashlib.sha256(key.encode()).hexdigest()[:12]}').replace('/', '_').replace(':', '_')
  directory = epath.Path(fid.weights.cache_dir()) / 'fid_stats'
  stats_path, kid_path = directory / f'{name}.npz', directory / f'{name}_kid{kid_images}.npz'
  stats = _read_cached(stats_path, key, ('mu', 'sigma'))
  kid = _read_cached(kid_path, key, ('features',)) if kid_images else None
  need_stats = not _on_every_process(stats is not None)
  need_kid = bool(kid_images) and not _on_every_process(kid is not None)
  if need_stats or need_kid:
    moments, kid_rows = _stream_reference(config, split, inception_params,
                                          num_images=num_images, batch_size=batch_size,
                                          kid_per_process=-(-kid_images // jax.process_count()),
                                          moments=need_stats)
    if need_stats:
      mu, sigma = moments.summed_over_processes().statistics()
      stats = {'mu': mu, 'sigma': sigma}
      _write_npz(stats_path, **stats, key=np.array(key), num_images=num_images)
    if need_kid:
      kid = {'features': fid.gather_rows(kid_rows)[:kid_images]}
      _write_npz(kid_path, features=kid['features'], key=np.array(key))
  else:
    logging.info('FID reference of %s: %d images, read from the cache %s.', split, num_images,
                 stats_path)
  out = {**stats, 'num_images': num_images}
  if kid_images:
    out['kid_features'] = kid['features']
  return out


def _stream_reference(config, split: str, inception_params, *, num_images: int,
                      batch_size: int, kid_per_process: int, moments: bool):
  """(this process's FeatureMoments or None, its first `kid_per_process` features)."""
  accumulated = fid.FeatureMoments() if moments else None
  kid_rows, num_kid, seen = [], 0, 0
  share = -(-num_images // jax.process_count())
  start, last_log = time.time(), time.time()
  for real in _reference_batches(config, split, num_images=num_images, batch_size=batch_size):
    if not moments and num_kid >= kid_per_process:
      break  # only the KID features were missing: stop once they are in
    errors.raise_if_interrupted()
    features = fid.inception_features(real, batch_size=batch_size,
                                      params=inception_params)['pool3']
    if accumulated is not None:
      accumulated.add(features)
    if num_kid < kid_per_process:
      kid_rows.append(features[:kid_per_process - num_kid])
      num_kid += len(kid_rows[-1])
    seen += len(real)
    if time.time() - last_log > 60:
      last_log = time.time()
      rate = seen / (last_log - start)
      logging.info('FID reference of %s: %d/%d images of this process, %.0f images/s, ETA %.0f '
                   's.', split, seen, share, rate, (share - seen) / rate)
  logging.info('FID reference of %s: %d images of this process in %.0f s (%s).', split, seen,
               time.time() - start, 'statistics and KID features' if moments else
               'KID features')
  width = accumulated.total.shape[0] if accumulated and accumulated.total is not None else 0
  kid_rows = np.concatenate(kid_rows) if kid_rows else np.zeros((0, width), np.float32)
  return accumulated, kid_rows


def _sample_chunks(samples, rows: int) -> Iterator[np.ndarray]:
  """uint8 samples `rows` at a time: from an array, or from a `generate` .npz file."""
  if isinstance(samples, np.ndarray):
    for start in range(0, len(samples), rows):
      yield samples[start:start + rows]
  else:
    yield from inference_lib.iter_samples(samples, rows)


def fid_metrics(config, samples) -> dict:
  """FID against the train and test sets (train only without a held-out split), KID against
  train, IS when the logits exist. `samples`: uint8 [N, H, W, 3], or the path of a `generate`
  file, read and featurised chunk by chunk."""
  if config.data.channels != 3:
    raise UserError(f'FID needs RGB images, but {config.data.dataset} has '
                    f'{config.data.channels} channel(s); set --config.eval.num_samples=0.')
  params, has_logits = fid.weights.load_inception_params(config.eval.pt_inception_path)
  batch_size = config.eval.inception_batch_size
  moments, kid_rows, logits, count = fid.FeatureMoments(), [], [], 0
  start = time.time()
  for chunk in _sample_chunks(samples, batch_size * _FID_CHUNK_BATCHES):
    feats = fid.inception_features(chunk, batch_size=batch_size, params=params)
    moments.add(feats['pool3'])
    if count < KID_REFERENCE_IMAGES:
      kid_rows.append(feats['pool3'][:KID_REFERENCE_IMAGES - count])
    if has_logits:
      logits.append(feats['logits'])
    count += len(chunk)
  logging.info('Inception features of %d samples in %.0f s.', count, time.time() - start)
  mu, sigma = moments.statistics()
  out = {'num_samples': count}
  for split in reversed(_splits(config)):
    reference = reference_statistics(config, split, params, batch_size=batch_size,
                                     kid_images=KID_REFERENCE_IMAGES if split == 'train' else 0)
    out[f'fid_{split}'] = float(fid.frechet_distance(mu, sigma, reference['mu'],
                                                     reference['sigma']))
    out[f'fid_{split}_reference_images'] = reference['num_images']
    if split == 'train':
      out['kid'], out['kid_std'] = map(float, fid.kernel_inception_distance(
          np.concatenate(kid_rows), reference['kid_features']))
  if has_logits:
    out['is'], out['is_std'] = map(float, fid.inception_score(np.concatenate(logits)))
  else:
    logging.warning('No Inception Score: %s.', fid.weights.LOGITS_MISSING)
    out['is_missing'] = fid.weights.LOGITS_MISSING
  return out


_DIGITS_REFERENCE: dict = {}  # data settings -> (train, test, test labels, fitted classifier)


def _digits_reference(config):
  """The real digits and a classifier fitted on them, once per data settings (the follower
  evaluates many checkpoints)."""
  d = config.data
  key = (d.dataset, d.data_dir, d.image_size, d.channels, d.eval_split)
  if key not in _DIGITS_REFERENCE:
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    from sklearn.neural_network import MLPClassifier  # pylint: disable=import-outside-toplevel
    train, test = _real_images(config, 'train'), _real_images(config, 'test')
    digits = load_digits()
    # Labels come from scikit-learn's own copy, matched image by image.
    lookup = {np.round(img * 255 / 16).astype(np.uint8).tobytes(): y
              for img, y in zip(digits.images, digits.target)}
    train_labels, test_labels = (np.array([lookup[im[..., 0].tobytes()] for im in x])
                                 for x in (train, test))
    classifier = MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=0)
    classifier.fit(_flat(train), train_labels)
    _DIGITS_REFERENCE.clear()
    _DIGITS_REFERENCE[key] = (train, test, test_labels, classifier)
  return _DIGITS_REFERENCE[key]


def _flat(x: np.ndarray) -> np.ndarray:
  return x.reshape(len(x), -1).astype(np.float32) / 255.


def digits_metrics(config, samples: np.ndarray) -> dict:
  """A digit classifier trained on real digits looks at the samples.

  `confidence` (mean top-class probability) should be close to `real_confidence` on held-out
  digits, `class_shares` near 0.1 each (`class_share_spread`, the largest minus the smallest,
  near 0), and `nn_distance` (mean L2 distance, in [0, 1] pixels, to the nearest training
  image) near `real_nn_distance` of held-out digits: copies of training images would have 0.
  """
  train, test, test_labels, classifier = _digits_reference(config)
  real_probs = classifier.predict_proba(_flat(test))
  probs = classifier.predict_proba(_flat(samples))
  shares = np.bincount(probs.argmax(1), minlength=10) / len(samples)

  def nearest(x):
    return np.sqrt(((_flat(x)[:, None] - _flat(train)[None]) ** 2).mean(-1)).min(1)

  sample_distances = nearest(samples)
  return {
      'num_samples': int(len(samples)),
      'classifier_test_accuracy': float((real_probs.argmax(1) == test_labels).mean()),
      'confidence': float(probs.max(1).mean()),
      'real_confidence': float(real_probs.max(1).mean()),
      'class_shares': shares.round(4).tolist(),
      'class_share_spread': float(shares.max() - shares.min()),
      'nn_distance': float(sample_distances.mean()),
      'real_nn_distance': float(nearest(test).mean()),
      'copies': int((sample_distances < 1e-3).sum()),
  }


# === TensorBoard and the best checkpoint ===

_SAMPLE_METRICS = ('fid_train', 'fid_test', 'is', 'kid', 'sample_seconds', 'confidence',
                   'class_share_spread', 'nn_distance')
_GRID_SAMPLES = 64


def best_metric(config) -> str:
  """`eval.best_metric`, with 'auto' resolved: the digits confidence for digits, fid_train for
  RGB data with FID samples, else the bits/dim of the first split; '' when none is computed."""
  e = config.eval
  if e.best_metric != 'auto':
    return e.best_metric
  if config.data.dataset == 'digits':
    return 'confidence'
  if e.num_samples > 0:
    return 'fid_train'
  return f'bpd_{_splits(config)[0]}' if e.bpd_num_images > 0 else ''


def summary_scalars(metrics: dict, tag: str) -> dict[str, float]:
  """The TensorBoard scalars of an evaluation: bits/dim as they are (the bound is the same for
  every sampler), the others with the sampler tag (`fid_train/ddim50`) unless it is ''."""
  flat = {**metrics, **metrics.get('digits', {})}
  suffix = '/' + tag.lstrip('_') if tag else ''
  scalars = {name: flat[name] for name in ('bpd_test', 'bpd_train') if name in flat}
  scalars.update({name + suffix: flat[name] for name in _SAMPLE_METRICS if name in flat})
  return {name: float(value) for name, value in scalars.items()}


def create_writer(workdir) -> metric_writers.MetricWriter:
  """The TensorBoard run WORKDIR/eval (process 0 writes; the others write nothing)."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.SummaryWriter(str(epath.Path(workdir) / 'eval'))


def _sample_grid(samples: np.ndarray, image_size: int) -> np.ndarray:
  """A square grid of samples, small images enlarged (8x8 digits would be specks)."""
  grid = images.image_grid(samples[:_GRID_SAMPLES])
  scale = max(1, 64 // image_size)
  return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def _is_better(value: float, than: float, higher_is_better: bool) -> bool:
  if not np.isfinite(than):
    return True
  return bool(np.isfinite(value) and (value > than if higher_is_better else value < than))


def update_best(config, workdir, metrics: dict, metrics_json: str) -> Optional[dict]:
  """Makes WORKDIR/eval/best<tag>.json name the best evaluated checkpoint by eval.best_metric;
  returns what it holds (None without such a metric). A best file of other settings (another
  seed, counts or T) is replaced: its numbers do not compare."""
  name = best_metric(config)
  value = summary_scalars(metrics, '').get(name)
  if value is None:
    if name:
      logging.warning('No %s in the metrics of step %d, so %s is not updated.', name,
                      metrics['step'], 'best.json')
    return None
  path = epath.Path(workdir) / 'eval' / f'best{sampling.settings_tag(config)}.json'
  settings = {k: v for k, v in _settings(config, 0).items() if k != 'step'}
  current = _read_json_or_none(path)
  higher = BEST_METRICS[name]
  if (current is None or current.get('settings') != settings or current.get('metric') != name
      or current.get('step') == metrics['step']
      or _is_better(value, current.get('value', float('nan')), higher)):
    current = {'metric': name, 'higher_is_better': higher, 'value': value,
               'step': metrics['step'], 'metrics_json': metrics_json, 'settings': settings,
               'metrics': metrics}
    if jax.process_index() == 0:
      _write_json(path, current)
    logging.info('Best checkpoint by %s: step %d (%.6g), in %s.', name, metrics['step'], value,
                 path)
  return current


# === The job ===

def _settings(config, step: int) -> dict:
  """What an evaluation's results depend on besides the checkpoint's weights: recorded in its
  JSON, and compared by `is_evaluated`."""
  e = config.eval
  num_samples = (config.sampling.num_samples if config.data.dataset == 'digits'
                 else e.num_samples)
  return {'step': step, **sampling.settings(config), 'seed': config.seed,
          'num_timesteps': config.diffusion.num_timesteps,
          'clip_denoised': config.sampling.clip_denoised, 'num_samples': num_samples,
          'bpd_num_images': e.bpd_num_images, 'fid_reference_images': e.fid_reference_images}


def metrics_path(config, workdir, step: int) -> epath.Path:
  return epath.Path(workdir) / 'eval' / f'{step}{sampling.settings_tag(config)}.json'


def is_evaluated(config, workdir, step: int) -> bool:
  """Whether WORKDIR/eval holds the finished evaluation of `step` with these settings."""
  path = metrics_path(config, workdir, step)
  metrics = _read_json_or_none(path) if path.exists() else None
  return (metrics is not None and 'eval_seconds' in metrics
          and all(metrics.get(k) == v for k, v in _settings(config, step).items()))


def check_can_evaluate(config, mesh) -> None:
  """UserError now for what would stop a later evaluation (the trainer's eval_every, the
  follower): a bits/dim batch the devices do not divide, FID without the Inception weights."""
  if config.eval.bpd_num_images > 0:
    parallel.check_divisible(config.eval.bpd_batch_size, mesh, 'eval.bpd_batch_size')
  if config.data.dataset != 'digits' and config.eval.num_samples > 0:
    fid.weights.load_inception_params(config.eval.pt_inception_path)


def _samples_to_draw(config, inference: inference_lib.Inference):
  """`inference.generate`'s arguments for the samples the evaluation looks at, or None."""
  if config.data.dataset == 'digits':
    return dict(name=inference.samples_name(config.sampling.name),
                num_samples=config.sampling.num_samples, batch_size=config.sampling.batch_size,
                seed=config.seed + seeds.SAMPLES_OFFSET, name_flag='sampling.name')
  if config.eval.num_samples > 0:
    return dict(name=inference.samples_name('fid'), num_samples=config.eval.num_samples,
                batch_size=config.sampling.batch_size,
                seed=config.seed + seeds.FID_SAMPLES_OFFSET)
  return None


def _keep_other_results(config, inference, workdir, metrics_json: epath.Path,
                        to_draw: Optional[dict]) -> None:
  """Before anything is computed, a UserError if a complete result this evaluation would write
  holds other settings (`inference.py`'s rule): its metrics JSON, the rate-distortion JSON, the
  samples it draws (`to_draw`: `_samples_to_draw`'s)."""
  inference_lib.keep_other_results(metrics_json, inference.eval_settings())
  if config.eval.bpd_num_images > 0:
    inference_lib.keep_other_results(
        metrics_json.parent / f'rate_distortion_{inference.step}.json',
        inference.bits_per_dim_settings())
  if to_draw:
    inference_lib.keep_other_samples(inference, workdir, **to_draw)


def evaluate(config, workdir, *, mesh=None, inference=None, step: Optional[int] = None,
             writer: Optional[metric_writers.MetricWriter] = None) -> dict:
  """--mode=eval: writes WORKDIR/eval/<step><sampler tag>.json and the rate-distortion files,
  TensorBoard scalars and a sample grid in WORKDIR/eval, and updates WORKDIR/eval/best<tag>.json.

  The metrics JSON is <step>.json for the paper's sampler (ancestral, all T steps) and, for
  example, <step>_ddim50.json for another (`sampling.settings_tag`); it records the sampler
  settings and the checkpoint step. Bits/dim and rate-distortion do not depend on the sampler.
  `inference`: the checkpoint already restored (--mode=all and the follower pass theirs);
  otherwise `step` (default config.sampling.step) is restored. `writer`: the TensorBoard writer
  (default: one for this evaluation).
  """
  e = config.eval
  if inference is None:
    step = config.sampling.step if step is None else step
    inference = inference_lib.Inference(config, workdir, step=step, mesh=mesh)
  step = inference.step
  tag = sampling.settings_tag(config)
  eval_dir = inference_lib.writable_dir(epath.Path(workdir) / 'eval')
  metrics_json = metrics_path(config, workdir, step)
  to_draw = _samples_to_draw(config, inference)
  _keep_other_results(config, inference, workdir, metrics_json, to_draw)
  logging.info('Evaluating the EMA weights of step %d on %d devices (%s).', step,
               inference.mesh.size, sampling.settings(config))
  metrics = {**_settings(config, step), 'bpd_num_images_asked': e.bpd_num_images}
  out = {}
  start = time.time()
  splits = _splits(config)
  if e.bpd_num_images > 0:
    for split in splits:
      bpd = bits_per_dim(inference, split, e.bpd_num_images, batch_size=e.bpd_batch_size,
                         progress_path=eval_dir / f'{step}_bpd_{split}.progress.json')
      metrics[f'bpd_{split}'] = float(bpd['total_bpd'])
      metrics[f'bpd_num_images_{split}'] = bpd['num_images']  # what the split had, at most asked
      metrics[f'prior_bpd_{split}'] = float(bpd['prior_bpd'])
      metrics[f'l0_bpd_{split}'] = float(bpd['terms_bpd'][0])  # the decoder's -log p(x0|x1)
      if split == splits[0]:  # Table 4 / Fig. 5 on held-out images where there are any
        rd = rate_distortion(bpd)
        if jax.process_index() == 0:
          _write_json(eval_dir / f'rate_distortion_{step}.json',
                      {**rd, 'step': step, 'split': split,
                       'num_timesteps': config.diffusion.num_timesteps,
                       'num_images': bpd['num_images'],
                       'settings': inference.bits_per_dim_settings()})
          out['rate_distortion_png'] = plot_rate_distortion(
              rd, eval_dir / f'rate_distortion_{step}.png')
    logging.info('bits/dim: %s.', ', '.join(f'{split} {metrics[f"bpd_{split}"]:.4f}'
                                            for split in splits))
  grid = None
  metrics['num_samples_asked'] = to_draw['num_samples'] if to_draw else 0
  if to_draw:
    sample_start = time.time()
    npz = inference_lib.generate(inference, workdir, **to_draw)
    metrics['sample_seconds'] = time.time() - sample_start
    _after_process_0_wrote(npz.name)  # `generate` writes the file on process 0 only
    if config.data.dataset == 'digits':
      samples = inference_lib.read_samples(npz)
      metrics['digits'] = digits_metrics(config, samples)
      grid = _sample_grid(samples, config.data.image_size)
    else:
      metrics.update(fid_metrics(config, npz))  # featurised chunk by chunk from the file
      grid = _sample_grid(next(inference_lib.iter_samples(npz, _GRID_SAMPLES)),
                          config.data.image_size)
    metrics['num_samples_used'] = (metrics['digits'] if config.data.dataset == 'digits'
                                   else metrics)['num_samples']
  metrics['eval_seconds'] = time.time() - start
  metrics['settings'] = inference.eval_settings()
  out['metrics_json'] = str(metrics_json)
  if jax.process_index() == 0:
    _write_json(metrics_json, metrics)
  _write_summaries(writer, workdir, step, summary_scalars(metrics, tag), grid, tag)
  best = update_best(config, workdir, metrics, str(metrics_json))
  logging.info('Eval of step %d: %s', step, json.dumps(metrics))
  for key, path in out.items():
    logging.info('Wrote %s: %s', key, path)
  return {**out, 'metrics': metrics, 'best': best}


def _write_summaries(writer, workdir, step: int, scalars: dict, grid, tag: str) -> None:
  own = writer is None
  writer = writer or create_writer(workdir)
  try:
    writer.write_scalars(step, scalars)
    if grid is not None:
      writer.write_images(step, {'samples' + ('/' + tag.lstrip('_') if tag else ''):
                                 grid[None]})
    writer.flush()
  finally:
    if own:
      writer.close()
