"""SViTT's relative position bias over (t, h, w), read at the tokens' original positions, and the
temporal expansion of its tables (a model trained at T frames run at T').

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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vatt_jax.models.sparse_attention import BiasFn

Dtype = Any


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
