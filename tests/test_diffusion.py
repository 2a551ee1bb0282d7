"""The diffusion math against closed forms: schedules, q, the posterior, p, the bound."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from ddpm_jax import diffusion as diff
from ddpm_jax.errors import UserError

T = 1000


def linear_diffusion(num_timesteps=T, **kwargs):
  betas = diff.get_beta_schedule('linear', beta_start=1e-4, beta_end=0.02,
                                 num_timesteps=num_timesteps)
  return diff.GaussianDiffusion(betas, **kwargs)


# === Schedules ===

@pytest.mark.parametrize('name', diff.BETA_SCHEDULES)
def test_schedule_endpoints(name):
  betas = diff.get_beta_schedule(name, beta_start=1e-4, beta_end=0.02, num_timesteps=T)
  assert betas.dtype == np.float64 and betas.shape == (T,)
  assert np.all(betas > 0) and np.all(betas <= 1)
  first, last = {
      'linear': (1e-4, 0.02), 'quad': (1e-4, 0.02), 'const': (0.02, 0.02),
      'jsd': (1 / T, 1.0), 'warmup10': (1e-4, 0.02), 'warmup50': (1e-4, 0.02),
      'cosine': (None, 0.999),
  }[name]
  if first is not None:
    np.testing.assert_allclose(betas[0], first, rtol=1e-12)
  np.testing.assert_allclose(betas[-1], last, rtol=1e-12)


def test_schedule_shapes_in_between():
  lin = diff.get_beta_schedule('linear', beta_start=1e-4, beta_end=0.02, num_timesteps=T)
  np.testing.assert_allclose(np.diff(lin), (0.02 - 1e-4) / (T - 1), rtol=1e-9)
  quad = diff.get_beta_schedule('quad', beta_start=1e-4, beta_end=0.02, num_timesteps=T)
  np.testing.assert_allclose(np.sqrt(quad)[T // 2], (0.01 + np.sqrt(0.02)) / 2, rtol=1e-3)
  warm = diff.get_beta_schedule('warmup10', beta_start=1e-4, beta_end=0.02, num_timesteps=T)
  np.testing.assert_allclose(warm[99], 0.02)
  assert np.all(warm[100:] == 0.02) and warm[50] < 0.02
  warm50 = diff.get_beta_schedule('warmup50', beta_start=1e-4, beta_end=0.02, num_timesteps=T)
  assert np.all(warm50[500:] == 0.02) and warm50[250] < 0.02
  cos = diff.get_beta_schedule('cosine', beta_start=0, beta_end=0, num_timesteps=T)
  alpha_bar = np.cumprod(1 - cos)
  s = 0.008
  expected = (np.cos((np.arange(1, T + 1) / T + s) / (1 + s) * np.pi / 2)
              / np.cos(s / (1 + s) * np.pi / 2))**2
  np.testing.assert_allclose(alpha_bar[:900], expected[:900], rtol=1e-9)


def test_bad_names_list_the_choices():
  with pytest.raises(UserError, match='linear, quad, const, jsd, warmup10, warmup50, cosine'):
    diff.get_beta_schedule('sigmoid', beta_start=1e-4, beta_end=0.02, num_timesteps=T)
  betas = np.full(10, 0.1)
  with pytest.raises(UserError, match='eps, xstart, xprev'):
    diff.GaussianDiffusion(betas, model_mean_type='v')
  with pytest.raises(UserError, match='fixedlarge, fixedsmall, learned'):
    diff.GaussianDiffusion(betas, model_var_type='large')
  with pytest.raises(UserError, match='mse, kl'):
    diff.GaussianDiffusion(betas, loss_type='l1')
  with pytest.raises(UserError, match="loss_type='kl'"):
    diff.GaussianDiffusion(betas, model_var_type='learned', loss_type='mse')


# === q and the posterior ===

def test_q_sample_moments():
  d = linear_diffusion()
  x0 = jnp.full((4, 1, 1, 1), 0.7)
  t = jnp.array([0, 10, 500, 999])
  noise = jax.random.normal(jax.random.PRNGKey(0), (200_000, 4, 1, 1, 1))
  x_t = jax.vmap(lambda n: d.q_sample(x0, t, n))(noise)
  abar = np.cumprod(1 - d.betas)[np.asarray(t)]
  np.testing.assert_allclose(x_t.mean(0).ravel(), np.sqrt(abar) * 0.7, atol=5e-3)
  np.testing.assert_allclose(x_t.var(0).ravel(), 1 - abar, rtol=2e-2, atol=1e-5)
  mean, var, log_var = d.q_mean_variance(x0, t)
  np.testing.assert_allclose(mean.ravel(), np.sqrt(abar) * 0.7, rtol=1e-6)
  np.testing.assert_allclose(var.ravel(), 1 - abar, rtol=1e-5)
  np.testing.assert_allclose(log_var.ravel(), np.log(1 - abar), rtol=1e-5)


def test_posterior_is_bayes_rule():
  """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), the product of two Gaussians."""
  d = linear_diffusion()
  t = np.array([1, 2, 50, 500, 998, 999])
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (len(t), 3, 3, 2)).astype(np.float32)
  xt = rng.normal(size=x0.shape).astype(np.float32)
  alphas = 1 - d.betas
  abar = np.cumprod(alphas)
  abar_prev = abar[t - 1][:, None, None, None]
  a_t, b_t = alphas[t][:, None, None, None], d.betas[t][:, None, None, None]
  precision = 1 / (1 - abar_prev) + a_t / b_t
  mean = (np.sqrt(abar_prev) * x0 / (1 - abar_prev) + np.sqrt(a_t) * xt / b_t) / precision
  mean_j, var_j, log_var_j = d.q_posterior_mean_variance(jnp.asarray(x0), jnp.asarray(xt),
                                                          jnp.asarray(t))
  np.testing.assert_allclose(mean_j, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(var_j.ravel(), 1 / precision.ravel(), rtol=1e-4)
  np.testing.assert_allclose(log_var_j.ravel(), np.log(1 / precision.ravel()), rtol=1e-4)


def test_posterior_at_t0_is_the_data_and_log_variance_is_clipped():
  d = linear_diffusion()
  x0 = jnp.full((1, 2, 2, 1), 0.3)
  mean, var, log_var = d.q_posterior_mean_variance(x0, jnp.full_like(x0, -0.9), jnp.array([0]))
  np.testing.assert_allclose(mean, x0, rtol=1e-6)
  assert float(var.ravel()[0]) == 0.0
  np.testing.assert_allclose(log_var.ravel()[0], np.log(d.posterior_variance[1]), rtol=1e-6)
  np.testing.assert_allclose(d.fixedlarge_log_variance[0], np.log(d.posterior_variance[1]))
  np.testing.assert_allclose(d.fixedlarge_log_variance[1:], np.log(d.betas[1:]))


# === Gaussian data: the Bayes-optimal model in closed form ===

MU, SIGMA = 0.1, 0.4


def optimal_eps_fn(d, mu=MU, sigma=SIGMA):
  """E[eps | x_t] for x_0 ~ N(mu, sigma^2): x_t = a x_0 + b eps is jointly Gaussian with eps."""
  def model_fn(x, t):
    a = d._extract(d.sqrt_alphas_cumprod, t, x.shape)
    b = d._extract(d.sqrt_one_minus_alphas_cumprod, t, x.shape)
    return b * (x - a * mu) / (a**2 * sigma**2 + b**2)
  return model_fn


@pytest.mark.parametrize('var_type', ['fixedlarge', 'fixedsmall'])
def test_sampling_gaussian_data_with_the_optimal_model(var_type):
  from ddpm_jax import sampling
  d = linear_diffusion(model_var_type=var_type)
  x0 = jax.jit(lambda rng: sampling.p_sample_loop(
      d, optimal_eps_fn(d), (32, 32, 32, 1), rng, clip_denoised=False))(jax.random.PRNGKey(1))
  assert abs(float(x0.mean()) - MU) < 0.01
  assert abs(float(x0.std()) - SIGMA) < 0.01


def _reference_bound(d, x0, noises, eps_fn):
  """The bound in float64 numpy, written from the paper's formulas (Eq. 5, 7, 13)."""
  x0 = np.asarray(x0, np.float64)
  betas = d.betas
  alphas = 1 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1., abar[:-1])
  post_var = betas * (1 - abar_prev) / (1 - abar)
  large_logvar = np.log(np.append(post_var[1], betas[1:]))
  flat = lambda x: x.reshape(x.shape[0], -1).mean(1)
  terms = np.zeros((x0.shape[0], d.num_timesteps))
  for t in range(d.num_timesteps):
    xt = np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * np.asarray(noises[t], np.float64)
    eps = np.asarray(eps_fn(jnp.asarray(xt, jnp.float32),
                            jnp.full((x0.shape[0],), t, jnp.int32)), np.float64)
    x0_pred = (xt - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
    coef1 = betas[t] * np.sqrt(abar_prev[t]) / (1 - abar[t])
    coef2 = (1 - abar_prev[t]) * np.sqrt(alphas[t]) / (1 - abar[t])
    model_mean = coef1 * x0_pred + coef2 * xt
    model_logvar = large_logvar[t]
    if t == 0:  # discretized Gaussian decoder with the exact normal CDF
      std = np.exp(0.5 * model_logvar)
      cdf = lambda v: 0.5 * (1 + special.erf(v / np.sqrt(2)))
      upper = np.where(x0 > 0.999, 1.0, cdf((x0 + 1 / 255 - model_mean) / std))
      lower = np.where(x0 < -0.999, 0.0, cdf((x0 - 1 / 255 - model_mean) / std))
      terms[:, t] = flat(-np.log(np.maximum(upper - lower, 1e-12))) / np.log(2)
    else:
      true_mean = coef1 * x0 + coef2 * xt
      true_logvar = np.log(post_var[t])
      kl = 0.5 * (-1 + model_logvar - true_logvar + np.exp(true_logvar - model_logvar)
                  + (true_mean - model_mean)**2 * np.exp(-model_logvar))
      terms[:, t] = flat(kl) / np.log(2)
  mean_t, logvar_t = np.sqrt(abar[-1]) * x0, np.log(1 - abar[-1])
  prior = flat(0.5 * (-1 - logvar_t + np.exp(logvar_t) + mean_t**2)) / np.log(2)
  return terms, prior


def test_calc_bpd_loop_against_an_independent_computation():
  d = linear_diffusion(num_timesteps=100)
  rng = jax.random.PRNGKey(3)
  pixels = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1))
  x0 = jnp.asarray(pixels / 127.5 - 1, jnp.float32)
  out = jax.jit(lambda x, r: d.calc_bpd_loop(optimal_eps_fn(d), x, r, clip_denoised=False))(x0, rng)
  assert out['terms_bpd'].shape == (3, 100) and out['mse'].shape == (3, 100)
  noises = [jax.random.normal(jax.random.fold_in(rng, t), x0.shape) for t in range(100)]
  terms, prior = _reference_bound(d, x0, noises, optimal_eps_fn(d))
  np.testing.assert_allclose(out['terms_bpd'][:, 1:], terms[:, 1:], rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(out['terms_bpd'][:, 0], terms[:, 0], rtol=2e-2)  # tanh CDF
  np.testing.assert_allclose(out['prior_bpd'], prior, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(out['total_bpd'], out['terms_bpd'].sum(1) + out['prior_bpd'],
                             rtol=1e-6)
  np.testing.assert_allclose(out['total_bpd'], terms.sum(1) + prior, rtol=5e-3)


def test_prior_bpd_is_tiny_for_the_paper_schedule():
  d = linear_diffusion()
  x0 = jnp.ones((2, 4, 4, 3))
  abar_T = np.prod(1 - d.betas)
  expected = 0.5 * (-1 - np.log(1 - abar_T) + (1 - abar_T) + abar_T) / np.log(2)
  np.testing.assert_allclose(d.prior_bpd(x0), [expected] * 2, rtol=1e-3)
  assert float(d.prior_bpd(x0)[0]) < 1e-4


def test_discretized_likelihood_sums_to_one_over_bins():
  bins = jnp.linspace(-1, 1, 256).reshape(256, 1)
  means, log_scales = jnp.full_like(bins, 0.13), jnp.full_like(bins, np.log(0.2))
  logp = diff.discretized_gaussian_log_likelihood(bins, means=means, log_scales=log_scales)
  np.testing.assert_allclose(float(jnp.exp(logp).sum()), 1.0, atol=1e-3)


# === p, the losses, every combination ===

def random_model_fn(channels, seed=0):
  def model_fn(x, t):
    w = jax.random.normal(jax.random.PRNGKey(seed), (x.shape[-1], channels)) * 0.3
    return jnp.tanh(x @ w + t[:, None, None, None] / 1000.)
  return model_fn


COMBOS = list(itertools.product(diff.MODEL_MEAN_TYPES, diff.MODEL_VAR_TYPES, diff.LOSS_TYPES))


@pytest.mark.parametrize('mean_type,var_type,loss_type', COMBOS)
def test_losses_and_p_for_every_combination(mean_type, var_type, loss_type):
  """Shapes, dtypes and finiteness; the values: test_the_kl_loss_against_numpy (every 'kl'
  combination) and test_mse_loss_is_l_simple."""
  kwargs = dict(model_mean_type=mean_type, model_var_type=var_type, loss_type=loss_type)
  if loss_type == 'mse' and var_type.startswith('learned'):
    with pytest.raises(UserError):
      linear_diffusion(**kwargs)
    return
  d = linear_diffusion(**kwargs)
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (5, 4, 4, 3), minval=-1, maxval=1)
  t = jnp.array([0, 1, 10, 500, 999])
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  model_fn = random_model_fn(6 if var_type.startswith('learned') else 3)
  losses = jax.jit(lambda x, n: d.training_losses(model_fn, x, t, n))(x0, noise)
  assert losses.shape == (5,) and bool(jnp.all(jnp.isfinite(losses)))
  out = d.p_mean_variance(model_fn, x0, t, clip_denoised=True)
  assert set(out) == {'mean', 'variance', 'log_variance', 'pred_xstart'}
  for v in out.values():
    assert v.shape == x0.shape and v.dtype == jnp.float32
  assert float(jnp.abs(out['pred_xstart']).max()) <= 1.0
  # Variance and log-variance agree except at t = 0 for fixedlarge (beta_0 vs the posterior's).
  np.testing.assert_allclose(out['variance'][1:], jnp.exp(out['log_variance'][1:]), rtol=1e-5)
  bpd, pred = d.vb_terms_bpd(model_fn, x0, x0, t, clip_denoised=False)
  assert bpd.shape == (5,) and pred.shape == x0.shape


def kl_model_fn(d, channels, seed=0):
  """A nonlinear model of x and t for `channels`-channel images, with outputs of a trained
  model's size, so that no term is all rounding: the mean part (eps in (-1, 1); x_0 or x_{t-1}
  within 0.01 of x), then for the learned variances a variance part (for 'learned' a
  log-variance within 0.5 of log beta_t, for 'learned_range' v in (-1, 1))."""
  features = random_model_fn(channels, seed)
  log_betas = jnp.asarray(np.log(d.betas), jnp.float32)

  def model_fn(x, t):
    mean_part = features(x, t) if d.model_mean_type == 'eps' else x + 0.01 * features(x, t)
    if not d.model_var_type.startswith('learned'):
      return mean_part
    v = jnp.tanh(x @ jax.random.normal(jax.random.PRNGKey(seed + 1), (channels, channels)) - 0.2)
    if d.model_var_type == 'learned':
      v = log_betas[t][:, None, None, None] + 0.5 * v
    return jnp.concatenate([mean_part, v], -1)
  return model_fn


def _reference_vb_terms(d, x0, x_t, t, model_fn):
  """vb_terms_bpd in float64 numpy from the paper and DESIGN.md: at t > 0 the KL between the
  posterior q(x_{t-1}|x_t,x_0) (Eq. 6-7) and p(x_{t-1}|x_t), at t = 0 the discretized Gaussian
  decoder's NLL (256 bins, DESIGN.md's tanh CDF, edge bins open beyond +-0.999; the exact CDF
  is _reference_bound's), in bits/dim."""
  x0, x_t, t = np.asarray(x0, np.float64), np.asarray(x_t, np.float64), np.asarray(t)
  betas = d.betas
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1., abar[:-1])
  post_var = betas * (1 - abar_prev) / (1 - abar)
  post_logvar = np.log(np.append(post_var[1], post_var[1:]))  # entry 0 clipped to entry 1
  at = lambda table: table[t][:, None, None, None]
  coef1 = at(betas * np.sqrt(abar_prev) / (1 - abar))
  coef2 = at((1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar))
  out = np.asarray(model_fn(jnp.asarray(x_t, jnp.float32), jnp.asarray(t)), np.float64)
  channels = x0.shape[-1]
  mean_part, var_part = out[..., :channels], out[..., channels:]
  logvar = {
      'fixedlarge': lambda: at(np.log(np.append(post_var[1], betas[1:]))) + 0 * x0,
      'fixedsmall': lambda: at(post_logvar) + 0 * x0,
      'learned': lambda: var_part,  # the authors': the log-variance itself
      'learned_range': lambda: ((var_part + 1) / 2 * at(np.log(betas))
                                + (1 - var_part) / 2 * at(post_logvar)),
  }[d.model_var_type]()
  if d.model_mean_type == 'xprev':
    model_mean = mean_part
  else:
    x0_pred = mean_part if d.model_mean_type == 'xstart' else (
        x_t - np.sqrt(1 - at(abar)) * mean_part) / np.sqrt(at(abar))
    model_mean = coef1 * x0_pred + coef2 * x_t
  true_mean, true_logvar = coef1 * x0 + coef2 * x_t, at(post_logvar)
  kl = 0.5 * (-1 + logvar - true_logvar + np.exp(true_logvar - logvar)
              + (true_mean - model_mean)**2 * np.exp(-logvar))
  cdf = lambda v: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))
  std = np.exp(0.5 * logvar)
  upper = np.where(x0 > 0.999, 1., cdf((x0 + 1 / 255 - model_mean) / std))
  lower = np.where(x0 < -0.999, 0., cdf((x0 - 1 / 255 - model_mean) / std))
  nll = -np.log(np.maximum(upper - lower, 1e-12))
  flat = lambda x: x.reshape(x.shape[0], -1).mean(1) / np.log(2)
  return np.where(t == 0, flat(nll), flat(kl))


@pytest.mark.parametrize('mean_type,var_type', itertools.product(diff.MODEL_MEAN_TYPES,
                                                                  diff.MODEL_VAR_TYPES))
def test_the_kl_loss_against_numpy(mean_type, var_type):
  """vb_terms_bpd and the 'kl' training loss, every mean and variance type, learned included."""
  d = linear_diffusion(model_mean_type=mean_type, model_var_type=var_type, loss_type='kl')
  t = np.array([0, 0, 1, 10, 500, 999])
  pixels = np.random.default_rng(0).integers(0, 256, (len(t), 4, 4, 3))
  pixels[0, 0, 0], pixels[1, 0, 0] = 0, 255  # both edge bins
  x0 = pixels / 127.5 - 1
  noise = np.random.default_rng(1).normal(size=x0.shape)
  abar = np.cumprod(1 - d.betas)[t][:, None, None, None]
  x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
  model_fn = kl_model_fn(d, 3)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  bpd, _ = d.vb_terms_bpd(model_fn, f32(x0), f32(x_t), jnp.asarray(t), clip_denoised=False)
  expected = _reference_vb_terms(d, x0, x_t, t, model_fn)
  # Measured: 6.5e-6 relative for the terms above 0.01 bits/dim; the float32 rounding of a KL
  # near 0 (at t = 999 with a fixed variance, about the posterior's) is 1.7e-7 bits/dim at most.
  np.testing.assert_allclose(bpd, expected, rtol=2e-5, atol=1e-6)
  losses = d.training_losses(model_fn, f32(x0), jnp.asarray(t), f32(noise))
  np.testing.assert_allclose(losses, expected, rtol=2e-5, atol=1e-6)


def test_mse_loss_is_l_simple():
  d = linear_diffusion()
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (3, 4, 4, 3), minval=-1, maxval=1)
  t = jnp.array([0, 7, 999])
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  model_fn = random_model_fn(3)
  x_t = d.q_sample(x0, t, noise)
  expected = jnp.mean((noise - model_fn(x_t, t))**2, axis=(1, 2, 3))
  np.testing.assert_allclose(d.training_losses(model_fn, x0, t, noise), expected, rtol=1e-6)


def test_the_three_mean_parameterizations_agree():
  """A model predicting the true eps, its x_0 and its x_{t-1} mean give the same p."""
  ds = {m: linear_diffusion(model_mean_type=m) for m in diff.MODEL_MEAN_TYPES}
  d = ds['eps']
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (3, 4, 4, 1), minval=-0.9, maxval=0.9)
  t = jnp.array([1, 100, 900])
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  x_t = d.q_sample(x0, t, noise)
  outputs = {'eps': noise, 'xstart': x0, 'xprev': d.q_posterior_mean_variance(x0, x_t, t)[0]}
  results = {m: ds[m].p_mean_variance(lambda x, tt, m=m: outputs[m], x_t, t, clip_denoised=False)
             for m in outputs}
  for m in ('xstart', 'xprev'):
    np.testing.assert_allclose(results[m]['mean'], results['eps']['mean'], atol=2e-4)
    np.testing.assert_allclose(results[m]['pred_xstart'], x0, atol=2e-2)
  np.testing.assert_allclose(results['eps']['pred_xstart'], x0, atol=2e-4)
  # The KL term vanishes for the true mean with the posterior variance.
  small = linear_diffusion(model_var_type='fixedsmall')
  kl, _ = small.vb_terms_bpd(lambda x, tt: noise, x0, x_t, t, clip_denoised=False)
  np.testing.assert_allclose(kl, 0.0, atol=1e-4)


def test_learned_variance_semantics():
  d = linear_diffusion(model_var_type='learned', loss_type='kl')
  x = jnp.zeros((2, 2, 2, 1))
  t = jnp.array([3, 600])
  log_var = jnp.full_like(x, -3.0)
  out = d.p_mean_variance(lambda x_, t_: jnp.concatenate([x_, log_var], -1), x, t,
                          clip_denoised=False)
  np.testing.assert_allclose(out['log_variance'], -3.0)  # the authors': the log-variance itself
  r = linear_diffusion(model_var_type='learned_range', loss_type='kl')
  for v, table in ((1.0, np.log(r.betas)), (-1.0, r.posterior_log_variance_clipped)):
    out = r.p_mean_variance(lambda x_, t_: jnp.concatenate([x_, jnp.full_like(x_, v)], -1), x, t,
                            clip_denoised=False)
    np.testing.assert_allclose(out['log_variance'][:, 0, 0, 0], table[np.asarray(t)], rtol=1e-5)


def test_wrong_channel_count_says_what_was_expected():
  d = linear_diffusion(model_var_type='learned', loss_type='kl')
  x = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(UserError, match=r'needs \(2, 4, 4, 6\)'):
    d.p_mean_variance(lambda x_, t_: x_, x, jnp.array([1, 2]), clip_denoised=True)
  d = linear_diffusion()
  with pytest.raises(UserError, match=r'needs \(2, 4, 4, 3\)'):
    d.training_losses(lambda x_, t_: jnp.zeros((2, 4, 4, 6)), x, jnp.array([1, 2]), x)
