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

Relative position bias (svitt_position.py): each token carries its ORIGINAL position, and the bias
between two tokens is read from those, so pruning keeps the unpruned sequence's bias. Attention
and block: svitt_blocks.py.

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
  temporal     See svitt_position.expand_temporal.

"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vatt_jax.models.svitt_blocks import SvittBlock
from vatt_jax.models.svitt_position import SvittRelativePositionBias
from vatt_jax.models.token_pruning import kept_count
from vatt_jax.models.transformer import REMAT_POLICIES, RESIDUAL_AXES, norm

Dtype = Any

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
