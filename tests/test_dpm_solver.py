"""DPM-Solver++ 2M and 3M: the issue's recursion in numpy, DDIM at order 1, Gaussian data, input."""
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import config_validation, diffusion as diff, sampling
from ddpm_jax.errors import UserError
from tests.conftest import ROOT, tiny_digits_config, tiny_train_command
from tests.test_fast_sampling import (MU, SHAPE, SIGMA, T, linear_diffusion, optimal_eps_fn, run,
                                      toy_model_fn)

ORDERS = {'dpmpp_2m': 2, 'dpmpp_3m': 3}


def numpy_dpm_solver(abar, x_T, kept, *, order, clip):
  """Issue 23's definition, float64 numpy, for x_0 ~ N(MU, SIGMA^2) and the Bayes-optimal eps."""
  t = np.asarray(kept)[::-1]  # sampling order: t_0 > t_1 > ... > t_{S-1}
  num_steps = len(t)
  alpha, sigma = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
  lam = np.log(alpha) - np.log(sigma)
  x, m = np.asarray(x_T, np.float64), []
  for i in range(num_steps):
    eps = sigma[i] * (x - alpha[i] * MU) / (alpha[i]**2 * SIGMA**2 + sigma[i]**2)
    x0 = (x - sigma[i] * eps) / alpha[i]
    m.append(np.clip(x0, -1, 1) if clip else x0)
    if i == num_steps - 1:
      return m[i]
    step_order = min(order, i + 1)
    if num_steps < 15 and i == num_steps - 2:
      step_order = min(step_order, 2)
    h = lam[i + 1] - lam[i]
    phi = np.expm1(-h)
    new_x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * phi * m[i]
    if step_order == 2:
      d1 = (m[i] - m[i - 1]) / ((lam[i] - lam[i - 1]) / h)
      new_x -= 0.5 * alpha[i + 1] * phi * d1
    elif step_order == 3:
      r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
      d1_0, d1_1 = (m[i] - m[i - 1]) / r0, (m[i - 1] - m[i - 2]) / r1
      d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      new_x += (alpha[i + 1] * (phi / h + 1) * d1
                - alpha[i + 1] * ((phi / h + 1) / h - 0.5) * d2)
    x = new_x


@pytest.mark.parametrize('spacing', sampling.SPACINGS)
@pytest.mark.parametrize('sampler', sorted(ORDERS))
def test_gaussian_data_match_the_issues_recursion_in_numpy(sampler, spacing):
  d = linear_diffusion()
  rng = jax.random.PRNGKey(5)
  x_T = np.asarray(jax.random.normal(jax.random.split(rng)[0], SHAPE))  # sample_loop's x_T
  for steps in (8, 10, 20, 25):
    clip = steps in (8, 20)
    ours = run(d, optimal_eps_fn(d), rng, sampler=sampler, num_steps=steps, spacing=spacing,
               clip_denoised=clip)
    ref = numpy_dpm_solver(d.alphas_cumprod, x_T, sampling.kept_timesteps(T, steps, spacing),
                           order=ORDERS[sampler], clip=clip)
    np.testing.assert_allclose(ours, ref, atol=2e-5, err_msg=f'{steps} steps')


@pytest.mark.parametrize('spacing', sampling.SPACINGS)
def test_order_1_is_ddim_with_eta_0_the_last_step_included(monkeypatch, spacing):
  monkeypatch.setitem(sampling.DPM_SOLVER_ORDERS, 'dpmpp_1m', 1)
  monkeypatch.setattr(sampling, 'SAMPLERS', sampling.SAMPLERS + ('dpmpp_1m',))
  d = linear_diffusion(num_timesteps=100)
  for steps, clip in ((1, True), (7, True), (12, False)):
    settings = dict(num_steps=steps, spacing=spacing, clip_denoised=clip)
    np.testing.assert_allclose(run(d, toy_model_fn, sampler='dpmpp_1m', **settings),
                               run(d, toy_model_fn, sampler='ddim', **settings), atol=1e-5)


def test_gaussian_data_error_falls_with_the_steps_and_2m_beats_ddim():
  """Sample mean and std against the data's; the same x_T for every row."""
  d = linear_diffusion()
  errors = {}
  for sampler in ('ddim', 'dpmpp_2m', 'dpmpp_3m'):
    for steps in (8, 10, 20, 25):
      x0 = run(d, optimal_eps_fn(d), jax.random.PRNGKey(11), shape=(64, 32, 32, 1),
               sampler=sampler, num_steps=steps, spacing='linspace', clip_denoised=False)
      errors[sampler, steps] = abs(x0.mean() - MU), abs(x0.std() - SIGMA)
  # The mean is right for all (standard error 0.0016 at 65,536 samples; the bias, from x_T ~
  # N(0, I) rather than q(x_T), is sqrt(abar_999) MU SIGMA = 0.0003 whatever the sampler).
  assert max(mean for mean, _ in errors.values()) < 0.006
  # The std is too small with few steps, less so with more, and less so with 2M than DDIM.
  # (DDIM 0.150, 0.124, 0.066, 0.054 off; 2M 0.136, 0.104, 0.032, 0.019; 3M a little less.)
  for sampler in ('ddim', 'dpmpp_2m', 'dpmpp_3m'):
    stds = [errors[sampler, steps][1] for steps in (8, 10, 20, 25)]
    assert all(a > b + 0.005 for a, b in zip(stds, stds[1:])), (sampler, stds)
  for steps in (8, 10, 20, 25):
    assert errors['dpmpp_2m', steps][1] < errors['ddim', steps][1] - 0.01, steps
    assert errors['dpmpp_3m', steps][1] < errors['ddim', steps][1] - 0.01, steps


def test_one_model_pass_per_step_in_one_loop():
  d = linear_diffusion(num_timesteps=100)
  traced, seen = [], []
  record = lambda t_: seen.append(int(t_[0]))

  def model_fn(x, t):
    traced.append(1)
    jax.debug.callback(record, t, ordered=True)
    return toy_model_fn(x, t)

  sample = lambda r: sampling.sample_loop(d, model_fn, SHAPE, r, sampler='dpmpp_3m',
                                          num_steps=10, spacing='linspace')
  jaxpr = jax.make_jaxpr(sample)(jax.random.PRNGKey(0))
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
  assert len(scans) == 1 and scans[0].params['length'] == 10 and len(traced) == 1
  jax.jit(sample)(jax.random.PRNGKey(0))
  jax.effects_barrier()
  assert seen == [99, 89, 79, 69, 59, 50, 40, 30, 20, 10]  # no pass after the last step


def test_progressive_slot_0_is_the_sample_itself():
  """The last step returns its x0 prediction m_{S-1} as it is."""
  d = linear_diffusion(num_timesteps=100)
  x0, recorded = jax.jit(lambda r: sampling.p_sample_loop_progressive(
      d, toy_model_fn, SHAPE, r, every=20, sampler='dpmpp_2m', num_steps=10))(
          jax.random.PRNGKey(2))
  np.testing.assert_array_equal(recorded[:, 0], x0)
  assert recorded.shape == (SHAPE[0], 5) + SHAPE[1:]


def test_the_jobs_sampler_is_sharded_and_samples_the_same():
  from ddpm_jax import parallel, unet
  config = tiny_digits_config(num_timesteps=20)
  config.sampling.update(sampler='dpmpp_3m', num_steps=6, spacing='trailing')
  model = unet.create_model(config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
  params = jax.tree.map(lambda p: p + 0.01, params['params'])  # a fresh model outputs ~0
  rng = jax.random.PRNGKey(4)
  mesh = parallel.make_mesh()
  ours = sampling.jit_sampler(config, mesh)(params, rng, 8)
  assert mesh.size == 8
  model_fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
  expected = run(diff.from_config(config), model_fn, rng, shape=(8, 8, 8, 1), sampler='dpmpp_3m',
                 num_steps=6, spacing='trailing')
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


def test_file_names_carry_the_solver():
  from ddpm_jax import default_config
  config = default_config.get_default_config()
  tag = lambda **s: config.sampling.update(**s) or sampling.settings_tag(config)
  assert tag(sampler='dpmpp_2m', num_steps=20) == '_dpmpp_2m20'  # samples_2000_dpmpp_2m20.npz
  assert tag(sampler='dpmpp_3m', num_steps=10, spacing='linspace') == '_dpmpp_3m10_linspace'
  assert tag(sampler='ddim', num_steps=50, spacing='trailing') == '_ddim50_trailing'


# === Bad settings ===

@pytest.mark.parametrize('overrides, expected', [
    ({'sampling.sampler': 'dpmpp_2m', 'sampling.eta': 0.5},
     "sampling.eta=0.5 is DDIM's; set sampling.sampler='ddim' to use it, or leave eta at 0 for "
     'the dpmpp_2m sampler.'),
    ({'sampling.sampler': 'dpmpp_3s'},
     "sampling.sampler='dpmpp_3s' is not allowed: use one of 'ancestral', 'ddim', 'dpmpp_2m', "
     "'dpmpp_3m'."),
    ({'sampling.spacing': 'karras'},
     "sampling.spacing='karras' is not allowed: use one of 'uniform', 'quadratic', 'linspace', "
     "'trailing'."),
    ({'sampling.sampler': 'dpmpp_2m', 'sampling.spacing': 'linspace'},
     "sampling.spacing='linspace' repeats a timestep when it keeps 40 of 40 steps; set fewer "
     'sampling.num_steps or another spacing.'),
], ids=['eta', 'sampler', 'spacing', 'linspace_of_all_steps'])
def test_bad_settings_are_one_sentence_in_validation_and_status_1_before_anything_runs(
    tmp_path, overrides, expected):
  config = tiny_digits_config()
  for field, value in overrides.items():
    config.sampling[field.split('.')[1]] = value
  with pytest.raises(UserError) as error:
    config_validation.validate(config)
  assert str(error.value) == expected
  command = tiny_train_command(tmp_path / 'w', {'diffusion.num_timesteps': 40, **overrides},
                               '--mode=sample')
  result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and result.stderr.splitlines()[-1] == expected, result.stderr
  assert not (tmp_path / 'w').exists()


def test_eta_is_refused_by_the_solver_itself():
  with pytest.raises(UserError, match=r"^sampling.eta=0.3 is DDIM's.*the dpmpp_3m sampler\.$"):
    sampling.sample_loop(linear_diffusion(), toy_model_fn, SHAPE, jax.random.PRNGKey(0),
                         sampler='dpmpp_3m', num_steps=10, eta=0.3)
