"""Raw-signal tokenizers (voxel, waveform, word) and DropToken.

Each tokenizer maps one modality's raw input to a [B, N, D] token sequence that already carries its
absolute positions (none for text, whose positions enter as a relative attention bias).

Parameter logical axes: patch projections (patch, embed) and bias (embed,); position tables
(positions, embed); position norms (embed,); the vocabulary (vocab, embed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _position_init(width: int):
  # Truncated normal with std width**-0.5, as the official VATT code initialises its buckets.
  return nn.with_logical_partitioning(
    nn.initializers.truncated_normal(stddev=width**-0.5), ('positions', 'embed')
  )


def _patch_projection(width: int, dtype: Dtype) -> nn.Dense:
  return nn.Dense(
    width,
    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ('patch', 'embed')),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
    dtype=dtype,
    name='patch',
  )


def _pre_projection(width: int, dtype: Dtype) -> nn.Dense:
  """Dense(width) with bias, then exact GELU: the official modality-agnostic model's per-modality
  pre-projection between the patch (or word) embedding and the positions (uvatt.py)."""
  return nn.Dense(
    width,
    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, 'embed')),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
    dtype=dtype,
    name='pre_projection',
  )


def _project(tokens: jax.Array, width: int, pre_projection: bool, dtype: Dtype) -> jax.Array:
  if not pre_projection:
    return tokens
  return nn.gelu(_pre_projection(width, dtype)(tokens), approximate=False)


def _position_norm() -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=1e-6,
    dtype=jnp.float32,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
    name='position_norm',
  )


def num_kept_tokens(num_tokens: int, drop_rate: float) -> int:
  """How many tokens DropToken keeps: int((1 - rate) * N), at least one; static under jit."""
  if not 0.0 <= drop_rate < 1.0:
    raise ValueError(f'drop_token_rate must be in [0, 1), got {drop_rate}')
  # The small epsilon guards int() against 0.25 * 1568 = 391.99999... style round-off.
  return max(1, int((1.0 - drop_rate) * num_tokens + 1e-6))


def drop_token_index(num_tokens: int, drop_rate: float, rng: jax.Array) -> jax.Array | None:
  """The positions DropToken keeps, ascending [num_kept_tokens]; None when it keeps them all."""
  kept = num_kept_tokens(num_tokens, drop_rate)
  if kept == num_tokens:
    return None
  return jnp.sort(jax.random.permutation(rng, num_tokens)[:kept])


def drop_token(tokens: jax.Array, drop_rate: float, rng: jax.Array) -> jax.Array:
  """Keeps a random subset of tokens, the same subset for every example of the batch.

  Args:
    tokens: [B, N, D].
    drop_rate: fraction of the N tokens to drop.
    rng: PRNG key; one permutation is drawn for the whole batch (as the official VATT code does).
  Returns:
    [B, num_kept_tokens(N, drop_rate), D], kept tokens in their original order
    (`drop_token_index` gives their positions).
  """
  index = drop_token_index(tokens.shape[1], drop_rate, rng)
  return tokens if index is None else jnp.take(tokens, index, axis=1)


def _keys_cubic(t: jax.Array) -> jax.Array:
  """Keys' cubic convolution kernel with a = -0.5 (what 'bicubic' resizing uses)."""
  t = jnp.abs(t)
  near = (1.5 * t - 2.5) * t * t + 1.0
  far = ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0
  return jnp.where(t <= 1.0, near, jnp.where(t < 2.0, far, 0.0))


def interpolate_positions(table: jax.Array, length: int) -> jax.Array:
  """[n, D] learned position rows → [length, D], cubic, for a patch grid of another size.

  Fine-tuning at another resolution (224² → 320²) or clip length changes how many rows each
  factorized table needs. Row i of the result sits at old coordinate i·(n−1)/(length−1) (the first
  and last rows stay where they were); each is a Keys cubic (a = −½) combination of the four
  nearest old rows, with the table linearly extrapolated by two rows at each end, so equal sizes
  give the table back and a linear ramp is reproduced exactly.
  """
  n = table.shape[0]
  if length < 1:
    raise ValueError(f'interpolate_positions: length must be >= 1, got {length}')
  if length == n:
    return table
  if n == 1:
    return jnp.repeat(table, length, axis=0)
  first, last = table[0], table[-1]
  before, after = first - table[1], last - table[-2]  # one step outwards at each end
  padded = jnp.concatenate(
    [jnp.stack([first + 2 * before, first + before]), table,
     jnp.stack([last + after, last + 2 * after])]
  )  # fmt: skip
  x = jnp.arange(length, dtype=jnp.float32) * ((n - 1) / max(length - 1, 1))
  base = jnp.clip(jnp.floor(x).astype(jnp.int32), 0, n - 2)
  offsets = jnp.arange(-1, 3)  # the 4 taps: base-1 … base+2
  taps = base[:, None] + offsets[None]  # [length, 4] old-row indices
  weights = _keys_cubic(x[:, None] - taps.astype(jnp.float32))
  rows = padded[taps + 2]  # +2: the two extrapolated rows in front
  return jnp.einsum('lk,lkd->ld', weights.astype(table.dtype), rows)


class VoxelTokenizer(nn.Module):
  """Non-overlapping t×h×w×3 voxel patches → width, plus factorized learned positions.

  e(i, j, k) = temporal_i + horizontal_j + vertical_k (paper eq. 1): ⌈T/t⌉ + ⌈H/h⌉ + ⌈W/w⌉ vectors.

  Attributes:
    width: token width d.
    patch_size: (t, h, w).
    grid: (⌈T/t⌉, ⌈H/h⌉, ⌈W/w⌉) the position tables are sized for.
    position_layernorm: LayerNorm on the summed position table (official-code option).
    pre_projection: Dense + GELU between the patches and the positions (the official
      modality-agnostic model).
    flatten: return [B, nt·nh·nw, D] in (t, h, w) order; False keeps the temporal layout,
      [B, nt, nh·nw, D] (per-frame operations: temporal token rolling, frame pooling).
  """

  width: int
  patch_size: Sequence[int]
  grid: Sequence[int]
  position_layernorm: bool = False
  pre_projection: bool = False
  flatten: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, video: jax.Array) -> jax.Array:
    """video: [B, T, H, W, C] in [-1, 1]. Returns [B, nt·nh·nw, width] ([B, nt, nh·nw, width]
    without `flatten`)."""
    if video.ndim != 5:
      raise ValueError(f'video must be [B, T, H, W, C], got shape {video.shape}')
    batch, *dims, channels = video.shape
    pt, ph, pw = self.patch_size
    grid = tuple(math.ceil(d / p) for d, p in zip(dims, (pt, ph, pw), strict=True))
    if grid != tuple(self.grid):
      raise ValueError(
        f'video of {tuple(dims)} frames×pixels gives a {grid} patch grid, but the position '
        f'tables are sized for {tuple(self.grid)} (config model.video: num_frames / frame_size '
        'and patch_size)'
      )
    pad = (
      [(0, 0)]
      + [(0, g * p - d) for g, p, d in zip(grid, (pt, ph, pw), dims, strict=True)]
      + [(0, 0)]
    )
    video = jnp.pad(video, pad)  # ⌈·⌉ patching: zero-pad a ragged edge
    nt, nh, nw = grid
    patches = video.reshape(batch, nt, pt, nh, ph, nw, pw, channels)
    patches = patches.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(batch, nt, nh, nw, -1)
    tokens = _patch_projection(self.width, self.dtype)(patches.astype(self.dtype))
    tokens = _project(tokens, self.width, self.pre_projection, self.dtype)

    init = _position_init(self.width)
    temporal = self.param('temporal_position', init, (nt, self.width))
    horizontal = self.param('horizontal_position', init, (nh, self.width))
    vertical = self.param('vertical_position', init, (nw, self.width))
    positions = temporal[:, None, None] + horizontal[None, :, None] + vertical[None, None, :]
    if self.position_layernorm:
      positions = _position_norm()(positions)
    tokens = tokens + positions.astype(tokens.dtype)
    if not self.flatten:
      return tokens.reshape(batch, nt, nh * nw, self.width)
    return tokens.reshape(batch, nt * nh * nw, self.width)


class WaveformTokenizer(nn.Module):
  """Waveform segments of t′ samples → width, plus one learned position per segment."""

  width: int
  patch_size: int
  num_patches: int
  position_layernorm: bool = False
  pre_projection: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, audio: jax.Array) -> jax.Array:
    """audio: [B, S] (or [B, S, 1]) in [-1, 1]. Returns [B, ⌈S/t′⌉, width]."""
    if audio.ndim == 3 and audio.shape[-1] == 1:
      audio = audio[..., 0]
    if audio.ndim != 2:
      raise ValueError(f'audio must be [B, S] mono samples, got shape {audio.shape}')
    batch, samples = audio.shape
    num_patches = math.ceil(samples / self.patch_size)
    if num_patches != self.num_patches:
      raise ValueError(
        f'audio of {samples} samples gives {num_patches} patches of {self.patch_size}, but the '
        f'position table has {self.num_patches} (config model.audio: num_samples / patch_size)'
      )
    audio = jnp.pad(audio, ((0, 0), (0, num_patches * self.patch_size - samples)))
    patches = audio.reshape(batch, num_patches, self.patch_size)
    tokens = _patch_projection(self.width, self.dtype)(patches.astype(self.dtype))
    tokens = _project(tokens, self.width, self.pre_projection, self.dtype)
    positions = self.param('position', _position_init(self.width), (num_patches, self.width))
    if self.position_layernorm:
      positions = _position_norm()(positions)
    return tokens + positions[None].astype(tokens.dtype)


class WordTokenizer(nn.Module):
  """Token ids → an embedding table (one-hot × W_tp); id 0 is padding (mask False there).

  Attributes:
    width: the encoder's width d.
    vocab_size: rows of the table.
    embedding_dim: the table's width; 0 = d (vatt-jax's default: a trainable d-wide table). The
      official code's table is 300-d word2vec (frozen), brought to d by the tower (BBS: a
      bias-free Dense + GELU after the AGG token, `Tower.agg_projection`) or here by
      `pre_projection` (the modality-agnostic model).
    trainable: False freezes the table (no gradient reaches it: the official frozen word2vec).
    pre_projection: Dense(d) + GELU with bias after the table (the official modality-agnostic).
    num_positions: learned absolute positions (0 = none: the text tower's relative bias instead);
      the official modality-agnostic model's text has one row per word, with position_layernorm.
  """

  width: int
  vocab_size: int
  embedding_dim: int = 0
  trainable: bool = True
  pre_projection: bool = False
  num_positions: int = 0
  position_layernorm: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ids: [B, W] int. Returns tokens [B, W, embedding_dim or width] and mask [B, W] bool."""
    if ids.ndim != 2:
      raise ValueError(f'text ids must be [B, W], got shape {ids.shape}')
    embed = nn.Embed(
      self.vocab_size,
      self.embedding_dim or self.width,
      dtype=self.dtype,
      embedding_init=nn.with_logical_partitioning(nn.linear.default_embed_init, ('vocab', 'embed')),
      name='vocabulary',
    )
    tokens = embed(ids)
    if not self.trainable:  # no gradient reaches the table (the official frozen word2vec)
      tokens = jax.lax.stop_gradient(tokens)
    tokens = _project(tokens, self.width, self.pre_projection, self.dtype)
    if self.num_positions:
      if ids.shape[1] != self.num_positions:
        raise ValueError(
          f'text of {ids.shape[1]} words, but the position table has {self.num_positions} '
          '(config model.text.max_words)'
        )
      positions = self.param(
        'position', _position_init(self.width), (self.num_positions, self.width)
      )
      if self.position_layernorm:
        positions = _position_norm()(positions)
      tokens = tokens + positions[None].astype(tokens.dtype)
    return tokens, ids != 0
