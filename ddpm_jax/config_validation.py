"""Checks a whole config before anything starts: each field's type and range, then combinations.

`validate(config)` raises a `UserError` whose one sentence names the field, its value and what
is allowed. Every field of the config is one line of `FIELDS` (a test walks the default and every
shipped config); a combination of fields is one function of `COMBINATIONS`. A choice is the
owning module's tuple (`unet.COMPUTE_DTYPES`, `sampling.SAMPLERS`, ...), and where the owning
module checks a combination itself (`diffusion.GaussianDiffusion`, `sampling.check_settings`)
the combination here calls it, so each rule is stated once. The jobs then rely on a validated
config. `*_every` fields take 0 for "never" where the loop has a use for that: 0 log steps,
checkpoints, sample grids or permanent checkpoints mean only the last step (and a preemption)
logs or saves, none are drawn, none are kept.
"""
import math
import re
from typing import Any, Callable, NamedTuple, Optional

from ddpm_jax import diffusion, sampling, unet
from ddpm_jax.errors import UserError

# The metrics `eval.best_metric` can name, and whether higher is better (evaluation.update_best).
BEST_METRICS = {'fid_train': False, 'fid_test': False, 'kid': False, 'is': True,
                'bpd_test': False, 'bpd_train': False, 'confidence': True}


class Rule(NamedTuple):
  allows: Callable[[Any], bool]
  allowed: str  # what is allowed, for the message: "an integer >= 1"


def _is_integer(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (_is_integer(value) or isinstance(value, float)) and math.isfinite(value)


def integer(minimum: int, zero_means: Optional[str] = None) -> Rule:
  """An integer >= `minimum`; with `zero_means`, also 0 (which means that)."""
  if zero_means is None:
    return Rule(lambda v: _is_integer(v) and v >= minimum, f'an integer >= {minimum}')
  return Rule(lambda v: _is_integer(v) and (v >= minimum or v == 0),
              f'an integer >= {minimum}, or 0 for {zero_means}')


def interval(low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> Rule:
  """A number in [low, high) by default; `low_open`/`high_open` exclude the ends."""
  def allows(v):
    return (_is_number(v) and (v > low if low_open else v >= low)
            and (v < high if high_open else v <= high))
  return Rule(allows, f'a number in {"(" if low_open else "["}{low}, {high}'
                      f'{")" if high_open else "]"}')


def positive() -> Rule:
  return Rule(lambda v: _is_number(v) and v > 0, 'a number > 0')


def at_least_zero() -> Rule:
  return Rule(lambda v: _is_number(v) and v >= 0, 'a number >= 0')


def one_of(*choices) -> Rule:
  return Rule(lambda v: v in choices, 'one of ' + ', '.join(map(repr, choices)))


def boolean() -> Rule:
  return Rule(lambda v: isinstance(v, bool), 'True or False')


def text() -> Rule:
  return Rule(lambda v: isinstance(v, str) and bool(v), 'a non-empty string')


_PLAIN_FILE_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._+-]{0,99}')


def plain_file_name() -> Rule:
  """A name for files in one folder: no path separator, no leading dot, at most 100 characters."""
  return Rule(lambda v: isinstance(v, str) and _PLAIN_FILE_NAME.fullmatch(v) is not None,
              'a plain file name (at most 100 letters, digits and . _ + -, starting with a letter '
              'or digit; no / or ..)')


def integers(minimum: int, *, non_empty: bool) -> Rule:
  """A tuple (or list) of integers >= `minimum`."""
  return Rule(lambda v: (isinstance(v, (tuple, list)) and (bool(v) or not non_empty)
                         and all(_is_integer(x) and x >= minimum for x in v)),
              f'a {"non-empty " if non_empty else ""}tuple of integers >= {minimum}')


FIELDS = {
    'seed': integer(0),
    'data.dataset': text(),
    'data.image_size': integer(1),
    'data.channels': one_of(1, 3),
    'data.random_flip': boolean(),
    'data.shuffle_buffer': integer(1),
    'data.eval_split': text(),
    'data.data_dir': Rule(lambda v: isinstance(v, str), "a path, or '' for tfds' default"),
    'model.ch': integer(1),
    'model.ch_mult': integers(1, non_empty=True),
    'model.num_res_blocks': integer(1),
    'model.attn_resolutions': integers(1, non_empty=False),
    'model.dropout': interval(0, 1),
    'model.resamp_with_conv': boolean(),
    'model.num_groups': integer(1),
    'model.dtype': one_of(*unet.COMPUTE_DTYPES),
    'model.remat': one_of(*unet.REMAT_BLOCKS),
    'diffusion.beta_schedule': one_of(*diffusion.BETA_SCHEDULES),
    'diffusion.beta_start': interval(0, 1, low_open=True),
    'diffusion.beta_end': interval(0, 1, low_open=True),
    'diffusion.num_timesteps': integer(1),
    'diffusion.model_mean_type': one_of(*diffusion.MODEL_MEAN_TYPES),
    'diffusion.model_var_type': one_of(*diffusion.MODEL_VAR_TYPES),
    'diffusion.loss_type': one_of(*diffusion.LOSS_TYPES),
    'training.batch_size': integer(1),
    'training.num_train_steps': integer(1),
    'training.log_every': integer(1, zero_means='the last step only'),
    'training.checkpoint_every': integer(1, zero_means='the last step (and preemption) only'),
    'training.keep': integer(1),
    'training.keep_every': integer(1, zero_means='none kept permanently'),
    'training.sample_every': integer(1, zero_means='no sample grids'),
    'training.num_grid_samples': integer(1),
    'training.ema_decay': interval(0, 1),
    'training.grad_accum_steps': integer(1),
    'training.eval_every': integer(1, zero_means='no evaluation in the training process'),
    'optim.learning_rate': positive(),
    'optim.warmup_steps': integer(0),
    'optim.grad_clip': at_least_zero(),
    'optim.beta1': interval(0, 1),
    'optim.beta2': interval(0, 1),
    'optim.eps': positive(),
    'sampling.num_samples': integer(1),
    'sampling.batch_size': integer(1),
    'sampling.clip_denoised': boolean(),
    'sampling.step': Rule(lambda v: _is_integer(v) and v >= -1,
                          'a checkpoint step >= 0, or -1 for the latest'),
    'sampling.name': plain_file_name(),  # WORKDIR/samples/<name>_<step>.npz: stays in samples/
    'sampling.sampler': one_of(*sampling.SAMPLERS),
    'sampling.num_steps': integer(1, zero_means='all diffusion.num_timesteps steps'),
    'sampling.eta': interval(0, 1, high_open=False),  # DDIM's range: 0 deterministic, 1 DDPM
    'sampling.spacing': one_of(*sampling.SPACINGS),
    'sampling.progressive_every': integer(1, zero_means='no Fig. 6'),
    'sampling.interpolate_t': integer(1, zero_means='no Fig. 8'),
    'sampling.interpolate_lambdas': integer(2),
    'eval.bpd_num_images': integer(1, zero_means='no bits/dim'),
    'eval.bpd_batch_size': integer(1),
    'eval.num_samples': integer(1, zero_means='no FID'),
    'eval.inception_batch_size': integer(1),
    'eval.pt_inception_path': Rule(lambda v: isinstance(v, str),
                                   "a path or URL, or '' for the cached weights"),
    # At least the Inception feature width: fewer images give a singular covariance.
    'eval.fid_reference_images': integer(2048),
    'eval.best_metric': one_of('auto', *BEST_METRICS),
}


def _levels(config) -> int:
  return len(config.model.ch_mult)


def _image_size_fits_the_unet(config) -> Optional[str]:
  factor = 2**(_levels(config) - 1)
  if config.data.image_size % factor:
    return (f'data.image_size={config.data.image_size} must be a multiple of {factor}: the '
            f'U-Net halves it {_levels(config) - 1} times (model.ch_mult has {_levels(config)} '
            f'levels).')
  return None


def _groups_divide_the_channels(config) -> Optional[str]:
  m = config.model
  for channels in sorted({m.ch * mult for mult in (1, *m.ch_mult)}):
    if channels % m.num_groups:
      return (f'model.num_groups={m.num_groups} must divide every level\'s channel count '
              f'(model.ch * model.ch_mult: {channels} is not divisible by it).')
  return None


def _attention_resolutions_exist(config) -> Optional[str]:
  resolutions = [config.data.image_size // 2**i for i in range(_levels(config))]
  missing = [r for r in config.model.attn_resolutions if r not in resolutions]
  if missing:
    return (f'model.attn_resolutions={tuple(config.model.attn_resolutions)} names {missing[0]}, '
            f'but the U-Net\'s resolutions are {", ".join(map(str, resolutions))}.')
  return None


def _permanent_checkpoints_are_saved(config) -> Optional[str]:
  t = config.training
  if t.keep_every and (not t.checkpoint_every or t.keep_every % t.checkpoint_every):
    return (f'training.keep_every={t.keep_every} must be a multiple of '
            f'training.checkpoint_every={t.checkpoint_every}: permanent checkpoints are chosen '
            f'among the saved ones (keep_every=0 keeps none).')
  return None


def _evaluations_are_of_saved_checkpoints(config) -> Optional[str]:
  t = config.training
  if t.eval_every and (not t.checkpoint_every or t.eval_every % t.checkpoint_every):
    return (f'training.eval_every={t.eval_every} must be a multiple of '
            f'training.checkpoint_every={t.checkpoint_every}: the evaluation reads the saved '
            f'checkpoint (eval_every=0 evaluates none).')
  return None


def _best_metric_is_computed(config) -> Optional[str]:
  """eval.best_metric names a metric that this config's evaluation computes."""
  name, e, d = config.eval.best_metric, config.eval, config.data
  needs = {'confidence': ('data.dataset=digits', d.dataset == 'digits'),
           'bpd': ('eval.bpd_num_images > 0', e.bpd_num_images > 0),
           'fid': ('eval.num_samples > 0 and RGB data',
                   d.dataset != 'digits' and e.num_samples > 0),
           'test': ("a held-out split (data.eval_split other than 'train')",
                    d.eval_split != 'train')}
  kinds = {'confidence': ['confidence'], 'bpd_train': ['bpd'], 'bpd_test': ['bpd', 'test'],
           'fid_train': ['fid'], 'kid': ['fid'], 'is': ['fid'], 'fid_test': ['fid', 'test']}
  for kind in kinds.get(name, []):
    what, holds = needs[kind]
    if not holds:
      return (f'eval.best_metric={name!r} is not computed by this config: it needs {what}; '
              f'choose another or auto.')
  return None


def _betas_increase(config) -> Optional[str]:
  d = config.diffusion
  if d.beta_start > d.beta_end:
    return (f'diffusion.beta_start={d.beta_start} must not exceed '
            f'diffusion.beta_end={d.beta_end}.')
  return None


def _diffusion_can_be_built(config) -> Optional[str]:
  """The combinations `GaussianDiffusion` refuses (a learned variance needs loss_type='kl')."""
  try:
    diffusion.from_config(config)
  except UserError as error:
    return f'diffusion.{error}'
  return None


def _interpolation_step_is_in_the_chain(config) -> Optional[str]:
  t, num_timesteps = config.sampling.interpolate_t, config.diffusion.num_timesteps
  if t >= num_timesteps:
    return (f'sampling.interpolate_t={t} must be below diffusion.num_timesteps='
            f'{num_timesteps} (0 for no Fig. 8).')
  return None


def _sampler_fits_the_chain(config) -> Optional[str]:
  """num_steps within T, eta only for DDIM, distinct kept steps, a chain that can be respaced."""
  s, num_timesteps = config.sampling, config.diffusion.num_timesteps
  try:
    sampling.check_settings(num_timesteps, **sampling.settings(config))
    kept = sampling.kept_timesteps(num_timesteps, s.num_steps, s.spacing)
    if s.sampler == 'ancestral' and len(kept) != num_timesteps:
      diffusion.respace(diffusion.from_config(config), kept)
  except UserError as error:
    return str(error)
  return None


def _fid_has_rgb_images(config) -> Optional[str]:
  if config.data.dataset != 'digits' and config.eval.num_samples > 0 and config.data.channels != 3:
    return (f'eval.num_samples={config.eval.num_samples} asks for FID, which needs RGB images, '
            f'but data.channels={config.data.channels}; set eval.num_samples=0.')
  return None


COMBINATIONS = (_image_size_fits_the_unet, _groups_divide_the_channels,
                _attention_resolutions_exist, _permanent_checkpoints_are_saved,
                _evaluations_are_of_saved_checkpoints, _best_metric_is_computed, _betas_increase,
                _diffusion_can_be_built, _interpolation_step_is_in_the_chain,
                _sampler_fits_the_chain, _fid_has_rgb_images)


def _lookup(config, field: str):
  """The value of a dotted field; a UserError when the config lacks it."""
  node = config
  for name in field.split('.'):
    if name not in node:
      raise UserError(f'The config has no field {field}; start a config from '
                      f'ddpm_jax.default_config.get_default_config(), as configs/*.py do.')
    node = node[name]
  return node


def validate(config) -> None:
  """Raises a UserError, one sentence, at the first field or combination that is not allowed."""
  for field, rule in FIELDS.items():
    value = _lookup(config, field)
    if not rule.allows(value):
      raise UserError(f'{field}={value!r} is not allowed: use {rule.allowed}.')
  for check in COMBINATIONS:
    message = check(config)
    if message:
      raise UserError(message)
