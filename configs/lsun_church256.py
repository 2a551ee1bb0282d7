"""LSUN church 256x256 (113,673,219 parameters).

Command (Cloud TPU v3-8):
  python -m ddpm_jax.main --config=configs/lsun_church256.py --workdir=gs://BUCKET/lsun_church256 \
      --config.data.data_dir=/path/to/lsun
Data: LSUN is not in tfds in a usable form; the pipeline's message says how to prepare it.
Hardware and time: TPU v3-8, ~2.2 steps/s at batch 64, 1.2M steps in ~150 h (paper, App. B).
Expected result (paper, Table 3, EMA weights, 50k samples): FID 7.89.
"""
from ddpm_jax import default_config


def get_config():
  config = default_config.get_256_config()
  config.data.dataset = 'lsun_church'
  config.training.num_train_steps = 1_200_000
  config.data.eval_split = 'validation'  # 300 validation images; no test split
  return config
