"""Training: the device count does not matter, resuming is exact, EMA and warmup, divergence."""
import collections
import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from jax.sharding import Mesh

from configs import cifar10
from ddpm_jax import checkpointing, datasets, diffusion as diffusion_lib, input_pipeline, parallel
from ddpm_jax import train, train_step, unet, workdir_lock
from ddpm_jax.errors import UserError
from tests.conftest import checkpoint_steps, tiny_digits_config


def _config(num_train_steps: int = 12):
  config = tiny_digits_config(num_timesteps=20, num_train_steps=num_train_steps)
  config.model.dropout = 0.1  # dropout's randomness must not depend on the device count either
  config.training.log_every = 3
  config.training.checkpoint_every = 6
  config.optim.warmup_steps = 4
  return config


def _one_device_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _initial_state(config) -> train_step.TrainState:
  return jax.jit(functools.partial(train_step.create_train_state, config))(
      jax.random.PRNGKey(config.seed))


def _relative_difference(a, b) -> float:
  """||a - b|| / ||b|| over all leaves of two pytrees of the same structure."""
  squared = lambda tree: sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))
  return float(np.sqrt(squared(jax.tree.map(np.subtract, a, b)) / squared(b)))


def _logged_scalars(workdir) -> dict[str, np.ndarray]:
  """{name: its values at the log steps, in step order}, read from the TensorBoard events that
  training wrote to `workdir` (the mean since the previous log step, as logged)."""
  by_step = collections.defaultdict(dict)
  for path in sorted(epath.Path(workdir).glob('events.out.tfevents.*')):
    for record in tf.data.TFRecordDataset(str(path)):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        by_step[value.tag][event.step] = float(tf.make_ndarray(value.tensor))
  return {tag: np.array([values[s] for s in sorted(values)]) for tag, values in by_step.items()}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Params of: 12 steps on 8 devices, 12 on 1 device, 6 then resumed to 12 (8 devices); the
  metrics the first two logged."""
  config = _config()
  eight_dir, one_dir = tmp_path_factory.mktemp('eight'), tmp_path_factory.mktemp('one')
  eight = train.train_and_evaluate(config, str(eight_dir))
  one = train.train_and_evaluate(config, str(one_dir), mesh=_one_device_mesh())
  resumed_dir = tmp_path_factory.mktemp('resumed')
  halfway = train.train_and_evaluate(_config(num_train_steps=6), str(resumed_dir))
  resumed = train.train_and_evaluate(config, str(resumed_dir))
  return dict(initial=_host(_initial_state(config).params), eight=_host(eight.params),
              one=_host(one.params), halfway_step=int(halfway.step),
              eight_logged=_logged_scalars(eight_dir), one_logged=_logged_scalars(one_dir),
              resumed=_host(resumed.params), resumed_step=int(resumed.step),
              resumed_dir=resumed_dir)


@pytest.mark.slow
def test_one_and_eight_devices_make_the_same_update(runs):
  """The same global batch gives the same loss, gradient norm and update on 1 device as on 8.

  Adam's update hardly changes when every gradient is scaled by one constant, and clipping
  (grad_clip=1 here) evens out large norms, so the parameters alone miss gradients summed over
  the devices instead of averaged (8x on 8 devices; tried: the same 6.6e-6 difference as
  without it). The logged gradient norm is then 8x apart.
  """
  eight, one = runs['eight_logged'], runs['one_logged']
  for name in ('loss', 'grad_norm', 'learning_rate'):
    assert eight[name].shape == (4,), name  # log steps 3, 6, 9, 12
    # Measured: 1.4e-7 (loss) and 4.4e-7 (grad_norm) relative, float32 sums in another order.
    np.testing.assert_allclose(one[name], eight[name], rtol=1e-5, err_msg=name)
  change_on_eight = jax.tree.map(np.subtract, runs['eight'], runs['initial'])
  change_on_one = jax.tree.map(np.subtract, runs['one'], runs['initial'])
  assert _relative_difference(change_on_one, change_on_eight) < 2e-5  # measured 6.6e-6


@pytest.mark.slow
def test_stopping_and_resuming_equals_training_straight(runs):
  assert (runs['halfway_step'], runs['resumed_step']) == (6, 12)
  assert sorted(int(p.name) for p in (runs['resumed_dir'] / 'checkpoints').iterdir()) == [6, 12]
  change_straight = jax.tree.map(np.subtract, runs['eight'], runs['initial'])
  change_resumed = jax.tree.map(np.subtract, runs['resumed'], runs['initial'])
  assert _relative_difference(change_resumed, change_straight) < 1e-3


def test_warmup_starts_at_zero_and_ends_at_the_learning_rate():
  config = _config()
  schedule = train_step.learning_rate_schedule(config)
  lr, warmup = config.optim.learning_rate, config.optim.warmup_steps
  np.testing.assert_allclose([schedule(s) for s in (0, 1, warmup, 10 * warmup)],
                             [0, lr / warmup, lr, lr], rtol=1e-6)


@pytest.mark.slow
def test_ema_equals_the_weights_after_the_first_step():
  config = _config()
  config.training.ema_decay = 0.9
  mesh = _one_device_mesh()
  state = _initial_state(config)
  state = state.replace(ema_params=jax.tree.map(np.zeros_like, state.params))  # any start value
  initial_params = _host(state.params)
  batches = input_pipeline.create_train_iterator(config)
  step_fn = train_step.jit_train_step(config, mesh)

  state, metrics = step_fn(state, parallel.global_batch(mesh, next(batches)))
  assert float(metrics['learning_rate']) == 0.0  # the authors' lr at the pre-increment step 0
  params_1 = _host(state.params)
  jax.tree.map(np.testing.assert_array_equal, params_1, initial_params)  # lr 0: no change
  jax.tree.map(np.testing.assert_array_equal, _host(state.ema_params), params_1)

  state, metrics = step_fn(state, parallel.global_batch(mesh, next(batches)))
  lr = config.optim.learning_rate
  np.testing.assert_allclose(float(metrics['learning_rate']), lr / config.optim.warmup_steps)
  params_2 = _host(state.params)
  assert _relative_difference(params_2, params_1) > 0
  expected_ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, params_1, params_2)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
               _host(state.ema_params), expected_ema)


def _nan_at_step(bad_step: int):
  """The digits iterator, with the batch of step `bad_step` (0-indexed) replaced by NaNs."""
  def create_train_iterator(config, *, start_step: int = 0):
    batches = input_pipeline.create_train_iterator(config, start_step=start_step)
    for step, batch in enumerate(batches, start=start_step):
      yield {'image': np.full_like(batch['image'], np.nan)} if step == bad_step else batch
  return create_train_iterator


@pytest.mark.slow
def test_a_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
  config = _config(num_train_steps=12)
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  with pytest.raises(UserError, match=r'diverged: the loss is nan .* at step 5; the last good '
                                      r'checkpoint \(step 4\) is kept'):
    train.train_and_evaluate(config, str(tmp_path), create_train_iterator=_nan_at_step(4))
  assert checkpointing.create_manager(str(tmp_path), config.training).all_steps() == [2, 4]
  state = checkpointing.restore_state_dict(str(tmp_path))
  assert int(state['step']) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_a_state_that_is_not_finite_is_not_saved_and_the_last_good_checkpoint_is_named(tmp_path):
  config = _config()
  manager = checkpointing.create_manager(str(tmp_path), config.training)
  ones = {'w': np.ones(3, np.float32)}
  state = train_step.TrainState(step=np.int32(6), params=ones, opt_state={},
                           ema_params={'w': np.array([1, np.inf, 1], np.float32)},
                           rng=np.asarray(jax.random.PRNGKey(0)))
  with pytest.raises(UserError, match=re.escape(
      'Training diverged: ema_params/w holds NaN or infinite values at step 6; the last good '
      'checkpoint (step 4) is kept; lower optim.learning_rate')):
    train._save_if_finite(manager, 6, state, [], last_good_step=4)
  manager.close()
  assert not (tmp_path / 'checkpoints' / '6').exists()


def test_resuming_with_another_seed_warns_once(caplog):
  config = _config()
  state = train_step.TrainState(step=jnp.int32(3), params={}, ema_params={}, opt_state={},
                           rng=jax.random.split(jax.random.PRNGKey(0))[1])
  with caplog.at_level(logging.WARNING):
    train._warn_if_another_seed(config, state)  # seed 0: its own stream
    assert not caplog.text
    config.seed = 1
    train._warn_if_another_seed(config, state)
  assert caplog.text.count('The checkpoint at step 3 was trained with another seed than '
                           'config.seed=1; training continues') == 1


def test_every_zero_logs_and_saves_the_last_step_only(tmp_path, caplog):
  config = _config(num_train_steps=3)
  config.training.log_every = 0
  config.training.checkpoint_every = 0
  with caplog.at_level(logging.INFO):
    assert int(train.train_and_evaluate(config, str(tmp_path)).step) == 3
  assert checkpoint_steps(tmp_path) == [3]
  assert re.findall(r'\[(\d+)/3\] loss=', caplog.text) == ['3']
  assert not (tmp_path / workdir_lock.LOCK).exists()


def test_a_batch_not_divisible_by_the_devices_is_a_clear_error(tmp_path):
  config = _config()
  config.training.batch_size = 12
  with pytest.raises(UserError, match='batch_size=12 is not divisible by the 8 devices'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (epath.Path(tmp_path) / 'checkpoints').exists()


@pytest.mark.slow
def test_one_step_on_mock_cifar10_with_a_sample_grid(tmp_path, monkeypatch):
  config = cifar10.get_config()
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.diffusion.num_timesteps = 10
  config.training.batch_size = 8
  config.training.num_train_steps = 1
  config.training.sample_every = 1
  config.training.num_grid_samples = 4
  monkeypatch.setattr(datasets, '_unreachable_host', lambda urls: None)  # mock: no download
  with tfds.testing.mock_data(num_examples=16):
    # tfds reads a mocked dataset under a process-wide fake file system (test_utils.MockFs)
    # that also catches Orbax's background thread writing the new checkpoint directory's
    # metadata (seen: a FileNotFoundError for /tmp/tmpXXX/<tmp_path>/checkpoints). Load the
    # (cached) source first, while no other thread touches files.
    input_pipeline.num_examples(config, 'train')
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 1
  assert state.params['conv_in']['kernel'].shape == (3, 3, 3, 32)
  assert checkpointing.restore_state_dict(str(tmp_path))['step'] == 1
  events = b''.join(p.read_bytes() for p in epath.Path(tmp_path).glob('events.out.tfevents.*'))
  assert b'samples' in events and b'loss' in events


def _update_after_two_steps(config, mesh):
  """(parameter change after two steps, the second step's metrics) from the initial state."""
  state = _initial_state(config)
  initial = _host(state.params)
  step_fn = train_step.jit_train_step(config, mesh)
  batches = input_pipeline.create_train_iterator(config)
  for _ in range(2):
    state, metrics = step_fn(state, parallel.global_batch(mesh, next(batches)))
  return jax.tree.map(np.subtract, _host(state.params), initial), _host(metrics)


def test_remat_and_gradient_accumulation_make_the_same_update():
  config = _config()
  config.optim.warmup_steps = 0  # a real update at the first step
  # Adam in its linear regime (eps >> |g|): the update is -lr * g / eps, so comparing updates
  # compares the gradients (with the default eps Adam's first step is lr * sign(g)).
  config.optim.learning_rate, config.optim.eps = 10.0, 1e3
  mesh = Mesh(np.asarray(jax.devices()[:2]), (parallel.DATA_AXIS,))  # 8 examples per device
  reference, reference_metrics = _update_after_two_steps(config, mesh)
  for remat, steps in (('blocks', 2), ('none', 4)):  # remat on/off, k = 1, 2, 4
    config.model.remat, config.training.grad_accum_steps = remat, steps
    update, metrics = _update_after_two_steps(config, mesh)
    assert _relative_difference(update, reference) < 1e-5, (remat, steps)
    for name in ('loss', 'grad_norm'):
      np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=1e-5)


@pytest.mark.parametrize('field,value,message', [
    ('training.grad_accum_steps', 3, r'grad_accum_steps=3 must be a positive divisor of the 2 '
                                     r'examples per device'),
])
def test_bad_memory_settings_are_one_sentence(field, value, message):
  config = _config()
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(UserError, match=message):
    train_step.jit_train_step(config, parallel.make_mesh())


def test_bfloat16_loss_and_gradients_at_initialisation_match_float32():
  config = _config()
  config.model.dropout = 0.0
  params = _initial_state(config).params
  x_start = next(input_pipeline.create_train_iterator(config))['image']
  t = jnp.arange(x_start.shape[0]) * (config.diffusion.num_timesteps // x_start.shape[0])
  noise = jax.random.normal(jax.random.PRNGKey(1), x_start.shape)

  def loss_and_grads(dtype):
    config.model.dtype = dtype
    model, diffusion = unet.create_model(config), diffusion_lib.from_config(config)
    loss_fn = lambda p: jnp.mean(diffusion.training_losses(
        lambda x, t: model.apply({'params': p}, x, t), x_start, t, noise))
    return _host(jax.jit(jax.value_and_grad(loss_fn))(params))

  (loss32, grads32), (loss16, grads16) = loss_and_grads('float32'), loss_and_grads('bfloat16')
  np.testing.assert_allclose(loss16, loss32, rtol=1e-2)  # bfloat16 keeps 8 bits: 2^-8 = 0.4%
  assert _relative_difference(grads16, grads32) < 2e-2  # measured 0.4%
