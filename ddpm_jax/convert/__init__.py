"""Pretrained models: import the authors' TF checkpoints or diffusers' models; export to diffusers.

  python -m ddpm_jax.convert --config=configs/cifar10.py --workdir=DIR --from=PATH
  python -m ddpm_jax.convert --config=configs/cifar10.py --workdir=DIR --to_diffusers=OUT

Three sources and one destination: `tf.py` (the authors' TF checkpoints), `diffusers.py`
(diffusers' folders, both ways), `names.py` (the parameter names and the mismatch errors).

`--from=PATH`: a TF checkpoint (a directory with a `checkpoint` file, whose latest checkpoint is
used, or a prefix such as `.../model.ckpt-790000`) or a diffusers `DDPMPipeline` / `UNet2DModel`
folder. It becomes an ordinary training checkpoint `DIR/checkpoints/<step>/`: `params` the raw
weights, `ema_params` the EMA weights (diffusers models have one set: both), `step` TF's
`global_step` (0 for diffusers), Adam's moments from TF's slots when every variable has them
(otherwise a fresh optimizer state) and a fresh `rng`; `--mode=sample|eval` and resumed training
use it as they would one of their own. The checkpoint is written as training writes its own
(Orbax: into a temporary folder, renamed when complete), so nothing partial is ever taken for a
checkpoint; a partial one that a killed import left is removed by the next import (with a
warning naming it) and named by the sample and eval jobs' "no checkpoint" sentence. SIGTERM
or Ctrl-C before the write stops at once with nothing written (status 75, rerun the same
command); during the write, the write is completed first and a warning says so.

`--to_diffusers=OUT` writes the EMA weights of the newest checkpoint (or
`--config.sampling.step`) as a `DDPMPipeline` folder, local or gs://. Bad input (a
PATH that is neither format, weights that do not fit the config's model, a workdir that already
has a checkpoint, an OUT that is not empty) is one sentence on stderr, exit status 1, nothing
written.
"""
import contextlib
import os
import signal
import threading
from typing import Iterator, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from ddpm_jax import checkpointing, errors, train_step
from ddpm_jax.convert import diffusers, names, tf
from ddpm_jax.errors import UserError


def _check_no_checkpoint(workdir) -> None:
  """A UserError if WORKDIR has a checkpoint; partial ones of killed runs are removed."""
  directory = checkpointing.checkpoint_dir(workdir)
  for leftover in checkpointing.unfinished_saves(workdir):
    leftover.rmtree()
    logging.warning('Removed %s, the partial checkpoint of an import or save that never '
                    'completed.', leftover)
  if directory.exists() and any(directory.iterdir()):
    raise UserError(f'{directory} already holds checkpoints; import into an empty --workdir '
                    f'(nothing was overwritten).')


@contextlib.contextmanager
def _signals_stop_before_writing(workdir, path: str) -> Iterator[dict]:
  """Yields {'writing': False, 'received': ''}. SIGTERM or Ctrl-C raises `errors.Interrupted`
  while 'writing' is False; once it is True, they only set 'received' to the signal's name and
  the write finishes (a half-written checkpoint would be of no use)."""
  state = {'writing': False, 'received': ''}
  if threading.current_thread() is not threading.main_thread():  # signals reach the main thread
    yield state
    return

  def on_signal(signum, frame):
    del frame
    name = signal.Signals(signum).name
    if state['writing']:
      state['received'] = state['received'] or name
      return
    errors.interrupt(errors.Interrupted(
        f'Stopped by {name} before anything was written: {workdir} holds no checkpoint; rerun '
        f'the same command to import {path}.'))

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield state
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    errors.clear_interrupt()  # the caller handles the Interrupted raised


def read_weights(config, path: str) -> names.Weights:
  """The weights at `path` (a TF checkpoint or a diffusers folder) for the config's model."""
  if not os.path.exists(path) and not os.path.exists(path + '.index'):
    raise UserError(f'--from={path} does not exist; pass a TF checkpoint or a diffusers folder.')
  prefix = tf.checkpoint_prefix(path)
  if prefix is not None:
    return tf.read(prefix, config)
  if os.path.isdir(path) and diffusers.find_model(path) is not None:
    params = diffusers.read(path, config)
    return names.Weights(params=params, ema_params=params, adam_mu=None, adam_nu=None,
                              step=0)
  raise UserError(f'--from={path} is neither a TF checkpoint (a directory with a `checkpoint` '
                  f'file, or a prefix with a .index file) nor a diffusers folder (model_index.json '
                  f'or config.json with {diffusers.WEIGHTS}).')


def train_state(config, weights: names.Weights) -> train_step.TrainState:
  """The TrainState training would have at `weights.step` (Adam's counts set to it)."""
  params = names.unflatten({p: jnp.asarray(a) for p, a in weights.params.items()})
  opt_state = train_step.make_optimizer(config).init(params)
  if weights.adam_mu is not None:
    moments = {name: names.unflatten({p: jnp.asarray(a) for p, a in flat.items()})
               for name, flat in (('mu', weights.adam_mu), ('nu', weights.adam_nu))}
    opt_state = optax.tree_utils.tree_set(opt_state, **moments,
                                          count=jnp.asarray(weights.step, jnp.int32))
  rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]  # as create_train_state's
  return train_step.TrainState(
      step=jnp.asarray(weights.step, jnp.int32), params=params,
      ema_params=names.unflatten({p: jnp.asarray(a) for p, a in
                                         weights.ema_params.items()}),
      opt_state=opt_state, rng=rng)


def import_checkpoint(config, workdir, path: str) -> int:
  """Writes the weights at `path` as WORKDIR's checkpoint; returns its step."""
  with _signals_stop_before_writing(workdir, path) as stop:
    _check_no_checkpoint(workdir)
    logging.info('Importing %s into %s.', path, checkpointing.checkpoint_dir(workdir))
    state = train_state(config, read_weights(config, path))
    step = int(state.step)
    manager = checkpointing.create_manager(workdir, config.training, trained_as=config,
                                           written_by='convert')
    stop['writing'] = True
    errors.raise_if_interrupted()  # a signal whose raise a callback swallowed: nothing written
    try:
      checkpointing.save(manager, step, flax.serialization.to_state_dict(state))
    except checkpointing.NonFiniteError as error:
      raise UserError(f'The weights at {path} hold NaN or infinite values ({error}); they '
                      f'cannot be imported.') from None
    finally:
      manager.wait_until_finished()
      manager.close()
  written = f'{checkpointing.checkpoint_dir(workdir)}/{step}'
  if stop['received']:
    logging.warning('%s arrived while the checkpoint was being written; it was completed '
                    'first: %s holds all of %s.', stop['received'], written, path)
  logging.info('Wrote %s from %s.', written, path)
  return step


def export_diffusers(config, workdir, out: str) -> str:
  """Writes the EMA weights of a WORKDIR checkpoint as a DDPMPipeline folder `out`."""
  diffusers.unet_config(config)  # a UserError before reading anything
  folder = epath.Path(out)
  if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
    raise UserError(f'--to_diffusers={out} exists and is not an empty folder; choose a new one.')
  shapes = names.param_shapes(config)
  template = names.unflatten({p: np.zeros(s, np.float32) for p, s in shapes.items()})
  step = config.sampling.step
  found, ema_params = checkpointing.restore_ema_params(workdir, template,
                                                       None if step < 0 else step, config=config)
  diffusers.write(out, config, names.flatten(ema_params))
  logging.info('Wrote the EMA weights of step %d to %s.', found, out)
  return out


def run(config, workdir, *, from_path: str = '', to_diffusers: str = '') -> Optional[str]:
  if bool(from_path) == bool(to_diffusers):
    raise UserError('Pass exactly one of --from=PATH (import) and --to_diffusers=OUT (export).')
  if from_path:
    import_checkpoint(config, workdir, from_path)
    return None
  return export_diffusers(config, workdir, to_diffusers)
