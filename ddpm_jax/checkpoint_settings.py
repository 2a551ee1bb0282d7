"""What a checkpoint was trained as, and whether a config may use it.

Every checkpoint (trained, resumed, or imported by `convert`) records in its Orbax metadata the
settings that define the network and its objective: the model section, the diffusion section
(schedule, T, mean and variance types, loss) and the data shape (`record`). Resuming, sampling
and evaluating compare that record with the config (`check`) before any array is read:

* refused everywhere (they change what the network computes or the chain it belongs to): the
  U-Net's shape (`model.ch`, `ch_mult`, `num_res_blocks`, `attn_resolutions`,
  `resamp_with_conv`, `num_groups`), `data.image_size` and `data.channels`, the noise schedule
  (`diffusion.beta_schedule`, `beta_start`, `beta_end`, `num_timesteps`, compared through the
  betas they give: `cosine` ignores the two ends), `model_mean_type`, `loss_type`, and a
  learned variance against a fixed one;
* refused when resuming only: `model.dropout` (part of the training objective, unused when
  sampling), and `fixedlarge` against `fixedsmall` with `loss_type='kl'` (the bound's weights);
* free: `fixedlarge` against `fixedsmall` when sampling or evaluating (or training with
  `loss_type='mse'`, whose loss ignores the variance), `model.dtype` and `model.remat` (how it
  computes, not what), `data.dataset`, and everything sampling-only (sampler, steps, clipping).

A difference is one sentence (a UserError) naming the field, both values and the flag that
fixes it. A checkpoint written before these records existed loads with one warning.
"""
from typing import Any, Optional

import numpy as np
from absl import logging

from ddpm_jax import diffusion, errors
from ddpm_jax.errors import UserError

METADATA_KEY = 'ddpm_jax'  # Orbax custom metadata: {METADATA_KEY: {'trained_as': .., 'by': ..}}
RESUME, USE = 'resume', 'use'  # `check`'s purposes: resume training; sample or evaluate

_SHAPE = ('model.ch', 'model.ch_mult', 'model.num_res_blocks', 'model.attn_resolutions',
          'model.resamp_with_conv', 'model.num_groups', 'data.image_size', 'data.channels')
_SCHEDULE = ('diffusion.beta_schedule', 'diffusion.num_timesteps', 'diffusion.beta_start',
             'diffusion.beta_end')


def _plain(value: Any) -> Any:
  """JSON-able: tuples become lists, numpy scalars Python numbers."""
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def record(config) -> dict:
  """The settings of `config` that define the network and its objective (JSON-able)."""
  d = config.data
  return {'model': {k: _plain(v) for k, v in config.model.to_dict().items()},
          'diffusion': {k: _plain(v) for k, v in config.diffusion.to_dict().items()},
          'data': {'image_size': d.image_size, 'channels': d.channels, 'dataset': d.dataset}}


def metadata(config, written_by: str) -> dict:
  """The Orbax custom metadata of a checkpoint written by `written_by` ('train', 'convert')."""
  return {METADATA_KEY: {'trained_as': record(config), 'by': written_by}}


def recorded(custom_metadata: Optional[dict]) -> Optional[dict]:
  """The `record` stored in a checkpoint's custom metadata; None for an older checkpoint."""
  entry = (custom_metadata or {}).get(METADATA_KEY)
  return entry.get('trained_as') if isinstance(entry, dict) else None


def _get(settings: dict, field: str) -> Any:
  section, name = field.split('.')
  return settings.get(section, {}).get(name)


def _betas(settings: dict) -> Optional[np.ndarray]:
  d = settings.get('diffusion', {})
  try:
    return diffusion.get_beta_schedule(d['beta_schedule'], beta_start=d['beta_start'],
                                       beta_end=d['beta_end'], num_timesteps=d['num_timesteps'])
  except (KeyError, TypeError, ValueError):
    return None


def first_difference(stored: dict, config, purpose: str) -> Optional[tuple[str, Any, Any]]:
  """(field, the checkpoint's value, the config's value) of the first difference that
  `purpose` (RESUME or USE) may not ignore; None if the config may use the checkpoint."""
  ours = record(config)
  fields = list(_SHAPE) + ['diffusion.model_mean_type', 'diffusion.loss_type']
  for field in fields:
    if _get(stored, field) != _get(ours, field):
      return field, _get(stored, field), _get(ours, field)
  theirs_betas, our_betas = _betas(stored), _betas(ours)
  if theirs_betas is None or our_betas is None or theirs_betas.shape != our_betas.shape or \
      not np.allclose(theirs_betas, our_betas, rtol=1e-12, atol=0):
    for field in _SCHEDULE:
      if _get(stored, field) != _get(ours, field):
        return field, _get(stored, field), _get(ours, field)
  field = 'diffusion.model_var_type'
  theirs_var, our_var = _get(stored, field), _get(ours, field)
  if theirs_var != our_var:
    learned = {theirs_var.startswith('learned'), our_var.startswith('learned')}
    if learned != {False} or (purpose == RESUME and _get(ours, 'diffusion.loss_type') == 'kl'):
      return field, theirs_var, our_var
  if purpose == RESUME and _get(stored, 'model.dropout') != _get(ours, 'model.dropout'):
    return 'model.dropout', _get(stored, 'model.dropout'), _get(ours, 'model.dropout')
  return None


def check(custom_metadata: Optional[dict], config, purpose: str, *, step: int,
          where: str) -> None:
  """A UserError for a config that may not use the checkpoint at `step` (in `where`) for
  `purpose`; one warning for a checkpoint that records nothing."""
  stored = recorded(custom_metadata)
  if stored is None:
    logging.warning('The checkpoint at step %d in %s does not record the settings it was '
                    'trained with (it predates those records); this config\'s model and '
                    'diffusion sections are taken to be them.', step, where)
    return
  difference = first_difference(stored, config, purpose)
  if difference is None:
    return
  field, theirs, ours = difference
  remedy = ('to resume it, or pass another --workdir to train a new model' if purpose == RESUME
            else 'to use it')
  theirs, ours = errors.flag_value(theirs), errors.flag_value(ours)
  raise UserError(f'The checkpoint at step {step} in {where} was trained with {field}={theirs}, '
                  f'but the config has {field}={ours}; pass --config.{field}={theirs} {remedy}.')
