"""SViTT's edge sparsity: local + random block-sparse self-attention (ATTENTION['block_sparse']).

The sequence is [global tokens (the CLS), N patch tokens]. The global queries attend densely to
every key. The patch queries are cut into blocks of G = block_size consecutive tokens; the queries
of block m attend, in ONE softmax, to

  * the global keys,
  * the w = local_blocks key blocks of `local_block_index(num_blocks, w)[m]`: the w blocks centred
    on m, the window shifted inward at the ends of the sequence (see below),
  * the R key blocks `random_index[m]`, drawn by `random_block_index` for every layer and every
    call: distinct, never one of m's local blocks, the same for every example and head.

A key block named more than once in a row of the pattern (only possible with a hand-made
random_index) is attended once; indices outside [0, num_blocks) name nothing. N that is not a
multiple of G is padded to num_blocks·G: padded keys are masked out and the outputs of padded
queries dropped. The logits, the bias and the softmax are float32 whatever the compute dtype; the
probability-weighted sum of values runs in the values' dtype (as in MultiHeadSelfAttention).
Memory is O(N·(w+R)·G) per example and head (key/value blocks are gathered per query block),
not O(N²); the global rows cost O(num_global·N).

Decisions, and how they differ from SViTT's public code (JerryYLi/svitt, models/sparse_xbeit.py,
BeitSelfAttention.sparse_attention):

  edges        The local window of block m is [m − w//2, m + w//2] shifted inward at the ends, i.e.
               blocks start … start + w − 1 with start = clip(m − w//2, 0, num_blocks − w): every
               query block has exactly min(w, num_blocks) local blocks, all of them real neighbours
               in token order. The reference builds the window with torch.roll, so it wraps
               around: with w = 3 the first block attends to the last (in frame-major order, the
               first patches of frame 0 to the last patches of the last frame), which is not
               local. (With the default w = 1 the two agree.)
  small N      R_eff = min(R, num_blocks − min(w, num_blocks)): when num_blocks ≤ w + R every
               block is then attended exactly once (local ∪ random = all blocks), which is
               exactly dense attention. The reference keeps R random draws by topk over a score
               matrix whose local entries are zeroed, so with fewer than R non-local blocks it
               draws local blocks again, and with num_blocks < w its rolled windows repeat blocks;
               a key block attended twice gets double weight in the softmax.
  padding      Padded keys are masked out. The reference zero-pads keys and values and does not
               mask them: each padded key takes part in the softmax with logit 0 (plus its bias)
               and contributes a zero value, so the last block's outputs shrink.
  evaluation   deterministic=True draws the pattern from a fixed key, jax.random.key(0) folded
               with the CRC-32 of the module's path (a different but fixed pattern per layer), so
               evaluation is reproducible across calls and processes. The reference redraws
               torch.rand in every forward pass, evaluation included. Training draws from the
               'sparse' RNG stream (the 'dropout' stream where a model passes no 'sparse' one).
  key mask     key_mask [B, num_global + N] (True = may be attended to) applies to every query;
               the reference has none (its video tokens are never padded).
  bias         An additive bias over the full sequence, [B|1, H, L, L] (L = num_global + N), is
               gathered to the attended (query, key) pairs; the encoder gathers it to the kept
               tokens after pruning, so it stays indexed by the tokens' original positions (the
               reference gathers its relative-position table by token index for the same reason).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vatt_jax.models.partitioning import attention_output, attention_projections

Dtype = Any

_NEG = float(jnp.finfo(jnp.float32).min)


def _check_local(local_blocks: int) -> None:
  if local_blocks < 0 or (local_blocks and local_blocks % 2 == 0):
    raise ValueError(f'local_blocks must be 0 or odd, got {local_blocks}')


def num_blocks_for(num_tokens: int, block_size: int) -> int:
  """ceil(num_tokens / block_size): the number of blocks of the patch tokens (the last padded)."""
  if block_size < 1:
    raise ValueError(f'block_size must be positive, got {block_size}')
  return -(-num_tokens // block_size)


def num_random_blocks(num_blocks: int, local_blocks: int, random_blocks: int) -> int:
  """R_eff = min(R, num_blocks − min(w, num_blocks)): the static width of random_index."""
  _check_local(local_blocks)
  if random_blocks < 0:
    raise ValueError(f'random_blocks must be ≥ 0, got {random_blocks}')
  return max(0, min(random_blocks, num_blocks - min(local_blocks, num_blocks)))


def local_block_index(num_blocks: int, local_blocks: int) -> np.ndarray:
  """int32 [num_blocks, min(w, num_blocks)]: the local key blocks of every query block.

  Row m holds start … start + w − 1 with start = clip(m − w//2, 0, num_blocks − w): the w blocks
  centred on m, the window shifted inward (not wrapped, not shortened) at the ends.
  """
  _check_local(local_blocks)
  width = min(local_blocks, num_blocks)
  start = np.clip(np.arange(num_blocks) - local_blocks // 2, 0, num_blocks - width)
  return (start[:, None] + np.arange(width)[None, :]).astype(np.int32)


def random_block_index(
  rng: jax.Array, num_blocks: int, local_blocks: int, random_blocks: int
) -> jax.Array:
  """int32 [num_blocks, R_eff]: for each query block, R_eff distinct random key blocks.

  R_eff = num_random_blocks(num_blocks, local_blocks, random_blocks) = min(R, num_blocks − w_eff)
  with w_eff = min(w, num_blocks). No entry of row m is one of m's local blocks
  (`local_block_index`); each row is sorted; the pattern is a function of `rng` only (the same for
  every example and head). When num_blocks ≤ w + R, each row holds every non-local block, so
  local ∪ random covers every block exactly once.
  """
  r_eff = num_random_blocks(num_blocks, local_blocks, random_blocks)
  if r_eff == 0:
    return jnp.zeros((num_blocks, 0), jnp.int32)
  is_local = np.zeros((num_blocks, num_blocks), bool)
  is_local[np.arange(num_blocks)[:, None], local_block_index(num_blocks, local_blocks)] = True
  # Uniform scores in [0, 1) for the candidates, −1 for the local blocks: the top R_eff are a
  # uniformly random R_eff-subset of the ≥ R_eff non-local blocks, distinct by construction.
  scores = jnp.where(is_local, -1.0, jax.random.uniform(rng, (num_blocks, num_blocks)))
  # A stable descending argsort, not lax.top_k: top_k lowers to a StableHLO composite that the
  # TF SavedModel export (jax2tf) cannot deserialize; the chosen set is the same.
  index = jnp.argsort(-scores, axis=-1, stable=True)[:, :r_eff]
  return jnp.sort(index, axis=-1).astype(jnp.int32)


BiasFn = Callable[[jax.Array, jax.Array], jax.Array]


def array_bias_fn(bias: jax.Array) -> BiasFn:
  """bias_fn reading a full [B|1, H, L, L] bias at the asked pairs."""
  bias = jnp.asarray(bias, jnp.float32)
  return lambda qi, ki: bias[:, :, jnp.asarray(qi), jnp.asarray(ki)]


def sum_bias_fn(*fns: BiasFn | None) -> BiasFn | None:
  """The sum of the given bias functions (None when none is given)."""
  fns = [f for f in fns if f is not None]
  if not fns:
    return None
  if len(fns) == 1:
    return fns[0]
  return lambda qi, ki: sum(f(qi, ki) for f in fns)


def _dropout(probs: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
  return jnp.where(keep, probs / (1.0 - rate), 0.0)


def block_sparse_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  random_index: jax.Array,
  *,
  block_size: int,
  local_blocks: int,
  num_global: int = 1,
  bias: jax.Array | None = None,
  bias_fn: BiasFn | None = None,
  key_mask: jax.Array | None = None,
  scale: float | None = None,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
  return_global_probs: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Local + random block-sparse self-attention (see the module docstring).

  Args:
    q, k, v: [B, H, L, d] with L = num_global + N: the global tokens first, then the patches.
    random_index: int [num_blocks, R'] (num_blocks = ceil(N / block_size)): the random key blocks
      of every query block, from `random_block_index` (any R' ≥ 0 is accepted; a block already in
      the row — local or an earlier entry — is not attended again, an index outside
      [0, num_blocks) names nothing).
    block_size: G, patch tokens per block.
    local_blocks: w (0 or odd), local key blocks per query block.
    num_global: the leading tokens whose queries and keys are dense (the CLS).
    bias: [B|1, H, L, L] additive logit bias (e.g. relative positions), or None.
    bias_fn: bias_fn(query_index, key_index) → [B|1, H, *S] float32, the bias at those token
      indices only (int arrays broadcastable to S): a bias read from a table then costs
      O(N·(w+R)·G) memory, not O(L²). Added to `bias` when both are given.
    key_mask: [B, L] bool, True where a token may be attended to, or None.
    scale: logit scale; default 1/sqrt(d).
    dropout_rate, dropout_rng: dropout on the attention probabilities (off without a key).
    return_global_probs: also return the global queries' attention probabilities (dense rows,
      before dropout) [B, H, num_global, L] float32, e.g. for ranking tokens by CLS attention.

  Returns:
    [B, H, L, d] in v's dtype (and the global probabilities with return_global_probs).
  """
  batch, heads, length, depth = q.shape
  if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f'q {q.shape}, k {k.shape}, v {v.shape}: self-attention shapes differ')
  if not 0 <= num_global <= length:
    raise ValueError(f'num_global {num_global} outside [0, {length}]')
  if bias is not None and bias.shape[-2:] != (length, length):
    raise ValueError(f'bias {bias.shape} is not [B|1, H, {length}, {length}]')
  if key_mask is not None and key_mask.shape != (batch, length):
    raise ValueError(f'key_mask {key_mask.shape} is not [{batch}, {length}]')
  scale = 1.0 / math.sqrt(depth) if scale is None else scale
  num_patches = length - num_global
  group = block_size
  num_blocks = num_blocks_for(num_patches, group)
  random_index = jnp.asarray(random_index, jnp.int32)
  if random_index.ndim != 2 or random_index.shape[0] != num_blocks:
    raise ValueError(
      f'random_index {random_index.shape} is not [num_blocks={num_blocks}, R] '
      f'({num_patches} patch tokens in blocks of {group})'
    )
  f32 = jnp.float32
  bias_at = sum_bias_fn(None if bias is None else array_bias_fn(bias), bias_fn)
  key_mask = None if key_mask is None else jnp.asarray(key_mask, bool)
  if dropout_rate > 0.0 and dropout_rng is not None:
    rng_global, rng_patch = jax.random.split(dropout_rng)
    drop = lambda p, r: _dropout(p, dropout_rate, r)  # noqa: E731
  else:
    rng_global = rng_patch = None
    drop = lambda p, r: p  # noqa: E731

  # Global queries: dense over all L keys.
  outputs = []
  global_probs = jnp.zeros((batch, heads, 0, length), f32)
  if num_global:
    logits = jnp.einsum('bhqd,bhkd->bhqk', q[:, :, :num_global], k, preferred_element_type=f32)
    logits = logits * scale
    if bias_at is not None:
      logits = logits + bias_at(np.arange(num_global)[:, None], np.arange(length)[None, :])
    if key_mask is not None:
      logits = jnp.where(key_mask[:, None, None, :], logits, _NEG)
    global_probs = jax.nn.softmax(logits, axis=-1)
    probs = drop(global_probs, rng_global)
    outputs.append(jnp.einsum('bhqk,bhkd->bhqd', probs.astype(v.dtype), v))
  finish = lambda out: (out, global_probs) if return_global_probs else out  # noqa: E731
  if num_patches == 0:
    return finish(jnp.concatenate(outputs, axis=2))

  # The key blocks of every query block: w_eff local, then the random ones. A slot is live when
  # its block is in range and differs from every earlier slot's (each block attended once).
  local = jnp.asarray(local_block_index(num_blocks, local_blocks))
  index = jnp.concatenate([local, random_index], axis=1)  # [nb, S]
  slots = index.shape[1]
  live = (index >= 0) & (index < num_blocks)
  earlier = np.tril(np.ones((slots, slots), bool), k=-1)  # [s, s'] : s' < s
  live &= ~jnp.any((index[:, :, None] == index[:, None, :]) & earlier, axis=-1)
  index = jnp.clip(index, 0, num_blocks - 1)

  pad = num_blocks * group - num_patches

  def blocks(x):  # [B, H, L, d] → the patches [B, H, nb, G, d], zero-padded
    x = jnp.pad(x[:, :, num_global:], ((0, 0), (0, 0), (0, pad), (0, 0)))
    return x.reshape(x.shape[:2] + (num_blocks, group, x.shape[-1]))

  q_blocks = blocks(q)
  k_gathered = blocks(k)[:, :, index]  # [B, H, nb, S, G, d]
  v_gathered = blocks(v)[:, :, index]
  # Token positions (within the patches) of the queries [nb, G] and of the attended keys [nb, S, G].
  q_pos = np.arange(num_blocks * group).reshape(num_blocks, group)
  k_pos = index[:, :, None] * group + jnp.arange(group)[None, None, :]
  k_ok = live[:, :, None] & (k_pos < num_patches)  # [nb, S, G]: no padding, no dead slot
  q_pos_c = np.minimum(q_pos, num_patches - 1)  # padded rows read the last real row (dropped)
  k_pos_c = jnp.minimum(k_pos, num_patches - 1)

  logits_local = (
    jnp.einsum('bhmid,bhmsjd->bhmisj', q_blocks, k_gathered, preferred_element_type=f32) * scale
  )  # [B, H, nb, G, S, G]
  if bias_at is not None:
    logits_local = logits_local + bias_at(
      num_global + q_pos_c[:, :, None, None], num_global + k_pos_c[:, None, :, :]
    )
  mask = jnp.broadcast_to(k_ok, (1,) + k_ok.shape)  # [1|B, nb, S, G]
  if key_mask is not None:
    mask = mask & key_mask[:, num_global:][:, k_pos_c]
  logits_local = jnp.where(mask[:, None, :, None], logits_local, _NEG)
  logits_local = logits_local.reshape(logits_local.shape[:4] + (slots * group,))

  if num_global:
    logits_global = (
      jnp.einsum('bhmid,bhjd->bhmij', q_blocks, k[:, :, :num_global], preferred_element_type=f32)
      * scale
    )  # [B, H, nb, G, num_global]
    if bias_at is not None:
      logits_global = logits_global + bias_at(
        num_global + q_pos_c[:, :, None], np.arange(num_global)[None, None, :]
      )
    if key_mask is not None:
      logits_global = jnp.where(key_mask[:, None, None, None, :num_global], logits_global, _NEG)
    logits = jnp.concatenate([logits_global, logits_local], axis=-1)
  else:
    logits = logits_local
  probs = drop(jax.nn.softmax(logits, axis=-1), rng_patch).astype(v.dtype)

  probs_local = probs[..., num_global:].reshape(probs.shape[:4] + (slots, group))
  out = jnp.einsum('bhmisj,bhmsjd->bhmid', probs_local, v_gathered)
  if num_global:
    out = out + jnp.einsum('bhmij,bhjd->bhmid', probs[..., :num_global], v[:, :, :num_global])
  out = out.reshape(batch, heads, num_blocks * group, -1)[:, :, :num_patches]
  outputs.append(out.astype(v.dtype))
  return finish(jnp.concatenate(outputs, axis=2))


def eval_key(path: tuple[str, ...] | list[str]) -> jax.Array:
  """The fixed key of a layer's evaluation pattern: key(0) folded with crc32 of its path."""
  return jax.random.fold_in(jax.random.key(0), zlib.crc32('/'.join(path).encode()))


def module_block_index(
  module: nn.Module,
  num_tokens: int,
  block_size: int,
  local_blocks: int,
  random_blocks: int,
  deterministic: bool,
) -> jax.Array:
  """The random block pattern a flax attention module uses for `num_tokens` patch tokens: from
  the 'sparse' RNG stream (the 'dropout' one when the caller passes no 'sparse') in training, from
  `eval_key(module path)` in evaluation (a fixed, reproducible pattern per layer)."""
  if deterministic:
    rng = eval_key(module.scope.path)
  else:
    rng = module.make_rng('sparse' if module.has_rng('sparse') else 'dropout')
  num_blocks = num_blocks_for(num_tokens, block_size)
  return random_block_index(rng, num_blocks, local_blocks, random_blocks)


class SparseSelfAttention(nn.Module):
  """Block-sparse self-attention with MultiHeadSelfAttention's parameters (names, shapes, axes),
  so dense and sparse checkpoints interchange.

  Attributes:
    num_heads, attention_dropout_rate, scale_logits, use_bias, dtype: as MultiHeadSelfAttention.
    block_size: G, patch tokens per block (SViTT: 56).
    local_blocks: w, local key blocks per query block, 0 or odd (SViTT: 1).
    random_blocks: R, random key blocks per query block (SViTT: 3).
    num_global: leading tokens with dense attention both ways (the CLS).

  The pattern is drawn per call from the 'sparse' RNG stream in training (the 'dropout' stream if
  the caller passes no 'sparse' one) and from `eval_key(module path)` when deterministic.
  """

  num_heads: int
  attention_dropout_rate: float = 0.0
  scale_logits: bool = True
  use_bias: bool = True
  dtype: Dtype = jnp.float32
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
    deterministic: bool = True,
  ) -> jax.Array:
    """x [B, L, D]; mask [B, L] bool (True = may be attended to); bias [1|B, H, L, L]."""
    width = x.shape[-1]
    head_dim = width // self.num_heads
    # [B, L, H, Dh] → [B, H, L, Dh]
    q, k, v = (
      jnp.swapaxes(t, 1, 2)
      for t in attention_projections(x, self.num_heads, use_bias=self.use_bias, dtype=self.dtype)
    )

    random_index = module_block_index(
      self, x.shape[1] - self.num_global, self.block_size, self.local_blocks,
      self.random_blocks, deterministic,
    )  # fmt: skip
    use_dropout = not deterministic and self.attention_dropout_rate > 0.0
    out = block_sparse_attention(
      q,
      k,
      v,
      random_index,
      block_size=self.block_size,
      local_blocks=self.local_blocks,
      num_global=self.num_global,
      bias=bias,
      key_mask=mask,
      scale=1.0 / math.sqrt(head_dim) if self.scale_logits else 1.0,
      dropout_rate=self.attention_dropout_rate if use_dropout else 0.0,
      dropout_rng=self.make_rng('dropout') if use_dropout else None,
    )
    return attention_output(
      jnp.swapaxes(out, 1, 2), width, use_bias=self.use_bias, dtype=self.dtype
    )
