"""What the launch scripts share: one-line errors, dry-run printing, the train command and its
retry loop.

Standard library only, so the scripts run from any laptop with Python 3.9+ and nothing installed.
A command is either an argv list or a bash line (a string, for pipes, redirections and `&`);
`Runner` prints it with `--dry-run` and runs it otherwise, so what is printed is what would run.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
from typing import List, NoReturn, Optional, Sequence, Tuple, Union

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
USAGE_ERROR = 2  # exit status for bad input, as argparse uses
# ddpm_jax.main's exit statuses (ddpm_jax/cli.py, docs/reliability.md): 1 for a mistake to fix
# (rerunning cannot help); 70 (EX_SOFTWARE) for an unexpected crash (worth a few retries);
# 75 (EX_TEMPFAIL) when it stopped with nothing lost: preemption (SIGTERM), Ctrl-C or a full
# disk, after the last checkpoint was safe (a rerun resumes). A process killed by a signal
# (128 + N: 137 out of memory, 134 an abort) counts as a crash.
MISTAKE = 1
CRASH = 70
PREEMPTED = 75

Command = Union[List[str], str]  # argv, or a line for `bash -c`


class CommandFailed(Exception):
  """A command failed (or a resource went wrong) after the input was checked."""

  def __init__(self, message: str, returncode: int = 1):
    super().__init__(message)
    self.returncode = returncode


def fail(message: str) -> NoReturn:
  """Prints one line on stderr and exits with status 2 (the user can fix the input)."""
  print(f'{os.path.basename(sys.argv[0])}: error: {message}', file=sys.stderr)
  sys.exit(USAGE_ERROR)


def guarded(action, *args) -> int:
  """Runs `action(*args)`; a failed command becomes one line on stderr and the exit status."""
  try:
    return action(*args) or 0
  except CommandFailed as e:
    print(f'{os.path.basename(sys.argv[0])}: error: {e}', file=sys.stderr)
    return e.returncode
  except KeyboardInterrupt:
    return 130


def nonnegative_int(text: str) -> int:
  """An argparse type: an integer >= 0."""
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f'{text} is negative')
  return value


def positive_int(text: str) -> int:
  """An argparse type: an integer >= 1."""
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text} is not at least 1')
  return value


def info(message: str) -> None:
  """Progress for the user (real runs only): stderr, so stdout stays for commands."""
  print(f'[launch] {message}', file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
  """An `ArgumentParser` whose usage errors are one line on stderr, exit status 2."""

  def __init__(self, **kwargs):
    kwargs.setdefault('formatter_class', argparse.RawDescriptionHelpFormatter)
    super().__init__(**kwargs)

  def error(self, message):
    fail(f'{message} (see {self.prog} --help)')


def split_passthrough(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
  """Splits argv at the first `--`: (this script's arguments, arguments for ddpm_jax.main)."""
  argv = list(argv)
  if '--' in argv:
    i = argv.index('--')
    return argv[:i], argv[i + 1:]
  return argv, []


def render(command: Command, cwd: Optional[str] = None) -> str:
  """The copy-pasteable form of a command: argv shell-quoted with shlex.join, lines as they are."""
  text = command if isinstance(command, str) else shlex.join(command)
  return f'cd {shlex.quote(cwd)} && {text}' if cwd else text


class Runner:
  """Runs commands, or only prints them (one per line on stdout) when `dry_run`."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def __call__(self, command: Command, cwd: Optional[str] = None, check: bool = True) -> int:
    text = render(command, cwd)
    if self.dry_run:
      print(text, flush=True)
      return 0
    print(f'+ {text}', file=sys.stderr, flush=True)
    argv = ['bash', '-c', command] if isinstance(command, str) else command
    # Ctrl-C reaches the command too: wait for it to stop (a trainer saves first), then go on.
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
      returncode = subprocess.call(argv, cwd=cwd)
    finally:
      signal.signal(signal.SIGINT, previous)
    if check and returncode:
      raise CommandFailed(f'this command failed with exit status {returncode}: {text}',
                          returncode)
    return returncode

  def note(self, message: str) -> None:
    """A step that is not a single command: a `#` comment with --dry-run, progress otherwise."""
    if self.dry_run:
      print(f'# {message}', flush=True)
    else:
      info(message)


def query(argv: List[str]) -> Tuple[int, str]:
  """Runs a read-only command (never under --dry-run) and returns (exit status, stdout)."""
  result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          stdin=subprocess.DEVNULL, text=True)
  return result.returncode, result.stdout.strip()


def have(program: str) -> bool:
  return shutil.which(program) is not None


def config_path(path: str) -> str:
  """The config as a path relative to the repository (the commands run there), or exits."""
  for candidate in (os.path.join(ROOT, path), os.path.abspath(path)):
    if os.path.isfile(candidate):
      relative = os.path.relpath(candidate, ROOT)
      return relative if not relative.startswith('..') else candidate
  names = sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, 'configs'))
                 if n.endswith('.py') and not n.startswith('_'))
  fail(f'config file {path!r} not found: pass --config=configs/<name>.py with a name '
       f'from {", ".join(names)}.')


def local_workdir(workdir: str) -> str:
  """A workdir as the job will see it after `cd` to the repository: gs:// as is, else absolute."""
  if workdir.startswith('gs://'):
    return workdir
  return os.path.abspath(os.path.expanduser(workdir))


def train_argv(python: str, config: str, workdir: str, mode: str,
               extra: Sequence[str]) -> List[str]:
  """The `ddpm_jax.main` command; `extra` (what followed `--`) goes last, unchanged."""
  return [python, '-m', 'ddpm_jax.main', f'--config={config}', f'--workdir={workdir}',
          f'--mode={mode}', *extra]


def follow_argv(python: str, config: str, workdir: str, poll_s: int, timeout_s: int,
                extra: Sequence[str]) -> List[str]:
  """The follower: `ddpm_jax.main --mode=eval --follow`, evaluating each new checkpoint."""
  return train_argv(python, config, workdir, 'eval',
                    ['--follow', f'--follow_poll={poll_s}', f'--follow_timeout={timeout_s}',
                     *extra])


def retry_loop(train_command: str, status_file: str, max_restarts: int,
               restart_delay_s: int) -> str:
  """A bash loop that reruns `train_command` until it exits 0, or 1 (a mistake to fix).

  Every rerun is the same command, so it resumes from the latest checkpoint in the workdir.
  After exit status 75 (preempted, interrupted, or a full disk) it always reruns; after a crash
  (70, or any other status) at most `max_restarts` times. The final word, `done` or `failed`,
  goes to `status_file` (a path already shell-ready).
  """
  return (
      f'export PYTHONUNBUFFERED=1; rm -f {status_file}; runs=0; restarts=0; '
      f'while true; do runs=$((runs + 1)); echo "[launch] $(date -u): run $runs"; '
      f'{train_command}; rc=$?; '
      f'if [ "$rc" -eq 0 ]; then echo done > {status_file}; exit 0; fi; '
      f'if [ "$rc" -eq {MISTAKE} ]; then '
      f'echo "[launch] exit status {MISTAKE}: fix the command or the config; not restarting"; '
      f'echo failed > {status_file}; exit "$rc"; fi; '
      f'if [ "$rc" -eq {PREEMPTED} ]; then '
      f'echo "[launch] exit status {PREEMPTED} (preempted): resuming in {restart_delay_s}s"; '
      f'else if [ "$restarts" -ge {max_restarts} ]; then '
      f'echo "[launch] exit status $rc after {max_restarts} restarts: giving up"; '
      f'echo failed > {status_file}; exit "$rc"; fi; '
      f'restarts=$((restarts + 1)); what=""; '
      f'if [ "$rc" -eq {CRASH} ]; then what=" (crashed)"; fi; '
      f'echo "[launch] exit status $rc$what: restart $restarts/{max_restarts} in '
      f'{restart_delay_s}s, resuming from the latest checkpoint"; fi; '
      f'sleep {restart_delay_s}; done')


def stop_job(pid_file: str) -> str:
  """Kills the process group of a job started by `start_detached` (no-op if there is none)."""
  return (f'if [ -f {pid_file} ]; then kill -- -$(cat {pid_file}) 2>/dev/null; '
          f'rm -f {pid_file}; fi')


def start_detached(cd: str, loop: str, log_dir: str, log_file: str, pid_file: str) -> str:
  """A bash line that stops the previous job, then runs `loop` from `cd` in its own session.

  nohup + setsid + redirected stdio let it outlive the shell (or ssh session) that started it;
  its pid, which is also its process group, goes to `pid_file` for `stop_job`. All paths are
  already shell-ready (quoted, or `~/...` to expand).
  """
  return (f'mkdir -p {log_dir}; {stop_job(pid_file)}; cd {cd} || exit 1; '
          f'nohup setsid bash -c {shlex.quote(loop)} >> {log_file} 2>&1 < /dev/null & '
          f'echo $! > {pid_file}')


def add_job_flags(parser: argparse.ArgumentParser, default_config: str,
                  mode: bool = True) -> None:
  """Flags that every script passes to `ddpm_jax.main` (--mode unless `mode` is False)."""
  parser.add_argument('--config', default=default_config,
                      help='config file, relative to the repository (default: %(default)s)')
  if mode:
    parser.add_argument('--mode', default='train', choices=('train', 'sample', 'eval', 'all'),
                        help='ddpm_jax.main --mode (default: %(default)s)')


def add_follow_flags(parser: argparse.ArgumentParser) -> None:
  """The follower's: how often it looks for a checkpoint, how long it waits for one."""
  parser.add_argument('--follow-poll', type=positive_int, default=60, metavar='SECONDS',
                      help='seconds between looks for a new checkpoint (default: %(default)s)')
  parser.add_argument('--follow-timeout', type=nonnegative_int, default=6 * 3600,
                      metavar='SECONDS',
                      help='stop after this long without a new checkpoint (default: '
                           '%(default)s, 6 h); it also stops after the last training step')


def add_retry_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--max-restarts', type=nonnegative_int, default=10,
                      help=f'reruns after a crash (exit status {CRASH}, or killed by a signal) '
                           f'before giving up; preemptions (exit status {PREEMPTED}) always '
                           f'rerun, mistakes (exit status {MISTAKE}) never (default: %(default)s)')
  parser.add_argument('--restart-delay', type=nonnegative_int, default=60, metavar='SECONDS',
                      help='pause before a rerun (default: %(default)s)')


def add_dry_run_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--dry-run', action='store_true',
                      help='print the commands, one per line, shell-quoted, instead of running '
                           'them')
