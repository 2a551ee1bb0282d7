"""Installs a ddpm_jax checkout into a notebook's Python without replacing the runtime's JAX.

  python colabs/colab_install.py CHECKOUT [--dry-run]   # --dry-run: print the pip commands only

The notebook's first cell loads this file from the checkout and calls `install(CHECKOUT)`; it
uses the standard library only, since it runs before anything is installed.

Colab's TPU and GPU runtimes come with jax, jaxlib and the accelerator's plugin (libtpu, the CUDA
plugin) preinstalled, and every Colab runtime with `tensorflow` and its `tensorboard`. A plain
`pip install -e CHECKOUT` would replace that jax with PyPI's CPU build and add `tensorflow-cpu`
over the preinstalled `tensorflow` (two distributions writing one `tensorflow/` directory). So:

* a TPU or GPU runtime whose jax is in setup.py's range keeps its jax and jaxlib;
* a runtime with `tensorflow` (2.18 or newer: the first built for NumPy 2) keeps it and its
  tensorboard, instead of adding `tensorflow-cpu`;
* then ddpm_jax goes in with `--no-deps`, and its other requirements beside the kept packages,
  which are pinned at their versions (pip then fails, naming the conflict, rather than replace
  one of them);
* otherwise (a bare machine, or a runtime whose jax is outside the range) it is
  `pip install -e CHECKOUT`, with the `[tpu]` or `[cuda]` extra on an accelerator: JAX for it.
"""
from __future__ import annotations

import argparse
import ast
import glob
import importlib
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Callable, Dict, List, NamedTuple

EXTRA = {'tpu': 'tpu', 'gpu': 'cuda'}  # runtime -> the extra of setup.py that has its JAX
# Preinstalled distributions that may be kept, and the oldest `tensorflow` worth keeping.
RUNTIME_DISTRIBUTIONS = ('jax', 'jaxlib', 'tensorflow', 'tensorboard')
MIN_KEPT_TENSORFLOW = (2, 18)


def detect_runtime(environ=os.environ, glob_fn: Callable = glob.glob,
                   which: Callable = shutil.which) -> str:
  """'tpu', 'gpu' or 'cpu', from device files, Colab's variables and `nvidia-smi` (no jax import:
  that would hold the TPU and take seconds)."""
  if (glob_fn('/dev/accel*') or glob_fn('/dev/vfio/[0-9]*') or environ.get('COLAB_TPU_ADDR')
      or environ.get('TPU_NAME')):
    return 'tpu'
  if which('nvidia-smi') or glob_fn('/dev/nvidia[0-9]*'):
    return 'gpu'
  return 'cpu'


def installed_versions(names=RUNTIME_DISTRIBUTIONS) -> Dict[str, str]:
  """{distribution: version} of those of `names` that are installed."""
  versions = {}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


class SetupPy(NamedTuple):
  python_requires: str
  install_requires: List[str]
  extras_require: Dict[str, List[str]]


def read_setup_py(checkout: str) -> SetupPy:
  """The requirements in CHECKOUT/setup.py, read (not run: that would call setuptools)."""
  with open(os.path.join(checkout, 'setup.py'), encoding='utf-8') as f:
    tree = ast.parse(f.read())
  constants, keywords = {}, {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
      try:
        constants[node.targets[0].id] = ast.literal_eval(node.value)
      except ValueError:
        pass
    elif isinstance(node, ast.Call) and getattr(node.func, 'attr', '') == 'setup':
      keywords = {k.arg: k.value for k in node.keywords}

  def value(name):
    node = keywords[name]
    return constants[node.id] if isinstance(node, ast.Name) else ast.literal_eval(node)

  return SetupPy(value('python_requires'), value('install_requires'), value('extras_require'))


def _name(requirement: str) -> str:
  """The distribution a requirement names: 'jax[tpu]>=0.10' -> 'jax'."""
  return re.match(r'[A-Za-z0-9._-]+', requirement).group(0).lower().replace('_', '-')


def _release(version: str) -> tuple:
  """'0.10.2' -> (0, 10, 2); a suffix such as '.dev0' or 'rc1' is dropped."""
  return tuple(int(part) for part in re.match(r'\d+(\.\d+)*', version).group(0).split('.'))


def satisfies(version: str, requirement: str) -> bool:
  """Whether `version` meets the comparisons (>=, >, <=, <, ==) of `requirement`."""
  ops = {'>=': lambda a, b: a >= b, '>': lambda a, b: a > b, '<=': lambda a, b: a <= b,
         '<': lambda a, b: a < b, '==': lambda a, b: a == b}
  have = _release(version)
  for op, bound in re.findall(r'(>=|<=|==|>|<)\s*([0-9][0-9.]*)', requirement):
    want = _release(bound)
    width = max(len(have), len(want))
    if not ops[op](have + (0,) * (width - len(have)), want + (0,) * (width - len(want))):
      return False
  return True


class Plan(NamedTuple):
  commands: List[List[str]]  # argv lists, run in order
  kept: Dict[str, str]  # preinstalled distributions left as they are: {name: version}
  replaced: List[str]  # preinstalled distributions the commands change


def plan(checkout: str, runtime: str, installed: Dict[str, str], setup: SetupPy,
         python: str = sys.executable) -> Plan:
  """The pip commands that install `checkout` on `runtime` around the `installed` packages."""
  pip = [python, '-m', 'pip', 'install']
  kept, replaced, requirements = {}, [], []
  tensorflow = installed.get('tensorflow')
  keep_tensorflow = tensorflow and _release(tensorflow) >= MIN_KEPT_TENSORFLOW
  for requirement in setup.install_requires:
    name = _name(requirement)
    if name == 'jax' and runtime in EXTRA:
      if installed.get('jax') and satisfies(installed['jax'], requirement):
        kept.update((n, installed[n]) for n in ('jax', 'jaxlib') if n in installed)
      else:  # JAX for the accelerator, as the extra has it
        requirements += setup.extras_require[EXTRA[runtime]]
        replaced += [n for n in ('jax', 'jaxlib') if n in installed]
    elif name == 'tensorflow-cpu' and tensorflow:
      if keep_tensorflow:
        kept['tensorflow'] = tensorflow
      else:  # too old for NumPy 2: upgraded under its own name, not overlaid by tensorflow-cpu
        requirements.append('tensorflow' + requirement[len('tensorflow-cpu'):])
        replaced.append('tensorflow')
    elif name == 'tensorboard' and keep_tensorflow and 'tensorboard' in installed:
      kept['tensorboard'] = installed['tensorboard']  # the version its tensorflow pins
    else:
      requirements.append(requirement)
  kept = {name: kept[name] for name in RUNTIME_DISTRIBUTIONS if name in kept}
  if not kept and not tensorflow:  # nothing to go around
    extra = f'[{EXTRA[runtime]}]' if runtime in EXTRA else ''
    commands = [pip + ['-e', checkout + extra]]
  else:
    pins = [f'{name}=={version}' for name, version in kept.items()]
    commands = [pip + ['--no-deps', '-e', checkout], pip + requirements + pins]
  return Plan(commands, kept, replaced)


def imported_versions() -> Dict[str, str]:
  """{distribution: version} of the distributions whose modules this Python has imported."""
  modules = {name.partition('.')[0] for name in sys.modules}
  distributions = importlib.metadata.packages_distributions()
  return installed_versions(sorted({d for m in modules for d in distributions.get(m, ())}))


def install(checkout: str, dry_run: bool = False, run: Callable = subprocess.run) -> bool:
  """Installs `checkout` (prints what it runs); True when the Python must be restarted, as pip
  changed a package it has already imported."""
  checkout = os.path.abspath(checkout)
  runtime = detect_runtime()
  the_plan = plan(checkout, runtime, installed_versions(), read_setup_py(checkout))
  kept = ', '.join(f'{name} {version}' for name, version in the_plan.kept.items())
  print(f'Runtime: {runtime.upper()}' + (f'; keeping the preinstalled {kept}' if kept else ''))
  before = imported_versions()
  for command in the_plan.commands:
    print('$', shlex.join(command), flush=True)
    if not dry_run:
      run(command, check=True)
  importlib.invalidate_caches()
  return installed_versions(before) != before


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('checkout', help='the ddpm_jax repository (holding setup.py)')
  parser.add_argument('--dry-run', action='store_true', help='print the pip commands only')
  args = parser.parse_args(argv)
  if install(args.checkout, args.dry_run):
    print('pip changed packages this Python had imported: restart it.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
