"""Docs that cannot rot: what README.md, docs/*.md and the configs' docstrings name must exist.

Every `--config.<field>` is a field of the default config; every repository path (`configs/...`,
`ddpm_jax/...`, `launch/...`, `docs/...`, ...) exists; every `python -m ddpm_jax.X` is a module
and every flag given to it (or to a launch script) is one it defines; every ```bash block parses.
"""
import ast
import functools
import pathlib
import re
import shlex
import subprocess

import pytest

from ddpm_jax import default_config
from tests.conftest import ROOT

ROOT_PATH = pathlib.Path(ROOT)
DOCS = ['README.md'] + sorted(f'docs/{p.name}' for p in (ROOT_PATH / 'docs').glob('*.md'))
CONFIGS = sorted(f'configs/{p.name}' for p in (ROOT_PATH / 'configs').glob('*.py')
                 if p.name != '__init__.py')
# absl's own flags, which every command accepts.
ABSL_FLAGS = {'help', 'helpfull', 'helpshort', 'helpxml', 'verbosity', 'v', 'logtostderr',
              'alsologtostderr', 'log_dir', 'stderrthreshold', 'flagfile', 'undefok'}
_PATH = re.compile(r'(?<![\w./-])((?:ddpm_jax|configs|launch|tests|colabs|docs|\.ci)/[\w./*<>-]*'
                   r'|LICENSE|setup\.py)')
_CONFIG_FIELD = re.compile(r'--config\.([\w.]+)')


def _text(name: str) -> str:
  """A doc's text; for a config, its module docstring."""
  text = (ROOT_PATH / name).read_text(encoding='utf-8')
  return ast.get_docstring(ast.parse(text)) or '' if name.endswith('.py') else text


def _default_fields(config=None, prefix: str = '') -> set[str]:
  config = config or default_config.get_default_config()
  fields = set()
  for key, value in config.items():
    fields.add(prefix + key)
    if hasattr(value, 'items'):
      fields |= _default_fields(value, f'{prefix}{key}.')
  return fields


def config_fields_missing(text: str) -> list[str]:
  fields = _default_fields()
  return [f for f in _CONFIG_FIELD.findall(text) if f.rstrip('.') not in fields]


def paths_missing(text: str) -> list[str]:
  missing = []
  for path in _PATH.findall(text):
    path = path.rstrip('.,:;')
    if any(mark in path for mark in ('<', '*', '...')) or not path:
      continue
    if not (ROOT_PATH / path).exists():
      missing.append(path)
  return missing


def shell_blocks(text: str) -> list[str]:
  return re.findall(r'```(?:bash|sh|shell)\n(.*?)```', text, flags=re.S)


@functools.lru_cache(maxsize=None)
def _defined_flags(source: str) -> frozenset:
  """The flags a command defines: absl DEFINE_*('name' and argparse add_argument('--name'."""
  files = {
      'ddpm_jax.main': ['ddpm_jax/main.py', 'ddpm_jax/cli.py'],
      'ddpm_jax.convert': ['ddpm_jax/convert/__main__.py', 'ddpm_jax/cli.py'],
      'ddpm_jax.benchmark': ['ddpm_jax/benchmark.py', 'ddpm_jax/cli.py'],
      'ddpm_jax.fid': ['ddpm_jax/fid/__main__.py'],
  }.get(source, [source, 'launch/_common.py'])
  names = set()
  for name in files:
    code = (ROOT_PATH / name).read_text(encoding='utf-8')
    names |= set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", code))
    names |= set(re.findall(r"add_argument\(\s*'--([\w-]+)'", code))
  is_absl = source.startswith('ddpm_jax.') and source != 'ddpm_jax.fid'
  return frozenset(names | (ABSL_FLAGS if is_absl else {'help'}))


def _commands(block: str) -> list[list[str]]:
  """The commands of a shell block, as words (continuations joined, comments dropped)."""
  commands, pending = [], ''
  for line in block.replace('\\\n', ' ').splitlines():
    pending += line + '\n'
    try:
      words = shlex.split(pending, comments=True)
    except ValueError:  # a quotation that goes on in the next line
      continue
    pending = ''
    while words:
      end = words.index('&&') if '&&' in words else len(words)
      commands.append(words[:end])
      words = words[end + 1:]
  return commands


def flags_unknown(text: str) -> list[str]:
  """`--flag`s given to `python -m ddpm_jax.X` or `launch/*.py` that the command lacks."""
  unknown = []
  for block in shell_blocks(text):
    for words in _commands(block):
      if words[:2] == ['python', '-m'] and words[2].startswith('ddpm_jax.'):
        source, args = words[2], words[3:]
      elif words and words[0].startswith('launch/'):
        source, args = words[0], words[1:]
      else:
        continue
      if not (source.startswith('launch/') or (ROOT_PATH / source.replace('.', '/')).exists()
              or (ROOT_PATH / (source.replace('.', '/') + '.py')).exists()):
        unknown.append(f'{source} (no such module)')
        continue
      for arg in args:
        if arg == '--':  # a launch script passes the rest to ddpm_jax.main
          source, args = 'ddpm_jax.main', []
          continue
        name = arg[2:].split('=', 1)[0] if arg.startswith('--') else ''
        if name and not name.startswith('config.') and name not in _defined_flags(source):
          unknown.append(f'{source} {arg}')
  return unknown


@pytest.mark.parametrize('name', DOCS + CONFIGS)
def test_what_the_docs_name_exists(name):
  text = _text(name)
  assert not config_fields_missing(text), f'{name}: no such config field'
  assert not paths_missing(text), f'{name}: no such path in the repository'
  assert not flags_unknown(text), f'{name}: no such module or flag'
  assert '../' not in text, f'{name} points outside the repository'


@pytest.mark.parametrize('name', DOCS)
def test_every_shell_block_parses(name):
  for block in shell_blocks(_text(name)):
    result = subprocess.run(['bash', '-n'], input=block, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, f'{name}:\n{block}\n{result.stderr}'


def test_the_checks_catch_planted_mistakes():
  """A misspelled field, a missing path, an unknown flag, a broken block: each is caught."""
  assert config_fields_missing('--config.training.bach_size=8') == ['training.bach_size']
  assert not config_fields_missing('--config.training.batch_size=8 --config.eval.')
  assert paths_missing('see configs/cifar100.py and ddpm_jax/sampling.py.') == [
      'configs/cifar100.py']
  block = '```bash\npython -m ddpm_jax.main --config=configs/digits.py --mdoe=all\n```'
  assert flags_unknown(block) == ['ddpm_jax.main --mdoe=all']
  block = '```bash\nlaunch/gpu.py start --workdir=w -- --mode=all --modes=x\n```'
  assert flags_unknown(block) == ['ddpm_jax.main --modes=x']
  result = subprocess.run(['bash', '-n'], input='if true; then\n', capture_output=True,
                          text=True, check=False)
  assert result.returncode != 0
