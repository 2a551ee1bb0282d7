"""--mode=sample: samples of a checkpoint's EMA model as .npz and PNG grids, and Figs. 6 and 8."""
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from ddpm_jax import images, inference as inference_lib, input_pipeline, parallel, sampling, seeds


def _progressive_figure(inference: inference_lib.Inference, rng, *, num_images: int,
                        every: int) -> np.ndarray:
  """Fig. 6: a row per sample, pred_x0 from t = T - every down to 0, then the sample."""
  batch = inference.padded(num_images)
  fn = jax.jit(lambda params, rng: sampling.p_sample_loop_progressive(
      inference.diffusion, inference.model_fn(params), (batch,) + inference.image_shape, rng,
      every=every, clip_denoised=inference.config.sampling.clip_denoised, mesh=inference.mesh,
      **sampling.settings(inference.config)))
  x_0, preds = fn(inference.params, rng)
  preds = parallel.to_host(preds)[:num_images, ::-1]  # large t first
  rows = np.concatenate([preds, parallel.to_host(x_0)[:num_images, None]], axis=1)
  return images.image_grid(images.to_uint8(rows.reshape((-1,) + rows.shape[2:])),
                           ncol=rows.shape[1])


def _interpolation_figure(inference: inference_lib.Inference, rng, *, t: int,
                          num_lambdas: int, num_pairs: int = 4) -> np.ndarray:
  """Fig. 8: a row per pair of test images, lambda from 0 to 1, the sources at both ends."""
  real = next(input_pipeline.create_eval_iterator(
      inference.config, 'test', batch_size=inference.padded(2 * num_pairs),
      num_images=2 * num_pairs))['image']
  real = parallel.to_host(parallel.global_batch(inference.mesh, real))[:2 * num_pairs]
  x1, x2 = real[:num_pairs], real[num_pairs:2 * num_pairs]
  fn = jax.jit(lambda params, a, b, rng: sampling.interpolate(
      inference.diffusion, inference.model_fn(params), a, b, rng, t=t, num_lambdas=num_lambdas,
      clip_denoised=inference.config.sampling.clip_denoised,
      **sampling.settings(inference.config)))
  mixed = np.asarray(fn(inference.params, x1, x2, rng))
  rows = np.concatenate([x1[:, None], mixed, x2[:, None]], axis=1)
  return images.image_grid(images.to_uint8(rows.reshape((-1,) + rows.shape[2:])),
                           ncol=rows.shape[1])


def _upscale(image_size: int) -> int:
  return max(1, 64 // image_size)


def sample_from_workdir(config, workdir, *, mesh: Optional[Mesh] = None,
                        inference: Optional[inference_lib.Inference] = None) -> dict:
  """--mode=sample: samples of the EMA model of a checkpoint, as .npz and a PNG grid.

  Writes WORKDIR/samples/<name>_<step>.npz (key `samples`, uint8 [N, H, W, C]; with another
  sampler <name>_<step>_ddim50.npz and so on, see `sampling.settings_tag`) and a grid PNG
  beside it; with sampling.progressive_every or sampling.interpolate_t, also the paper's Fig. 6
  and Fig. 8 as PNGs, drawn with the same sampler (<name>_<step>_progressive<every>.png,
  <name>_<step>_interpolation_t<t>x<lambdas>.png). A samples file of other settings is never
  replaced (`inference.generate` refuses; the figures' names carry what else they depend on).
  Returns the paths. `inference`: the checkpoint already restored (--mode=all shares one with
  the evaluation).
  """
  s = config.sampling
  inference = inference or inference_lib.Inference(config, workdir, step=s.step, mesh=mesh)
  name = inference.samples_name(s.name)
  logging.info('Sampling %d images from the EMA weights of step %d on %d devices (%s).',
               s.num_samples, inference.step, inference.mesh.size, sampling.settings(config))
  npz = inference_lib.generate(inference, workdir, name=name, num_samples=s.num_samples,
                               batch_size=s.batch_size,
                               seed=config.seed + seeds.SAMPLES_OFFSET, name_flag='sampling.name')
  out = {'samples_npz': str(npz)}
  if jax.process_index() == 0:
    grid = images.image_grid(next(inference_lib.iter_samples(npz, 100)), ncol=10)
    out['grid_png'] = images.save_png(npz.parent / f'{name}.png', grid,
                                      upscale=_upscale(config.data.image_size))
  rng = seeds.key(config.seed, seeds.FIGURES)
  if s.progressive_every > 0:
    figure = _progressive_figure(inference, rng, num_images=min(s.num_samples, 8),
                                 every=s.progressive_every)
    if jax.process_index() == 0:
      out['progressive_png'] = images.save_png(  # the name carries what else it depends on
          npz.parent / f'{name}_progressive{s.progressive_every}.png', figure,
          upscale=_upscale(config.data.image_size))
  if s.interpolate_t > 0:
    figure = _interpolation_figure(inference, rng, t=s.interpolate_t,
                                   num_lambdas=s.interpolate_lambdas)
    if jax.process_index() == 0:
      out['interpolation_png'] = images.save_png(
          npz.parent / f'{name}_interpolation_t{s.interpolate_t}x{s.interpolate_lambdas}.png',
          figure, upscale=_upscale(config.data.image_size))
  for key, path in out.items():
    logging.info('Wrote %s: %s', key, path)
  return out
