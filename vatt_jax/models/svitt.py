"""SViTT-Ego (SViTT's sparse video–text transformer trained with EgoNCE), `model.name='svitt'`,
and its side of the model contract (vatt_jax/models/contract.py).

  video [B, T, H, W, 3]  → SvittVideoEncoder (svitt_video.py: edge + node sparsity)
                           → tokens [B, 1 + K, Dv]          representation [B, Dv]  ('agg')
  text ids [B, W]        → [CLS] ids [SEP] (model-owned special ids, below)
                           → SvittTextEncoder.text (svitt_text.py: BERT layers < fusion_layer)
                           → hidden [B, W + 2, Dt]; the text representation ('agg') is its
                             [CLS] row (text.pooling='cls', SViTT) or the mean over [CLS], the
                             caption's tokens and [SEP] ('mean': trains from scratch, the demo)
  'vt' = Dense(embed_dim) of each representation: the dual encoder's space (EgoNCE / InfoNCE)
  fusion: SvittTextEncoder.fusion(hidden, video tokens) (cross-attention, multimodal pruning)
          → its [CLS] row → Dense(2): video–text matching (VTM); every row → the tied MLM head.

Special tokens. The text pipeline gives sentencepiece ids with 0 = padding (right-padded); the
model appends three ids after the tokenizer's vocabulary V: [CLS] = V, [SEP] = V + 1, [MASK] =
V + 2 (word table of V + 3 rows), so any tokenizer of the project works unchanged. A caption of
n tokens becomes [CLS] t₁ … tₙ [SEP] and W − n padding slots (length W + 2).

Training objective (`SvittModel.objective`, one jitted function; loss = contrastive + vtm_weight
· VTM + mlm_weight · MLM, SViTT's weights 1, 1, 1):
  1. With scene negatives in the batch (`neg_*` fields, data.scene_negative_window), the M = 2B
     samples are the B anchors followed by their B neighbours; every one is an anchor.
  2. The dual encoder: EgoNCE (or InfoNCE) on the 'vt' embeddings of all M samples (losses/
     egonce.py), with fixed temperature loss.temperature (EgoVLP: 0.05; SViTT learns one from
     0.07 for its InfoNCE — a documented difference).
  3. VTM (losses/matching.py): one negative video per text and one negative text per video,
     drawn ∝ the softmax of the contrastive similarities outside the loss's positive set.
  4. MLM: the ids corrupted by BERT's 80/10/10 recipe, through the text encoder and the fusion
     layers with the (unchanged) video tokens, predicted by the head tied to the word table.
Samples without a caption or clip (text_mask / video_mask / neg_mask 0) are left out of all three.

The pair score (`Model.score`, for retrieval re-ranking and multiple-choice scoring) is the VTM
head's log-odds log p(match) − log p(no match) from the fusion of a video's tokens with a text.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from data_pipelines.options import frame_hw
from vatt_jax import losses
from vatt_jax.losses import matching
from vatt_jax.losses.egonce import positive_mask
from vatt_jax.models import contract
from vatt_jax.models.svitt_position import expand_temporal
from vatt_jax.models.svitt_text import SvittTextEncoder
from vatt_jax.models.svitt_video import SvittVideoEncoder, svitt_video_encoder
from vatt_jax.models.transformer import REMAT_POLICIES, get_size
from vatt_jax.models.vatt_config import DTYPES

Dtype = Any
NUM_SPECIAL = 3  # [CLS], [SEP], [MASK] after the tokenizer's vocabulary
TEXT_POOLING = ('cls', 'mean')


def special_ids(vocab_size: int) -> dict[str, int]:
  """The model's special token ids for a tokenizer of `vocab_size` ids (0 = padding)."""
  return {'cls': vocab_size, 'sep': vocab_size + 1, 'mask': vocab_size + 2}


def add_special_tokens(ids: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
  """[B, W] right-padded tokenizer ids (0 = padding) → ([CLS] ids [SEP] padding [B, W + 2] int32,
  mask [B, W + 2] int32, 1 at [CLS], the tokens and [SEP])."""
  ids = ids.astype(jnp.int32)
  batch, width = ids.shape
  special = special_ids(vocab_size)
  # Tokens after the first padding slot do not count: a right-padded row is a prefix.
  prefix = jnp.cumprod((ids > 0).astype(jnp.int32), axis=1)
  length = jnp.sum(prefix, axis=1, keepdims=True)
  ids = ids * prefix
  full = jnp.concatenate(
    [jnp.full((batch, 1), special['cls'], jnp.int32), ids, jnp.zeros((batch, 1), jnp.int32)], 1
  )
  position = jnp.arange(width + 2)[None, :]
  full = jnp.where(position == length + 1, special['sep'], full)
  return full, (position <= length + 1).astype(jnp.int32)


class Svitt(nn.Module):
  """The SViTT-Ego network (module docstring). Encoders are passed in unbound (their configs)."""

  video_encoder: SvittVideoEncoder
  text_encoder: SvittTextEncoder
  vocab_size: int  # the tokenizer's (the word table has NUM_SPECIAL more rows)
  embed_dim: int = 256
  text_pooling: str = 'cls'  # TEXT_POOLING
  dtype: Dtype = jnp.float32

  def setup(self):
    dense = dict(
      kernel_init=nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), ('embed', 'common')
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('common',)),
    )
    self.video_proj = nn.Dense(self.embed_dim, name='video_proj', **dense)
    self.text_proj = nn.Dense(self.embed_dim, name='text_proj', **dense)
    self.vtm_head = nn.Dense(
      2,
      kernel_init=nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), ('embed', None)
      ),
      bias_init=nn.initializers.zeros_init(),
      name='vtm_head',
    )

  # ---- the pieces ------------------------------------------------------------------------------

  def encode_video(self, frames: jax.Array, train: bool = False):
    """frames [B, T, H, W, 3] → (tokens [B, 1 + K, Dv], representation [B, Dv] float32)."""
    out = self.video_encoder(frames, deterministic=not train)
    return out.tokens, out.representation.astype(jnp.float32)

  def encode_text(self, ids: jax.Array, train: bool = False):
    """ids [B, W] (tokenizer ids, 0 = padding, or already corrupted by MLM) → (hidden
    [B, W + 2, Dt], mask [B, W + 2])."""
    full, mask = add_special_tokens(ids, self.vocab_size)
    return self.text_encoder.text(full, mask, deterministic=not train), mask

  def embed_video(self, representation: jax.Array) -> jax.Array:
    return self.video_proj(representation.astype(jnp.float32)).astype(jnp.float32)

  def text_representation(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, L, Dt] text states → [B, Dt] float32: the [CLS] row ('cls', SViTT), or the mean over
    the caption's tokens, [CLS] and [SEP] included ('mean')."""
    hidden = hidden.astype(jnp.float32)
    if self.text_pooling == 'cls':
      return hidden[:, 0]
    weights = mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1.0)

  def embed_text(self, representation: jax.Array) -> jax.Array:
    return self.text_proj(representation.astype(jnp.float32)).astype(jnp.float32)

  def fuse(self, hidden, mask, video_tokens, train: bool = False) -> jax.Array:
    """The multimodal encoder: [B, L, Dt] text states attending to [B, N, Dv] video tokens."""
    return self.text_encoder.fusion(hidden, mask, video_tokens, deterministic=not train).hidden

  def vtm_logits(self, fused: jax.Array) -> jax.Array:
    """[B, L, Dt] fused states → [B, 2] float32 (column 1: the pair matches)."""
    return self.vtm_head(fused[:, 0].astype(jnp.float32)).astype(jnp.float32)

  def pair_score(self, video_tokens, text_features) -> jax.Array:
    """[B] log-odds of "matches" for row i's (video tokens, (text hidden, mask)) pair."""
    hidden, mask = text_features
    logits = self.vtm_logits(self.fuse(hidden, mask, video_tokens))
    return logits[:, 1] - logits[:, 0]

  # ---- training --------------------------------------------------------------------------------

  def pretrain(
    self,
    video: jax.Array,
    ids: jax.Array,
    masked_ids: jax.Array,
    positives: jax.Array,
    valid: jax.Array,
    temperature: float,
  ) -> dict[str, jax.Array]:
    """Every forward pass of one training step (module docstring), on M samples.

    Args:
      video: [M, T, H, W, 3]; ids / masked_ids: [M, W] clean and MLM-corrupted text ids.
      positives: [M, M] bool, the contrastive loss's positive pairs (text i, video j).
      valid: [M] bool. temperature: of the similarities the VTM negatives are drawn from.
    Returns {'video_vt', 'text_vt' [M, E], 'vtm_logits' [3M, 2], 'vtm_weights' [3M],
    'mlm_logits' [M, W, V + 3]}.
    """
    tokens, representation = self.encode_video(video, train=True)
    hidden, mask = self.encode_text(ids, train=True)
    video_vt = self.embed_video(representation)
    text_vt = self.embed_text(self.text_representation(hidden, mask))

    similarity = matching.cosine_logits(text_vt, video_vt, temperature)
    text_rng, video_rng = jax.random.split(self.make_rng('negatives'))
    video_neg, has_video_neg = matching.sample_negatives(video_rng, similarity, positives, valid)
    text_neg, has_text_neg = matching.sample_negatives(text_rng, similarity.T, positives.T, valid)
    fused = self.fuse(
      jnp.concatenate([hidden, hidden, hidden[text_neg]], 0),
      jnp.concatenate([mask, mask, mask[text_neg]], 0),
      jnp.concatenate([tokens, tokens[video_neg], tokens], 0),
      train=True,
    )
    weights = jnp.concatenate([valid, has_video_neg, has_text_neg]).astype(jnp.float32)

    masked_hidden, masked_mask = self.encode_text(masked_ids, train=True)
    mlm_fused = self.fuse(masked_hidden, masked_mask, tokens, train=True)
    width = ids.shape[1]
    return {
      'video_vt': video_vt,
      'text_vt': text_vt,
      'vtm_logits': self.vtm_logits(fused),
      'vtm_weights': weights,
      'mlm_logits': self.text_encoder.mlm_logits(mlm_fused[:, 1 : width + 1]),
    }

  def __call__(self, batch: dict, *, train: bool = False) -> dict[str, jax.Array]:
    """Every parameter's first use (init): video and text embeddings, one fusion, both heads."""
    ids = batch['text']
    if ids.ndim == 3:  # [B, K, W] training layout: the first narration
      ids = ids[:, 0]
    tokens, representation = self.encode_video(batch['video'], train=train)
    hidden, mask = self.encode_text(ids, train=train)
    fused = self.fuse(hidden, mask, tokens, train=train)
    return {
      'video_vt': self.embed_video(representation),
      'text_vt': self.embed_text(self.text_representation(hidden, mask)),
      'vtm_logits': self.vtm_logits(fused),
      'mlm_logits': self.text_encoder.mlm_logits(fused),
    }


# ---- config → module --------------------------------------------------------------------------


def _check(cfg: ml_collections.ConfigDict) -> None:
  if cfg.get('dtype', 'float32') not in DTYPES:
    raise ValueError(f'config model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}')
  if cfg.get('remat', 'none') not in REMAT_POLICIES:
    raise ValueError(
      f'config model.remat must be one of {sorted(REMAT_POLICIES)}, got {cfg.remat!r}'
    )
  if cfg.text.get('num_narrations', 1) != 1:
    raise ValueError(
      f'config model.text.num_narrations must be 1 for model svitt (one caption per clip), got '
      f'{cfg.text.num_narrations}'
    )
  if cfg.text.get('pooling', 'cls') not in TEXT_POOLING:
    raise ValueError(
      f'config model.text.pooling must be one of {TEXT_POOLING}, got {cfg.text.pooling!r}'
    )
  if cfg.text.vocab_size < 2:
    raise ValueError(f'config model.text.vocab_size must be >= 2, got {cfg.text.vocab_size}')


def video_encoder(cfg: ml_collections.ConfigDict) -> SvittVideoEncoder:
  v = cfg.video
  return svitt_video_encoder(
    v.size,
    patch_size=v.get('patch_size', 16),
    num_frames=v.num_frames,
    image_size=frame_hw(v.frame_size),
    attention=v.attention,
    block_size=v.block_size,
    local_blocks=v.local_blocks,
    random_blocks=v.random_blocks,
    keep_rate=v.keep_rate,
    token_drop_loc=tuple(v.token_drop_loc),
    drop_path_rate=v.drop_path_rate,
    remat=cfg.get('remat', 'none'),
    dtype=DTYPES[cfg.get('dtype', 'float32')],
  )


def text_encoder(cfg: ml_collections.ConfigDict) -> SvittTextEncoder:
  t = cfg.text
  size = get_size(t.size)
  return SvittTextEncoder(
    vocab_size=t.vocab_size + NUM_SPECIAL,
    width=size.width,
    depth=t.get('num_layers') or size.num_layers,
    num_heads=size.num_heads,
    mlp_dim=size.mlp_dim,
    max_length=max(t.max_words + 2, t.get('max_positions', 512)),
    fusion_layer=t.fusion_layer,
    video_keep_rate=t.video_keep_rate,
    prune_layer=t.prune_layer,
    dropout_rate=cfg.dropout_rate,
    attention_dropout_rate=cfg.attention_dropout_rate,
    remat=cfg.get('remat', 'none'),
    dtype=DTYPES[cfg.get('dtype', 'float32')],
  )


def build_module(cfg: ml_collections.ConfigDict) -> Svitt:
  _check(cfg)
  return Svitt(
    video_encoder=video_encoder(cfg),
    text_encoder=text_encoder(cfg),
    vocab_size=cfg.text.vocab_size,
    embed_dim=cfg.embed_dim,
    text_pooling=cfg.text.get('pooling', 'cls'),
    dtype=DTYPES[cfg.get('dtype', 'float32')],
  )


def media_inputs(cfg: ml_collections.ConfigDict) -> dict[str, contract.InputSpec]:
  return {
    'video': contract.InputSpec(
      (cfg.video.num_frames, *frame_hw(cfg.video.frame_size), 3), 'float32', -1.0, 1.0
    ),
    'text': contract.InputSpec(
      (cfg.text.max_words,), 'int32', 0, cfg.text.vocab_size - 1, padding_id=0
    ),
  }


def _offset_tables(tree: dict) -> dict[str, tuple[int, ...]]:
  """{path: shape} of the video encoder's relative position offset tables in a params tree."""
  flat = traverse_util.flatten_dict(dict(tree.get('video_encoder', {})))
  return {
    '/'.join(('video_encoder', *path)): tuple(np.shape(leaf))
    for path, leaf in flat.items()
    if path[-2:] == ('relative_position_bias', 'offset_table')
  }


def adapt_frames(pretrained: dict, params: dict) -> tuple[dict, dict]:
  """contract.load_by_name's `adapt`: the video encoder's relative position tables expanded
  (svitt_position.expand_temporal, 'replicate') when this model has another frame count than the
  checkpoint (SViTT's temporal sparse expansion: a 4-frame run continued at 8 frames)."""
  new, old = _offset_tables(params), _offset_tables(pretrained)
  if not new or not old:
    return pretrained, {}
  rows = next(iter(new.values()))[0]
  if all(shape[0] == rows for shape in old.values()):
    return pretrained, {}
  pretrained = dict(pretrained)
  pretrained['video_encoder'] = expand_temporal(
    pretrained['video_encoder'], (rows + 1) // 2, rule='replicate'
  )
  expanded = _offset_tables(pretrained)
  return pretrained, {path: (old[path], expanded[path]) for path in old if path in expanded}


# ---- the contract ---------------------------------------------------------------------------------


class SvittModel(contract.FlaxModel):
  """SViTT-Ego under the model contract. Levels: 'agg' (the encoders' representations: the video
  encoder's pooled LayerNorm output, the text [CLS]; the linear-probe feature) and 'vt' (the
  256-d dual-encoder space). Trains with 'egonce' and 'infonce' (+ VTM + MLM)."""

  losses = ('egonce', 'infonce')
  embeddings = {'video': ('agg', 'vt'), 'text': ('agg', 'vt')}
  spaces = {('video', 'text'): 'vt'}
  rng_streams = ('dropout', 'sparse', 'negatives')

  def __init__(self, cfg: ml_collections.ConfigDict):
    super().__init__(cfg, build_module(cfg), media_inputs(cfg))
    self.score = contract.PairScore(
      video=lambda variables, x: self.module.apply(variables, x, method=Svitt.encode_video)[0],
      text=lambda variables, x: self.module.apply(variables, x, method=Svitt.encode_text),
      pairs=lambda variables, v, t: self.module.apply(variables, v, t, method=Svitt.pair_score),
    )

  def _embed(self, modality: str, levels: tuple[str, ...]) -> contract.EmbedFn:
    module = self.module

    def embed(variables, x):
      if modality == 'video':
        _, rep = module.apply(variables, x, method=Svitt.encode_video)
        project = Svitt.embed_video
      else:
        hidden, mask = module.apply(variables, x, method=Svitt.encode_text)
        rep = module.apply(variables, hidden, mask, method=Svitt.text_representation)
        project = Svitt.embed_text
      return contract.agg_and_projected(
        levels, rep, lambda: module.apply(variables, rep, method=project)
      )

    return embed

  def objective(self, loss_cfg: ml_collections.ConfigDict) -> contract.Objective:
    loss_cfg = self.check_loss(loss_cfg)
    contrastive = losses.build_loss(loss_cfg)
    use_noun, use_verb = loss_positive_switches(loss_cfg)
    vocab = self.config.text.vocab_size
    mask_id = special_ids(vocab)['mask']
    temperature = float(loss_cfg.temperature)
    vtm_weight = float(loss_cfg.get('vtm_weight', 1.0))
    mlm_weight = float(loss_cfg.get('mlm_weight', 1.0))
    probability = float(loss_cfg.get('mlm_probability', 0.15))
    module = self.module

    def objective(variables, batch, rng):
      samples = pretraining_samples(batch, use_noun or use_verb)
      valid = samples['valid']
      num = valid.shape[0]
      positives = positive_mask(
        samples.get('noun'), samples.get('verb'), use_noun=use_noun, use_verb=use_verb, num=num
      )
      dropout_rng, sparse_rng, negatives_rng, mlm_rng = jax.random.split(rng, 4)
      masked_ids, labels = matching.mask_tokens(
        mlm_rng,
        samples['text'],
        mask_id=mask_id,
        vocab_size=vocab,
        probability=probability,
        valid=valid,
      )
      out = module.apply(
        variables,
        samples['video'],
        samples['text'],
        masked_ids,
        positives,
        valid,
        temperature,
        method=Svitt.pretrain,
        rngs={'dropout': dropout_rng, 'sparse': sparse_rng, 'negatives': negatives_rng},
      )
      loss_c, terms = contrastive(out, samples)
      loss_vtm, vtm_terms = matching.vtm_loss(out['vtm_logits'], out['vtm_weights'])
      loss_mlm, mlm_terms = matching.mlm_loss(out['mlm_logits'], labels)
      loss = loss_c + vtm_weight * loss_vtm + mlm_weight * loss_mlm
      terms = {
        **terms,
        'loss_contrastive': loss_c,
        'loss_vtm': loss_vtm,
        'loss_mlm': loss_mlm,
        **vtm_terms,
        **mlm_terms,
      }
      return loss, (terms, {})

    return objective

  def load_pretrained(self, params: dict, pretrained: dict) -> tuple[dict, dict]:
    return contract.load_by_name(params, pretrained, adapt=adapt_frames)


def loss_positive_switches(loss_cfg: ml_collections.ConfigDict) -> tuple[bool, bool]:
  """(use_noun, use_verb) of a contrastive loss config: InfoNCE has neither."""
  if loss_cfg.name == 'infonce':
    return False, False
  return bool(loss_cfg.get('use_noun', True)), bool(loss_cfg.get('use_verb', True))


def pretraining_samples(batch: dict, tags: bool) -> dict[str, jax.Array]:
  """The M samples of a training batch: the B rows, followed by their B scene negatives when the
  batch has them (`neg_video`, …). Returns video [M, …], text [M, W] (the first narration), noun /
  verb [M, C] (when `tags`), valid [M] bool (its clip and caption present)."""

  def one(prefix: str, present: jax.Array | None) -> dict[str, jax.Array]:
    text = batch[f'{prefix}text']
    text = text[:, 0] if text.ndim == 3 else text
    valid = jnp.ones(text.shape[:1], bool)
    for field in (f'{prefix}video_mask', f'{prefix}text_mask'):
      if field in batch:
        valid &= batch[field] > 0
    if present is not None:
      valid &= present > 0
    valid &= jnp.any(text > 0, axis=1)
    out = {'video': batch[f'{prefix}video'], 'text': text, 'valid': valid}
    if tags:
      for kind in ('noun', 'verb'):
        if f'{prefix}{kind}' not in batch:
          raise ValueError(
            f'the batch has no {prefix}{kind!r} field: EgoNCE needs noun and verb tags '
            '(config data.num_nouns / data.num_verbs > 0, and shards with tags), or use '
            "loss.name='infonce'"
          )
        out[kind] = batch[f'{prefix}{kind}'].astype(jnp.float32)
    return out

  samples = one('', None)
  if 'neg_video' in batch:
    negatives = one('neg_', batch.get('neg_mask'))
    samples = {k: jnp.concatenate([samples[k], negatives[k]], 0) for k in samples}
  return samples


def num_video_tokens(cfg: ml_collections.ConfigDict) -> int:
  """Tokens the video encoder hands to the fusion layers (CLS + the patches left by pruning)."""
  return 1 + video_encoder(cfg).kept_patch_counts()[-1]
