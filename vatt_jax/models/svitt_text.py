"""SViTT's text encoder and multimodal (fusion) encoder (Li et al., CVPR 2023; SViTT-Ego): ALBEF's
xbert, a BERT-base whose last layers add cross-attention to the video tokens, with multimodal
node sparsity (the video tokens pruned by the text [CLS] query's cross-attention).

  ids [B, L] int32, mask [B, L] (1 = token)
    → word_embeddings[ids] + position_embeddings[0 … L − 1] + token_type_embedding, LayerNorm,
      dropout                                                       (the embeddings)
    → layers [0, fusion_layer): x = LN(x + drop(SelfAttn(x, mask))); x = LN(x + drop(MLP(x)))
    → hidden [B, L, width]: `text()`, row 0 the text [CLS] (the contrastive head's input)
  hidden, video [B, N, Dv] (video_mask [B, N])
    → layers [fusion_layer, depth), each: x = LN(x + drop(SelfAttn(x, mask)));
      x = LN(x + drop(CrossAttn(x, video, video_mask))); x = LN(x + drop(MLP(x)))
      after the cross-attention of fusion layer `prune_layer` (0-based among the fusion layers)
      the video keeps its num_video_global leading (CLS) tokens and the
      ceil(video_keep_rate · (N − num_video_global)) patch tokens the text [CLS] query attends
      to most (probabilities averaged over heads), in their original order; the later fusion
      layers attend to those alone: `fusion()` → FusionOutput(hidden, video_kept)
  mlm_logits(hidden) = LN(gelu(hidden · W + b)) · word_embeddingsᵀ + mlm_bias: BERT's prediction
    head with the decoder tied to the word embeddings (no decoder kernel of its own).

Attention (self and cross) is BERT's: softmax(q·kᵀ/√d_head) over the keys the mask allows (the
masked logits set to the float32 minimum), dropout on the probabilities, the heads' outputs
projected back to `width`; the cross-attention's key and value project the video's Dv to
`width`. Post-LN residuals (x = LN(x + dropout(sublayer(x)))), exact (erf) GELU, LayerNorm ε
1e-12. Matmuls run in `dtype`; logits, softmax, LayerNorms and the residual stream in float32.
Parameters are boxed with logical axes (partitioning.py): word_embeddings ('vocab', 'embed'),
position_embeddings ('positions', 'embed'), query/key/value ('embed', 'heads', 'kv'),
out ('heads', 'kv', 'embed'), MLP ('embed', 'mlp') / ('mlp', 'embed'), mlm_bias ('vocab',).

Decisions, and how they differ from SViTT's public code (JerryYLi/svitt, models/sparse_xbert.py
BertLayer / BertEncoder / BertLMPredictionHead, configs/pretrain_webvid.yaml):

  prune layer  Counted among the fusion layers (`prune_layer` = 1: the second, as the issue and
               the yaml's joint_encoder_args.token_drop_loc_xmodal [1]); sparse_xbert's
               BertConfig.token_drop_loc indexes absolute layers (default [9]). One pruning step.
  propagation  The pruned video (and its mask) is what every later fusion layer attends to, in
               every call. The reference's BertEncoder hands the pruned tokens on only in
               mode='fusion'; in mode='multi_modal' (text and fusion in one call) the layers after
               the pruning one still attend to all video tokens.
  ranking      By the text [CLS] (query row 0) cross-attention probabilities averaged over heads,
               BEFORE attention dropout (as the reference's `attention_probs`), ties to the lower
               index (token_pruning.py; torch.topk leaves ties unordered).
  video mask   A masked video token (video_mask 0) is never attended to and scores −1, below
               every valid token: it is kept only when fewer valid patch tokens than the kept
               count exist, after all of them, and stays masked (the mask is gathered with the
               tokens). The reference adds −10000 to masked logits, so a masked token's
               probability is 0 and can tie with a valid token whose probability underflowed, and
               torch.topk may then keep the masked one ahead of it. The global tokens are kept
               whatever their mask.
  masking      Masked logits are replaced by the float32 minimum, not shifted by −10000: the same
               probabilities for any row with a valid key; a row with no valid key (an empty text,
               an example with no valid video token) attends uniformly to all keys, as the
               reference does, and gives no NaN.
  token type   SViTT never passes token_type_ids, so every token is type 0: one vector
               `token_type_embedding` [width] (row 0 of BERT's [2, width] table when importing).
  pooler       None: SViTT reads hidden[:, 0] for the contrastive and matching heads, never
               BertPooler's tanh(dense(·)).
  padding row  torch's padding_idx (no gradient to the pad row) is not reproduced: padded
               positions are masked as keys and no loss reads their outputs, so the pad row gets
               no gradient anyway.
  init         Dense kernels and the embedding tables truncated normal (std 0.02, TF BERT's
               initializer; HF's _init_weights draws normal 0.02), biases zero, LayerNorms 1 / 0.
  projections  The attention's DenseGenerals have the names, shapes and axes of
               partitioning.attention_projections / attention_output (query, key, value, out),
               but are declared here: those helpers fix xavier init and project from the
               queries' own width, and the cross-attention's key/value take Dv.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vatt_jax.models.partitioning import partitioned_general
from vatt_jax.models.token_pruning import cls_attention_scores, prune_tokens
from vatt_jax.models.transformer import REMAT_POLICIES, RESIDUAL_AXES, norm

Dtype = Any

_NEG = float(jnp.finfo(jnp.float32).min)
INIT_STDDEV = 0.02  # BERT's initializer_range


def _bert_init() -> nn.initializers.Initializer:
  return nn.initializers.truncated_normal(stddev=INIT_STDDEV)


class BertAttention(nn.Module):
  """BERT's multi-head attention, before its residual: queries from x, keys/values from context.

  Attributes:
    num_heads: H (width must divide by it).
    attention_dropout_rate: dropout on the attention probabilities (training only).
    dtype: compute dtype of the projections (logits and softmax in float32).
  """

  num_heads: int
  attention_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    context: jax.Array,
    key_mask: jax.Array | None,
    deterministic: bool,
  ) -> tuple[jax.Array, jax.Array]:
    """x [B, Lq, D] queries; context [B, Lk, Dc] keys and values; key_mask [B, Lk] bool or None.

    Returns (out [B, Lq, D] in dtype, cls_probs [B, H, Lk] float32: query row 0's attention
    probabilities before dropout).
    """
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    head_dim = width // self.num_heads

    def heads_dense(name):
      return nn.DenseGeneral(
        features=(self.num_heads, head_dim),
        kernel_init=partitioned_general(_bert_init(), ('embed', 'heads', 'kv')),
        bias_init=partitioned_general(nn.initializers.zeros_init(), ('heads', 'kv')),
        dtype=self.dtype,
        name=name,
      )

    q = heads_dense('query')(x)  # [B, Lq, H, Dh]
    k = heads_dense('key')(context)  # [B, Lk, H, Dh]
    v = heads_dense('value')(context)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(head_dim)
    if key_mask is not None:
      logits = jnp.where(key_mask[:, None, None, :], logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    cls_probs = probs[:, :, 0]
    # BERT drops whole attended tokens (probabilities), as the original Transformer.
    probs = nn.Dropout(self.attention_dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)
    out = nn.DenseGeneral(
      features=width,
      axis=(-2, -1),
      kernel_init=partitioned_general(_bert_init(), ('heads', 'kv', 'embed')),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
      dtype=self.dtype,
      name='out',
    )(out)
    return out, cls_probs


class BertMlp(nn.Module):
  """fc2(gelu(fc1(x))), exact GELU, no dropout inside (BERT's intermediate/output denses)."""

  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]

    def dense(features, axes, name):
      return nn.Dense(
        features,
        kernel_init=nn.with_logical_partitioning(_bert_init(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]),
        dtype=self.dtype,
        name=name,
      )

    y = nn.gelu(dense(self.mlp_dim, ('embed', 'mlp'), 'fc1')(x), approximate=False)
    return dense(width, ('mlp', 'embed'), 'fc2')(y)


class SvittTextLayer(nn.Module):
  """One post-LN BERT layer: self-attention, [cross-attention to the video], MLP.

  Parameters: attention/{query, key, value, out}, norm_attention, [cross_attention/{…},
  norm_cross_attention], mlp/{fc1, fc2}, norm_mlp. Call positionally
  (x, mask, video, video_mask, deterministic): nn.remat marks argument 5 (counting self) static.
  """

  num_heads: int
  mlp_dim: int
  cross_attention: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-12
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, video=None, video_mask=None, deterministic: bool = True):
    """x [B, L, D] float32; mask [B, L] bool; video [B, N, Dv]; video_mask [B, N] bool | None.

    Returns (x [B, L, D] float32, cls_probs [B, H, N] float32 — the text [CLS] query's
    cross-attention probabilities before dropout — or None without cross-attention).
    """

    def residual(x, y, name):
      y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
      return norm('layernorm', name, self.layer_norm_epsilon)(x + y.astype(jnp.float32))

    def attention(name):
      return BertAttention(self.num_heads, self.attention_dropout_rate, self.dtype, name=name)

    y, _ = attention('attention')(x, x, mask, deterministic)
    x = residual(x, y, 'norm_attention')
    cls_probs = None
    if self.cross_attention:
      if video is None:
        raise ValueError('a fusion layer needs the video tokens (video is None)')
      y, cls_probs = attention('cross_attention')(x, video, video_mask, deterministic)
      x = residual(x, y, 'norm_cross_attention')
    y = BertMlp(self.mlp_dim, self.dtype, name='mlp')(x)
    return residual(x, y, 'norm_mlp'), cls_probs


class FusionOutput(NamedTuple):
  hidden: jax.Array  # [B, L, width] multimodal hidden states (row 0 = [CLS])
  video_kept: (
    jax.Array | None
  )  # [B, N'] int32 indices into the input video tokens (None: no pruning)


class SvittTextEncoder(nn.Module):
  """SViTT's text + multimodal encoder (see the module docstring). `text`, `fusion` and
  `mlm_logits` share the parameters declared in setup, so a parent may call them separately.

  Attributes:
    vocab_size: rows of the word embedding (the caller's ids, special tokens included, lie in
      [0, vocab_size)).
    width, depth, num_heads, mlp_dim: BERT-base: 768, 12, 12, 3072.
    max_length: rows of the learned absolute position table (L ≤ max_length).
    fusion_layer: layers [fusion_layer, depth) add cross-attention (the multimodal encoder).
    video_keep_rate: fraction of the video patch tokens kept by multimodal pruning (1.0 = none).
    prune_layer: 0-based index among the fusion layers after whose cross-attention the video is
      pruned (SViTT: 1, the second); −1 = never.
    num_video_global: leading video tokens (the CLS) always kept and never scored.
    dropout_rate, attention_dropout_rate: hidden and attention-probability dropout.
    layer_norm_epsilon: every LayerNorm's.
    remat: transformer.REMAT_POLICIES key, rematerialisation of each layer.
    dtype: compute dtype of the matmuls (norms, softmax and the residual stream in float32).
  """

  vocab_size: int
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_length: int = 512
  fusion_layer: int = 9
  video_keep_rate: float = 0.1
  prune_layer: int = 1
  num_video_global: int = 1
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-12
  remat: str = 'none'
  dtype: Dtype = jnp.float32

  def _check_config(self) -> None:
    if self.vocab_size < 1 or self.max_length < 1 or self.depth < 1:
      raise ValueError(
        f'vocab_size ({self.vocab_size}), max_length ({self.max_length}) and depth '
        f'({self.depth}) must be positive'
      )
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by num_heads {self.num_heads}')
    if not 0 <= self.fusion_layer <= self.depth:
      raise ValueError(f'fusion_layer {self.fusion_layer} outside [0, depth={self.depth}]')
    num_fusion = self.depth - self.fusion_layer
    if not (self.prune_layer == -1 or 0 <= self.prune_layer < num_fusion):
      raise ValueError(
        f'prune_layer {self.prune_layer} must be -1 (never) or index one of the {num_fusion} '
        f'fusion layers (depth {self.depth} − fusion_layer {self.fusion_layer})'
      )
    rate = self.video_keep_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
      raise ValueError(f'video_keep_rate must be a Python number, got {type(rate).__name__}')
    if not (math.isfinite(rate) and 0 < rate <= 1):
      raise ValueError(f'video_keep_rate must be in (0, 1], got {rate}')
    if self.num_video_global < 0:
      raise ValueError(f'num_video_global must be >= 0, got {self.num_video_global}')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}')

  def setup(self):
    self._check_config()
    embedding_init = _bert_init()
    self.word_embeddings = self.param(
      'word_embeddings',
      nn.with_logical_partitioning(embedding_init, ('vocab', 'embed')),
      (self.vocab_size, self.width),
      jnp.float32,
    )
    self.position_embeddings = self.param(
      'position_embeddings',
      nn.with_logical_partitioning(embedding_init, ('positions', 'embed')),
      (self.max_length, self.width),
      jnp.float32,
    )
    self.token_type_embedding = self.param(
      'token_type_embedding',
      nn.with_logical_partitioning(embedding_init, ('embed',)),
      (self.width,),
      jnp.float32,
    )
    self.embedding_norm = norm('layernorm', 'embedding_norm', self.layer_norm_epsilon)
    self.embedding_dropout = nn.Dropout(self.dropout_rate)
    layer_cls = SvittTextLayer
    if self.remat != 'none':
      # Arguments counted with self: (self, x, mask, video, video_mask, deterministic).
      layer_cls = nn.remat(SvittTextLayer, policy=REMAT_POLICIES[self.remat], static_argnums=(5,))
    self.layers = tuple(
      layer_cls(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        cross_attention=i >= self.fusion_layer,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        layer_norm_epsilon=self.layer_norm_epsilon,
        dtype=self.dtype,
        name=f'layer_{i:02d}',
      )
      for i in range(self.depth)
    )
    self.mlm_transform = nn.Dense(
      self.width,
      # One mesh axis per array: the output width stays unsharded (as tower.py's projections).
      kernel_init=nn.with_logical_partitioning(_bert_init(), ('embed', None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
      dtype=self.dtype,
      name='mlm_transform',
    )
    self.mlm_norm = norm('layernorm', 'mlm_norm', self.layer_norm_epsilon)
    self.mlm_bias = self.param(
      'mlm_bias',
      nn.with_logical_partitioning(nn.initializers.zeros_init(), ('vocab',)),
      (self.vocab_size,),
      jnp.float32,
    )

  @property
  def prunes(self) -> bool:
    """Whether fusion() prunes the video tokens."""
    return self.video_keep_rate < 1.0 and self.prune_layer >= 0

  def text(self, ids: jax.Array, mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """ids [B, L] int32 in [0, vocab_size), mask [B, L] (1 = token) → hidden [B, L, width]
    float32: the embeddings and the text-only layers [0, fusion_layer); row 0 the text [CLS]."""
    if ids.ndim != 2:
      raise ValueError(f'text ids must be [B, L], got shape {ids.shape}')
    if ids.shape[1] > self.max_length:
      raise ValueError(f'text length {ids.shape[1]} exceeds max_length {self.max_length}')
    if tuple(mask.shape) != tuple(ids.shape):
      raise ValueError(f'text mask of shape {mask.shape} does not match ids of shape {ids.shape}')
    length = ids.shape[1]
    x = jnp.take(self.word_embeddings, ids, axis=0)
    x = x + self.position_embeddings[None, :length] + self.token_type_embedding
    x = self.embedding_dropout(self.embedding_norm(x), deterministic=deterministic)
    x = nn.with_logical_constraint(x, RESIDUAL_AXES)
    key_mask = jnp.asarray(mask) > 0
    for layer in self.layers[: self.fusion_layer]:
      x, _ = layer(x, key_mask, None, None, deterministic)
      x = nn.with_logical_constraint(x, RESIDUAL_AXES)
    return x

  def fusion(
    self,
    hidden: jax.Array,
    mask: jax.Array,
    video: jax.Array,
    video_mask: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> FusionOutput:
    """hidden [B, L, width] from text(); mask [B, L] (1 = token); video [B, N, Dv] tokens, the
    num_video_global globals first; video_mask [B, N] (1 = valid) or None (all valid) →
    FusionOutput(hidden [B, L, width] float32, video_kept [B, num_video_global + K] int32 or
    None): the fusion layers [fusion_layer, depth), pruning the video after the cross-attention
    of fusion layer prune_layer (video_kept: the globals, then the kept patch tokens in order)."""
    if hidden.ndim != 3 or hidden.shape[-1] != self.width:
      raise ValueError(f'hidden must be [B, L, {self.width}], got shape {hidden.shape}')
    if tuple(mask.shape) != tuple(hidden.shape[:2]):
      raise ValueError(f'text mask of shape {mask.shape} does not match hidden {hidden.shape}')
    if video.ndim != 3 or video.shape[0] != hidden.shape[0]:
      raise ValueError(f'video must be [B={hidden.shape[0]}, N, Dv], got shape {video.shape}')
    if video.shape[1] < self.num_video_global:
      raise ValueError(
        f'{video.shape[1]} video tokens, fewer than num_video_global {self.num_video_global}'
      )
    if video_mask is None:
      video_mask = jnp.ones(video.shape[:2], bool)
    elif tuple(video_mask.shape) != tuple(video.shape[:2]):
      raise ValueError(f'video_mask of shape {video_mask.shape} does not match video {video.shape}')
    video_mask = jnp.asarray(video_mask) > 0
    key_mask = jnp.asarray(mask) > 0
    kept = None
    for index, layer in enumerate(self.layers[self.fusion_layer :]):
      hidden, cls_probs = layer(hidden, key_mask, video, video_mask, deterministic)
      hidden = nn.with_logical_constraint(hidden, RESIDUAL_AXES)
      if self.prunes and index == self.prune_layer:
        video, video_mask, kept = self._prune(video, video_mask, cls_probs)
    return FusionOutput(hidden, kept)

  def _prune(self, video, video_mask, cls_probs):
    """The kept video [B, g + K, Dv], its mask and the kept indices [B, g + K]."""
    g = self.num_video_global
    scores = cls_attention_scores(cls_probs[:, :, None, :], g)  # [B, N − g]
    # Probabilities are ≥ 0: a masked token scores below every valid one (module docstring).
    scores = jnp.where(video_mask[:, g:], scores, -1.0)
    video, kept = prune_tokens(video, scores, self.video_keep_rate, num_global=g)
    return video, jnp.take_along_axis(video_mask, kept, axis=1), kept

  def mlm_logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., width] → logits [..., vocab_size] float32: LN(gelu(dense(hidden))) times the
    word-embedding table (tied decoder) plus mlm_bias."""
    if hidden.shape[-1] != self.width:
      raise ValueError(f'mlm_logits wants [..., {self.width}], got shape {hidden.shape}')
    y = nn.gelu(self.mlm_transform(hidden).astype(jnp.float32), approximate=False)
    y = self.mlm_norm(y).astype(self.dtype)
    table = self.word_embeddings.astype(self.dtype)
    logits = jnp.einsum('...d,vd->...v', y, table, preferred_element_type=jnp.float32)
    return logits + self.mlm_bias

  def __call__(
    self,
    ids: jax.Array,
    mask: jax.Array,
    video: jax.Array,
    video_mask: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> tuple[FusionOutput, jax.Array]:
    """text → fusion → mlm_logits (what init runs, so that every parameter exists)."""
    hidden = self.text(ids, mask, deterministic=deterministic)
    fused = self.fusion(hidden, mask, video, video_mask, deterministic=deterministic)
    return fused, self.mlm_logits(fused.hidden)
