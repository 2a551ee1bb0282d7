"""The random streams a run draws from `config.seed`, in one table, so that none overlap.

Training's own stream is `split(PRNGKey(seed))` (`train_step.create_train_state`); the keyed
streams are `key(seed, STREAM)` = fold_in(PRNGKey(seed), STREAM); the sample files of
`inference.generate` take an integer seed, `seed + *_OFFSET`. The numbers are the ones the
project has always used: changing one changes results, and the settings that cached samples and
bits/dim progress are keyed by.
"""
import jax

TRAINING_GRID = 1  # the sample grids of training (the same x_T at every grid)
BITS_PER_DIM = 7  # the bound's q_sample noise (batch i folds in i)
FIGURES = 1 << 20  # --mode=sample's Fig. 6 and Fig. 8
SAMPLES_OFFSET = 0  # the samples of --mode=sample and of the digits evaluation
FID_SAMPLES_OFFSET = 1  # the FID/IS/KID samples: not the ones shown
BENCHMARK_SAMPLER = 2  # the benchmark's reverse-chain noise
# The random eval.fid_reference_images of a larger split (numpy's generator): one fixed subset,
# not config.seed's, so that FIDs of runs with different seeds are against the same images.
FID_REFERENCE_SUBSET = 0


def key(seed: int, stream: int) -> jax.Array:
  """The PRNG key of `stream` (one of the constants above) for `seed`."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), stream)
