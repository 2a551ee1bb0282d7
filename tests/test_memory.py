"""Memory estimates: remat and bfloat16 shrink what the backward pass keeps; accumulation the peak."""
from configs import cifar10
from ddpm_jax import memory
from tests.conftest import tiny_digits_config


def test_remat_and_bfloat16_shrink_what_the_backward_pass_keeps():
  config = cifar10.get_config()  # shapes only: nothing is compiled or run
  saved = {}
  for dtype, remat in (('float32', 'none'), ('float32', 'blocks'), ('bfloat16', 'none')):
    config.model.dtype, config.model.remat = dtype, remat
    saved[dtype, remat] = memory.saved_for_backward_bytes(config, 16)
  reference = saved['float32', 'none']
  assert 1e9 < reference < 2e9  # ~8 activations of [16, 32, 32, 128+] per block, float32
  assert saved['float32', 'blocks'] < 0.3 * reference  # only the blocks' inputs
  assert saved['bfloat16', 'none'] < 0.55 * reference  # bfloat16 activations, float32 weights


def test_gradient_accumulation_lowers_the_compiled_peak():
  config = tiny_digits_config()
  config.data.image_size = 32  # activations, not weights, dominate
  config.training.grad_accum_steps = 4
  accumulated = memory.train_step_bytes(config, 16)
  config.training.grad_accum_steps = 1
  assert accumulated < 0.7 * memory.train_step_bytes(config, 16)


def test_fits_uses_the_table_with_a_margin():
  assert memory.fits(15 * memory.GiB) == [
      'TPU v4', 'TPU v5p', 'TPU v6e', 'A100 40GB', 'A100 80GB', 'H100 80GB', 'H200 141GB']
  assert 'TPU v3 core' in memory.fits(14 * memory.GiB)
