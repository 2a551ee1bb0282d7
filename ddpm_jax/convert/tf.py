"""Reads the authors' TF1 checkpoints (`diffusion_tf`, Ho et al. 2020) as ddpm_jax weights.

Their `unet.model(..., name='model')` stores every weight under `model/`: scopes `temb/dense0`,
`conv_in`, `down_<i>/block_<j>/{norm1,conv1,temb_proj,norm2,conv2,nin_shortcut}`,
`down_<i>/attn_<j>/{norm,q,k,v,proj_out}`, `down_<i>/downsample/conv`,
`mid/{block_1,attn_1,block_2}`, `up_<i>/...`, `up_<i>/upsample/conv`, `norm_out`, `conv_out`.
Convolutions and dense layers hold `W` (conv [kh, kw, in, out], dense and 1x1 `nin` [in, out], as
flax's kernels) and `b`; `tf.contrib.layers.group_norm` holds `gamma` and `beta`. Training adds
the `tf.train.ExponentialMovingAverage` shadows `<var>/ExponentialMovingAverage` (what their
evaluation samples with), Adam's slots `<var>/Adam` and `<var>/Adam_1`, `beta1_power`,
`beta2_power` and `global_step`. The checkpoint is read with `tf.train.load_checkpoint`; no TF
graph is built.
"""
import os
import re
from typing import Optional

import numpy as np
from absl import logging

from ddpm_jax.convert import names
from ddpm_jax.errors import UserError

EMA, ADAM_M, ADAM_V = 'ExponentialMovingAverage', 'Adam', 'Adam_1'
BOOKKEEPING = ('global_step', 'beta1_power', 'beta2_power')
_CHECKPOINT_SUFFIXES = re.compile(r'\.(index|meta|data-\d+-of-\d+)$')


def _step_of(prefix: str) -> int:
  match = re.search(r'-(\d+)$', prefix)
  return int(match.group(1)) if match else -1


def checkpoint_prefix(path: str) -> Optional[str]:
  """The TF checkpoint that `path` names: a prefix, one of its files, or a directory's latest.

  A directory's latest is the one its `checkpoint` file names (looked up beside it: the file may
  hold the path of the bucket it was trained in), else the highest-numbered `*.index`.
  """
  import tensorflow as tf
  if not os.path.isdir(path):
    prefix = _CHECKPOINT_SUFFIXES.sub('', path)
    return prefix if os.path.exists(prefix + '.index') else None
  prefixes = sorted((name[:-len('.index')] for name in os.listdir(path) if name.endswith('.index')),
                    key=_step_of)
  state = tf.train.get_checkpoint_state(path)  # None without a `checkpoint` file
  named = os.path.basename(state.model_checkpoint_path) if state else None
  if named in prefixes:
    return os.path.join(path, named)
  return os.path.join(path, prefixes[-1]) if prefixes else None


def tf_name(path: names.Path) -> str:
  """The authors' variable of a flax path, e.g. model/down_0/block_1/conv1/W."""
  module, *inner, leaf = path
  scope = re.sub(r'^(down|up)_(\d+)_', r'\1_\2/', module)
  scope = re.sub(r'^(mid|temb)_', r'\1/', scope)
  if names.is_group_norm(path):
    leaf = {'scale': 'gamma', 'bias': 'beta'}[leaf]
  else:
    leaf = {'kernel': 'W', 'bias': 'b'}[leaf]
  return '/'.join(['model', scope, *inner, leaf])


def _split_names(names) -> tuple[set, dict[str, set], list]:
  """(model variables, {slot: base names}, other variables) of a checkpoint's names."""
  variables, slots, others = set(), {EMA: set(), ADAM_M: set(), ADAM_V: set()}, []
  for name in names:
    base, _, slot = name.rpartition('/')
    if name.startswith('model/') and slot in slots:
      slots[slot].add(base)
    elif name.startswith('model/'):
      variables.add(name)
    elif name not in BOOKKEEPING:
      others.append(name)
  return variables, slots, others


def _read_tensor(reader, prefix: str, name: str, dtype=np.float32) -> np.ndarray:
  """Variable `name` as `dtype`; a UserError if its bytes are damaged or it is not finite."""
  import tensorflow as tf
  try:
    value = np.asarray(reader.get_tensor(name), dtype)
  except (tf.errors.OpError, IndexError, ValueError) as error:  # IndexError: a short .data file
    message = getattr(error, 'message', None) or str(error)
    raise UserError(f'The TF checkpoint {prefix} is damaged: reading {name} failed '
                    f'({type(error).__name__}: {" ".join(message.split())[:200]}); download '
                    f'its .data and .index files again.') from None
  if not np.isfinite(value).all():
    raise UserError(f'The TF checkpoint {prefix} holds NaN or infinite values in {name}; it '
                    f'cannot be imported (take an earlier checkpoint of that run).')
  return value


def read(prefix: str, config) -> names.Weights:
  """The weights of checkpoint `prefix` for the config's model; UserError on any mismatch."""
  import tensorflow as tf
  try:
    reader = tf.train.load_checkpoint(prefix)
  except (tf.errors.OpError, ValueError) as error:
    raise UserError(f'Cannot read the TF checkpoint {prefix} ({type(error).__name__}); check that '
                    f'its .index and .data files are complete.') from error
  shapes = reader.get_variable_to_shape_map()
  what = f'the TF checkpoint {prefix}'
  variables, slots, others = _split_names(shapes)
  expected = names.param_shapes(config)
  tf_names = {path: tf_name(path) for path in expected}
  names.check_names(what, [(tf_names[p], p) for p in expected if tf_names[p] not in variables],
                    variables - set(tf_names.values()))
  slot_names = {base + '/' + slot for slot, bases in slots.items() for base in bases}
  names.check_names(what, [], slot_names - {n + '/' + s for n in tf_names.values()
                                            for s in slots})
  for path, shape in expected.items():
    names.check_shape(what, tf_names[path], path, shapes[tf_names[path]], shape,
                      (shape, tuple(shapes[tf_names[path]])))
  if others:
    logging.warning('Ignoring %d variables of %s outside the model, e.g. %s.', len(others),
                    prefix, others[0])
  if config.model.num_groups != 32:
    logging.warning('The authors\' models normalise with 32 GroupNorm groups but the config has '
                    'model.num_groups=%d; the converted model will compute differently.',
                    config.model.num_groups)

  def tensors(suffix=''):
    return {path: _read_tensor(reader, prefix, name + suffix) for path, name in tf_names.items()}

  params = tensors()
  have_ema = {name in slots[EMA] for name in tf_names.values()}
  if have_ema == {False}:
    logging.warning('%s has no EMA shadows; the EMA weights are set to the raw ones.', prefix)
    ema_params = params
  elif have_ema == {True}:
    ema_params = tensors('/' + EMA)
  else:
    name = next(n for n in tf_names.values() if n not in slots[EMA])
    raise UserError(f'{what} has no {name}/{EMA} but holds other EMA shadows; it is incomplete.')
  with_adam = all(n in slots[ADAM_M] and n in slots[ADAM_V] for n in tf_names.values())
  if not with_adam:
    logging.info('%s lacks Adam slots for some variables; the optimizer starts afresh.', prefix)
  step = (int(_read_tensor(reader, prefix, 'global_step', np.int64)) if 'global_step' in shapes
          else 0)
  return names.Weights(params=params, ema_params=ema_params,
                       adam_mu=tensors('/' + ADAM_M) if with_adam else None,
                       adam_nu=tensors('/' + ADAM_V) if with_adam else None, step=step)
