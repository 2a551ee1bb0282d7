"""The diffusion process of Ho et al. (2020): schedules, q, the posterior, p and the bound.

A line-by-line port of the authors' `diffusion_utils_2.GaussianDiffusion2` to pure JAX
functions. Coefficient tables are computed in float64 with numpy and gathered as float32, as the
authors did. Timesteps are 0-indexed (`t in [0, T)`; the paper's t = 1 is our t = 0), images are
NHWC in [-1, 1], and `model_fn(x, t)` is any function of arrays, so a network or a closed form can
be plugged in.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import UserError

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

BETA_SCHEDULES = ('linear', 'quad', 'const', 'jsd', 'warmup10', 'warmup50', 'cosine')
MODEL_MEAN_TYPES = ('eps', 'xstart', 'xprev')
# 'learned' is the authors' (the second half of the output is the log-variance itself);
# 'learned_range' is Nichol & Dhariwal's (it interpolates between log beta_t and log beta~_t).
MODEL_VAR_TYPES = ('fixedlarge', 'fixedsmall', 'learned', 'learned_range')
LOSS_TYPES = ('mse', 'kl')


def _check_choice(kind: str, value: str, valid) -> None:
  if value not in valid:
    raise UserError(f'Unknown {kind} {value!r}; choose one of {", ".join(valid)}.')


def _warmup_beta(beta_start, beta_end, num_timesteps, warmup_frac):
  betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  warmup_time = int(num_timesteps * warmup_frac)
  betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
  return betas


def _cosine_betas(num_timesteps, s=0.008, max_beta=0.999):
  """Nichol & Dhariwal (2021), Eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi / 2)."""
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  alpha_bar = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
  return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def get_beta_schedule(name: str, *, beta_start: float, beta_end: float,
                      num_timesteps: int) -> np.ndarray:
  """The authors' schedules (plus 'cosine', which ignores beta_start/beta_end), in float64."""
  _check_choice('beta schedule', name, BETA_SCHEDULES)
  if num_timesteps < 1:
    raise UserError(f'num_timesteps must be at least 1, got {num_timesteps}.')
  if name == 'quad':
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64)**2
  elif name == 'linear':
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif name == 'warmup10':
    betas = _warmup_beta(beta_start, beta_end, num_timesteps, 0.1)
  elif name == 'warmup50':
    betas = _warmup_beta(beta_start, beta_end, num_timesteps, 0.5)
  elif name == 'const':
    betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  elif name == 'jsd':  # 1/T, 1/(T-1), 1/(T-2), ..., 1
    betas = 1. / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
  else:
    betas = _cosine_betas(num_timesteps)
  assert betas.shape == (num_timesteps,)
  return betas


def meanflat(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * jnp.power(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
  """log p(x) of data on 256 bins in [-1, 1] under a Gaussian, the edge bins open-ended."""
  assert x.shape == means.shape == log_scales.shape
  centered_x = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1. / 255.))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1. / 255.))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1. - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
  """q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), the model p(x_{t-1} | x_t) and the bound.

  The object holds only constant tables; every method is a pure function of its array arguments
  and can be called under `jax.jit`, `vmap` or `lax.scan`.
  """

  def __init__(self, betas: np.ndarray, *, model_mean_type: str = 'eps',
               model_var_type: str = 'fixedlarge', loss_type: str = 'mse'):
    _check_choice('model_mean_type', model_mean_type, MODEL_MEAN_TYPES)
    _check_choice('model_var_type', model_var_type, MODEL_VAR_TYPES)
    _check_choice('loss_type', loss_type, LOSS_TYPES)
    if loss_type == 'mse' and model_var_type.startswith('learned'):
      raise UserError(f"model_var_type={model_var_type!r} is learned only by loss_type='kl' (the "
                      f"variational bound); with loss_type='mse' use 'fixedlarge' or "
                      f"'fixedsmall'.")
    self.model_mean_type = model_mean_type
    self.model_var_type = model_var_type
    self.loss_type = loss_type

    betas = np.asarray(betas, dtype=np.float64)  # computations here in float64 for accuracy
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
      raise UserError('betas must be a 1-D array with every entry in (0, 1].')
    self.betas = betas
    self.num_timesteps = int(betas.shape[0])

    alphas = 1. - betas
    self.alphas_cumprod = np.cumprod(alphas, axis=0)
    self.alphas_cumprod_prev = np.append(1., self.alphas_cumprod[:-1])
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1. - self.alphas_cumprod)
    self.log_one_minus_alphas_cumprod = np.log(1. - self.alphas_cumprod)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1. / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1. / self.alphas_cumprod - 1)

    # q(x_{t-1} | x_t, x_0); the log is clipped because the variance is 0 at t = 0.
    self.posterior_variance = betas * (1. - self.alphas_cumprod_prev) / (1. - self.alphas_cumprod)
    self.posterior_log_variance_clipped = np.log(
        np.append(self.posterior_variance[1], self.posterior_variance[1:])
        if self.num_timesteps > 1 else self.posterior_variance)
    self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1. - self.alphas_cumprod)
    self.posterior_mean_coef2 = ((1. - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                 / (1. - self.alphas_cumprod))
    # fixedlarge: variance beta_t, with the first log-variance set to the posterior's for a
    # better decoder likelihood (as the authors did).
    self.fixedlarge_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:])
                                          if self.num_timesteps > 1 else betas)

  @staticmethod
  def _extract(table: np.ndarray, t: jax.Array, x_shape) -> jax.Array:
    """table[t] as float32, reshaped to [B, 1, 1, ...] to broadcast against x."""
    if t.shape != (x_shape[0],):
      raise UserError(f't must have shape [batch] = [{x_shape[0]}], got {tuple(t.shape)}.')
    out = jnp.asarray(table, dtype=jnp.float32)[t]
    return out.reshape((x_shape[0],) + (1,) * (len(x_shape) - 1))

  # === q ===

  def q_mean_variance(self, x_start, t):
    mean = self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
    variance = self._extract(1. - self.alphas_cumprod, t, x_start.shape)
    log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
    return mean, variance, log_variance

  def q_sample(self, x_start, t, noise):
    """Diffuse the data (t == 0 means diffused for one step)."""
    assert noise.shape == x_start.shape
    return (self._extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

  def q_posterior_mean_variance(self, x_start, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    assert x_start.shape == x_t.shape
    mean = (self._extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
    variance = self._extract(self.posterior_variance, t, x_t.shape)
    log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance

  # === p ===

  def _split_model_output(self, model_output, x):
    """Checks the channel count; returns (mean part, variance part or None)."""
    channels = x.shape[-1]
    learned = self.model_var_type.startswith('learned')
    expected = x.shape[:-1] + ((2 * channels,) if learned else (channels,))
    if model_output.shape != expected:
      raise UserError(
          f'The model output has shape {tuple(model_output.shape)}, but '
          f'model_var_type={self.model_var_type!r} needs {tuple(expected)} '
          f'({"2 x " if learned else ""}{channels} channels for {channels}-channel images).')
    model_output = model_output.astype(jnp.float32)
    if learned:
      return jnp.split(model_output, 2, axis=-1)
    return model_output, None

  def p_mean_variance(self, model_fn: ModelFn, x, t, *, clip_denoised: bool) -> dict:
    """Mean, variance, log-variance of p(x_{t-1} | x_t) and the model's prediction of x_0."""
    model_output, var_output = self._split_model_output(model_fn(x, t), x)

    if self.model_var_type == 'learned':
      model_log_variance = var_output
      model_variance = jnp.exp(model_log_variance)
    elif self.model_var_type == 'learned_range':
      min_log = self._extract(self.posterior_log_variance_clipped, t, x.shape)
      max_log = self._extract(np.log(self.betas), t, x.shape)
      frac = (var_output + 1) / 2  # the model's v in [-1, 1]
      model_log_variance = frac * max_log + (1 - frac) * min_log
      model_variance = jnp.exp(model_log_variance)
    else:
      variance, log_variance = {
          'fixedlarge': (self.betas, self.fixedlarge_log_variance),
          'fixedsmall': (self.posterior_variance, self.posterior_log_variance_clipped),
      }[self.model_var_type]
      ones = jnp.ones(x.shape, jnp.float32)
      model_variance = self._extract(variance, t, x.shape) * ones
      model_log_variance = self._extract(log_variance, t, x.shape) * ones

    maybe_clip = (lambda x_: jnp.clip(x_, -1., 1.)) if clip_denoised else (lambda x_: x_)
    if self.model_mean_type == 'xprev':  # the model predicts x_{t-1}
      pred_xstart = maybe_clip(self._predict_xstart_from_xprev(x, t, model_output))
      model_mean = model_output
    elif self.model_mean_type == 'xstart':  # the model predicts x_0
      pred_xstart = maybe_clip(model_output)
      model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
    else:  # the model predicts epsilon
      pred_xstart = maybe_clip(self.predict_xstart_from_eps(x, t, model_output))
      model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)

    return dict(mean=model_mean, variance=model_variance, log_variance=model_log_variance,
                pred_xstart=pred_xstart)

  def predict_xstart_from_eps(self, x_t, t, eps):
    assert x_t.shape == eps.shape
    return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

  def predict_eps_from_xstart(self, x_t, t, pred_xstart):
    """The eps for which x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDIM's eps from x0)."""
    assert x_t.shape == pred_xstart.shape
    return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
            / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

  def _predict_xstart_from_xprev(self, x_t, t, xprev):
    assert x_t.shape == xprev.shape
    return (  # (xprev - coef2 * x_t) / coef1
        self._extract(1. / self.posterior_mean_coef1, t, x_t.shape) * xprev
        - self._extract(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape) * x_t)

  def p_sample(self, model_fn: ModelFn, x, t, noise, *, clip_denoised: bool = True):
    """One reverse step x_t -> x_{t-1}; no noise is added at t == 0. Returns (x_{t-1}, pred_x0)."""
    out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised)
    nonzero_mask = (t != 0).astype(jnp.float32).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    sample = out['mean'] + nonzero_mask * jnp.exp(0.5 * out['log_variance']) * noise
    return sample, out['pred_xstart']

  # === The variational bound ===

  def vb_terms_bpd(self, model_fn: ModelFn, x_start, x_t, t, *, clip_denoised: bool):
    """L_{t} in bits/dim: the decoder NLL at t == 0, else KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))."""
    true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance(model_fn, x_t, t, clip_denoised=clip_denoised)
    kl = normal_kl(true_mean, true_log_variance_clipped, out['mean'], out['log_variance'])
    kl = meanflat(kl) / np.log(2.)
    decoder_nll = -discretized_gaussian_log_likelihood(
        x_start, means=out['mean'], log_scales=0.5 * out['log_variance'])
    decoder_nll = meanflat(decoder_nll) / np.log(2.)
    return jnp.where(t == 0, decoder_nll, kl), out['pred_xstart']

  def training_losses(self, model_fn: ModelFn, x_start, t, noise):
    """The per-example loss [B]: L_simple-style MSE, or the true bound term in bits/dim."""
    x_t = self.q_sample(x_start, t, noise)
    if self.loss_type == 'kl':
      losses, _ = self.vb_terms_bpd(model_fn, x_start, x_t, t, clip_denoised=False)
      return losses
    target = {
        'xprev': lambda: self.q_posterior_mean_variance(x_start, x_t, t)[0],
        'xstart': lambda: x_start,
        'eps': lambda: noise,
    }[self.model_mean_type]()
    model_output, _ = self._split_model_output(model_fn(x_t, t), x_t)
    return meanflat(jnp.square(target - model_output))

  def prior_bpd(self, x_start):
    """KL(q(x_T | x_0) || N(0, I)) in bits/dim, [B]."""
    t = jnp.full((x_start.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
    qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
    kl_prior = normal_kl(qt_mean, qt_log_variance, 0., 0.)
    return meanflat(kl_prior) / np.log(2.)

  def calc_bpd_loop(self, model_fn: ModelFn, x_start, rng: jax.Array, *,
                    clip_denoised: bool = True) -> dict:
    """The full variational bound in bits/dim: one term per timestep plus the prior.

    One `lax.scan` over t = T-1, ..., 0 (a single traced copy of the model). Returns
    total_bpd [B], terms_bpd [B, T] (indexed by t), prior_bpd [B] and mse [B, T] (of the
    x_0 prediction, for rate-distortion).
    """
    batch = x_start.shape[0]

    def body(_, t_scalar):
      t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
      noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x_start.shape, x_start.dtype)
      x_t = self.q_sample(x_start, t, noise)
      terms, pred_xstart = self.vb_terms_bpd(model_fn, x_start, x_t, t, clip_denoised=clip_denoised)
      return None, (terms, meanflat(jnp.square(pred_xstart - x_start)))

    timesteps = jnp.arange(self.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    _, (terms_tb, mse_tb) = jax.lax.scan(body, None, timesteps)
    terms_bpd = terms_tb[::-1].T  # [B, T], column t holds L_t
    mse = mse_tb[::-1].T
    prior_bpd = self.prior_bpd(x_start)
    return dict(total_bpd=jnp.sum(terms_bpd, axis=1) + prior_bpd, terms_bpd=terms_bpd,
                prior_bpd=prior_bpd, mse=mse)


def respace(diffusion: GaussianDiffusion, kept_timesteps) -> GaussianDiffusion:
  """The chain on a subsequence S of the timesteps (Nichol & Dhariwal 2021, section 4).

  Step i of the new chain goes from the original step S_i to S_{i-1}, with
  beta_i = 1 - abar_{S_i} / abar_{S_{i-1}} (abar before S_0 is 1), so its abar_i is the original
  abar_{S_i} and every table (posterior, fixedlarge/fixedsmall, learned_range's bounds) follows
  from these betas. The model of step i must be called with the original timestep S_i.
  `model_var_type='learned'` (the authors' log-variance of one original step) has no meaning on
  a respaced chain and is refused; so is 'xprev' (the model predicts one original step's
  x_{t-1}); DDIM (`sampling.sample_loop`) needs only the original chain's x0 prediction and
  samples both.
  """
  kept = np.asarray(kept_timesteps)
  if kept.ndim != 1 or kept.size < 1 or np.any(np.diff(kept) <= 0) or kept[0] < 0 or (
      kept[-1] >= diffusion.num_timesteps):
    raise UserError(f'The kept timesteps must increase strictly within [0, '
                    f'{diffusion.num_timesteps}), got {kept.tolist()}.')
  if diffusion.model_var_type == 'learned':
    raise UserError("model_var_type='learned' predicts the log-variance of one original step, "
                    "which a respaced chain cannot use; sample it with all steps "
                    "(sampling.num_steps=0) or with sampling.sampler='ddim'.")
  if diffusion.model_mean_type == 'xprev':
    raise UserError("model_mean_type='xprev' predicts x_{t-1} of one original step, which "
                    "a respaced chain cannot use; sample it with all steps "
                    "(sampling.num_steps=0) or with sampling.sampler='ddim'.")
  alphas_cumprod = diffusion.alphas_cumprod[kept]
  betas = 1. - alphas_cumprod / np.append(1., alphas_cumprod[:-1])
  return GaussianDiffusion(betas, model_mean_type=diffusion.model_mean_type,
                           model_var_type=diffusion.model_var_type,
                           loss_type=diffusion.loss_type)


def betas_from_config(config) -> np.ndarray:
  """float64[T]: the beta schedule of a config's `diffusion` section."""
  d = config.diffusion
  return get_beta_schedule(d.beta_schedule, beta_start=d.beta_start, beta_end=d.beta_end,
                           num_timesteps=d.num_timesteps)


def from_config(config) -> GaussianDiffusion:
  """The GaussianDiffusion of a config's `diffusion` section."""
  d = config.diffusion
  return GaussianDiffusion(betas_from_config(config), model_mean_type=d.model_mean_type,
                           model_var_type=d.model_var_type, loss_type=d.loss_type)
