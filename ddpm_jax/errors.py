"""The one exception type for mistakes a user can fix."""


class UserError(ValueError):
  """Bad input (a config value, a path, a checkpoint): the message says what to do.

  `ddpm_jax.main` prints the message alone (no traceback) and exits with status 1.
  """
