"""A cheap, deterministic stand-in for the Inception network, for tests of FID's plumbing.

`features` has `fid.inception_features`' signature and outputs (pool3 [N, 2048], logits
[N, 1008]); it pools images to 4x4 and projects them, so similar images get similar features.
`install(monkeypatch)` puts it, and parameters that need no download, in place.
"""
import numpy as np

WIDTH = 2048  # pool3's; a test may narrow it (a 2048-wide FID's eigendecompositions take seconds)
PARAMS = {'stub': np.zeros(3, np.float32)}  # hashed into the reference statistics' cache key
_PROJECTION = np.random.default_rng(0).normal(size=(48, 2048)).astype(np.float32)


def features(images_uint8, *, batch_size: int = 200, params=None) -> dict:
  del batch_size, params
  x = np.asarray(images_uint8, np.float32) / 127.5 - 1
  n, h, w, c = x.shape
  pooled = x.reshape(n, 4, h // 4, 4, w // 4, c).mean(axis=(2, 4)).reshape(n, 16 * c)
  projected = np.tanh(pooled @ _PROJECTION[:16 * c] / 4)
  logits = 4 * projected[:, :1008]
  return {'pool3': projected[:, :WIDTH], 'logits': logits, 'logits_biased': logits}


def install(monkeypatch) -> None:
  from ddpm_jax import fid  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(fid, 'inception_features', features)
  monkeypatch.setattr(fid.weights, 'load_inception_params', lambda *a, **k: (PARAMS, True))
