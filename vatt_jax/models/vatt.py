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
  drop_token_index,
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


def frame_means(
  tokens: jax.Array, grid: tuple[int, int, int], kept: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Per-frame features of a video tower's token outputs: the mean of each temporal patch position.

  Args:
    tokens: [B, N', D] outputs at the tokens, in patch order (t, h, w) of the `grid` (t, h, w).
    kept: the N' positions DropToken kept (ascending), or None when all t·h·w are there.
  Returns:
    (frames [B, t, D] float32, mask [B, t] float32: 0 for a position whose tokens were all dropped,
    whose features are then 0).
  """
  t, h, w = grid
  tokens = tokens.astype(jnp.float32)
  if kept is None:
    frames = tokens.reshape(tokens.shape[0], t, h * w, tokens.shape[-1]).mean(axis=2)
    return frames, jnp.ones(frames.shape[:2], jnp.float32)
  member = (kept[:, None] // (h * w) == jnp.arange(t)[None, :]).astype(jnp.float32)  # [N', t]
  count = member.sum(axis=0)
  frames = jnp.einsum('bnd,nt->btd', tokens, member) / jnp.maximum(count, 1.0)[:, None]
  return frames, jnp.broadcast_to((count > 0).astype(jnp.float32), frames.shape[:2])


class VATT(nn.Module):
  """Video–audio–text transformer with a multi-level common space.

  Attributes:
    video, audio, text: per-modality specs; a modality-specific tower is built with its own size.
    shared: if set, the modality-agnostic variant: one encoder of this size for all modalities.
    head: the common-space projection.
    remat: rematerialisation policy of the encoder blocks ('none', 'dots', 'full'; see Encoder).
    dtype: compute dtype of the tokenizers and encoders (parameters are always float32).
    token_outputs: also return per-frame and per-word embeddings in the video–text space (the
      encoder's outputs, a frame being the mean of one temporal patch position's tokens, projected
      by the same common-space head; see CommonSpace).
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
  token_outputs: bool = False

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
    """tokens [B, N, D] (positions included) → (AGG representation [B, D] float32, the encoder's
    outputs at the tokens [B, N', D], the N' positions DropToken kept or None when it kept all)."""
    tokens = self.token_dropout(tokens, deterministic=not train)
    kept = None
    if train and drop_rate > 0.0:
      kept = drop_token_index(tokens.shape[1], drop_rate, self.make_rng('droptoken'))
      if kept is not None:
        tokens = jnp.take(tokens, kept, axis=1)
    batch = tokens.shape[0]
    agg = jnp.broadcast_to(
      self.agg_tokens[modality].astype(tokens.dtype), (batch, 1, tokens.shape[-1])
    )
    tokens = jnp.concatenate([agg, tokens], axis=1)
    if mask is not None:
      mask = jnp.concatenate([jnp.ones((batch, 1), bool), mask], axis=1)
    out = self._encoder(modality)(tokens, mask=mask, bias=bias, deterministic=not train)
    agg = nn.with_logical_constraint(out[:, 0].astype(jnp.float32), ('batch', 'embed_act'))
    return agg, out[:, 1:], kept

  def _video(self, video: jax.Array, train: bool, frames: bool):
    """AGG output [B, D], and with `frames` the per-frame outputs: the mean of each temporal patch
    position's tokens [B, T', D] (float32) and its mask [B, T'] (0 where DropToken kept none)."""
    agg, out, kept = self._tower(
      'video', self.video_tokenizer(video), train=train, drop_rate=self.video.drop_token_rate
    )
    if not frames:
      return agg, None, None
    per_frame, mask = frame_means(out, tuple(self.video.grid), kept)
    return agg, per_frame, mask

  def _text(self, text: jax.Array, train: bool, words: bool):
    """AGG output [*lead, D], and with `words` the word outputs [*lead, W, D] (float32) and their
    mask [*lead, W] (0 at padding)."""
    lead = text.shape[:-1]
    ids = text.reshape(-1, text.shape[-1])
    tokens, mask = self.text_tokenizer(ids)
    bias = self.text_relative_bias(ids.shape[1] + 1)  # +1: the AGG slot takes part in positions
    agg, out, _ = self._tower('text', tokens, train=train, mask=mask, bias=bias)
    agg = agg.reshape(*lead, agg.shape[-1])
    if not words:
      return agg, None, None
    out = out.astype(jnp.float32).reshape(*lead, *out.shape[1:])
    return agg, out, mask.reshape(*lead, -1).astype(jnp.float32)

  def encode_video(self, video: jax.Array, *, train: bool = False) -> jax.Array:
    """video: [B, T, H, W, 3] in [-1, 1] → AGG output [B, D_video] (float32)."""
    return self._video(video, train, frames=False)[0]

  def encode_audio(self, audio: jax.Array, *, train: bool = False) -> jax.Array:
    """audio: [B, S] in [-1, 1] → AGG output [B, D_audio] (float32)."""
    tokens = self.audio_tokenizer(audio)
    return self._tower('audio', tokens, train=train, drop_rate=self.audio.drop_token_rate)[0]

  def encode_text(self, text: jax.Array, *, train: bool = False) -> jax.Array:
    """text: [B, K, W] (or [B, W]) int32 ids, 0 = padding → AGG output [B, K, D_text] (or [B, D])."""
    return self._text(text, train, words=False)[0]

  def __call__(self, batch: dict[str, jax.Array], *, train: bool = False) -> dict[str, jax.Array]:
    """Encodes the modalities present in `batch` and projects them into the common space.

    Args:
      batch: any of "video" [B, T, H, W, 3], "audio" [B, S], "text" [B, K, W].
      train: dropout, DropToken and batch-norm batch statistics on.
    Returns:
      {"video_agg", "audio_agg", "text_agg"} backbone outputs for the modalities present and the
      common-space embeddings {"video_va", "video_vt", "audio_va", "text_vt"}; with
      `token_outputs`, also the per-frame and per-word video–text embeddings
      {"video_frames_vt" [B, T', vt], "text_words_vt" [B, K, W, vt]} and their masks
      {"video_frames_mask" [B, T'], "text_words_mask" [B, K, W]} (Norton's fine-grained similarity).
    """
    if not any(m in batch for m in MODALITIES):
      raise ValueError(f'batch has none of {MODALITIES}; keys: {sorted(batch)}')
    out, frames, words = {}, None, None
    if 'video' in batch:
      out['video_agg'], frames, frames_mask = self._video(
        batch['video'], train, frames=self.token_outputs
      )
    if 'audio' in batch:
      out['audio_agg'] = self.encode_audio(batch['audio'], train=train)
    if 'text' in batch:
      out['text_agg'], words, words_mask = self._text(
        batch['text'], train, words=self.token_outputs
      )
    out.update(
      self.head(
        video=out.get('video_agg'),
        audio=out.get('audio_agg'),
        text=out.get('text_agg'),
        video_frames=frames,
        text_words=words,
        train=train,
      )
    )
    if frames is not None:
      out['video_frames_mask'] = frames_mask
    if words is not None:
      out['text_words_mask'] = words_mask
    return out
