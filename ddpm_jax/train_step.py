"""The train state and the pure train step (the paper's Algorithm 1), for any mesh.

`train_step` is jitted over a `Mesh`: the global batch is sharded on `data`, the state is
replicated, and every random number (t, noise, dropout) is drawn for the global batch from
`fold_in(state.rng, state.step)`, so a run depends on the seed and the global batch only, never on
the device count. Imports only jax, flax, optax and the model and diffusion modules, so the
benchmark runs where nothing else is installed; `train.py` has the loop around it.
"""
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from ddpm_jax import diffusion as diffusion_lib, parallel, unet
from ddpm_jax.errors import UserError

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: the number of updates applied
  params: PyTree
  ema_params: PyTree
  opt_state: optax.OptState
  rng: jax.Array  # uint32[2]; the randomness of step s is fold_in(rng, s)


def learning_rate_schedule(config) -> optax.Schedule:
  """lr * min(step / warmup_steps, 1), step counted before the update (step 0 has lr 0)."""
  lr, warmup_steps = config.optim.learning_rate, config.optim.warmup_steps
  if warmup_steps <= 0:
    return optax.constant_schedule(lr)
  return lambda step: lr * jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def make_optimizer(config) -> optax.GradientTransformation:
  """Clipping of the global gradient norm (grad_clip <= 0 disables it), then warmed-up Adam."""
  o = config.optim
  adam = optax.adam(learning_rate_schedule(config), b1=o.beta1, b2=o.beta2, eps=o.eps)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), adam) if o.grad_clip > 0 else adam


def create_train_state(config, rng: jax.Array) -> TrainState:
  """Fresh float32 parameters; the EMA starts equal to them."""
  init_rng, train_rng = jax.random.split(rng)
  d = config.data
  x = jnp.zeros((1, d.image_size, d.image_size, d.channels), jnp.float32)
  params = unet.create_model(config).init(init_rng, x, jnp.zeros((1,), jnp.int32),
                                          train=False)['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=params,
                    opt_state=make_optimizer(config).init(params), rng=train_rng)


def train_step(state: TrainState, batch: dict, *, model, diffusion, config, mesh: Mesh):
  """One update on the global batch: (state, {'image': [B, H, W, C]}) -> (state, metrics).

  t, the noise and a dropout key per example are drawn for the global batch, then each device
  sums the loss and gradient of its share in `training.grad_accum_steps` microbatches
  (`_summed_loss_and_grads`); the update is the full batch's whatever the microbatching.
  """
  x_start = batch['image']
  batch_size = x_start.shape[0]
  t_rng, noise_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
  examples = dict(x_start=x_start,
                  t=jax.random.randint(t_rng, (batch_size,), 0, diffusion.num_timesteps),
                  noise=jax.random.normal(noise_rng, x_start.shape, x_start.dtype),
                  dropout_key=jax.random.split(dropout_rng, batch_size))

  losses = functools.partial(example_losses, model=model, diffusion=diffusion)
  loss_sum, grads_sum = _summed_loss_and_grads(losses, state.params, examples,
                                               config.training.grad_accum_steps, mesh)
  loss, grads = loss_sum / batch_size, jax.tree.map(lambda g: g / batch_size, grads_sum)
  updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = jnp.where(state.step == 0, 0.0, config.training.ema_decay)  # EMA = weights after step 1
  ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
  metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                 learning_rate=learning_rate_schedule(config)(state.step))
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                       opt_state=opt_state), metrics


def example_losses(params, examples: dict, *, model, diffusion) -> jax.Array:
  """L_simple [m] of m examples (x_start, t, noise, dropout_key: each [m, ...]); an example's
  dropout masks come from its own key, whatever else is in the microbatch."""
  model_fn = lambda x, t: model.apply({'params': params}, x, t, train=True,
                                      dropout_keys=examples['dropout_key'])
  return diffusion.training_losses(model_fn, examples['x_start'], examples['t'],
                                   examples['noise'])


def _summed_loss_and_grads(example_losses, params, examples: dict, num_microbatches: int,
                           mesh: Mesh):
  """(sum of example_losses(params, examples), its gradient), accumulated microbatch by microbatch.

  Each device takes its shard of `examples` ([B / devices] rows), splits it into
  `num_microbatches` consecutive microbatches and adds up their losses and gradients in a
  `lax.scan`, so only one microbatch's activations are alive at a time; one all-reduce (psum)
  over `data` then sums the devices' totals. On one device there is nothing to sum (XLA's
  all-reduce over one device would still copy every gradient).
  """
  def local_sums(params, examples, to_local):
    """This device's (loss, gradient) sums; `to_local` marks a value as this device's own."""
    params_local = to_local(params)  # so the gradients stay this device's until the psum
    summed_loss = lambda params, microbatch: jnp.sum(example_losses(params, microbatch))
    loss_and_grads = lambda microbatch: jax.value_and_grad(summed_loss)(params_local, microbatch)
    if num_microbatches == 1:  # XLA:CPU runs a loop body several times slower: no scan
      return loss_and_grads(examples)
    microbatches = jax.tree.map(
        lambda x: x.reshape(num_microbatches, x.shape[0] // num_microbatches, *x.shape[1:]),
        examples)
    add_microbatch = lambda sums, microbatch: (
        jax.tree.map(jnp.add, sums, loss_and_grads(microbatch)), None)
    zeros = to_local(jax.tree.map(jnp.zeros_like, (jnp.zeros((), jnp.float32), params)))
    sums, _ = jax.lax.scan(add_microbatch, zeros, microbatches)
    return sums

  if mesh.size == 1:
    return local_sums(params, examples, lambda tree: tree)
  device_sums = lambda params, examples: jax.lax.psum(
      local_sums(params, examples,
                 lambda tree: jax.lax.pcast(tree, parallel.DATA_AXIS, to='varying')),
      parallel.DATA_AXIS)
  return jax.shard_map(device_sums, mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)),
                       out_specs=P())(params, examples)


def check_grad_accum_steps(config, mesh: Mesh) -> None:
  """UserError unless training.grad_accum_steps divides each device's share of the batch."""
  steps, batch_size = config.training.grad_accum_steps, config.training.batch_size
  per_device = batch_size // mesh.size
  if steps < 1 or per_device % steps:
    raise UserError(f'training.grad_accum_steps={steps} must be a positive divisor of the '
                    f'{per_device} examples per device (training.batch_size={batch_size} over '
                    f'{mesh.size} devices); pick one that divides {per_device}.')


def jit_train_step(config, mesh: Mesh):
  """`train_step` for `config`, jitted over `mesh`; it donates (consumes) the state it gets."""
  parallel.check_divisible(config.training.batch_size, mesh)
  check_grad_accum_steps(config, mesh)
  step = functools.partial(train_step, model=unet.create_model(config),
                           diffusion=diffusion_lib.from_config(config), config=config, mesh=mesh)
  replicated = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, parallel.data_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)
