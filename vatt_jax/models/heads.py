"""The multi-level common space (paper §3.3): video–audio (d_va) and video–text (d_vt).

  z_v,va = g_v→va(video)   two linear layers with ReLU between, batch norm after each
  z_a,va = g_a→va(audio)   linear + batch norm
  z_t,vt = g_t→vt(text)    linear + batch norm
  z_v,vt = g_v→vt(z_v,va)  linear + batch norm (the video reaches the vt space through the va space)

Linear layers followed by batch norm carry no bias (the norm's own offset replaces it). Under jit on
global arrays, BatchNorm's statistics are those of the global batch. The heads compute in float32
(they are small, and their outputs feed the losses).

Parameter logical axes: kernels (embed, common) when they read a tower's output, (None, common) when
they read a common-space vector (flax refuses one logical name on two dimensions of an array);
batch norm scale, bias and statistics (common,).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class CommonSpace(nn.Module):
  """Projects backbone outputs into the va and vt spaces.

  Attributes:
    va_dim: width of the video–audio space (512).
    vt_dim: width of the video–text space (256).
    relu_before_vt: apply ReLU to z_v,va before g_v→vt (the official code does; the paper does not).
    bn_momentum, bn_epsilon: batch norm settings (0.9 and 1e-5 as the official code).
  """

  va_dim: int = 512
  vt_dim: int = 256
  relu_before_vt: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  def _linear_bn(
    self, x: jax.Array, features: int, name: str, train: bool, *, from_common: bool = False
  ) -> jax.Array:
    kernel_axes = (None if from_common else 'embed', 'common')
    x = nn.Dense(
      features,
      use_bias=False,
      kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, kernel_axes),
      dtype=jnp.float32,
      name=f'{name}_dense',
    )(x.astype(jnp.float32))
    return nn.BatchNorm(
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('common',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('common',)),
      name=f'{name}_bn',
    )(x)

  @nn.compact
  def __call__(
    self,
    *,
    video: jax.Array | None = None,
    audio: jax.Array | None = None,
    text: jax.Array | None = None,
    train: bool,
  ) -> dict[str, jax.Array]:
    """video: [B, Dv]; audio: [B, Da]; text: [B, K, Dt] (K narrations). Any may be None.

    Returns a dict with video_va [B, va], video_vt [B, vt], audio_va [B, va], text_vt [B, K, vt]
    for the modalities given.
    """
    out = {}
    if video is not None:
      hidden = nn.relu(self._linear_bn(video, self.va_dim, 'video_va_1', train))
      out['video_va'] = self._linear_bn(hidden, self.va_dim, 'video_va_2', train, from_common=True)
      to_vt = nn.relu(out['video_va']) if self.relu_before_vt else out['video_va']
      out['video_vt'] = self._linear_bn(to_vt, self.vt_dim, 'video_vt', train, from_common=True)
    if audio is not None:
      out['audio_va'] = self._linear_bn(audio, self.va_dim, 'audio_va', train)
    if text is not None:
      flat = text.reshape(-1, text.shape[-1])
      text_vt = self._linear_bn(flat, self.vt_dim, 'text_vt', train)
      out['text_vt'] = text_vt.reshape(*text.shape[:-1], self.vt_dim)
    return out
