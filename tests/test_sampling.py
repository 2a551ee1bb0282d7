"""The scan samplers and the --mode=sample job on a briefly trained digits model."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from ddpm_jax import diffusion as diff, inference as inference_lib, sample_job, sampling
from ddpm_jax.errors import UserError
from tests.conftest import tiny_digits_config


def test_the_sampler_is_one_compiled_loop():
  d = diff.GaussianDiffusion(np.linspace(1e-4, 0.02, 1000))
  calls = []

  def model_fn(x, t):
    calls.append(1)
    return jnp.tanh(x)

  jaxpr = jax.make_jaxpr(lambda rng: sampling.p_sample_loop(d, model_fn, (2, 4, 4, 1), rng))(
      jax.random.PRNGKey(0))
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
  assert len(scans) == 1 and scans[0].params['length'] == 1000
  assert len(calls) == 1  # the model is traced once, not 1000 times


def test_samples_do_not_depend_on_the_device_count(trained_digits):
  config, workdir = trained_digits
  one = inference_lib.Inference(config, workdir, mesh=jax.sharding.Mesh(jax.devices()[:1], ('data',)))
  eight = inference_lib.Inference(config, workdir)
  assert eight.mesh.size == 8
  rng = jax.random.PRNGKey(5)
  a, b = one.sample(rng, 11), eight.sample(rng, 11)  # 11: divisible by neither
  assert a.shape == (11, 8, 8, 1) and a.dtype == np.uint8
  assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_sample_job_writes_npz_and_png_and_resumes(trained_digits, tmp_path):
  config, workdir = trained_digits
  config = copy.deepcopy(config)
  config.sampling.progressive_every = 10
  config.sampling.interpolate_t = 3
  config.sampling.interpolate_lambdas = 5
  out = sample_job.sample_from_workdir(config, workdir)
  samples = inference_lib.read_samples(out['samples_npz'])
  assert samples.shape == (10, 8, 8, 1) and samples.dtype == np.uint8
  assert samples.std() > 0
  for key in ('grid_png', 'progressive_png', 'interpolation_png'):
    assert epath.Path(out[key]).exists()

  # Preempted after the first chunk: the rerun samples only the rest, with the same result.
  inference = inference_lib.Inference(config, workdir)
  calls = []
  original = inference.sample

  def preempted(rng, n):
    if calls:
      raise KeyboardInterrupt
    calls.append(n)
    return original(rng, n)

  inference.sample = preempted
  with pytest.raises(KeyboardInterrupt):
    inference_lib.generate(inference, str(tmp_path), name='s', num_samples=10, batch_size=4,
                      seed=config.seed)
  inference.sample = lambda rng, n: calls.append(n) or original(rng, n)
  path = inference_lib.generate(inference, str(tmp_path), name='s', num_samples=10, batch_size=4,
                           seed=config.seed)
  assert calls == [4, 4, 2]
  np.testing.assert_array_equal(inference_lib.read_samples(path), samples)


def test_progressive_and_interpolation_shapes(trained_digits):
  config, workdir = trained_digits
  inference = inference_lib.Inference(config, workdir)
  model_fn = inference.model_fn(inference.params)
  d = inference.diffusion
  x_0, preds = jax.jit(lambda rng: sampling.p_sample_loop_progressive(
      d, model_fn, (3, 8, 8, 1), rng, every=10))(jax.random.PRNGKey(0))
  assert preds.shape == (3, 40 // 10, 8, 8, 1)
  np.testing.assert_allclose(preds[:, 0], x_0, atol=1e-5)  # t = 0 adds no noise
  np.testing.assert_array_equal(
      x_0, jax.jit(lambda rng: sampling.p_sample_loop(d, model_fn, (3, 8, 8, 1), rng))(
          jax.random.PRNGKey(0)))

  real = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 1), minval=-1, maxval=1)
  x1, x2 = real[:2], real[2:]
  mixed = jax.jit(lambda rng: sampling.interpolate(d, model_fn, x1, x2, rng, t=1,
                                                   num_lambdas=5))(jax.random.PRNGKey(2))
  assert mixed.shape == (2, 5, 8, 8, 1)
  assert float(jnp.abs(mixed[:, 0] - x1).mean()) < 0.1
  assert float(jnp.abs(mixed[:, -1] - x2).mean()) < 0.1
  assert float(jnp.abs(mixed[:, 2] - x1).mean()) > 0.2


def test_bad_input_is_one_clear_sentence(trained_digits, tmp_path):
  config, workdir = trained_digits
  with pytest.raises(UserError, match='train first'):
    sample_job.sample_from_workdir(config, str(tmp_path))
  other = tiny_digits_config()
  other.model.ch = 64
  with pytest.raises(UserError, match='was trained with model.ch=32, but the config has '
                                     'model.ch=64'):
    sample_job.sample_from_workdir(other, workdir)
  config = copy.deepcopy(config)
  config.sampling.num_samples = 0
  with pytest.raises(UserError, match='num_samples must be at least 1'):
    sample_job.sample_from_workdir(config, workdir)
