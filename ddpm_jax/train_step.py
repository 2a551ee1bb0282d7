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
from jax.sharding import Mesh

from ddpm_jax import diffusion as diffusion_lib, parallel, unet

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


def train_step(state: TrainState, batch: dict, *, model, diffusion, config):
  """One update on the global batch: (state, {'image': [B, H, W, C]}) -> (state, metrics)."""
  x_start = batch['image']
  t_rng, noise_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
  t = jax.random.randint(t_rng, (x_start.shape[0],), 0, diffusion.num_timesteps)
  noise = jax.random.normal(noise_rng, x_start.shape, x_start.dtype)

  def loss_fn(params):
    model_fn = lambda x, t: model.apply({'params': params}, x, t, train=True,
                                        rngs={'dropout': dropout_rng})
    return jnp.mean(diffusion.training_losses(model_fn, x_start, t, noise))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = jnp.where(state.step == 0, 0.0, config.training.ema_decay)  # EMA = weights after step 1
  ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
  metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                 learning_rate=learning_rate_schedule(config)(state.step))
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                       opt_state=opt_state), metrics


def jit_train_step(config, mesh: Mesh):
  """`train_step` for `config`, jitted over `mesh`; it donates (consumes) the state it gets."""
  step = functools.partial(train_step, model=unet.create_model(config),
                           diffusion=diffusion_lib.from_config(config), config=config)
  replicated = parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, parallel.data_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)
