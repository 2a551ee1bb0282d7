"""ddpm_jax.convert against the authors' TF model and diffusers' UNet2DModel.

The references come from the frameworks themselves: tests/fixtures/make_tf_fixture.py ran the
authors' `diffusion_tf` model code and make_diffusers_fixture.py ran diffusers (neither is needed
here). The checkpoints are rebuilt here from the committed manifests with the fixtures' value
generators, so the inputs are byte for byte those the frameworks saw.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import cifar10, lsun_church256
from ddpm_jax import checkpointing, cli, convert, parallel, sample_job, train, unet
from ddpm_jax.convert import names as weight_names
from ddpm_jax.errors import UserError
from tests.conftest import signal_when_collected

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')


def _module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(FIXTURES, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


MAKE_TF, MAKE_DIFFUSERS = _module('make_tf_fixture'), _module('make_diffusers_fixture')


def _relative_error(out, reference):
  return float(np.abs(np.asarray(out) - reference).max() / np.abs(reference).max())


def _tf_fixture(arch):
  fixture = np.load(os.path.join(FIXTURES, f'tf_unet_{arch}.npz'))
  config = (cifar10 if arch == 'cifar10' else lsun_church256).get_config()
  config.model.ch = int(fixture['ch'])
  assert tuple(config.model.ch_mult) == tuple(fixture['ch_mult'])
  assert tuple(config.model.attn_resolutions) == tuple(fixture['attn_resolutions'])
  assert config.data.image_size == int(fixture['image_size'])
  return fixture, config, json.loads(fixture['manifest'].item())


def _tf_checkpoint(directory, manifest):
  import tensorflow as tf
  os.makedirs(str(directory), exist_ok=True)
  prefix = MAKE_TF.write_checkpoint(os.path.join(str(directory), 'model.ckpt-4321'), manifest)
  assert [[n, list(s)] for n, s in tf.train.list_variables(prefix)] == sorted(
      [n, s] for n, s, _ in manifest)
  return prefix


def _apply(config, params, fixture):
  return unet.create_model(config).apply({'params': params}, fixture['x'], fixture['t'])


@pytest.fixture(scope='module')
def tf_cifar10(tmp_path_factory):
  """(fixture, config, manifest, TF checkpoint prefix, converted workdir)."""
  fixture, config, manifest = _tf_fixture('cifar10')
  prefix = _tf_checkpoint(tmp_path_factory.mktemp('tf'), manifest)
  workdir = str(tmp_path_factory.mktemp('converted') / 'workdir')
  assert convert.import_checkpoint(config, workdir, prefix) == MAKE_TF.GLOBAL_STEP
  return fixture, config, manifest, prefix, workdir


def test_tf_cifar10_reproduces_the_authors_raw_and_ema_outputs(tf_cifar10):
  fixture, config, _, _, workdir = tf_cifar10
  state = checkpointing.restore_state_dict(workdir)
  raw, ema = _apply(config, state['params'], fixture), _apply(config, state['ema_params'], fixture)
  assert _relative_error(raw, fixture['out_raw']) < 1e-4
  assert _relative_error(ema, fixture['out_ema']) < 1e-4
  assert _relative_error(raw, fixture['out_ema']) > 0.05  # the two sets really differ


def test_tf_import_takes_adam_moments_and_the_step(tf_cifar10):
  _, config, _, _, workdir = tf_cifar10
  state = checkpointing.restore_state_dict(workdir)
  assert int(state['step']) == MAKE_TF.GLOBAL_STEP
  adam, schedule = state['opt_state']['1']['0'], state['opt_state']['1']['1']
  assert int(adam['count']) == int(schedule['count']) == MAKE_TF.GLOBAL_STEP
  name = 'model/down_1/attn_0/q/W'
  for moment, slot in (('mu', 'Adam'), ('nu', 'Adam_1')):
    expected = MAKE_TF.variable_value(f'{name}/{slot}', (64, 64), 'float32')
    np.testing.assert_array_equal(adam[moment]['down_1_attn_0']['q']['kernel'], expected)
  np.testing.assert_array_equal(state['params']['down_1_attn_0']['q']['kernel'],
                                MAKE_TF.variable_value(name, (64, 64), 'float32'))
  assert state['rng'].shape == (2,)


def test_an_imported_checkpoint_records_what_it_is_trained_as(tf_cifar10):
  """Issue 21: what `--mode=sample|eval` and resumed training compare their config with."""
  from ddpm_jax import checkpoint_settings
  _, config, _, _, workdir = tf_cifar10
  assert checkpointing.trained_as(workdir, MAKE_TF.GLOBAL_STEP) == (
      checkpoint_settings.record(config), 'convert')


def test_a_converted_workdir_resumes_training_and_samples(tf_cifar10):
  _, config, _, _, workdir = tf_cifar10
  config = config.copy_and_resolve_references()
  mesh = parallel.make_mesh()
  manager = checkpointing.create_manager(workdir, config.training)
  try:
    state = train.restore_or_create_train_state(config, workdir, mesh, manager)
  finally:
    manager.close()
  assert int(state.step) == MAKE_TF.GLOBAL_STEP
  config.sampling.num_steps = 3  # the imported model's 1000-step chain, respaced (T is its own)
  config.sampling.num_samples = config.sampling.batch_size = 8
  paths = sample_job.sample_from_workdir(config, workdir)
  samples = np.load(paths['samples_npz'])['samples']
  assert samples.shape == (8, 32, 32, 3) and samples.dtype == np.uint8 and samples.std() > 0


@pytest.mark.slow
def test_tf_256_reproduces_the_authors_raw_and_ema_outputs(tmp_path):
  fixture, config, manifest = _tf_fixture('256')
  weights = convert.read_weights(config, _tf_checkpoint(tmp_path, manifest))
  assert weights.step == MAKE_TF.GLOBAL_STEP and weights.adam_mu is not None
  for params, key in ((weights.params, 'out_raw'), (weights.ema_params, 'out_ema')):
    assert _relative_error(_apply(config, weight_names.unflatten(params), fixture),
                           fixture[key]) < 1e-4


def _diffusers_folder(directory, *, legacy_attention=False):
  fixture = np.load(os.path.join(FIXTURES, 'diffusers_cifar10.npz'))
  folder = os.path.join(str(directory), 'pipeline')
  shutil.copytree(MAKE_DIFFUSERS.FOLDER, folder)
  path = MAKE_DIFFUSERS.write_weights(folder, json.loads(fixture['manifest'].item()))
  if legacy_attention:  # the names of diffusers < 0.15 (AttentionBlock)
    from safetensors import numpy as safetensors_numpy
    renames = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
    tensors = {}
    for key, value in safetensors_numpy.load_file(path).items():
      for new, old in renames.items():
        key = key.replace(f'.{new}.', f'.{old}.')
      tensors[key] = value
    assert any('.query.' in key for key in tensors)
    safetensors_numpy.save_file(tensors, path)
  config = cifar10.get_config()
  config.model.ch = 32
  return fixture, config, folder


@pytest.mark.parametrize('legacy_attention', [False, True])
def test_diffusers_import_reproduces_diffusers_outputs(tmp_path, legacy_attention):
  fixture, config, folder = _diffusers_folder(tmp_path, legacy_attention=legacy_attention)
  weights = convert.read_weights(config, folder)
  assert weights.step == 0 and weights.adam_mu is None and weights.ema_params is weights.params
  out = _apply(config, weight_names.unflatten(weights.params), fixture)
  assert _relative_error(out, fixture['out']) < 1e-4


def test_export_then_import_gives_back_the_same_parameters(tf_cifar10, tmp_path):
  _, config, _, _, workdir = tf_cifar10
  out = convert.export_diffusers(config, workdir, str(tmp_path / 'pipeline'))
  with open(os.path.join(out, 'unet', 'config.json'), encoding='utf-8') as f:
    exported = json.load(f)
  assert {k: exported[k] for k in MAKE_DIFFUSERS.UNET_CONFIG} == MAKE_DIFFUSERS.UNET_CONFIG
  with open(os.path.join(out, 'scheduler', 'scheduler_config.json'), encoding='utf-8') as f:
    scheduler = json.load(f)
  assert {k: scheduler[k] for k in MAKE_DIFFUSERS.SCHEDULER_CONFIG} == \
      MAKE_DIFFUSERS.SCHEDULER_CONFIG
  back = convert.read_weights(config, out).params
  ema = weight_names.flatten(checkpointing.restore_state_dict(workdir)['ema_params'])
  assert back.keys() == ema.keys()
  for path, value in ema.items():
    np.testing.assert_array_equal(back[path], value, err_msg=str(path))


def _assert_refused(config, workdir, source, *fragments):
  with pytest.raises(UserError) as error:
    convert.import_checkpoint(config, str(workdir), str(source))
  message = str(error.value)
  assert len(message.splitlines()) == 1
  for fragment in fragments:
    assert fragment in message, message
  assert not os.path.exists(os.path.join(str(workdir), 'checkpoints'))


def test_bad_sources_are_refused_and_nothing_is_written(tf_cifar10, tmp_path):
  _, config, manifest, prefix, workdir = tf_cifar10
  new_workdir = tmp_path / 'workdir'
  _assert_refused(config, new_workdir, tmp_path / 'nowhere', 'does not exist')
  (tmp_path / 'empty').mkdir()
  _assert_refused(config, new_workdir, tmp_path / 'empty', 'neither a TF checkpoint')
  missing = [v for v in manifest if not v[0].startswith('model/mid/attn_1/k/')]
  _assert_refused(config, new_workdir, _tf_checkpoint(tmp_path / 'missing', missing),
                  'has no model/mid/attn_1/k/', 'model.attn_resolutions')
  extra = manifest + [['model/down_0/block_2/conv1/W', [3, 3, 32, 32], 'float32']]
  _assert_refused(config, new_workdir, _tf_checkpoint(tmp_path / 'extra', extra),
                  'model/down_0/block_2/conv1/W', 'model.num_res_blocks')
  wider = config.copy_and_resolve_references()
  wider.model.ch = 64
  _assert_refused(wider, new_workdir, prefix, 'model/conv_in/b has shape (32,)', 'needs (64,)',
                  'model.ch')
  two_levels = config.copy_and_resolve_references()
  two_levels.model.ch_mult = (1, 2, 2, 4)
  _assert_refused(two_levels, new_workdir, prefix, 'has no model/down_3/block_0/nin_shortcut/',
                  'model.ch_mult')
  before = sorted(os.listdir(checkpointing.checkpoint_dir(workdir)))
  with pytest.raises(UserError, match='already holds checkpoints'):
    convert.import_checkpoint(config, workdir, prefix)
  assert sorted(os.listdir(checkpointing.checkpoint_dir(workdir))) == before


@pytest.mark.parametrize('key,value,fragment', [
    ('flip_sin_to_cos', True, 'flip_sin_to_cos=True'),
    ('attention_head_dim', 8, 'multi-head'),
    ('up_block_types', ['UpBlock2D'] * 4, 'blocks'),
])
def test_unsupported_diffusers_architectures_are_refused(tmp_path, key, value, fragment):
  _, config, folder = _diffusers_folder(tmp_path)
  path = os.path.join(folder, 'unet', 'config.json')
  with open(path, encoding='utf-8') as f:
    unet_config = json.load(f)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump({**unet_config, key: value}, f)
  _assert_refused(config, tmp_path / 'workdir', folder, fragment)


def test_diffusers_differences_are_warned_one_line_each(tmp_path, caplog):
  _, config, folder = _diffusers_folder(tmp_path)
  config.diffusion.model_var_type = 'fixedsmall'
  config.diffusion.num_timesteps = 500
  with caplog.at_level('WARNING'):
    convert.read_weights(config, folder)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert len(warnings) == 2, warnings
  assert any('variance_type' in w and 'fixed_large' in w for w in warnings)
  assert any('num_train_timesteps' in w and '1000' in w for w in warnings)


def test_configs_diffusers_cannot_express_are_refused(tf_cifar10, tmp_path):
  _, config, _, _, workdir = tf_cifar10
  for field, value in (('model.resamp_with_conv', False), ('diffusion.model_mean_type', 'xprev')):
    changed = config.copy_and_resolve_references()
    section, name = field.split('.')
    changed[section][name] = value
    with pytest.raises(UserError, match=field):
      convert.export_diffusers(changed, workdir, str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')


def test_cli_imports_and_refuses(tmp_path):
  _, _, folder = _diffusers_folder(tmp_path)
  env = {**os.environ, 'PYTHONPATH': ROOT}
  command = [sys.executable, '-m', 'ddpm_jax.convert', '--config=configs/cifar10.py',
             '--config.model.ch=32', f'--workdir={tmp_path / "workdir"}']
  done = subprocess.run(command + [f'--from={folder}'], cwd=ROOT, env=env, capture_output=True,
                        text=True, check=False, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert os.listdir(tmp_path / 'workdir' / 'checkpoints') == ['0']
  again = subprocess.run(command + [f'--from={folder}'], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=False, timeout=600)
  assert again.returncode == 1
  assert again.stderr.strip().splitlines()[-1].endswith('(nothing was overwritten).')


# Issue 21: damaged sources, odd diffusers configs, leftovers of a killed import, SIGTERM.

@pytest.mark.parametrize('damage,fragment', [
    ('truncated', 'is damaged'), ('checksum', 'Checksum does not match'), ('nan', 'NaN')])
def test_a_damaged_or_non_finite_tf_checkpoint_is_one_sentence(tf_cifar10, tmp_path,
                                                               monkeypatch, damage, fragment):
  _, config, manifest, prefix, _ = tf_cifar10
  if damage == 'nan':
    value = MAKE_TF.variable_value
    monkeypatch.setattr(MAKE_TF, 'variable_value', lambda name, shape, dtype: (
        np.full(shape, np.nan, dtype) if name == 'model/conv_out/W/ExponentialMovingAverage'
        else value(name, shape, dtype)))
    source = _tf_checkpoint(tmp_path / 'nan', manifest)
  else:
    shutil.copytree(os.path.dirname(prefix), tmp_path / 'damaged')
    source = str(tmp_path / 'damaged' / os.path.basename(prefix))
    data = tmp_path / 'damaged' / (os.path.basename(prefix) + '.data-00000-of-00001')
    raw = bytearray(data.read_bytes())
    if damage == 'truncated':
      raw = raw[:len(raw) // 2]
    else:
      raw[1000::5000] = bytes(b ^ 0xff for b in raw[1000::5000])
    data.write_bytes(bytes(raw))
  _assert_refused(config, tmp_path / 'workdir', source, fragment, source)


@pytest.mark.parametrize('edit,fragment', [
    (lambda c: [c], 'is not a JSON object'),
    (lambda c: {**c, 'block_out_channels': [0, 0, 0, 0]}, 'block_out_channels=[0, 0, 0, 0]'),
    (lambda c: {**c, 'block_out_channels': []}, 'block_out_channels=[]'),
    (lambda c: {**c, 'sample_size': '32'}, "sample_size='32'"),
    (lambda c: {**c, 'layers_per_block': 0}, 'layers_per_block=0'),
    (lambda c: {**c, 'down_block_types': 'DownBlock2D'}, 'down_block_types='),
    (lambda c: {**c, 'norm_num_groups': None}, 'norm_num_groups=None'),
])
def test_a_diffusers_config_of_the_wrong_shape_is_one_sentence(tmp_path, edit, fragment):
  _, config, folder = _diffusers_folder(tmp_path)
  path = os.path.join(folder, 'unet', 'config.json')
  with open(path, encoding='utf-8') as f:
    unet_config = json.load(f)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(edit(unet_config), f)
  _assert_refused(config, tmp_path / 'workdir', folder, fragment, path)


def test_a_scheduler_config_that_is_a_list_is_one_sentence(tmp_path):
  _, config, folder = _diffusers_folder(tmp_path)
  path = os.path.join(folder, 'scheduler', 'scheduler_config.json')
  with open(path, 'w', encoding='utf-8') as f:
    json.dump([1, 2], f)
  _assert_refused(config, tmp_path / 'workdir', folder, 'is not a JSON object', path)


def test_the_leftover_of_a_killed_import_is_named_then_cleaned(tmp_path, caplog):
  _, config, folder = _diffusers_folder(tmp_path)
  workdir = tmp_path / 'workdir'
  leftover = workdir / 'checkpoints' / '0.orbax-checkpoint-tmp-1712345678'
  (leftover / 'default').mkdir(parents=True)
  (leftover / 'default' / 'manifest.ocdbt').write_bytes(b'half')
  template = weight_names.unflatten({p: np.zeros(s, np.float32)
                                     for p, s in weight_names.param_shapes(config).items()})
  with pytest.raises(UserError) as error:  # what --mode=sample says meanwhile
    checkpointing.restore_ema_params(str(workdir), template)
  assert str(leftover) in str(error.value) and 'never completed' in str(error.value)
  with caplog.at_level('WARNING'):
    assert convert.import_checkpoint(config, str(workdir), folder) == 0
  assert f'Removed {leftover}' in caplog.text
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['0']


def test_sigterm_while_reading_writes_nothing_and_during_the_write_finishes_it(
    tmp_path, monkeypatch, caplog):
  import signal
  _, config, folder = _diffusers_folder(tmp_path)
  read = convert.read_weights

  def read_then_sigterm(*args):
    weights = read(*args)
    os.kill(os.getpid(), signal.SIGTERM)
    return weights
  monkeypatch.setattr(convert, 'read_weights', read_then_sigterm)
  workdir = tmp_path / 'stopped'
  with pytest.raises(convert.errors.Interrupted) as stopped:
    convert.run(config, str(workdir), from_path=folder)
  assert str(stopped.value) == (
      f'Stopped by SIGTERM before anything was written: {workdir} holds no checkpoint; rerun '
      f'the same command to import {folder}.')
  assert not (workdir / 'checkpoints').exists() or not os.listdir(workdir / 'checkpoints')
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

  def read_then_sigterm_in_a_destructor(*args):
    signal_when_collected()
    return read(*args)
  monkeypatch.setattr(convert, 'read_weights', read_then_sigterm_in_a_destructor)
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  monkeypatch.setattr(convert.errors, '_PENDING', [])  # this test's note, dropped after it
  cli._quiet_unraisable_reports()
  workdir = tmp_path / 'swallowed'
  with pytest.raises(convert.errors.Interrupted, match='before anything was written'):
    convert.run(config, str(workdir), from_path=folder)
  assert not (workdir / 'checkpoints').exists() or not os.listdir(workdir / 'checkpoints')
  assert reported == []  # no traceback for the swallowed raise

  monkeypatch.setattr(convert, 'read_weights', read)
  save = checkpointing.save

  def save_then_sigterm(*args, **kwargs):
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
  monkeypatch.setattr(checkpointing, 'save', save_then_sigterm)
  workdir = tmp_path / 'finished'
  caplog.clear()
  with caplog.at_level('WARNING'):
    convert.run(config, str(workdir), from_path=folder)  # the write finishes: status 0
  assert [r.getMessage() for r in caplog.records if r.levelname == 'WARNING'] == [
      f'SIGTERM arrived while the checkpoint was being written; it was completed first: '
      f'{checkpointing.checkpoint_dir(workdir)}/0 holds all of {folder}.']
  assert os.listdir(workdir / 'checkpoints') == ['0']
  assert int(checkpointing.restore_state_dict(str(workdir))['step']) == 0

