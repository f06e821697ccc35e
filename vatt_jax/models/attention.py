"""Multi-head self-attention (the `ATTENTION` implementations a config picks) and the T5 relative
position bias.

Dense attention goes through `jax.nn.dot_product_attention` whenever attention-probability dropout
is off. With attention dropout in training, the probabilities have to be materialised, so an
explicit einsum path is taken instead. Both paths compute the logits, the bias and the softmax in
float32 whatever the compute dtype (jax's XLA implementation accumulates the q·k product in float32
and upcasts before its softmax); only the projections and the probability-weighted sum of values
run in the compute dtype.

Parameter logical axes: q/k/v kernels (embed, heads, kv), biases (heads, kv); the output kernel
(heads, kv, embed), bias (embed,); the relative position bias table (positions, heads).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vatt_jax.models.partitioning import (
  attention_output,
  attention_projections,
)
from vatt_jax.models.sparse_attention import SparseSelfAttention

Dtype = Any


class MultiHeadSelfAttention(nn.Module):
  """Self-attention over a token sequence.

  Attributes:
    num_heads: number of heads; the width must divide by it.
    attention_dropout_rate: dropout on the attention probabilities (training only).
    scale_logits: divide logits by sqrt(d_head) (the T5 text tower does not).
    use_bias: biases on the q/k/v and output projections (the official T5 text tower has none).
    dtype: compute dtype of the projections; softmax is always float32.
  """

  num_heads: int
  attention_dropout_rate: float = 0.0
  scale_logits: bool = True
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    deterministic: bool = True,
  ) -> jax.Array:
    """Attends every token to every unmasked token.

    Args:
      x: [B, N, D] tokens.
      mask: [B, N] bool, True where a token may be attended to (a key mask), or None.
      bias: [1 or B, H, N, N] additive logit bias (relative positions), or None.
      deterministic: disables attention dropout.

    Returns:
      [B, N, D].
    """
    width = x.shape[-1]
    head_dim = width // self.num_heads
    q, k, v = attention_projections(x, self.num_heads, use_bias=self.use_bias, dtype=self.dtype)
    scale = 1.0 / math.sqrt(head_dim) if self.scale_logits else 1.0
    key_mask = None if mask is None else mask[:, None, None, :].astype(bool)  # [B, 1, 1, N]

    if deterministic or self.attention_dropout_rate == 0.0:
      # Logits are float32 here (XLA path); the bias is added to them at full precision.
      out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        bias=None if bias is None else bias.astype(jnp.float32),
        mask=key_mask,
        scale=scale,
      )
    else:
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
      if bias is not None:
        logits = logits + bias.astype(jnp.float32)
      if key_mask is not None:
        logits = jnp.where(key_mask, logits, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits, axis=-1)
      probs = nn.Dropout(self.attention_dropout_rate)(probs, deterministic=False)
      out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)

    return attention_output(out, width, use_bias=self.use_bias, dtype=self.dtype)


# config model.<tower>.attention → the self-attention module of that encoder's blocks. Each takes
# (x [B, N, D], *, mask [B, N] | None, bias [1|B, H, N, N] | None, deterministic) and returns
# [B, N, D] with the attributes num_heads, attention_dropout_rate, scale_logits, use_bias, dtype.
# (SViTT's local + random block-sparse attention enters here.)
ATTENTION: dict[str, type[nn.Module]] = {
  'dense': MultiHeadSelfAttention,
  'block_sparse': SparseSelfAttention,  # sparse_attention.py: SViTT's local + random blocks
}


def get_attention(name: str) -> type[nn.Module]:
  try:
    return ATTENTION[name]
  except KeyError:
    raise ValueError(f'attention {name!r} is not one of {sorted(ATTENTION)}') from None


def relative_position_bucket(
  relative_position: jax.Array, *, num_buckets: int = 32, max_distance: int = 128
) -> jax.Array:
  """T5's bidirectional bucketing of `key_position - query_position`.

  Half the buckets are for keys after the query, half for keys before it; within each half,
  distances below num_buckets/4 get a bucket each, larger ones share log-spaced buckets up to
  max_distance, beyond which all share the last.

  Args:
    relative_position: int array of key_position - query_position.
  Returns:
    int32 array of the same shape, values in [0, num_buckets).
  """
  half = num_buckets // 2
  bucket = (relative_position > 0).astype(jnp.int32) * half
  distance = jnp.abs(relative_position)
  max_exact = half // 2
  is_small = distance < max_exact
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
    max_distance / max_exact
  )
  large = max_exact + (log_ratio * (half - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, half - 1)
  return bucket + jnp.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
  """Learnable T5 relative position bias: one scalar per (bucket, head).

  Returns a [1, H, N, N] bias to add to attention logits.
  """

  num_heads: int
  num_buckets: int = 32
  max_distance: int = 64

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    positions = jnp.arange(length)
    relative = positions[None, :] - positions[:, None]  # [query, key]: key - query
    buckets = relative_position_bucket(
      relative, num_buckets=self.num_buckets, max_distance=self.max_distance
    )
    table = self.param(
      'rel_embedding',
      nn.with_logical_partitioning(
        nn.initializers.normal(stddev=1.0 / math.sqrt(self.num_buckets)), ('positions', 'heads')
      ),
      (self.num_buckets, self.num_heads),
    )
    bias = jnp.take(table, buckets, axis=0)  # [N, N, H]
    return jnp.transpose(bias, (2, 0, 1))[None]
