"""Throughput of the real train step and reverse-chain step, timed after compilation; memory.

  python -m ddpm_jax.benchmark --config=configs/cifar10.py \
      [--config.training.batch_size=8 --config.sampling.batch_size=8] [--steps=10 --warmup=2]
      [--profile=/tmp/profile]
  python -m ddpm_jax.benchmark --config=configs/lsun_church256.py --memory [--devices=8]

With --memory nothing runs: the train step and the sampler are compiled for the config's global
batches split over --devices, for float32 / bfloat16 x model.remat none / blocks x each of
--grad_accum_steps, and the per-device peak memory and the accelerators that hold it are
reported (`ddpm_jax/memory.py` says how). Only jax, flax, optax, numpy, absl and ml_collections
are imported, so it runs on an accelerator image that has nothing else.

Times `train_step.jit_train_step` (forward, loss, backward, clipping, Adam, EMA; the state donated
as in training) and one reverse step of the configured sampler (`sampling.sampler`, `num_steps`,
`eta`, `spacing`: the paper's `p_sample`, or a respaced or DDIM step, with the EMA parameters),
both jitted over the mesh of all devices: `sampling.jit_sampler` of a one-step chain, and of a
`--scan_steps` chain (the loop of `sample_loop`) to confirm the per-step cost;
`sample_seconds_per_sample` is the step time times the kept steps over the batch. Times are
medians. With --profile both steps are then traced and their time attributed by pass and kind
of work (`ddpm_jax/profiling.py`). The last line of stdout is one JSON object
(docs/performance.md compares it with a PyTorch implementation of the same network), in both
modes; progress goes to the log.
"""
import functools
import json
import os
import resource
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from ddpm_jax import cli, memory, parallel, profiling, sampling, seeds
from ddpm_jax import train_step as train_step_lib, xla_flags

_STEPS = flags.DEFINE_integer('steps', 10, 'Timed calls of each step; the median is reported.',
                              lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls after compilation.', lower_bound=0)
_SCAN_STEPS = flags.DEFINE_integer('scan_steps', 10, 'Reverse steps in the timed scan.',
                                   lower_bound=1)
_MATMUL_SIZE = flags.DEFINE_integer('matmul_size', 4096,
                                    'n of the n x n matmul that measures the peak FLOP/s.')
_MEMORY = flags.DEFINE_bool('memory', False, 'Compile only: per-device peak memory of the '
                            'variants, and the accelerators that hold them.')
_DEVICES = flags.DEFINE_integer('devices', 8, 'With --memory: the devices the global batches '
                                'are split over (the paper\'s TPU v3-8 has 8 cores).')
_PROFILE = flags.DEFINE_string('profile', None, 'After timing: trace --steps more calls of the '
                               'train step and of the reverse step into PROFILE/train and '
                               'PROFILE/sample (TensorBoard, Perfetto) and log where their time '
                               'goes (ddpm_jax/profiling.py); the JSON gets the rows.')
_GRAD_ACCUM_STEPS = flags.DEFINE_list('grad_accum_steps', ['1', '2', '4'], 'With --memory: '
                                      'microbatch counts to compile, where they divide the '
                                      'per-device batch.')


def _compile(jitted, *args):
  """(compiled executable, seconds to lower and compile)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _median_seconds(step, carry, *, steps: int, warmup: int):
  """(median wall time of `carry = step(carry)` over `steps` calls after `warmup`, last carry)."""
  times = []
  for _ in range(warmup + steps):
    start = time.perf_counter()
    carry = jax.block_until_ready(step(carry))
    times.append(time.perf_counter() - start)
  return float(np.median(times[warmup:])), carry


def _matmul_tflops(n: int, dtype, *, steps: int = 5) -> float:
  """FLOP/s of a jitted n x n matmul on the first device: the peak the model is measured against."""
  a, b = (jax.device_put(jnp.asarray(np.random.default_rng(i).standard_normal((n, n)), dtype))
          for i in range(2))
  matmul, _ = _compile(jax.jit(jnp.dot), a, b)
  seconds, _ = _median_seconds(lambda _: matmul(a, b), None, steps=steps, warmup=1)
  return 2 * n**3 / seconds / 1e12


def _peak_bytes(executables) -> tuple[int, str]:
  """Peak memory: the device's counter, else XLA's buffer assignment, else the resident set."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device_memory_stats'
  try:
    return max(memory.peak_bytes(executable) for executable in executables), 'memory_analysis'
  except (AttributeError, NotImplementedError, TypeError):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'max_rss'


def _sampler_fns(config, mesh, num_scan_steps: int):
  """Jitted samplers of `config` over 1 and `num_scan_steps` kept steps, and its kept-step count.

  A reverse step costs the same whichever kept timesteps a chain has (one network pass and the
  update), so a one-step chain and a short one time the configured sampler's step and loop.
  """
  num_kept = len(sampling.kept_timesteps(config.diffusion.num_timesteps,
                                         config.sampling.num_steps, config.sampling.spacing))

  def sampler(num_steps):
    short = config.copy_and_resolve_references()
    short.sampling.num_steps = num_steps
    return sampling.jit_sampler(short, mesh)
  return sampler(1), sampler(min(num_scan_steps, num_kept)), num_kept


def _profile(directory: str, label: str, compiled, call, carry, steps: int):
  """Traces `steps` calls of `carry = call(carry)` into directory/label, with the compiled
  program's HLO text beside it (program.hlo.txt); (rows, last carry)."""
  with profiling.trace(os.path.join(directory, label)):
    for _ in range(steps):
      carry = jax.block_until_ready(call(carry))
  hlo_text = compiled.as_text()
  with open(os.path.join(directory, label, 'program.hlo.txt'), 'w') as f:  # the names it traced
    f.write(hlo_text)
  rows = profiling.summarize(os.path.join(directory, label), hlo_text, calls=steps)
  logging.info('Where the %s step\'s time goes (%s):\n%s', label,
               os.path.join(directory, label), profiling.format_rows(rows))
  return rows, carry


def run(config, *, steps: int = 10, warmup: int = 2, scan_steps: int = 10,
        matmul_size: int = 4096, profile_dir: Optional[str] = None) -> dict:
  """Compiles and times the train step and the reverse step of `config`; returns the numbers.

  `matmul_peak_tflops` is the whole mesh's rate on an n x n matmul (n = `matmul_size`) in the
  compute dtype, and `peak_fraction` the share of it that the train step reaches. With
  `profile_dir`, both steps are then traced there and the result has their `profile` rows.
  """
  mesh = parallel.make_mesh()
  batch_size, sample_batch_size = config.training.batch_size, config.sampling.batch_size
  parallel.check_divisible(batch_size, mesh)
  parallel.check_divisible(sample_batch_size, mesh, 'sampling.batch_size')
  d = config.data
  image_shape = (d.image_size, d.image_size, d.channels)
  rng = np.random.default_rng(config.seed)
  local_images = rng.uniform(-1, 1, (batch_size // jax.process_count(),) + image_shape)
  batch = parallel.global_batch(mesh, {'image': local_images.astype(np.float32)})
  state = jax.jit(functools.partial(train_step_lib.create_train_state, config),
                  out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(config.seed))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))

  logging.info('Compiling the train step (batch %d, %d devices).', batch_size, mesh.size)
  train_step, compile_seconds = _compile(train_step_lib.jit_train_step(config, mesh), state,
                                       batch)
  logging.info('Timing %d train steps.', steps)
  train_seconds, state = _median_seconds(lambda s: train_step(s, batch)[0], state,
                                         steps=steps, warmup=warmup)
  # The cost analysis of a partitioned program counts one device's share.
  flops_per_step = float(train_step.cost_analysis()['flops']) * mesh.size

  ema_params = state.ema_params
  sample_rng = seeds.key(config.seed, seeds.BENCHMARK_SAMPLER)
  one_step_jit, scan_jit, num_kept = _sampler_fns(config, mesh, scan_steps)
  scan_steps = min(scan_steps, num_kept)
  logging.info('Compiling the reverse step (batch %d) and a %d-step scan.', sample_batch_size,
               scan_steps)
  one_step, sample_compile_seconds = _compile(one_step_jit, ema_params, sample_rng,
                                              sample_batch_size)
  scan, _ = _compile(scan_jit, ema_params, sample_rng, sample_batch_size)
  logging.info('Timing %d reverse steps and %d scans.', steps, max(steps // 2, 1))
  step_seconds, _ = _median_seconds(lambda _: one_step(ema_params, sample_rng), None,
                                    steps=steps, warmup=warmup)
  scan_seconds, _ = _median_seconds(lambda _: scan(ema_params, sample_rng), None,
                                    steps=max(steps // 2, 1), warmup=1)

  peak_bytes, peak_source = _peak_bytes([train_step, one_step, scan])
  achieved_tflops = flops_per_step / train_seconds / 1e12
  logging.info('Timing a %d x %d matmul.', matmul_size, matmul_size)
  matmul_tflops = _matmul_tflops(matmul_size, config.model.dtype) * mesh.size
  profile = {}
  if profile_dir:
    profile['sample'], _ = _profile(profile_dir, 'sample', one_step,
                                    lambda _: one_step(ema_params, sample_rng), None, steps)
    # Last: the train step donates the state that `ema_params` belongs to.
    profile['train'], _ = _profile(profile_dir, 'train', train_step,
                                   lambda s: train_step(s, batch)[0], state, steps)
  return dict(
      train_images_per_sec=batch_size / train_seconds,
      train_steps_per_sec=1 / train_seconds,
      sample_steps_per_sec=1 / step_seconds,
      sample_images_per_sec=sample_batch_size / (step_seconds * num_kept),
      sample_seconds_per_sample=step_seconds * num_kept / sample_batch_size,
      sampler=config.sampling.sampler,
      sample_num_steps=num_kept,
      scan_steps_per_sec=scan_steps / scan_seconds,
      compile_seconds=compile_seconds,
      sample_compile_seconds=sample_compile_seconds,
      params=num_params,
      devices=mesh.size,
      device_kind=jax.devices()[0].device_kind,
      batch_size=batch_size,
      sample_batch_size=sample_batch_size,
      train_flops_per_step=flops_per_step,
      achieved_tflops=achieved_tflops,
      matmul_peak_tflops=matmul_tflops,
      peak_fraction=achieved_tflops / matmul_tflops,
      sample_flops_per_step=float(one_step.cost_analysis()['flops']) * mesh.size,
      peak_memory_bytes=peak_bytes,
      peak_memory_source=peak_source,
      dtype=str(config.model.dtype),
      jax=jax.__version__,
      xla_flags=os.environ.get('XLA_FLAGS', ''),
      **({'profile': profile} if profile else {}),
  )


def main(argv):
  cli.no_arguments(argv)
  xla_flags.apply()  # before JAX starts its backend
  cli.start(cli.CONFIG.value)
  parallel.initialize()  # TPU pods; nothing elsewhere
  if _MEMORY.value:
    result = memory.report(cli.CONFIG.value, devices=_DEVICES.value,
                           grad_accum_steps=[int(k) for k in _GRAD_ACCUM_STEPS.value],
                           log=logging.info)
  else:
    result = run(cli.CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value,
                 scan_steps=_SCAN_STEPS.value, matmul_size=_MATMUL_SIZE.value,
                 profile_dir=_PROFILE.value)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  flags.adopt_module_key_flags(cli)  # --config in --help
  flags.mark_flags_as_required(['config'])
  app.run(cli.with_user_errors(main), flags_parser=cli.parse_flags)
