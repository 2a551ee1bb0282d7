"""The launch scripts: --help, the --dry-run commands, bad input, and real runs against fakes.

Every script runs in a subprocess with a PATH that holds no real gcloud (an empty one, or a
folder with a fake gcloud that logs its arguments), so nothing here touches the network.
"""
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
SCRIPTS = ('tpu_vm.py', 'gpu.py', 'local.py')
NO_GCLOUD = '/nonexistent-bin'  # a PATH without gcloud (nor anything else)
BASH = shutil.which('bash') or '/bin/bash'
GCP = ('--project=my-proj', '--zone=europe-west4-a')
POD = ('up', '--dry-run', *GCP, '--accelerator-type=v3-32', '--workdir=gs://bucket/cifar10')

FAKE_GCLOUD = '''#!{python}
"""Stands in for gcloud: logs its arguments and answers the queries tpu_vm.py makes."""
import json, os, sys

argv = sys.argv[1:]
with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:
  f.write(json.dumps(argv) + '\\n')
if argv[:2] == ['config', 'get-value']:
  print(os.environ.get('FAKE_GCLOUD_' + argv[2].replace('/', '_').upper(), ''))
elif 'describe' in argv:  # the next of FAKE_STATES (a file, one state a line); none: missing
  with open(os.environ['FAKE_STATES']) as f:
    states = f.read().split()
  with open(os.environ['FAKE_STATES'], 'w') as f:
    f.write('\\n'.join(states[1:]))
  if not states or states[0] == 'MISSING':
    sys.exit(1)
  print(states[0] + ('' if 'queued-resources' in argv else '\\t' + os.environ['FAKE_ACCEL']))
elif 'ssh' in argv and any(a.startswith('--command=cat ') for a in argv):
  print(os.environ.get('FAKE_JOB_STATUS', ''))
'''


def launch(script, *args, path=NO_GCLOUD, env=None):
  """Runs launch/<script> ARGS with PATH=`path`; returns the CompletedProcess."""
  environment = {**os.environ, 'PATH': path, **(env or {})}
  return subprocess.run([sys.executable, os.path.join(LAUNCH, script), *args],
                        env=environment, capture_output=True, text=True, timeout=120)


def commands(stdout):
  """The printed commands (comments left out), each split back into argv."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith('#')]


def gcloud_tpus(command, *words):
  return command[:3 + len(words)] == ['gcloud', 'compute', 'tpus', *words]


def flag(command, name):
  """The value of `--name=value` in argv, or None."""
  values = [a.split('=', 1)[1] for a in command if a.startswith(f'--{name}=')]
  return values[0] if values else None


def bash_c_argument(line):
  """The script that `... bash -c SCRIPT ...` in a bash line runs."""
  words = shlex.split(line)
  i = words.index('-c', words.index('bash'))
  return words[i + 1]


def train_command(loop):
  """The `python -m ddpm_jax.main ...` argv inside a retry loop."""
  lexer = shlex.shlex(loop, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  words = list(lexer)
  start = words.index('ddpm_jax.main') - 2
  return words[start:words.index(';', start)]


def check_bash_syntax(line):
  subprocess.run([BASH, '-n', '-c', line], check=True)


def assert_bad_input(result):
  """Exit status 2, one line on stderr, nothing printed (so nothing created)."""
  assert result.returncode == 2, result
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert 'Traceback' not in result.stderr
  assert 'create' not in result.stdout and result.stdout == ''


@pytest.fixture
def tpu_vm():
  """The tpu_vm module, for its pure functions."""
  sys.path.insert(0, LAUNCH)
  try:
    spec = importlib.util.spec_from_file_location('tpu_vm', os.path.join(LAUNCH, 'tpu_vm.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.path.remove(LAUNCH)


@pytest.fixture
def fake_gcloud(tmp_path):
  """A PATH with a fake gcloud (plus tar and gzip), its environment, and its call log."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)
  for tool in ('tar', 'gzip'):
    if shutil.which(tool):
      os.symlink(shutil.which(tool), bin_dir / tool)
  log, states = tmp_path / 'gcloud.log', tmp_path / 'states'
  states.write_text('')
  env = {'FAKE_GCLOUD_LOG': str(log), 'FAKE_STATES': str(states), 'FAKE_ACCEL': 'v3-8',
         'TMPDIR': str(tmp_path)}

  class Fake:
    path = str(bin_dir)

    @staticmethod
    def calls():
      if not log.exists():
        return []
      return [['gcloud', *json.loads(line)] for line in log.read_text().splitlines()]

    @staticmethod
    def set_states(*names):
      states.write_text('\n'.join(names))

  Fake.env = env
  return Fake


# ------------------------------------------------------------------------------------- help


@pytest.mark.parametrize('argv', [
    ['tpu_vm.py', '--help'], ['tpu_vm.py', 'up', '--help'], ['tpu_vm.py', 'logs', '--help'],
    ['tpu_vm.py', 'stop', '--help'], ['tpu_vm.py', 'delete', '--help'], ['gpu.py', '--help'],
    ['gpu.py', 'start', '--help'], ['gpu.py', 'logs', '--help'], ['gpu.py', 'stop', '--help'],
    ['local.py', '--help'], ['tpu_vm.py', 'follow', '--help'], ['gpu.py', 'follow', '--help']])
def test_help(argv):
  result = launch(*argv)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('usage:')


def test_tpu_help_describes_preemption_and_pods():
  text = launch('tpu_vm.py', 'up', '--help').stdout
  for words in ('PREEMPTED', '--watch', '--queued', 'gs://', 'jax.distributed.initialize'):
    assert words in text


@pytest.mark.parametrize('script', SCRIPTS)
def test_scripts_are_executable_python3(script):
  path = os.path.join(LAUNCH, script)
  assert os.access(path, os.X_OK)
  with open(path) as f:
    assert f.readline().strip() == '#!/usr/bin/env python3'


# ------------------------------------------------------------------------------ TPU dry run


def test_tpu_pod_dry_run():
  result = launch('tpu_vm.py', *POD, '--', '--config.training.batch_size=256', '--x=a b')
  assert result.returncode == 0, result.stderr
  create, tar, scp, install, start = commands(result.stdout)
  assert gcloud_tpus(create, 'tpu-vm', 'create') and create[5] == 'ddpm'
  assert flag(create, 'accelerator-type') == 'v3-32'
  assert flag(create, 'zone') == 'europe-west4-a' and flag(create, 'project') == 'my-proj'
  assert flag(create, 'version') == 'tpu-ubuntu2204-base'
  assert tar[0] == 'tar' and tar[-3:] == ['-C', ROOT, '.'] and '--exclude=.git' in tar
  assert gcloud_tpus(scp, 'tpu-vm', 'scp') and scp[5] == tar[2]
  for command in (scp, install, start):
    assert flag(command, 'worker') == 'all'
  assert gcloud_tpus(install, 'tpu-vm', 'ssh') and gcloud_tpus(start, 'tpu-vm', 'ssh')
  install_script = flag(install, 'command')
  assert 'pip install --quiet -e ".[tpu]"' in install_script
  assert 'tar -xzf ddpm_jax-src.tar.gz' in install_script
  loop = bash_c_argument(flag(start, 'command'))
  assert 'while true' in loop and 'resuming from the latest checkpoint' in loop
  assert train_command(loop) == [
      '.venv/bin/python', '-m', 'ddpm_jax.main', '--config=configs/cifar10.py',
      '--workdir=gs://bucket/cifar10', '--mode=train', '--config.training.batch_size=256',
      '--x=a b']
  assert 'nohup setsid bash -c' in flag(start, 'command')
  for script in (install_script, flag(start, 'command'), loop):
    check_bash_syntax(script)


def test_tpu_single_host_dry_run_allows_a_local_workdir():
  result = launch('tpu_vm.py', 'up', '--dry-run', *GCP, '--workdir=runs/c10')
  assert result.returncode == 0, result.stderr
  create, _, scp, install, start = commands(result.stdout)
  assert flag(create, 'accelerator-type') == 'v3-8'
  assert '--spot' not in create and '--preemptible' not in create
  assert all(flag(c, 'worker') == 'all' for c in (scp, install, start))
  assert '--workdir=runs/c10' in shlex.split(bash_c_argument(flag(start, 'command')))
  assert '# --watch' not in result.stdout


@pytest.mark.parametrize('accelerator_type, version', [
    ('v4-16', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-8', 'v2-alpha-tpuv5'), ('v6e-8', 'v2-alpha-tpuv6e')])
def test_tpu_runtime_version_follows_the_generation(accelerator_type, version):
  result = launch('tpu_vm.py', 'up', '--dry-run', *GCP, f'--accelerator-type={accelerator_type}',
                  '--workdir=gs://b/w')
  assert result.returncode == 0, result.stderr
  assert flag(commands(result.stdout)[0], 'version') == version


def test_tpu_spot_dry_run_watches_for_preemption():
  result = launch('tpu_vm.py', 'up', '--dry-run', *GCP, '--spot', '--workdir=gs://b/w',
                  '--poll-seconds=60')
  assert result.returncode == 0, result.stderr
  assert '--spot' in commands(result.stdout)[0]
  notes = [line for line in result.stdout.splitlines() if line.startswith('#')]
  assert notes and 'every 60s' in notes[0] and 'PREEMPTED' in notes[1]
  assert 'tpu-vm delete ddpm' in notes[1]


def test_tpu_queued_dry_run():
  result = launch('tpu_vm.py', 'up', '--dry-run', *GCP, '--queued', '--spot',
                  '--accelerator-type=v5litepod-16', '--workdir=gs://b/w', '--name=big')
  assert result.returncode == 0, result.stderr
  create = commands(result.stdout)[0]
  assert gcloud_tpus(create, 'queued-resources', 'create') and create[5] == 'big'
  assert flag(create, 'node-id') == 'big' and flag(create, 'accelerator-type') == 'v5litepod-16'
  assert flag(create, 'runtime-version') == 'v2-alpha-tpuv5-lite' and '--spot' in create
  assert 'prints ACTIVE' in result.stdout
  assert 'queued-resources delete big' in result.stdout


def test_tpu_git_url_install():
  result = launch('tpu_vm.py', 'up', '--dry-run', *GCP, '--workdir=gs://b/w',
                  '--git-url=https://example.com/ddpm.git', '--git-ref=origin/main')
  assert result.returncode == 0, result.stderr
  cmds = commands(result.stdout)
  assert len(cmds) == 3 and not any(c[0] == 'tar' for c in cmds)
  install = flag(cmds[1], 'command')
  assert 'git clone --quiet https://example.com/ddpm.git ~/ddpm_jax' in install
  assert 'checkout --quiet --force --detach origin/main' in install
  check_bash_syntax(install)


def test_tpu_skip_install_only_starts():
  result = launch('tpu_vm.py', 'up', '--dry-run', *GCP, '--workdir=gs://b/w', '--skip-install')
  cmds = commands(result.stdout)
  assert len(cmds) == 2 and 'nohup setsid' in flag(cmds[1], 'command')


def test_tpu_logs_stop_delete_dry_run():
  logs = commands(launch('tpu_vm.py', 'logs', '--dry-run', *GCP, '--worker=3').stdout)
  assert flag(logs[0], 'worker') == '3' and 'tail' in flag(logs[0], 'command')
  stop = commands(launch('tpu_vm.py', 'stop', '--dry-run', *GCP).stdout)
  assert flag(stop[0], 'worker') == 'all' and 'kill --' in flag(stop[0], 'command')
  delete = commands(launch('tpu_vm.py', 'delete', '--dry-run', *GCP).stdout)
  assert gcloud_tpus(delete[0], 'tpu-vm', 'delete') and '--quiet' in delete[0]
  delete = commands(launch('tpu_vm.py', 'delete', '--dry-run', *GCP, '--queued').stdout)
  assert gcloud_tpus(delete[0], 'queued-resources', 'delete') and '--force' in delete[0]


def test_tpu_follow_dry_run_starts_the_follower_on_a_second_vm():
  result = launch('tpu_vm.py', 'follow', '--dry-run', *GCP, '--workdir=gs://b/c10',
                  '--follow-poll=30', '--follow-timeout=7200', '--',
                  '--config.sampling.num_steps=50', '--config.sampling.sampler=ddim')
  assert result.returncode == 0, result.stderr
  create, tar, scp, install, start = commands(result.stdout)
  assert gcloud_tpus(create, 'tpu-vm', 'create') and create[5] == 'ddpm-eval'
  assert flag(create, 'accelerator-type') == 'v3-8'
  assert install[5] == start[5] == 'ddpm-eval' and scp[6].startswith('ddpm-eval:')
  assert tar[0] == 'tar'
  script = flag(start, 'command')
  assert '~/ddpm_jax_logs/follow.log' in script and '~/ddpm_jax_logs/follow.pid' in script
  loop = bash_c_argument(script)
  assert 'echo done > ~/ddpm_jax_logs/follow.status' in loop
  assert train_command(loop) == [
      '.venv/bin/python', '-m', 'ddpm_jax.main', '--config=configs/cifar10.py',
      '--workdir=gs://b/c10', '--mode=eval', '--follow', '--follow_poll=30',
      '--follow_timeout=7200', '--config.sampling.num_steps=50', '--config.sampling.sampler=ddim']
  for line in (script, loop):
    check_bash_syntax(line)
  logs = commands(launch('tpu_vm.py', 'logs', '--dry-run', *GCP, '--job=follow').stdout)[0]
  assert logs[5] == 'ddpm-eval' and 'follow.log' in flag(logs, 'command')
  stop = commands(launch('tpu_vm.py', 'stop', '--dry-run', *GCP, '--name=ddpm-eval').stdout)[0]
  assert 'follow.pid' in flag(stop, 'command') and 'train.pid' in flag(stop, 'command')


@pytest.mark.parametrize('accelerator_type, hosts', [
    ('v2-8', 1), ('v2-32', 4), ('v3-8', 1), ('v3-32', 4), ('v3-2048', 256), ('v4-8', 1),
    ('v4-16', 2), ('v4-32', 4), ('v5p-8', 1), ('v5p-16', 2), ('v5litepod-1', 1),
    ('v5litepod-8', 1), ('v5litepod-16', 4), ('v6e-8', 1), ('v6e-256', 64),
    ('v3-7', None), ('v3-16', None), ('v4-12', None), ('v5litepod-2', None), ('v7-8', None),
    ('tpu', None), ('V3-8', None), ('v3-8 ', None)])
def test_num_hosts(tpu_vm, accelerator_type, hosts):
  assert tpu_vm.num_hosts(accelerator_type) == hosts


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize('argv, words', [
    ([*POD[:2], *GCP, '--accelerator-type=v3-7', '--workdir=gs://b/w'], ['v3-7', 'v3-8']),
    ([*POD[:2], *GCP, '--accelerator-type=tpu-v3', '--workdir=gs://b/w'], ['v5litepod']),
    (['up', *GCP, '--workdir=gs://b/w'], ['gcloud', 'PATH']),
    (['delete', *GCP], ['gcloud', 'PATH']),
    (['up', '--dry-run', '--zone=z', '--workdir=gs://b/w'], ['--project']),
    (['up', '--dry-run', '--project=p', '--workdir=gs://b/w'], ['--zone']),
    (['logs', '--dry-run'], ['--project']),
    ([*POD[:2], *GCP, '--accelerator-type=v3-32', '--workdir=/tmp/w'], ['gs://', 'every worker']),
    ([*POD[:2], *GCP, '--accelerator-type=v4-16', '--workdir=w'], ['gs://', '2 hosts']),
    ([*POD[:2], *GCP, '--spot', '--workdir=/tmp/w'], ['gs://']),
    ([*POD[:2], *GCP, '--queued', '--preemptible', '--workdir=gs://b/w'], ['--spot']),
    ([*POD[:2], *GCP, '--spot', '--preemptible', '--workdir=gs://b/w'], ['--spot']),
    ([*POD[:2], *GCP, '--name=My_TPU', '--workdir=gs://b/w'], ['--name']),
    ([*POD[:2], *GCP, '--config=configs/nope.py', '--workdir=gs://b/w'], ['configs/nope.py']),
    ([*POD[:2], *GCP], ['--workdir']),
    (['stop', '--dry-run', *GCP, '--', '--config.seed=1'], ['--']),
    (['follow', '--dry-run', *GCP, '--workdir=/tmp/w'], ['gs://', "trainer's"]),
    (['follow', '--dry-run', *GCP, '--workdir=gs://b/w', '--follow-poll=0'], ['--follow-poll']),
    (['follow', '--dry-run', *GCP, '--workdir=gs://b/w', '--follow-timeout=-1'],
     ['--follow-timeout']),
    (['follow', '--dry-run', *GCP, '--workdir=gs://b/w', '--mode=train'], ['--mode']),
])
def test_tpu_bad_input(argv, words):
  result = launch('tpu_vm.py', *argv)
  assert_bad_input(result)
  for word in words:
    assert word in result.stderr


@pytest.mark.parametrize('script, argv, words', [
    ('gpu.py', ['start', '--dry-run'], ['--workdir']),
    ('gpu.py', ['start', '--dry-run', '--workdir=w', '--config=nope.py'], ['nope.py']),
    ('gpu.py', ['start', '--workdir=w'], ['setsid']),
    ('gpu.py', ['start', '--dry-run', '--workdir=w', '--name=a b'], ['--name']),
    ('local.py', ['--dry-run', '--config=nope.py'], ['nope.py']),
    ('local.py', ['--dry-run', '--mode=fit'], ['--mode']),
])
def test_gpu_and_local_bad_input(script, argv, words):
  result = launch(script, *argv)
  assert_bad_input(result)
  for word in words:
    assert word in result.stderr


# ----------------------------------------------------------------------- gcloud's defaults


def test_tpu_project_and_zone_from_gcloud_config(fake_gcloud):
  env = {**fake_gcloud.env, 'FAKE_GCLOUD_PROJECT': 'cfg-proj',
         'FAKE_GCLOUD_COMPUTE_ZONE': 'us-central2-b'}
  result = launch('tpu_vm.py', 'up', '--dry-run', '--workdir=gs://b/w', path=fake_gcloud.path,
                  env=env)
  assert result.returncode == 0, result.stderr
  create = commands(result.stdout)[0]
  assert flag(create, 'project') == 'cfg-proj' and flag(create, 'zone') == 'us-central2-b'
  assert all(call[1:3] == ['config', 'get-value'] for call in fake_gcloud.calls())


def test_tpu_unset_gcloud_config_is_bad_input(fake_gcloud):
  result = launch('tpu_vm.py', 'up', '--workdir=gs://b/w', path=fake_gcloud.path,
                  env=fake_gcloud.env)
  assert_bad_input(result)
  assert '--project' in result.stderr and 'gcloud config set project' in result.stderr
  assert all(call[1:3] == ['config', 'get-value'] for call in fake_gcloud.calls())


# ------------------------------------------------------------------ TPU for real, on a fake


def test_tpu_up_runs_what_dry_run_prints(fake_gcloud):
  argv = [*GCP, '--workdir=gs://b/w', '--', '--config.training.batch_size=256']
  printed = commands(launch('tpu_vm.py', 'up', '--dry-run', *argv, path=fake_gcloud.path,
                            env=fake_gcloud.env).stdout)
  fake_gcloud.set_states('MISSING', 'READY')
  result = launch('tpu_vm.py', 'up', *argv, path=fake_gcloud.path, env=fake_gcloud.env)
  assert result.returncode == 0, result.stderr
  calls = [c for c in fake_gcloud.calls() if 'describe' not in c]
  assert calls == [c for c in printed if c[0] == 'gcloud']
  tarball = [c for c in printed if c[0] == 'tar'][0][2]
  with tarfile.open(tarball) as tar:
    names = tar.getnames()
  assert './setup.py' in names and './launch/tpu_vm.py' in names
  assert not any('/.git/' in n or n.endswith('/.git') for n in names)


def test_tpu_follow_runs_what_dry_run_prints_and_watches_its_own_status(fake_gcloud):
  argv = [*GCP, '--workdir=gs://b/w', '--skip-install', '--spot', '--poll-seconds=0']
  printed = commands(launch('tpu_vm.py', 'follow', '--dry-run', *argv, path=fake_gcloud.path,
                            env=fake_gcloud.env).stdout)
  fake_gcloud.set_states('MISSING', 'READY', 'READY')
  result = launch('tpu_vm.py', 'follow', *argv, path=fake_gcloud.path,
                  env={**fake_gcloud.env, 'FAKE_JOB_STATUS': 'done'})
  assert result.returncode == 0, result.stderr
  calls = [c for c in fake_gcloud.calls() if 'describe' not in c]
  assert calls[:2] == printed
  assert flag(calls[2], 'command') == 'cat ~/ddpm_jax_logs/follow.status 2>/dev/null || true'
  assert 'the evaluation follower finished' in result.stderr


def test_tpu_up_reuses_a_ready_vm(fake_gcloud):
  fake_gcloud.set_states('READY', 'READY')
  result = launch('tpu_vm.py', 'up', *GCP, '--workdir=gs://b/w', '--skip-install',
                  path=fake_gcloud.path, env=fake_gcloud.env)
  assert result.returncode == 0, result.stderr
  assert not any('create' in c for c in fake_gcloud.calls())
  assert 'reusing ddpm' in result.stderr


def test_tpu_up_refuses_a_vm_of_another_type(fake_gcloud):
  fake_gcloud.set_states('READY')
  result = launch('tpu_vm.py', 'up', *GCP, '--accelerator-type=v3-32', '--workdir=gs://b/w',
                  path=fake_gcloud.path, env=fake_gcloud.env)
  assert result.returncode == 2 and 'v3-8' in result.stderr
  assert not any('create' in c or 'ssh' in c for c in fake_gcloud.calls())


def test_tpu_watch_recreates_a_preempted_vm(fake_gcloud):
  # up: missing -> create -> ready; poll: preempted -> delete, create -> ready; poll: done.
  fake_gcloud.set_states('MISSING', 'READY', 'PREEMPTED', 'MISSING', 'READY', 'READY')
  env = {**fake_gcloud.env, 'FAKE_JOB_STATUS': 'done'}
  result = launch('tpu_vm.py', 'up', *GCP, '--spot', '--workdir=gs://b/w', '--skip-install',
                  '--poll-seconds=0', path=fake_gcloud.path, env=env)
  assert result.returncode == 0, result.stderr
  calls = fake_gcloud.calls()
  assert sum(gcloud_tpus(c, 'tpu-vm', 'create') for c in calls) == 2
  assert sum(gcloud_tpus(c, 'tpu-vm', 'delete') for c in calls) == 1
  starts = [c for c in calls if 'nohup' in (flag(c, 'command') or '')]
  assert len(starts) == 2 and all('--spot' in c for c in calls if 'create' in c)
  assert 'training finished' in result.stderr


def test_tpu_queued_up_waits_for_active(fake_gcloud):
  fake_gcloud.set_states('MISSING', 'ACTIVE', 'READY')
  result = launch('tpu_vm.py', 'up', *GCP, '--queued', '--workdir=gs://b/w', '--skip-install',
                  path=fake_gcloud.path, env=fake_gcloud.env)
  assert result.returncode == 0, result.stderr
  calls = fake_gcloud.calls()
  assert sum(gcloud_tpus(c, 'queued-resources', 'create') for c in calls) == 1
  assert gcloud_tpus(calls[-1], 'tpu-vm', 'ssh')


def test_tpu_failing_command_stops_with_its_status(fake_gcloud, tmp_path):
  failing = tmp_path / 'bin' / 'gcloud'
  failing.write_text(f'#!{BASH}\nexit 7\n')
  result = launch('tpu_vm.py', 'delete', *GCP, path=fake_gcloud.path, env=fake_gcloud.env)
  assert result.returncode == 7
  assert result.stderr.strip().splitlines()[-1].startswith('tpu_vm.py: error: this command')


# --------------------------------------------------------------------------------- GPU, local


def test_gpu_dry_run():
  result = launch('gpu.py', 'start', '--dry-run', '--install', '--workdir=gs://b/w',
                  '--python=/opt/py/bin/python', '--', '--config.training.batch_size=256')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert shlex.split(lines[0]) == ['/opt/py/bin/python', '-m', 'pip', 'install', '-e',
                                   f'{ROOT}[cuda]']
  start = lines[1]
  check_bash_syntax(start)
  assert 'nohup setsid bash -c' in start and f'cd {shlex.quote(ROOT)}' in start
  loop = bash_c_argument(start)
  assert train_command(loop) == [
      '/opt/py/bin/python', '-m', 'ddpm_jax.main', '--config=configs/cifar10.py',
      '--workdir=gs://b/w', '--mode=train', '--config.training.batch_size=256']
  assert 'while true' in loop
  assert len(launch('gpu.py', 'start', '--dry-run', '--workdir=w').stdout.splitlines()) == 1


def test_gpu_follow_dry_run_starts_the_follower_beside_the_trainer(tmp_path):
  result = launch('gpu.py', 'follow', '--dry-run', '--workdir=/data/run',
                  '--python=/opt/py/bin/python', f'--log-dir={tmp_path}', '--follow-poll=5')
  assert result.returncode == 0, result.stderr
  [start] = result.stdout.splitlines()
  check_bash_syntax(start)
  assert f'{tmp_path}/ddpm-eval.log' in start and f'{tmp_path}/ddpm-eval.pid' in start
  assert train_command(bash_c_argument(start)) == [
      '/opt/py/bin/python', '-m', 'ddpm_jax.main', '--config=configs/cifar10.py',
      '--workdir=/data/run', '--mode=eval', '--follow', '--follow_poll=5',
      '--follow_timeout=21600']
  logs = launch('gpu.py', 'logs', '--dry-run', f'--log-dir={tmp_path}', '--name=ddpm-eval')
  assert shlex.split(logs.stdout) == ['tail', '-n', '200', '-F', f'{tmp_path}/ddpm-eval.log']
  assert_bad_input(launch('gpu.py', 'follow', '--dry-run', '--workdir=w', '--mode=eval'))


def fake_python(tmp_path, body):
  """An executable that stands in for python: appends its arguments to calls.txt, then `body`."""
  path = tmp_path / 'python'
  path.write_text(f'#!{BASH}\necho "$@" >> {tmp_path}/calls.txt\n{body}\n')
  path.chmod(0o755)
  return str(path)


def wait_for(path, timeout=30):
  deadline = time.time() + timeout
  while not os.path.exists(path) and time.time() < deadline:
    time.sleep(0.1)
  return open(path).read().strip() if os.path.exists(path) else None


@pytest.mark.skipif(not (shutil.which('setsid') and shutil.which('nohup')), reason='no setsid')
def test_gpu_start_reruns_after_a_crash(tmp_path):
  # Fails on its first run, succeeds on the second: the loop restarts it with the same command.
  python = fake_python(tmp_path, f'[ -f {tmp_path}/ran ] && exit 0; touch {tmp_path}/ran; '
                                 f'exit 3')
  result = launch('gpu.py', 'start', f'--log-dir={tmp_path}', '--workdir=gs://b/w',
                  f'--python={python}', '--restart-delay=0', '--', '--config.seed=1',
                  path=os.environ['PATH'])
  assert result.returncode == 0, result.stderr
  assert wait_for(tmp_path / 'ddpm.status') == 'done'
  runs = (tmp_path / 'calls.txt').read_text().splitlines()
  assert len(runs) == 2 and runs[0] == runs[1]
  assert runs[0].endswith('--workdir=gs://b/w --mode=train --config.seed=1')
  log = (tmp_path / 'ddpm.log').read_text()
  assert 'exit status 3: restart 1/10' in log


def alive(pid):
  """Whether process `pid` runs (a zombie, killed but not yet reaped, does not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return True


@pytest.mark.skipif(not (shutil.which('setsid') and shutil.which('nohup')), reason='no setsid')
def test_gpu_stop_kills_the_job(tmp_path):
  python = fake_python(tmp_path, 'sleep 60')
  result = launch('gpu.py', 'start', f'--log-dir={tmp_path}', '--workdir=w',
                  f'--python={python}', path=os.environ['PATH'])
  assert result.returncode == 0, result.stderr
  pid = int(wait_for(tmp_path / 'ddpm.pid'))
  try:
    assert wait_for(tmp_path / 'calls.txt')  # the job runs
    result = launch('gpu.py', 'stop', f'--log-dir={tmp_path}', path=os.environ['PATH'])
    assert result.returncode == 0, result.stderr
    deadline = time.time() + 10
    while alive(pid) and time.time() < deadline:
      time.sleep(0.1)
    assert not alive(pid)
    assert not (tmp_path / 'ddpm.pid').exists() and not (tmp_path / 'ddpm.status').exists()
  finally:
    try:
      os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def _run_retry_loop(tmp_path, statuses, max_restarts=2):
  """Runs the retry loop over a command whose k-th run exits with statuses[k]; (result, runs)."""
  sys.path.insert(0, LAUNCH)
  try:
    import _common  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(LAUNCH)
  runs = tmp_path / 'runs'
  command = (f'echo run >> {runs}; (exit $(sed -n "$(wc -l < {runs})p" <<< '
             f'"{chr(10).join(map(str, statuses))}"))')
  loop = _common.retry_loop(command, str(tmp_path / 'status'), max_restarts, 0)
  result = subprocess.run([BASH, '-c', loop], capture_output=True, text=True, timeout=30)
  return result, runs.read_text().count('run')


def test_retry_loop_gives_up_after_max_restarts(tmp_path):
  result, runs = _run_retry_loop(tmp_path, [5, 5, 5, 5])
  assert result.returncode == 5
  assert (tmp_path / 'status').read_text().strip() == 'failed'
  assert runs == 3  # the first run and 2 restarts
  assert 'giving up' in result.stdout


def test_retry_loop_resumes_preemptions_and_stops_on_a_mistake(tmp_path):
  # Preemptions (75) do not count as restarts: 3 of them and 2 crashes still end in success.
  (tmp_path / 'preempted').mkdir()
  result, runs = _run_retry_loop(tmp_path / 'preempted', [75, 3, 75, 75, 3, 0])
  assert result.returncode == 0, result.stdout
  assert (tmp_path / 'preempted' / 'status').read_text().strip() == 'done' and runs == 6
  assert result.stdout.count('exit status 75 (preempted): resuming') == 3

  (tmp_path / 'mistake').mkdir()
  result, runs = _run_retry_loop(tmp_path / 'mistake', [3, 1, 0])
  assert result.returncode == 1 and runs == 2  # a crash reruns, a mistake (1) stops
  assert (tmp_path / 'mistake' / 'status').read_text().strip() == 'failed'
  assert 'exit status 1: fix the command or the config; not restarting' in result.stdout


def test_retry_loop_reruns_crashes_of_status_70_up_to_max_restarts(tmp_path):
  """Issue 21: ddpm_jax exits 70 (EX_SOFTWARE) on an unexpected crash, where every uncaught
  exception used to exit 1, the status that stops the loop."""
  (tmp_path / 'recovers').mkdir()
  result, runs = _run_retry_loop(tmp_path / 'recovers', [70, 137, 0])
  assert result.returncode == 0 and runs == 3, result.stdout
  assert 'exit status 70 (crashed): restart 1/2' in result.stdout
  assert 'exit status 137: restart 2/2' in result.stdout
  (tmp_path / 'repeats').mkdir()
  result, runs = _run_retry_loop(tmp_path / 'repeats', [70, 70, 70, 0])
  assert result.returncode == 70 and runs == 3
  assert 'exit status 70 after 2 restarts: giving up' in result.stdout
  help_text = launch('gpu.py', 'start', '--help').stdout
  assert 'crash (exit status 70' in ' '.join(help_text.split())


def test_gpu_logs_and_stop_dry_run(tmp_path):
  logs = launch('gpu.py', 'logs', '--dry-run', f'--log-dir={tmp_path}', '--name=c10').stdout
  assert shlex.split(logs) == ['tail', '-n', '200', '-F', f'{tmp_path}/c10.log']
  stop = launch('gpu.py', 'stop', '--dry-run', f'--log-dir={tmp_path}').stdout
  assert f'kill -- -$(cat {tmp_path}/ddpm.pid)' in stop


def test_local_dry_run():
  result = launch('local.py', '--dry-run', '--python=python3', '--',
                  '--config.training.num_train_steps=10')
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
      f'cd {shlex.quote(ROOT)} && python3 -m ddpm_jax.main --config=configs/digits.py '
      f'--workdir={os.path.join(ROOT, "workdir_digits")} --mode=train '
      f'--config.training.num_train_steps=10']


def test_local_waits_for_the_trainer_to_save_on_ctrl_c(tmp_path):
  # Ctrl-C reaches the whole foreground group; the stand-in trainer takes 1 s to "save".
  python = fake_python(tmp_path, f"trap 'sleep 1; echo saved > {tmp_path}/saved; exit 75' INT; "
                                 f"touch {tmp_path}/started; while true; do sleep 0.1; done")
  process = subprocess.Popen([sys.executable, os.path.join(LAUNCH, 'local.py'),
                              f'--python={python}', f'--workdir={tmp_path}/w'],
                             start_new_session=True, stderr=subprocess.PIPE, text=True)
  assert wait_for(tmp_path / 'started') is not None
  os.killpg(process.pid, signal.SIGINT)
  assert process.wait(timeout=30) == 75, process.stderr.read()
  assert (tmp_path / 'saved').read_text().strip() == 'saved'


def test_local_runs_in_the_foreground_and_returns_the_status(tmp_path):
  python = fake_python(tmp_path, f'pwd > {tmp_path}/cwd.txt; exit 4')
  result = launch('local.py', f'--python={python}', '--config=configs/cifar10.py',
                  f'--workdir={tmp_path}/w', '--mode=sample', '--', '--config.seed=3')
  assert result.returncode == 4
  assert (tmp_path / 'calls.txt').read_text().splitlines() == [
      f'-m ddpm_jax.main --config=configs/cifar10.py --workdir={tmp_path}/w --mode=sample '
      f'--config.seed=3']
  assert (tmp_path / 'cwd.txt').read_text().strip() == ROOT
