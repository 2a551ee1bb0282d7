#!/usr/bin/env python3
"""Train on a Cloud TPU VM: one host (v3-8, v4-8, ...) or a pod slice (v3-32, v4-16, ...).

  launch/tpu_vm.py up --zone=europe-west4-a --accelerator-type=v3-32 \\
      --workdir=gs://BUCKET/cifar10 -- --config.training.batch_size=256
  launch/tpu_vm.py logs --zone=europe-west4-a       # follow worker 0's log (tail -F)
  launch/tpu_vm.py stop --zone=europe-west4-a       # stop the job on every worker
  launch/tpu_vm.py delete --zone=europe-west4-a     # delete the TPU VM

  # The evaluation follower on a second TPU VM (ddpm-eval), beside the trainer:
  launch/tpu_vm.py follow --zone=europe-west4-a --workdir=gs://BUCKET/cifar10
  launch/tpu_vm.py logs --zone=europe-west4-a --name=ddpm-eval --job=follow

`up` runs, with `gcloud compute tpus` (see them all with --dry-run):
  1. `tpu-vm create` (reusing the VM if it exists and is READY), or with --queued,
     `queued-resources create` and a wait until the queued resource is ACTIVE;
  2. on every worker (--worker=all): this checkout as a tarball (`scp`), or `git clone` of
     --git-url; a Python venv made with uv; `pip install -e .[tpu]`;
  3. on every worker, the same `python -m ddpm_jax.main ...` (on a pod, the trainer calls
     jax.distributed.initialize() itself), detached (nohup + setsid) with its log in
     ~/ddpm_jax_logs/train.log, inside a loop that reruns it after a preemption (exit status
     75) or a crash, and stops on success or a mistake (exit status 1). The trainer resumes
     from the latest checkpoint in the workdir, so rerunning `up` also resumes.

Preemption: a preempted Spot or preemptible TPU VM cannot be restarted, only recreated. With
--spot or --preemptible, `up` therefore stays in the foreground (--watch, on by default for
them) and every --poll-seconds asks for the VM's state; when it is PREEMPTED or TERMINATED or
gone (with --queued: the queued resource SUSPENDED or FAILED) it deletes it and runs steps 1-3
again, and the job resumes from the workdir, which must then be on gs://. It returns when the job
has finished (or given up); Ctrl-C stops the watching, not the training.

`follow` does steps 1-3 for the follower (`python -m ddpm_jax.main --mode=eval --follow`, log
~/ddpm_jax_logs/follow.log) on a VM of its own (--name, default ddpm-eval; v3-8 by default): it
evaluates each checkpoint the trainer writes to --workdir, which must be gs:// so both VMs see it,
and stops after the last one (docs/evaluation.md). It takes the same options as `up`.

A pod slice (more than one host) needs --workdir=gs://...: every worker must see the same
workdir. Project and zone come from --project/--zone, else from `gcloud config`. Everything
after `--` goes to ddpm_jax.main unchanged.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
import time
from typing import List, Optional, Tuple

from _common import (ROOT, CommandFailed, Parser, Runner, add_dry_run_flag, add_follow_flags,
                     add_job_flags, add_retry_flags, config_path, fail, follow_argv, guarded,
                     have, info, nonnegative_int, query, render, retry_loop, split_passthrough,
                     start_detached, stop_job, train_argv)

REMOTE_DIR = '~/ddpm_jax'  # the code and its .venv on every worker
REMOTE_LOG_DIR = '~/ddpm_jax_logs'
REMOTE_LOG = f'{REMOTE_LOG_DIR}/train.log'
REMOTE_PID = f'{REMOTE_LOG_DIR}/train.pid'
REMOTE_STATUS = f'{REMOTE_LOG_DIR}/train.status'  # `done` or `failed` once the loop ends
JOBS = ('train', 'follow')  # `up` runs the trainer, `follow` the evaluation follower
TARBALL = 'ddpm_jax-src.tar.gz'
TAR_EXCLUDES = ('.git', '.venv', '__pycache__', '*.egg-info', '.pytest_cache', 'build',
                'workdir*')
WAIT_SECONDS = 30  # between state checks while a VM or queued resource is being set up

# Valid slice sizes. v2, v3, v4 and v5p count TensorCores (8 per host), v5litepod and v6e count
# chips; v4 and v5p take any multiple of 8 up to their largest slice.
_SIZES = {
    'v2': (8, 32, 128, 256, 512),
    'v3': (8, 32, 64, 128, 256, 512, 1024, 2048),
    'v5litepod': (1, 4, 8, 16, 32, 64, 128, 256),
    'v6e': (1, 4, 8, 16, 32, 64, 128, 256),
}
_MAX_CORES = {'v4': 4096, 'v5p': 12288}
RUNTIME_VERSIONS = {  # Google's recommended TPU VM images for JAX
    'v2': 'tpu-ubuntu2204-base',
    'v3': 'tpu-ubuntu2204-base',
    'v4': 'tpu-ubuntu2204-base',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v5p': 'v2-alpha-tpuv5',
    'v6e': 'v2-alpha-tpuv6e',
}
VALID_TYPES = ('v2-{8,32,128,256,512}, v3-{8,32,64,...,2048}, v4-N and v5p-N (N a multiple '
               'of 8), v5litepod-{1,4,8,16,...,256} and v6e-{1,4,8,16,...,256}')
NAME = re.compile(r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?')
TPU_GONE = ('PREEMPTED', 'TERMINATED')
QUEUE_GONE = ('FAILED', 'SUSPENDING', 'SUSPENDED')


def num_hosts(accelerator_type: str) -> Optional[int]:
  """How many VMs (hosts) a slice has, or None for a type that does not exist."""
  match = re.fullmatch(r'(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)', accelerator_type)
  if not match:
    return None
  generation, size = match.group(1), int(match.group(2))
  if generation in _MAX_CORES:
    if size % 8 or not 8 <= size <= _MAX_CORES[generation]:
      return None
  elif size not in _SIZES[generation]:
    return None
  if generation in ('v5litepod', 'v6e'):
    return 1 if size <= 8 else size // 4  # up to 8 chips on one host, 4 per host in pods
  return size // 8  # 8 TensorCores per host


# ---------------------------------------------------------------------------------- commands


def tpus(args, *words: str) -> List[str]:
  """`gcloud compute tpus WORDS --zone --project`."""
  return ['gcloud', 'compute', 'tpus', *words, f'--zone={args.zone}', f'--project={args.project}']


def ssh(args, command: str, worker: str = 'all') -> List[str]:
  return tpus(args, 'tpu-vm', 'ssh', args.name) + [f'--worker={worker}', f'--command={command}']


def create_command(args) -> List[str]:
  if args.queued:
    command = tpus(args, 'queued-resources', 'create', args.name) + [
        f'--node-id={args.name}', f'--accelerator-type={args.accelerator_type}',
        f'--runtime-version={args.version}']
  else:
    command = tpus(args, 'tpu-vm', 'create', args.name) + [
        f'--accelerator-type={args.accelerator_type}', f'--version={args.version}']
  return command + ['--spot'] * args.spot + ['--preemptible'] * args.preemptible


def delete_command(args, queued: bool) -> List[str]:
  if queued:  # --force also deletes its TPU VM
    return tpus(args, 'queued-resources', 'delete', args.name) + ['--force', '--quiet']
  return tpus(args, 'tpu-vm', 'delete', args.name) + ['--quiet']


def describe_tpu_command(args) -> List[str]:
  return tpus(args, 'tpu-vm', 'describe', args.name) + ['--format=value(state,acceleratorType)']


def describe_queue_command(args) -> List[str]:
  return tpus(args, 'queued-resources', 'describe', args.name) + ['--format=value(state.state)']


def remote_file(job: str, kind: str) -> str:
  """~/ddpm_jax_logs/<job>.<kind>: the log, pid or status file of job 'train' or 'follow'."""
  return f'{REMOTE_LOG_DIR}/{job}.{kind}'


def job_status_command(args) -> List[str]:
  return ssh(args, f'cat {remote_file(args.job, "status")} 2>/dev/null || true', worker='0')


def install_command(args) -> str:
  """Gets the code to REMOTE_DIR, makes its venv (once) and `pip install -e .[tpu]`."""
  if args.git_url:
    fetch = (f'if [ -d {REMOTE_DIR}/.git ]; then git -C {REMOTE_DIR} fetch --quiet origin; '
             f'else git clone --quiet {shlex.quote(args.git_url)} {REMOTE_DIR}; fi; '
             f'git -C {REMOTE_DIR} checkout --quiet --force --detach {shlex.quote(args.git_ref)}')
  else:
    fetch = f'mkdir -p {REMOTE_DIR} && tar -xzf {TARBALL} -C {REMOTE_DIR}'
  venv = (f'if [ ! -x {REMOTE_DIR}/.venv/bin/python ]; then '
          f'PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --user uv && '
          f'~/.local/bin/uv venv --seed --python {shlex.quote(args.python)} {REMOTE_DIR}/.venv; '
          f'fi')
  pip = f'cd {REMOTE_DIR} && .venv/bin/python -m pip install --quiet -e ".[tpu]"'
  return f'set -e; {fetch}; {venv}; {pip}'


def start_command(args) -> str:
  """Stops a previous job, then starts the train (or follow) command in its retry loop,
  detached."""
  if args.job == 'follow':
    job = follow_argv('.venv/bin/python', args.config, args.workdir, args.follow_poll,
                      args.follow_timeout, args.extra)
  else:
    job = train_argv('.venv/bin/python', args.config, args.workdir, args.mode, args.extra)
  loop = retry_loop(shlex.join(job), remote_file(args.job, 'status'), args.max_restarts,
                    args.restart_delay)
  return start_detached(REMOTE_DIR, loop, REMOTE_LOG_DIR, remote_file(args.job, 'log'),
                        remote_file(args.job, 'pid'))


# ------------------------------------------------------------------------------------ states


def tpu_state(args) -> Tuple[Optional[str], str]:
  """(state, accelerator type) of the TPU VM, or (None, '') when there is none."""
  returncode, out = query(describe_tpu_command(args))
  if returncode:
    return None, ''
  fields = out.split()
  return (fields[0] if fields else 'UNKNOWN'), (fields[1].split('/')[-1] if fields[1:] else '')


def queue_state(args) -> Optional[str]:
  """The queued resource's state, or None when there is none."""
  returncode, out = query(describe_queue_command(args))
  return None if returncode else (out or 'UNKNOWN')


def node_state(args) -> Tuple[str, str]:
  """('READY' | 'BUSY' | 'GONE', what gcloud said), for the VM behind --name."""
  if args.queued:
    state = queue_state(args)
    if state is None or state in QUEUE_GONE:
      return 'GONE', f'queued resource {state or "missing"}'
    if state != 'ACTIVE':
      return 'BUSY', f'queued resource {state}'
  state, _ = tpu_state(args)
  if state is None or state in TPU_GONE:
    return 'GONE', f'TPU VM {state or "missing"}'
  return ('READY' if state == 'READY' else 'BUSY'), f'TPU VM {state}'


def wait_until_ready(args) -> None:
  said = None
  while True:
    summary, detail = node_state(args)
    if summary == 'READY':
      return
    if summary == 'GONE':
      raise CommandFailed(f'{args.name} went away while starting ({detail}): run `up` again.')
    if detail != said:
      info(f'waiting for {args.name}: {detail}')
      said = detail
    time.sleep(WAIT_SECONDS)


# ----------------------------------------------------------------------------------- actions


def ensure_node(args, run: Runner) -> None:
  """Creates the TPU VM (or queued resource), or reuses it; returns once it is READY."""
  if run.dry_run:
    run(create_command(args))
    if args.queued:
      run.note(f'then wait until `{render(describe_queue_command(args))}` prints ACTIVE')
    return
  if args.queued:
    state = queue_state(args)
    if state in QUEUE_GONE:
      run(delete_command(args, queued=True))
      state = None
  else:
    state, accelerator_type = tpu_state(args)
    if state and accelerator_type and accelerator_type != args.accelerator_type:
      fail(f'TPU VM {args.name} exists as {accelerator_type}, not {args.accelerator_type}: '
           f'pass another --name, or delete it first.')
    if state in TPU_GONE:
      run(delete_command(args, queued=False))
      state = None
    elif state == 'STOPPED':
      run(tpus(args, 'tpu-vm', 'start', args.name))
  if state is None:
    run(create_command(args))
  else:
    info(f'reusing {args.name} ({state})')
  wait_until_ready(args)


def install(args, run: Runner) -> None:
  if not args.git_url:
    tarball = os.path.join(tempfile.gettempdir(), f'ddpm_jax-src-{args.name}.tar.gz')
    excludes = [f'--exclude={pattern}' for pattern in TAR_EXCLUDES]
    run(['tar', '-czf', tarball, *excludes, '-C', ROOT, '.'])
    run(tpus(args, 'tpu-vm', 'scp', tarball, f'{args.name}:{TARBALL}') + ['--worker=all'])
  run(ssh(args, install_command(args)))


def up_once(args, run: Runner) -> None:
  ensure_node(args, run)
  if not args.skip_install:
    install(args, run)
  run(ssh(args, start_command(args)))


def up(args, run: Runner) -> int:
  up_once(args, run)
  if run.dry_run:
    if args.watch:
      describe, gone = ((describe_queue_command(args), 'SUSPENDED or FAILED') if args.queued else
                        (describe_tpu_command(args), 'PREEMPTED or TERMINATED'))
      run.note(f'--watch: every {args.poll_seconds}s, until `{render(job_status_command(args))}` '
               f'prints done or failed,')
      run.note(f'`{render(describe)}`; when it is {gone} (or gone): '
               f'`{render(delete_command(args, args.queued))}`, then the commands above again')
    return 0
  where = f'--name={args.name} --zone={args.zone} --project={args.project} --job={args.job}'
  info(f'{_WHAT[args.job]} started on {args.hosts} host(s); follow it with '
       f'`launch/tpu_vm.py logs {where}`')
  return watch(args, run) if args.watch else 0


_WHAT = {'train': 'training', 'follow': 'the evaluation follower'}


def watch(args, run: Runner) -> int:
  """Recreates the VM and restarts the job whenever it is preempted, until the job ends."""
  info(f'watching {args.name} every {args.poll_seconds}s (Ctrl-C stops watching, not training)')
  while True:
    time.sleep(args.poll_seconds)
    summary, detail = node_state(args)
    if summary == 'READY':
      _, status = query(job_status_command(args))
      if status == 'done':
        info(f'{_WHAT[args.job]} finished')
        return 0
      if status == 'failed':
        raise CommandFailed(f'{_WHAT[args.job]} stopped on a mistake or gave up after '
                            f'{args.max_restarts} restarts: see '
                            f'`launch/tpu_vm.py logs --name={args.name} --job={args.job}`.')
    elif summary == 'GONE':
      info(f'{detail}: recreating {args.name} and restarting the job')
      run(delete_command(args, args.queued), check=False)
      try:
        up_once(args, run)
      except CommandFailed as e:
        info(f'{e} (trying again in {args.poll_seconds}s)')


def logs(args, run: Runner) -> int:
  run(ssh(args, f'tail -n 200 -F {remote_file(args.job, "log")}', worker=args.worker),
      check=False)
  return 0


def stop(args, run: Runner) -> int:
  """Stops whichever job runs there, the trainer or the follower."""
  run(ssh(args, '; '.join(stop_job(remote_file(job, 'pid')) for job in JOBS)))
  return 0


def delete(args, run: Runner) -> int:
  run(delete_command(args, args.queued))
  return 0


# -------------------------------------------------------------------------------------- CLI


def _add_node_flags(parser: argparse.ArgumentParser, job: str) -> None:
  """The options of `up` (job 'train') and of `follow` (the same, for the follower)."""
  parser.set_defaults(job=job)
  parser.add_argument('--accelerator-type', default='v3-8',
                      help=f'one of {VALID_TYPES} (default: %(default)s)')
  parser.add_argument('--version', help='TPU VM runtime image (default: '
                      'tpu-ubuntu2204-base up to v4, v2-alpha-tpuv5-lite for v5litepod, '
                      'v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)')
  preemption = parser.add_mutually_exclusive_group()
  preemption.add_argument('--spot', action='store_true', help='a Spot VM (implies --watch)')
  preemption.add_argument('--preemptible', action='store_true',
                          help='a preemptible VM (implies --watch; not with --queued)')
  parser.add_argument('--queued', action='store_true',
                      help='request the VM as a queued resource and wait until it is ACTIVE')
  parser.add_argument('--workdir', required=True,
                      help='gs://BUCKET/PATH (required for pods, --watch and follow); a plain '
                           'path is on the VM, relative to ~/ddpm_jax')
  add_job_flags(parser, 'configs/cifar10.py', mode=job == 'train')
  if job == 'follow':
    add_follow_flags(parser)
  parser.add_argument('--git-url', help='git clone this on the workers instead of copying '
                                        'this checkout')
  parser.add_argument('--git-ref', default='origin/HEAD',
                      help='with --git-url: what to check out (default: %(default)s)')
  parser.add_argument('--python', default='3.11',
                      help='Python version of the venv on the workers (default: %(default)s)')
  parser.add_argument('--skip-install', action='store_true',
                      help='only (re)start the job on an installed VM')
  add_retry_flags(parser)
  parser.add_argument('--watch', action=argparse.BooleanOptionalAction, default=None,
                      help='stay and recreate the VM when it is preempted (default: with '
                           '--spot or --preemptible)')
  parser.add_argument('--poll-seconds', type=nonnegative_int, default=300,
                      help='with --watch: time between checks (default: %(default)s)')


def build_parser() -> Parser:
  parser = Parser(prog='tpu_vm.py', description=__doc__)
  commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
  shared = argparse.ArgumentParser(add_help=False)
  shared.add_argument('--name', help='TPU VM name, also the queued resource id (default: ddpm; '
                                     'ddpm-eval for follow and logs --job=follow)')
  shared.add_argument('--zone', help='default: `gcloud config get-value compute/zone`')
  shared.add_argument('--project', help='default: `gcloud config get-value project`')
  add_dry_run_flag(shared)

  up_parser = commands.add_parser(
      'up', parents=[shared], help='create or reuse the TPU VM, install, start training',
      description=__doc__, usage='%(prog)s [options] [-- ddpm_jax.main flags]')
  _add_node_flags(up_parser, 'train')
  follow_parser = commands.add_parser(
      'follow', parents=[shared],
      help='create or reuse a TPU VM, install, start the evaluation follower',
      description=__doc__, usage='%(prog)s [options] [-- ddpm_jax.main flags]')
  _add_node_flags(follow_parser, 'follow')

  logs_parser = commands.add_parser('logs', parents=[shared], help="follow a worker's log",
                                    description='Follow the log of one worker.')
  logs_parser.add_argument('--worker', default='0', help='worker index (default: %(default)s)')
  logs_parser.add_argument('--job', default='train', choices=JOBS,
                           help='the trainer\'s log or the follower\'s (default: %(default)s)')
  commands.add_parser('stop', parents=[shared], help='stop the job on every worker',
                      description='Stop the job (trainer or follower, and its retry loop) on '
                                  'every worker.')
  delete_parser = commands.add_parser('delete', parents=[shared], help='delete the TPU VM',
                                      description='Delete the TPU VM (or queued resource).')
  delete_parser.add_argument('--queued', action='store_true',
                             help='delete the queued resource, and with it its TPU VM')
  return parser


def check_up_flags(args) -> None:
  """Checks `up`'s flags and fills in what they imply; exits on bad input."""
  args.hosts = num_hosts(args.accelerator_type)
  if args.hosts is None:
    fail(f'unknown accelerator type {args.accelerator_type!r}: valid types are {VALID_TYPES} '
         f'(for example v3-8, or v3-32 for a pod).')
  args.version = args.version or RUNTIME_VERSIONS[args.accelerator_type.split('-')[0]]
  if args.queued and args.preemptible:
    fail('queued resources take --spot, not --preemptible.')
  if args.watch is None:
    args.watch = args.spot or args.preemptible
  if not args.workdir.startswith('gs://'):
    if args.job == 'follow':
      fail('the follower runs on a VM of its own and must see the trainer\'s checkpoints: pass '
           '--workdir=gs://BUCKET/PATH, the trainer\'s.')
    if args.hosts > 1:
      fail(f'{args.accelerator_type} has {args.hosts} hosts and every worker must see the same '
           f'workdir: pass --workdir=gs://BUCKET/PATH.')
    if args.watch:
      fail('--watch recreates the VM, which loses its disk, so training can only resume from '
           'a bucket: pass --workdir=gs://BUCKET/PATH.')
  if not args.git_url:
    args.config = config_path(args.config)
    if os.path.isabs(args.config):
      fail(f'config {args.config} is outside the repository, which is all the workers get: '
           f'move it under configs/.')


def gcloud_default(value: Optional[str], flag: str, key: str) -> str:
  """`value`, else gcloud's configured default for `key`; exits when neither exists."""
  if value:
    return value
  if not have('gcloud'):
    fail(f'no {flag} given: pass --{flag}=... (gcloud is not installed, so its default cannot '
         f'be read).')
  _, out = query(['gcloud', 'config', 'get-value', key])
  if not out or out == '(unset)':
    fail(f'no {flag} configured: pass --{flag}=... or run `gcloud config set {key} ...`.')
  return out


def main(argv: Optional[List[str]] = None) -> int:
  own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(own)
  if extra and args.command not in ('up', 'follow'):
    fail('arguments after -- are for ddpm_jax.main, so they only go with `up` and `follow`.')
  args.extra = extra
  follower = args.command == 'follow' or getattr(args, 'job', '') == 'follow'
  args.name = args.name or ('ddpm-eval' if follower else 'ddpm')
  if not NAME.fullmatch(args.name):
    fail(f'invalid --name {args.name!r}: use lowercase letters, digits and hyphens, starting '
         f'with a letter.')
  if args.command in ('up', 'follow'):
    check_up_flags(args)
  if not args.dry_run and not have('gcloud'):
    fail('gcloud is not on PATH: install the Google Cloud CLI '
         '(https://cloud.google.com/sdk/docs/install), or pass --dry-run to print the commands.')
  args.project = gcloud_default(args.project, 'project', 'project')
  args.zone = gcloud_default(args.zone, 'zone', 'compute/zone')
  action = {'up': up, 'follow': up, 'logs': logs, 'stop': stop, 'delete': delete}[args.command]
  return guarded(action, args, Runner(args.dry_run))


if __name__ == '__main__':
  sys.exit(main())
