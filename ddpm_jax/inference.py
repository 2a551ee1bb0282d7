"""What the sample and eval jobs share about a workdir: its model's EMA weights and its samples.

`Inference` restores the EMA parameters of a checkpoint onto a mesh and samples from them with the
config's sampler; `generate` draws many samples in resumable chunks into
`WORKDIR/samples/<name>.npz`. Every sample file stores the settings it was drawn with and is
reused only for the same settings.
"""
import io
import json
import time
import zipfile
from typing import Iterator, Optional

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
  """Writes atomically (a temporary name, then a rename) so a preempted write is never read."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(path)


def fingerprint(settings: dict) -> str:
  """The canonical JSON of a settings dict: equal settings, equal strings."""
  return json.dumps(settings, sort_keys=True, default=list)


def _read_npz(path: epath.Path) -> dict:
  """The arrays of an .npz; an unreadable one (truncated, damaged) raises OSError naming it."""
  try:
    with np.load(io.BytesIO(path.read_bytes())) as npz:
      return {key: npz[key] for key in npz.files}
  except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
    raise OSError(f'{path} is damaged or truncated ({type(e).__name__}: {e})') from e


def read_samples(path) -> np.ndarray:
  """The uint8 [N, H, W, C] samples of an .npz written by `generate`."""
  try:
    arrays = _read_npz(epath.Path(path))
  except OSError as e:
    raise UserError(f'The samples file {e}; delete it and sample again.') from e
  if 'samples' not in arrays:
    raise UserError(f'{path} holds no `samples` array; delete it and sample again.')
  return arrays['samples']


def _current_samples(path: epath.Path, settings: str) -> Optional[np.ndarray]:
  """The samples of `path` if it exists, reads and was drawn with `settings`, else None."""
  if not path.exists():
    return None
  try:
    arrays = _read_npz(path)
  except OSError as e:
    logging.warning('The samples file %s; sampling it again.', e)
    return None
  if 'samples' not in arrays or str(arrays.get('settings', '')) != settings:
    logging.info('%s was drawn with other settings; sampling it again.', path)
    return None
  return arrays['samples']


def generate(inference: Inference, workdir, *, name: str, num_samples: int, batch_size: int,
             seed: int) -> epath.Path:
  """Samples in chunks of `batch_size` to WORKDIR/samples/<name>.npz; resumes after preemption.

  Chunk i is drawn from fold_in(seed, i) and written as it finishes, so a rerun continues
  with the first missing chunk and gives the same samples as an uninterrupted run. The final
  file and every chunk store their settings (`Inference.sample_settings`: checkpoint step,
  model, diffusion, sampler, clipping, seed, counts) and are reused only for the same settings;
  a stale, damaged or truncated one is drawn again (the damaged ones with a warning naming them).
  """
  if num_samples < 1:
    raise UserError(f'sampling.num_samples must be at least 1, got {num_samples}.')
  if batch_size < 1:
    raise UserError(f'sampling.batch_size must be at least 1, got {batch_size}.')
  out_dir = epath.Path(workdir) / 'samples'
  final = out_dir / f'{name}.npz'
  settings = fingerprint(inference.sample_settings(seed=seed, num_samples=num_samples,
                                                   batch_size=batch_size))
  if parallel.agree_with_process_0(np.array([_current_samples(final, settings) is not None]))[0]:
    return final
  chunk_dir = out_dir / f'{name}_chunks_n{num_samples}_b{batch_size}_s{seed}'
  chunk_dir.mkdir(parents=True, exist_ok=True)
  num_chunks = -(-num_samples // batch_size)
  chunk_paths = [chunk_dir / f'chunk_{i:05d}_of_{num_chunks:05d}.npz' for i in range(num_chunks)]
  done = parallel.agree_with_process_0(
      np.array([_current_samples(p, settings) is not None for p in chunk_paths]))
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
  except (zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError) as e:
    raise UserError(f'The samples file {path} is damaged or truncated ({type(e).__name__}: '
                    f'{e}); delete it and sample again.') from e
