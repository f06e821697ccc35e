"""VATT assemblies: modality-specific towers (BBS / MBS / LBS) and the modality-agnostic backbone.

Every modality goes through the same pipeline, written once in `VATT._tower`:
  tokenizer (patches + positions) → dropout → DropToken (training) → AGG prepended → encoder
and the encoder's output at the AGG slot is the modality's representation. In the modality-agnostic
variant the three pipelines share one encoder; tokenizers, AGG tokens and the text relative bias stay
per modality.

Precision: with dtype=bfloat16 the matmuls run in bfloat16 while parameters stay float32; norms,
softmax and the common-space heads run in float32, and every output (AGG representations and
common-space embeddings) is float32, so the losses are computed in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vatt_jax.models.attention import RelativePositionBias
from vatt_jax.models.heads import CommonSpace
from vatt_jax.models.tokenizers import (
  VoxelTokenizer,
  WaveformTokenizer,
  WordTokenizer,
  drop_token,
)
from vatt_jax.models.transformer import Encoder, EncoderSize

Dtype = Any
MODALITIES = ('video', 'audio', 'text')


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  size: EncoderSize
  patch_size: Sequence[int] = (4, 16, 16)
  grid: Sequence[int] = (8, 14, 14)
  drop_token_rate: float = 0.5
  position_layernorm: bool = False


@dataclasses.dataclass(frozen=True)
class AudioSpec:
  size: EncoderSize
  patch_size: int = 128
  num_patches: int = 1200
  drop_token_rate: float = 0.5
  position_layernorm: bool = False


@dataclasses.dataclass(frozen=True)
class TextSpec:
  size: EncoderSize
  vocab_size: int = 2**16
  num_buckets: int = 32
  max_distance: int = 64
  bias_all_layers: bool = False
  norm_type: str = 'layernorm'
  scale_logits: bool = True


class VATT(nn.Module):
  """Video–audio–text transformer with a multi-level common space.

  Attributes:
    video, audio, text: per-modality specs; a modality-specific tower is built with its own size.
    shared: if set, the modality-agnostic variant: one encoder of this size for all modalities.
    head: the common-space projection.
    remat: rematerialisation policy of the encoder blocks ('none', 'dots', 'full'; see Encoder).
    dtype: compute dtype of the tokenizers and encoders (parameters are always float32).
  """

  video: VideoSpec
  audio: AudioSpec
  text: TextSpec
  head: CommonSpace
  shared: EncoderSize | None = None
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  remat: str = 'none'
  dtype: Dtype = jnp.float32

  def _width(self, modality: str) -> int:
    return (self.shared or getattr(self, modality).size).width

  def _make_encoder(self, size: EncoderSize, text: TextSpec | None = None) -> Encoder:
    return Encoder(
      size=size,
      dropout_rate=self.dropout_rate,
      attention_dropout_rate=self.attention_dropout_rate,
      norm_type=text.norm_type if text else 'layernorm',
      scale_logits=text.scale_logits if text else True,
      bias_all_layers=text.bias_all_layers if text else False,
      remat=self.remat,
      dtype=self.dtype,
    )

  def setup(self):
    self.video_tokenizer = VoxelTokenizer(
      width=self._width('video'),
      patch_size=tuple(self.video.patch_size),
      grid=tuple(self.video.grid),
      position_layernorm=self.video.position_layernorm,
      dtype=self.dtype,
    )
    self.audio_tokenizer = WaveformTokenizer(
      width=self._width('audio'),
      patch_size=self.audio.patch_size,
      num_patches=self.audio.num_patches,
      position_layernorm=self.audio.position_layernorm,
      dtype=self.dtype,
    )
    self.text_tokenizer = WordTokenizer(
      width=self._width('text'), vocab_size=self.text.vocab_size, dtype=self.dtype
    )
    text_heads = (self.shared or self.text.size).num_heads
    self.text_relative_bias = RelativePositionBias(
      num_heads=text_heads, num_buckets=self.text.num_buckets, max_distance=self.text.max_distance
    )
    self.token_dropout = nn.Dropout(self.dropout_rate)
    agg_init = nn.with_logical_partitioning(
      nn.initializers.truncated_normal(stddev=0.02), ('embed',)
    )
    self.agg_tokens = {m: self.param(f'{m}_agg', agg_init, (self._width(m),)) for m in MODALITIES}
    if self.shared is not None:
      # The text tower's T5 quirks (norm, scaling) are text-only; the shared encoder is standard.
      self.shared_encoder = self._make_encoder(self.shared)
    else:
      self.video_encoder = self._make_encoder(self.video.size)
      self.audio_encoder = self._make_encoder(self.audio.size)
      self.text_encoder = self._make_encoder(self.text.size, self.text)

  def _encoder(self, modality: str) -> Encoder:
    if self.shared is not None:
      return self.shared_encoder
    return getattr(self, f'{modality}_encoder')

  def _tower(self, modality, tokens, *, train, drop_rate=0.0, mask=None, bias=None):
    """tokens [B, N, D] (positions included) → AGG representation [B, D], float32."""
    tokens = self.token_dropout(tokens, deterministic=not train)
    if train and drop_rate > 0.0:
      tokens = drop_token(tokens, drop_rate, self.make_rng('droptoken'))
    batch = tokens.shape[0]
    agg = jnp.broadcast_to(
      self.agg_tokens[modality].astype(tokens.dtype), (batch, 1, tokens.shape[-1])
    )
    tokens = jnp.concatenate([agg, tokens], axis=1)
    if mask is not None:
      mask = jnp.concatenate([jnp.ones((batch, 1), bool), mask], axis=1)
    out = self._encoder(modality)(tokens, mask=mask, bias=bias, deterministic=not train)
    return nn.with_logical_constraint(out[:, 0].astype(jnp.float32), ('batch', 'embed_act'))

  def encode_video(self, video: jax.Array, *, train: bool = False) -> jax.Array:
    """video: [B, T, H, W, 3] in [-1, 1] → AGG output [B, D_video] (float32)."""
    tokens = self.video_tokenizer(video)
    return self._tower('video', tokens, train=train, drop_rate=self.video.drop_token_rate)

  def encode_audio(self, audio: jax.Array, *, train: bool = False) -> jax.Array:
    """audio: [B, S] in [-1, 1] → AGG output [B, D_audio] (float32)."""
    tokens = self.audio_tokenizer(audio)
    return self._tower('audio', tokens, train=train, drop_rate=self.audio.drop_token_rate)

  def encode_text(self, text: jax.Array, *, train: bool = False) -> jax.Array:
    """text: [B, K, W] (or [B, W]) int32 ids, 0 = padding → AGG output [B, K, D_text] (or [B, D])."""
    lead = text.shape[:-1]
    ids = text.reshape(-1, text.shape[-1])
    tokens, mask = self.text_tokenizer(ids)
    bias = self.text_relative_bias(ids.shape[1] + 1)  # +1: the AGG slot takes part in positions
    out = self._tower('text', tokens, train=train, mask=mask, bias=bias)
    return out.reshape(*lead, out.shape[-1])

  def __call__(self, batch: dict[str, jax.Array], *, train: bool = False) -> dict[str, jax.Array]:
    """Encodes the modalities present in `batch` and projects them into the common space.

    Args:
      batch: any of "video" [B, T, H, W, 3], "audio" [B, S], "text" [B, K, W].
      train: dropout, DropToken and batch-norm batch statistics on.
    Returns:
      {"video_agg", "audio_agg", "text_agg"} backbone outputs for the modalities present and the
      common-space embeddings {"video_va", "video_vt", "audio_va", "text_vt"}.
    """
    if not any(m in batch for m in MODALITIES):
      raise ValueError(f'batch has none of {MODALITIES}; keys: {sorted(batch)}')
    out = {}
    if 'video' in batch:
      out['video_agg'] = self.encode_video(batch['video'], train=train)
    if 'audio' in batch:
      out['audio_agg'] = self.encode_audio(batch['audio'], train=train)
    if 'text' in batch:
      out['text_agg'] = self.encode_text(batch['text'], train=train)
    out.update(
      self.head(
        video=out.get('video_agg'),
        audio=out.get('audio_agg'),
        text=out.get('text_agg'),
        train=train,
      )
    )
    return out
