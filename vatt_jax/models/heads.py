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

Token outputs (Norton's frame–word similarity): per-frame and per-word encoder outputs take the same
path as the video's (or the text's) representation, with batch norm in inference form (its running
statistics) in training too, so the tokens neither update the statistics nor mix into the batch's.
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
    audio_text_bn: audio→va and text→vt as Dense (no bias) + batch norm (the paper's "linear
      projection + BN"); False: a Dense with bias and no batch norm (the official code, bridge.py).
    bn_momentum, bn_epsilon: batch norm settings (0.9 and 1e-5 as the official code).
  """

  va_dim: int = 512
  vt_dim: int = 256
  relu_before_vt: bool = False
  audio_text_bn: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  def _linear_bn(
    self,
    x: jax.Array,
    features: int,
    name: str,
    train: bool,
    *,
    from_common: bool = False,
    tokens: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array | None]:
    """(layer(x), layer(tokens)): the tokens go through the same dense layer and batch norm, the
    norm always with its running statistics as they were before this batch (the tokens neither use
    nor update batch statistics)."""
    kernel_axes = (None if from_common else 'embed', 'common')
    dense = nn.Dense(
      features,
      use_bias=False,
      kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, kernel_axes),
      dtype=jnp.float32,
      name=f'{name}_dense',
    )
    norm = nn.BatchNorm(
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('common',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('common',)),
      name=f'{name}_bn',
    )
    projected = None
    if tokens is not None:  # first: the representation's call below updates the statistics
      flat = tokens.reshape(-1, tokens.shape[-1]).astype(jnp.float32)
      flat = norm(dense(flat), use_running_average=True)
      projected = flat.reshape(*tokens.shape[:-1], features)
    return norm(dense(x.astype(jnp.float32)), use_running_average=not train), projected

  def _linear(
    self, x: jax.Array, features: int, name: str, *, tokens: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array | None]:
    """(dense(x), dense(tokens)) with a Dense that has a bias and no batch norm (the official
    code's audio→va and text→vt)."""
    dense = nn.Dense(
      features,
      kernel_init=nn.with_logical_partitioning(nn.linear.default_kernel_init, ('embed', 'common')),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('common',)),
      dtype=jnp.float32,
      name=f'{name}_dense',
    )
    projected = None if tokens is None else dense(tokens.astype(jnp.float32))
    return dense(x.astype(jnp.float32)), projected

  def _modality(self, x, features, name, train, *, tokens=None):
    """audio→va / text→vt: Dense + BN, or (audio_text_bn False) a Dense with bias."""
    if self.audio_text_bn:
      return self._linear_bn(x, features, name, train, tokens=tokens)
    return self._linear(x, features, name, tokens=tokens)

  @nn.compact
  def __call__(
    self,
    *,
    video: jax.Array | None = None,
    audio: jax.Array | None = None,
    text: jax.Array | None = None,
    video_frames: jax.Array | None = None,
    text_words: jax.Array | None = None,
    train: bool,
  ) -> dict[str, jax.Array]:
    """video: [B, Dv]; audio: [B, Da]; text: [B, K, Dt] (K narrations). Any may be None.
    video_frames [B, F, Dv] / text_words [B, K, W, Dt]: token outputs projected along the video's
    (or the text's) path into the vt space (with video / text given).

    Returns a dict with video_va [B, va], video_vt [B, vt], audio_va [B, va], text_vt [B, K, vt]
    for the modalities given, and video_frames_vt [B, F, vt], text_words_vt [B, K, W, vt].
    """
    out = {}
    if video is not None:
      hidden, frames = self._linear_bn(video, self.va_dim, 'video_va_1', train, tokens=video_frames)
      hidden = nn.relu(hidden)
      frames = None if frames is None else nn.relu(frames)
      out['video_va'], frames = self._linear_bn(
        hidden, self.va_dim, 'video_va_2', train, from_common=True, tokens=frames
      )
      to_vt = nn.relu(out['video_va']) if self.relu_before_vt else out['video_va']
      if frames is not None and self.relu_before_vt:
        frames = nn.relu(frames)
      out['video_vt'], frames = self._linear_bn(
        to_vt, self.vt_dim, 'video_vt', train, from_common=True, tokens=frames
      )
      if frames is not None:
        out['video_frames_vt'] = frames
    if audio is not None:
      out['audio_va'], _ = self._modality(audio, self.va_dim, 'audio_va', train)
    if text is not None:
      flat = text.reshape(-1, text.shape[-1])
      text_vt, words = self._modality(flat, self.vt_dim, 'text_vt', train, tokens=text_words)
      out['text_vt'] = text_vt.reshape(*text.shape[:-1], self.vt_dim)
      if words is not None:
        out['text_words_vt'] = words
    return out
