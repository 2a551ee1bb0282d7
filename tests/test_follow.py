"""Evaluation beside training: --mode=eval --follow, and training.eval_every in the trainer."""
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ddpm_jax import config_validation, evaluation, follower, inference as inference_lib, train
from ddpm_jax.errors import UserError
from tests.conftest import (ROOT, checkpoint_steps, signal_when_collected, tiny_digits_config,
                            tiny_train_command)
from tests.test_evaluation import _event_values


@pytest.fixture
def workdir(trained_digits, tmp_path):
  """A private copy of the trained tiny digits workdir's checkpoint (step 30), nothing that
  other tests evaluated there."""
  _, source = trained_digits
  shutil.copytree(os.path.join(source, 'checkpoints'), tmp_path / 'w' / 'checkpoints')
  return tmp_path / 'w'


def _copy_checkpoint(workdir, source: int, step: int) -> None:
  """A checkpoint at `step` holding the weights of `source` (the names are the steps)."""
  shutil.copytree(workdir / 'checkpoints' / str(source), workdir / 'checkpoints' / str(step))


def _evaluated(eval_dir) -> list[int]:
  """The steps of the metrics files <step>.json in `eval_dir`."""
  return sorted(int(p.stem) for p in eval_dir.glob('*.json') if p.stem.isdigit())


def _small(config):
  config = config.copy_and_resolve_references()
  config.eval.bpd_num_images = 8
  return config


# --------------------------------------------------------------------------------- bad input


def test_follow_settings_that_cannot_work_are_one_sentence(tmp_path):
  config = tiny_digits_config()
  for kwargs, sentence in (
      ({'mode': 'train'}, '--follow evaluates checkpoints as they appear, so it needs '
                          '--mode=eval, not --mode=train.'),
      ({'mode': 'sample'}, 'needs --mode=eval, not --mode=sample.'),
      ({'timeout_s': -1}, '--follow_timeout=-1 must be 0 or more'),
      ({'poll_s': 0}, '--follow_poll=0 must be at least 1')):
    with pytest.raises(UserError, match=re.escape(sentence)):
      follower.check_flags(config, **{'mode': 'eval', 'poll_s': 1, 'timeout_s': 1, **kwargs})
  config.sampling.step = 10
  with pytest.raises(UserError, match='leave out --config.sampling.step=10'):
    follower.check_flags(config, mode='eval', poll_s=1, timeout_s=1)

  for field, value, sentence in (
      ('training.eval_every', 20, 'training.eval_every=20 must be a multiple of '
                                  'training.checkpoint_every=30'),
      ('eval.fid_reference_images', 2047, 'eval.fid_reference_images=2047 is not allowed: use '
                                          'an integer >= 2048.'),
      ('eval.best_metric', 'fid_train', "eval.best_metric='fid_train' is not computed by this "
                                        "config: it needs eval.num_samples > 0 and RGB data")):
    config = tiny_digits_config()
    section, name = field.split('.')
    config[section][name] = value
    with pytest.raises(UserError, match=re.escape(sentence)):
      config_validation.validate(config)

  # Through the command line: one sentence, status 1, before anything starts.
  commands = [tiny_train_command(tmp_path / 'a', {}, '--follow'),
              tiny_train_command(tmp_path / 'b', {}, '--mode=eval', '--follow',
                                 '--follow_timeout=-5'),
              tiny_train_command(tmp_path / 'c', {'training.eval_every': 6})]
  processes = [subprocess.Popen(c, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                                stderr=subprocess.PIPE, text=True) for c in commands]
  errors = [p.communicate(timeout=300)[1] for p in processes]
  assert [p.returncode for p in processes] == [1, 1, 1], errors
  assert [e.strip().splitlines()[-1] for e in errors] == [
      '--follow evaluates checkpoints as they appear, so it needs --mode=eval, not --mode=train.',
      '--follow_timeout=-5 must be 0 or more (seconds to wait for a new checkpoint before '
      'stopping).',
      'training.eval_every=6 must be a multiple of training.checkpoint_every=4: the evaluation '
      'reads the saved checkpoint (eval_every=0 evaluates none).']
  assert not any((tmp_path / name).exists() for name in 'abc')


# ------------------------------------------------------------------------- the follower


@pytest.mark.slow
def test_the_follower_takes_the_newest_and_survives_a_deleted_checkpoint(
    trained_digits, workdir, monkeypatch, caplog):
  """Steps 10, 20, 30 (the last one 40): 30 is deleted while it is read, so the follower takes
  20, names 10 as skipped, times out waiting; restarted with 40 there, it evaluates only 40."""
  config = _small(trained_digits[0])
  config.training.num_train_steps = 40
  for step in (10, 20):
    _copy_checkpoint(workdir, 30, step)
  real_inference, reads = inference_lib.Inference, []

  def deleted_while_read(config, workdir_, *, step, mesh):
    reads.append(step)
    if step == 30:
      shutil.rmtree(workdir / 'checkpoints' / '30')  # the trainer's keep policy, mid-read
    return real_inference(config, workdir_, step=step, mesh=mesh)

  monkeypatch.setattr(inference_lib, 'Inference', deleted_while_read)
  with caplog.at_level(logging.INFO):
    assert follower.follow(config, str(workdir), poll_s=1, timeout_s=1)
  assert reads == [30, 20]
  assert 'The checkpoint of step 30 disappeared while it was read' in caplog.text
  assert 'Skipping the older checkpoints 10 for the newest, 20' in caplog.text
  assert 'for 1 s (--follow_timeout); stopping.' in caplog.text
  eval_dir = workdir / 'eval'
  assert _evaluated(eval_dir) == [20]
  assert 20 in _event_values(eval_dir)['bpd_test']
  assert json.loads((eval_dir / 'best.json').read_text())['step'] == 20

  _copy_checkpoint(workdir, 20, 40)
  caplog.clear()
  reads.clear()
  with caplog.at_level(logging.INFO):
    assert follower.follow(config, str(workdir), poll_s=1, timeout_s=60)
  assert reads == [40]
  assert 'Evaluated the checkpoint of the last step, 40; done.' in caplog.text
  assert _evaluated(eval_dir) == [20, 40]
  assert sorted(_event_values(eval_dir)['bpd_test']) == [20, 40]


@pytest.mark.slow
def test_sigterm_stops_the_follower_and_a_rerun_continues(trained_digits, workdir, monkeypatch,
                                                          caplog):
  config = _small(trained_digits[0])
  digits_metrics, sampled = evaluation.digits_metrics, []

  def preempted_after_sampling(config_, samples):
    os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
    return digits_metrics(config_, samples)

  monkeypatch.setattr(evaluation, 'digits_metrics', preempted_after_sampling)
  with caplog.at_level(logging.INFO):
    assert not follower.follow(config, str(workdir), poll_s=1, timeout_s=60)
  assert 'Stopped by SIGTERM; rerun the same command to continue' in caplog.text
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
  samples = workdir / 'samples' / 'samples_30.npz'
  assert samples.exists() and not (workdir / 'eval' / '30.json').exists()
  # The progress file's name carries its settings' digest (a rerun of other settings starts anew).
  progress_file, = (workdir / 'eval').glob('30_bpd_train_*.progress.json')
  assert json.loads(progress_file.read_text())['batches_done'] == 1

  monkeypatch.setattr(evaluation, 'digits_metrics', digits_metrics)
  real_sample = inference_lib.Inference.sample
  monkeypatch.setattr(inference_lib.Inference, 'sample',
                      lambda self, rng, n: sampled.append(n) or real_sample(self, rng, n))
  assert follower.follow(config, str(workdir), poll_s=1, timeout_s=60)
  assert sampled == []  # the samples were kept
  assert evaluation.is_evaluated(config, str(workdir), 30)
  caplog.clear()
  with caplog.at_level(logging.INFO):  # all done: nothing is computed again
    assert follower.follow(config, str(workdir), poll_s=1, timeout_s=60)
  assert 'Evaluating' not in caplog.text and 'done.' in caplog.text


def test_a_stop_swallowed_by_a_destructor_stops_the_follower_at_the_next_safe_point(
    monkeypatch):
  monkeypatch.setattr(follower.errors, '_PENDING', [])
  monkeypatch.setattr(sys, 'unraisablehook', lambda unraisable: None)
  with pytest.raises(follower.Stopped, match='SIGTERM'):
    with follower.stopping_on_signals():
      signal_when_collected()
      for _ in range(100):  # nothing raises here: the stop was swallowed
        pass
  assert not follower.errors._PENDING  # handled: a later evaluation is not stopped by it
  follower.errors.raise_if_interrupted()


@pytest.mark.parametrize('read_fails', [False, True])
def test_a_signal_while_a_checkpoint_is_read_stops_after_the_read(read_fails):
  """Orbax's read is not interrupted; the signal stops the follower when it ends, also when the
  read failed (the follower took that failure for a deleted checkpoint and went on)."""
  with follower.stopping_on_signals():
    with pytest.raises(follower.Stopped, match='SIGTERM'):
      with follower._signals_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs at the next bytecode; nothing may stop here
          pass
        if read_fails:
          raise OSError('the checkpoint disappeared while it was read')
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.slow
def test_a_trainer_and_a_follower_side_by_side(tmp_path):
  """Two processes on digits: a trainer saving steps 10, 20, 30 (keeping the latest one) and
  the follower started beside it; then the follower again, which finds everything done."""
  workdir = tmp_path / 'w'
  overrides = {'training.num_train_steps': 30, 'training.checkpoint_every': 10,
               'training.keep': 1, 'training.log_every': 10, 'diffusion.num_timesteps': 40,
               'sampling.num_samples': 10, 'sampling.batch_size': 4,
               'eval.bpd_num_images': 8, 'eval.bpd_batch_size': 8}
  env = dict(os.environ, PYTHONPATH=ROOT)
  follow_command = tiny_train_command(workdir, overrides, '--mode=eval', '--follow',
                                      '--follow_poll=1', '--follow_timeout=300')
  with open(tmp_path / 'follower.log', 'w') as log:
    follower_process = subprocess.Popen(follow_command, cwd=ROOT, env=env, stderr=log)
  deadline = time.time() + 300
  while 'Following' not in (tmp_path / 'follower.log').read_text():
    assert follower_process.poll() is None and time.time() < deadline, (
        (tmp_path / 'follower.log').read_text()[-3000:])
    time.sleep(0.5)
  trainer = subprocess.run(tiny_train_command(workdir, overrides), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
  assert trainer.returncode == 0, trainer.stderr[-3000:]
  try:
    assert follower_process.wait(timeout=600) == 0
  finally:
    follower_process.kill()
  log = (tmp_path / 'follower.log').read_text()
  assert 'Evaluated the checkpoint of the last step, 30; done.' in log, log[-3000:]
  assert 'Traceback' not in log
  evaluated = _evaluated(workdir / 'eval')
  assert 30 in evaluated and set(evaluated) <= {10, 20, 30}
  assert [int(s) for s in re.findall(r'Evaluating the EMA weights of step (\d+)', log)] == (
      evaluated)
  events = _event_values(workdir / 'eval')
  assert sorted(events['bpd_test']) == evaluated and sorted(events['confidence']) == evaluated
  best = json.loads((workdir / 'eval' / 'best.json').read_text())
  assert best['metric'] == 'confidence' and best['step'] in evaluated
  assert checkpoint_steps(workdir) == [30]

  before = {p.name: p.stat().st_mtime_ns for p in (workdir / 'eval').iterdir()}
  again = subprocess.run(follow_command, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Evaluating' not in again.stderr
  assert 'Evaluated the checkpoint of the last step, 30; done.' in again.stderr
  assert {p.name: p.stat().st_mtime_ns for p in (workdir / 'eval').iterdir()} == before


# ------------------------------------------------------------------ training.eval_every


@pytest.mark.slow
def test_evaluating_during_training_leaves_training_bit_for_bit_the_same(tmp_path):
  config = tiny_digits_config(num_timesteps=20, num_train_steps=8)
  config.training.checkpoint_every = 4
  config.eval.bpd_num_images = 8
  plain = train.train_and_evaluate(config, str(tmp_path / 'plain'))
  config.training.eval_every = 4
  evaluated = train.train_and_evaluate(config, str(tmp_path / 'evaluated'))
  assert int(plain.step) == int(evaluated.step) == 8
  for a, b in zip(*(jax.tree.leaves(jax.device_get(state)) for state in (plain, evaluated))):
    np.testing.assert_array_equal(a, b)  # parameters, EMA, optimizer state, random key
  eval_dir = tmp_path / 'evaluated' / 'eval'
  assert _evaluated(eval_dir) == [4, 8]
  assert sorted(_event_values(eval_dir)['bpd_test']) == [4, 8]
  assert not (tmp_path / 'plain' / 'eval').exists()


@pytest.mark.slow
def test_sigterm_during_an_evaluation_in_training_stops_and_the_rerun_evaluates_first(
    tmp_path, monkeypatch, caplog):
  config = tiny_digits_config(num_timesteps=20, num_train_steps=8)
  config.training.update(checkpoint_every=4, eval_every=4)
  config.eval.bpd_num_images = 8
  digits_metrics = evaluation.digits_metrics
  monkeypatch.setattr(evaluation, 'digits_metrics', lambda c, samples: os.kill(
      os.getpid(), signal.SIGTERM) or digits_metrics(c, samples))
  with caplog.at_level(logging.WARNING):
    stopped = train.train_and_evaluate(config, str(tmp_path))
  assert int(stopped.step) == 4 and not (tmp_path / 'eval' / '4.json').exists()
  assert 'Stopped by SIGTERM: saved the checkpoint at step 4' in caplog.text
  monkeypatch.setattr(evaluation, 'digits_metrics', digits_metrics)
  assert int(train.train_and_evaluate(config, str(tmp_path)).step) == 8
  assert _evaluated(tmp_path / 'eval') == [4, 8]
