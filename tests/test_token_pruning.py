"""Checks token pruning (SViTT's node sparsity) against a numpy reference written from the
definition: keep the num_global leading tokens and the ceil(keep_rate · N) patch tokens with the
highest scores (ties to the lower index), in their original order."""

from __future__ import annotations

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vatt_jax.models.token_pruning import (
  cls_attention_scores,
  kept_count,
  kept_counts,
  prune_tokens,
)

_prune = jax.jit(prune_tokens, static_argnames=('keep_rate', 'num_global'))


def ref_keep(n, keep_rate):
  return math.ceil(fractions.Fraction(str(keep_rate)) * n)


def ref_prune(x, scores, keep_rate, num_global):
  x = np.asarray(x)
  scores = np.asarray(scores, np.float64)
  batch, length, _ = x.shape
  n = length - num_global
  k = ref_keep(n, keep_rate)
  index = np.zeros((batch, num_global + k), np.int64)
  for b in range(batch):
    ranked = sorted(range(n), key=lambda j: (-scores[b, j], j))[:k]  # ties: lower index first
    index[b] = list(range(num_global)) + [num_global + j for j in sorted(ranked)]
  return x[np.arange(batch)[:, None], index], index


def _inputs(seed, batch=3, n=20, num_global=1, d=5, ties=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, num_global + n, d)).astype(np.float32)
  if ties:
    scores = rng.integers(0, 3, size=(batch, n)).astype(np.float32)
  else:
    scores = rng.random((batch, n)).astype(np.float32)
  return x, scores


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('keep_rate', [0.7, 0.5, 0.1, 0.93])
@pytest.mark.parametrize('num_global', [1, 2])
@pytest.mark.parametrize('ties', [False, True])
def test_prune_matches_reference(seed, keep_rate, num_global, ties):
  x, scores = _inputs(seed, num_global=num_global, ties=ties)
  x_kept, index = _prune(x, scores, keep_rate, num_global=num_global)
  want_x, want_index = ref_prune(x, scores, keep_rate, num_global)
  np.testing.assert_array_equal(np.asarray(index), want_index)
  np.testing.assert_array_equal(np.asarray(x_kept), want_x)
  index = np.asarray(index)
  assert index.dtype == np.int32
  assert np.all(index[:, :num_global] == np.arange(num_global))  # globals kept, first
  assert np.all(np.diff(index, axis=1) > 0)  # original order


def test_ties_go_to_the_lower_index():
  x = np.arange(1 * 7 * 2, dtype=np.float32).reshape(1, 7, 2)
  scores = np.array([[1.0, 3.0, 3.0, 1.0, 3.0, 1.0]], np.float32)
  # ceil(0.7 · 6) = 5: the three 3's, then the first two 1's (positions 0 and 3).
  _, index = _prune(x, scores, 0.7)
  np.testing.assert_array_equal(np.asarray(index), [[0, 1, 2, 3, 4, 5]])
  _, index = _prune(x, scores, 0.5)  # 3 kept: the 3's
  np.testing.assert_array_equal(np.asarray(index), [[0, 2, 3, 5]])
  _, index = _prune(x, np.zeros((1, 6), np.float32), 0.5)  # all tied: the first three
  np.testing.assert_array_equal(np.asarray(index), [[0, 1, 2, 3]])


def test_keep_rate_one_keeps_everything():
  x, scores = _inputs(4, num_global=2)
  x_kept, index = _prune(x, scores, 1.0, num_global=2)
  np.testing.assert_array_equal(np.asarray(x_kept), x)
  np.testing.assert_array_equal(np.asarray(index), np.broadcast_to(np.arange(x.shape[1]), (3, 22)))


def test_jit_equals_eager_with_static_shapes():
  x, scores = _inputs(5, batch=2, n=49)
  eager = prune_tokens(jnp.asarray(x), jnp.asarray(scores), 0.7)
  jitted = _prune(x, scores, 0.7)
  for a, b in zip(eager, jitted, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  shapes = jax.eval_shape(lambda a, s: prune_tokens(a, s, 0.7), x, scores)
  assert shapes[0].shape == (2, 1 + 35, 5) and shapes[1].shape == (2, 36)


def test_positions_follow_through_repeated_pruning():
  """Composing kept_index through three prunings gives every kept token's original position."""
  n, num_global = 40, 1
  x, _ = _inputs(6, batch=2, n=n, num_global=num_global)
  rng = np.random.default_rng(7)
  tokens, positions = jnp.asarray(x), jnp.broadcast_to(jnp.arange(n + num_global), (2, n + 1))
  for _ in range(3):
    scores = jnp.asarray(rng.random((2, tokens.shape[1] - num_global)), jnp.float32)
    tokens, kept = _prune(tokens, scores, 0.7, num_global=num_global)
    positions = jnp.take_along_axis(positions, kept, axis=1)
  assert tokens.shape[1] == num_global + kept_counts(n, 0.7, 3)[-1]
  np.testing.assert_array_equal(np.asarray(tokens), x[np.arange(2)[:, None], np.asarray(positions)])


def test_gradient_reaches_only_kept_tokens():
  x, scores = _inputs(8, batch=1, n=10)
  grad = jax.grad(lambda a: jnp.sum(prune_tokens(a, jnp.asarray(scores), 0.5)[0]))(jnp.asarray(x))
  _, index = ref_prune(x, scores, 0.5, 1)
  kept = np.zeros(x.shape[1], bool)
  kept[index[0]] = True
  assert np.all(np.asarray(grad)[0, kept] == 1) and np.all(np.asarray(grad)[0, ~kept] == 0)


def test_kept_counts_issue_examples():
  assert kept_counts(784, 0.7, 3) == (784, 549, 385, 270)  # 4 frames × 196 patches
  assert kept_counts(1568, 0.6, 3) == (1568, 941, 565, 339)  # 8 frames
  assert kept_counts(10, 0.5, 0) == (10,)
  assert kept_count(101, 0.1) == 11  # multimodal pruning: ceil(0.1 · N)


def test_kept_count_is_exact_on_the_decimal_rate():
  assert math.ceil(0.07 * 100) == 8  # the float product overshoots ...
  assert kept_count(100, 0.07) == 7  # ... the decimal rate does not
  for n in range(0, 300, 7):
    for rate in (0.1, 0.3, 0.6, 0.7, 0.07, 1.0, 1):
      assert kept_count(n, rate) == ref_keep(n, rate)
      assert kept_count(n, rate) >= (1 if n else 0)


def test_bad_arguments():
  x, scores = _inputs(0)
  for rate in (0.0, -0.1, 1.5, float('nan')):
    with pytest.raises(ValueError, match='keep_rate'):
      prune_tokens(x, scores, rate)
  with pytest.raises(TypeError, match='keep_rate'):
    prune_tokens(x, scores, jnp.float32(0.5))
  with pytest.raises(ValueError, match='scores'):
    prune_tokens(x, scores[:, 1:], 0.5)
  with pytest.raises(ValueError, match='scores'):
    prune_tokens(x, scores, 0.5, num_global=2)


@pytest.mark.parametrize('num_global', [1, 2])
def test_cls_attention_scores(num_global):
  rng = np.random.default_rng(num_global)
  logits = rng.normal(size=(2, 4, 3, num_global + 9))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  want = np.mean(probs[:, :, 0, num_global:], axis=1)  # first query row, mean over heads
  got = cls_attention_scores(jnp.asarray(probs, jnp.float32), num_global)
  assert got.shape == (2, 9) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
  # Only the global rows computed (as with block-sparse attention): same scores.
  got = cls_attention_scores(jnp.asarray(probs[:, :, :num_global], jnp.float32), num_global)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
