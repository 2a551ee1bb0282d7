"""XLA flags that make the U-Net faster on CPU, set in XLA_FLAGS before JAX starts its backend.

XLA's CPU compiler hands convolutions to YNNPACK by default. YNNPACK computes the kernel gradient
of a 3x3 convolution (a convolution with a 32x32 window) 2-6x slower than XLA's own Eigen
convolution, which is as fast or faster on the forward pass and the input gradient too. Leaving
convolutions to Eigen makes the CIFAR-10 train step ~1.4x faster on a 2-core AVX2 CPU (README,
Benchmark); results agree to float32 rounding.

Applied only where they were measured: runs that can only use the CPU (JAX_PLATFORMS=cpu, or no
TPU or GPU plugin installed) with jaxlib 0.10. A flag the user already put in XLA_FLAGS wins.
The commands (`main`, `benchmark`) and the tests' conftest call `apply()` before JAX starts its
backend; a library user opts in the same way (afterwards the flags have no effect).
"""
import importlib.metadata
import importlib.util
import os

CPU_FLAGS = {'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution'}
_MEASURED_JAXLIB = '0.10.'
_ACCELERATOR_MODULES = ('libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm7_plugin')


def _cpu_only(environ) -> bool:
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.lower() == 'cpu'
  return not any(importlib.util.find_spec(m) for m in _ACCELERATOR_MODULES)


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return ''


def apply(environ=os.environ) -> None:
  """Adds CPU_FLAGS to environ['XLA_FLAGS'] where they help, keeping flags already there."""
  if not (_cpu_only(environ) and _jaxlib_version().startswith(_MEASURED_JAXLIB)):
    return
  flags = environ.get('XLA_FLAGS', '').split()
  given = {f.lstrip('-').split('=', 1)[0] for f in flags}
  flags += [f'--{name}={value}' for name, value in CPU_FLAGS.items() if name not in given]
  environ['XLA_FLAGS'] = ' '.join(flags)
