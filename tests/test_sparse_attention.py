"""SViTT's local + random block-sparse attention (vatt_jax/models/sparse_attention.py).

The reference is written from the definition, in float64 numpy, with loops:

  pattern   the global (first num_global) queries attend to every key; patch query i (block
            m = i // G) attends to the global keys, to the key blocks of m's local window and to
            the key blocks named in random_index[m] (as a set: a block named twice, or already
            local, is attended once; out-of-range names nothing); padded keys do not exist.
  window    w blocks [m − w//2, m + w//2], slid inward until it lies inside [0, num_blocks)
            (at most num_blocks long).
  attention softmax(q·k / sqrt(d) + bias) over the allowed, unmasked keys, then · v.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests.test_models import random_variables
from vatt_jax.models import attention as attention_lib
from vatt_jax.models.attention import ATTENTION, MultiHeadSelfAttention
from vatt_jax.models.sparse_attention import (
  SparseSelfAttention,
  block_sparse_attention,
  eval_key,
  local_block_index,
  num_random_blocks,
  random_block_index,
)
from vatt_jax.models.transformer import Encoder, EncoderSize

TOL = 1e-5

# ----------------------------------------------------------------------------------------------
# float64 reference
# ----------------------------------------------------------------------------------------------


def ref_window(m, num_blocks, w):
  """The local blocks of query block m, by sliding [m − w//2, m + w//2] inside the sequence."""
  lo, hi = m - w // 2, m + w // 2
  while lo < 0 and hi < num_blocks - 1:
    lo, hi = lo + 1, hi + 1
  while hi > num_blocks - 1 and lo > 0:
    lo, hi = lo - 1, hi - 1
  return {b for b in range(lo, hi + 1) if 0 <= b < num_blocks} if w else set()


def ref_allowed(num_global, num_patches, group, w, random_index):
  """bool [L, L]: may query i attend to key j (before the key mask)."""
  length = num_global + num_patches
  num_blocks = -(-num_patches // group)
  allowed = np.zeros((length, length), bool)
  allowed[:num_global] = True
  allowed[:, :num_global] = True
  for i in range(num_patches):
    m = i // group
    named = ref_window(m, num_blocks, w) | {int(b) for b in random_index[m] if 0 <= b < num_blocks}
    for j in range(num_patches):
      if j // group in named:
        allowed[num_global + i, num_global + j] = True
  return allowed


def ref_attention(q, k, v, allowed, *, bias=None, key_mask=None, scale=None):
  """Masked dense softmax attention in float64. q, k, v [B, H, L, d]; allowed [L, L]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  logits = np.einsum('bhqd,bhkd->bhqk', q, k) * scale
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  ok = np.broadcast_to(allowed, logits.shape)
  if key_mask is not None:
    ok = ok & np.asarray(key_mask, bool)[:, None, None, :]
  logits = np.where(ok, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = probs / probs.sum(-1, keepdims=True)
  return np.einsum('bhqk,bhkd->bhqd', probs, v)


def ref_probs(q, k, *, bias=None, key_mask=None):
  """Dense softmax probabilities [B, H, L, L] in float64 (the rows of the global queries)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  logits = np.einsum('bhqd,bhkd->bhqk', q, k) / math.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  if key_mask is not None:
    logits = np.where(np.asarray(key_mask, bool)[:, None, None, :], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return probs / probs.sum(-1, keepdims=True)


def make_inputs(seed, batch, heads, length, depth, *, with_bias, with_mask, num_global):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(batch, heads, length, depth)).astype(np.float32) for _ in range(3))
  bias = rng.normal(size=(1, heads, length, length)).astype(np.float32) if with_bias else None
  key_mask = None
  if with_mask:
    key_mask = rng.random((batch, length)) > 0.25
    key_mask[:, :num_global] = True  # no query is left without a key
  return q, k, v, bias, key_mask


@functools.partial(
  jax.jit, static_argnames=('block_size', 'local_blocks', 'num_global', 'return_global_probs')
)
def sparse(
  q,
  k,
  v,
  random_index,
  bias,
  key_mask,
  *,
  block_size,
  local_blocks,
  num_global,
  return_global_probs=False,
):
  return block_sparse_attention(
    q,
    k,
    v,
    random_index,
    block_size=block_size,
    local_blocks=local_blocks,
    num_global=num_global,
    bias=bias,
    key_mask=key_mask,
    return_global_probs=return_global_probs,
  )


# ----------------------------------------------------------------------------------------------
# 1. random_block_index
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'num_blocks, w, r',
  [
    (12, 1, 3),
    (12, 3, 3),
    (9, 5, 2),
    (6, 1, 5),
    (5, 3, 3),
    (4, 1, 3),
    (3, 3, 1),
    (2, 3, 3),
    (1, 1, 3),
    (7, 0, 2),
    (8, 3, 0),
  ],
)
def test_random_block_index_properties(num_blocks, w, r):
  r_eff = min(r, num_blocks - min(w, num_blocks))
  assert num_random_blocks(num_blocks, w, r) == r_eff
  draw = jax.jit(random_block_index, static_argnums=(1, 2, 3))
  index = np.asarray(draw(jax.random.key(5), num_blocks, w, r))
  assert index.shape == (num_blocks, r_eff) and index.dtype == np.int32
  local = local_block_index(num_blocks, w)
  assert local.shape == (num_blocks, min(w, num_blocks))
  for m in range(num_blocks):
    assert set(local[m]) == ref_window(m, num_blocks, w)
    row = set(index[m].tolist())
    assert len(row) == r_eff  # distinct
    assert all(0 <= b < num_blocks for b in row)
    assert not row & ref_window(m, num_blocks, w)  # never local
    if num_blocks <= w + r:  # every block exactly once
      assert row | ref_window(m, num_blocks, w) == set(range(num_blocks))
  np.testing.assert_array_equal(index, draw(jax.random.key(5), num_blocks, w, r))


def test_random_block_index_varies_with_the_key_and_is_uniform():
  keys = jax.random.split(jax.random.key(0), 400)
  draws = np.asarray(jax.vmap(lambda key: random_block_index(key, 8, 1, 3))(keys))  # [400, 8, 3]
  assert len({d.tobytes() for d in draws}) == len(draws)
  assert not np.array_equal(draws[0], draws[1])
  # Each of the 7 non-local blocks of a row is drawn with probability 3/7.
  for m in range(8):
    counts = np.bincount(draws[:, m].ravel(), minlength=8)
    assert counts[m] == 0
    expected, std = 400 * 3 / 7, math.sqrt(400 * 3 / 7 * 4 / 7)
    assert np.all(np.abs(np.delete(counts, m) - expected) < 5 * std), counts


def test_local_window_is_shifted_not_wrapped():
  np.testing.assert_array_equal(
    local_block_index(5, 3), [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]]
  )
  np.testing.assert_array_equal(local_block_index(4, 1), [[0], [1], [2], [3]])
  np.testing.assert_array_equal(local_block_index(2, 5), [[0, 1], [0, 1]])
  with pytest.raises(ValueError, match='odd'):
    local_block_index(5, 2)


# ----------------------------------------------------------------------------------------------
# 2. block_sparse_attention against the reference
# ----------------------------------------------------------------------------------------------

CASES = [
  # num_patches, G, w, R, num_global, bias, key_mask
  (24, 4, 1, 1, 1, False, False),  # N a multiple of G
  (23, 4, 1, 3, 1, True, False),  # padded
  (30, 4, 3, 1, 2, True, True),
  (29, 3, 3, 0, 1, False, True),
  (21, 2, 1, 3, 2, True, True),
  (40, 4, 3, 3, 1, True, True),
  (17, 5, 1, 0, 1, True, False),
  (26, 4, 3, 1, 0, True, True),  # no global token
]


@pytest.mark.parametrize('num_patches, group, w, r, num_global, with_bias, with_mask', CASES)
@pytest.mark.parametrize('seed', [0, 1])
def test_matches_reference(num_patches, group, w, r, num_global, with_bias, with_mask, seed):
  length = num_global + num_patches
  q, k, v, bias, key_mask = make_inputs(
    seed, 2, 3, length, 8, with_bias=with_bias, with_mask=with_mask, num_global=num_global
  )
  num_blocks = -(-num_patches // group)
  index = random_block_index(jax.random.key(seed + 100), num_blocks, w, r)
  got = sparse(
    q, k, v, index, bias, key_mask, block_size=group, local_blocks=w, num_global=num_global
  )
  assert got.shape == (2, 3, length, 8) and got.dtype == jnp.float32
  allowed = ref_allowed(num_global, num_patches, group, w, np.asarray(index))
  assert not allowed.all()  # these cases are really sparse
  want = ref_attention(q, k, v, allowed, bias=bias, key_mask=key_mask)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=TOL, atol=TOL)
  if num_global:  # the global rows' probabilities, for ranking tokens by CLS attention
    out, probs = sparse(
      q,
      k,
      v,
      index,
      bias,
      key_mask,
      block_size=group,
      local_blocks=w,
      num_global=num_global,
      return_global_probs=True,
    )
    np.testing.assert_allclose(out, got, rtol=1e-6, atol=1e-7)
    want_probs = ref_probs(q, k, bias=bias, key_mask=key_mask)[:, :, :num_global]
    np.testing.assert_allclose(np.asarray(probs, np.float64), want_probs, rtol=TOL, atol=1e-6)


def test_hand_made_index_attends_each_block_once():
  """Repeated, local and out-of-range names in random_index: a set of blocks, each once."""
  num_global, num_patches, group, w = 1, 20, 4, 3
  q, k, v, bias, key_mask = make_inputs(
    3, 2, 2, 21, 8, with_bias=True, with_mask=True, num_global=1
  )
  index = np.array([[4, 4, 0], [0, 1, -1], [4, 9, 0], [3, 2, 0], [0, 0, 0]], np.int32)
  got = sparse(
    q, k, v, index, bias, key_mask, block_size=group, local_blocks=w, num_global=num_global
  )
  want = ref_attention(
    q, k, v, ref_allowed(num_global, num_patches, group, w, index), bias=bias, key_mask=key_mask
  )
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize(
  'num_patches, group, w, r',
  [(13, 4, 1, 3), (16, 4, 1, 3), (10, 4, 3, 0), (27, 4, 5, 2), (7, 8, 1, 3), (9, 5, 3, 1)],
)
def test_dense_when_few_blocks(num_patches, group, w, r):
  num_global = 1
  length = num_global + num_patches
  q, k, v, bias, key_mask = make_inputs(
    7, 2, 2, length, 8, with_bias=True, with_mask=True, num_global=num_global
  )
  num_blocks = -(-num_patches // group)
  assert num_blocks <= w + r
  index = random_block_index(jax.random.key(9), num_blocks, w, r)
  got = sparse(
    q, k, v, index, bias, key_mask, block_size=group, local_blocks=w, num_global=num_global
  )
  dense = ref_attention(q, k, v, np.ones((length, length), bool), bias=bias, key_mask=key_mask)
  np.testing.assert_allclose(np.asarray(got, np.float64), dense, rtol=TOL, atol=TOL)
  # and jax's own dense attention, in float32
  other = jax.nn.dot_product_attention(
    *(jnp.swapaxes(a, 1, 2) for a in (q, k, v)), bias=bias, mask=key_mask[:, None, None, :]
  )
  np.testing.assert_allclose(got, jnp.swapaxes(other, 1, 2), rtol=TOL, atol=TOL)


def test_gradients_match_masked_dense_attention():
  num_global, num_patches, group, w, r = 2, 22, 4, 1, 2
  length = num_global + num_patches
  q, k, v, bias, key_mask = make_inputs(
    11, 2, 2, length, 8, with_bias=True, with_mask=True, num_global=num_global
  )
  index = random_block_index(jax.random.key(4), 6, w, r)
  allowed = ref_allowed(num_global, num_patches, group, w, np.asarray(index))
  cotangent = np.random.default_rng(12).normal(size=q.shape).astype(np.float32)

  def sparse_loss(q, k, v, bias):
    out = block_sparse_attention(
      q,
      k,
      v,
      index,
      block_size=group,
      local_blocks=w,
      num_global=num_global,
      bias=bias,
      key_mask=key_mask,
    )
    return jnp.sum(out * cotangent)

  def dense_loss(q, k, v, bias):  # masked dense attention, written out
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k) / math.sqrt(q.shape[-1]) + bias
    ok = allowed[None, None] & key_mask[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(ok, logits, -jnp.inf), axis=-1)
    return jnp.sum(jnp.einsum('bhqk,bhkd->bhqd', probs, v) * cotangent)

  args = (q, k, v, bias)
  got = jax.jit(jax.grad(sparse_loss, argnums=(0, 1, 2, 3)))(*args)
  want = jax.jit(jax.grad(dense_loss, argnums=(0, 1, 2, 3)))(*args)
  for name, g, e in zip('q k v bias'.split(), got, want, strict=True):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5, err_msg=name)
  # Bias entries of pairs that are never attended get no gradient.
  assert np.all(np.asarray(got[3])[0][:, ~allowed] == 0)


def test_memory_is_not_quadratic():
  """The largest intermediate of a long sequence is O(N·(w+R)·G), far below the N² logits."""
  num_patches, group, w, r, heads, depth = 1568, 56, 1, 3, 2, 8
  spec = jax.ShapeDtypeStruct((1, heads, 1 + num_patches, depth), jnp.float32)
  index = jax.ShapeDtypeStruct((28, 3), jnp.int32)
  fn = functools.partial(block_sparse_attention, block_size=group, local_blocks=w)
  jaxpr = jax.make_jaxpr(fn)(spec, spec, spec, index)
  biggest = max(
    math.prod(var.aval.shape) for eqn in jaxpr.eqns for var in eqn.outvars if var.aval.shape
  )
  assert biggest <= heads * num_patches * (w + r) * group + heads * num_patches  # + global keys
  assert biggest < heads * num_patches**2 / 5


# ----------------------------------------------------------------------------------------------
# 3. the flax module and the encoder hook
# ----------------------------------------------------------------------------------------------

B, L, D, H = 2, 23, 16, 4  # 1 CLS + 22 patches: 6 blocks of 4 (the last padded)


class SmallSparse(SparseSelfAttention):
  block_size: int = 4
  local_blocks: int = 1
  random_blocks: int = 2


def ref_module(p, x, random_index, *, num_global=1, group=4, w=1, mask=None, bias=None):
  """SparseSelfAttention in float64: projections, the reference attention, the out projection."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  q, k, v = (
    np.einsum('bnd,dhk->bhnk', x, p[name]['kernel']) + p[name]['bias'][:, None]
    for name in ('query', 'key', 'value')
  )
  allowed = ref_allowed(num_global, x.shape[1] - num_global, group, w, np.asarray(random_index))
  out = ref_attention(q, k, v, allowed, bias=bias, key_mask=mask)
  return np.einsum('bhnk,hkd->bnd', out, p['out']['kernel']) + p['out']['bias']


@pytest.fixture(scope='module')
def module_inputs():
  rng = np.random.default_rng(30)
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  mask = rng.random((B, L)) > 0.2
  mask[:, 0] = True
  bias = rng.normal(size=(1, H, L, L)).astype(np.float32)
  return x, mask, bias


def test_registered():
  assert ATTENTION['block_sparse'] is SparseSelfAttention
  assert attention_lib.get_attention('block_sparse') is SparseSelfAttention


def test_parameters_match_dense_attention():
  x = jnp.zeros((B, L, D))
  for use_bias in (True, False):
    shapes = {
      cls: jax.eval_shape(
        lambda c=cls, u=use_bias: c(num_heads=H, use_bias=u).init(jax.random.key(0), x)
      )
      for cls in (MultiHeadSelfAttention, SmallSparse)
    }
    flat = {
      cls: {
        path: (leaf.value.shape, leaf.names)
        for path, leaf in traverse_util.flatten_dict(
          tree['params'], is_leaf=lambda _, y: isinstance(y, nn.Partitioned)
        ).items()
      }
      for cls, tree in shapes.items()
    }
    assert flat[MultiHeadSelfAttention] == flat[SmallSparse]


@pytest.mark.slow
def test_module_eval_and_train(module_inputs):
  x, mask, bias = module_inputs
  module = SmallSparse(num_heads=H)
  params = random_variables(module, x, seed=31)
  apply = jax.jit(
    lambda p, x, rngs, det: module.apply(p, x, mask=mask, bias=bias, deterministic=det, rngs=rngs),
    static_argnums=(3,),
  )
  # Evaluation: the pattern of eval_key(path), the same every call.
  got = apply(params, x, {}, True)
  np.testing.assert_array_equal(got, apply(params, x, {}, True))
  index = random_block_index(eval_key(()), 6, 1, 2)
  want = ref_module(params['params'], x.astype(np.float64), index, mask=mask, bias=bias)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=TOL)
  # Training: the pattern of the 'sparse' stream, a new one per key.
  first = apply(params, x, {'sparse': jax.random.key(1)}, False)
  np.testing.assert_array_equal(first, apply(params, x, {'sparse': jax.random.key(1)}, False))
  second = apply(params, x, {'sparse': jax.random.key(2)}, False)
  assert not np.allclose(first, second, atol=1e-4)
  assert not np.allclose(first, got, atol=1e-4)
  # Without a 'sparse' stream, training draws from 'dropout'.
  fallback = apply(params, x, {'dropout': jax.random.key(3)}, False)
  assert np.all(np.isfinite(fallback))
  # Attention dropout in training.
  dropped = SmallSparse(num_heads=H, attention_dropout_rate=0.5).apply(
    params,
    x,
    mask=mask,
    deterministic=False,
    rngs={'sparse': jax.random.key(1), 'dropout': jax.random.key(4)},
  )
  assert dropped.shape == x.shape and np.all(np.isfinite(dropped))


@pytest.mark.slow
def test_module_is_dense_with_few_blocks(module_inputs):
  """With the default G = 56, 22 patches are one block: the dense module's output, same params."""
  x, mask, bias = module_inputs
  params = random_variables(MultiHeadSelfAttention(num_heads=H), x, seed=32)
  dense = MultiHeadSelfAttention(num_heads=H).apply(params, x, mask=mask, bias=bias)
  for train in (False, True):
    got = SparseSelfAttention(num_heads=H).apply(
      params,
      x,
      mask=mask,
      bias=bias,
      deterministic=not train,
      rngs={'sparse': jax.random.key(0)} if train else {},
    )
    np.testing.assert_allclose(got, dense, rtol=1e-4, atol=TOL)


@pytest.mark.slow
def test_encoder_with_block_sparse_attention(module_inputs, monkeypatch):
  x, mask, bias = module_inputs
  size = EncoderSize(num_layers=2, width=D, mlp_dim=32, num_heads=H)
  # Registered defaults (one block here): the dense encoder's output with the same parameters.
  dense = Encoder(size=size, bias_all_layers=True)
  params = random_variables(dense, x, seed=33)
  want = dense.apply(params, x, mask=mask, bias=bias)
  got = Encoder(size=size, attention='block_sparse', bias_all_layers=True).apply(
    params, x, mask=mask, bias=bias
  )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Really sparse blocks, under jit, in training and evaluation.
  monkeypatch.setitem(attention_lib.ATTENTION, 'small_sparse', SmallSparse)
  encoder = Encoder(size=size, attention='small_sparse', bias_all_layers=True, dropout_rate=0.1)
  run = jax.jit(
    lambda p, x, rngs, det: encoder.apply(p, x, mask=mask, bias=bias, deterministic=det, rngs=rngs),
    static_argnums=(3,),
  )
  evaluated = run(params, x, {}, True)
  np.testing.assert_array_equal(evaluated, run(params, x, {}, True))
  assert not np.allclose(evaluated, want, atol=1e-4)
  rngs = {'sparse': jax.random.key(5), 'dropout': jax.random.key(6)}
  trained = run(params, x, rngs, False)
  assert trained.shape == x.shape and np.all(np.isfinite(trained))
  # The two layers draw different evaluation patterns.
  paths = [('block_00', 'attention'), ('block_01', 'attention')]
  patterns = [np.asarray(random_block_index(eval_key(p), 6, 1, 2)) for p in paths]
  assert not np.array_equal(*patterns)
