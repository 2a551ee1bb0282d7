"""A checkpoint records what it was trained as; resume, sample and eval refuse a config that
differs where it matters (issue 21: resuming with another T, schedule or mean type continued
silently, and sampling an eps model as xprev exited 0 with every pixel 127 or 128)."""
import copy
import logging
import shutil
import subprocess

import flax.serialization
import pytest

from ddpm_jax import checkpoint_settings, checkpointing, errors, inference, parallel, train
from ddpm_jax.errors import UserError
from tests.conftest import ROOT, tiny_train_command


@pytest.fixture
def workdir(trained_digits, tmp_path):
  """A private copy of the trained tiny digits workdir (step 30, T = 40, eps, fixedlarge)."""
  _, source = trained_digits
  shutil.copytree(source, tmp_path / 'w', ignore=shutil.ignore_patterns('eval', 'samples'))
  return str(tmp_path / 'w')


def _changed(config, **changes):
  """A copy of `config` with {'section__name': value} changes."""
  config = copy.deepcopy(config)
  for key, value in changes.items():
    section, name = key.split('__')
    config[section][name] = value
  return config


def _restore_for_training(config, workdir):
  mesh = parallel.make_mesh()
  manager = checkpointing.create_manager(workdir, config.training, trained_as=config)
  try:
    abstract = flax.serialization.to_state_dict(train._abstract_train_state(config, mesh))
    return checkpointing.restore_for_training(manager, workdir, abstract)
  finally:
    manager.close()


def test_checkpoints_record_what_they_were_trained_as(trained_digits):
  config, workdir = trained_digits
  settings, written_by = checkpointing.trained_as(workdir, 30)
  assert written_by == 'train' and settings == checkpoint_settings.record(config)
  assert settings['diffusion']['num_timesteps'] == 40 and settings['model']['ch_mult'] == [1, 2]


@pytest.mark.parametrize('field, value, stored', [
    ('diffusion.num_timesteps', 50, '40'),
    ('diffusion.beta_schedule', 'quad', 'linear'),
    ('diffusion.model_mean_type', 'xstart', 'eps'),
    ('diffusion.loss_type', 'kl', 'mse'),
    ('model.dropout', 0.3, '0.0'),
    ('model.num_groups', 16, '8'),
    ('model.attn_resolutions', (8, 4), '(4,)'),
])
def test_resuming_as_another_network_or_objective_is_one_sentence(trained_digits, workdir,
                                                                  field, value, stored):
  config, _ = trained_digits
  section, name = field.split('.')
  changed = _changed(config, **{f'{section}__{name}': value})
  before = sorted(p.name for p in (checkpointing.checkpoint_dir(workdir)).iterdir())
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(changed, workdir)
  shown = errors.flag_value(value)
  assert str(error.value) == (
      f'The checkpoint at step 30 in {checkpointing.checkpoint_dir(workdir)} was trained with '
      f'{field}={stored}, but the config has {field}={shown}; pass --config.{field}={stored} '
      f'to resume it, or pass another --workdir to train a new model.')
  assert sorted(p.name for p in (checkpointing.checkpoint_dir(workdir)).iterdir()) == before


def test_resuming_ignores_what_does_not_change_the_objective(trained_digits, workdir):
  config, _ = trained_digits
  free = _changed(config, diffusion__model_var_type='fixedsmall', model__dtype='bfloat16',
                  model__remat='blocks', data__random_flip=False, optim__learning_rate=1e-3)
  assert _restore_for_training(free, workdir)[0] == 30
  kl_bound = _changed(config, diffusion__model_var_type='fixedsmall', diffusion__loss_type='kl')
  with pytest.raises(UserError, match='diffusion.loss_type=mse'):
    _restore_for_training(kl_bound, workdir)


def test_sampling_as_another_network_is_refused_and_sampling_choices_are_free(trained_digits,
                                                                              workdir):
  config, _ = trained_digits
  for changes, field, stored in (
      ({'diffusion__model_mean_type': 'xprev'}, 'diffusion.model_mean_type', 'eps'),
      ({'diffusion__num_timesteps': 100}, 'diffusion.num_timesteps', '40'),
      ({'diffusion__model_var_type': 'learned_range', 'diffusion__loss_type': 'kl'},
       'diffusion.loss_type', 'mse'),
      ({'model__ch': 16}, 'model.ch', '32')):
    with pytest.raises(UserError) as error:
      inference.Inference(_changed(config, **changes), workdir)
    assert str(error.value).endswith(f'pass --config.{field}={stored} to use it.'), error.value
  free = _changed(config, diffusion__model_var_type='fixedsmall', model__dropout=0.5,
                  model__dtype='bfloat16', sampling__sampler='ddim', sampling__num_steps=5,
                  sampling__clip_denoised=False, data__dataset='folder:/elsewhere')
  assert inference.Inference(free, workdir).step == 30


def test_an_old_checkpoint_without_the_record_loads_with_one_warning(trained_digits, tmp_path,
                                                                     caplog):
  config, source = trained_digits
  state = checkpointing.restore_state_dict(source)
  manager = checkpointing.create_manager(str(tmp_path), config.training)  # records nothing
  checkpointing.save(manager, 30, state)
  manager.wait_until_finished()
  manager.close()
  assert checkpointing.trained_as(str(tmp_path), 30) == (None, '')
  with caplog.at_level(logging.WARNING):
    assert inference.Inference(_changed(config, diffusion__num_timesteps=20),
                               str(tmp_path)).step == 30
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and 'does not record the settings it was trained with' in \
      warnings[0], warnings


@pytest.mark.slow
def test_the_cli_refuses_to_sample_an_eps_model_as_xprev(workdir):
  command = tiny_train_command(workdir, {'diffusion.num_timesteps': 40,
                                         'diffusion.model_mean_type': 'xprev'}, '--mode=sample')
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__('os').environ, 'PYTHONPATH': ROOT})
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f'The checkpoint at step 30 in {checkpointing.checkpoint_dir(workdir)} was trained with '
      f'diffusion.model_mean_type=eps, but the config has diffusion.model_mean_type=xprev; pass '
      f'--config.diffusion.model_mean_type=eps to use it.')
