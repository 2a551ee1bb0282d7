"""diffusers' DDPM models (`UNet2DModel` + `DDPMScheduler`) to and from ddpm_jax, without torch.

A `UNet2DModel` describes the paper's U-Net when its blocks are `DownBlock2D`/`AttnDownBlock2D`
(and the mirrored up blocks), `downsample_padding=0` (TF's SAME padding of a stride-2 conv),
`flip_sin_to_cos=False`, `freq_shift=1` (the authors' sin-then-cos embedding with
`exp(-log(10000) i / (half - 1))`), `norm_eps=1e-6` and single-head attention, as
`google/ddpm-cifar10-32` and `google/ddpm-ema-{church,bedroom,cat,celebahq}-256` are. Keys:
`time_embedding.linear_{1,2}`, `conv_in`, `down_blocks.<i>.resnets.<j>.{norm1,conv1,time_emb_proj,
norm2,conv2,conv_shortcut}`, `down_blocks.<i>.attentions.<j>.{group_norm,to_q,to_k,to_v,to_out.0}`
(or the older `query,key,value,proj_attn`), `down_blocks.<i>.downsamplers.0.conv`,
`mid_block.{resnets.0,attentions.0,resnets.1}`, `up_blocks.<L-1-i>...` for our level i,
`conv_norm_out`, `conv_out`. torch layouts: conv [out, in, kh, kw], linear [out, in],
`conv_shortcut` a 1x1 conv. Tensors are read and written with the `safetensors` numpy API.
"""
import json
import math
import os
import re
from typing import Optional

import numpy as np
from absl import logging
from etils import epath

from ddpm_jax import diffusion as diffusion_lib
from ddpm_jax.convert import names
from ddpm_jax.errors import UserError

WEIGHTS = 'diffusion_pytorch_model.safetensors'
DIFFUSERS_VERSION = '0.42.1'  # the version the exports were checked with
_RESNET = {'temb_proj': 'time_emb_proj', 'nin_shortcut': 'conv_shortcut'}
_ATTENTION = {'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v', 'proj_out': 'to_out.0'}
_LEGACY_ATTENTION = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
# UNet2DModel's defaults, for keys a config.json leaves out, and the values ddpm_jax's U-Net has.
_UNET_DEFAULTS = dict(sample_size=None, in_channels=3, out_channels=3, layers_per_block=2,
                      block_out_channels=(224, 448, 672, 896), norm_num_groups=32,
                      attention_head_dim=8, attn_norm_num_groups=None, time_embedding_dim=None,
                      down_block_types=('DownBlock2D',) + ('AttnDownBlock2D',) * 3,
                      up_block_types=('AttnUpBlock2D',) * 3 + ('UpBlock2D',))
_UNET_FIXED = dict(center_input_sample=(False, False), time_embedding_type=('positional',) * 2,
                   freq_shift=(0, 1), flip_sin_to_cos=(True, False),
                   mid_block_type=('UNetMidBlock2D',) * 2, mid_block_scale_factor=(1, 1),
                   downsample_padding=(1, 0), downsample_type=('conv',) * 2,
                   upsample_type=('conv',) * 2, act_fn=('silu', 'silu'), norm_eps=(1e-5, 1e-6),
                   resnet_time_scale_shift=('default',) * 2, add_attention=(True, True),
                   class_embed_type=(None, None), num_class_embeds=(None, None),
                   num_train_timesteps=(None, None))
_SCHEDULES = {'linear': 'linear', 'quad': 'scaled_linear', 'cosine': 'squaredcos_cap_v2'}
_VARIANCES = {'fixedlarge': 'fixed_large', 'fixedsmall': 'fixed_small',
              'learned_range': 'learned_range'}
_MEANS = {'eps': 'epsilon', 'xstart': 'sample'}


def find_model(path: str) -> Optional[tuple[str, Optional[str]]]:
  """(UNet folder, scheduler config or None) of a DDPMPipeline or UNet2DModel folder, else None."""
  if os.path.exists(os.path.join(path, 'model_index.json')):
    scheduler = os.path.join(path, 'scheduler', 'scheduler_config.json')
    return os.path.join(path, 'unet'), scheduler if os.path.exists(scheduler) else None
  if os.path.exists(os.path.join(path, 'config.json')) and any(
      name.startswith('diffusion_pytorch_model') for name in os.listdir(path)):
    return path, None
  return None


def _read_required_json(path: str) -> dict:
  """The JSON object in `path`; a UserError if it cannot be read or is not an object."""
  try:
    with open(path, encoding='utf-8') as f:
      content = json.load(f)
  except (OSError, ValueError) as error:
    raise UserError(f'Cannot read {path} ({error}); check the diffusers folder.') from error
  if not isinstance(content, dict):
    raise UserError(f'{path} is not a JSON object (it holds a {type(content).__name__}); check '
                    f'the diffusers folder.')
  return content


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_size(value) -> bool:
  return value is None or _is_count(value) or (
      isinstance(value, list) and len(value) in (1, 2) and all(map(_is_count, value)))


# What a UNet2DModel config.json's values must be for `_unet_fields` to read them.
_UNET_TYPES = {
    'block_out_channels': (lambda v: isinstance(v, list) and bool(v) and all(map(_is_count, v)),
                           'a non-empty list of positive integers'),
    'down_block_types': (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                         'a list of block names'),
    'up_block_types': (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                       'a list of block names'),
    'layers_per_block': (_is_count, 'a positive integer'),
    'in_channels': (_is_count, 'a positive integer'),
    'out_channels': (_is_count, 'a positive integer'),
    'norm_num_groups': (_is_count, 'a positive integer'),
    'norm_eps': (_is_number, 'a number'),
    'sample_size': (_is_size, 'a positive integer (or null)'),
    'attention_head_dim': (lambda v: v is None or _is_count(v) or isinstance(v, list),
                           'a positive integer, a list of them, or null'),
    'attn_norm_num_groups': (lambda v: v is None or _is_count(v), 'a positive integer or null'),
    'time_embedding_dim': (lambda v: v is None or _is_count(v), 'a positive integer or null'),
}
_SCHEDULER_TYPES = {
    'num_train_timesteps': (_is_count, 'a positive integer'),
    'beta_start': (_is_number, 'a number'),
    'beta_end': (_is_number, 'a number'),
    'trained_betas': (lambda v: v is None or (isinstance(v, list) and all(map(_is_number, v))),
                      'a list of numbers or null'),
    'beta_schedule': (lambda v: isinstance(v, str), 'a string'),
    'variance_type': (lambda v: isinstance(v, str), 'a string'),
    'prediction_type': (lambda v: isinstance(v, str), 'a string'),
    'clip_sample': (lambda v: isinstance(v, bool), 'true or false'),
}


def _check_types(content: dict, types: dict, path: str) -> None:
  """A UserError naming the first key of `content` whose value is not of its kind."""
  for key, (allows, what) in types.items():
    if key in content and not allows(content[key]):
      raise UserError(f'{path} has {key}={content[key]!r}; it must be {what}.')


def _unet_fields(unet: dict, config, path: str = 'The diffusers UNet config') -> dict:
  """The ddpm_jax config fields a UNet2DModel config implies; UserError if none can describe it."""
  _check_types(unet, _UNET_TYPES, path)
  c = {**_UNET_DEFAULTS, **unet}
  for key, (_, ours) in _UNET_FIXED.items():
    value = c.get(key, _UNET_FIXED[key][0])
    if value != ours and not (key == 'act_fn' and value == 'swish') and not (
        key == 'norm_eps' and math.isclose(value, ours)):
      raise UserError(f'The diffusers UNet has {key}={value!r}, which ddpm_jax\'s U-Net cannot '
                      f'express (it has {ours!r}).')
  down, up = list(c['down_block_types']), list(c['up_block_types'])
  channels = list(c['block_out_channels'])
  attention = [kind == 'AttnDownBlock2D' for kind in down]
  if any(kind not in ('DownBlock2D', 'AttnDownBlock2D') for kind in down) or up != [
      'AttnUpBlock2D' if a else 'UpBlock2D' for a in attention[::-1]]:
    raise UserError(f'The diffusers UNet has blocks {down} / {up}; ddpm_jax\'s U-Net has only '
                    f'DownBlock2D/AttnDownBlock2D, mirrored by UpBlock2D/AttnUpBlock2D.')
  ch = channels[0]
  if any(width % ch for width in channels) or c['time_embedding_dim'] not in (None, 4 * ch) or \
      c['attn_norm_num_groups'] not in (None, c['norm_num_groups']):
    raise UserError(f'The diffusers UNet has block_out_channels={list(channels)}, '
                    f'time_embedding_dim={c["time_embedding_dim"]} and attn_norm_num_groups='
                    f'{c["attn_norm_num_groups"]}; ddpm_jax needs multiples of the first width, '
                    f'4x it and the norm_num_groups.')
  head_dim = c['attention_head_dim']
  if head_dim is not None and any(width != head_dim for width, a in
                                  zip(channels + [channels[-1]], attention + [True]) if a):
    raise UserError(f'The diffusers UNet has attention_head_dim={head_dim}, i.e. multi-head '
                    f'attention; ddpm_jax\'s U-Net has single-head attention (null there).')
  size = c['sample_size'] if c['sample_size'] is not None else config.data.image_size
  size = size[0] if isinstance(size, (list, tuple)) else size
  learned = config.diffusion.model_var_type.startswith('learned')
  return {'data.image_size': size, 'data.channels': c['in_channels'],
          'model.ch': ch, 'model.ch_mult': tuple(width // ch for width in channels),
          'model.num_res_blocks': c['layers_per_block'],
          'model.attn_resolutions': tuple(size // 2**i for i, a in enumerate(attention) if a),
          'model.num_groups': c['norm_num_groups'],
          'output channels': c['out_channels'] // (2 if learned else 1)}


def _config_value(config, field: str):
  if field == 'output channels':
    return config.data.channels
  section, name = field.split('.')
  value = config[section][name]
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _warn_differences(source: str, implied: dict, config) -> None:
  for field, value in implied.items():
    ours = _config_value(config, field)
    if value != ours and not (isinstance(value, float) and math.isclose(value, ours)):
      logging.warning('%s has %s=%s but the config has %s.', source, field, value, ours)


def check_scheduler(scheduler: dict, config) -> None:
  """One warning line per difference of a DDPMScheduler config from the config's diffusion."""
  d, s = config.diffusion, {'num_train_timesteps': 1000, 'beta_start': 1e-4, 'beta_end': 0.02,
                            'beta_schedule': 'linear', 'variance_type': 'fixed_small',
                            'prediction_type': 'epsilon', 'clip_sample': True, **scheduler}
  ours = scheduler_config(config, check=False)
  if s.get('trained_betas') is not None:
    betas = diffusion_lib.betas_from_config(config)
    if len(s['trained_betas']) != len(betas) or not np.allclose(s['trained_betas'], betas,
                                                                rtol=1e-5):
      logging.warning('The diffusers scheduler\'s trained_betas differ from the config\'s '
                      'diffusion.beta_schedule=%s.', d.beta_schedule)
    keys = ('num_train_timesteps', 'variance_type', 'prediction_type', 'clip_sample')
  else:
    keys = ('num_train_timesteps', 'beta_schedule', 'beta_start', 'beta_end', 'variance_type',
            'prediction_type', 'clip_sample')
  equivalent = {'fixed_small_log': 'fixed_small', 'fixed_large_log': 'fixed_large'}
  for key in keys:
    theirs, mine = equivalent.get(s[key], s[key]), ours.get(key)
    if key in ('beta_start', 'beta_end') and d.beta_schedule == 'cosine':
      continue
    if theirs != mine and not (isinstance(theirs, float) and math.isclose(theirs, mine)):
      logging.warning('The diffusers scheduler has %s=%r but the config implies %r.', key, theirs,
                      mine)
  if s.get('thresholding'):
    logging.warning('The diffusers scheduler thresholds its x_0 predictions; ddpm_jax clips them.')


def scheduler_config(config, *, check: bool = True) -> dict:
  """The DDPMScheduler config of the config's diffusion and sampling sections.

  `check`: a UserError for a diffusion the scheduler cannot run (an x_{t-1} predicting model, the
  authors' learned log-variance); without it such fields are None.
  """
  d = config.diffusion
  mean, variance = _MEANS.get(d.model_mean_type), _VARIANCES.get(d.model_var_type)
  if check and (mean is None or variance is None):
    raise UserError(f'diffusers\' DDPMScheduler has no equivalent of diffusion.model_mean_type='
                    f'{d.model_mean_type!r} or diffusion.model_var_type={d.model_var_type!r}.')
  out = {'_class_name': 'DDPMScheduler', '_diffusers_version': DIFFUSERS_VERSION,
         'num_train_timesteps': d.num_timesteps, 'beta_start': d.beta_start,
         'beta_end': d.beta_end, 'beta_schedule': _SCHEDULES.get(d.beta_schedule, 'linear'),
         'trained_betas': None, 'variance_type': variance, 'prediction_type': mean,
         'clip_sample': bool(config.sampling.clip_denoised), 'clip_sample_range': 1.0,
         'thresholding': False}
  if d.beta_schedule not in _SCHEDULES:
    out['trained_betas'] = diffusion_lib.betas_from_config(config).tolist()
  return out


def unet_config(config) -> dict:
  """The UNet2DModel config.json of the config's U-Net; UserError if it cannot express it."""
  m, d = config.model, config.data
  if not m.resamp_with_conv:
    raise UserError('UNet2DModel always resamples with convolutions; ddpm_jax\'s '
                    'model.resamp_with_conv=False cannot be exported.')
  scheduler_config(config)  # the same check for the diffusion section
  levels = [d.image_size // 2**i in m.attn_resolutions for i in range(len(m.ch_mult))]
  learned = config.diffusion.model_var_type.startswith('learned')
  fixed = {key: ours for key, (_, ours) in _UNET_FIXED.items()}
  return {'_class_name': 'UNet2DModel', '_diffusers_version': DIFFUSERS_VERSION, **fixed,
          'sample_size': d.image_size, 'in_channels': d.channels,
          'out_channels': d.channels * (2 if learned else 1), 'layers_per_block': m.num_res_blocks,
          'block_out_channels': [m.ch * mult for mult in m.ch_mult],
          'down_block_types': ['AttnDownBlock2D' if a else 'DownBlock2D' for a in levels],
          'up_block_types': ['AttnUpBlock2D' if a else 'UpBlock2D' for a in levels[::-1]],
          'norm_num_groups': m.num_groups, 'dropout': m.dropout, 'attention_head_dim': None,
          'attn_norm_num_groups': None, 'time_embedding_dim': None}


def diffusers_key(path: names.Path, num_levels: int) -> tuple[str, str]:
  """(state-dict key, layout) of a flax path; layout: conv, linear, conv1x1 or vector."""
  module, *inner, leaf = path
  match = re.fullmatch(r'(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?', module)
  if match:
    side, level, kind, index = match.groups()
    level = int(level) if side == 'down' else num_levels - 1 - int(level)
    part = {'block': f'resnets.{index}', 'attn': f'attentions.{index}',
            'downsample': 'downsamplers.0', 'upsample': 'upsamplers.0'}[kind]
    prefix = f'{side}_blocks.{level}.{part}'
  else:
    prefix = {'temb_dense0': 'time_embedding.linear_1', 'temb_dense1': 'time_embedding.linear_2',
              'norm_out': 'conv_norm_out', 'mid_block_1': 'mid_block.resnets.0',
              'mid_attn_1': 'mid_block.attentions.0', 'mid_block_2': 'mid_block.resnets.1'
              }.get(module, module)
  renamed = _ATTENTION if 'attn' in module else _RESNET
  key = '.'.join([prefix, *(renamed.get(name, name) for name in inner),
                  'bias' if leaf == 'bias' else 'weight'])
  if leaf != 'kernel':
    return key, 'vector'
  if inner and inner[-1] == 'nin_shortcut':
    return key, 'conv1x1'
  return key, 'linear' if module.startswith('temb') or 'attn' in module or \
      inner[-1:] == ['temb_proj'] else 'conv'


def torch_shape(layout: str, shape: tuple) -> tuple:
  """The torch shape of a flax parameter of `shape`."""
  if layout == 'conv':
    return (shape[3], shape[2], shape[0], shape[1])
  if layout == 'linear':
    return (shape[1], shape[0])
  if layout == 'conv1x1':
    return (shape[1], shape[0], 1, 1)
  return tuple(shape)


def to_flax(layout: str, array: np.ndarray) -> np.ndarray:
  if layout == 'conv':
    return array.transpose(2, 3, 1, 0)
  if layout in ('linear', 'conv1x1'):
    return array.reshape(array.shape[:2]).T
  return array


def to_torch(layout: str, array: np.ndarray) -> np.ndarray:
  array = np.asarray(array)
  if layout == 'conv':
    array = array.transpose(3, 2, 0, 1)
  elif layout == 'linear':
    array = array.T
  elif layout == 'conv1x1':
    array = array.T[:, :, None, None]
  return np.ascontiguousarray(array)


def _flax_shape(layout: str, shape: tuple) -> tuple:
  """The flax shape of a torch tensor of `shape` (for messages)."""
  if layout == 'conv' and len(shape) == 4:
    return (shape[2], shape[3], shape[1], shape[0])
  if layout in ('linear', 'conv1x1') and len(shape) >= 2:
    return (shape[1], shape[0])
  return tuple(shape)


def read(path: str, config) -> dict:
  """{flax path: float32 array} of a diffusers folder; a warning line per config difference."""
  from safetensors import SafetensorError, numpy as safetensors_numpy
  unet_dir, scheduler_path = find_model(path)
  unet_json = os.path.join(unet_dir, 'config.json')
  implied = _unet_fields(_read_required_json(unet_json), config, unet_json)
  _warn_differences(f'The diffusers model {path}', implied, config)
  if scheduler_path:
    scheduler = _read_required_json(scheduler_path)
    _check_types(scheduler, _SCHEDULER_TYPES, scheduler_path)
    check_scheduler(scheduler, config)
  weights_path = os.path.join(unet_dir, WEIGHTS)
  if not os.path.exists(weights_path):
    raise UserError(f'{unet_dir} has no {WEIGHTS}; download the safetensors weights of the model '
                    f'(ddpm_jax reads no torch pickles).')
  try:
    tensors = safetensors_numpy.load_file(weights_path)
  except (SafetensorError, OSError, TypeError) as error:
    raise UserError(f'Cannot read {weights_path} ({error}); download it again.') from error
  what = f'the diffusers model {path}'
  expected = names.param_shapes(config)
  keys, missing = {}, []
  for flax_path in expected:
    key, layout = diffusers_key(flax_path, len(config.model.ch_mult))
    legacy = re.sub(r'\.(to_q|to_k|to_v|to_out\.0)\.',
                    lambda m: f'.{_LEGACY_ATTENTION[m.group(1)]}.', key)
    key = key if key in tensors or legacy not in tensors else legacy
    keys[flax_path] = key, layout
    if key not in tensors:
      missing.append((key, flax_path))
  names.check_names(what, missing, set(tensors) - {key for key, _ in keys.values()})
  params = {}
  for flax_path, shape in expected.items():
    key, layout = keys[flax_path]
    array = tensors[key]
    needed = torch_shape(layout, shape)
    if layout == 'linear' and array.ndim == 4 and array.shape[2:] == (1, 1):
      needed = needed + (1, 1)  # a 1x1 conv stored for a linear layer
    names.check_shape(what, key, flax_path, array.shape, needed,
                             (shape, _flax_shape(layout, array.shape)))
    params[flax_path] = to_flax(layout, array.astype(np.float32))
  return params


def write(out: str, config, ema_params: dict) -> str:
  """Writes a DDPMPipeline folder of flat EMA parameters to `out` (local or gs://); returns it."""
  from safetensors import numpy as safetensors_numpy
  unet = unet_config(config)
  tensors = {}
  for flax_path, array in ema_params.items():
    key, layout = diffusers_key(flax_path, len(config.model.ch_mult))
    tensors[key] = to_torch(layout, np.asarray(array, np.float32))
  folder = epath.Path(out)
  for sub in ('unet', 'scheduler'):
    (folder / sub).mkdir(parents=True)
  (folder / 'unet' / WEIGHTS).write_bytes(
      safetensors_numpy.save(tensors, metadata={'format': 'pt'}))
  for name, content in (('model_index.json', {
      '_class_name': 'DDPMPipeline', '_diffusers_version': DIFFUSERS_VERSION,
      'scheduler': ['diffusers', 'DDPMScheduler'], 'unet': ['diffusers', 'UNet2DModel']}),
                        ('unet/config.json', unet),
                        ('scheduler/scheduler_config.json', scheduler_config(config))):
    (folder / name).write_text(json.dumps(content, indent=2, sort_keys=True))
  return out
