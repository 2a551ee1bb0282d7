"""Which paths can be a workdir: train, sample and eval on each kind that works (no network).

What a workdir can be is decided by Orbax 0.12.8: it writes arrays through TensorStore, with the
`file` driver for absolute local paths and the `gcs` driver for gs:// paths, and nothing else.
So a workdir is a local directory (absolute or relative, as a str, pathlib.Path or epath.Path)
or gs://BUCKET/PATH. In-memory filesystems cannot hold one: etils.epath, which the rest of the
code uses, rejects TensorFlow's ram:// and fsspec's memory://, and even taught ram:// Orbax
refuses it ("Checkpoint path should be absolute"); those get one clear error instead. gs:// is
tested against a local GCS emulator (tests/gcs_emulator.py says how each library reaches it).
"""
import io
import json
import os
import pathlib
import subprocess

import numpy as np
import pytest
from etils import epath
from safetensors import numpy as safetensors_numpy

from ddpm_jax import evaluation, inference, sample_job, train
from ddpm_jax.errors import UserError
from tests import gcs_emulator
from tests.conftest import ROOT, tiny_digits_config, tiny_train_command

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


def _run_main(command: list[str], env: dict) -> subprocess.CompletedProcess:
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _event_scalars(events: bytes) -> dict[str, list[int]]:
  """{tag: [steps]} of the scalar summaries in a TensorBoard events file's bytes."""
  import tensorflow as tf
  with tf.io.gfile.GFile('ram://events_copy', 'wb') as f:
    f.write(events)
  steps = {}
  for event in tf.compat.v1.train.summary_iterator('ram://events_copy'):
    for value in event.summary.value:
      steps.setdefault(value.tag, []).append(event.step)
  return steps


@pytest.mark.slow
def test_a_gs_workdir_trains_resumes_samples_and_evaluates(tmp_path):
  """On a local GCS emulator: train 4 steps, then --mode=all resumes to 6, samples and evaluates.

  Every file lands in the bucket: Orbax's checkpoints (TensorStore and tf.io.gfile), the
  TensorBoard events (tf.summary), samples and metrics (etils.epath).
  """
  overrides = {'diffusion.num_timesteps': 10, 'training.batch_size': 8,
               'sampling.num_samples': 4, 'sampling.batch_size': 4,
               'eval.bpd_num_images': 8, 'eval.bpd_batch_size': 8}
  with gcs_emulator.local_gcs(tmp_path, 'ddpm-jax-test') as gcs:
    env = dict(os.environ, PYTHONPATH=ROOT, **gcs.environment())
    workdir, prefix = f'gs://{gcs.bucket}/runs/digits', 'runs/digits/'
    _run_main(tiny_train_command(workdir, {**overrides, 'training.num_train_steps': 4}), env)
    assert prefix + 'checkpoints/4/commit_success.txt' in gcs.object_names(prefix)
    rerun = _run_main(tiny_train_command(workdir, {**overrides, 'training.num_train_steps': 6},
                                         '--mode=all'), env)

    assert 'Resuming from the checkpoint at step 4.' in rerun.stderr
    assert rerun.stdout.split() == [f'{workdir}/samples/samples_6.png', f'{workdir}/eval/6.json']
    names = gcs.object_names(prefix)
    for step in (4, 6):
      assert f'{prefix}checkpoints/{step}/commit_success.txt' in names
      assert f'{prefix}checkpoints/{step}/default/manifest.ocdbt' in names
    events = [name for name in names if 'events.out.tfevents' in name and '/eval/' not in name]
    assert len(events) == 2  # one per run
    assert _event_scalars(gcs.read(events[0]))['loss'] == [2, 4]
    [eval_events] = [name for name in names if name.startswith(prefix + 'eval/events.out')]
    assert _event_scalars(gcs.read(eval_events))['bpd_test'] == [6]
    assert json.loads(gcs.read(prefix + 'eval/best.json'))['step'] == 6
    samples = np.load(io.BytesIO(gcs.read(prefix + 'samples/samples_6.npz')))['samples']
    assert samples.shape == (4, 8, 8, 1) and samples.dtype == np.uint8
    assert gcs.read(prefix + 'samples/samples_6.png').startswith(b'\x89PNG')
    metrics = json.loads(gcs.read(prefix + 'eval/6.json'))
    assert metrics['step'] == 6 and np.isfinite(metrics['bpd_test'])
    assert prefix + 'eval/rate_distortion_6.json' in names

    # The EMA weights exported to a DDPMPipeline folder in the bucket (etils.epath), not ./gs:/
    export = f'gs://{gcs.bucket}/export/pipeline'
    convert = [arg for arg in tiny_train_command(workdir, overrides) if arg != '--mode=train']
    convert[convert.index('ddpm_jax.main')] = 'ddpm_jax.convert'
    _run_main(convert + [f'--to_diffusers={export}'], env)
    exported = [name for name in gcs.object_names('export/') if not name.endswith('/')]
    assert sorted(exported) == ['export/pipeline/model_index.json',
                                'export/pipeline/scheduler/scheduler_config.json',
                                'export/pipeline/unet/config.json',
                                'export/pipeline/unet/diffusion_pytorch_model.safetensors']
    weights = safetensors_numpy.load(gcs.read('export/pipeline/unet/'
                                              'diffusion_pytorch_model.safetensors'))
    assert weights['conv_in.weight'].shape == (32, 1, 3, 3)  # torch layout of the tiny U-Net
    assert not os.path.exists(os.path.join(ROOT, 'gs:'))
