"""--mode=eval: bits/dim, rate-distortion and the digits sample check on a tiny trained model."""
import json

import numpy as np
from etils import epath

from ddpm_jax import evaluation


def test_rate_distortion_from_terms():
  bpd = {'terms_bpd': np.array([3.0, 0.5, 0.25, 0.125]), 'prior_bpd': 0.01,
         'mse': np.array([0.0, 0.01, 0.04, 0.09]), 'total_bpd': 3.885}
  rd = evaluation.rate_distortion(bpd)
  # At step t the receiver holds latent t: the prior and the terms T-1 .. t+1 were sent.
  np.testing.assert_allclose(rd['rate_bpd'], [0.885, 0.385, 0.135, 0.01])
  np.testing.assert_allclose(rd['distortion_rmse'], [0.0, 12.75, 25.5, 38.25])


def test_eval_writes_bpd_rate_distortion_and_the_digits_check(trained_digits):
  config, workdir = trained_digits
  out = evaluation.evaluate(config, workdir)
  metrics = json.loads(epath.Path(out['metrics_json']).read_text())
  step = metrics['step']
  assert step == config.training.num_train_steps
  for key in ('bpd_test', 'bpd_train', 'prior_bpd_test', 'l0_bpd_test', 'digits'):
    assert key in metrics
  assert 0 < metrics['bpd_test'] < 20 and np.isfinite(metrics['bpd_train'])
  digits = metrics['digits']
  assert len(digits['class_shares']) == 10 and abs(sum(digits['class_shares']) - 1) < 1e-3
  assert digits['classifier_test_accuracy'] > 0.9

  rd = json.loads((epath.Path(workdir) / 'eval' / f'rate_distortion_{step}.json').read_text())
  assert (epath.Path(workdir) / 'eval' / f'rate_distortion_{step}.png').exists()
  rate, distortion = np.array(rd['rate_bpd']), np.array(rd['distortion_rmse'])
  assert len(rate) == config.diffusion.num_timesteps
  assert np.all(np.diff(rate) <= 0)  # rate falls with t
  # Distortion rises with t (up to the Monte-Carlo noise of one q sample per t on 16 images).
  ranks = np.argsort(np.argsort(distortion))
  assert np.corrcoef(ranks, np.arange(len(ranks)))[0, 1] > 0.95
  assert np.all(np.diff(np.convolve(distortion, np.ones(8) / 8, 'valid')[::8]) > 0)
  assert distortion[-1] > 5 * distortion[0]
  np.testing.assert_allclose(rd['total_bpd'], metrics['bpd_test'], rtol=1e-6)


def test_the_rate_distortion_plot_keeps_the_users_matplotlib_backend(tmp_path):
  import matplotlib
  before = matplotlib.get_backend()
  matplotlib.use('svg')  # a notebook's backend stands in: any but the Agg a plot would switch to
  try:
    rd = evaluation.rate_distortion({'terms_bpd': np.array([3.0, 0.5]), 'prior_bpd': 0.01,
                                     'mse': np.array([0.0, 0.01]), 'total_bpd': 3.51})
    path = evaluation.plot_rate_distortion(rd, epath.Path(tmp_path) / 'rd.png')
    assert matplotlib.get_backend() == 'svg'
    assert epath.Path(path).read_bytes().startswith(b'\x89PNG')
  finally:
    matplotlib.use(before)


def test_without_a_held_out_split_nothing_is_reported_as_test(trained_digits, tmp_path):
  """data.eval_split='train' (LSUN cat, CelebA-HQ): train numbers only, named train."""
  import shutil
  config, workdir = trained_digits
  workdir = shutil.copytree(workdir, tmp_path / 'workdir',  # the checkpoints, not the results
                             ignore=shutil.ignore_patterns('eval', 'samples'))
  config = config.copy_and_resolve_references()
  config.data.eval_split = 'train'
  config.sampling.num_samples = 20
  out = evaluation.evaluate(config, str(workdir))
  metrics = json.loads(epath.Path(out['metrics_json']).read_text())
  assert 'bpd_train' in metrics and not [key for key in metrics if key.endswith('_test')]
  step = metrics['step']
  rd = json.loads((epath.Path(workdir) / 'eval' / f'rate_distortion_{step}.json').read_text())
  assert rd['split'] == 'train'
  np.testing.assert_allclose(rd['total_bpd'], metrics['bpd_train'], rtol=1e-6)
