"""LSUN cat 256x256 (113,673,219 parameters).

Command (Cloud TPU v3-8):
  python -m ddpm_jax.main --config=configs/lsun_cat256.py --workdir=gs://BUCKET/lsun_cat256 \
      --config.data.data_dir=/path/to/lsun
Data: LSUN is not in tfds in a usable form; the pipeline's message says how to prepare it.
Hardware and time: TPU v3-8, ~2.2 steps/s at batch 64, 1.8M steps in ~230 h (paper, App. B).
Expected result (paper, Table 3, EMA weights, 50k samples): FID 19.75.
"""
from ddpm_jax import default_config


def get_config():
  config = default_config.get_256_config()
  config.data.dataset = 'lsun_cat'
  config.training.num_train_steps = 1_800_000
  config.data.random_flip = False  # the authors' command trains LSUN cat with --randflip 0
  config.data.eval_split = 'train'  # the tfds dataset has no test split
  return config
