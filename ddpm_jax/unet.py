"""The paper's U-Net (the authors' `diffusion_tf/models/unet.py`) in Flax.

PixelCNN++-style residual blocks with GroupNorm, the sinusoidal time embedding added in every
block, single-head self-attention at the resolutions in `attn_resolutions` and in the middle.
Parameters are float32; `dtype` sets the compute dtype (bfloat16 on TPU). NHWC throughout.
"""
import functools
import math
import zlib
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddpm_jax.errors import UserError


def default_init(scale: float = 1.0):
  """The authors' initializer: variance scaling, fan_avg, uniform; scale 0 means 1e-10."""
  return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, 'fan_avg', 'uniform')


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int) -> jax.Array:
  """Sinusoidal embedding [B, embedding_dim]: [sin, cos] of t * exp(-log(10000) i / (half - 1))."""
  assert timesteps.ndim == 1
  half_dim = embedding_dim // 2
  freqs = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -(math.log(10000) / (half_dim - 1)))
  emb = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
  if embedding_dim % 2 == 1:  # zero pad
    emb = jnp.pad(emb, [[0, 0], [0, 1]])
  return emb


class _Layers(nn.Module):
  """Base with the dtype and GroupNorm plumbing shared by every block."""
  dtype: Any = jnp.float32
  num_groups: int = 32  # the paper's; configs/digits.py (ch=32) uses 8

  def conv(self, features, *, kernel=3, stride=1, scale=1.0, name=None):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding='SAME',
                   kernel_init=default_init(scale), dtype=self.dtype, name=name)

  def dense(self, features, *, scale=1.0, name=None):
    return nn.Dense(features, kernel_init=default_init(scale), dtype=self.dtype, name=name)

  def norm(self, name=None):
    return GroupNorm(num_groups=self.num_groups, dtype=self.dtype, name=name)


class GroupNorm(nn.Module):
  """`nn.GroupNorm(num_groups, epsilon=1e-6)`: the same parameters and statistics, faster on CPU.

  The group statistics are built from per-channel means over the pixels (a reduction that
  vectorises over channels) rather than a reduction over a [B, H, W, G, C/G] view, and the
  normalisation is one per-channel multiply-add. On a 2-core CPU that is 2-3.5x faster than
  flax's (with the gradient 1.7-2.3x); the outputs agree to float32 rounding.
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    if channels % self.num_groups:
      raise UserError(f'GroupNorm: {channels} channels do not split into model.num_groups='
                      f'{self.num_groups} groups; pick a num_groups that divides model.ch.')
    scale = self.param('scale', nn.initializers.ones, (channels,))
    bias = self.param('bias', nn.initializers.zeros, (channels,))
    return _group_norm(x, scale, bias, self.num_groups, self.epsilon, jnp.dtype(self.dtype))


@functools.partial(jax.checkpoint, static_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, num_groups: int, epsilon: float, dtype):
  """GroupNorm in float32 whatever x's dtype; the backward pass recomputes it from x.

  Only x (in the compute dtype) is saved for the backward pass: the float32 copy of a bfloat16
  x and the float32 products that would otherwise be saved are recomputed (cheap elementwise
  work), so a bfloat16 model keeps bfloat16 activations only.
  """
  batch, height, width, channels = x.shape
  pixels = x.astype(jnp.float32)

  def group_mean(y):  # [B, H, W, C] -> [B, 1, 1, C]: the mean over each channel's group
    mean = y.reshape(batch, height * width, channels).mean(axis=1)
    mean = mean.reshape(batch, num_groups, -1).mean(axis=2, keepdims=True)
    return jnp.broadcast_to(mean, (batch, num_groups, channels // num_groups)
                            ).reshape(batch, 1, 1, channels)

  mean = group_mean(pixels)
  var = jnp.maximum(0.0, group_mean(jnp.square(pixels)) - jnp.square(mean))
  mul = jax.lax.rsqrt(var + epsilon) * scale
  return (pixels * mul + (bias - mean * mul)).astype(dtype)


def dropout(x: jax.Array, rate: float, keys: jax.Array, layer: str) -> jax.Array:
  """Dropout of x [B, ...] whose mask for example i is drawn from keys[i] and `layer` alone.

  `keys`: one PRNG key per example ([B, 2] uint32). The mask of an example is the same whatever
  else is in the batch, so a batch's update is the same on any number of devices and in any
  number of microbatches; only the random bits are drawn per example (a vmap), the network runs
  on the whole batch (vmapping the network costs XLA:CPU a fifth of a train step). Each
  activation is dropped when 16 random bits fall below round(rate * 2**16), half the threefry
  work of a float draw: the rate is kept to 1/65536 (0.1 drops 0.1000061 of the activations)
  and the kept ones are scaled by the exact inverse of their share.
  """
  threshold = min(round(rate * 2**16), 2**16 - 1)  # a rate in [0, 1)
  keep = 1.0 - threshold / 2**16
  layer_id = zlib.crc32(layer.encode())  # distinct masks in every layer
  draw = lambda key: jax.random.bits(jax.random.fold_in(key, layer_id), x.shape[1:], jnp.uint16)
  kept = jax.vmap(draw)(keys) >= jnp.uint16(threshold)
  return jnp.where(kept, x / keep, jnp.zeros_like(x))


class ResnetBlock(_Layers):
  out_ch: int = 0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, temb, dropout_keys: Optional[jax.Array] = None):
    """`dropout_keys`: one key per example while training (see `dropout`); None: no dropout."""
    in_ch = x.shape[-1]
    h = self.conv(self.out_ch, name='conv1')(nn.swish(self.norm(name='norm1')(x)))
    h = h + self.dense(self.out_ch, name='temb_proj')(nn.swish(temb))[:, None, None, :]
    h = nn.swish(self.norm(name='norm2')(h))
    if dropout_keys is not None and self.dropout > 0:
      h = dropout(h, self.dropout, dropout_keys, self.name)
    h = self.conv(self.out_ch, scale=0.0, name='conv2')(h)
    if in_ch != self.out_ch:
      x = self.dense(self.out_ch, name='nin_shortcut')(x)
    return x + h


class AttnBlock(_Layers):

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = self.norm(name='norm')(x)
    q = self.dense(channels, name='q')(h).reshape(batch, height * width, channels)
    k = self.dense(channels, name='k')(h).reshape(batch, height * width, channels)
    v = self.dense(channels, name='v')(h).reshape(batch, height * width, channels)
    w = jnp.einsum('bqc,bkc->bqk', q, k) * (channels**-0.5)
    w = nn.softmax(w.astype(jnp.float32), axis=-1).astype(self.dtype)
    h = jnp.einsum('bqk,bkc->bqc', w, v).reshape(batch, height, width, channels)
    h = self.dense(channels, scale=0.0, name='proj_out')(h)
    return x + h


class Downsample(_Layers):
  with_conv: bool = True

  @nn.compact
  def __call__(self, x):
    if self.with_conv:
      return self.conv(x.shape[-1], stride=2, name='conv')(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME')


class Upsample(_Layers):
  with_conv: bool = True

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    x = x.reshape(batch, 2 * height, 2 * width, channels)  # nearest neighbour
    if self.with_conv:
      x = self.conv(channels, name='conv')(x)
    return x


# model.remat: which blocks the backward pass recomputes from their inputs instead of keeping
# their activations. 'blocks': every residual and attention block (flax.linen.remat keeps the
# parameter names); the saved activations shrink to the blocks' inputs, for one more forward pass.
REMAT_BLOCKS = {
    'none': (ResnetBlock, AttnBlock),
    'blocks': (nn.remat(ResnetBlock), nn.remat(AttnBlock)),
}
COMPUTE_DTYPES = ('float32', 'bfloat16')


class UNet(_Layers):
  """The authors' `unet.model`; returns [B, H, W, out_ch] in float32."""
  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.0
  resamp_with_conv: bool = True
  remat: str = 'none'  # a key of REMAT_BLOCKS

  @nn.compact
  def __call__(self, x, t, train: bool = False, dropout_keys: Optional[jax.Array] = None):
    """x [B, H, W, C], t [B]. With `train`, dropout: its masks come from `dropout_keys`, one
    PRNG key per example (the train step's: an example's masks do not depend on the rest of the
    batch), or else from the 'dropout' rng split per example."""
    batch, size, width, _ = x.shape
    if size != width or size % 2**(len(self.ch_mult) - 1):
      raise UserError(f'The U-Net needs square images whose size divides by '
                       f'{2**(len(self.ch_mult) - 1)} (ch_mult has {len(self.ch_mult)} levels); '
                       f'got {size}x{width}.')
    if t.shape != (batch,):
      raise UserError(f't must have shape [batch] = [{batch}], got {tuple(t.shape)}.')
    if not train:
      dropout_keys = None
    elif dropout_keys is None and self.dropout > 0:
      dropout_keys = jax.random.split(self.make_rng('dropout'), batch)
    resnet_block, attn_block = REMAT_BLOCKS[self.remat]
    block = lambda out_ch, name: resnet_block(out_ch=out_ch, dropout=self.dropout,
                                              dtype=self.dtype, num_groups=self.num_groups,
                                              name=name)
    attn = lambda name: attn_block(dtype=self.dtype, num_groups=self.num_groups, name=name)

    # Timestep embedding
    temb = get_timestep_embedding(t, self.ch)
    temb = self.dense(self.ch * 4, name='temb_dense0')(temb)
    temb = self.dense(self.ch * 4, name='temb_dense1')(nn.swish(temb))

    # Downsampling
    hs = [self.conv(self.ch, name='conv_in')(x.astype(self.dtype))]
    for i_level, mult in enumerate(self.ch_mult):
      for i_block in range(self.num_res_blocks):
        h = block(self.ch * mult, f'down_{i_level}_block_{i_block}')(hs[-1], temb, dropout_keys)
        if h.shape[1] in self.attn_resolutions:
          h = attn(f'down_{i_level}_attn_{i_block}')(h)
        hs.append(h)
      if i_level != len(self.ch_mult) - 1:
        hs.append(Downsample(with_conv=self.resamp_with_conv, dtype=self.dtype,
                             name=f'down_{i_level}_downsample')(hs[-1]))

    # Middle
    h = hs[-1]
    h = block(h.shape[-1], 'mid_block_1')(h, temb, dropout_keys)
    h = attn('mid_attn_1')(h)
    h = block(h.shape[-1], 'mid_block_2')(h, temb, dropout_keys)

    # Upsampling
    for i_level in reversed(range(len(self.ch_mult))):
      for i_block in range(self.num_res_blocks + 1):
        h = block(self.ch * self.ch_mult[i_level], f'up_{i_level}_block_{i_block}')(
            jnp.concatenate([h, hs.pop()], axis=-1), temb, dropout_keys)
        if h.shape[1] in self.attn_resolutions:
          h = attn(f'up_{i_level}_attn_{i_block}')(h)
      if i_level != 0:
        h = Upsample(with_conv=self.resamp_with_conv, dtype=self.dtype, name=f'up_{i_level}_upsample')(h)
    assert not hs

    # End
    h = nn.swish(self.norm(name='norm_out')(h))
    h = self.conv(self.out_ch, scale=0.0, name='conv_out')(h)
    return h.astype(jnp.float32)


def create_model(config) -> UNet:
  """The U-Net of a validated config (`config_validation`): 2C output channels when the
  variance is learned."""
  m, d = config.model, config.data
  learned = config.diffusion.model_var_type.startswith('learned')
  return UNet(ch=m.ch, out_ch=d.channels * (2 if learned else 1), ch_mult=tuple(m.ch_mult),
              num_res_blocks=m.num_res_blocks, attn_resolutions=tuple(m.attn_resolutions),
              dropout=m.dropout, resamp_with_conv=m.resamp_with_conv,
              dtype=jnp.dtype(m.dtype), num_groups=m.num_groups, remat=m.remat)
