"""The U-Net: the authors' parameter counts, their init, the time embedding, the compute dtype."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import celebahq256, cifar10, digits, lsun_bedroom256, lsun_cat256, lsun_church256
from ddpm_jax import unet
from ddpm_jax.errors import UserError


def param_count(config):
  model = unet.create_model(config)
  size, channels = config.data.image_size, config.data.channels
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)), jnp.zeros((1,), jnp.int32)))
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype('float32')}
  return sum(leaf.size for leaf in jax.tree.leaves(variables))


def test_cifar10_has_the_authors_parameter_count():
  assert param_count(cifar10.get_config()) == 35_746_307


@pytest.mark.parametrize('module', [celebahq256, lsun_church256, lsun_bedroom256, lsun_cat256])
def test_256_models_have_the_authors_parameter_count(module):
  assert param_count(module.get_config()) == 113_673_219


def test_learned_variance_doubles_the_output_channels():
  config = cifar10.get_config()
  config.diffusion.model_var_type = 'learned'
  config.diffusion.loss_type = 'kl'
  # conv_out gains 128 * 3 * 3 * 3 weights and 3 biases.
  assert param_count(config) == 35_746_307 + 128 * 9 * 3 + 3


def tiny_config(dtype='float32', dropout=0.0):
  config = digits.get_config()
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.dropout = dropout
  config.model.dtype = dtype
  return config


def init_tiny(config, batch=3):
  model = unet.create_model(config)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, 8, 8, 1))
  t = jnp.array([0, 500, 999])[:batch]
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x, t)
  return model, variables, x, t


def test_fresh_model_outputs_zero():
  model, variables, x, t = init_tiny(tiny_config())
  out = jax.jit(model.apply)(variables, x, t)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert float(jnp.abs(out).max()) < 1e-4  # the authors' 1e-10 init scale on the last layers


def uniform_limit(kernel, scale):
  receptive = math.prod(kernel.shape[:-2])
  fan_avg = receptive * (kernel.shape[-2] + kernel.shape[-1]) / 2
  return math.sqrt(3 * scale / fan_avg)


def test_init_is_variance_scaling_fan_avg_with_zero_biases():
  _, variables, _, _ = init_tiny(tiny_config())
  params = variables['params']
  for kernel, scale in ((params['down_0_block_0']['conv1']['kernel'], 1.0),
                        (params['temb_dense0']['kernel'], 1.0),
                        (params['down_0_block_0']['conv2']['kernel'], 1e-10),
                        (params['mid_attn_1']['proj_out']['kernel'], 1e-10),
                        (params['conv_out']['kernel'], 1e-10)):
    limit = uniform_limit(kernel, scale)
    assert 0.9 * limit < float(jnp.abs(kernel).max()) <= limit
  assert float(jnp.abs(params['down_0_block_0']['conv1']['bias']).max()) == 0.0
  assert 'nin_shortcut' in params['down_1_block_0']  # 32 -> 64 channels


def test_timestep_embedding_matches_the_formula():
  t = jnp.array([0, 1, 999])
  emb = np.asarray(unet.get_timestep_embedding(t, 128))
  freqs = np.exp(-np.log(10000) * np.arange(64) / 63)
  expected = np.concatenate([np.sin(np.outer([0, 1, 999], freqs)),
                             np.cos(np.outer([0, 1, 999], freqs))], axis=1)
  np.testing.assert_allclose(emb, expected, atol=2e-4)


def test_the_output_depends_on_t_and_dropout_on_train():
  config = tiny_config(dropout=0.5)
  model, variables, x, t = init_tiny(config)
  # Make the output layers non-zero so differences show.
  params = jax.tree.map(lambda p: p + 0.05, variables['params'])
  out_a = model.apply({'params': params}, x, t)
  out_b = model.apply({'params': params}, x, t + 1)
  assert float(jnp.abs(out_a - out_b).max()) > 1e-4
  train_a = model.apply({'params': params}, x, t, train=True, rngs={'dropout': jax.random.PRNGKey(0)})
  train_b = model.apply({'params': params}, x, t, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
  assert float(jnp.abs(train_a - train_b).max()) > 1e-4
  np.testing.assert_array_equal(model.apply({'params': params}, x, t), out_a)


def test_dropout_of_an_example_depends_on_its_key_alone():
  """The train step's per-example keys: the same example with the same key gets the same output
  in any batch at any position (so the update does not depend on devices or microbatches)."""
  config = tiny_config(dropout=0.5)
  model, variables, x, t = init_tiny(config)
  params = jax.tree.map(lambda p: p + 0.05, variables['params'])
  keys = jax.random.split(jax.random.PRNGKey(7), 3)
  apply = jax.jit(lambda x, t, keys: model.apply({'params': params}, x, t, train=True,
                                                 dropout_keys=keys))
  batch = apply(x, t, keys)
  order = jnp.array([2, 0])
  np.testing.assert_allclose(apply(x[order], t[order], keys[order]), batch[order], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(apply(x[1:2], t[1:2], keys[1:2]), batch[1:2], rtol=1e-5, atol=1e-6)
  other_key = apply(x[1:2], t[1:2], keys[:1])  # another key: another mask
  assert float(jnp.abs(other_key - batch[1:2]).max()) > 1e-4
  # The mask keeps each activation with probability 1 - rate, scaled by the inverse.
  h = jnp.ones((4, 16, 16, 64))
  dropped = unet.dropout(h, 0.1, jax.random.split(jax.random.PRNGKey(0), 4), 'block')
  keep = 1 - 6554 / 65536  # the rate to 1/65536
  np.testing.assert_allclose(np.unique(np.asarray(dropped)), [0.0, 1 / keep], rtol=1e-6)
  assert abs(float(jnp.mean(dropped == 0)) - 0.1) < 0.005  # 65,536 draws: 4 sigma is 0.0047
  other_layer = unet.dropout(h, 0.1, jax.random.split(jax.random.PRNGKey(0), 4), 'other')
  assert float(jnp.mean((dropped == 0) == (other_layer == 0))) < 0.9  # layers differ


def test_bfloat16_compute_keeps_float32_params_and_close_outputs():
  model32, variables, x, t = init_tiny(tiny_config())
  model16 = unet.create_model(tiny_config('bfloat16'))
  params = jax.tree.map(lambda p: p + 0.02, variables['params'])
  out32 = model32.apply({'params': params}, x, t)
  out16 = model16.apply({'params': params}, x, t)
  assert out16.dtype == jnp.float32
  assert jax.tree.leaves(model16.init(jax.random.PRNGKey(0), x, t))[0].dtype == jnp.float32
  scale = float(jnp.abs(out32).max())
  assert float(jnp.abs(out32 - out16).max()) < 0.05 * scale


@pytest.mark.parametrize('shape,groups', [((2, 16, 16, 64), 32), ((3, 8, 8, 32), 8)])
def test_group_norm_matches_flax_with_gradients(shape, groups):
  x = 3 * jax.random.normal(jax.random.PRNGKey(0), shape) + 1.5
  ours, flax_gn = unet.GroupNorm(num_groups=groups), nn.GroupNorm(num_groups=groups, epsilon=1e-6)
  variables = flax_gn.init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(variables) == jax.tree.structure(ours.init(jax.random.PRNGKey(1), x))
  variables = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape),
                           variables)
  np.testing.assert_allclose(ours.apply(variables, x), flax_gn.apply(variables, x), atol=2e-5)
  cube = lambda module: jax.grad(lambda v, x: (module.apply(v, x) ** 3).sum(), (0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(cube(ours)), jax.tree.leaves(cube(flax_gn))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()))
  with pytest.raises(UserError, match='num_groups'):
    unet.GroupNorm(num_groups=groups).init(jax.random.PRNGKey(0), x[..., :groups + 1])


def test_bad_image_size_is_a_clear_error():
  model = unet.create_model(cifar10.get_config())
  with pytest.raises(UserError, match='divides by 8'):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 20, 20, 3)),
                                      jnp.zeros((1,), jnp.int32)))
