"""--mode=eval: the paper's numbers for a checkpoint's EMA weights.

* bits/dim (Table 1, 2): the full variational bound, `calc_bpd_loop` (T network evaluations per
  image), on the test set and a train subset, sharded over devices, resumable batch by batch;
* rate-distortion and progressive lossy compression (Table 4, Fig. 5) from the same test pass;
* FID against the train and test sets, IS and KID (Table 1, 3) for RGB datasets, on
  `eval.num_samples` samples from the resumable sampler;
* for the embedded digits: a digit classifier's view of the samples (confidence against held-out
  real digits, class shares, distance to the nearest training image).

Results go to WORKDIR/eval/<step>.json (<step>_ddim50.json and so on for another sampler; they
record the sampler settings) and WORKDIR/eval/rate_distortion_<step>.{json,png}. Bits/dim is the
full T-step bound whatever the sampler. Every file follows `inference.py`'s rule: it records its
settings, and none is replaced by one of other settings (bits/dim progress and FID reference
statistics carry a digest of their settings in their names; the metrics and rate-distortion
JSON and the samples refuse, before anything is computed, with one sentence). The metrics JSON
records the settings, and the numbers of bits/dim images and samples asked for and used.
Without a held-out split (data.eval_split='train', or a folder:/path dataset) only train
metrics are reported, named `*_train`.
"""
import hashlib
import json
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from ddpm_jax import datasets, fid, images, inference as inference_lib, input_pipeline, parallel
from ddpm_jax import sampling, seeds
from ddpm_jax.errors import UserError


def _write_json(path: epath.Path, data: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_text(json.dumps(data, indent=1))
  tmp.replace(path)


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

def _bpd_fn(inference: inference_lib.Inference):
  """Jitted (params, images, mask, rng) -> masked sums over the batch of the bound's parts."""
  @jax.jit
  def fn(params, x, mask, rng):
    out = inference.diffusion.calc_bpd_loop(inference.model_fn(params), x, rng,
                                            clip_denoised=True)
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

def _real_images(config, split: str, num_images=None) -> np.ndarray:
  """uint8 [N, H, W, C] images of a split, all processes' shards gathered."""
  mesh = parallel.make_mesh()
  batch_size = 250 * mesh.size
  out = []
  for batch in input_pipeline.create_eval_iterator(config, split, batch_size=batch_size,
                                                   num_images=num_images):
    batch = parallel.global_batch(mesh, batch)
    keep = parallel.to_host(batch['mask'])
    out.append(images.to_uint8(parallel.to_host(batch['image']))[keep])
  return np.concatenate(out)


def _params_digest(params) -> str:
  """A short hash of a parameter tree's values: which Inception weights computed a statistic."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def _reference_statistics(config, split: str, inception_params, batch_size: int):
  """(mu, sigma) of the Inception pool3 features of a split, computed once and cached.

  The cache file is keyed by the dataset, split, image size, data_dir and the Inception weights.
  """
  d = config.data
  key = inference_lib.fingerprint({'dataset': d.dataset, 'split': split, 'size': d.image_size,
                                   'data_dir': d.data_dir,
                                   'inception': _params_digest(inception_params)})
  name = f'{d.dataset}_{split}_{d.image_size}_{hashlib.sha256(key.encode()).hexdigest()[:12]}'
  file_name = name.replace('/', '_').replace(':', '_') + '.npz'
  path = epath.Path(fid.weights.cache_dir()) / 'fid_stats' / file_name
  if path.exists():
    try:
      with path.open('rb') as f:
        stats = np.load(f)
        if str(stats['key']) == key:
          return stats['mu'], stats['sigma']
        stored = str(stats['key'])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      stored = None
      logging.warning('Rebuilding the damaged reference statistics %s (%s).', path, e)
    if stored is not None:  # the name's digest matched another key: never rebuilt over
      raise inference_lib.refusal(path, _json_or_none(stored), json.loads(key),
                                  'move it away to compute these')
  features = fid.inception_pool3(_real_images(config, split), batch_size=batch_size,
                                 params=inception_params)
  mu, sigma = fid.feature_statistics(features)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('wb') as f:
      np.savez(f, mu=mu, sigma=sigma, key=np.array(key))
  return mu, sigma


def fid_metrics(config, samples: np.ndarray) -> dict:
  """FID against the train and test sets (train only without a held-out split), KID against
  train, IS when the logits exist."""
  if config.data.channels != 3:
    raise UserError(f'FID needs RGB images, but {config.data.dataset} has '
                    f'{config.data.channels} channel(s); set --config.eval.num_samples=0.')
  params, has_logits = fid.weights.load_inception_params(config.eval.pt_inception_path)
  batch_size = config.eval.inception_batch_size
  feats = fid.inception_features(samples, batch_size=batch_size, params=params)
  mu, sigma = fid.feature_statistics(feats['pool3'])
  out = {'num_samples': int(len(samples))}
  for split in reversed(_splits(config)):
    ref_mu, ref_sigma = _reference_statistics(config, split, params, batch_size)
    out[f'fid_{split}'] = float(fid.frechet_distance(mu, sigma, ref_mu, ref_sigma))
  num_kid = min(len(samples), 10_000)
  train_feats = fid.inception_pool3(_real_images(config, 'train', num_kid),
                                    batch_size=batch_size, params=params)
  out['kid'], out['kid_std'] = map(float, fid.kernel_inception_distance(
      feats['pool3'][:num_kid], train_feats))
  if has_logits:
    out['is'], out['is_std'] = map(float, fid.inception_score(feats['logits']))
  else:
    logging.warning('No Inception Score: %s.', fid.weights.LOGITS_MISSING)
    out['is_missing'] = fid.weights.LOGITS_MISSING
  return out


def digits_metrics(config, samples: np.ndarray) -> dict:
  """A digit classifier trained on real digits looks at the samples.

  `confidence` (mean top-class probability) should be close to `real_confidence` on held-out
  digits, `class_shares` near 0.1 each, and `nn_distance` (mean L2 distance, in [0, 1] pixels,
  to the nearest training image) near `real_nn_distance` of held-out digits: copies of
  training images would have 0.
  """
  from sklearn.neural_network import MLPClassifier
  from sklearn.datasets import load_digits
  train, test = _real_images(config, 'train'), _real_images(config, 'test')
  flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.
  digits = load_digits()
  # Labels come from scikit-learn's own copy, matched image by image.
  lookup = {np.round(img * 255 / 16).astype(np.uint8).tobytes(): y
            for img, y in zip(digits.images, digits.target)}
  labels = lambda x: np.array([lookup[im[..., 0].tobytes()] for im in x])
  classifier = MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=0)
  classifier.fit(flat(train), labels(train))
  real_probs = classifier.predict_proba(flat(test))
  probs = classifier.predict_proba(flat(samples))
  shares = np.bincount(probs.argmax(1), minlength=10) / len(samples)
  nearest = lambda x: np.sqrt(((flat(x)[:, None] - flat(train)[None]) ** 2).mean(-1)).min(1)
  return {
      'num_samples': int(len(samples)),
      'classifier_test_accuracy': float((real_probs.argmax(1) == labels(test)).mean()),
      'confidence': float(probs.max(1).mean()),
      'real_confidence': float(real_probs.max(1).mean()),
      'class_shares': shares.round(4).tolist(),
      'nn_distance': float(nearest(samples).mean()),
      'real_nn_distance': float(nearest(test).mean()),
      'copies': int((nearest(samples) < 1e-3).sum()),
  }


# === The job ===

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


def _keep_other_results(config, inference, workdir, metrics_json: epath.Path) -> None:
  """Before anything is computed, a UserError if a complete result this evaluation would write
  holds other settings (`inference.py`'s rule): its metrics JSON, the rate-distortion JSON, the
  samples it draws."""
  inference_lib.keep_other_results(metrics_json, inference.eval_settings())
  if config.eval.bpd_num_images > 0:
    inference_lib.keep_other_results(
        metrics_json.parent / f'rate_distortion_{inference.step}.json',
        inference.bits_per_dim_settings())
  if _samples_to_draw(config, inference):
    inference_lib.keep_other_samples(inference, workdir, **_samples_to_draw(config, inference))


def evaluate(config, workdir, *, mesh=None, inference=None) -> dict:
  """--mode=eval: writes WORKDIR/eval/<step><sampler tag>.json and the rate-distortion files.

  The metrics JSON is <step>.json for the paper's sampler (ancestral, all T steps) and, for
  example, <step>_ddim50.json for another (`sampling.settings_tag`); it records the sampler
  settings and the checkpoint step. Bits/dim and rate-distortion do not depend on the sampler.
  `inference`: the checkpoint already restored (--mode=all shares the sample job's).
  """
  e = config.eval
  inference = inference or inference_lib.Inference(config, workdir, step=config.sampling.step,
                                                    mesh=mesh)
  step = inference.step
  eval_dir = inference_lib.writable_dir(epath.Path(workdir) / 'eval')
  metrics_json = eval_dir / f'{step}{sampling.settings_tag(config)}.json'
  _keep_other_results(config, inference, workdir, metrics_json)
  metrics = {'step': step, **sampling.settings(config), 'seed': config.seed,
             'num_timesteps': config.diffusion.num_timesteps,
             'bpd_num_images_asked': e.bpd_num_images}
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
  to_draw = _samples_to_draw(config, inference)
  metrics['num_samples_asked'] = to_draw['num_samples'] if to_draw else 0
  if to_draw:
    sample_start = time.time()
    samples = inference_lib.read_samples(inference_lib.generate(inference, workdir, **to_draw))
    metrics['sample_seconds'] = time.time() - sample_start
    metrics['num_samples_used'] = int(len(samples))
    if config.data.dataset == 'digits':
      metrics['digits'] = digits_metrics(config, samples)
    else:
      metrics.update(fid_metrics(config, samples))
  metrics['eval_seconds'] = time.time() - start
  metrics['settings'] = inference.eval_settings()
  out['metrics_json'] = str(metrics_json)
  if jax.process_index() == 0:
    _write_json(metrics_json, metrics)
  logging.info('Eval of step %d: %s', step, json.dumps(metrics))
  for key, path in out.items():
    logging.info('Wrote %s: %s', key, path)
  return {**out, 'metrics': metrics}
