"""The default configuration: every option with the paper's CIFAR-10 value.

`configs/<name>.py` start from `get_default_config()` and override what differs, as the
Flax examples do. Every field can also be overridden on the command line, for example
`--config.training.batch_size=256`.
"""
import ml_collections


def get_default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'cifar10'  # digits | cifar10 | celebahq256 | lsun_<category> | folder:/path
  # (a folder has no held-out split: --mode=eval reports *_train metrics only)
  data.data_dir = ''  # tfds data_dir (or the LSUN root); '' uses tfds' default
  data.image_size = 32
  data.channels = 3
  data.random_flip = True
  data.shuffle_buffer = 50_000
  data.eval_split = 'test'

  config.model = model = ml_collections.ConfigDict()
  model.ch = 128
  model.ch_mult = (1, 2, 2, 2)
  model.num_res_blocks = 2
  model.attn_resolutions = (16,)
  model.dropout = 0.1
  model.resamp_with_conv = True
  model.num_groups = 32  # GroupNorm groups (the paper's 32)
  model.dtype = 'float32'  # compute dtype: float32 | bfloat16 (parameters stay float32)
  model.remat = 'none'  # none | blocks: recompute each block's activations in the backward pass

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.beta_schedule = 'linear'
  diffusion.beta_start = 1e-4
  diffusion.beta_end = 0.02
  diffusion.num_timesteps = 1000
  diffusion.model_mean_type = 'eps'
  diffusion.model_var_type = 'fixedlarge'
  diffusion.loss_type = 'mse'

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128  # global batch, over all devices and hosts
  training.num_train_steps = 800_000
  training.log_every = 100
  training.checkpoint_every = 5_000  # preemption-safe checkpoint
  training.keep = 3  # how many recent checkpoints to keep
  training.keep_every = 100_000  # permanent checkpoints
  training.sample_every = 50_000  # sample grid in TensorBoard; 0 disables
  training.num_grid_samples = 64
  training.ema_decay = 0.9999
  training.grad_accum_steps = 1  # microbatches per device per update (the same update)
  training.eval_every = 0  # >0: evaluate every such saved step in the training process (as
  # --mode=eval, on its mesh; a multiple of checkpoint_every); 0: never (see --follow)

  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 2e-4
  optim.warmup_steps = 5_000
  optim.grad_clip = 1.0
  optim.beta1 = 0.9
  optim.beta2 = 0.999
  optim.eps = 1e-8

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.num_samples = 256
  sampling.batch_size = 256  # global; larger runs go in chunks of this size
  sampling.clip_denoised = True
  sampling.sampler = 'ancestral'  # the paper's chain, 'ddim' (Song et al. 2021, Eq. 12),
  # 'dpmpp_2m' or 'dpmpp_3m' (DPM-Solver++ multistep, Lu et al. 2022b; best with 'linspace')
  sampling.num_steps = 0  # kept timesteps; 0: all diffusion.num_timesteps
  sampling.eta = 0.0  # DDIM's eta: 0 deterministic, 1 the posterior variance
  sampling.spacing = 'uniform'  # kept steps: 'uniform', 'quadratic' (DDIM's two), 'linspace' or
  # 'trailing' (diffusers'); see sampling.py
  sampling.step = -1  # checkpoint step; -1 is the latest
  sampling.name = 'samples'
  sampling.progressive_every = 0  # >0: also write the paper's Fig. 6 (x0 predictions every N steps)
  sampling.interpolate_t = 0  # >0: also write the paper's Fig. 8 interpolation, encoding to step t
  sampling.interpolate_lambdas = 9

  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.bpd_num_images = 10_000  # test images for bits/dim (and rate-distortion); the
  # train subset uses the same count; 0 disables
  evaluation.bpd_batch_size = 128
  evaluation.num_samples = 50_000  # samples for FID/IS/KID; 0 disables
  evaluation.inception_batch_size = 200
  evaluation.pt_inception_path = ''  # optional: pytorch-fid weights, for the Inception Score
  evaluation.fid_reference_images = 50_000  # FID's reference: at most this many images of a split
  # (a fixed random subset of a larger one); part of the statistics' cache key
  evaluation.best_metric = 'auto'  # eval/best<tag>.json ranks checkpoints by it: fid_train,
  # fid_test, kid, is, bpd_test, bpd_train or confidence (digits); auto: confidence for digits,
  # else fid_train (the bits/dim of the first split without FID samples)
  return config


def get_256_config() -> ml_collections.ConfigDict:
  """The paper's 256x256 setting (CelebA-HQ, LSUN): 113,673,219 parameters, batch 64."""
  config = get_default_config()
  config.data.image_size = 256
  config.data.shuffle_buffer = 10_000
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.dropout = 0.0
  config.diffusion.model_var_type = 'fixedsmall'  # the authors' 256x256 models sample with it
  config.training.batch_size = 64
  # 8 images per v3 core need ~25 GB at once in float32; 4 microbatches of 2 need ~8 GB (the
  # configs' docstrings; python -m ddpm_jax.benchmark --config=... --memory).
  config.training.grad_accum_steps = 4
  config.optim.learning_rate = 2e-5
  config.sampling.num_samples = 128
  config.sampling.batch_size = 64
  config.eval.num_samples = 50_000  # the paper's protocol (the configs' docstrings: the time)
  config.eval.bpd_num_images = 256
  config.eval.bpd_batch_size = 64
  return config
