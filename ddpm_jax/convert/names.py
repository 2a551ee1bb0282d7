"""What the U-Net's parameters are called elsewhere; the errors of a name or shape mismatch.

Our parameters are addressed by their flax paths, e.g. `('down_0_block_1', 'conv1', 'kernel')`.
`convert/tf.py` and `convert/diffusers.py` map these paths to the authors' TF variable names and to
diffusers' state-dict keys; this module holds what both need: the flat parameter template of a
config, the checks that a source has exactly the model's weights, and the config field that a
mismatch probably comes from.
"""
import dataclasses
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from ddpm_jax import unet
from ddpm_jax.errors import UserError

Path = tuple[str, ...]


@dataclasses.dataclass
class Weights:
  """A source's weights by flax path: raw, EMA, Adam moments (None if absent) and step."""
  params: dict
  ema_params: dict
  adam_mu: Optional[dict]
  adam_nu: Optional[dict]
  step: int


def param_shapes(config) -> dict[Path, tuple[int, ...]]:
  """{flax path: shape} of the config's U-Net, in the order the model creates them."""
  d = config.data
  template = jax.eval_shape(lambda: unet.create_model(config).init(
      jax.random.PRNGKey(0), jnp.zeros((1, d.image_size, d.image_size, d.channels)),
      jnp.zeros((1,), jnp.int32), train=False)['params'])
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(template).items()}


def unflatten(flat: dict[Path, object]) -> dict:
  return traverse_util.unflatten_dict(flat)


def flatten(params) -> dict[Path, object]:
  return traverse_util.flatten_dict(params)


def is_group_norm(path: Path) -> bool:
  return path[-2].startswith('norm')


def structure_hint(name: str) -> str:
  """The config field that probably makes a weight exist in one model and not in the other."""
  if 'attn' in name or 'attention' in name:
    return 'model.attn_resolutions'
  if 'sample' in name:
    return 'model.ch_mult or model.resamp_with_conv'
  if 'shortcut' in name:
    return 'model.ch_mult'
  return 'model.num_res_blocks or model.ch_mult'


def shape_hint(path: Path, expected: tuple, got: tuple) -> str:
  """The config field that probably differs when `path` has shape `got` instead of `expected`."""
  if len(expected) != len(got):
    return 'the model'
  module = path[0]
  if module == 'conv_in' and len(got) == 4 and got[2] != expected[2]:
    return 'data.channels'
  if module == 'conv_out' and got[-1] != expected[-1]:
    return 'data.channels or diffusion.model_var_type'
  if module.startswith('temb') or module == 'conv_in':
    return 'model.ch'
  return 'model.ch_mult'


def _capitalized(text: str) -> str:
  return text[:1].upper() + text[1:]


def check_names(what: str, missing: Iterable[tuple[str, Path]], extra: Iterable[str]) -> None:
  """UserError for the first weight of the model missing from `what`, or the first extra one.

  `missing`: (source name, flax path) of model weights the source lacks; `extra`: source names
  that no model weight maps to.
  """
  missing, extra = list(missing), sorted(extra)
  if missing:
    name, path = missing[0]
    raise UserError(f'{_capitalized(what)} has no {name}, which this config\'s model needs '
                    f'for {"/".join(path)}; {structure_hint(name)} probably differs.')
  if extra:
    raise UserError(f'{_capitalized(what)} holds {extra[0]}, which this config\'s model has '
                    f'no place for; {structure_hint(extra[0])} probably differs.')


def check_shape(what: str, name: str, path: Path, source_shape: tuple, needed_shape: tuple,
                flax_shapes: tuple[tuple, tuple]) -> None:
  """UserError when source weight `name` has a shape other than the model's, both as stored.

  `flax_shapes`: (the model's shape, the source's shape) in the model's own layout, for the hint.
  """
  if tuple(source_shape) != tuple(needed_shape):
    raise UserError(f'{name} has shape {tuple(source_shape)} in {what} but this config\'s model '
                    f'needs {tuple(needed_shape)}; {shape_hint(path, *flax_shapes)} probably '
                    f'differs.')
