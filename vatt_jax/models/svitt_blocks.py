"""SViTT's attention (dense or block-sparse, returning the global queries' probabilities for
token pruning) and block (pre-LN BEiT block with layer scale, stochastic depth and pruning).

Decisions: see vatt_jax.models.svitt_video.

Shared encoder hook. `SvittBlock` takes the contract attributes of transformer.EncoderBlock and
returns (tokens, kept) when it prunes, so it also fits transformer.BLOCKS; but the Encoder passes
a block neither the tokens' original positions nor anything but a full [B, H, L, L] bias, so
inside the shared Encoder the relative bias must be ONE full array computed outside (grid=None,
bias_all_layers=True; the Encoder gathers it after pruning), with the memory cost given under
"block-sparse" in svitt_video's decisions.
Per-layer tables read at the original positions need the positions in the block, which is why
`SvittVideoEncoder` runs its own loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vatt_jax.models.partitioning import attention_output, attention_projections
from vatt_jax.models.sparse_attention import (
  BiasFn,
  block_sparse_attention,
  module_block_index,
  sum_bias_fn,
)
from vatt_jax.models.svitt_position import SvittRelativePositionBias, relative_bias_fn
from vatt_jax.models.token_pruning import cls_attention_scores, prune_tokens
from vatt_jax.models.transformer import MlpBlock, norm

Dtype = Any

_NEG = float(jnp.finfo(jnp.float32).min)


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
