"""The reverse chain (the paper's Algorithm 2) as one `lax.scan`, and what is built on it.

The pure samplers take any `model_fn(x, t)` and trace it once; jit them (or call them inside a
jitted function) to get one compiled loop over the T steps, not T dispatches. The noise for step t
is drawn from `fold_in(rng, t)` for the whole global batch, so samples depend on the seed, never
on the device count. Nothing here touches files: `inference.py` loads a workdir's model and keeps
its samples, `sample_job.py` is the `--mode=sample` job.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ddpm_jax import diffusion as diffusion_lib, parallel, unet
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
