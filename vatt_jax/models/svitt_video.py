"""SViTT's video encoder (Li et al., CVPR 2023; SViTT-Ego): a BEiT-style ViT over sampled frames
with edge sparsity (block-sparse attention) and node sparsity (token pruning by CLS attention).

  frames [B, T, H, W, 3] in [−1, 1]
    → 16×16 patches of every frame, a linear patch embedding (frame-major token order t, h, w)
    → one CLS token in front: L = 1 + N tokens, N = T·(H/16)·(W/16)
    → `depth` pre-LN blocks: x + γ₁·Attn(LN(x)), x + γ₂·MLP(LN(x)), each block with its own
      relative position bias over (t, h, w) offsets (BEiT's per-layer table, grown to time);
      attention 'dense' or 'block_sparse' (sparse_attention.block_sparse_attention: G, w, R);
      after the blocks in `token_drop_loc`, keep the CLS and the ceil(keep_rate · N) patch tokens
      the block's CLS query attends to most (mean over heads), in their original order
    → tokens = LN_final(x)  [B, 1 + K, D]   (for the multimodal encoder)
      representation = LN_pool(mean of x over the K kept patch tokens, CLS excluded)  [B, D]
      positions  [B, 1 + K] int32: each output token's index in the original sequence
      (0 = CLS, 1 + (t·nh + i)·nw + j = patch (i, j) of frame t).

Relative position bias. Each token carries its ORIGINAL position (positions [B, L], composed
through every pruning step), and the bias between query i and key j is read from those, so it
is the same bias as in the unpruned sequence, gathered at the kept tokens:

  both patches  offset_table[t_i − t_j + T − 1, h_i − h_j + nh − 1, w_i − w_j + nw − 1]  (query
                minus key, as BEiT's relative_position_index)
  CLS → patch   global_table[0]      patch → CLS  global_table[1]      CLS → CLS  global_table[2]

(offset_table [2T−1, 2nh−1, 2nw−1, H], global_table [3, H]; with g global tokens the global rows
are g (global i → patch), g (patch → global j), g² (global i → global j).) SViTT's
BeitRelativePositionBias3D keeps one flat table [(2T−1)(2nh−1)(2nw−1) + 3, H] with the offsets
mixed-radix (t slowest, then h, then w) and the three CLS rows after them in the same order:
`offset_table.reshape(-1, H)` followed by `global_table` IS that table, row for row. The two
tables are kept apart so that their shapes say the grid (expand_temporal needs no arguments).

Decisions, and how they differ from SViTT's public code (JerryYLi/svitt, models/sparse_xbeit.py,
models/utils.py, models/model_retrieval_base.py):

  pooling      BEiT's use_mean_pooling (SViTT keeps it on): the representation is LayerNorm of the
               mean of the last block's outputs over the patch tokens, CLS excluded, before any
               final norm (BeitPooler: mean of hidden_states[:, 1:], then its LayerNorm; with mean
               pooling BeitModel's own final norm is the identity). The token sequence handed on
               gets a separate LayerNorm (SViTT's `vision_layernorm` in encode_image); here
               'final_norm'. After pruning, the mean runs over the kept patch tokens.
  ranking      The pruning scores are the CLS query's attention probabilities BEFORE attention
               dropout (SViTT ranks by the probabilities after dropout; with BEiT's attention
               dropout of 0 the two agree); ties go to the lower index (token_pruning.py).
  block-sparse The block-sparse path is sparse_attention.block_sparse_attention's: non-wrapping
               local windows, masked padding, exactly dense when num_blocks ≤ w + R, a fixed
               per-layer pattern in evaluation (see that module for each difference from
               SViTT's BeitSelfAttention.sparse_attention), given the bias as a `bias_fn` of the
               attended (query, key) pairs: a full [B, H, L, L] relative bias
               (and getting its gradient back) costs O(L²) memory per layer and undoes most of
               the edge sparsity's saving (one training block at 8 × 14 × 14 tokens, width 96,
               12 heads, batch 2, XLA CPU temporaries: dense 938 MiB, block-sparse without bias
               160, with a full bias 541, with the bias function 163).
  token order  Frame-major (t, h, w) only: SViTT's default token_3d_order 'none' (its z-curve and
               Hilbert orders are not implemented).
  key bias     BEiT's key projection has no bias; here q, k and v all have one (the module shares
               MultiHeadSelfAttention's parameters). A key bias adds q·b_k to every logit of a
               query, which the softmax cancels: the function is the same (import a BEiT key with
               a zero bias).
  patches      A 16×16 stride-16 convolution is a Dense on flattened patches; the flattening
               order here is (row, column, channel) of the patch (a torch Conv2d kernel
               [D, C, 16, 16] imports as kernel.transpose(2, 3, 1, 0).reshape(-1, D)).
  init         Relative position tables start at zero (BEiT); the CLS token truncated normal
               (std 0.02); projections as the repository's attention/MLP modules (xavier).
  norms        LayerNorm epsilon 1e-12, layer scale γ init 0.1 and stochastic depth linear in
               depth from 0 to 0.1: the BeitConfig defaults of SViTT's sparse_config.py, all
               configurable. A relative bias table per block (use_relative_position_bias, as
               BEiT-B/16's fine-tuned checkpoints) by default; shared_relative_bias=True for
               use_shared_relative_position_bias.
  temporal     See `expand_temporal`.

Shared encoder hook. `SvittBlock` takes the contract attributes of transformer.EncoderBlock and
returns (tokens, kept) when it prunes, so it also fits transformer.BLOCKS; but the Encoder passes
a block neither the tokens' original positions nor anything but a full [B, H, L, L] bias, so
inside the shared Encoder the relative bias must be ONE full array computed outside (grid=None,
bias_all_layers=True; the Encoder gathers it after pruning), with the memory cost above.
Per-layer tables read at the original positions need the positions in the block, which is why
`SvittVideoEncoder` runs its own loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vatt_jax.models.partitioning import attention_output, attention_projections
from vatt_jax.models.sparse_attention import (
  BiasFn,
  block_sparse_attention,
  module_block_index,
  sum_bias_fn,
)
from vatt_jax.models.token_pruning import cls_attention_scores, kept_count, prune_tokens
from vatt_jax.models.transformer import REMAT_POLICIES, RESIDUAL_AXES, MlpBlock, norm

Dtype = Any

_NEG = float(jnp.finfo(jnp.float32).min)

# ------------------------------------------------------------------------------------------------
# Relative position bias over (t, h, w)
# ------------------------------------------------------------------------------------------------


def num_global_entries(num_global: int) -> int:
  """Rows of the global table: global → patch, patch → global, global → global."""
  return 2 * num_global + num_global * num_global


def pair_index(
  query_positions: jax.Array, key_positions: jax.Array, grid: Sequence[int], num_global: int = 1
) -> jax.Array:
  """Row of the flat table [offset_table.reshape(-1, H); global_table] for query/key pairs.

  Args:
    query_positions, key_positions: int arrays of original positions (0 … num_global − 1 the
      global tokens, then the patches in (t, h, w) order), broadcastable to one shape.
    grid: (T, nh, nw), the patch grid the table is sized for.
    num_global: global tokens in front.
  Returns:
    int32, the broadcast shape.
  """
  nt, nh, nw = (int(g) for g in grid)
  pq, pk = jnp.asarray(query_positions, jnp.int32), jnp.asarray(key_positions, jnp.int32)

  def coords(p):
    patch = jnp.maximum(p - num_global, 0)
    return patch // (nh * nw), (patch // nw) % nh, patch % nw

  (tq, hq, wq), (tk, hk, wk) = coords(pq), coords(pk)
  # Query minus key, each shifted to [0, 2n − 1), mixed radix with t slowest.
  offsets = ((tq - tk + nt - 1) * (2 * nh - 1) + (hq - hk + nh - 1)) * (2 * nw - 1) + (
    wq - wk + nw - 1
  )
  start = (2 * nt - 1) * (2 * nh - 1) * (2 * nw - 1)
  gq, gk = pq < num_global, pk < num_global
  g2p = start + pq  # global i → patch
  p2g = start + num_global + pk  # patch → global j
  g2g = start + 2 * num_global + pq * num_global + pk
  index = jnp.where(gq, jnp.where(gk, g2g, g2p), jnp.where(gk, p2g, offsets))
  return index.astype(jnp.int32)


def relative_position_index(
  positions: jax.Array, grid: Sequence[int], num_global: int = 1
) -> jax.Array:
  """pair_index between all tokens at `positions` [..., L]: int32 [..., L, L] (query, key)."""
  pos = jnp.asarray(positions, jnp.int32)
  return pair_index(pos[..., :, None], pos[..., None, :], grid, num_global)


def _flat_table(offset_table: jax.Array, global_table: jax.Array):
  grid = tuple((s + 1) // 2 for s in offset_table.shape[:3])
  heads = offset_table.shape[-1]
  flat = jnp.concatenate([offset_table.reshape(-1, heads), global_table], axis=0)
  return flat.astype(jnp.float32), grid


def relative_bias_fn(
  offset_table: jax.Array,
  global_table: jax.Array,
  positions: jax.Array,
  num_global: int = 1,
) -> BiasFn:
  """bias_fn(query_index, key_index) → [B, H, *S] float32: the relative position bias between
  the tokens at those indices of the current sequence (int arrays broadcastable to S), read at
  their original `positions` [B, L]. Only the pairs asked for are computed (block-sparse
  attention asks for the attended pairs alone: O(N·(w+R)·G), not O(L²))."""
  flat, grid = _flat_table(offset_table, global_table)
  positions = jnp.asarray(positions, jnp.int32)

  def bias_fn(query_index, key_index):
    pq = positions[:, jnp.asarray(query_index)]  # [B, *Sq]
    pk = positions[:, jnp.asarray(key_index)]
    index = pair_index(pq, pk, grid, num_global)  # [B, *S]
    return jnp.moveaxis(jnp.take(flat, index, axis=0), -1, 1)

  return bias_fn


def relative_position_bias(
  offset_table: jax.Array,
  global_table: jax.Array,
  positions: jax.Array,
  num_global: int = 1,
) -> jax.Array:
  """The bias [B, H, L, L] between tokens at original `positions` [B, L] (see module docstring).

  offset_table [2T−1, 2nh−1, 2nw−1, H] (its shape gives the grid); global_table
  [num_global_entries(num_global), H]. Gathering the result at kept tokens equals calling this
  on the kept positions.
  """
  length = jnp.shape(positions)[-1]
  fn = relative_bias_fn(offset_table, global_table, positions, num_global)
  index = jnp.arange(length)
  return fn(index[:, None], index[None, :])


class SvittRelativePositionBias(nn.Module):
  """A learned bias per (t, h, w) offset and head, plus the CLS entries (BEiT, grown to time).

  Attributes:
    grid: (T, nh, nw) patch grid.
    num_heads: H.
    num_global: global tokens (the CLS) in front.

  __call__(positions [B, L]) → the full bias [B, H, L, L]; bias_fn(positions) → the bias as a
  function of (query index, key index) pairs (relative_bias_fn), for block-sparse attention.
  """

  grid: Sequence[int]
  num_heads: int
  num_global: int = 1

  def setup(self):
    nt, nh, nw = (int(g) for g in self.grid)
    zeros = nn.initializers.zeros_init()
    self.offset_table = self.param(
      'offset_table',
      nn.with_logical_partitioning(zeros, ('positions', None, None, 'heads')),
      (2 * nt - 1, 2 * nh - 1, 2 * nw - 1, self.num_heads),
      jnp.float32,
    )
    self.global_table = self.param(
      'global_table',
      nn.with_logical_partitioning(zeros, ('positions', 'heads')),
      (num_global_entries(self.num_global), self.num_heads),
      jnp.float32,
    )

  def tables(self) -> tuple[jax.Array, jax.Array]:
    """(offset_table, global_table)."""
    return self.offset_table, self.global_table

  def bias_fn(self, positions: jax.Array) -> BiasFn:
    return relative_bias_fn(self.offset_table, self.global_table, positions, self.num_global)

  def __call__(self, positions: jax.Array) -> jax.Array:
    """positions [B, L] original token positions → bias [B, H, L, L] float32."""
    return relative_position_bias(self.offset_table, self.global_table, positions, self.num_global)


# ------------------------------------------------------------------------------------------------
# Block-sparse attention with the bias as a function of the attended pairs
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Attention that also returns the CLS rows, and the block
# ------------------------------------------------------------------------------------------------


class SvittSelfAttention(nn.Module):
  """Dense or block-sparse self-attention returning the global queries' probabilities too.

  Parameters (query, key, value, out) are those of attention.MultiHeadSelfAttention and
  sparse_attention.SparseSelfAttention, so checkpoints interchange.

  Attributes:
    num_heads, attention_dropout_rate, scale_logits, use_bias, dtype: as MultiHeadSelfAttention.
    attention: 'dense' or 'block_sparse'.
    block_size, local_blocks, random_blocks: G, w, R of the block-sparse pattern.
    num_global: leading tokens (the CLS) with dense rows and columns.
  """

  num_heads: int
  attention_dropout_rate: float = 0.0
  scale_logits: bool = True
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  attention: str = 'dense'
  block_size: int = 56
  local_blocks: int = 1
  random_blocks: int = 3
  num_global: int = 1

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    bias_fn: BiasFn | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, jax.Array]:
    """x [B, L, D]; mask [B, L] (True = may be attended to); bias [1|B, H, L, L] and/or
    bias_fn(query_index, key_index) → [B|1, H, *S] (the two add up).

    Returns (out [B, L, D], global_probs [B, H, num_global, L] float32, before dropout).
    """
    if self.attention not in ('dense', 'block_sparse'):
      raise ValueError(f"attention must be 'dense' or 'block_sparse', got {self.attention!r}")
    width = x.shape[-1]
    head_dim = width // self.num_heads
    # [B, L, H, Dh] → [B, H, L, Dh]
    q, k, v = (
      jnp.swapaxes(t, 1, 2)
      for t in attention_projections(x, self.num_heads, use_bias=self.use_bias, dtype=self.dtype)
    )
    scale = 1.0 / math.sqrt(head_dim) if self.scale_logits else 1.0
    use_dropout = not deterministic and self.attention_dropout_rate > 0.0
    f32 = jnp.float32

    if self.attention == 'dense':
      logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=f32) * scale
      if bias is not None:
        logits = logits + jnp.asarray(bias, f32)
      if bias_fn is not None:
        index = jnp.arange(x.shape[1])
        logits = logits + bias_fn(index[:, None], index[None, :])
      if mask is not None:
        logits = jnp.where(jnp.asarray(mask, bool)[:, None, None, :], logits, _NEG)
      probs = jax.nn.softmax(logits, axis=-1)
      global_probs = probs[:, :, : self.num_global]
      if use_dropout:
        probs = nn.Dropout(self.attention_dropout_rate)(probs, deterministic=False)
      out = jnp.einsum('bhqk,bhkd->bhqd', probs.astype(v.dtype), v)
    else:
      random_index = module_block_index(
        self, x.shape[1] - self.num_global, self.block_size, self.local_blocks,
        self.random_blocks, deterministic,
      )  # fmt: skip
      out, global_probs = block_sparse_attention(
        q,
        k,
        v,
        random_index,
        block_size=self.block_size,
        local_blocks=self.local_blocks,
        num_global=self.num_global,
        bias=bias,
        bias_fn=bias_fn,
        key_mask=mask,
        scale=scale,
        dropout_rate=self.attention_dropout_rate if use_dropout else 0.0,
        dropout_rng=self.make_rng('dropout') if use_dropout else None,
        return_global_probs=True,
      )
    out = attention_output(jnp.swapaxes(out, 1, 2), width, use_bias=self.use_bias, dtype=self.dtype)
    return out, global_probs


class SvittBlock(nn.Module):
  """A BEiT block with SViTT's sparsity: x + γ₁·Attn(LN(x)); x + γ₂·MLP(LN(x)); then prune.

  Parameter names follow transformer.EncoderBlock (norm_attention, attention/{query, key, value,
  out}, norm_mlp, mlp/{fc1, fc2}), plus relative_position_bias/{offset_table, global_table}
  (with `grid`) and layer_scale_attention / layer_scale_mlp (with layer_scale_init > 0).

  Attributes:
    mlp_dim … dtype: transformer.EncoderBlock's (the encoder contract; `attention` is 'dense' or
      'block_sparse', run by SvittSelfAttention).
    block_size, local_blocks, random_blocks: G, w, R of the block-sparse pattern.
    num_global: the leading (CLS) tokens.
    keep_rate: < 1 prunes after the block: the block returns (tokens, kept), kept [B, 1 + K] the
      positions, among the tokens it received, of the CLS and the K = ceil(keep_rate · N) patch
      tokens with the highest mean-over-heads CLS attention, in their original order.
    grid: (T, nh, nw): the block owns a relative position bias table and reads it at
      `positions`; None: no own table (a bias may still come in through `bias`).
    layer_scale_init: BEiT's layer scale γ (init value; 0 = none).
    drop_path_rate: stochastic depth of both residual branches (per example, training only).
    layer_norm_epsilon: of both norms.
  """

  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  norm_type: str = 'layernorm'
  mlp_norm_type: str = ''
  scale_logits: bool = True
  use_bias: bool = True
  attention: str = 'dense'
  dtype: Dtype = jnp.float32
  block_size: int = 56
  local_blocks: int = 1
  random_blocks: int = 3
  num_global: int = 1
  keep_rate: float = 1.0
  grid: Sequence[int] | None = None
  layer_scale_init: float = 0.0
  drop_path_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6

  @nn.compact
  def __call__(
    self, x, mask=None, bias=None, deterministic: bool = True, positions=None, tables=None
  ):
    """x [B, L, D]; mask [B, L] | None; bias [1|B, H, L, L] | None; positions [B, L] | None (the
    tokens' original positions, default 0 … L − 1); tables: (offset_table, global_table) of a
    relative position bias shared with other blocks, read at `positions` like the block's own
    (with `grid`). The relative biases reach the attention as functions of the attended pairs,
    never as a full [B, H, L, L] array.

    Returns x [B, L, D], or (x [B, L', D], kept [B, L'] int32) when keep_rate < 1.
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    own = shared = None
    if self.grid is not None:
      own = SvittRelativePositionBias(
        self.grid, self.num_heads, self.num_global, name='relative_position_bias'
      ).bias_fn(positions)
    if tables is not None:
      shared = relative_bias_fn(*tables, positions, self.num_global)
    bias_fn = sum_bias_fn(own, shared)

    def branch(y, name):
      y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
      if self.layer_scale_init > 0.0:
        gamma = self.param(
          f'layer_scale_{name}',
          nn.with_logical_partitioning(nn.initializers.constant(self.layer_scale_init), ('embed',)),
          (x.shape[-1],),
          jnp.float32,
        )
        y = y * gamma.astype(y.dtype)
      # Stochastic depth: the whole branch dropped per example.
      y = nn.Dropout(self.drop_path_rate, broadcast_dims=tuple(range(1, y.ndim)))(
        y, deterministic=deterministic
      )
      return y.astype(x.dtype)

    y = norm(self.norm_type, 'norm_attention', self.layer_norm_epsilon)(x).astype(self.dtype)
    y, global_probs = SvittSelfAttention(
      num_heads=self.num_heads,
      attention_dropout_rate=self.attention_dropout_rate,
      scale_logits=self.scale_logits,
      use_bias=self.use_bias,
      dtype=self.dtype,
      attention=self.attention,
      block_size=self.block_size,
      local_blocks=self.local_blocks,
      random_blocks=self.random_blocks,
      num_global=self.num_global,
      name='attention',
    )(y, mask=mask, bias=bias, bias_fn=bias_fn, deterministic=deterministic)
    x = x + branch(y, 'attention')
    norm_mlp = self.mlp_norm_type or self.norm_type
    y = norm(norm_mlp, 'norm_mlp', self.layer_norm_epsilon)(x).astype(self.dtype)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.use_bias, self.dtype, name='mlp')(
      y, deterministic=deterministic
    )
    x = x + branch(y, 'mlp')
    if self.keep_rate >= 1.0:
      return x
    scores = cls_attention_scores(global_probs, self.num_global)
    return prune_tokens(x, scores, self.keep_rate, num_global=self.num_global)


# ------------------------------------------------------------------------------------------------
# The encoder
# ------------------------------------------------------------------------------------------------


class SvittVideoOutput(NamedTuple):
  tokens: jax.Array  # [B, 1 + K, D] after the final LayerNorm, the CLS first
  representation: jax.Array  # [B, D] LayerNorm(mean over the K kept patch tokens)
  positions: jax.Array  # [B, 1 + K] int32 original positions (0 = CLS)


def _pair(size) -> tuple[int, int]:
  if isinstance(size, int):
    return (size, size)
  h, w = size
  return (int(h), int(w))


def patchify(frames: jax.Array, patch_size: int) -> jax.Array:
  """[B, T, H, W, C] → [B, T·(H/p)·(W/p), p·p·C]: frame-major (t, h, w) tokens, each patch
  flattened in (row, column, channel) order."""
  batch, nt, height, width, channels = frames.shape
  nh, nw = height // patch_size, width // patch_size
  x = frames.reshape(batch, nt, nh, patch_size, nw, patch_size, channels)
  x = x.transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(batch, nt * nh * nw, patch_size * patch_size * channels)


class SvittVideoEncoder(nn.Module):
  """SViTT's sparse video encoder (see the module docstring).

  Attributes:
    width, depth, num_heads, mlp_dim: transformer sizes (BEiT-B/16: 768, 12, 12, 3072).
    patch_size: square patch side (16).
    num_frames: T, frames per clip (the relative bias tables are sized for it).
    image_size: frame side, or (H, W); must divide by patch_size.
    attention: 'dense' or 'block_sparse' (edge sparsity).
    block_size, local_blocks, random_blocks: G, w, R (SViTT: 56, 1, 3).
    keep_rate: node sparsity: fraction of the patch tokens kept after each block of
      token_drop_loc (1.0 = no pruning).
    token_drop_loc: 0-based indices of the blocks after which tokens are pruned.
    shared_relative_bias: one relative bias table for all blocks (BEiT's
      use_shared_relative_position_bias) instead of one per block.
    layer_scale_init, drop_path_rate: BEiT's layer scale init and the stochastic depth of the
      last block (linear from 0 in the first).
    dropout_rate, attention_dropout_rate: hidden and attention-probability dropout.
    layer_norm_epsilon: every LayerNorm's.
    remat: transformer.REMAT_POLICIES key, rematerialisation of each block.
    dtype: compute dtype of the matmuls (norms, softmax and bias in float32).
  """

  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 16
  num_frames: int = 4
  image_size: int | Sequence[int] = 224
  attention: str = 'block_sparse'
  block_size: int = 56
  local_blocks: int = 1
  random_blocks: int = 3
  keep_rate: float = 0.7
  token_drop_loc: Sequence[int] = (3, 6, 9)
  shared_relative_bias: bool = False
  layer_scale_init: float = 0.1
  drop_path_rate: float = 0.1
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-12
  remat: str = 'none'
  dtype: Dtype = jnp.float32

  @property
  def grid(self) -> tuple[int, int, int]:
    """(T, nh, nw): the patch grid of a clip."""
    h, w = _pair(self.image_size)
    return (self.num_frames, h // self.patch_size, w // self.patch_size)

  def kept_patch_counts(self) -> tuple[int, ...]:
    """Patch tokens entering each block, then leaving the last: depth + 1 numbers."""
    counts = [math.prod(self.grid)]
    for i in range(self.depth):
      n = counts[-1]
      counts.append(kept_count(n, self.keep_rate) if self._prunes(i) else n)
    return tuple(counts)

  def _prunes(self, i: int) -> bool:
    return self.keep_rate < 1.0 and i in tuple(self.token_drop_loc)

  def _check(self, frames: jax.Array) -> None:
    h, w = _pair(self.image_size)
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f'image_size {(h, w)} is not a multiple of patch_size {self.patch_size}')
    if frames.ndim != 5 or frames.shape[-1] != 3:
      raise ValueError(f'frames must be [B, T, H, W, 3], got shape {frames.shape}')
    if tuple(frames.shape[1:4]) != (self.num_frames, h, w):
      raise ValueError(
        f'frames of shape {tuple(frames.shape[1:4])} (T, H, W), but the encoder is built for '
        f'{(self.num_frames, h, w)} (num_frames, image_size); to change the frame count of '
        'trained parameters use expand_temporal'
      )
    for i in self.token_drop_loc:
      if not 0 <= i < self.depth:
        raise ValueError(f'token_drop_loc {tuple(self.token_drop_loc)} outside [0, {self.depth})')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}')

  @nn.compact
  def __call__(self, frames: jax.Array, *, deterministic: bool = True) -> SvittVideoOutput:
    """frames [B, T, H, W, 3] in [−1, 1] → SvittVideoOutput(tokens, representation, positions)."""
    self._check(frames)
    batch = frames.shape[0]
    patches = patchify(frames, self.patch_size).astype(self.dtype)
    x = nn.Dense(
      self.width,
      kernel_init=nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), ('patch', 'embed')
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
      dtype=self.dtype,
      name='patch_embedding',
    )(patches)
    cls = self.param(
      'cls',
      nn.with_logical_partitioning(
        nn.initializers.truncated_normal(stddev=0.02), (None, None, 'embed')
      ),
      (1, 1, self.width),
      jnp.float32,
    )
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x], 1)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, RESIDUAL_AXES)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])

    shared = None
    if self.shared_relative_bias:
      shared = SvittRelativePositionBias(self.grid, self.num_heads, name='relative_position_bias')
    block_cls = SvittBlock
    if self.remat != 'none':
      # Arguments counted with self: (self, x, mask, bias, deterministic, positions, tables).
      block_cls = nn.remat(SvittBlock, policy=REMAT_POLICIES[self.remat], static_argnums=(4,))
    rates = np.linspace(0.0, self.drop_path_rate, self.depth) if self.depth > 1 else [0.0]
    for i in range(self.depth):
      block = block_cls(
        mlp_dim=self.mlp_dim,
        num_heads=self.num_heads,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        attention=self.attention,
        dtype=self.dtype,
        block_size=self.block_size,
        local_blocks=self.local_blocks,
        random_blocks=self.random_blocks,
        keep_rate=self.keep_rate if self._prunes(i) else 1.0,
        grid=None if shared is not None else self.grid,
        layer_scale_init=self.layer_scale_init,
        drop_path_rate=float(rates[i]),
        layer_norm_epsilon=self.layer_norm_epsilon,
        name=f'block_{i:02d}',
      )
      tables = None if shared is None else shared.tables()
      out = block(x, None, None, deterministic, positions, tables)
      if isinstance(out, tuple):
        x, kept = out
        positions = jnp.take_along_axis(positions, kept, axis=1)
      else:
        x = out
      x = nn.with_logical_constraint(x, RESIDUAL_AXES)

    pooled = jnp.mean(x[:, 1:].astype(jnp.float32), axis=1)
    representation = norm('layernorm', 'pool_norm', self.layer_norm_epsilon)(pooled)
    tokens = norm('layernorm', 'final_norm', self.layer_norm_epsilon)(x)
    return SvittVideoOutput(tokens, representation, positions)


# Presets: 'base' is BEiT-B/16 at 4 frames × 224² (SViTT-Ego); 'tiny' is for tests and the CPU
# demo: 4 frames × 64² = 4 × 4×4 = 64 patch tokens, pruned 64 → 45 → 32 → 23.
SVITT_VIDEO_PRESETS: dict[str, dict[str, Any]] = {
  'base': dict(width=768, depth=12, num_heads=12, mlp_dim=3072, num_frames=4, image_size=224),
  'tiny': dict(
    width=32,
    depth=4,
    num_heads=2,
    mlp_dim=64,
    num_frames=4,
    image_size=64,
    token_drop_loc=(0, 1, 2),
    block_size=16,
  ),
}


def svitt_video_encoder(preset: str = 'base', **overrides) -> SvittVideoEncoder:
  """SvittVideoEncoder of a preset ('base', 'tiny'), any attribute overridden."""
  try:
    attrs = dict(SVITT_VIDEO_PRESETS[preset])
  except KeyError:
    raise ValueError(f'unknown preset {preset!r}; known: {sorted(SVITT_VIDEO_PRESETS)}') from None
  attrs.update(overrides)
  return SvittVideoEncoder(**attrs)


# ------------------------------------------------------------------------------------------------
# Temporal sparse expansion
# ------------------------------------------------------------------------------------------------

TEMPORAL_RULES = ('replicate', 'nearest')


def temporal_offset_source(old_num_frames: int, new_num_frames: int, rule: str) -> np.ndarray:
  """int [2·T_new − 1]: for each new t-offset row, the old row it is copied from.

  'replicate'  new offset d (row d + T_new − 1) takes old offset clip(d, −(T_old − 1), T_old − 1):
               every offset the old model knew keeps its learned entry, the new larger ones copy
               the largest old one of their sign. A pair of frames d apart is biased as before, so
               any T_old consecutive frames of the new clip see exactly the old model's bias.
  'nearest'    SViTT (models/utils.py interpolate_pos_relative_bias_beit_3d): the t axis of the
               table resized as torch's F.interpolate(mode='nearest'), row i ← old row
               floor(i · (2T_old − 1) / (2T_new − 1)). It treats the clip as stretched to the new
               frame count (8 frames over the same span), but is off-centre: from 4 to 8 frames,
               offset +1 gets offset 0's entry while −1 keeps −1's.
  Shrinking (T_new < T_old) with 'replicate' keeps the central offsets.
  """
  if rule not in TEMPORAL_RULES:
    raise ValueError(f'rule must be one of {TEMPORAL_RULES}, got {rule!r}')
  if old_num_frames < 1 or new_num_frames < 1:
    raise ValueError(f'frame counts must be positive, got {old_num_frames} → {new_num_frames}')
  old_rows, new_rows = 2 * old_num_frames - 1, 2 * new_num_frames - 1
  new = np.arange(new_rows)
  if rule == 'replicate':
    offsets = np.clip(new - (new_num_frames - 1), -(old_num_frames - 1), old_num_frames - 1)
    return offsets + (old_num_frames - 1)
  return np.minimum((new * old_rows) // new_rows, old_rows - 1)


def expand_temporal(params, new_num_frames: int, *, rule: str = 'replicate'):
  """Parameters of a T-frame SvittVideoEncoder → those of the same encoder at new_num_frames.

  The only parameters that depend on the frame count are the relative position tables'
  t axis: every `relative_position_bias/offset_table` [2T−1, 2nh−1, 2nw−1, H] becomes
  [2·new_num_frames − 1, …] by `temporal_offset_source(T, new_num_frames, rule)` (T read from
  the table); the global (CLS) rows, and everything else, are unchanged. The encoder has no
  absolute (temporal) position table. Accepts a params tree or {'params': …} variables, boxed
  (nn.LogicallyPartitioned) or not; returns the same structure.
  """
  frozen = isinstance(params, Mapping) and not isinstance(params, dict)
  tree = params.unfreeze() if hasattr(params, 'unfreeze') else params
  flat = traverse_util.flatten_dict(tree)
  found = 0
  for path, leaf in flat.items():
    if path[-2:] != ('relative_position_bias', 'offset_table'):
      continue
    boxed = isinstance(leaf, nn.meta.AxisMetadata)
    table = leaf.unbox() if boxed else leaf
    old_rows = table.shape[0]
    if old_rows % 2 == 0:
      raise ValueError(f'{"/".join(path)}: {old_rows} t-offset rows is not 2T − 1')
    source = temporal_offset_source((old_rows + 1) // 2, new_num_frames, rule)
    new = jnp.take(jnp.asarray(table), jnp.asarray(source), axis=0)
    flat[path] = leaf.replace_boxed(new) if boxed else new
    found += 1
  if not found:
    raise ValueError('expand_temporal: no relative_position_bias/offset_table in these params')
  out = traverse_util.unflatten_dict(flat)
  if frozen:
    from flax.core import freeze

    out = freeze(out)
  return out
