"""Config validation: every shipped config passes; each bad value is one sentence naming it."""
import importlib
import pathlib
import re

import pytest

from ddpm_jax import config_validation, default_config
from ddpm_jax.errors import UserError
from tests.conftest import ROOT, tiny_digits_config

CONFIGS = tuple(sorted(p.stem for p in pathlib.Path(ROOT, 'configs').glob('*.py')
                       if p.stem != '__init__'))


def _field_names(config, prefix: str = '') -> set[str]:
  """Every leaf field of a config, dotted: {'seed', 'data.dataset', ...}."""
  names = set()
  for key, value in config.items():
    if hasattr(value, 'items'):
      names |= _field_names(value, f'{prefix}{key}.')
    else:
      names.add(prefix + key)
  return names


def test_the_shipped_configs_are_found():
  assert {'digits', 'cifar10', 'celebahq256', 'lsun_church256'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_every_shipped_config_is_valid(name):
  config_validation.validate(importlib.import_module(f'configs.{name}').get_config())


@pytest.mark.parametrize('name', ('default',) + CONFIGS)
def test_every_field_has_exactly_one_rule_and_every_rule_a_field(name):
  config = (default_config.get_default_config() if name == 'default'
            else importlib.import_module(f'configs.{name}').get_config())
  fields, rules = _field_names(config), set(config_validation.FIELDS)
  assert not fields - rules, f'fields of {name} without a rule in config_validation.FIELDS'
  assert not rules - fields, f'rules in config_validation.FIELDS for fields {name} lacks'


# (field, bad value, the sentence's end): the scenarios first.
BAD_FIELDS = [
    ('training.ema_decay', 1.5, 'use a number in [0, 1).'),
    ('training.keep', 0, 'use an integer >= 1.'),
    ('training.num_train_steps', 0, 'use an integer >= 1.'),
    ('training.num_train_steps', -1, 'use an integer >= 1.'),
    ('optim.learning_rate', -1.0, 'use a number > 0.'),
    ('model.dropout', 2.0, 'use a number in [0, 1).'),
    ('model.ch_mult', (), 'use a non-empty tuple of integers >= 1.'),
    ('data.image_size', 0, 'use an integer >= 1.'),
    ('model.dtype', 'float16', "use one of 'float32', 'bfloat16'."),  # unet computes in these
    ('training.checkpoint_every', -5, 'or 0 for the last step (and preemption) only.'),
    ('training.log_every', -1, 'or 0 for the last step only.'),
    ('training.keep_every', -1, 'or 0 for none kept permanently.'),
    ('optim.warmup_steps', -1, 'use an integer >= 0.'),
    ('optim.grad_clip', -1.0, 'use a number >= 0.'),
    ('optim.beta2', 1.0, 'use a number in [0, 1).'),
    ('optim.eps', 0.0, 'use a number > 0.'),
    ('optim.learning_rate', float('nan'), 'use a number > 0.'),
    ('model.ch', 0, 'use an integer >= 1.'),
    ('model.num_res_blocks', 0, 'use an integer >= 1.'),
    ('model.ch_mult', (1, 0), 'use a non-empty tuple of integers >= 1.'),
    ('data.channels', 2, 'use one of 1, 3.'),
    ('diffusion.beta_schedule', 'linaer', "use one of 'linear', 'quad'"),
    ('diffusion.model_var_type', 'large', "use one of 'fixedlarge'"),
    ('diffusion.beta_end', 1.0, 'use a number in (0, 1).'),
    ('diffusion.num_timesteps', 0, 'use an integer >= 1.'),
    ('training.batch_size', 0, 'use an integer >= 1.'),
    ('training.batch_size', 16.5, 'use an integer >= 1.'),
    ('sampling.num_samples', 0, 'use an integer >= 1.'),
    ('sampling.progressive_every', -1, 'or 0 for no Fig. 6.'),
    ('eval.bpd_num_images', -1, 'or 0 for no bits/dim.'),
    ('eval.inception_batch_size', 0, 'use an integer >= 1.'),
    ('model.remat', 'all', "use one of 'none', 'blocks'."),
    ('training.grad_accum_steps', 0, 'use an integer >= 1.'),
    ('sampling.sampler', 'ddpm', "use one of 'ancestral', 'ddim', 'dpmpp_2m', 'dpmpp_3m'."),
    ('sampling.spacing', 'linear', "use one of 'uniform', 'quadratic', 'linspace', 'trailing'."),
    ('sampling.num_steps', -1, 'or 0 for all diffusion.num_timesteps steps.'),
    ('sampling.eta', -0.5, 'use a number in [0, 1].'),
    # Issue 21: eta beyond DDIM's range, and sample names that would leave samples/.
    ('sampling.eta', 50.0, 'use a number in [0, 1].'),
    ('sampling.name', '../../../x', 'use a plain file name'),
    ('sampling.name', '/tmp/x', 'use a plain file name'),
    ('sampling.name', 'a/b', 'use a plain file name'),
    ('sampling.name', '..', 'use a plain file name'),
    ('sampling.name', '.hidden', 'use a plain file name'),
    ('sampling.name', 'x' * 101, 'use a plain file name'),
]


def _with(config, field: str, value):
  section, name = field.rsplit('.', 1)
  node = config
  for part in section.split('.'):
    node = node[part]
  with node.ignore_type():
    node[name] = value
  return config


@pytest.mark.parametrize('field, value, allowed', BAD_FIELDS)
def test_a_bad_field_is_one_sentence_naming_it_and_what_is_allowed(field, value, allowed):
  config = _with(tiny_digits_config(), field, value)
  with pytest.raises(UserError) as error:
    config_validation.validate(config)
  message = str(error.value)
  assert message.startswith(f'{field}={value!r} is not allowed: ') and allowed in message
  assert '\n' not in message


BAD_COMBINATIONS = [
    ({'data.image_size': 10, 'model.ch_mult': (1, 2, 2)},
     'data.image_size=10 must be a multiple of 4'),
    ({'model.ch': 48, 'model.ch_mult': (2, 4), 'model.num_groups': 32},
     'model.num_groups=32 must divide every level\'s channel count (model.ch * model.ch_mult: '
     '48 is not divisible by it).'),
    ({'model.attn_resolutions': (16,)},
     'model.attn_resolutions=(16,) names 16, but the U-Net\'s resolutions are 8, 4.'),
    ({'training.keep_every': 10, 'training.checkpoint_every': 4},
     'training.keep_every=10 must be a multiple of training.checkpoint_every=4'),
    ({'training.keep_every': 10, 'training.checkpoint_every': 0},
     'training.keep_every=10 must be a multiple of training.checkpoint_every=0'),
    ({'diffusion.beta_start': 0.03, 'diffusion.beta_end': 0.02},
     'diffusion.beta_start=0.03 must not exceed diffusion.beta_end=0.02.'),
    ({'diffusion.model_var_type': 'learned_range'},
     "diffusion.model_var_type='learned_range' is learned only by loss_type='kl'"),
    ({'sampling.interpolate_t': 40}, 'sampling.interpolate_t=40 must be below '
                                     'diffusion.num_timesteps=40 (0 for no Fig. 8).'),
    ({'sampling.num_steps': 41}, 'sampling.num_steps must be in [0, 40]'),
    ({'sampling.eta': 0.5}, "sampling.eta=0.5 is DDIM's"),
    ({'sampling.sampler': 'dpmpp_3m', 'sampling.eta': 1.0},
     "sampling.eta=1.0 is DDIM's; set sampling.sampler='ddim' to use it, or leave eta at 0 for "
     'the dpmpp_3m sampler.'),
    ({'sampling.spacing': 'linspace'}, "sampling.spacing='linspace' repeats a timestep"),
    ({'sampling.num_steps': 10, 'diffusion.model_mean_type': 'xprev'},
     "model_mean_type='xprev' predicts x_{t-1} of one original step"),
    ({'data.dataset': 'folder:/x', 'eval.num_samples': 100},
     'eval.num_samples=100 asks for FID, which needs RGB images, but data.channels=1'),
]


@pytest.mark.parametrize('overrides, expected', BAD_COMBINATIONS)
def test_a_bad_combination_is_one_sentence_naming_both_fields(overrides, expected):
  config = tiny_digits_config()
  for field, value in overrides.items():
    _with(config, field, value)
  with pytest.raises(UserError, match=re.escape(expected)):
    config_validation.validate(config)


def test_eta_beyond_one_is_refused_by_the_sampler_too():
  from ddpm_jax import sampling
  with pytest.raises(UserError, match=re.escape('sampling.eta must be in [0, 1]')):
    sampling.check_settings(40, sampler='ddim', num_steps=10, eta=50., spacing='uniform')
  sampling.check_settings(40, sampler='ddim', num_steps=10, eta=1., spacing='uniform')


def test_plain_sample_names_are_allowed():
  config = tiny_digits_config()
  for name in ('samples', 'fid-50k', 'run_2.ema', 'A1'):
    config_validation.validate(_with(config, 'sampling.name', name))


def test_zero_means_off_where_the_loop_has_a_use_for_it():
  config = tiny_digits_config()
  for field in ('training.log_every', 'training.checkpoint_every', 'training.keep_every',
                'training.sample_every', 'sampling.progressive_every', 'sampling.interpolate_t',
                'eval.bpd_num_images', 'eval.num_samples'):
    _with(config, field, 0)
  config_validation.validate(config)


def test_a_config_that_lacks_a_field_is_refused():
  config = tiny_digits_config()
  del config.sampling['interpolate_lambdas']
  with pytest.raises(UserError, match='The config has no field sampling.interpolate_lambdas; '):
    config_validation.validate(config)
