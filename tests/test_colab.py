"""Runs colabs/ddpm_jax.ipynb top to bottom on CPU with a tiny config, as papermill would."""
import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'colabs', 'ddpm_jax.ipynb')
CELL_TIMEOUT_S = 300


def with_parameters(notebook, **parameters):
  """The notebook with a cell setting `parameters` after its `parameters` cell (papermill's way)."""
  index = next(i for i, cell in enumerate(notebook.cells)
               if 'parameters' in cell.metadata.get('tags', []))
  source = '\n'.join(f'{name} = {value!r}' for name, value in parameters.items())
  injected = nbformat.v4.new_code_cell(source, metadata={'tags': ['injected-parameters']})
  notebook.cells.insert(index + 1, injected)
  return notebook


def kernel_for_this_python(tmp_path, monkeypatch) -> str:
  """A Jupyter kernel running this Python (sys.executable), whatever kernels are installed."""
  from ipykernel import kernelspec
  name = 'ddpm_jax_test'
  prefix = tmp_path / 'jupyter'
  monkeypatch.setenv('JUPYTER_PATH', str(prefix / 'share' / 'jupyter'))
  kernelspec.install(kernel_name=name, prefix=str(prefix))  # argv: [sys.executable, ...]
  return name


@pytest.mark.slow
def test_notebook_runs_with_a_tiny_config(tmp_path, monkeypatch):
  kernel_name = kernel_for_this_python(tmp_path, monkeypatch)
  # The kernel: CPU only, ddpm_jax from this checkout, 8 host devices as on a TPU v3-8.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [ROOT,
                                                                  os.environ.get('PYTHONPATH')])))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')
  monkeypatch.delenv('MPLBACKEND', raising=False)  # the kernel's inline backend: figures as PNGs

  notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4), TINY=True,
                             WORKDIR=str(tmp_path / 'workdir'), NUM_SAMPLES=16,
                             BPD_NUM_IMAGES=16)
  client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name=kernel_name,
                                   resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError, naming the cell, if any cell raises

  workdir = tmp_path / 'workdir'
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['20']
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'At step 20' in text and 'Test bits/dim' in text
  figures = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(figures) == 7  # q, the loss, samples, DDIM samples, Fig. 6, Fig. 8, bits/dim
