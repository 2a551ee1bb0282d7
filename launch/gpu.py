#!/usr/bin/env python3
"""Train on this machine's GPUs (all of them, in one process), detached, with a retry loop.

  launch/gpu.py start --workdir=/data/runs/cifar10 --install -- --config.training.batch_size=256
  launch/gpu.py logs        # follow the log (tail -F)
  launch/gpu.py stop        # stop the job and its retry loop

  # The evaluation follower beside it (--mode=eval --follow), e.g. on this host's last GPU:
  CUDA_VISIBLE_DEVICES=0,1,2 launch/gpu.py start --workdir=/data/runs/cifar10
  CUDA_VISIBLE_DEVICES=3 launch/gpu.py follow --workdir=/data/runs/cifar10
  launch/gpu.py logs --name=ddpm-eval

`start` runs (see it with --dry-run):
  1. with --install: `pip install -e .[cuda]` into the Python given by --python;
  2. `python -m ddpm_jax.main ...` from the repository, detached (nohup + setsid, so it outlives
     this shell and its ssh session), its output appended to ~/ddpm_jax_logs/NAME.log, inside a
     loop that reruns the same command after a preemption (exit status 75) or a crash, and
     stops on success or a mistake (exit status 1). The trainer resumes from the latest
     checkpoint in the workdir, so a rerun (or starting again) resumes. Starting again stops
     the running job of that --name first.
`follow` starts `python -m ddpm_jax.main --mode=eval --follow ...` the same way (job name
ddpm-eval by default): it evaluates each checkpoint the trainer writes to the workdir (the same
path, or gs://, on another host) and stops after the last one (docs/evaluation.md).
JAX uses every local GPU (choose with CUDA_VISIBLE_DEVICES, which the job inherits). Everything
after `--` goes to ddpm_jax.main unchanged.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from typing import List, Optional

from _common import (ROOT, Parser, Runner, add_dry_run_flag, add_follow_flags, add_job_flags,
                     add_retry_flags, config_path, fail, follow_argv, guarded, have, info,
                     local_workdir, retry_loop, split_passthrough, start_detached, stop_job,
                     train_argv)


def job_files(args) -> dict:
  """The job's log directory and files, as absolute paths."""
  log_dir = os.path.abspath(os.path.expanduser(args.log_dir))
  return {'dir': log_dir, **{kind: os.path.join(log_dir, f'{args.name}.{kind}')
                             for kind in ('log', 'pid', 'status')}}


def start(args, run: Runner) -> int:
  files = {key: shlex.quote(path) for key, path in job_files(args).items()}
  if args.install:
    run([args.python, '-m', 'pip', 'install', '-e', f'{ROOT}[cuda]'])
  workdir = local_workdir(args.workdir)
  if args.command == 'follow':
    job = follow_argv(args.python, args.config, workdir, args.follow_poll, args.follow_timeout,
                      args.extra)
  else:
    job = train_argv(args.python, args.config, workdir, args.mode, args.extra)
  loop = retry_loop(shlex.join(job), files['status'], args.max_restarts, args.restart_delay)
  run(start_detached(shlex.quote(ROOT), loop, files['dir'], files['log'], files['pid']))
  if not run.dry_run:
    info(f'started; its log is {job_files(args)["log"]}, follow it with '
         f'`launch/gpu.py logs --name={args.name}`')
  return 0


def logs(args, run: Runner) -> int:
  run(['tail', '-n', '200', '-F', job_files(args)['log']], check=False)
  return 0


def stop(args, run: Runner) -> int:
  run(stop_job(shlex.quote(job_files(args)['pid'])))
  return 0


def build_parser() -> Parser:
  parser = Parser(prog='gpu.py', description=__doc__)
  commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
  shared = argparse.ArgumentParser(add_help=False)
  shared.add_argument('--name', help='job name, for its log and pid files (default: ddpm; '
                                     'ddpm-eval for follow)')
  shared.add_argument('--log-dir', default='~/ddpm_jax_logs',
                      help='where NAME.log, NAME.pid and NAME.status go (default: %(default)s)')
  add_dry_run_flag(shared)

  start_parser = commands.add_parser(
      'start', parents=[shared], help='(install and) start training, detached',
      description=__doc__, usage='%(prog)s [options] [-- ddpm_jax.main flags]')
  start_parser.add_argument('--workdir', required=True,
                            help='checkpoints, logs and samples: a path or gs://BUCKET/PATH')
  add_job_flags(start_parser, 'configs/cifar10.py')
  start_parser.add_argument('--python', default=sys.executable,
                            help='the Python that installs and runs (default: %(default)s)')
  start_parser.add_argument('--install', action='store_true',
                            help='first `pip install -e .[cuda]` (jax with CUDA 12)')
  add_retry_flags(start_parser)
  follow_parser = commands.add_parser(
      'follow', parents=[shared], help='(install and) start the evaluation follower, detached',
      description=__doc__, usage='%(prog)s [options] [-- ddpm_jax.main flags]')
  follow_parser.add_argument('--workdir', required=True,
                             help="the trainer's workdir: a path or gs://BUCKET/PATH")
  add_job_flags(follow_parser, 'configs/cifar10.py', mode=False)
  add_follow_flags(follow_parser)
  follow_parser.add_argument('--python', default=sys.executable,
                             help='the Python that installs and runs (default: %(default)s)')
  follow_parser.add_argument('--install', action='store_true',
                             help='first `pip install -e .[cuda]` (jax with CUDA 12)')
  add_retry_flags(follow_parser)
  commands.add_parser('logs', parents=[shared], help='follow the log',
                      description='Follow the log of the job (tail -F).')
  commands.add_parser('stop', parents=[shared], help='stop the job',
                      description='Stop the job and its retry loop.')
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(own)
  if extra and args.command not in ('start', 'follow'):
    fail('arguments after -- are for ddpm_jax.main, so they only go with `start` and '
         '`follow`.')
  args.extra = extra
  args.name = args.name or ('ddpm-eval' if args.command == 'follow' else 'ddpm')
  if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9._-]*', args.name):
    fail(f'invalid --name {args.name!r}: use letters, digits, dots, hyphens and underscores.')
  if args.command in ('start', 'follow'):
    args.config = config_path(args.config)
    if not args.dry_run and not (have('setsid') and have('nohup')):
      fail('setsid and nohup, which detach the job, are missing (they are Linux tools): '
           'run in the foreground with launch/local.py instead.')
  action = {'start': start, 'follow': start, 'logs': logs, 'stop': stop}[args.command]
  return guarded(action, args, Runner(args.dry_run))


if __name__ == '__main__':
  sys.exit(main())
