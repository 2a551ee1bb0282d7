"""What the sample and eval jobs share about a workdir: its model's EMA weights and its samples.

`Inference` restores the EMA parameters of a checkpoint onto a mesh and samples from them;
`generate` draws many samples in resumable chunks into `WORKDIR/samples/<name>.npz`.
"""
import io
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from ddpm_jax import checkpointing, diffusion as diffusion_lib, images, parallel, sampling, unet
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
        workdir, template['params'], None if step is None or step < 0 else step)
    self.params = parallel.replicate(self.mesh, params)
    self._sample_jit = sampling.jit_sampler(config, self.mesh)

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


def read_samples(path) -> np.ndarray:
  """The uint8 [N, H, W, C] samples of an .npz written by `generate`."""
  with epath.Path(path).open('rb') as f:
    return np.load(io.BytesIO(f.read()))['samples']


def generate(inference: Inference, workdir, *, name: str, num_samples: int, batch_size: int,
             seed: int) -> epath.Path:
  """Samples in chunks of `batch_size` to WORKDIR/samples/<name>.npz; resumes after preemption.

  Chunk i is drawn from fold_in(seed, i) and written as it finishes, so a rerun continues
  with the first missing chunk and gives the same samples as an uninterrupted run. Chunks are
  kept apart per (num_samples, batch_size, seed): a rerun that changes one starts afresh.
  """
  if num_samples < 1:
    raise UserError(f'sampling.num_samples must be at least 1, got {num_samples}.')
  if batch_size < 1:
    raise UserError(f'sampling.batch_size must be at least 1, got {batch_size}.')
  out_dir = epath.Path(workdir) / 'samples'
  final = out_dir / f'{name}.npz'
  if final.exists() and len(read_samples(final)) == num_samples:
    return final
  chunk_dir = out_dir / f'{name}_chunks_n{num_samples}_b{batch_size}_s{seed}'
  chunk_dir.mkdir(parents=True, exist_ok=True)
  num_chunks = -(-num_samples // batch_size)
  chunk_paths = [chunk_dir / f'chunk_{i:05d}_of_{num_chunks:05d}.npz' for i in range(num_chunks)]
  done = parallel.agree_with_process_0(np.array([p.exists() for p in chunk_paths]))
  rng = jax.random.PRNGKey(seed)
  start = time.time()
  for i in np.flatnonzero(~done):
    n = min(batch_size, num_samples - i * batch_size)
    chunk = inference.sample(jax.random.fold_in(rng, i), n)
    if jax.process_index() == 0:
      write_npz(chunk_paths[i], samples=chunk)
    logging.info('%s: chunk %d/%d (%d samples) done, %.1f s elapsed.', name, i + 1, num_chunks,
                 n, time.time() - start)
  if jax.process_index() == 0:
    write_npz(final, samples=np.concatenate([read_samples(p) for p in chunk_paths]))
    chunk_dir.rmtree()
  return final
