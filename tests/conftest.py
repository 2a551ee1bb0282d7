"""Shared test setup: CPU only, 8 host devices, no network."""
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # so `configs.<name>` imports in tests


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: end-to-end tests (run in CI too)')
