"""Per-device memory of the train step and the sampler, read from compiled programs (nothing runs).

Data parallelism runs one program on every device: the replicated train state and B / N of the
global batch B. So the peak memory of one device among N is the peak of the program compiled
for a one-device mesh at batch B / N; the gradient all-reduce of the N-device program works in
place on the gradient buffers (`python -m ddpm_jax.benchmark --memory` compiles that way, fast,
on any machine: a CPU-only laptop can size a TPU pod's job). The peak is XLA's buffer
assignment: arguments + outputs - donated (aliased) + temporaries.

On CPU the programs are compiled with XLA's memory-optimized scheduler, as TPU and GPU
schedulers also minimise memory (the default CPU scheduler favours concurrency and keeps extra
buffers alive). XLA:CPU runs bfloat16 convolutions and matmuls in float32 (its
float-normalization-bf16 pass converts their operands and results), so on CPU a bfloat16 model
still needs float32 copies of the activations a convolution reads; a TPU's matrix units and
cuDNN take bfloat16 operands directly, so their bfloat16 peaks are lower than the CPU estimate.
XLA:CPU also schedules the recomputation of rematerialised blocks early, next to the forward
pass, so its peak does not drop with model.remat='blocks' although TPU and GPU peaks do.
`saved_for_backward_bytes` (the residuals of jax.vjp, before any XLA scheduling) shows what
remat and bfloat16 save on any backend.
"""
import functools
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ddpm_jax import diffusion as diffusion_lib, parallel, sampling, train_step, unet
from ddpm_jax.errors import UserError

GiB = 2**30
# Memory per JAX device, as sold: a TPU v2 or v3 core (two per chip; a v3-8 has 8 cores of
# 16 GiB), a TPU v4, v5e, v5p or v6e chip, a GPU (NVIDIA's "GB" here are GiB-sized).
ACCELERATOR_MEMORY = {
    'TPU v2 core': 8 * GiB,
    'TPU v3 core': 16 * GiB,
    'TPU v4': 32 * GiB,
    'TPU v5e': 16 * GiB,
    'TPU v5p': 95 * GiB,
    'TPU v6e': 32 * GiB,
    'A100 40GB': 40 * GiB,
    'A100 80GB': 80 * GiB,
    'H100 80GB': 80 * GiB,
    'H200 141GB': 141 * GiB,
}
# A program fits a device when its estimated peak is at most this share of the device's memory:
# the runtime keeps some for itself, and TPU/GPU layouts and fusions differ from the CPU's.
FIT_FRACTION = 0.9
DTYPES = ('float32', 'bfloat16')
REMATS = ('none', 'blocks')
_CPU_MEMORY_SCHEDULER = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}


def peak_bytes(compiled) -> int:
  """Peak memory of a compiled program: arguments + outputs - aliased + temporaries."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def fits(num_bytes: int) -> list[str]:
  """The accelerators of ACCELERATOR_MEMORY whose memory per device holds `num_bytes`."""
  return [name for name, memory in ACCELERATOR_MEMORY.items()
          if num_bytes <= FIT_FRACTION * memory]


def _compile(jitted, *args):
  options = _CPU_MEMORY_SCHEDULER if jax.default_backend() == 'cpu' else {}
  return jitted.lower(*args).compile(compiler_options=options)


def _one_device_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))


def _per_device_batch(global_batch: int, devices: int, what: str) -> int:
  if devices < 1 or global_batch % devices:
    raise UserError(f'{what}={global_batch} does not split over --devices={devices}; give a '
                    f'device count that divides it.')
  return global_batch // devices


def _abstract(tree, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def train_step_bytes(config, per_device_batch: int) -> int:
  """Peak bytes of `train_step.jit_train_step(config)` on one device at `per_device_batch`."""
  config = config.copy_and_resolve_references()
  config.training.batch_size = per_device_batch
  mesh = _one_device_mesh()
  state = _abstract(jax.eval_shape(functools.partial(train_step.create_train_state, config),
                                   jax.random.PRNGKey(config.seed)), parallel.replicated(mesh))
  d = config.data
  batch = {'image': jax.ShapeDtypeStruct(
      (per_device_batch, d.image_size, d.image_size, d.channels), jnp.float32,
      sharding=parallel.data_sharding(mesh))}
  return peak_bytes(_compile(train_step.jit_train_step(config, mesh), state, batch))


def saved_for_backward_bytes(config, per_device_batch: int) -> int:
  """Bytes the backward pass of one microbatch keeps from its forward pass, on any backend.

  The residuals of `jax.vjp` of the train step's loss (the weights the backward pass reads
  included): what model.remat and model.dtype change, before any XLA scheduling.
  """
  model, diffusion = unet.create_model(config), diffusion_lib.from_config(config)
  params = jax.eval_shape(functools.partial(train_step.create_train_state, config),
                          jax.random.PRNGKey(config.seed)).params
  m, d = per_device_batch // config.training.grad_accum_steps, config.data
  examples = dict(x_start=jax.ShapeDtypeStruct((m, d.image_size, d.image_size, d.channels),
                                               jnp.float32),
                  t=jax.ShapeDtypeStruct((m,), jnp.int32),
                  noise=jax.ShapeDtypeStruct((m, d.image_size, d.image_size, d.channels),
                                             jnp.float32),
                  dropout_key=jax.ShapeDtypeStruct((m, 2), jnp.uint32))
  loss = lambda params, examples: jnp.sum(train_step.example_losses(
      params, examples, model=model, diffusion=diffusion))
  backward = jax.eval_shape(lambda p, e: jax.vjp(lambda p: loss(p, e), p)[1], params, examples)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(backward))


def sampler_bytes(config, per_device_batch: int) -> int:
  """Peak bytes of `sampling.jit_sampler(config)` (the reverse-step loop) on one device."""
  mesh = _one_device_mesh()
  params = jax.eval_shape(functools.partial(train_step.create_train_state, config),
                          jax.random.PRNGKey(config.seed)).ema_params
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  return peak_bytes(_compile(sampling.jit_sampler(config, mesh),
                             _abstract(params, parallel.replicated(mesh)), rng, per_device_batch))


def _variant(config, **overrides):
  """A copy of config with (dtype, remat, grad_accum_steps) replaced."""
  config = config.copy_and_resolve_references()
  for name, value in overrides.items():
    section = config.training if name == 'grad_accum_steps' else config.model
    section[name] = value
  return config


def report(config, *, devices: int = 8, grad_accum_steps: Iterable[int] = (1, 2, 4),
           log: Optional[Callable[[str], None]] = None) -> dict:
  """Per-device peak memory of every variant, for config's global batches over `devices`.

  Train step: dtype x remat x each of `grad_accum_steps` that divides the per-device batch;
  sampler: each dtype. Returns a JSON-ready dict; `log(line)` gets a line per compiled variant.
  """
  train_batch = _per_device_batch(config.training.batch_size, devices, 'training.batch_size')
  sample_batch = _per_device_batch(config.sampling.batch_size, devices, 'sampling.batch_size')
  own = (config.model.dtype, config.model.remat, config.training.grad_accum_steps)
  train_rows = []
  for dtype in DTYPES:
    for remat in REMATS:
      for k in sorted({*grad_accum_steps, own[2]}):
        if train_batch % k:
          continue
        variant = _variant(config, dtype=dtype, remat=remat, grad_accum_steps=k)
        num_bytes = train_step_bytes(variant, train_batch)
        train_rows.append(dict(dtype=dtype, remat=remat, grad_accum_steps=k, bytes=num_bytes,
                               saved_for_backward_bytes=saved_for_backward_bytes(variant,
                                                                                 train_batch),
                               fits=fits(num_bytes), config=(dtype, remat, k) == own))
        _log(log, f'train step  {dtype:8} remat={remat:6} accum={k} (saved for the backward '
             f'pass {train_rows[-1]["saved_for_backward_bytes"] / GiB:.2f} GiB)', num_bytes)
  sampler_rows = []
  for dtype in DTYPES:
    num_bytes = sampler_bytes(_variant(config, dtype=dtype), sample_batch)
    sampler_rows.append(dict(dtype=dtype, bytes=num_bytes, fits=fits(num_bytes)))
    _log(log, f'sampler     {dtype:8}', num_bytes)
  return dict(devices=devices, train_batch_per_device=train_batch,
              sample_batch_per_device=sample_batch, train_step=train_rows, sampler=sampler_rows,
              fit_fraction=FIT_FRACTION,
              accelerator_memory_bytes=dict(ACCELERATOR_MEMORY), backend=jax.default_backend())


def _log(log: Optional[Callable[[str], None]], what: str, num_bytes: int) -> None:
  if log is not None:
    log(f'{what}: {num_bytes / GiB:6.2f} GiB per device; fits: '
        f'{", ".join(fits(num_bytes)) or "none of the table"}')
