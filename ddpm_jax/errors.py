"""The one exception type for mistakes a user can fix, and the sentences other errors become."""


class UserError(ValueError):
  """Bad input (a config value, a path, a checkpoint): the message says what to do.

  The commands (`ddpm_jax.cli`) print the message alone (no traceback) and exit with status 1.
  """


def one_line(error: Exception) -> str:
  """`Type: message` on one line, at most 300 characters of the message."""
  text = ' '.join(str(error).split())
  return f'{type(error).__name__}: {text[:300]}'


def unwritable_workdir(workdir, error: OSError) -> UserError:
  return UserError(f'Cannot write to --workdir={workdir} ({one_line(error)}); pass a directory '
                   f'you can write to.')
