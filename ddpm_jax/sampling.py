"""The reverse chain as one `lax.scan`: Algorithm 2, respaced chains, DDIM and DPM-Solver++.

The pure samplers take any `model_fn(x, t)` and trace it once; jit them (or call them inside a
jitted function) to get one compiled loop over the kept steps, not one dispatch per step.

* `sampler='ancestral'` with all T steps is the paper's Algorithm 2. With `num_steps` = S < T it
  runs on the respaced chain of S kept timesteps (Nichol & Dhariwal 2021, section 4:
  `diffusion.respace`), still calling the model with the original timestep.
* `sampler='ddim'` is Song et al. (2021), Eq. 12, on the kept timesteps tau_0 < ... < tau_{S-1}
  (abar_i is the original abar at tau_i, and 1 before tau_0):
  x_{tau_{i-1}} = sqrt(abar_{i-1}) x0^ + sqrt(1 - abar_{i-1} - sigma_i^2) eps^ + sigma_i z with
  sigma_i = eta sqrt((1 - abar_{i-1}) / (1 - abar_i)) sqrt(1 - abar_i / abar_{i-1}). x0^ is the
  model's prediction (clipped to [-1, 1] with `clip_denoised`) and eps^ is recomputed from it,
  so eta = 1 over all T steps is the ancestral chain with the posterior variance ('fixedsmall');
  eta = 0 is deterministic given x_T. DDIM uses only x0^, so it samples any model_mean_type and
  model_var_type (a learned variance is ignored).
* `sampler='dpmpp_2m'` / `'dpmpp_3m'` is DPM-Solver++ (Lu et al. 2022b), multistep, order 2 / 3:
  diffusers' `DPMSolverMultistepScheduler(algorithm_type='dpmsolver++', solver_type='midpoint',
  lower_order_final=True, final_sigmas_type='zero')` on the same timesteps. In sampling order
  t_0 > ... > t_{S-1} (the kept timesteps reversed), with alpha_t = sqrt(abar_t),
  sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t): step i calls the model once
  at t_i for m_i = x0^ (clipped with `clip_denoised`, as DDIM's); the last step returns
  x_0 = m_{S-1}; any other goes to t' = t_{i+1} with h = lambda_t' - lambda_t, phi = expm1(-h):
  order 1: x = (sigma_t' / sigma_t) x - alpha_t' phi m_i (DDIM with eta = 0);
  order 2: r0 = (lambda_{t_i} - lambda_{t_{i-1}}) / h, D1 = (m_i - m_{i-1}) / r0,
  x = (sigma_t' / sigma_t) x - alpha_t' phi m_i - 0.5 alpha_t' phi D1;
  order 3: also r1 = (lambda_{t_{i-1}} - lambda_{t_{i-2}}) / h, D1_0 = (m_i - m_{i-1}) / r0,
  D1_1 = (m_{i-1} - m_{i-2}) / r1, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),
  D2 = (D1_0 - D1_1) / (r0 + r1), x = (sigma_t' / sigma_t) x - alpha_t' phi m_i
  + alpha_t' (phi / h + 1) D1 - alpha_t' ((phi / h + 1) / h - 0.5) D2.
  Step i uses order min(order, i + 1) (a warm start: i counts the steps this chain has taken)
  and at most 2 at i = S - 2 when S < 15. Each step is a linear combination of x, m_i, m_{i-1},
  m_{i-2} whose factors are computed in float64 on the host for every step and order; the
  scan carries x, m_{i-1}, m_{i-2} and the count of steps taken.

Kept timesteps (`kept_timesteps`; 0-indexed, S = num_steps, 0 means all T): 'uniform' keeps
floor(i T / S), i = 0 .. S-1, which is DDIM's range(0, T, T // S) when S divides T (100 of 1000:
0, 10, ..., 990) and S evenly spread steps otherwise. 'quadratic' keeps DDIM's
int((i sqrt(0.8 T) / (S - 1))^2) (10 of 1000: 0, 9, 39, 88, ..., 632, 800), except that each
step is at least one past the previous one, t_i = max(rule_i, t_{i-1} + 1), so there are always S
distinct steps where the rule repeats small ones (50 of 1000: its 0, 0, 1, 2, 5, ... becomes
0, 1, 2, 3, 5, ...). Both start at t = 0; 'quadratic' ends near 0.8 T, as DDIM's.
'linspace' keeps round(linspace(0, T - 1, S + 1))[1:] (DPM-Solver's and diffusers' default; 10
of 1000: 100, 200, 300, 400, 500, 599, 699, 799, 899, 999); it repeats a step for S = T, which is
refused. 'trailing' keeps round(arange(T, 0, -T / S)) - 1, as diffusers (10 of 1000: 99, 199, ...,
999), its first S values: floating-point arange adds a spurious one near 0 for some S (61 of
1000). Both start the chain at the last step, t = T - 1.

The initial noise is drawn from split(rng)[0] and the noise of the step at original timestep t
from fold_in(split(rng)[1], t) for the whole global batch, so samples depend on the seed, never
on the device count, and a respaced chain draws the noise of its original timesteps. Nothing
here touches files: `inference.py` loads a workdir's model and keeps its samples, `sample_job.py`
is the `--mode=sample` job.
"""
import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ddpm_jax import diffusion as diffusion_lib, parallel, unet
from ddpm_jax.diffusion import GaussianDiffusion, ModelFn
from ddpm_jax.errors import UserError

DPM_SOLVER_ORDERS = {'dpmpp_2m': 2, 'dpmpp_3m': 3}
SAMPLERS = ('ancestral', 'ddim', *DPM_SOLVER_ORDERS)
SPACINGS = ('uniform', 'quadratic', 'linspace', 'trailing')
# DPM-Solver++ with fewer kept steps than this takes at most order 2 at the second-to-last step.
LOWER_ORDER_FINAL_BELOW = 15


def check_settings(num_timesteps: int, *, sampler: str, num_steps: int, eta: float,
                   spacing: str) -> None:
  """One sentence (a UserError) for a sampler setting that cannot run on a T-step chain."""
  if sampler not in SAMPLERS:
    raise UserError(f'Unknown sampling.sampler {sampler!r}; choose one of {", ".join(SAMPLERS)}.')
  if spacing not in SPACINGS:
    raise UserError(f'Unknown sampling.spacing {spacing!r}; choose one of {", ".join(SPACINGS)}.')
  if not 0 <= num_steps <= num_timesteps:
    raise UserError(f'sampling.num_steps must be in [0, {num_timesteps}] (0 runs all '
                    f'diffusion.num_timesteps={num_timesteps} steps), got {num_steps}.')
  if not 0 <= eta <= 1:
    raise UserError(f'sampling.eta must be in [0, 1] (0: deterministic DDIM, 1: the posterior '
                    f'variance), got {eta}.')
  if eta != 0 and sampler != 'ddim':
    raise UserError(f"sampling.eta={eta} is DDIM's; set sampling.sampler='ddim' to use it, or "
                    f"leave eta at 0 for the {sampler} sampler.")


def kept_timesteps(num_timesteps: int, num_steps: int, spacing: str = 'uniform') -> np.ndarray:
  """The original timesteps of an S-step chain, increasing (see the module docstring)."""
  check_settings(num_timesteps, sampler='ancestral', num_steps=num_steps, eta=0.,
                 spacing=spacing)
  steps = num_steps or num_timesteps
  i = np.arange(steps)
  if spacing == 'uniform':
    return i * num_timesteps // steps
  if spacing == 'quadratic':
    quadratic = (np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2).astype(np.int64)
    return np.maximum.accumulate(quadratic - i) + i  # t_i = max(quadratic_i, t_{i-1} + 1)
  if spacing == 'linspace':
    kept = np.round(np.linspace(0, num_timesteps - 1, steps + 1))[1:]
  else:  # 'trailing'
    kept = (np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)) - 1)[:steps][::-1]
  if np.any(np.diff(kept) <= 0):
    raise UserError(f'sampling.spacing={spacing!r} repeats a timestep when it keeps {steps} of '
                    f'{num_timesteps} steps; set fewer sampling.num_steps or another spacing.')
  return kept.astype(np.int64)


def _ddim_coefficients(alphas_cumprod_kept: np.ndarray, eta: float) -> np.ndarray:
  """[3, S] float32: DDIM's factors of x0^, of eps^ and sigma for each kept step (float64 math)."""
  abar = alphas_cumprod_kept
  abar_prev = np.append(1., abar[:-1])
  sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
  # Non-negative for eta <= 1; larger eta is clipped where sigma exceeds sqrt(1 - abar_prev).
  eps_coef = np.sqrt(np.maximum(1 - abar_prev - sigma ** 2, 0.))
  return np.stack([np.sqrt(abar_prev), eps_coef, sigma]).astype(np.float32)


class ReverseStep(NamedTuple):
  """One reverse step of a chain, on its scan state: `update(state, i, z) -> (state, pred_x0)`.

  The state is x for the ancestral and DDIM samplers, and (x, m_{i-1}, m_{i-2}, steps taken)
  for DPM-Solver++: `start(x_T)` makes it, `finish(state)` is x. Called as `step(x, i, z)` it
  takes step i from x alone, (x at kept[i - 1], pred_x0) (DPM-Solver++ at order 1 then).
  """
  update: Callable
  start: Callable = lambda x: x
  finish: Callable = lambda state: state

  def __call__(self, x, i, z):
    state, pred_xstart = self.update(self.start(x), i, z)
    return self.finish(state), pred_xstart


def _dpm_solver_coefficients(alphas_cumprod_kept: np.ndarray, order: int) -> np.ndarray:
  """[S, 3, 4] float32: the factors of (x, m_i, m_{i-1}, m_{i-2}) at orders 1, 2, 3 (float64).

  Row j is the step from kept[j] to kept[j - 1] (row 0: to x_0 = m); an order whose history
  the chain cannot have there (j + order > S) repeats the highest order it can have. Rows are
  in the order of the kept timesteps, increasing, so m_{i-1} was computed at kept[j + 1].
  """
  abar = np.asarray(alphas_cumprod_kept, np.float64)
  num_steps = len(abar)
  alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
  lam = np.log(alpha) - np.log(sigma)
  out = np.zeros((num_steps, 3, 4))
  out[0, :, 1] = 1.  # the last step: x_0 = m_0
  m0, m1, m2 = np.eye(3)  # the model's x0s as vectors of factors
  for j in range(1, num_steps):
    h = lam[j - 1] - lam[j]
    phi = np.expm1(-h)
    ratio, alpha_next = sigma[j - 1] / sigma[j], alpha[j - 1]
    first = -alpha_next * phi * m0
    factors = [first]
    if j + 1 < num_steps:
      r0 = (lam[j] - lam[j + 1]) / h
      d1_0 = (m0 - m1) / r0
      factors.append(first - 0.5 * alpha_next * phi * d1_0)
      if j + 2 < num_steps:
        r1 = (lam[j + 1] - lam[j + 2]) / h
        d1_1 = (m1 - m2) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        factors.append(first + alpha_next * (phi / h + 1) * d1
                       - alpha_next * ((phi / h + 1) / h - 0.5) * d2)
    factors = factors[:order]
    factors += factors[-1:] * (3 - len(factors))
    out[j, :, 0] = ratio
    out[j, :, 1:] = factors
  return out.astype(np.float32)


def _dpm_solver_orders(num_steps: int, order: int) -> np.ndarray:
  """[S] int32: the highest order of each kept step, the warm start aside (see the docstring)."""
  orders = np.full(num_steps, order, np.int32)
  if num_steps < LOWER_ORDER_FINAL_BELOW and num_steps > 1:
    orders[1] = min(order, 2)  # the second-to-last step of the chain
  return orders


def _dpm_solver_step(diffusion: GaussianDiffusion, model_fn: ModelFn, kept: np.ndarray, *,
                     order: int, clip_denoised: bool) -> ReverseStep:
  """DPM-Solver++ of `order` (1, 2 or 3) on the `kept` timesteps, one model call a step."""
  coefficients = jnp.asarray(_dpm_solver_coefficients(diffusion.alphas_cumprod[kept], order))
  max_orders = jnp.asarray(_dpm_solver_orders(len(kept), order))
  kept_table = jnp.asarray(kept, jnp.int32)

  def update(state, i, z):
    del z  # deterministic
    x, m_prev, m_prev2, steps_taken = state
    t = jnp.full((x.shape[0],), kept_table[i], jnp.int32)
    m = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised)['pred_xstart']
    step_order = jnp.minimum(max_orders[i], steps_taken + 1)
    c_x, c_0, c_1, c_2 = coefficients[i, step_order - 1]
    x = c_x * x + c_0 * m + c_1 * m_prev + c_2 * m_prev2
    return (x, m, m_prev, steps_taken + 1), m

  return ReverseStep(
      update, start=lambda x: (x, jnp.zeros_like(x), jnp.zeros_like(x), jnp.int32(0)),
      finish=lambda state: state[0])


def _reverse_step(diffusion: GaussianDiffusion, model_fn: ModelFn, *, clip_denoised: bool,
                  sampler: str = 'ancestral', num_steps: int = 0, eta: float = 0.,
                  spacing: str = 'uniform'):
  """(step, kept): a `ReverseStep` whose step i goes from kept[i] to kept[i - 1]."""
  check_settings(diffusion.num_timesteps, sampler=sampler, num_steps=num_steps, eta=eta,
                 spacing=spacing)
  kept = kept_timesteps(diffusion.num_timesteps, num_steps, spacing)
  kept_table = jnp.asarray(kept, jnp.int32)
  batch_t = lambda x, i: jnp.full((x.shape[0],), kept_table[i], jnp.int32)
  if sampler in DPM_SOLVER_ORDERS:
    return _dpm_solver_step(diffusion, model_fn, kept, order=DPM_SOLVER_ORDERS[sampler],
                            clip_denoised=clip_denoised), kept
  if sampler == 'ancestral':
    every_step = len(kept) == diffusion.num_timesteps
    chain = diffusion if every_step else diffusion_lib.respace(diffusion, kept)

    def step(x, i, z):
      t = batch_t(x, i)
      return chain.p_sample(lambda x_, _: model_fn(x_, t), x, jnp.full_like(t, i), z,
                            clip_denoised=clip_denoised)
    return ReverseStep(step), kept

  coefficients = _ddim_coefficients(diffusion.alphas_cumprod[kept], eta)

  def step(x, i, z):
    t = batch_t(x, i)
    pred_xstart = diffusion.p_mean_variance(model_fn, x, t,
                                            clip_denoised=clip_denoised)['pred_xstart']
    eps = diffusion.predict_eps_from_xstart(x, t, pred_xstart)
    x0_coef, eps_coef, sigma = jnp.asarray(coefficients)[:, i]
    return x0_coef * pred_xstart + eps_coef * eps + sigma * z, pred_xstart
  return ReverseStep(step), kept


def _reverse_chain(step: ReverseStep, kept: np.ndarray, x_T, noise_fn, *, start_index: int,
                   record_every: int = 0, num_timesteps: int = 0):
  """Runs chain steps i = start_index, ..., 0 with noise_fn(kept[i]); optionally keeps pred_x0.

  With `record_every`, slot k of [B, num_timesteps // record_every, ...] ends up holding pred_x0
  at the smallest kept t in [k every, (k + 1) every), t = k every with all steps (as the authors).
  """
  batch = x_T.shape[0]
  num_recorded = (num_timesteps // record_every) if record_every else 0

  def body(carry, i_and_t):
    state, recorded = carry
    i, t_scalar = i_and_t
    state, pred_xstart = step.update(state, i, noise_fn(t_scalar))
    if num_recorded:
      mask = (t_scalar // record_every == jnp.arange(num_recorded))
      mask = mask.reshape((1, num_recorded) + (1,) * (x_T.ndim - 1))
      recorded = jnp.where(mask, pred_xstart[:, None], recorded)
    return (state, recorded), None

  recorded = jnp.zeros((batch, num_recorded) + x_T.shape[1:], x_T.dtype)
  indices = jnp.arange(start_index, -1, -1, dtype=jnp.int32)
  timesteps = jnp.asarray(kept, jnp.int32)[::-1][len(kept) - 1 - start_index:]
  (state, recorded), _ = jax.lax.scan(body, (step.start(x_T), recorded), (indices, timesteps))
  return step.finish(state), recorded


def _step_noise(rng, shape, mesh: Optional[Mesh] = None):
  """z for original step t: a function of (rng, t) only, drawn for the whole global batch."""
  return lambda t_scalar: _shard(
      jax.random.normal(jax.random.fold_in(rng, t_scalar), shape, jnp.float32), mesh)


def _shard(x, mesh: Optional[Mesh]):
  """Keeps x's batch split over the mesh's `data` axis inside a jitted sampler."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, parallel.data_sharding(mesh))


def _initial_noise(rng, shape, mesh):
  return _shard(jax.random.normal(rng, shape, jnp.float32), mesh)


def _sample(diffusion, model_fn, shape, rng, *, record_every: int = 0, clip_denoised: bool,
            mesh, **sampler_settings):
  rng_init, rng_chain = jax.random.split(rng)
  step, kept = _reverse_step(diffusion, model_fn, clip_denoised=clip_denoised,
                             **sampler_settings)
  if record_every:
    slots = np.arange(diffusion.num_timesteps // record_every)
    empty = np.setdiff1d(slots, kept // record_every)
    if empty.size:
      raise UserError(f'sampling.progressive_every={record_every} is finer than the '
                      f'{len(kept)} kept steps (none in [{empty[0] * record_every}, '
                      f'{(empty[0] + 1) * record_every})); raise it or sampling.num_steps.')
  return _reverse_chain(step, kept, _initial_noise(rng_init, shape, mesh),
                        _step_noise(rng_chain, shape, mesh), start_index=len(kept) - 1,
                        record_every=record_every, num_timesteps=diffusion.num_timesteps)


def sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, shape, rng, *,
                sampler: str = 'ancestral', num_steps: int = 0, eta: float = 0.0,
                spacing: str = 'uniform', clip_denoised: bool = True,
                mesh: Optional[Mesh] = None):
  """Samples x_0 [shape] in [-1, 1] from x_T ~ N(0, I) with `sampler` over the kept steps.

  num_steps = 0 keeps all T steps; the defaults are `p_sample_loop`, sample for sample. With a
  `mesh` (inside jit), the batch stays sharded over its `data` axis.
  """
  x_0, _ = _sample(diffusion, model_fn, shape, rng, sampler=sampler, num_steps=num_steps,
                   eta=eta, spacing=spacing, clip_denoised=clip_denoised, mesh=mesh)
  return x_0


def p_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, shape, rng, *,
                  clip_denoised: bool = True, mesh: Optional[Mesh] = None):
  """Samples x_0 [shape] in [-1, 1] from x_T ~ N(0, I) through all T ancestral steps."""
  return sample_loop(diffusion, model_fn, shape, rng, clip_denoised=clip_denoised, mesh=mesh)


def p_sample_loop_progressive(diffusion: GaussianDiffusion, model_fn: ModelFn, shape, rng, *,
                              every: int = 50, clip_denoised: bool = True,
                              mesh: Optional[Mesh] = None, **sampler_settings):
  """As `sample_loop`, also returning pred_x0 at t = 0, every, 2 every, ... (Fig. 6).

  Returns (x_0, pred_xstarts [B, T // every, H, W, C]); slot k holds the prediction at
  t = k * every (with fewer kept steps: at the smallest kept t >= k * every), so slot 0 agrees
  with x_0 up to the last step's mean. `sampler_settings` are `sample_loop`'s.
  """
  if every < 1:
    raise UserError(f'every must be at least 1, got {every}.')
  return _sample(diffusion, model_fn, shape, rng, record_every=every,
                 clip_denoised=clip_denoised, mesh=mesh, **sampler_settings)


def interpolate(diffusion: GaussianDiffusion, model_fn: ModelFn, x1, x2, rng, *, t: int,
                num_lambdas: int = 9, clip_denoised: bool = True, **sampler_settings):
  """The paper's Fig. 8: encode x1, x2 [B, H, W, C] with q to step t, mix, decode.

  x_t and x'_t are drawn once from q(x_t | x_0) and linearly interpolated for lambda in
  linspace(0, 1, num_lambdas); the reverse chain from t uses the same noise for every lambda.
  With fewer kept steps (`sampler_settings` are `sample_loop`'s), t is rounded down to a kept
  step and the chain (ancestral or DDIM) decodes from there. Returns [B, num_lambdas, H, W, C]
  (lambda = 0 decodes x1's latent, lambda = 1 x2's).
  """
  if not 0 <= t < diffusion.num_timesteps:
    raise UserError(f't must be in [0, {diffusion.num_timesteps}), got {t}.')
  step, kept = _reverse_step(diffusion, model_fn, clip_denoised=clip_denoised,
                             **sampler_settings)
  start_index = int(np.searchsorted(kept, t, side='right')) - 1
  batch = x1.shape[0]
  rng_q1, rng_q2, rng_chain = jax.random.split(rng, 3)
  t_b = jnp.full((batch,), kept[start_index], dtype=jnp.int32)
  z1 = diffusion.q_sample(x1, t_b, jax.random.normal(rng_q1, x1.shape, x1.dtype))
  z2 = diffusion.q_sample(x2, t_b, jax.random.normal(rng_q2, x2.shape, x2.dtype))
  lambdas = jnp.linspace(0., 1., num_lambdas).reshape(1, num_lambdas, 1, 1, 1)
  z = (1 - lambdas) * z1[:, None] + lambdas * z2[:, None]  # [B, L, H, W, C]
  flat = z.reshape((batch * num_lambdas,) + x1.shape[1:])
  # The same noise for every lambda: draw [B, 1, ...] and broadcast over the lambda axis.
  pair_noise = _step_noise(rng_chain, (batch, 1) + x1.shape[1:])
  noise_fn = lambda t_: jnp.broadcast_to(pair_noise(t_), z.shape).reshape(flat.shape)
  x_0, _ = _reverse_chain(step, kept, flat, noise_fn, start_index=start_index)
  return x_0.reshape((batch, num_lambdas) + x1.shape[1:])


def settings(config) -> dict:
  """The sampler settings of a config: `sample_loop`'s keyword arguments but clip_denoised."""
  s = config.sampling
  return dict(sampler=s.sampler, num_steps=int(s.num_steps), eta=float(s.eta),
              spacing=s.spacing)


def settings_tag(config) -> str:
  """'' for the paper's chain (ancestral, all T steps), else e.g. '_ddim50', '_ancestral100'.

  Spacing and eta are named when not the defaults: '_ddim50_quadratic_eta0.5'.
  """
  s = settings(config)
  num_timesteps = config.diffusion.num_timesteps
  check_settings(num_timesteps, **s)
  steps = s['num_steps'] or num_timesteps
  if s['sampler'] == 'ancestral' and steps == num_timesteps:
    return ''
  tag = f'_{s["sampler"]}{steps}'
  if s['spacing'] != 'uniform' and steps != num_timesteps:
    tag += f'_{s["spacing"]}'
  return tag + (f'_eta{s["eta"]:g}' if s['eta'] else '')


def jit_sampler(config, mesh: Mesh):
  """jit of (params, rng, batch) -> `sample_loop` samples [batch, H, W, C] in [-1, 1].

  The model and sampling settings (sampler, num_steps, eta, spacing, clip_denoised) of `config`;
  `batch` is static and must divide by the device count: the samples are sharded over the mesh's
  `data` axis.
  """
  model, diffusion = unet.create_model(config), diffusion_lib.from_config(config)
  d = config.data
  sampler_settings = settings(config)
  check_settings(diffusion.num_timesteps, **sampler_settings)

  @functools.partial(jax.jit, static_argnums=2, out_shardings=parallel.data_sharding(mesh))
  def sample(params, rng, batch):
    model_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
    return sample_loop(diffusion, model_fn, (batch, d.image_size, d.image_size, d.channels),
                       rng, clip_denoised=config.sampling.clip_denoised, mesh=mesh,
                       **sampler_settings)
  return sample
