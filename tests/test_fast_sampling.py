"""Respaced chains and DDIM: kept steps, exact identities, closed-form Gaussian data, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion as diff, sampling
from ddpm_jax.errors import UserError

T = 1000
SHAPE = (16, 4, 4, 1)
MU, SIGMA = 0.1, 0.4  # the Gaussian data of the closed-form tests


def linear_diffusion(num_timesteps=T, **kwargs):
  betas = diff.get_beta_schedule('linear', beta_start=1e-4, beta_end=0.02,
                                 num_timesteps=num_timesteps)
  return diff.GaussianDiffusion(betas, **kwargs)


def toy_model_fn(x, t):
  """A nonlinear eps model that depends on t, so every table lookup matters."""
  return jnp.tanh(1.5 * x + 0.3) * (0.5 + t[:, None, None, None] / T)


def optimal_eps_fn(d):
  """E[eps | x_t, t] for x_0 ~ N(MU, SIGMA^2) under the ORIGINAL chain's t (the Bayes optimum)."""
  def model_fn(x, t):
    a = d._extract(d.sqrt_alphas_cumprod, t, x.shape)
    b = d._extract(d.sqrt_one_minus_alphas_cumprod, t, x.shape)
    return b * (x - a * MU) / (a**2 * SIGMA**2 + b**2)
  return model_fn


def run(d, model_fn, rng=jax.random.PRNGKey(0), shape=SHAPE, **settings):
  return np.asarray(jax.jit(lambda r: sampling.sample_loop(d, model_fn, shape, r, **settings))(rng))


# === Kept timesteps ===

def test_uniform_spacing_is_ddims_stride_and_spreads_the_rest_evenly():
  np.testing.assert_array_equal(sampling.kept_timesteps(T, 100, 'uniform'), np.arange(0, T, 10))
  np.testing.assert_array_equal(sampling.kept_timesteps(T, 50, 'uniform'), np.arange(0, T, 20))
  np.testing.assert_array_equal(sampling.kept_timesteps(T, 0, 'uniform'), np.arange(T))
  np.testing.assert_array_equal(sampling.kept_timesteps(T, T, 'uniform'), np.arange(T))
  # 300 does not divide 1000: floor(i * 1000 / 300), not DDIM's 334 steps of range(0, T, 3).
  kept = sampling.kept_timesteps(T, 300, 'uniform')
  assert len(kept) == 300 and kept[:4].tolist() == [0, 3, 6, 10] and kept[-1] == 996
  np.testing.assert_array_equal(sampling.kept_timesteps(10, 4, 'uniform'), [0, 2, 5, 7])
  np.testing.assert_array_equal(sampling.kept_timesteps(T, 1, 'uniform'), [0])


def test_quadratic_spacing_is_ddims_rule_made_distinct():
  # DDIM's int(linspace(0, sqrt(0.8 T), S) ** 2), which has no repeats for 10 of 1000.
  np.testing.assert_array_equal(sampling.kept_timesteps(T, 10, 'quadratic'),
                                [0, 9, 39, 88, 158, 246, 355, 483, 632, 800])
  # 50 of 1000: DDIM's rule gives 0, 0, 1, 2, 5, ...; each step is one past the last at least.
  kept = sampling.kept_timesteps(T, 50, 'quadratic')
  assert kept[:6].tolist() == [0, 1, 2, 3, 5, 8] and kept[-2:].tolist() == [767, 800]
  ddim = (np.linspace(0, np.sqrt(0.8 * T), 50) ** 2).astype(int)
  np.testing.assert_array_equal(kept[4:], ddim[4:])
  np.testing.assert_array_equal(sampling.kept_timesteps(T, T, 'quadratic'), np.arange(T))


def test_linspace_and_trailing_spacings_are_diffusers():
  # DPMSolverMultistepScheduler's timesteps for timestep_spacing 'linspace' and 'trailing'.
  np.testing.assert_array_equal(sampling.kept_timesteps(T, 10, 'linspace'),
                                [100, 200, 300, 400, 500, 599, 699, 799, 899, 999])
  np.testing.assert_array_equal(sampling.kept_timesteps(T, 10, 'trailing'), np.arange(99, T, 100))
  np.testing.assert_array_equal(sampling.kept_timesteps(T, 20, 'linspace'),
                                np.round(np.linspace(0, 999, 21))[1:])
  np.testing.assert_array_equal(sampling.kept_timesteps(T, 3, 'trailing'), [332, 666, 999])
  # Floating-point arange(1000, 0, -1000 / 61) holds a 62nd value near 0: the first 61 are kept.
  kept = sampling.kept_timesteps(T, 61, 'trailing')
  assert len(kept) == 61 and kept[0] == 15 and kept[-1] == 999
  np.testing.assert_array_equal(sampling.kept_timesteps(T, T, 'trailing'), np.arange(T))
  with pytest.raises(UserError, match=r"^sampling.spacing='linspace' repeats a timestep when it "
                                      r'keeps 1000 of 1000 steps; set fewer sampling.num_steps '
                                      r'or another spacing\.$'):
    sampling.kept_timesteps(T, 0, 'linspace')


@pytest.mark.parametrize('spacing', sampling.SPACINGS)
def test_every_count_keeps_that_many_distinct_steps(spacing):
  for num_timesteps in (7, 40, 1000):
    for steps in range(1, num_timesteps + (spacing != 'linspace')):
      kept = sampling.kept_timesteps(num_timesteps, steps, spacing)
      assert len(kept) == steps and kept[0] >= 0 and kept[-1] < num_timesteps
      assert np.all(np.diff(kept) > 0)
      # DDIM's two start at t = 0; diffusers' two end at the last step, T - 1.
      assert kept[0] == 0 if spacing in ('uniform', 'quadratic') else kept[-1] == num_timesteps - 1


# === Identities ===

@pytest.mark.parametrize('clip', [True, False])
def test_defaults_are_the_papers_chain_step_by_step(clip):
  d = linear_diffusion(num_timesteps=50)
  rng = jax.random.PRNGKey(3)
  x0 = run(d, toy_model_fn, rng, clip_denoised=clip)
  np.testing.assert_array_equal(x0, np.asarray(jax.jit(lambda r: sampling.p_sample_loop(
      d, toy_model_fn, SHAPE, r, clip_denoised=clip))(rng)))
  # Algorithm 2 written out: x_T from split(rng)[0], z_t from fold_in(split(rng)[1], t).
  rng_init, rng_chain = jax.random.split(rng)
  step = jax.jit(lambda x, t, z: d.p_sample(toy_model_fn, x, jnp.full((SHAPE[0],), t), z,
                                            clip_denoised=clip)[0])
  x = jax.random.normal(rng_init, SHAPE)
  for t in range(d.num_timesteps - 1, -1, -1):
    x = step(x, t, jax.random.normal(jax.random.fold_in(rng_chain, t), SHAPE))
  np.testing.assert_allclose(x0, x, atol=1e-6)


def test_ddim_eta_1_over_all_steps_is_the_fixedsmall_chain():
  d = linear_diffusion(model_var_type='fixedsmall')
  ancestral = run(d, toy_model_fn)
  ddim = run(d, toy_model_fn, sampler='ddim', eta=1.0)
  np.testing.assert_allclose(ddim, ancestral, atol=2e-5)  # float32 rounding over 1000 steps
  assert np.abs(ddim - run(d, toy_model_fn, sampler='ddim', eta=0.0)).max() > 0.1


def test_a_respaced_chain_that_keeps_every_step_is_the_original():
  d = linear_diffusion(num_timesteps=100)
  respaced = diff.respace(d, np.arange(100))
  for name in ('betas', 'alphas_cumprod', 'posterior_variance', 'posterior_mean_coef1',
               'posterior_mean_coef2', 'fixedlarge_log_variance'):
    np.testing.assert_allclose(getattr(respaced, name), getattr(d, name), rtol=1e-10)
  rng = jax.random.PRNGKey(1)
  np.testing.assert_allclose(run(respaced, toy_model_fn, rng), run(d, toy_model_fn, rng),
                             atol=1e-5)
  np.testing.assert_array_equal(run(d, toy_model_fn, rng, num_steps=100, spacing='quadratic'),
                                run(d, toy_model_fn, rng))


def test_respaced_tables_follow_the_kept_alpha_bars():
  d = linear_diffusion(model_var_type='learned_range', loss_type='kl')
  kept = sampling.kept_timesteps(T, 10, 'quadratic')
  r = diff.respace(d, kept)
  np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-12)
  abar_prev = np.append(1., d.alphas_cumprod[kept][:-1])
  np.testing.assert_allclose(r.betas, 1 - d.alphas_cumprod[kept] / abar_prev, rtol=1e-12)
  # learned_range interpolates between the respaced beta (v = 1) and beta-tilde (v = -1).
  x = jnp.zeros((2, 4, 4, 1))
  i = jnp.array([3, 7])
  for v, table in ((1., np.log(r.betas)), (-1., r.posterior_log_variance_clipped)):
    out = r.p_mean_variance(lambda x_, _: jnp.concatenate([x_, jnp.full_like(x_, v)], -1), x, i,
                            clip_denoised=True)
    np.testing.assert_allclose(out['log_variance'][:, 0, 0, 0], table[[3, 7]], rtol=1e-5)


def test_model_is_called_with_the_original_timesteps():
  d = linear_diffusion(num_timesteps=100)
  seen = []
  record = lambda t_: seen.append(int(t_[0]))
  model_fn = lambda x, t: jax.debug.callback(record, t, ordered=True) or 0 * x
  jax.jit(lambda r: sampling.sample_loop(d, model_fn, SHAPE, r, sampler='ddim', num_steps=10))(
      jax.random.PRNGKey(0))
  jax.effects_barrier()
  assert seen == list(range(90, -1, -10))


def test_the_fast_sampler_is_one_loop_over_the_kept_steps():
  d = linear_diffusion()
  jaxpr = jax.make_jaxpr(lambda r: sampling.sample_loop(d, toy_model_fn, SHAPE, r, sampler='ddim',
                                                        num_steps=50))(jax.random.PRNGKey(0))
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
  assert len(scans) == 1 and scans[0].params['length'] == 50


# === Gaussian data with the Bayes-optimal eps, against numpy ===

def numpy_chain(d, eps_fn, rng, *, sampler, kept, eta, clip):
  """The same recursion written from the papers in float64 numpy, with the same noise draws."""
  abar = d.alphas_cumprod[kept]
  abar_prev = np.append(1., abar[:-1])
  rng_init, rng_chain = jax.random.split(rng)
  x = np.asarray(jax.random.normal(rng_init, SHAPE), np.float64)
  for i in range(len(kept) - 1, -1, -1):
    t = kept[i]
    z = np.asarray(jax.random.normal(jax.random.fold_in(rng_chain, t), SHAPE), np.float64)
    eps = np.asarray(eps_fn(jnp.asarray(x, jnp.float32), jnp.full((SHAPE[0],), t)), np.float64)
    x0 = (x - np.sqrt(1 - abar[i]) * eps) / np.sqrt(abar[i])
    x0 = np.clip(x0, -1, 1) if clip else x0
    if sampler == 'ddim':  # Song et al. (2021), Eq. 12, eps recomputed from the clipped x0
      eps = (x - np.sqrt(abar[i]) * x0) / np.sqrt(1 - abar[i])
      sigma = eta * np.sqrt((1 - abar_prev[i]) / (1 - abar[i]) * (1 - abar[i] / abar_prev[i]))
      x = np.sqrt(abar_prev[i]) * x0 + np.sqrt(1 - abar_prev[i] - sigma**2) * eps + sigma * z
    else:  # Algorithm 2 on the respaced betas, fixedlarge: variance beta_i
      beta = 1 - abar[i] / abar_prev[i]
      mean = (np.sqrt(abar_prev[i]) * beta * x0 + np.sqrt(1 - beta) * (1 - abar_prev[i]) * x) / (
          1 - abar[i])
      x = mean + (np.sqrt(beta) * z if i > 0 else 0)
  return x


def numpy_moments(d, *, sampler, kept, eta):
  """Mean and variance of the few-step sampler's output for Gaussian data: each step is linear."""
  abar = d.alphas_cumprod[kept]
  abar_prev = np.append(1., abar[:-1])
  mean, var = 0., 1.
  for i in range(len(kept) - 1, -1, -1):
    a, b = np.sqrt(abar[i]), np.sqrt(1 - abar[i])
    # x0^ = (x - b eps^) / a with eps^ = b (x - a MU) / (a^2 SIGMA^2 + b^2): linear in x.
    k = b / (a**2 * SIGMA**2 + b**2)
    x0_slope, x0_shift = (1 - b * k) / a, b * k * MU
    if sampler == 'ddim':
      sigma = eta * np.sqrt((1 - abar_prev[i]) / (1 - abar[i]) * (1 - abar[i] / abar_prev[i]))
      c = np.sqrt(1 - abar_prev[i] - sigma**2)
      slope = np.sqrt(abar_prev[i]) * x0_slope + c * (1 - a * x0_slope) / b
      shift = (np.sqrt(abar_prev[i]) - c * a / b) * x0_shift
      noise_var = sigma**2
    else:
      beta = 1 - abar[i] / abar_prev[i]
      c1, c2 = np.sqrt(abar_prev[i]) * beta / (1 - abar[i]), np.sqrt(1 - beta) * (
          1 - abar_prev[i]) / (1 - abar[i])
      slope, shift = c1 * x0_slope + c2, c1 * x0_shift
      noise_var = beta if i > 0 else 0.
    mean, var = slope * mean + shift, slope**2 * var + noise_var
  return mean, var


CLOSED_FORM_CASES = [('ddim', 50, 0.), ('ddim', 100, 0.), ('ddim', 50, 1.), ('ddim', 100, 1.),
                     ('ancestral', 100, 0.)]


@pytest.mark.parametrize('sampler,steps,eta', CLOSED_FORM_CASES)
def test_gaussian_data_few_steps_match_numpy_sample_for_sample(sampler, steps, eta):
  d = linear_diffusion()
  kept = sampling.kept_timesteps(T, steps, 'uniform')
  rng = jax.random.PRNGKey(7)
  for clip in (False, True):
    ours = run(d, optimal_eps_fn(d), rng, sampler=sampler, num_steps=steps, eta=eta,
               clip_denoised=clip)
    ref = numpy_chain(d, optimal_eps_fn(d), rng, sampler=sampler, kept=kept, eta=eta, clip=clip)
    np.testing.assert_allclose(ours, ref, atol=2e-5)


@pytest.mark.parametrize('sampler,steps,eta', CLOSED_FORM_CASES)
def test_gaussian_data_few_step_distribution_has_its_exact_bias(sampler, steps, eta):
  """Over many samples the output's mean and std match the recursion's closed form."""
  d = linear_diffusion()
  kept = sampling.kept_timesteps(T, steps, 'uniform')
  x0 = run(d, optimal_eps_fn(d), jax.random.PRNGKey(11), shape=(64, 32, 32, 1), sampler=sampler,
           num_steps=steps, eta=eta, clip_denoised=False)
  mean, var = numpy_moments(d, sampler=sampler, kept=kept, eta=eta)
  # Standard errors at 65,536 samples: 0.0016 for the mean, 0.0011 for the std.
  assert abs(x0.mean() - mean) < 0.006 and abs(x0.std() - np.sqrt(var)) < 0.005
  assert abs(x0.std() - SIGMA) > 0.007  # the few-step bias is real (0.010 to 0.052 here)


FULL_CHAIN_CASES = [('ancestral', 0.), ('ddim', 0.), ('ddim', 1.)]


@pytest.mark.parametrize('sampler,eta', FULL_CHAIN_CASES)
def test_the_reference_moments_of_the_full_chain_land_near_the_data(sampler, eta):
  """A check of this file's numpy_moments alone (no ddpm_jax sampler runs): with all 1,000 steps
  its closed form lands near the data (0.0009 off for fixedlarge, 0.004 for eta = 1, the
  fixedsmall chain, whose posterior variance is a lower bound), so the few-step bias above is
  the few steps', not the reference's."""
  mean, var = numpy_moments(linear_diffusion(), sampler=sampler, kept=np.arange(T), eta=eta)
  assert abs(mean - MU) < 1e-3 and abs(np.sqrt(var) - SIGMA) < 5e-3


@pytest.mark.parametrize('sampler,eta', FULL_CHAIN_CASES)
def test_gaussian_data_full_chain_samples_the_data(sampler, eta):
  """The sampler over all 1,000 steps with the Bayes-optimal eps: over many samples the output's
  mean and std are the closed form's, so near the data's (MU, SIGMA)."""
  d = linear_diffusion()
  x0 = run(d, optimal_eps_fn(d), jax.random.PRNGKey(12), shape=(128, 32, 32, 1),
           sampler=sampler, eta=eta, clip_denoised=False)
  mean, var = numpy_moments(d, sampler=sampler, kept=np.arange(T), eta=eta)
  # Standard errors at 131,072 samples: 0.0011 for the mean, 0.0008 for the std (measured off
  # by 0.0014 and 0.0009 at most). The std is 0.0047 lower with fixedsmall's variance.
  assert abs(x0.mean() - mean) < 0.005 and abs(x0.std() - np.sqrt(var)) < 0.0035
  assert abs(x0.mean() - MU) < 0.006 and abs(x0.std() - SIGMA) < 0.0075


def test_file_names_carry_the_sampler_settings():
  from ddpm_jax import default_config
  config = default_config.get_default_config()
  tag = lambda **s: config.sampling.update(**s) or sampling.settings_tag(config)
  assert tag() == '' and tag(num_steps=1000) == ''  # the paper's chain keeps today's names
  assert tag(num_steps=100) == '_ancestral100'
  assert tag(num_steps=250, spacing='quadratic') == '_ancestral250_quadratic'
  assert tag(sampler='ddim', num_steps=50, spacing='uniform') == '_ddim50'
  assert tag(num_steps=0) == '_ddim1000'
  assert tag(num_steps=50, spacing='quadratic', eta=0.5) == '_ddim50_quadratic_eta0.5'


# === Bad settings ===

@pytest.mark.parametrize('settings,message', [
    (dict(num_steps=-1), r'sampling.num_steps must be in \[0, 1000\].*got -1\.'),
    (dict(num_steps=1001), r'sampling.num_steps must be in \[0, 1000\].*got 1001\.'),
    (dict(sampler='plms'),
     r"Unknown sampling.sampler 'plms'; choose one of ancestral, ddim, dpmpp_2m, dpmpp_3m\."),
    (dict(spacing='log'),
     r"Unknown sampling.spacing 'log'; choose one of uniform, quadratic, linspace, trailing\."),
    (dict(sampler='ddim', eta=-0.5), r'sampling.eta must be in \[0, 1\] .*got -0.5\.'),
    (dict(eta=0.5), r"sampling.eta=0.5 is DDIM's; set sampling.sampler='ddim'"),
])
def test_bad_settings_are_one_sentence(settings, message):
  with pytest.raises(UserError, match=message) as error:
    sampling.sample_loop(linear_diffusion(), toy_model_fn, SHAPE, jax.random.PRNGKey(0),
                         **settings)
  assert str(error.value).count('. ') == 0 and '\n' not in str(error.value)


@pytest.mark.parametrize('kwargs,refused', [
    (dict(model_var_type='learned', loss_type='kl'), "model_var_type='learned'"),
    (dict(model_mean_type='xprev'), "model_mean_type='xprev'"),
])
def test_respacing_refuses_what_it_cannot_define_and_ddim_samples_it(kwargs, refused):
  d = linear_diffusion(num_timesteps=20, **kwargs)
  model_fn = lambda x, t: jnp.concatenate([0 * x, 0 * x], -1) if d.model_var_type == 'learned' \
      else 0 * x
  with pytest.raises(UserError, match=refused):
    run(d, model_fn, num_steps=5)
  x0 = run(d, model_fn, sampler='ddim', num_steps=5)
  assert np.all(np.isfinite(x0))
  np.testing.assert_allclose(run(d, model_fn), run(d, model_fn, num_steps=20))


def test_jit_sampler_of_the_training_grid_and_jobs_takes_the_settings():
  from ddpm_jax import parallel, unet
  from tests.conftest import tiny_digits_config
  config = tiny_digits_config(num_timesteps=20)
  config.sampling.update(sampler='ddim', num_steps=4, eta=0.5, spacing='quadratic')
  model = unet.create_model(config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
  params = jax.tree.map(lambda p: p + 0.01, params['params'])  # a fresh model outputs ~0
  rng = jax.random.PRNGKey(4)
  ours = sampling.jit_sampler(config, parallel.make_mesh())(params, rng, 8)
  model_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
  expected = run(diff.from_config(config), model_fn, rng, shape=(8, 8, 8, 1), sampler='ddim',
                 num_steps=4, eta=0.5, spacing='quadratic')
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)
