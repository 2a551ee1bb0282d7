"""What the sample and eval jobs share about a workdir: its model's EMA weights and its results.

`Inference` restores the EMA parameters of a checkpoint onto a mesh and samples from them with the
config's sampler; `generate` draws many samples in resumable chunks into
`WORKDIR/samples/<name>.npz`.

Result files follow one rule (docs/reliability.md): every result file records the settings it
was computed with, is reused only for the same settings, and is never replaced by one of other
settings. Intermediate files (sample chunks; bits/dim progress; FID reference statistics) carry
a digest of their settings in their name (`settings_digest`), so other settings write other
files. Final files keep their readable names (`samples/<name>_<step>[_ddim50].npz`,
`eval/<step>[_ddim50].json`, `eval/rate_distortion_<step>.json`): a run whose settings differ
from a complete one's refuses before computing anything (`keep_other_results`), with one sentence
naming the file, the first differing setting with both values, and how to go on.
"""
import hashlib
import io
import json
import time
import zipfile
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from ddpm_jax import checkpointing, diffusion as diffusion_lib, errors, images, parallel, sampling
from ddpm_jax import unet
from ddpm_jax.diffusion import ModelFn
from ddpm_jax.errors import UserError


class Inference:
  """What sampling and evaluation need from a workdir: the model, its EMA weights, the mesh."""

  def __init__(self, config, workdir, *, step: Optional[int] = None,
               mesh: Optional[Mesh] = None):
    self.config = config
    self.mesh = mesh or parallel.make_mesh()
    self.model = unet.create_model(config)
    self.diffusion = diffusion_lib.from_config(config)
    size, channels = config.data.image_size, config.data.channels
    self.image_shape = (size, size, channels)
    template = jax.eval_shape(lambda: self.model.init(
        jax.random.PRNGKey(0), jnp.zeros((1,) + self.image_shape), jnp.zeros((1,), jnp.int32)))
    self.step, params = checkpointing.restore_ema_params(
        workdir, template['params'], None if step is None or step < 0 else step, config=config)
    self.params = parallel.replicate(self.mesh, params)
    self._sample_jit = sampling.jit_sampler(config, self.mesh)

  def samples_name(self, prefix: str) -> str:
    """<prefix>_<step> for the paper's sampler, else e.g. <prefix>_<step>_ddim50."""
    return f'{prefix}_{self.step}{sampling.settings_tag(self.config)}'

  def model_settings(self) -> dict:
    """What this model's outputs depend on: its checkpoint step, model and diffusion configs.

    `model.remat` is left out: it changes what the backward pass keeps, not the values.
    """
    c = self.config
    model = {k: v for k, v in c.model.to_dict().items() if k != 'remat'}
    return {'step': self.step, 'model': model, 'diffusion': c.diffusion.to_dict()}

  def sample_settings(self, **extra) -> dict:
    """Everything this model's samples depend on, beside `extra` (seed, counts)."""
    c = self.config
    return {**self.model_settings(), 'image_shape': list(self.image_shape),
            'clip_denoised': c.sampling.clip_denoised, **sampling.settings(c), **extra}

  def bits_per_dim_settings(self) -> dict:
    """What the bits/dim and rate-distortion of `evaluation` depend on (not the sampler)."""
    c, d = self.config, self.config.data
    return {**self.model_settings(), 'seed': c.seed,
            'data': {'dataset': d.dataset, 'data_dir': d.data_dir, 'image_size': d.image_size,
                     'channels': d.channels, 'eval_split': d.eval_split},
            'bpd_num_images': c.eval.bpd_num_images, 'bpd_batch_size': c.eval.bpd_batch_size}

  def eval_settings(self) -> dict:
    """Everything the metrics of `evaluation.evaluate` depend on (its JSON records them)."""
    c = self.config
    return {**self.bits_per_dim_settings(), **sampling.settings(c),
            'clip_denoised': c.sampling.clip_denoised,
            'sampling_num_samples': c.sampling.num_samples,
            'sampling_batch_size': c.sampling.batch_size, 'eval_num_samples': c.eval.num_samples,
            'pt_inception_path': c.eval.pt_inception_path}

  def model_fn(self, params) -> ModelFn:
    return lambda x, t: self.model.apply({'params': params}, x, t, train=False)

  def padded(self, n: int) -> int:
    """n rounded up to a multiple of the device count (the padding is dropped afterwards)."""
    return -(-n // self.mesh.size) * self.mesh.size

  def sample(self, rng, n: int) -> np.ndarray:
    """n samples as uint8 [n, H, W, C] on the host (every process gets all of them)."""
    x = self._sample_jit(self.params, rng, self.padded(n))
    return images.to_uint8(parallel.to_host(x)[:n])


def write_npz(path: epath.Path, **arrays) -> None:
  """Writes atomically (a temporary name, then a rename) so a preempted write is never read.

  A full disk is `errors.disk_full`'s sentence, with this file's size as the space needed.
  """
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  tmp = path.parent / (path.name + '.tmp')
  try:
    tmp.write_bytes(buffer.getvalue())
  except OSError as error:
    if not errors.is_disk_full(error):
      raise
    tmp.unlink(missing_ok=True)
    raise errors.disk_full(error, needed_bytes=len(buffer.getvalue())) from error
  tmp.replace(path)


def fingerprint(settings: dict) -> str:
  """The canonical JSON of a settings dict: equal settings, equal strings."""
  return json.dumps(settings, sort_keys=True, default=list)


def settings_digest(settings: dict) -> str:
  """12 hex digits of the settings' fingerprint: what names an intermediate file's settings."""
  return hashlib.sha256(fingerprint(settings).encode()).hexdigest()[:12]


def _flat(tree: Any, prefix: str = '') -> dict:
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  out = {}
  for key in sorted(tree):
    out.update(_flat(tree[key], f'{prefix}{key}.'))
  return out


def first_difference(stored: dict, wanted: dict) -> Optional[tuple[str, Any, Any]]:
  """(setting, stored value, wanted value) at the first setting that differs, else None."""
  stored, wanted = _flat(json.loads(fingerprint(stored))), _flat(json.loads(fingerprint(wanted)))
  for key in sorted(set(stored) | set(wanted)):
    if stored.get(key, '(none)') != wanted.get(key, '(none)'):
      return key, stored.get(key, '(none)'), wanted.get(key, '(none)')
  return None


def refusal(path, stored: Optional[dict], wanted: dict, remedy: str) -> Optional[UserError]:
  """None if `stored` (a complete result's settings) equals `wanted`, else the sentence."""
  if stored is None:
    return UserError(f'{path} records no settings (an older ddpm_jax wrote it), so it may hold '
                     f'results of other settings; it is kept: move it away to compute it again.')
  difference = first_difference(stored, wanted)
  if difference is None:
    return None
  key, theirs, ours = difference
  return UserError(f'{path} holds results computed with {key}={errors.flag_value(theirs)}, but '
                   f'this run has {key}={errors.flag_value(ours)}; it is kept: {remedy}.')


def _agreed(check: Callable[[], Optional[UserError]]) -> None:
  """Runs `check` on process 0 and raises its UserError on every process (so that no process
  goes on alone into a collective)."""
  error = check() if jax.process_index() == 0 else None
  if parallel.agree_with_process_0(np.array([error is not None]))[0]:
    raise error or UserError('Process 0 refused to go on; its message says why.')


def keep_other_results(path, settings: dict,
                       remedy: str = 'rerun with its settings, or move it away to compute this '
                                     'one') -> None:
  """A UserError (on every process) if the JSON result `path` exists, reads, and records
  other settings than `settings`; nothing if it is absent, damaged (it is then recomputed) or
  of the same settings."""
  def check():
    path_ = epath.Path(path)
    if not path_.exists():
      return None
    try:
      content = json.loads(path_.read_text())
    except (ValueError, OSError):
      return None
    stored = content.get('settings') if isinstance(content, dict) else None
    return refusal(path_, stored, settings, remedy)
  _agreed(check)


def writable_dir(path) -> epath.Path:
  """`path`, created; a UserError (on every process) naming it if process 0 cannot write there,
  before anything is computed for it."""
  path = epath.Path(path)

  def check():
    probe = path / f'.write_test_{jax.process_index()}'
    try:
      path.mkdir(parents=True, exist_ok=True)
      probe.write_text('')
      probe.unlink()
    except OSError as error:
      if errors.is_disk_full(error):
        raise
      return UserError(f'Cannot write to {path} ({errors.one_line(error)}); make it writable, '
                       f'or pass another --workdir.')
    return None
  _agreed(check)
  return path


_UNREADABLE = (zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError)


def _damaged(path, error: Exception) -> OSError:
  return OSError(f'{path} is damaged or truncated ({type(error).__name__}: {error})')


def _read_npz(path: epath.Path) -> dict:
  """The arrays of an .npz; an unreadable one (truncated, damaged) raises OSError naming it."""
  try:
    with np.load(io.BytesIO(path.read_bytes())) as npz:
      return {key: npz[key] for key in npz.files}
  except _UNREADABLE as e:
    raise _damaged(path, e) from e


def _read_samples_settings(path: epath.Path) -> Optional[str]:
  """The `settings` recorded in a samples .npz ('' if none), None if it holds no `samples`
  array, read without its samples (a final file of 50,000 256x256 samples is 9.8 GB); an
  unreadable one (truncated, damaged) raises OSError naming it."""
  try:
    with path.open('rb') as f, zipfile.ZipFile(f) as archive:
      names = archive.namelist()
      if 'samples.npy' not in names:
        return None
      if 'settings.npy' not in names:
        return ''
      with archive.open('settings.npy') as member:
        return str(np.lib.format.read_array(member))
  except _UNREADABLE as e:
    raise _damaged(path, e) from e


def read_samples(path) -> np.ndarray:
  """The uint8 [N, H, W, C] samples of an .npz written by `generate`."""
  try:
    arrays = _read_npz(epath.Path(path))
  except OSError as e:
    raise UserError(f'The samples file {e}; delete it and sample again.') from e
  if 'samples' not in arrays:
    raise UserError(f'{path} holds no `samples` array; delete it and sample again.')
  return arrays['samples']


_ABSENT, _CURRENT, _OTHER = 0, 1, 2


def _samples_status(path: epath.Path, settings: str) -> tuple[int, Optional[dict]]:
  """(_ABSENT: none, or damaged (with a warning); _CURRENT: drawn with `settings`; _OTHER: a
  complete file of other settings, with those settings or None if it records none)."""
  if not path.exists():
    return _ABSENT, None
  try:
    stored = _read_samples_settings(path)
  except OSError as e:
    logging.warning('The samples file %s; sampling it again.', e)
    return _ABSENT, None
  if stored is None:
    logging.warning('%s holds no `samples` array; sampling it again.', path)
    return _ABSENT, None
  if stored == settings:
    return _CURRENT, None
  try:
    return _OTHER, json.loads(stored)
  except ValueError:
    return _OTHER, None


def _final_samples(inference: Inference, workdir, *, name: str, num_samples: int,
                   batch_size: int, seed: int, name_flag: str = ''):
  """(final path, settings dict, their fingerprint, whether the final file holds them): a
  UserError on every process if it holds samples of other settings."""
  if num_samples < 1:
    raise UserError(f'sampling.num_samples must be at least 1, got {num_samples}.')
  if batch_size < 1:
    raise UserError(f'sampling.batch_size must be at least 1, got {batch_size}.')
  out_dir = writable_dir(epath.Path(workdir) / 'samples')
  final = out_dir / f'{name}.npz'
  settings_dict = inference.sample_settings(seed=seed, num_samples=num_samples,
                                            batch_size=batch_size)
  settings = fingerprint(settings_dict)
  keep_both = f'set --config.{name_flag} to another name to keep both, ' if name_flag else ''
  status = {}

  def check():
    status['final'], stored = _samples_status(final, settings)
    if status['final'] != _OTHER:
      return None
    return refusal(final, stored, settings_dict,
                   f'rerun with its settings, {keep_both}or move it away to draw these')
  _agreed(check)
  current = parallel.agree_with_process_0(np.array([status.get('final') == _CURRENT]))[0]
  return final, settings_dict, settings, bool(current)


def keep_other_samples(inference: Inference, workdir, **generate_args) -> None:
  """Before anything is computed: a UserError if `generate(inference, workdir,
  **generate_args)` would meet a complete samples file of other settings."""
  _final_samples(inference, workdir, **generate_args)


def generate(inference: Inference, workdir, *, name: str, num_samples: int, batch_size: int,
             seed: int, name_flag: str = '') -> epath.Path:
  """Samples in chunks of `batch_size` to WORKDIR/samples/<name>.npz; resumes after preemption.

  Chunk i is drawn from fold_in(seed, i) and written as it finishes, so a rerun continues
  with the first missing chunk and gives the same samples as an uninterrupted run. The final
  file and every chunk store their settings (`Inference.sample_settings`: checkpoint step,
  model, diffusion, sampler, clipping, seed, counts). The final file is reused for the same
  settings and never replaced by samples of other settings: the run refuses with one sentence
  (naming `name_flag`, the config field the name comes from, as a way to keep both). Chunks go
  to a folder named by a digest of their settings, so other settings never touch them. A
  damaged or truncated file is drawn again, with a warning naming it.
  """
  final, settings_dict, settings, current = _final_samples(
      inference, workdir, name=name, num_samples=num_samples, batch_size=batch_size, seed=seed,
      name_flag=name_flag)
  if current:
    return final
  chunk_dir = final.parent / (f'{name}_chunks_n{num_samples}_b{batch_size}_s{seed}_'
                              f'{settings_digest(settings_dict)}')
  chunk_dir.mkdir(parents=True, exist_ok=True)
  num_chunks = -(-num_samples // batch_size)
  chunk_paths = [chunk_dir / f'chunk_{i:05d}_of_{num_chunks:05d}.npz' for i in range(num_chunks)]
  done = parallel.agree_with_process_0(
      np.array([_samples_status(p, settings)[0] == _CURRENT for p in chunk_paths]))
  rng = jax.random.PRNGKey(seed)
  start = time.time()
  for i in np.flatnonzero(~done):
    errors.raise_if_interrupted()  # a SIGTERM whose raise was lost inside JAX
    n = min(batch_size, num_samples - i * batch_size)
    chunk = inference.sample(jax.random.fold_in(rng, i), n)
    if jax.process_index() == 0:
      write_npz(chunk_paths[i], samples=chunk, settings=np.array(settings))
    logging.info('%s: chunk %d/%d (%d samples) done, %.1f s elapsed.', name, i + 1, num_chunks,
                 n, time.time() - start)
  if jax.process_index() == 0:
    _write_samples_from_chunks(final, chunk_paths, settings,
                               (num_samples,) + inference.image_shape)
    chunk_dir.rmtree()
  return final


class _WriteOnly:
  """A file seen by `zipfile` as a stream (no seek, no tell): how gs:// files can be written."""

  def __init__(self, f):
    self._file = f

  def write(self, data) -> int:
    self._file.write(data)  # tf.io.gfile's returns None
    return len(data)

  def flush(self) -> None:
    self._file.flush()


def _write_samples_from_chunks(path: epath.Path, chunk_paths, settings: str,
                               shape: tuple[int, ...]) -> None:
  """The .npz of `np.savez(samples=the chunks concatenated [*shape], settings=...)`, written
  atomically one chunk at a time: no host holds all the samples (50,000 at 256x256: 9.8 GB)."""
  tmp = path.parent / (path.name + '.tmp')
  with tmp.open('wb') as f, zipfile.ZipFile(_WriteOnly(f), 'w') as archive:
    with archive.open('samples.npy', 'w', force_zip64=True) as member:
      np.lib.format.write_array_header_2_0(
          member, {'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                   'fortran_order': False, 'shape': shape})
      written = 0
      for p in chunk_paths:
        chunk = read_samples(p)
        if chunk.shape[1:] != shape[1:]:
          raise UserError(f'{p} holds samples {chunk.shape[1:]}, not {shape[1:]}; delete it '
                          f'and sample again.')
        member.write(np.ascontiguousarray(chunk, np.uint8).tobytes())
        written += len(chunk)
      if written != shape[0]:
        raise UserError(f'The chunks in {chunk_paths[0].parent} hold {written} samples, not '
                        f'{shape[0]}; delete them and sample again.')
    with archive.open('settings.npy', 'w') as member:
      np.lib.format.write_array(member, np.array(settings))
  tmp.replace(path)


def iter_samples(path, rows: int) -> Iterator[np.ndarray]:
  """The uint8 samples of an .npz written by `generate`, `rows` at a time (never all at once)."""
  path = epath.Path(path)
  try:
    with path.open('rb') as f, zipfile.ZipFile(f) as archive:
      with archive.open('samples.npy') as member:
        version = np.lib.format.read_magic(member)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read_header(member)
        if fortran_order or dtype != np.uint8 or len(shape) != 4:
          raise ValueError(f'samples are {dtype} {shape}, not uint8 [N, H, W, C]')
        row_bytes = int(np.prod(shape[1:]))
        for start in range(0, shape[0], rows):
          n = min(rows, shape[0] - start)
          data = member.read(n * row_bytes)
          if len(data) != n * row_bytes:
            raise EOFError(f'{path} ends after {start} samples')
          yield np.frombuffer(data, np.uint8).reshape((n,) + tuple(shape[1:]))
  except _UNREADABLE as e:
    raise UserError(f'The samples file {_damaged(path, e)}; delete it and sample again.') from e
