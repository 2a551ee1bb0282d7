"""FID, KID and Inception Score of uint8 images, with the Inception-v3 graph of 2015-12-05.

`inception_features` runs the network of `fid/inception.py`, with the weights of
`fid/weights.py` by default, over many images split across this process's devices; the
metrics are numpy in float64, as in the reference implementations.

    python -m ddpm_jax.fid --prepare [--pt_inception=PATH_OR_URL]   # fills the weights cache once

Public functions: `inception_pool3`, `inception_logits`, `inception_features`,
`feature_statistics`, `frechet_distance`, `kernel_inception_distance`, `inception_score`; for
sets too large for memory, `FeatureMoments` (streaming statistics, summed over processes) and
`gather_rows`.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax.fid import inception, weights
from ddpm_jax.errors import UserError
from ddpm_jax.fid.inception import Params

# ------------------------------------------------------------------------------------------------
# Features.

# Compiled per input size; the network once per batch.
_preprocess_fn = jax.jit(inception.preprocess)


@jax.jit
def _features_fn(params: Params, images: jax.Array) -> dict[str, jax.Array]:
  """pool3 of preprocessed images and, when `params` has `fc`, the logits (without, with bias)."""
  net_params = {k: v for k, v in params.items() if k != 'fc'}
  pool3 = inception.InceptionV3().apply({'params': net_params}, images)
  out = {'pool3': pool3}
  if 'fc' in params:
    out['logits'] = jnp.dot(pool3, params['fc']['kernel'], precision=jax.lax.Precision.HIGHEST)
    out['logits_biased'] = out['logits'] + params['fc']['bias']
  return out


_REPLICATED: list = []  # [(params, devices, params on those devices)]: the last one used


def _replicated(params: Params, mesh: Mesh) -> Params:
  """`params` on every device of `mesh`; evaluation's repeated calls upload the ~95 MB once."""
  devices = tuple(mesh.devices.flat)
  if not (_REPLICATED and _REPLICATED[0][0] is params and _REPLICATED[0][1] == devices):
    _REPLICATED[:] = [(params, devices, jax.device_put(params, NamedSharding(mesh, P())))]
  return _REPLICATED[0][2]


def inception_features(images_uint8: np.ndarray, *, batch_size: int = 200,
                       params: Params | None = None) -> dict[str, np.ndarray]:
  """One pass of the network over uint8 images [N, H, W, 3].

  Returns `pool3` float32 [N, 2048] and, when the parameters have the classifier (see
  `load_inception_params`), `logits` [N, 1008] without the classifier's bias (what the original
  Inception Score code, and torch-fidelity's `logits_unbiased`, use) and `logits_biased`.
  The batch is split over this process's devices; the last batch is padded and the padding
  dropped. `params` defaults to `load_inception_params()[0]`.
  """
  images = np.asarray(images_uint8)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise UserError(f'Inception features need uint8 images [N, H, W, 3]; got {images.dtype} '
                    f'{list(images.shape)} (convert with np.clip(x, 0, 255).astype(np.uint8)).')
  if params is None:
    params, _ = weights.load_inception_params()
  batch = max(1, min(batch_size, len(images)))
  devices = jax.local_devices()[:batch]  # small batches need not be padded to every device
  mesh = Mesh(np.asarray(devices), ('data',))
  batch = -(-batch // mesh.size) * mesh.size
  params = _replicated(params, mesh)
  data_sharding = NamedSharding(mesh, P('data'))
  keys = ['pool3'] + (['logits', 'logits_biased'] if 'fc' in params else [])
  results = {k: [] for k in keys}

  def fetch(num_images: int, out: dict[str, jax.Array]) -> None:
    for k in keys:
      results[k].append(np.asarray(out[k])[:num_images])  # drops the padding

  pending = None  # each batch is fetched after the next one is dispatched
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), np.uint8)])
    out = _features_fn(params, _preprocess_fn(jax.device_put(padded, data_sharding)))
    if pending:
      fetch(*pending)
    pending = (len(chunk), out)
  if pending:
    fetch(*pending)
  widths = {'pool3': 2048, 'logits': inception.NUM_CLASSES,
            'logits_biased': inception.NUM_CLASSES}
  return {k: np.concatenate(results[k]) if results[k] else np.zeros((0, widths[k]), np.float32)
          for k in keys}


def inception_pool3(images_uint8: np.ndarray, *, batch_size: int = 200,
                    params: Params | None = None) -> np.ndarray:
  """pool3 features float32 [N, 2048] of uint8 images [N, H, W, 3] (any size; resized to 299)."""
  return inception_features(images_uint8, batch_size=batch_size, params=params)['pool3']


def inception_logits(images_uint8: np.ndarray, *, batch_size: int = 200,
                     params: Params | None = None, bias: bool = False) -> np.ndarray:
  """The 1008-way logits [N, 1008] (without the bias unless `bias`, as the IS code has them).

  Needs the classifier: `params` from `load_inception_params(pt_inception_path)` with
  `has_logits`; raises `UserError` otherwise.
  """
  if params is None:
    params, _ = weights.load_inception_params()
  if 'fc' not in params:
    raise UserError('These Inception parameters have no classifier: '
                    f'{weights.LOGITS_MISSING}.')
  feats = inception_features(images_uint8, batch_size=batch_size, params=params)
  return feats['logits_biased' if bias else 'logits']


# ------------------------------------------------------------------------------------------------
# Metrics (numpy, float64).

def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (unbiased, as np.cov) of features [N, D], in float64."""
  features = np.asarray(features, np.float64)
  return features.mean(axis=0), np.cov(features, rowvar=False)


class FeatureMoments:
  """Streaming mean and covariance of features: float64 sums of the rows and of their outer
  products, so memory stays [D, D] whatever the number of rows.

  `add` batches as they come, `summed_over_processes` combines every process's shard, and
  `statistics` gives what `feature_statistics` gives for all the rows at once (to float64
  rounding: the covariance is (sum x x^T - n mu mu^T) / (n - 1)).
  """

  def __init__(self, count: int = 0, total=None, outer=None):
    self.count, self.total, self.outer = count, total, outer

  def add(self, features: np.ndarray) -> None:
    features = np.asarray(features, np.float64)
    if self.total is None:
      dim = features.shape[1]
      self.total, self.outer = np.zeros(dim), np.zeros((dim, dim))
    self.count += len(features)
    self.total += features.sum(axis=0)
    self.outer += features.T @ features

  def summed_over_processes(self) -> 'FeatureMoments':
    """The moments of all processes' rows, the same on every process (every process must
    call this, each having added at least one batch, all of one width)."""
    if jax.process_count() == 1:
      return self
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    width = 0 if self.total is None else len(self.total)
    width = int(np.max(multihost_utils.process_allgather(np.array([width], np.int32))))
    total = np.zeros(width) if self.total is None else self.total  # a process without rows
    outer = np.zeros((width, width)) if self.outer is None else self.outer
    total = sum_over_processes(np.concatenate([[self.count], total]))
    return FeatureMoments(int(round(total[0])), total[1:], sum_over_processes(outer))

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], unbiased covariance [D, D]), float64; needs at least 2 rows."""
    if self.count < 2:
      raise UserError(f'Feature statistics need at least 2 images; got {self.count}.')
    mu = self.total / self.count
    sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
    return mu, (sigma + sigma.T) / 2


# Words of 32 bits moved per collective: process_allgather's temporary is this times processes.
_GATHER_WORDS = 1 << 22


def sum_over_processes(x: np.ndarray) -> np.ndarray:
  """The sum over processes of a float64 host array, bit-identical on every process.

  float64 cannot go through JAX's collectives without x64, so the exact bits travel as uint32
  pairs, gathered in slices of bounded size, and are summed on the host in process order.
  """
  x = np.ascontiguousarray(x, np.float64)
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  words = x.reshape(-1).view(np.uint32)
  out = np.empty(x.size, np.float64)
  for start in range(0, words.size, _GATHER_WORDS):
    gathered = np.asarray(multihost_utils.process_allgather(words[start:start + _GATHER_WORDS]))
    out[start // 2:(start + len(gathered[0])) // 2] = gathered.view(np.float64).sum(axis=0)
  return out.reshape(x.shape)


def gather_rows(rows: np.ndarray) -> np.ndarray:
  """Every process's float32 rows [n_p, D] (n_p may differ), concatenated in process order."""
  rows = np.asarray(rows, np.float32)
  if jax.process_count() == 1:
    return rows
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  counts = np.asarray(multihost_utils.process_allgather(np.array([len(rows)], np.int32)))
  counts = counts.reshape(-1)
  padded = np.zeros((counts.max(), rows.shape[1]), np.float32)
  padded[:len(rows)] = rows
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([part[:n] for part, n in zip(gathered, counts)])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (negative rounding -> 0)."""
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): the FID of two feature sets.

  |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64. The trace of the
  matrix square root is the sum of the square roots of the eigenvalues of the symmetric PSD
  matrix s1^(1/2) sigma2 s1^(1/2) (similar to sigma1 sigma2). Unlike `scipy.linalg.sqrtm` of
  the product (pytorch-fid), this has no complex part and does not fail on singular
  covariances (fewer samples than dimensions): eigenvalues that rounding makes slightly
  negative count as 0, where pytorch-fid drops a small imaginary part or adds 1e-6 to the
  diagonals.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
    raise UserError(f'Mismatched feature statistics: means {mu1.shape} and {mu2.shape}, '
                    f'covariances {sigma1.shape} and {sigma2.shape}; compute both with the '
                    f'same network.')
  sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
  root1 = _sqrt_psd(sigma1)
  eigvals = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  tr_covmean = np.sqrt(np.clip(eigvals, 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, *,
                              num_subsets: int = 100, max_subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
  """KID (Binkowski et al. 2018): the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3.

  Averaged over `num_subsets` random subsets of `min(N1, N2, max_subset_size)` rows of each set
  (drawn without replacement, as clean-fid and torch-fidelity do). Returns (mean, std) over the
  subsets; the mean can be slightly negative when the two sets come from one distribution.
  """
  f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  d = f1.shape[1]
  m = min(len(f1), len(f2), max_subset_size)
  if m < 2 or f2.shape[1] != d:
    raise UserError(f'KID needs two feature sets [N, D] of one width with N >= 2; got '
                    f'{list(f1.shape)} and {list(f2.shape)}.')
  rng = np.random.default_rng(seed)
  mmds = np.empty(num_subsets)
  for i in range(num_subsets):
    x = f1[rng.choice(len(f1), m, replace=False)]
    y = f2[rng.choice(len(f2), m, replace=False)]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off_diagonal = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
    mmds[i] = off_diagonal / (m * (m - 1)) - 2 * kxy.mean()
  return float(mmds.mean()), float(mmds.std())


def inception_score(predictions: np.ndarray, splits: int = 10, *,
                    are_probs: bool | None = None) -> tuple[float, float]:
  """Inception Score (Salimans et al. 2016) as the original code computes it: (mean, std).

  `predictions` [N, C]: logits (softmaxed here over all C = 1008 classes) or probabilities
  (`are_probs`; by default detected as non-negative rows that sum to 1). The N rows are cut into
  `splits` consecutive parts; each part scores exp(mean_i KL(p(y|x_i) || p(y))).
  """
  preds = np.asarray(predictions, np.float64)
  if are_probs is None:
    are_probs = bool(np.all(preds >= 0) and np.allclose(preds.sum(axis=1), 1, atol=1e-4))
  if not are_probs:
    preds = np.exp(preds - preds.max(axis=1, keepdims=True))
    preds /= preds.sum(axis=1, keepdims=True)
  n = len(preds)
  if n < splits:
    raise UserError(f'The Inception Score with {splits} splits needs at least {splits} images; '
                    f'got {n}.')
  scores = []
  for i in range(splits):
    part = preds[i * n // splits:(i + 1) * n // splits]
    log_p = np.log(np.where(part > 0, part, 1.0))  # 0 log 0 = 0
    log_marginal = np.log(np.maximum(part.mean(axis=0), np.finfo(np.float64).tiny))
    kl = np.sum(part * (log_p - log_marginal), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))
