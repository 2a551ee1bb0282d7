"""Installation: setup.py's Python range and extras, the start-up hint about an unused
accelerator, and the notebook's install logic (colabs/colab_install.py) on simulated runtimes."""
import fnmatch
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import pytest
import setuptools

from ddpm_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_colab_install():
  """colabs/colab_install.py as a module (the notebook loads it from the checkout the same way)."""
  spec = importlib.util.spec_from_file_location(
      'colab_install', os.path.join(ROOT, 'colabs', 'colab_install.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


colab_install = load_colab_install()


def fake_glob(*paths):
  """A glob.glob over the given device files only."""
  return lambda pattern: [path for path in paths if fnmatch.fnmatch(path, pattern)]


def fake_which(*programs):
  return lambda name: f'/usr/bin/{name}' if name in programs else None


def fake_find_spec(*modules):
  return lambda name: object() if name in modules else None


# ---------------------------------------------------------------------------------- setup.py


def run_setup_py(monkeypatch, version_info) -> dict:
  """Runs setup.py as Python `version_info`; setuptools.setup's keyword arguments."""
  calls = []
  monkeypatch.setattr(setuptools, 'setup', lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(sys, 'version_info', version_info)
  monkeypatch.chdir(ROOT)
  with open(os.path.join(ROOT, 'setup.py'), encoding='utf-8') as f:
    source = compile(f.read(), 'setup.py', 'exec')
  exec(source, {'__name__': '__main__'})  # pylint: disable=exec-used
  return calls[0]


def test_setup_py_refuses_a_python_jax_does_not_support(monkeypatch):
  with pytest.raises(SystemExit, match=r'needs Python 3.11, 3.12 or 3.13 \(>=3.11,<3.14\), '
                                       r'not 3.10.13: make a venv'):
    run_setup_py(monkeypatch, (3, 10, 13, 'final', 0))
  with pytest.raises(SystemExit, match='not 3.14.0'):
    run_setup_py(monkeypatch, (3, 14, 0, 'final', 0))
  kwargs = run_setup_py(monkeypatch, (3, 13, 0, 'final', 0))
  assert kwargs['python_requires'] == '>=3.11,<3.14'
  assert kwargs['license'] == 'Apache-2.0'
  with open(os.path.join(ROOT, 'LICENSE'), encoding='utf-8') as f:
    text = f.read()
  assert 'Apache License' in text and 'Version 2.0, January 2004' in text
  assert 'Copyright 2026 The ddpm_jax Authors' in text


def test_setup_py_agrees_with_the_installed_jax_metadata():
  setup = colab_install.read_setup_py(ROOT)
  jax_metadata = importlib.metadata.metadata('jax')
  jax_floor = colab_install._release(jax_metadata['Requires-Python'].lstrip('>='))
  assert colab_install._release(setup.python_requires.split(',')[0].lstrip('>=')) >= jax_floor
  jax_requirement = next(r for r in setup.install_requires if colab_install._name(r) == 'jax')
  jax_extras = set(jax_metadata.get_all('Provides-Extra'))
  for extra, jax_extra in (('tpu', 'tpu'), ('cuda', 'cuda12'), ('cuda13', 'cuda13')):
    assert setup.extras_require[extra] == [jax_requirement.replace('jax', f'jax[{jax_extra}]')]
    assert jax_extra in jax_extras  # the extra jax names today


# ------------------------------------------------------------------ the start-up hint (main)


@pytest.mark.parametrize('devices, programs, extra', [
    (('/dev/accel0', '/dev/accel1'), (), 'tpu'),  # TPU v2-v4
    (('/dev/vfio/vfio', '/dev/vfio/0'), (), 'tpu'),  # TPU v5e and later
    ((), ('nvidia-smi',), 'cuda'),
])
def test_hint_names_the_extra_when_jax_runs_on_the_cpu_beside_an_accelerator(devices, programs,
                                                                            extra):
  hint = parallel.unused_accelerator_hint('cpu', glob_fn=fake_glob(*devices),
                                          which=fake_which(*programs),
                                          find_spec=fake_find_spec())
  assert hint.startswith('JAX runs on the CPU although this host has ')
  assert f"`pip install -e '.[{extra}]'`" in hint


def test_no_hint_without_an_unused_accelerator():
  def hint(backend='cpu', jax_platforms='', devices=('/dev/accel0',), programs=('nvidia-smi',)):
    return parallel.unused_accelerator_hint(backend, jax_platforms, glob_fn=fake_glob(*devices),
                                            which=fake_which(*programs),
                                            find_spec=fake_find_spec())
  assert hint(devices=(), programs=()) is None  # a CPU host
  assert hint(devices=('/dev/vfio/vfio',), programs=()) is None  # VFIO, no device behind it
  assert hint(backend='tpu') is None and hint(backend='gpu') is None
  assert hint(jax_platforms='cpu') is None  # the user chose the CPU
  assert hint(jax_platforms='cuda,cpu') is not None


def test_hint_when_the_plugin_is_installed_but_did_not_start():
  hint = parallel.unused_accelerator_hint('cpu', glob_fn=fake_glob('/dev/accel0'),
                                          which=fake_which(), find_spec=fake_find_spec('libtpu'))
  assert 'a TPU and libtpu is installed: JAX could not start it' in hint
  hint = parallel.unused_accelerator_hint('cpu', glob_fn=fake_glob(),
                                          which=fake_which('nvidia-smi'),
                                          find_spec=fake_find_spec('jax_cuda12_plugin'))
  assert 'an NVIDIA GPU and jax_cuda12_plugin is installed' in hint

def test_main_warns_at_start_up_on_a_simulated_tpu_host(tmp_path):
  script = ('import sys\n'
            'from absl import app\n'
            'from ddpm_jax import cli, main, parallel\n'
            'parallel.unused_accelerator_hint.__kwdefaults__.update(\n'
            '    glob_fn=lambda pattern: ["/dev/accel0"] if "accel" in pattern else [],\n'
            '    find_spec=lambda name: None)\n'
            'app.run(cli.with_user_errors(main.main), flags_parser=cli.parse_flags)\n')
  result = subprocess.run(
      [sys.executable, '-c', script, '--config=configs/digits.py', f'--workdir={tmp_path}',
       '--mode=sample'], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS=''))  # '': JAX picks the backend
  assert result.returncode == 1  # no checkpoint to sample from, after the start-up
  assert ("JAX runs on the CPU although this host has a TPU: install JAX for it with "
          "`pip install -e '.[tpu]'`") in result.stderr


# ------------------------------------------------------------ the notebook's install logic

SETUP = colab_install.SetupPy(
    '>=3.11,<3.14',
    ['jax>=0.10.2,<0.11', 'flax>=0.12.8,<0.13', 'tensorboard>=2.21,<2.22',
     'tensorflow-cpu>=2.21,<2.22', 'pillow>=10'],
    {'test': ['pytest>=8'], 'tpu': ['jax[tpu]>=0.10.2,<0.11'],
     'cuda': ['jax[cuda12]>=0.10.2,<0.11']})
PIP = ['python', '-m', 'pip', 'install']
# What Colab's runtimes come with (a TPU runtime adds libtpu, a GPU one the CUDA plugin).
COLAB = {'jax': '0.10.2', 'jaxlib': '0.10.2', 'tensorflow': '2.21.0', 'tensorboard': '2.21.0'}


def plan(runtime, installed):
  return colab_install.plan('/c', runtime, installed, SETUP, python='python')


def test_detect_runtime_from_simulated_probes():
  def detect(devices=(), programs=(), environ=None):
    return colab_install.detect_runtime(environ or {}, fake_glob(*devices), fake_which(*programs))
  assert detect(('/dev/accel0',)) == 'tpu'
  assert detect(('/dev/vfio/vfio', '/dev/vfio/0')) == 'tpu'
  assert detect(environ={'COLAB_TPU_ADDR': '10.0.0.2:8470'}) == 'tpu'
  assert detect(environ={'TPU_NAME': 'local'}) == 'tpu'
  assert detect(programs=('nvidia-smi',)) == 'gpu'
  assert detect(('/dev/nvidia0',)) == 'gpu'
  assert detect(('/dev/vfio/vfio',)) == 'cpu'
  assert detect() == 'cpu'


@pytest.mark.parametrize('runtime', ['tpu', 'gpu'])
def test_an_accelerator_runtime_keeps_its_jax_and_tensorflow(runtime):
  result = plan(runtime, COLAB)
  assert result.commands == [
      PIP + ['--no-deps', '-e', '/c'],
      PIP + ['flax>=0.12.8,<0.13', 'pillow>=10', 'jax==0.10.2', 'jaxlib==0.10.2',
             'tensorflow==2.21.0', 'tensorboard==2.21.0']]
  assert result.kept == COLAB and result.replaced == []


def test_a_cpu_runtime_gets_pip_s_jax_around_its_tensorflow():
  result = plan('cpu', COLAB)
  assert result.commands == [
      PIP + ['--no-deps', '-e', '/c'],
      PIP + ['jax>=0.10.2,<0.11', 'flax>=0.12.8,<0.13', 'pillow>=10', 'tensorflow==2.21.0',
             'tensorboard==2.21.0']]
  assert result.replaced == []


@pytest.mark.parametrize('runtime, command', [('cpu', PIP + ['-e', '/c']),
                                              ('tpu', PIP + ['-e', '/c[tpu]']),
                                              ('gpu', PIP + ['-e', '/c[cuda]'])])
def test_a_bare_machine_installs_with_the_accelerator_s_extra(runtime, command):
  assert plan(runtime, {}).commands == [command]


def test_a_jax_older_than_setup_py_s_is_replaced_by_the_accelerator_s_build():
  result = plan('tpu', {**COLAB, 'jax': '0.7.2', 'jaxlib': '0.7.2'})
  assert result.commands == [
      PIP + ['--no-deps', '-e', '/c'],
      PIP + ['jax[tpu]>=0.10.2,<0.11', 'flax>=0.12.8,<0.13', 'pillow>=10',
             'tensorflow==2.21.0', 'tensorboard==2.21.0']]
  assert result.replaced == ['jax', 'jaxlib']
  assert plan('gpu', {'jax': '0.11.0', 'jaxlib': '0.11.0'}).commands == [PIP + ['-e', '/c[cuda]']]


def test_a_tensorflow_older_than_numpy_2_is_upgraded_under_its_own_name():
  result = plan('cpu', {'tensorflow': '2.15.1', 'tensorboard': '2.15.2'})
  assert result.commands == [
      PIP + ['--no-deps', '-e', '/c'],
      PIP + ['jax>=0.10.2,<0.11', 'flax>=0.12.8,<0.13', 'tensorboard>=2.21,<2.22',
             'tensorflow>=2.21,<2.22', 'pillow>=10']]
  assert result.replaced == ['tensorflow']


def test_the_real_setup_py_on_a_colab_tpu_runtime():
  setup = colab_install.read_setup_py(ROOT)
  assert setup.python_requires == '>=3.11,<3.14' and 'jax>=0.10.2,<0.11' in setup.install_requires
  first, second = colab_install.plan(ROOT, 'tpu', COLAB, setup, python='python').commands
  assert first == PIP + ['--no-deps', '-e', ROOT]
  runtime_owned = {'jax', 'jaxlib', 'tensorflow', 'tensorflow-cpu', 'tensorboard'}
  assert [r for r in second[4:] if colab_install._name(r) in runtime_owned] == [
      'jax==0.10.2', 'jaxlib==0.10.2', 'tensorflow==2.21.0', 'tensorboard==2.21.0']
  assert [r for r in second[4:] if colab_install._name(r) not in runtime_owned] == [
      r for r in setup.install_requires if colab_install._name(r) not in runtime_owned]


def test_satisfies():
  assert colab_install.satisfies('0.10.2', '>=0.10.2,<0.11')
  assert colab_install.satisfies('0.10.10', 'jax>=0.10.2,<0.11')
  assert not colab_install.satisfies('0.11.0', '>=0.10.2,<0.11')
  assert not colab_install.satisfies('0.9.2', '>=0.10.2,<0.11')
  assert colab_install.satisfies('2.21.0', 'tensorflow-cpu>=2.21,<2.22')


def test_install_runs_the_plan_and_says_when_to_restart(monkeypatch, capsys):
  monkeypatch.setattr(colab_install, 'detect_runtime', lambda: 'tpu')
  versions = {'numpy': '2.0.0'}  # what the Python has imported; the fake pip may upgrade it
  monkeypatch.setattr(colab_install, 'imported_versions', lambda: dict(versions))
  monkeypatch.setattr(colab_install, 'installed_versions',
                      lambda names=(): dict(COLAB) if not names else
                      {n: versions[n] for n in names if n in versions})
  ran = []
  assert not colab_install.install(ROOT, run=lambda command, check: ran.append(command))
  assert [command[:4] for command in ran] == [[sys.executable, '-m', 'pip', 'install']] * 2
  assert ran[0][4:] == ['--no-deps', '-e', ROOT]
  assert ran[1][-4:] == ['jax==0.10.2', 'jaxlib==0.10.2', 'tensorflow==2.21.0',
                         'tensorboard==2.21.0']
  out = capsys.readouterr().out
  assert 'Runtime: TPU; keeping the preinstalled jax 0.10.2, jaxlib 0.10.2' in out
  assert f'$ {sys.executable} -m pip install --no-deps -e {ROOT}' in out

  def upgrading_pip(command, check):
    versions['numpy'] = '2.4.6'
  assert colab_install.install(ROOT, run=upgrading_pip)



def setup_cell(repo_url: str) -> str:
  """The notebook's first code cell (clone and install), with REPO_URL set to `repo_url`."""
  import nbformat  # pylint: disable=import-outside-toplevel
  notebook = nbformat.read(os.path.join(ROOT, 'colabs', 'ddpm_jax.ipynb'), as_version=4)
  source = next(cell.source for cell in notebook.cells if cell.cell_type == 'code')
  first, rest = source.split('\n', 1)
  assert first.startswith("REPO_URL = 'https://github.com/<you>/ddpm_jax'")
  return f'REPO_URL = {repo_url!r}\n{rest}'


def test_the_notebook_s_first_cell_clones_repo_url_or_asks_for_it(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Colab's /content: no checkout
  monkeypatch.setattr(sys, 'path', list(sys.path))
  with pytest.raises(SystemExit, match='Set REPO_URL to the ddpm_jax repository'):
    exec(setup_cell('https://github.com/<you>/ddpm_jax'), {})  # pylint: disable=exec-used
  namespace = {}
  exec(setup_cell(ROOT), namespace)  # pylint: disable=exec-used
  assert namespace['CHECKOUT'] == ROOT and not (tmp_path / 'ddpm_jax').exists()
  if not os.path.exists(os.path.join(ROOT, '.git')):
    pytest.skip('not a git checkout: nothing to clone')
  namespace = {}
  exec(setup_cell(f'file://{ROOT}'), namespace)  # pylint: disable=exec-used
  clone = str(tmp_path / 'ddpm_jax')
  assert namespace['CHECKOUT'] == clone and clone in sys.path
  assert os.path.exists(os.path.join(clone, 'colabs', 'colab_install.py'))
  assert namespace['missing'] == []  # everything importable here: nothing to install
