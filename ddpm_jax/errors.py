"""The exception types the commands turn into exit statuses, and the sentences errors become.

UserError: a mistake to fix, status 1. Stopped: stopped before finishing with nothing lost
(SIGTERM, Ctrl-C, a full disk), status 75: rerunning the same command continues. Anything
else is a crash, status 70 (`cli.with_user_errors`).
"""


class UserError(ValueError):
  """Bad input (a config value, a path, a checkpoint): the message says what to do.

  The commands (`ddpm_jax.cli`) print the message alone (no traceback) and exit with status 1.
  """


class Stopped(Exception):
  """Stopped before finishing, nothing lost: the message says what was left and to rerun.

  The commands (`ddpm_jax.cli`) print the message alone and exit with status 75 (EX_TEMPFAIL).
  """


def one_line(error: Exception) -> str:
  """`Type: message` on one line, at most 300 characters of the message."""
  text = ' '.join(str(error).split())
  return f'{type(error).__name__}: {text[:300]}'


def unwritable_workdir(workdir, error: OSError) -> UserError:
  return UserError(f'Cannot write to --workdir={workdir} ({one_line(error)}); pass a directory '
                   f'you can write to.')
