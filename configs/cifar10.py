"""CIFAR-10 32x32, unconditional: the paper's main model (35,746,307 parameters).

Command (Cloud TPU v3-8):
  python -m ddpm_jax.main --config=configs/cifar10.py --workdir=gs://BUCKET/cifar10
From your machine, on a TPU VM or pod slice (it creates the VM, installs `.[tpu]`, starts this):
  launch/tpu_vm.py up --zone=ZONE --accelerator-type=v3-8 --workdir=gs://BUCKET/cifar10
Hardware and time: TPU v3-8, ~21 steps/s at batch 128, 800k steps in ~10.6 h (paper, App. B).
Expected result (paper, Table 1, L_simple, EMA weights): FID 3.17 against the training set
(5.24 against the test set), Inception Score 9.46 +- 0.11, NLL <= 3.75 bits/dim on the test set.
Evaluation (--mode=eval, or --mode=eval --follow beside the trainer; docs/evaluation.md): 50,000
samples of the 1000-step chain take ~55 min per checkpoint on a v3-8 at the paper's 256 samples
in 17 s, bits/dim on 10,000 test and 10,000 train images ~11 min a split.
"""
from ddpm_jax import default_config


def get_config():
  return default_config.get_default_config()  # the defaults are this experiment's values
