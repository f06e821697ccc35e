"""VATT assemblies: modality-specific towers (BBS / MBS / LBS) and the modality-agnostic backbone,
and `VattModel`, VATT's side of the model contract (vatt_jax/models/contract.py).

Every modality goes through the same pipeline, `Tower` (vatt_jax/models/tower.py):
  tokenizer (patches + positions) → dropout → DropToken (training) → AGG prepended → encoder
and the encoder's output at the AGG slot is the modality's representation. In the modality-agnostic
variant the three towers share one encoder (`shared_encoder`); tokenizers, AGG tokens and the text
relative bias stay per modality.

Parameter tree: `video_tower`, `audio_tower`, `text_tower` ({tokenizer, agg, encoder}, and the text
tower's relative_bias; no encoder in the towers of the agnostic variant), `shared_encoder`, `head`.

Precision: with dtype=bfloat16 the matmuls run in bfloat16 while parameters stay float32; norms,
softmax and the common-space heads run in float32, and every output (AGG representations and
common-space embeddings) is float32, so the losses are computed in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vatt_jax.models import contract
from vatt_jax.models.attention import RelativePositionBias
from vatt_jax.models.heads import CommonSpace
from vatt_jax.models.tokenizers import VoxelTokenizer, WaveformTokenizer, WordTokenizer
from vatt_jax.models.tower import Tower
from vatt_jax.models.transformer import Encoder, EncoderSize
from vatt_jax.models.vatt_config import (
  DTYPES,
  MODALITIES,
  AudioSpec,
  TextSpec,
  VideoSpec,
  added_field,
  audio_spec,
  check_model_config,
  media_inputs,
  shared_size,
  text_spec,
  video_spec,
)
from vatt_jax.models.vatt_pretrained import adapt_positions, head_of_built_modalities

Dtype = Any


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
    head: the common-space projection.
    shared: if set, the modality-agnostic variant: one encoder of this size for all modalities.
    shared_attention: that encoder's attention implementation.
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
  shared_attention: str = 'dense'
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  remat: str = 'none'
  dtype: Dtype = jnp.float32
  token_outputs: bool = False

  def setup(self):
    if self.shared is not None:
      # The text tower's T5 quirks (norm, scaling) are text-only; the shared encoder is standard.
      self.shared_encoder = make_encoder(self, self.shared, self.shared_attention)
    self.video_tower = make_tower(self, 'video', self.video)
    self.audio_tower = make_tower(self, 'audio', self.audio)
    self.text_tower = make_tower(self, 'text', self.text)

  def _video(self, video: jax.Array, train: bool, frames: bool):
    """AGG output [B, D], and with `frames` the per-frame outputs: the mean of each temporal patch
    position's tokens [B, T', D] (float32) and its mask [B, T'] (0 where DropToken kept none)."""
    out = self.video_tower(video, train=train)
    if not frames:
      return out.agg, None, None
    per_frame, mask = frame_means(out.tokens, tuple(self.video.grid), out.kept)
    return out.agg, per_frame, mask

  def _text(self, text: jax.Array, train: bool, words: bool):
    """AGG output [*lead, D], and with `words` the word outputs [*lead, W, D] (float32) and their
    mask [*lead, W] (0 at padding)."""
    lead = text.shape[:-1]
    out = self.text_tower(text.reshape(-1, text.shape[-1]), train=train)
    agg = out.agg.reshape(*lead, out.agg.shape[-1])
    if not words:
      return agg, None, None
    tokens = out.tokens.astype(jnp.float32).reshape(*lead, *out.tokens.shape[1:])
    return agg, tokens, out.mask.reshape(*lead, -1).astype(jnp.float32)

  def encode_video(self, video: jax.Array, *, train: bool = False) -> jax.Array:
    """video: [B, T, H, W, 3] in [-1, 1] → AGG output [B, D_video] (float32)."""
    return self.video_tower(video, train=train).agg

  def encode_audio(self, audio: jax.Array, *, train: bool = False) -> jax.Array:
    """audio: [B, S] in [-1, 1] → AGG output [B, D_audio] (float32)."""
    return self.audio_tower(audio, train=train).agg

  def encode_text(self, text: jax.Array, *, train: bool = False) -> jax.Array:
    """text: [B, K, W] (or [B, W]) int32 ids, 0 = padding → AGG output [B, K, D_text] (or [B, D])."""
    return self._text(text, train, words=False)[0]

  def input_space(self, modality: str, x: jax.Array) -> jax.Array:
    """One modality's tokenizer output mean-pooled over its valid tokens: [B, D] float32."""
    return getattr(self, f'{modality}_tower').input_space(x)

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


def make_encoder(owner, size: EncoderSize, attention: str, text: TextSpec | None = None) -> Encoder:
  """An encoder of `size` with `owner`'s dropout, remat and dtype (and the text tower's T5 options
  when `text` is given)."""
  return Encoder(
    size=size,
    dropout_rate=owner.dropout_rate,
    attention_dropout_rate=owner.attention_dropout_rate,
    norm_type=text.norm_type if text else 'layernorm',
    mlp_norm_type=text.mlp_norm_type if text else '',
    scale_logits=text.scale_logits if text else True,
    use_bias=text.use_bias if text else True,
    bias_all_layers=text.bias_all_layers if text else False,
    remat=owner.remat,
    attention=attention,
    dtype=owner.dtype,
  )


def make_tower(owner, modality: str, spec) -> Tower:
  """The `modality` tower of `owner` (a VATT or a classifier: its shared encoder when it has one,
  dropout, remat, dtype), built in owner's setup."""
  shared = getattr(owner, 'shared', None)
  width = (shared or spec.size).width
  agg_dim = 0
  if modality == 'video':
    tokenizer = VoxelTokenizer(
      width=width,
      patch_size=tuple(spec.patch_size),
      grid=tuple(spec.grid),
      position_layernorm=spec.position_layernorm,
      pre_projection=spec.pre_projection,
      dtype=owner.dtype,
    )
  elif modality == 'audio':
    tokenizer = WaveformTokenizer(
      width=width,
      patch_size=spec.patch_size,
      num_patches=spec.num_patches,
      position_layernorm=spec.position_layernorm,
      pre_projection=spec.pre_projection,
      dtype=owner.dtype,
    )
  else:
    tokenizer = WordTokenizer(
      width=width,
      vocab_size=spec.vocab_size,
      embedding_dim=spec.embedding_dim,
      trainable=spec.trainable_embedding,
      pre_projection=spec.pre_projection,
      num_positions=spec.max_words if spec.positions == 'absolute' else 0,
      position_layernorm=spec.position_layernorm,
      dtype=owner.dtype,
    )
    if spec.embedding_dim and not spec.pre_projection:  # official T5: AGG in the word space
      agg_dim = spec.embedding_dim
  text = spec if modality == 'text' else None
  if shared is not None:
    encoder = owner.shared_encoder
  else:
    encoder = make_encoder(owner, spec.size, spec.attention, text)
  bias = None
  if text is not None and text.positions == 'relative':
    bias = RelativePositionBias(
      num_heads=(shared or spec.size).num_heads,
      num_buckets=spec.num_buckets,
      max_distance=spec.max_distance,
    )
  return Tower(
    tokenizer=tokenizer,
    encoder=encoder,
    relative_bias=bias,
    width=width,
    drop_token_rate=getattr(spec, 'drop_token_rate', 0.0),
    dropout_rate=owner.dropout_rate,
    agg_dim=agg_dim,
    post_projection=spec.post_projection,
    dtype=owner.dtype,
  )


# ---- from config.model ---------------------------------------------------------------------------


def build_module(cfg: ml_collections.ConfigDict, *, token_outputs: bool | None = None) -> VATT:
  """config.model → the VATT flax module (token_outputs overrides the config's)."""
  check_model_config(cfg)
  return VATT(
    video=video_spec(cfg),
    audio=audio_spec(cfg),
    text=text_spec(cfg),
    head=CommonSpace(
      va_dim=cfg.head.va_dim,
      vt_dim=cfg.head.vt_dim,
      relu_before_vt=cfg.head.relu_before_vt,
      audio_text_bn=added_field(cfg, 'head.audio_text_bn'),
      bn_momentum=cfg.head.bn_momentum,
      bn_epsilon=cfg.head.bn_epsilon,
    ),
    shared=shared_size(cfg),
    shared_attention=cfg.get('shared_attention', 'dense'),
    dropout_rate=cfg.dropout_rate,
    attention_dropout_rate=cfg.attention_dropout_rate,
    remat=cfg.get('remat', 'none'),
    dtype=DTYPES[cfg.dtype],
    token_outputs=cfg.get('token_outputs', False) if token_outputs is None else token_outputs,
  )


# ---- the contract ---------------------------------------------------------------------------------

# embed() level → model output name (pooled) per modality; token levels add '<level>_mask'.
_POOLED = {
  'video': {'agg': 'video_agg', 'va': 'video_va', 'vt': 'video_vt'},
  'audio': {'agg': 'audio_agg', 'va': 'audio_va'},
  'text': {'agg': 'text_agg', 'vt': 'text_vt'},
}
_TOKENS = {
  'video': {'frames_vt': ('video_frames_vt', 'video_frames_mask')},
  'text': {'words_vt': ('text_words_vt', 'text_words_mask')},
}


class VattModel(contract.FlaxModel):
  """VATT under the model contract (vatt_jax/models/contract.py).

  Embedding levels: 'input' (the tokenizer's output, mean-pooled: VATT Fig. 3's input space),
  'agg' (the backbone's AGG output, the linear-probe feature), 'va' / 'vt' (the common spaces);
  per token: video 'frames_vt' (per temporal patch position) and text 'words_vt'. Trains with the
  'vatt' (NCE + MIL-NCE) and 'norton' losses.
  """

  losses = ('vatt', 'norton')
  embeddings = {m: ('input', *levels) for m, levels in _POOLED.items()}
  token_embeddings = {m: tuple(levels) for m, levels in _TOKENS.items()}
  spaces = {('video', 'audio'): 'va', ('video', 'text'): 'vt'}
  rng_streams = ('dropout', 'droptoken')

  def __init__(self, cfg: ml_collections.ConfigDict):
    super().__init__(cfg, build_module(cfg), media_inputs(cfg))
    # The same parameters with per-frame / per-word outputs on (token-level embeddings).
    self._token_module = build_module(cfg, token_outputs=True)

  def _embed(self, modality: str, levels: tuple[str, ...]) -> contract.EmbedFn:
    tokens = [lv for lv in levels if lv in _TOKENS.get(modality, {})]
    module = self._token_module if tokens else self.module
    outputs = [lv for lv in levels if lv != 'input']

    def embed(variables, x):
      result = {}
      if 'input' in levels:
        result['input'] = module.apply(variables, modality, x, method=VATT.input_space)
      if outputs:
        out = module.apply(variables, {modality: x[:, None] if modality == 'text' else x})
        if modality == 'text':  # one narration per row
          out = {k: v[:, 0] for k, v in out.items()}
        for level in outputs:
          if level in _POOLED[modality]:
            result[level] = out[_POOLED[modality][level]]
          else:
            value, mask = _TOKENS[modality][level]
            result[level], result[f'{level}_mask'] = out[value], out[mask]
      return result

    return embed

  def load_pretrained(self, params: dict, pretrained: dict) -> tuple[dict, dict]:
    return contract.load_by_name(params, head_of_built_modalities(pretrained, params),
                                 adapt=adapt_positions)  # fmt: skip
