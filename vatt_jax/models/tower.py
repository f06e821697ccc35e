"""One modality's backbone, written once and used by every model that has towers (VATT's three,
the classifier's one):

  raw input → tokenizer (patches or words + positions) → dropout → DropToken (training) →
  AGG token prepended → [input projection] → encoder → [output projection];
  the output at the AGG slot is the representation.

The two optional projections are the official code's: the T5 text tower's bias-free Dense + GELU
from the 300-d word space (where its AGG token lives) to the width (`agg_projection`), and the
official modality-agnostic model's per-modality Dense(1024) + GELU after the shared encoder
(`post_projection`).

Parameters: `agg` [D] (or [agg_dim]), and those of the `tokenizer`, the `encoder` (unless the tower
is given its parent's shared encoder: the modality-agnostic backbone), the text tower's
`relative_bias`, `input_projection` and `output_projection`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vatt_jax.models.tokenizers import drop_token_index

Dtype = Any


class TowerOutput(NamedTuple):
  agg: jax.Array  # [B, D] float32: the representation
  tokens: jax.Array  # [B, N', D]: the encoder's outputs at the tokens
  kept: jax.Array | None  # [N'] the positions DropToken kept (ascending), None when all N
  mask: jax.Array | None  # [B, N] bool: the tokenizer's padding mask (text), else None


class Tower(nn.Module):
  """Attributes:
  tokenizer: x → tokens [B, N, D] (positions included), or (tokens, mask [B, N]) for text.
  encoder: an Encoder, this tower's own, or the parent's shared one (bound to the parent).
  relative_bias: a RelativePositionBias (text) whose [1, H, N+1, N+1] bias enters the encoder.
  width: D; drop_token_rate: DropToken's rate in training; dropout_rate: dropout on the tokens.
  agg_dim: the AGG token's width when the tokenizer's tokens are not D wide (0: D); they are then
    brought to D after the AGG token is prepended, by a bias-free Dense + GELU (agg_projection).
  post_projection: width of a Dense + GELU on the encoder's outputs (0: none); its AGG row is the
    representation.
  """

  tokenizer: nn.Module
  encoder: nn.Module
  width: int
  relative_bias: nn.Module | None = None
  drop_token_rate: float = 0.0
  dropout_rate: float = 0.0
  agg_dim: int = 0
  post_projection: int = 0
  dtype: Dtype = jnp.float32

  def setup(self):
    self.agg = self.param(
      'agg',
      nn.with_logical_partitioning(nn.initializers.truncated_normal(stddev=0.02), ('embed',)),
      (self.agg_dim or self.width,),
    )
    self.token_dropout = nn.Dropout(self.dropout_rate)
    if self.agg_dim:
      self.input_projection = nn.Dense(
        self.width,
        use_bias=False,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, 'embed')),
        dtype=self.dtype,
      )
    if self.post_projection:
      self.output_projection = nn.Dense(
        self.post_projection,
        kernel_init=nn.with_logical_partitioning(
          nn.initializers.xavier_uniform(), ('embed', 'mlp')
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('mlp',)),
        dtype=self.dtype,
      )

  def _tokens(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """The tokenizer's tokens [B, N, D] (a temporal layout [B, T, N/T, D] flattened) and mask."""
    out = self.tokenizer(x)
    tokens, mask = out if isinstance(out, tuple) else (out, None)
    if tokens.ndim == 4:
      tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
    return tokens, mask

  def __call__(self, x: jax.Array, *, train: bool) -> TowerOutput:
    tokens, mask = self._tokens(x)
    bias = None if self.relative_bias is None else self.relative_bias(tokens.shape[1] + 1)
    tokens = self.token_dropout(tokens, deterministic=not train)
    kept = None
    if train and self.drop_token_rate > 0.0:
      kept = drop_token_index(tokens.shape[1], self.drop_token_rate, self.make_rng('droptoken'))
      if kept is not None:
        tokens = jnp.take(tokens, kept, axis=1)
    batch = tokens.shape[0]
    agg = jnp.broadcast_to(self.agg.astype(tokens.dtype), (batch, 1, tokens.shape[-1]))
    tokens = jnp.concatenate([agg, tokens], axis=1)
    if self.agg_dim:
      tokens = nn.gelu(self.input_projection(tokens), approximate=False)
    attend = None if mask is None else jnp.concatenate([jnp.ones((batch, 1), bool), mask], axis=1)
    out = self.encoder(tokens, mask=attend, bias=bias, deterministic=not train)
    if self.post_projection:
      out = nn.gelu(self.output_projection(out), approximate=False)
    agg = nn.with_logical_constraint(out[:, 0].astype(jnp.float32), ('batch', 'embed_act'))
    return TowerOutput(agg, out[:, 1:], kept, mask)

  def input_space(self, x: jax.Array) -> jax.Array:
    """The tokenizer's tokens mean-pooled over the valid tokens: [B, D] float32 (VATT Fig. 3's
    "input space")."""
    tokens, mask = self._tokens(x)
    tokens = tokens.astype(jnp.float32)
    if mask is None:
      return tokens.mean(1)
    weights = mask.astype(jnp.float32)[..., None]
    return (tokens * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
