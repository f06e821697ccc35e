"""Node sparsity by token pruning (SViTT, Li et al., CVPR 2023): after a layer, keep the global
(CLS) tokens and the ceil(keep_rate · N) patch tokens that the CLS query attends to most, in their
original order, and report where the kept tokens came from so that position-dependent terms (the
relative position bias over (t, h, w)) keep using each token's original position.

Usage in an encoder (the caller computes the scores from the layer's attention probabilities):

  scores = cls_attention_scores(probs, num_global)              # [B, N]
  x, kept = prune_tokens(x, scores, keep_rate, num_global=num_global)
  positions = jnp.take_along_axis(positions, kept, axis=1)     # original positions follow

where `positions` [B, num_global + N] holds each current token's original position (initially
arange), so that pruning after several layers composes.

Differences from SViTT's code (models/sparse_xbeit.py BeitLayer.sparsify), on purpose:
  * The kept count is ceil(keep_rate · N) computed exactly on the decimal value of keep_rate
    (Fraction(repr(keep_rate))), not on the float product: math.ceil(0.07 * 100) is 8 because
    0.07 * 100 == 7.000000000000001; here it is 7. The issue's sequences (784 → 549 → 385 → 270
    at 0.7, 1568 → 941 → 565 → 339 at 0.6) are the same either way.
  * Ties in the scores are broken by the lower index (torch.topk leaves the order of ties
    unspecified), so the kept set is deterministic.
  * The returned index covers the whole sequence, the global tokens first (SViTT returns the patch
    indices only and re-adds the CLS offset in the attention).
"""

from __future__ import annotations

import fractions
import math

import jax
import jax.numpy as jnp


def _check_rate(keep_rate: float) -> fractions.Fraction:
  if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)):
    raise TypeError(f'keep_rate must be a Python number (static), got {type(keep_rate).__name__}')
  if not (math.isfinite(keep_rate) and 0 < keep_rate <= 1):
    raise ValueError(f'keep_rate must be in (0, 1], got {keep_rate}')
  # The decimal the rate is written as (shortest repr that round-trips), not its binary value.
  return fractions.Fraction(repr(float(keep_rate)))


def kept_count(n: int, keep_rate: float) -> int:
  """ceil(keep_rate · n), exact on the decimal value of keep_rate; n for keep_rate 1."""
  if n < 0:
    raise ValueError(f'kept_count: n must be >= 0, got {n}')
  return math.ceil(_check_rate(keep_rate) * n)


def kept_counts(n: int, keep_rate: float, num_layers: int) -> tuple[int, ...]:
  """The patch-token counts through `num_layers` pruning steps at keep_rate, starting with n:
  kept_counts(784, 0.7, 3) = (784, 549, 385, 270)."""
  if num_layers < 0:
    raise ValueError(f'kept_counts: num_layers must be >= 0, got {num_layers}')
  counts = [n]
  for _ in range(num_layers):
    counts.append(kept_count(counts[-1], keep_rate))
  return tuple(counts)


def cls_attention_scores(probs: jax.Array, num_global: int = 1) -> jax.Array:
  """Attention of the first global (CLS) query to the patch keys, averaged over heads.

  Args:
    probs: [B, H, Q, K] attention probabilities (after the softmax) with the global tokens first
      among the K keys and the CLS query as row 0 (Q may be num_global alone, as when only the
      global rows are computed densely).
    num_global: number of global tokens in front of the N = K − num_global patch keys.
  Returns:
    [B, N] float32 scores.
  """
  if probs.ndim != 4:
    raise ValueError(f'cls_attention_scores wants probs [B, H, Q, K]; got shape {probs.shape}')
  if not 0 <= num_global <= probs.shape[-1]:
    raise ValueError(f'num_global {num_global} does not fit {probs.shape[-1]} keys')
  return jnp.mean(probs[:, :, 0, num_global:].astype(jnp.float32), axis=1)


def prune_tokens(
  x: jax.Array,
  scores: jax.Array,
  keep_rate: float,
  *,
  num_global: int = 1,
) -> tuple[jax.Array, jax.Array]:
  """Keeps the global tokens and the kept_count(N, keep_rate) highest-scoring patch tokens.

  Args:
    x: [B, num_global + N, D] tokens, the global ones first.
    scores: [B, N] a score per patch token (e.g. cls_attention_scores); higher is kept first, ties
      go to the lower index.
    keep_rate: fraction of patch tokens to keep, in (0, 1]; a Python number (static), so shapes are
      static under jit.
    num_global: number of global tokens in front (always kept, in place).
  Returns:
    (x_kept [B, num_global + K, D], kept_index [B, num_global + K] int32): kept_index holds each
    kept token's position in x, the globals (0 … num_global − 1) first and then the kept patch
    tokens in increasing (original) order; x_kept = take_along_axis(x, kept_index).
  """
  if x.ndim != 3:
    raise ValueError(f'prune_tokens wants x [B, num_global + N, D]; got shape {x.shape}')
  batch, length, _ = x.shape
  if num_global < 0 or num_global > length:
    raise ValueError(f'num_global {num_global} does not fit a sequence of {length} tokens')
  num_patches = length - num_global
  if scores.shape != (batch, num_patches):
    raise ValueError(
      f'prune_tokens: scores must have shape ({batch}, {num_patches}) for x of shape {x.shape} '
      f'with num_global={num_global}; got {scores.shape}'
    )
  keep = kept_count(num_patches, keep_rate)
  globals_index = jnp.broadcast_to(jnp.arange(num_global, dtype=jnp.int32), (batch, num_global))
  if keep == num_patches:
    patch_index = jnp.broadcast_to(jnp.arange(num_patches, dtype=jnp.int32), (batch, num_patches))
  else:
    # A stable descending argsort puts the lower index first among equal values (as lax.top_k,
    # whose StableHLO composite the TF SavedModel export cannot deserialize); sorting the chosen
    # indices restores the original order.
    patch_index = jnp.argsort(-scores, axis=1, stable=True)[:, :keep]
    patch_index = jnp.sort(patch_index.astype(jnp.int32), axis=1)
  kept_index = jnp.concatenate([globals_index, patch_index + num_global], axis=1)
  x_kept = jnp.take_along_axis(x, kept_index[:, :, None], axis=1)
  return x_kept, kept_index
