"""All-in-one (Wang et al., CVPR 2023; seed 001), `model.name='allinone'`: ONE transformer over raw
frames and text, with temporal modelling by parameter-free temporal token rolling, and its side of
the model contract (vatt_jax/models/contract.py).

  text ids [B, W]      → [CLS] ids [SEP] (svitt.add_special_tokens: model-owned ids V, V+1, V+2
                         for [CLS], [SEP], [MASK]) → word + position → LayerNorm → dropout
                         (BERT-style) + token type 0                     → [B, L = W + 2, D]
  video [B, T, H, W, 3] → per frame: p×p patches → linear → [CLS_f; patches] + spatial positions
                          → dropout + token type 1                       → [B, T, 1 + N, D]
  joint pass (temporal='roll', All-in-one; 'none': the paper's time-average baseline): for every
    frame the sequence [text; that frame's tokens] (text repeated T times), all B·T sequences
    through one stack of pre-LN ViT blocks; before every block (the first included) the frame
    tokens are rolled in time (`temporal_roll`, 'roll' only; text tokens never); final LayerNorm;
    the B·T outputs averaged over the T frames → [B, L + 1 + N, D].
  joint pass (temporal='flatten', the paper's "flatten" baseline): ONE sequence [text; frame 0;
    …; frame T−1] per example (B sequences of L + T(1 + N)), with a learned temporal position per
    frame (zero-initialised; without one a flattened sequence could not tell the frames' order).
  pooled = tanh(Dense(joint[:, 0])) (the text [CLS] row) → Dense(2): video–text matching (VTM);
  joint text positions → MLM head (BERT's transform, decoder tied to the word table by default).
  unimodal passes (never rolled; ind_itc): text alone → its [CLS] row ('agg'); frames alone, each
    frame a sequence ('flatten': one sequence) → the mean over frames of the frame [CLS] rows
    ('agg'); 'vt' = Dense(embed_dim) of each: the shared space of fast retrieval and the probe.

Pair score (Model.score; retrieval re-ranking, multiple choice): the VTM head on the joint pass of
(video, text): the "match" logit (`pair_score='match_logit'`, the reference's `rank_output`, which
copies the ITM head's row 1) or the log-odds logit₁ − logit₀ ('log_odds').

Differences from the reference code (showlab/all-in-one), on purpose:
  * temporal_roll with fold = 0 (fewer than 8 frame tokens) rolls nothing
    (vatt_jax/models/temporal_roll.py).
  * The reference's ViLT patch embedding (`visual_embed`, max_image_len=-1) samples the patches of
    each frame in a random order every step (torch.multinomial without replacement over all
    valid patches); attention does not care, but rolling then moves a random, per-frame different
    set of patches. Here the patches keep their raster order, as the paper's figure draws it: the
    first fold patches (the top rows) come from the previous frame, the last fold from the next.
    It also treats every pixel whose channels sum to 0 as padding; frames here have no padding.
  * The reference's BertEmbeddings adds its own token-type row 0 to every text token before the
    LayerNorm, besides the model's token type after it: a constant vector that the learned text
    positions absorb exactly (every token has one position), so it is left out.
  * The reference's MLM head (ViLT's MLMHead without `weight`) has its own decoder matrix; the
    issue and the slides' parameter counts (110 M for Base) tie it to the word table
    (`mlm_tied=True`); `mlm_tied=False` is the reference's untied head.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines.options import frame_hw
from vatt_jax import losses
from vatt_jax.losses import matching
from vatt_jax.losses.allinone import NEGATIVES, reference_negatives
from vatt_jax.models import contract
from vatt_jax.models.allinone_config import check_model_config, get_size
from vatt_jax.models.svitt import add_special_tokens, media_inputs, pretraining_samples, special_ids
from vatt_jax.models.svitt_blocks import SvittBlock
from vatt_jax.models.svitt_video import patchify
from vatt_jax.models.temporal_roll import temporal_roll
from vatt_jax.models.transformer import REMAT_POLICIES, EncoderSize, norm
from vatt_jax.models.vatt_config import DTYPES

Dtype = Any
NUM_SPECIAL = 3  # [CLS], [SEP], [MASK] after the tokenizer's vocabulary


def _dense(features: int, axes: tuple, name: str, dtype=jnp.float32, use_bias: bool = True):
  return nn.Dense(
    features,
    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]),
    use_bias=use_bias,
    dtype=dtype,
    name=name,
  )


class AllInOne(nn.Module):
  """The All-in-one network (module docstring).

  Attributes:
    size: layers, width, MLP width and heads of the one transformer.
    vocab_size: the tokenizer's V (the word table has V + 3 rows).
    max_words: W, tokenizer ids per caption (text sequences are W + 2 long).
    num_frames, image_size (H, W), patch_size: the video input and its p×p patches.
    embed_dim: the unimodal shared space (the reference's shared_embedding_dim).
    temporal: 'roll', 'none' or 'flatten' (module docstring). roll_div: n_div of temporal_roll.
    dropout_rate: the hidden dropout (embeddings, blocks); attention_dropout_rate: on the
      attention weights; drop_path_rate: stochastic depth, linear in depth from 0 (timm's ViT).
    mlm_tied: the MLM decoder is the word table (else its own matrix).
    pair_score: allinone_config.PAIR_SCORES.
  """

  size: EncoderSize
  vocab_size: int
  max_words: int
  num_frames: int
  image_size: tuple[int, int]
  patch_size: int = 16
  embed_dim: int = 512
  temporal: str = 'roll'
  roll_div: int = 8
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.1
  mlm_tied: bool = True
  pair_score: str = 'match_logit'
  remat: str = 'none'
  dtype: Dtype = jnp.float32

  @property
  def num_patches(self) -> int:
    return (self.image_size[0] // self.patch_size) * (self.image_size[1] // self.patch_size)

  def setup(self):
    width, rows = self.size.width, self.vocab_size + NUM_SPECIAL
    normal = nn.initializers.normal(stddev=0.02)
    self.word_embeddings = self.param(
      'word_embeddings', nn.with_logical_partitioning(normal, ('vocab', 'embed')), (rows, width)
    )
    self.text_positions = self.param(
      'text_positions',
      nn.with_logical_partitioning(normal, (None, 'embed')),
      (self.max_words + 2, width),
    )
    self.text_norm = norm('layernorm', 'text_norm', epsilon=1e-12)  # BERT's
    self.dropout = nn.Dropout(self.dropout_rate)
    self.token_type = self.param(
      'token_type', nn.with_logical_partitioning(normal, (None, 'embed')), (2, width)
    )
    self.patch_embed = nn.Dense(
      width,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, 'embed')),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
      dtype=self.dtype,
      name='patch_embed',
    )
    self.frame_cls = self.param(
      'frame_cls', nn.with_logical_partitioning(normal, ('embed',)), (width,)
    )
    self.frame_positions = self.param(
      'frame_positions',
      nn.with_logical_partitioning(normal, (None, 'embed')),
      (1 + self.num_patches, width),
    )
    if self.temporal == 'flatten':
      self.temporal_positions = self.param(
        'temporal_positions',
        nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, 'embed')),
        (self.num_frames, width),
      )
    block = SvittBlock
    if self.remat != 'none':
      # Arguments counted with self: (self, x, mask, bias, deterministic, …).
      block = nn.remat(SvittBlock, policy=REMAT_POLICIES[self.remat], static_argnums=(4,))
    depth = self.size.num_layers
    rates = np.linspace(0.0, self.drop_path_rate, depth) if depth > 1 else [0.0]
    self.blocks = [
      block(
        mlp_dim=self.size.mlp_dim,
        num_heads=self.size.num_heads,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        drop_path_rate=float(rates[i]),
        dtype=self.dtype,
        name=f'block_{i:02d}',
      )
      for i in range(depth)
    ]
    self.final_norm = norm('layernorm', 'final_norm')
    self.pooler = _dense(width, ('embed', 'embed_out'), 'pooler')
    self.vtm_head = _dense(2, ('embed', None), 'vtm_head')
    self.mlm_transform = _dense(width, ('embed', 'embed_out'), 'mlm_transform')
    self.mlm_norm = norm('layernorm', 'mlm_norm', epsilon=1e-12)
    self.mlm_bias = self.param(
      'mlm_bias', nn.with_logical_partitioning(nn.initializers.zeros_init(), ('vocab',)), (rows,)
    )
    if not self.mlm_tied:
      self.mlm_decoder = _dense(rows, ('embed', 'vocab'), 'mlm_decoder', use_bias=False)
    self.text_proj = _dense(self.embed_dim, ('embed', 'common'), 'text_proj')
    self.video_proj = _dense(self.embed_dim, ('embed', 'common'), 'video_proj')

  # ---- embeddings ------------------------------------------------------------------------------

  def embed_text(self, ids: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """ids [B, W] tokenizer ids (0 = padding; or MLM-corrupted) → (tokens [B, W + 2, D], mask
    [B, W + 2] int32)."""
    if ids.shape[-1] != self.max_words:
      raise ValueError(f'allinone: text of {ids.shape[-1]} ids, the model reads {self.max_words}')
    full, mask = add_special_tokens(ids, self.vocab_size)
    x = jnp.take(self.word_embeddings, full, axis=0) + self.text_positions[None]
    x = self.text_norm(x)
    x = self.dropout(x, deterministic=not train)
    return (x + self.token_type[0]).astype(self.dtype), mask

  def embed_frames(self, video: jax.Array, train: bool = False) -> jax.Array:
    """video [B, T, H, W, 3] → per-frame tokens [B, T, 1 + N, D] (frame CLS first)."""
    batch, frames = video.shape[:2]
    if (frames, *video.shape[2:4]) != (self.num_frames, *self.image_size):
      raise ValueError(
        f'allinone: video of {frames} frames of {video.shape[2]}×{video.shape[3]}, the model reads '
        f'{self.num_frames} of {self.image_size[0]}×{self.image_size[1]}'
      )
    patches = patchify(video.astype(self.dtype), self.patch_size)  # [B, T·N, p·p·3]
    x = self.patch_embed(patches).reshape(batch, frames, self.num_patches, -1)
    cls = jnp.broadcast_to(self.frame_cls.astype(x.dtype), (batch, frames, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=2) + self.frame_positions
    if self.temporal == 'flatten':
      x = x + self.temporal_positions[None, :, None]
    x = self.dropout(x, deterministic=not train)
    return (x + self.token_type[1]).astype(self.dtype)

  # ---- the transformer -------------------------------------------------------------------------

  def encode(self, x, mask=None, *, roll_from: int | None = None, train: bool = False):
    """x [S, n, D] through every block (before each, with roll_from, the tokens from that
    position on rolled in time: S = B·T frame-major sequences) and the final LayerNorm
    (float32)."""
    for block in self.blocks:
      if roll_from is not None:
        rolled = temporal_roll(x[:, roll_from:], self.num_frames, self.roll_div)
        x = jnp.concatenate([x[:, :roll_from], rolled], axis=1)
      x = block(x, mask, None, not train)
    return self.final_norm(x)

  def joint(self, video: jax.Array, ids: jax.Array, train: bool = False):
    """The joint pass (module docstring) → (text positions of its output [B, L, D] float32,
    pooled [B, D] float32)."""
    text, text_mask = self.embed_text(ids, train)
    frames = self.embed_frames(video, train)
    batch, num_frames, tokens, width = frames.shape
    length = text.shape[1]
    if self.temporal == 'flatten':
      x = jnp.concatenate([text, frames.reshape(batch, num_frames * tokens, width)], axis=1)
      mask = jnp.concatenate([text_mask, jnp.ones((batch, num_frames * tokens), jnp.int32)], 1)
      x = self.encode(x, mask, train=train)
    else:
      x = jnp.concatenate(
        [jnp.repeat(text, num_frames, axis=0), frames.reshape(-1, tokens, width)], axis=1
      )
      mask = jnp.concatenate(
        [jnp.repeat(text_mask, num_frames, axis=0), jnp.ones((x.shape[0], tokens), jnp.int32)], 1
      )
      roll_from = length if self.temporal == 'roll' else None
      x = self.encode(x, mask, roll_from=roll_from, train=train)
      x = x.reshape(batch, num_frames, *x.shape[1:]).mean(axis=1)
    text_out = x[:, :length].astype(jnp.float32)
    pooled = jnp.tanh(self.pooler(text_out[:, 0])).astype(jnp.float32)
    return text_out, pooled

  def text_only(self, ids: jax.Array, train: bool = False) -> jax.Array:
    """The unimodal text pass → its [CLS] row [B, D] float32."""
    x, mask = self.embed_text(ids, train)
    return self.encode(x, mask, train=train)[:, 0].astype(jnp.float32)

  def video_only(self, video: jax.Array, train: bool = False) -> jax.Array:
    """The unimodal video pass (no rolling) → the mean over frames of the frame [CLS] rows
    [B, D] float32."""
    frames = self.embed_frames(video, train)
    batch, num_frames, tokens, width = frames.shape
    # 'flatten': one sequence of every frame per example; else one sequence per frame.
    sequences = (batch, -1, width) if self.temporal == 'flatten' else (-1, tokens, width)
    x = self.encode(frames.reshape(sequences), train=train)
    x = x.reshape(batch, num_frames, tokens, width)
    return x[:, :, 0].mean(axis=1).astype(jnp.float32)

  # ---- heads -----------------------------------------------------------------------------------

  def project_text(self, representation: jax.Array) -> jax.Array:
    return self.text_proj(representation).astype(jnp.float32)

  def project_video(self, representation: jax.Array) -> jax.Array:
    return self.video_proj(representation).astype(jnp.float32)

  def vtm_logits(self, pooled: jax.Array) -> jax.Array:
    """[B, D] pooled joint output → [B, 2] float32 (column 1: the pair matches)."""
    return self.vtm_head(pooled).astype(jnp.float32)

  def mlm_logits(self, hidden: jax.Array) -> jax.Array:
    """[..., D] → [..., V + 3] float32: BERT's transform (dense, exact GELU, LayerNorm) and the
    decoder (the word table when tied) plus a bias."""
    y = nn.gelu(self.mlm_transform(hidden).astype(jnp.float32), approximate=False)
    y = self.mlm_norm(y).astype(self.dtype)
    if self.mlm_tied:
      table = self.word_embeddings.astype(self.dtype)
      logits = jnp.einsum('...d,vd->...v', y, table, preferred_element_type=jnp.float32)
    else:
      logits = self.mlm_decoder(y).astype(jnp.float32)
    return logits + self.mlm_bias

  def score_pairs(self, video: jax.Array, ids: jax.Array) -> jax.Array:
    """[B] score of row i's (video, text) pair from the VTM head (module docstring)."""
    logits = self.vtm_logits(self.joint(video, ids)[1])
    if self.pair_score == 'log_odds':
      return logits[:, 1] - logits[:, 0]
    return logits[:, 1]

  # ---- training --------------------------------------------------------------------------------

  def pretrain(
    self,
    video: jax.Array,
    ids: jax.Array,
    masked_ids: jax.Array,
    valid: jax.Array,
    negatives: str,
    temperature: float,
  ) -> dict[str, jax.Array]:
    """Every forward pass of one training step on M samples: the unimodal passes, the VTM joint
    pass over the drawn pairs, the MLM joint pass (masked text, own video).

    Returns {'text_vt', 'video_vt' [M, E], 'vtm_logits' [P, 2], 'vtm_labels', 'vtm_weights' [P]
    (P = M with 'reference' negatives, 3M with 'hard'), 'mlm_logits' [M, W, V + 3]}.
    """
    text_vt = self.project_text(self.text_only(ids, train=True))
    video_vt = self.project_video(self.video_only(video, train=True))
    rng = self.make_rng('negatives')
    num = ids.shape[0]
    if negatives == 'reference':
      index, labels, weights = reference_negatives(rng, valid)
      pair_video, pair_text = video[index], ids
    else:
      similarity = matching.cosine_logits(text_vt, video_vt, temperature)
      eye = jnp.eye(num, dtype=bool)
      text_rng, video_rng = jax.random.split(rng)
      video_neg, has_video = matching.sample_negatives(video_rng, similarity, eye, valid)
      text_neg, has_text = matching.sample_negatives(text_rng, similarity.T, eye, valid)
      pair_video = jnp.concatenate([video, video[video_neg], video], 0)
      pair_text = jnp.concatenate([ids, ids, ids[text_neg]], 0)
      labels = jnp.concatenate([jnp.ones((num,), jnp.int32), jnp.zeros((2 * num,), jnp.int32)])
      weights = jnp.concatenate([valid, has_video, has_text]).astype(jnp.float32)
    _, pooled = self.joint(pair_video, pair_text, train=True)
    text_out, _ = self.joint(video, masked_ids, train=True)
    return {
      'text_vt': text_vt,
      'video_vt': video_vt,
      'vtm_logits': self.vtm_logits(pooled),
      'vtm_labels': labels,
      'vtm_weights': weights,
      'mlm_logits': self.mlm_logits(text_out[:, 1 : ids.shape[1] + 1]),
    }

  def __call__(self, batch: dict, *, train: bool = False) -> dict[str, jax.Array]:
    """Every parameter's first use (init): both unimodal passes, one joint pass, every head."""
    ids = batch['text']
    if ids.ndim == 3:  # [B, K, W] training layout: the first narration
      ids = ids[:, 0]
    text_out, pooled = self.joint(batch['video'], ids, train=train)
    return {
      'text_vt': self.project_text(self.text_only(ids, train=train)),
      'video_vt': self.project_video(self.video_only(batch['video'], train=train)),
      'vtm_logits': self.vtm_logits(pooled),
      'mlm_logits': self.mlm_logits(text_out),
    }


# ---- config → module --------------------------------------------------------------------------


def build_module(cfg: ml_collections.ConfigDict) -> AllInOne:
  check_model_config(cfg)
  return AllInOne(
    size=get_size(cfg),
    vocab_size=cfg.text.vocab_size,
    max_words=cfg.text.max_words,
    num_frames=cfg.video.num_frames,
    image_size=frame_hw(cfg.video.frame_size),
    patch_size=cfg.video.patch_size,
    embed_dim=cfg.embed_dim,
    temporal=cfg.get('temporal', 'roll'),
    roll_div=cfg.get('roll_div', 8),
    dropout_rate=cfg.dropout_rate,
    attention_dropout_rate=cfg.get('attention_dropout_rate', 0.0),
    drop_path_rate=cfg.get('drop_path_rate', 0.1),
    mlm_tied=cfg.get('mlm_tied', True),
    pair_score=cfg.get('pair_score', 'match_logit'),
    remat=cfg.get('remat', 'none'),
    dtype=DTYPES[cfg.get('dtype', 'float32')],
  )


# ---- the contract ---------------------------------------------------------------------------------


class AllInOneModel(contract.FlaxModel):
  """All-in-one under the model contract. Levels: 'agg' (the unimodal passes' [CLS]
  representations: the linear-probe feature) and 'vt' (the shared space, embed_dim). Trains with
  loss 'allinone' (VTM + MLM + ITC, losses/allinone.py); the pair score is the VTM head's."""

  losses = ('allinone',)
  embeddings = {'video': ('agg', 'vt'), 'text': ('agg', 'vt')}
  spaces = {('video', 'text'): 'vt'}
  rng_streams = ('dropout', 'negatives')

  def __init__(self, cfg: ml_collections.ConfigDict):
    super().__init__(cfg, build_module(cfg), media_inputs(cfg))
    module = self.module
    self.score = contract.PairScore(
      video=lambda variables, x: x,  # the joint pass starts from the frames
      text=lambda variables, x: x,
      pairs=lambda variables, v, t: module.apply(variables, v, t, method=AllInOne.score_pairs),
    )

  def _embed(self, modality: str, levels: tuple[str, ...]) -> contract.EmbedFn:
    module = self.module
    encode, project = {
      'video': (AllInOne.video_only, AllInOne.project_video),
      'text': (AllInOne.text_only, AllInOne.project_text),
    }[modality]

    def embed(variables, x):
      rep = module.apply(variables, x, method=encode)
      return contract.agg_and_projected(
        levels, rep, lambda: module.apply(variables, rep, method=project)
      )

    return embed

  def objective(self, loss_cfg: ml_collections.ConfigDict) -> contract.Objective:
    loss_cfg = self.check_loss(loss_cfg)
    loss_fn = losses.build_loss(loss_cfg)
    negatives = loss_cfg.get('negatives', 'reference')
    if negatives not in NEGATIVES:
      raise ValueError(f'config loss.negatives must be one of {NEGATIVES}, got {negatives!r}')
    if negatives == 'hard' and not loss_cfg.get('itc_weight', 1.0) > 0:
      raise ValueError(
        "config loss.negatives='hard' draws negatives from the contrastive similarities: "
        f'loss.itc_weight must be > 0, got {loss_cfg.itc_weight}'
      )
    vocab = self.config.text.vocab_size
    mask_id = special_ids(vocab)['mask']
    probability = float(loss_cfg.get('mlm_probability', 0.15))
    temperature = float(loss_cfg.temperature)
    module = self.module

    def objective(variables, batch, rng):
      samples = pretraining_samples(batch, False)
      valid = samples['valid']
      dropout_rng, negatives_rng, mlm_rng = jax.random.split(rng, 3)
      masked_ids, labels = matching.mask_tokens(
        mlm_rng, samples['text'], mask_id=mask_id, vocab_size=vocab, probability=probability,
        valid=valid,
      )  # fmt: skip
      out = module.apply(
        variables,
        samples['video'],
        samples['text'],
        masked_ids,
        valid,
        negatives,
        temperature,
        method=AllInOne.pretrain,
        rngs={'dropout': dropout_rng, 'negatives': negatives_rng},
      )
      out['mlm_labels'] = labels
      loss, terms = loss_fn(out, samples)
      return loss, (terms, {})

    return objective
