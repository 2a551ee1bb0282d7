"""python -m ddpm_jax.fid --prepare [--pt_inception=PATH_OR_URL] [--cache_dir=DIR]

Fills the FID Inception weights cache once (see `ddpm_jax/fid/weights.py`); `--pt_inception=`
(empty) skips the classifier that only the Inception Score needs.
"""
import argparse
import sys

from ddpm_jax.errors import UserError
from ddpm_jax.fid import weights


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m ddpm_jax.fid',
                                   description='Prepare the FID Inception weights (a cache).')
  parser.add_argument('--prepare', action='store_true',
                      help='download and convert the weights into the cache directory')
  parser.add_argument('--pt_inception', default=weights.PT_INCEPTION_URL,
                      help='path or URL of pytorch-fid\'s pt_inception-2015-12-05-6726825d.pth '
                           '(for the Inception Score); empty to skip')
  parser.add_argument('--cache_dir', default=None, help='default: $DDPM_JAX_CACHE or '
                                                        '~/.cache/ddpm_jax')
  args = parser.parse_args(argv)
  if not args.prepare:
    parser.print_help()
    return
  try:
    lines = weights.prepare(args.pt_inception, args.cache_dir)
  except UserError as e:
    print(e, file=sys.stderr)
    sys.exit(1)
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
