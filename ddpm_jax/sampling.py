"""The reverse chain (the paper's Algorithm 2) as one `lax.scan`, and what is built on it.

The pure samplers take any `model_fn(x, t)` and trace it once; jit them (or call them inside a
jitted function) to get one compiled loop over the T steps, not T dispatches. The noise for step t
is drawn from `fold_in(rng, t)` for the whole global batch, so samples depend on the seed, never
on the device count. `sample_from_workdir` is the `--mode=sample` job.
"""
import functools
import io
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from ddpm_jax import checkpointing, diffusion as diffusion_lib, images, parallel, unet
from ddpm_jax.diffusion import GaussianDiffusion, ModelFn
from ddpm_jax.errors import UserError


def _reverse_chain(diffusion: GaussianDiffusion, model_fn: ModelFn, x_T, noise_fn, *,
                   start: int, clip_denoised: bool, record_every: int = 0):
  """Runs x_t -> x_{t-1} for t = start, ..., 0 with noise_fn(t) as z; optionally keeps pred_x0."""
  batch = x_T.shape[0]
  num_recorded = (diffusion.num_timesteps // record_every) if record_every else 0

  def body(carry, t_scalar):
    x, recorded = carry
    t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
    x, pred_xstart = diffusion.p_sample(model_fn, x, t, noise_fn(t_scalar),
                                        clip_denoised=clip_denoised)
    if num_recorded:  # as the authors: slot k ends up holding pred_x0 at t = k * every
      mask = (t_scalar // record_every == jnp.arange(num_recorded))
      mask = mask.reshape((1, num_recorded) + (1,) * (x.ndim - 1))
      recorded = jnp.where(mask, pred_xstart[:, None], recorded)
    return (x, recorded), None

  recorded = jnp.zeros((batch, num_recorded) + x_T.shape[1:], x_T.dtype)
  timesteps = jnp.arange(start, -1, -1, dtype=jnp.int32)
  (x_0, recorded), _ = jax.lax.scan(body, (x_T, recorded), timesteps)
  return x_0, recorded


def _step_noise(rng, shape, mesh: Optional[Mesh] = None):
  """z for step t: a function of (rng, t) only, drawn for the whole global batch."""
  return lambda t_scalar: _shard(
      jax.random.normal(jax.random.fold_in(rng, t_scalar), shape, jnp.float32), mesh)


def _shard(x, mesh: Optional[Mesh]):
  """Keeps x's batch split over the mesh's `data` axis inside a jitted sampler."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, parallel.data_sharding(mesh))


def _initial_noise(rng, shape, mesh):
  return _shard(jax.random.normal(rng, shape, jnp.float32), mesh)


def p_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, shape, rng, *,
                  clip_denoised: bool = True, mesh: Optional[Mesh] = None):
  """Samples x_0 [shape] in [-1, 1] from x_T ~ N(0, I) through all T reverse steps.

  With a `mesh` (inside jit), the batch stays sharded over its `data` axis.
  """
  rng_init, rng_chain = jax.random.split(rng)
  x_T = _initial_noise(rng_init, shape, mesh)
  x_0, _ = _reverse_chain(diffusion, model_fn, x_T, _step_noise(rng_chain, shape, mesh),
                          start=diffusion.num_timesteps - 1, clip_denoised=clip_denoised)
  return x_0


def p_sample_loop_progressive(diffusion: GaussianDiffusion, model_fn: ModelFn, shape, rng, *,
                              every: int = 50, clip_denoised: bool = True,
                              mesh: Optional[Mesh] = None):
  """As `p_sample_loop`, also returning pred_x0 at t = 0, every, 2 every, ... (Fig. 6).

  Returns (x_0, pred_xstarts [B, T // every, H, W, C]); slot k holds the prediction at
  t = k * every, so slot 0 agrees with x_0 up to the last step's mean.
  """
  if every < 1:
    raise UserError(f'every must be at least 1, got {every}.')
  rng_init, rng_chain = jax.random.split(rng)
  x_T = _initial_noise(rng_init, shape, mesh)
  return _reverse_chain(diffusion, model_fn, x_T, _step_noise(rng_chain, shape, mesh),
                        start=diffusion.num_timesteps - 1, clip_denoised=clip_denoised,
                        record_every=every)


def interpolate(diffusion: GaussianDiffusion, model_fn: ModelFn, x1, x2, rng, *, t: int,
                num_lambdas: int = 9, clip_denoised: bool = True):
  """The paper's Fig. 8: encode x1, x2 [B, H, W, C] with q to step t, mix, decode.

  x_t and x'_t are drawn once from q(x_t | x_0) and linearly interpolated for lambda in
  linspace(0, 1, num_lambdas); the reverse chain from t uses the same noise for every lambda.
  Returns [B, num_lambdas, H, W, C] (lambda = 0 decodes x1's latent, lambda = 1 x2's).
  """
  if not 0 <= t < diffusion.num_timesteps:
    raise UserError(f't must be in [0, {diffusion.num_timesteps}), got {t}.')
  batch = x1.shape[0]
  rng_q1, rng_q2, rng_chain = jax.random.split(rng, 3)
  t_b = jnp.full((batch,), t, dtype=jnp.int32)
  z1 = diffusion.q_sample(x1, t_b, jax.random.normal(rng_q1, x1.shape, x1.dtype))
  z2 = diffusion.q_sample(x2, t_b, jax.random.normal(rng_q2, x2.shape, x2.dtype))
  lambdas = jnp.linspace(0., 1., num_lambdas).reshape(1, num_lambdas, 1, 1, 1)
  z = (1 - lambdas) * z1[:, None] + lambdas * z2[:, None]  # [B, L, H, W, C]
  flat = z.reshape((batch * num_lambdas,) + x1.shape[1:])
  # The same noise for every lambda: draw [B, 1, ...] and broadcast over the lambda axis.
  pair_noise = _step_noise(rng_chain, (batch, 1) + x1.shape[1:])
  noise_fn = lambda t_: jnp.broadcast_to(pair_noise(t_), z.shape).reshape(flat.shape)
  x_0, _ = _reverse_chain(diffusion, model_fn, flat, noise_fn, start=t,
                          clip_denoised=clip_denoised)
  return x_0.reshape((batch, num_lambdas) + x1.shape[1:])


# === The --mode=sample job ===

def jit_sampler(config, mesh: Mesh):
  """jit of (params, rng, batch) -> `p_sample_loop` samples [batch, H, W, C] in [-1, 1].

  The model and sampling settings of `config`; `batch` is static and must divide by the device
  count: the samples are sharded over the mesh's `data` axis.
  """
  model, diffusion = unet.create_model(config), diffusion_lib.from_config(config)
  d = config.data

  @functools.partial(jax.jit, static_argnums=2, out_shardings=parallel.data_sharding(mesh))
  def sample(params, rng, batch):
    model_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
    return p_sample_loop(diffusion, model_fn, (batch, d.image_size, d.image_size, d.channels),
                         rng, clip_denoised=config.sampling.clip_denoised, mesh=mesh)
  return sample


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
    self._sample_jit = jit_sampler(config, self.mesh)

  def model_fn(self, params) -> ModelFn:
    return lambda x, t: self.model.apply({'params': params}, x, t, train=False)

  def padded(self, n: int) -> int:
    """n rounded up to a multiple of the device count (the padding is dropped afterwards)."""
    return -(-n // self.mesh.size) * self.mesh.size

  def sample(self, rng, n: int) -> np.ndarray:
    """n samples as uint8 [n, H, W, C] on the host (every process gets all of them)."""
    x = self._sample_jit(self.params, rng, self.padded(n))
    return images.to_uint8(parallel.to_host(x)[:n])


def _write_npz(path: epath.Path, **arrays) -> None:
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
      _write_npz(chunk_paths[i], samples=chunk)
    logging.info('%s: chunk %d/%d (%d samples) done, %.1f s elapsed.', name, i + 1, num_chunks,
                 n, time.time() - start)
  if jax.process_index() == 0:
    _write_npz(final, samples=np.concatenate([read_samples(p) for p in chunk_paths]))
    chunk_dir.rmtree()
  return final


def _progressive_figure(inference: Inference, rng, *, num_images: int, every: int) -> np.ndarray:
  """Fig. 6: a row per sample, pred_x0 from t = T - every down to 0, then the sample."""
  batch = inference.padded(num_images)
  fn = jax.jit(lambda params, rng: p_sample_loop_progressive(
      inference.diffusion, inference.model_fn(params), (batch,) + inference.image_shape, rng,
      every=every, clip_denoised=inference.config.sampling.clip_denoised, mesh=inference.mesh))
  x_0, preds = fn(inference.params, rng)
  preds = parallel.to_host(preds)[:num_images, ::-1]  # large t first
  rows = np.concatenate([preds, parallel.to_host(x_0)[:num_images, None]], axis=1)
  return images.image_grid(images.to_uint8(rows.reshape((-1,) + rows.shape[2:])),
                           ncol=rows.shape[1])


def _interpolation_figure(inference: Inference, rng, *, t: int, num_lambdas: int,
                          num_pairs: int = 4) -> np.ndarray:
  """Fig. 8: a row per pair of test images, lambda from 0 to 1, the sources at both ends."""
  from ddpm_jax import input_pipeline
  real = next(input_pipeline.create_eval_iterator(
      inference.config, 'test', batch_size=inference.padded(2 * num_pairs),
      num_images=2 * num_pairs))['image']
  real = parallel.to_host(parallel.global_batch(inference.mesh, real))[:2 * num_pairs]
  x1, x2 = real[:num_pairs], real[num_pairs:2 * num_pairs]
  fn = jax.jit(lambda params, a, b, rng: interpolate(
      inference.diffusion, inference.model_fn(params), a, b, rng, t=t, num_lambdas=num_lambdas,
      clip_denoised=inference.config.sampling.clip_denoised))
  mixed = np.asarray(fn(inference.params, x1, x2, rng))
  rows = np.concatenate([x1[:, None], mixed, x2[:, None]], axis=1)
  return images.image_grid(images.to_uint8(rows.reshape((-1,) + rows.shape[2:])),
                           ncol=rows.shape[1])


def _upscale(image_size: int) -> int:
  return max(1, 64 // image_size)


def sample_from_workdir(config, workdir, *, mesh: Optional[Mesh] = None) -> dict:
  """--mode=sample: samples of the EMA model of a checkpoint, as .npz and a PNG grid.

  Writes WORKDIR/samples/<name>_<step>.npz (key `samples`, uint8 [N, H, W, C]) and a grid
  PNG beside it; with sampling.progressive_every or sampling.interpolate_t, also the paper's
  Fig. 6 and Fig. 8 as PNGs. Returns the paths.
  """
  s = config.sampling
  inference = Inference(config, workdir, step=s.step, mesh=mesh)
  name = f'{s.name}_{inference.step}'
  logging.info('Sampling %d images from the EMA weights of step %d on %d devices.',
               s.num_samples, inference.step, inference.mesh.size)
  npz = generate(inference, workdir, name=name, num_samples=s.num_samples,
                 batch_size=s.batch_size, seed=config.seed)
  out = {'samples_npz': str(npz)}
  if jax.process_index() == 0:
    grid = images.image_grid(read_samples(npz)[:100], ncol=10)
    out['grid_png'] = images.save_png(npz.parent / f'{name}.png', grid,
                                      upscale=_upscale(config.data.image_size))
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1 << 20)
  if s.progressive_every > 0:
    figure = _progressive_figure(inference, rng, num_images=min(s.num_samples, 8),
                                 every=s.progressive_every)
    if jax.process_index() == 0:
      out['progressive_png'] = images.save_png(npz.parent / f'{name}_progressive.png', figure,
                                               upscale=_upscale(config.data.image_size))
  if s.interpolate_t > 0:
    figure = _interpolation_figure(inference, rng, t=s.interpolate_t,
                                   num_lambdas=s.interpolate_lambdas)
    if jax.process_index() == 0:
      out['interpolation_png'] = images.save_png(npz.parent / f'{name}_interpolation.png',
                                                 figure, upscale=_upscale(config.data.image_size))
  for key, path in out.items():
    logging.info('Wrote %s: %s', key, path)
  return out
