"""python -m ddpm_jax.convert --config=C --workdir=DIR (--from=PATH | --to_diffusers=OUT)

See `ddpm_jax/convert/__init__.py`. Exit status 1 with one sentence on stderr for bad input.
"""
from absl import app, flags

from ddpm_jax import cli, convert

_WORKDIR = flags.DEFINE_string('workdir', None, 'The workdir to import into or export from.')
_FROM = flags.DEFINE_string('from', '', 'TF checkpoint or diffusers folder to import.')
_TO_DIFFUSERS = flags.DEFINE_string('to_diffusers', '', 'Folder (local or gs://) to export a '
                                    'DDPMPipeline to.')
flags.adopt_module_key_flags(cli)  # --config in --help
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv) -> None:
  cli.no_arguments(argv)
  cli.start(cli.CONFIG.value)
  convert.run(cli.CONFIG.value, cli.local_path(_WORKDIR.value),
              from_path=cli.local_path(_FROM.value),
              to_diffusers=cli.local_path(_TO_DIFFUSERS.value))


if __name__ == '__main__':
  app.run(cli.with_user_errors(main), flags_parser=cli.parse_flags)
