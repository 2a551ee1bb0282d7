#!/usr/bin/env python3
"""Run ddpm_jax.main on this machine, in the foreground (CPU, or whatever JAX finds).

  launch/local.py                      # digits (embedded), in workdir_digits/ of the repository
  launch/local.py --config=configs/cifar10.py --workdir=/tmp/cifar10 \\
      -- --config.training.batch_size=32
  launch/local.py --mode=sample --dry-run

The command runs from the repository (so `configs/...` resolves) and its exit status is this
script's. Ctrl-C makes training save its current step and stop (exit status 75); rerunning
resumes from the latest checkpoint in the workdir.
Everything after `--` goes to ddpm_jax.main unchanged.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from _common import (ROOT, Parser, Runner, add_dry_run_flag, add_job_flags, config_path,
                     guarded, local_workdir, split_passthrough, train_argv)


def build_parser() -> Parser:
  parser = Parser(prog='local.py', description=__doc__,
                  usage='%(prog)s [options] [-- ddpm_jax.main flags]')
  add_job_flags(parser, 'configs/digits.py')
  parser.add_argument('--workdir', help='checkpoints, logs and samples (default: '
                                        'workdir_<config name> in the repository)')
  parser.add_argument('--python', default=sys.executable,
                      help='the Python that runs it (default: %(default)s)')
  add_dry_run_flag(parser)
  return parser


def run_main(args, run: Runner) -> int:
  return run(train_argv(args.python, args.config, args.workdir, args.mode, args.extra),
             cwd=ROOT, check=False)


def main(argv: Optional[List[str]] = None) -> int:
  own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(own)
  args.extra = extra
  args.config = config_path(args.config)
  if args.workdir is None:
    name = os.path.splitext(os.path.basename(args.config))[0]
    args.workdir = os.path.join(ROOT, f'workdir_{name}')
  args.workdir = local_workdir(args.workdir)
  return guarded(run_main, args, Runner(args.dry_run))


if __name__ == '__main__':
  sys.exit(main())
