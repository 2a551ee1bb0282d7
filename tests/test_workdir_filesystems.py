"""Which paths can be a workdir: train, sample and eval on each kind that works (no network).

What a workdir can be is decided by Orbax 0.12.8: it writes arrays through TensorStore, with the
`file` driver for absolute local paths and the `gcs` driver for gs:// paths, and nothing else.
So a workdir is a local directory (absolute or relative, as a str, pathlib.Path or epath.Path)
or gs://BUCKET/PATH. In-memory filesystems cannot hold one: etils.epath, which the rest of the
code uses, rejects TensorFlow's ram:// and fsspec's memory://, and even taught ram:// Orbax
refuses it ("Checkpoint path should be absolute"); those get one clear error instead. gs:// is
not tested here: it needs the network (TensorFlow's GCS client, behind the TensorBoard writer and
epath, has a fixed endpoint, so no local emulator can stand in).
"""
import pathlib

import numpy as np
import pytest
from etils import epath

from ddpm_jax import evaluation, inference, sample_job, train
from ddpm_jax.errors import UserError
from tests.conftest import tiny_digits_config

NUM_TRAIN_STEPS = 4


def tiny_config():
  config = tiny_digits_config(num_timesteps=10, num_train_steps=NUM_TRAIN_STEPS)
  config.training.batch_size = 8
  config.training.log_every = 2
  config.sampling.num_samples = 4
  config.eval.bpd_num_images = 8
  config.eval.bpd_batch_size = 8
  return config


@pytest.mark.slow
def test_a_relative_workdir_trains_samples_and_evaluates(tmp_path, monkeypatch):
  """The README's form (--workdir=workdir_digits), then the same directory as path objects."""
  monkeypatch.chdir(tmp_path)
  config = tiny_config()
  train.train_and_evaluate(config, 'workdir')
  workdir = tmp_path / 'workdir'
  assert [p.name for p in (workdir / 'checkpoints').iterdir()] == [str(NUM_TRAIN_STEPS)]
  assert list(workdir.glob('events.out.tfevents.*'))

  out = sample_job.sample_from_workdir(config, pathlib.Path('workdir'))
  samples = inference.read_samples(workdir / 'samples' / f'samples_{NUM_TRAIN_STEPS}.npz')
  assert samples.shape == (4, 8, 8, 1) and samples.dtype == np.uint8
  assert epath.Path(out['grid_png']).exists()

  result = evaluation.evaluate(config, epath.Path('workdir'))
  assert (workdir / 'eval' / f'{NUM_TRAIN_STEPS}.json').exists()
  assert np.isfinite(result['metrics']['bpd_test'])
  assert sorted(p.name for p in tmp_path.iterdir()) == ['workdir']  # nothing written elsewhere


@pytest.mark.parametrize('workdir', ['ram://ddpm_jax_test/workdir',
                                     'memory://ddpm_jax_test/workdir',
                                     's3://ddpm-jax-test/workdir'])
def test_a_workdir_orbax_cannot_write_to_is_one_clear_error(workdir):
  config = tiny_config()
  for job in (train.train_and_evaluate, sample_job.sample_from_workdir, evaluation.evaluate):
    with pytest.raises(UserError, match='gs://'):
      job(config, workdir)
