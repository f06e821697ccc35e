"""Pre-LayerNorm Transformer encoder and the VATT size presets (paper Table 7).

Two hooks let a method change the encoder without forking it:
  attention  the self-attention of every block, a key of attention.ATTENTION ('dense' today;
             config model.<tower>.attention).
  block      the block class, a key of BLOCKS ('pre_ln'). A block returns either its tokens
             [B, N, D] or (tokens [B, N', D], kept [B, N'] int32): the positions, among the N it
             received, of the N' tokens it keeps (token pruning, e.g. by the attention the AGG/CLS
             token pays). The encoder then gathers the key mask and the attention bias to the kept
             tokens for the blocks that follow, and can return every output token's position in
             the encoder's input.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vatt_jax.models.attention import get_attention

Dtype = Any

LAYER_NORM_EPSILON = 1e-6


@dataclasses.dataclass(frozen=True)
class EncoderSize:
  num_layers: int
  width: int
  mlp_dim: int
  num_heads: int


# The one place the sizes live. "tiny" is ours, for tests and the CPU demo.
SIZES: dict[str, EncoderSize] = {
  'tiny': EncoderSize(num_layers=2, width=64, mlp_dim=256, num_heads=4),
  'small': EncoderSize(num_layers=6, width=512, mlp_dim=2048, num_heads=8),
  'base': EncoderSize(num_layers=12, width=768, mlp_dim=3072, num_heads=12),
  'medium': EncoderSize(num_layers=12, width=1024, mlp_dim=4096, num_heads=16),
  'large': EncoderSize(num_layers=24, width=1024, mlp_dim=4096, num_heads=16),
}


def get_size(name: str) -> EncoderSize:
  try:
    return SIZES[name.lower()]
  except KeyError:
    raise ValueError(f'unknown model size {name!r}; known sizes: {sorted(SIZES)}') from None


# config model.remat → what a rematerialised encoder block keeps for the backward pass.
REMAT_POLICIES = {
  'none': None,  # no rematerialisation: every activation is stored
  'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # projection/MLP matmuls
  'full': jax.checkpoint_policies.nothing_saveable,  # only the block inputs; recompute the rest
}

# The residual stream between blocks.
RESIDUAL_AXES = ('batch', 'length', 'embed_act')


def norm(norm_type: str, name: str, epsilon: float = LAYER_NORM_EPSILON) -> nn.Module:
  """Pre-LN norm of width d ('layernorm' or 'rmsnorm'), computed (and returned) in float32."""
  scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',))
  if norm_type == 'layernorm':
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',))
    return nn.LayerNorm(
      epsilon=epsilon, dtype=jnp.float32, scale_init=scale_init, bias_init=bias_init, name=name
    )
  if norm_type == 'rmsnorm':
    return nn.RMSNorm(epsilon=epsilon, dtype=jnp.float32, scale_init=scale_init, name=name)
  raise ValueError(f"norm_type must be 'layernorm' or 'rmsnorm', got {norm_type!r}")


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout_rate: float = 0.0
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    width = x.shape[-1]

    def dense(features, axes, name):
      return nn.Dense(
        features,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=1e-6), axes[-1:]),
        use_bias=self.use_bias,
        dtype=self.dtype,
        name=name,
      )

    y = dense(self.mlp_dim, ('embed', 'mlp'), 'fc1')(x)
    y = nn.gelu(y, approximate=False)  # exact GELU, as the official VATT code
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    return dense(width, ('mlp', 'embed'), 'fc2')(y)


class EncoderBlock(nn.Module):
  """x + MHA(LN(x)); then x + MLP(LN(x)).

  `norm_type` is the norm before the attention, `mlp_norm_type` the one before the MLP ('' = the
  same): the official T5 text tower has an RMSNorm before the attention but a mean-centred
  LayerNorm with offset before the MLP. `use_bias`: biases in the attention and MLP projections
  (the official T5 tower has none). The norms run in float32 and their outputs are cast to the compute dtype for the matmuls; the
  residual stream keeps the dtype of the block's input. `mask`, `bias` and `deterministic` may be
  passed positionally (nn.remat marks `deterministic`, argument 4 counting self, static).
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

  @nn.compact
  def __call__(self, x, mask=None, bias=None, deterministic: bool = True):
    y = norm(self.norm_type, 'norm_attention')(x).astype(self.dtype)
    y = get_attention(self.attention)(
      num_heads=self.num_heads,
      attention_dropout_rate=self.attention_dropout_rate,
      scale_logits=self.scale_logits,
      use_bias=self.use_bias,
      dtype=self.dtype,
      name='attention',
    )(y, mask=mask, bias=bias, deterministic=deterministic)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = norm(self.mlp_norm_type or self.norm_type, 'norm_mlp')(x).astype(self.dtype)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.use_bias, self.dtype, name='mlp')(
      y, deterministic=deterministic
    )
    return x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


# config model.<tower>.block → the encoder's block class (see the module docstring). A block takes
# (x, mask, bias, deterministic) positionally and the attributes of EncoderBlock (norm_type,
# mlp_norm_type, scale_logits, use_bias, …).
BLOCKS: dict[str, type[nn.Module]] = {'pre_ln': EncoderBlock}


def gather_tokens(x: jax.Array, kept: jax.Array) -> jax.Array:
  """x [B, N, …] → [B, N', …]: the rows `kept` [B, N'] of each example."""
  index = kept.reshape(kept.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def gather_bias(bias: jax.Array, kept: jax.Array) -> jax.Array:
  """An attention bias [1|B, H, N, N] → [B, H, N', N'] between the kept tokens of each example."""
  bias = jnp.broadcast_to(bias, (kept.shape[0], *bias.shape[1:]))
  rows = jnp.take_along_axis(bias, kept[:, None, :, None], axis=2)
  return jnp.take_along_axis(rows, kept[:, None, None, :], axis=3)


class Encoder(nn.Module):
  """A stack of blocks (pre-LN by default) followed by a final norm.

  Attributes:
    size: layers, width, MLP width and heads.
    norm_type: the norm before each attention and at the end of the stack; mlp_norm_type: the
      norm before each MLP ('' = norm_type). The official T5 text tower: 'rmsnorm' / 'layernorm'.
    use_bias: biases in the attention and MLP projections (the official T5 tower: none).
    bias_all_layers: add the attention bias to every layer (T5 / official VATT text tower) rather
      than only to the first (the paper's wording).
    remat: rematerialisation of each block in the backward pass, a key of REMAT_POLICIES: 'none'
      (store all activations), 'dots' (store the outputs of matmuls without batch dimensions, i.e.
      the projections and the MLP; recompute the rest) or 'full' (recompute the whole block).
      Parameter names and values do not depend on it.
  """

  size: EncoderSize
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  norm_type: str = 'layernorm'
  mlp_norm_type: str = ''
  scale_logits: bool = True
  use_bias: bool = True
  bias_all_layers: bool = False
  remat: str = 'none'
  attention: str = 'dense'
  block: str = 'pre_ln'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    deterministic: bool = True,
    return_positions: bool = False,
  ):
    """x: [B, N, width]; mask: [B, N] bool (True = attend); bias: [1|B, H, N, N].

    Returns [B, N', width] (N' = N unless a block prunes tokens); with return_positions, also the
    position in x of every output token, [B, N'] int32 (None when no block pruned).
    """
    if x.shape[-1] != self.size.width:
      raise ValueError(f'encoder of width {self.size.width} got tokens of width {x.shape[-1]}')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}')
    if self.block not in BLOCKS:
      raise ValueError(f'encoder block {self.block!r} is not one of {sorted(BLOCKS)}')
    block_cls = BLOCKS[self.block]
    if self.remat != 'none':
      # Arguments counted with self: (self, x, mask, bias, deterministic).
      block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat], static_argnums=(4,))
    x = nn.with_logical_constraint(x, RESIDUAL_AXES)
    positions = None
    for i in range(self.size.num_layers):
      layer_bias = bias if (i == 0 or self.bias_all_layers) else None
      out = block_cls(
        mlp_dim=self.size.mlp_dim,
        num_heads=self.size.num_heads,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        norm_type=self.norm_type,
        mlp_norm_type=self.mlp_norm_type,
        scale_logits=self.scale_logits,
        use_bias=self.use_bias,
        attention=self.attention,
        dtype=self.dtype,
        name=f'block_{i:02d}',
      )(x, mask, layer_bias, deterministic)
      if isinstance(out, tuple):  # a pruning block: the tokens it kept, and where they were
        x, kept = out
        positions = kept if positions is None else gather_tokens(positions, kept)
        mask = None if mask is None else gather_tokens(mask, kept)
        bias = None if bias is None else gather_bias(bias, kept)
      else:
        x = out
      x = nn.with_logical_constraint(x, RESIDUAL_AXES)
    x = norm(self.norm_type, 'final_norm')(x)
    return (x, positions) if return_positions else x
