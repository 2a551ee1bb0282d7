"""LSUN church 256x256 (113,673,219 parameters).

Command (Cloud TPU v3-8):
  python -m ddpm_jax.main --config=configs/lsun_church256.py --workdir=gs://BUCKET/lsun_church256 \
      --config.data.data_dir=/path/to/lsun
Data: LSUN is not in tfds in a usable form; the pipeline's message says how to prepare it.
Hardware and time: TPU v3-8, ~2.2 steps/s at batch 64, 1.2M steps in ~150 h (paper, App. B).
Memory: the paper's batch 64 on a v3-8 is 8 images per 16 GiB core. Compiled on CPU
(`python -m ddpm_jax.benchmark --config=<this file> --memory`), the float32 step needs 25.3 GB
per core at once; with training.grad_accum_steps=4 (the default here: 4 microbatches of 2 per
core, the same update) 8.1 GB (7.6 GiB, under half of a core).
Expected result (paper, Table 3, EMA weights, 50k samples): FID 7.89.
Evaluation (--mode=eval, or --mode=eval --follow beside the trainer; docs/evaluation.md): FID on
eval.num_samples=50,000 samples (the paper's protocol) against a fixed random 50,000 of the
126,227 train images. At the paper's 128 samples in 300 s on a v3-8, the 1000-step chain takes ~33
h per checkpoint (--config.sampling.sampler=ddim --config.sampling.num_steps=50: ~1.6 h); bits/dim
(256 images per split, T network passes each) ~10 min a split.
Splits: the *_test metrics are on the 300 held-out validation images
(data.eval_split='validation'); the paper's FID is fid_train.
"""
from ddpm_jax import default_config


def get_config():
  config = default_config.get_256_config()
  config.data.dataset = 'lsun_church'
  config.training.num_train_steps = 1_200_000
  config.data.eval_split = 'validation'  # 300 validation images; no test split
  return config
