"""CelebA-HQ 256x256 (113,673,219 parameters).

Command (Cloud TPU v3-8):
  python -m ddpm_jax.main --config=configs/celebahq256.py --workdir=gs://BUCKET/celebahq256 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets
Data: tfds `celeb_a_hq/256` needs a manual download (see the message the pipeline prints).
Hardware and time: TPU v3-8, ~2.2 steps/s at batch 64, 0.5M steps in ~63 h (paper, App. B).
Memory: the paper's batch 64 on a v3-8 is 8 images per 16 GiB core. Compiled on CPU
(`python -m ddpm_jax.benchmark --config=<this file> --memory`), the float32 step needs 25.3 GB
per core at once; with training.grad_accum_steps=4 (the default here: 4 microbatches of 2 per
core, the same update) 8.1 GB (7.6 GiB, under half of a core).
Expected result: samples as the paper's Fig. 1/3 (the paper reports no CelebA-HQ FID).
Evaluation (--mode=eval, or --mode=eval --follow beside the trainer; docs/evaluation.md): FID on
eval.num_samples=50,000 samples (the paper's protocol) against all the 30,000 train images. At the
paper's 128 samples in 300 s on a v3-8, the 1000-step chain takes ~33 h per checkpoint
(--config.sampling.sampler=ddim --config.sampling.num_steps=50: ~1.6 h); bits/dim (256 images per
split, T network passes each) ~10 min a split.
Splits: no held-out split (eval_split='train'), so --mode=eval reports train metrics
only, named for that split (bpd_train, fid_train); there is no *_test.
"""
from ddpm_jax import default_config


def get_config():
  config = default_config.get_256_config()
  config.data.dataset = 'celebahq256'
  config.training.num_train_steps = 500_000
  config.data.eval_split = 'train'  # the tfds dataset has no test split
  return config
