"""SViTT's video encoder (vatt_jax/models/svitt_video.py) against float64 numpy references.

The references are written from the definitions, with loops where that is clearer:

  bias      query i, key j at original positions p_i, p_j (0 = CLS, 1 + (t·nh + h)·nw + w):
            both patches → offset_table[t_i − t_j + T − 1, h_i − h_j + nh − 1, w_i − w_j + nw − 1];
            CLS → patch global_table[0]; patch → CLS global_table[1]; CLS → CLS global_table[2].
  encoder   patches of 16×16 in (t, h, w) order · W + b, CLS in front; per block
            x += γ₁·Attn(LN(x)) (softmax(q·k/√d + bias)), x += γ₂·MLP(LN(x)) (exact GELU); after a
            pruning block keep the CLS and the ceil(r·N) patches with the highest mean-over-heads
            CLS attention, in their original order; tokens = LN(x), representation =
            LN(mean of the patch tokens).
"""

from __future__ import annotations

import fractions
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests.test_models import random_variables
from vatt_jax.models import transformer
from vatt_jax.models.sparse_attention import block_sparse_attention, random_block_index
from vatt_jax.models.svitt_blocks import SvittBlock
from vatt_jax.models.svitt_position import (
  SvittRelativePositionBias,
  expand_temporal,
  relative_bias_fn,
  relative_position_bias,
  temporal_offset_source,
)
from vatt_jax.models.svitt_video import svitt_video_encoder
from vatt_jax.models.token_pruning import kept_counts
from vatt_jax.models.transformer import Encoder, EncoderSize

TOL = 2e-4
EPS = 1e-12
GRID = (4, 4, 4)  # tiny: 4 frames × 4×4 patches of 16² (64² frames)


def tiny(**overrides):
  attrs = dict(attention='dense', drop_path_rate=0.0)
  attrs.update(overrides)
  return svitt_video_encoder('tiny', **attrs)


def clip(seed, batch=2, frames=4, size=64):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-1, 1, (batch, frames, size, size, 3)), jnp.float32)


_VARIABLES = {}


def variables(model, frames, seed=0):
  key = (model.num_frames, model.shared_relative_bias, seed)
  if key not in _VARIABLES:
    _VARIABLES[key] = random_variables(model, frames, seed=seed)
  return _VARIABLES[key]


def apply_fn(model, **kwargs):
  return jax.jit(lambda v, x: model.apply(v, x, **kwargs))


# ----------------------------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------------------------


def ref_coords(p, grid):
  """(t, h, w) of patch position p ≥ 1."""
  _, nh, nw = grid
  q = p - 1
  return q // (nh * nw), (q // nw) % nh, q % nw


def ref_bias(offset_table, global_table, positions, grid):
  """[H, L, L] by the definition, one pair at a time."""
  offset_table, global_table = np.asarray(offset_table), np.asarray(global_table)
  nt, nh, nw = grid
  length = len(positions)
  out = np.zeros((offset_table.shape[-1], length, length))
  for i, pi in enumerate(positions):
    for j, pj in enumerate(positions):
      if pi == 0 and pj == 0:
        out[:, i, j] = global_table[2]
      elif pi == 0:
        out[:, i, j] = global_table[0]
      elif pj == 0:
        out[:, i, j] = global_table[1]
      else:
        (ti, hi, wi), (tj, hj, wj) = ref_coords(pi, grid), ref_coords(pj, grid)
        out[:, i, j] = offset_table[ti - tj + nt - 1, hi - hj + nh - 1, wi - wj + nw - 1]
  return out


def ref_layernorm(x, p, eps=EPS):
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p['scale'] + p['bias']


def ref_gelu(x):
  erf = np.vectorize(math.erf)
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def ref_patches(frames, patch=16):
  """[T·nh·nw, patch·patch·3] of one clip, (t, h, w) order, each patch (row, column, channel)."""
  nt, height, width, _ = frames.shape
  rows = []
  for t in range(nt):
    for i in range(height // patch):
      for j in range(width // patch):
        rows.append(frames[t, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch].ravel())
  return np.stack(rows)


def ref_kept(n, rate):
  return math.ceil(fractions.Fraction(str(rate)) * n)


def ref_encoder(params, frames, *, keep_rate=1.0, drop_loc=(), depth=4, grid=GRID, shared=False):
  """Per clip: (tokens, representation, positions, [per pruning: (scores, kept, margin)]).
  shared: one relative bias table for all blocks (params['relative_position_bias'])."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  outs = []
  for clip_ in np.asarray(frames, np.float64):
    x = ref_patches(clip_) @ p['patch_embedding']['kernel'] + p['patch_embedding']['bias']
    x = np.concatenate([p['cls'][0], x], axis=0)
    pos = np.arange(len(x))
    pruning = []
    for layer in range(depth):
      b = p[f'block_{layer:02d}']
      a = b['attention']
      y = ref_layernorm(x, b['norm_attention'])
      q, k, v = (
        np.einsum('ld,dhk->hlk', y, a[name]['kernel']) + a[name]['bias'][:, None]
        for name in ('query', 'key', 'value')
      )
      tables = p['relative_position_bias'] if shared else b['relative_position_bias']
      bias = ref_bias(tables['offset_table'], tables['global_table'], pos, grid)
      logits = np.einsum('hqd,hkd->hqk', q, k) / math.sqrt(q.shape[-1]) + bias
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      o = np.einsum('hqk,hkd->qhd', probs, v)
      o = np.einsum('qhd,hde->qe', o, a['out']['kernel']) + a['out']['bias']
      x = x + b['layer_scale_attention'] * o
      y = ref_layernorm(x, b['norm_mlp'])
      y = ref_gelu(y @ b['mlp']['fc1']['kernel'] + b['mlp']['fc1']['bias'])
      y = y @ b['mlp']['fc2']['kernel'] + b['mlp']['fc2']['bias']
      x = x + b['layer_scale_mlp'] * y
      if keep_rate < 1 and layer in drop_loc:
        scores = probs[:, 0, 1:].mean(0)
        count = ref_kept(len(scores), keep_rate)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        kept = sorted(order[:count])
        margin = scores[order[count - 1]] - scores[order[count]] if count < len(scores) else 1.0
        pruning.append((scores, kept, margin))
        x = np.concatenate([x[:1], x[1:][kept]])
        pos = np.concatenate([pos[:1], pos[1:][kept]])
    representation = ref_layernorm(x[1:].mean(0), p['pool_norm'])
    outs.append((ref_layernorm(x, p['final_norm']), representation, pos, pruning))
  return outs


# ----------------------------------------------------------------------------------------------
# relative position bias
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_relative_bias_by_original_positions():
  rng = np.random.default_rng(0)
  heads = 3
  offset = jnp.asarray(rng.normal(size=(2 * 4 - 1, 2 * 4 - 1, 2 * 4 - 1, heads)), jnp.float32)
  glob = jnp.asarray(rng.normal(size=(3, heads)), jnp.float32)
  full = np.arange(1 + 64)
  want_full = ref_bias(offset, glob, full, GRID)
  got_full = np.asarray(relative_position_bias(offset, glob, full[None]))[0]
  np.testing.assert_allclose(got_full, want_full, rtol=0, atol=1e-6)
  # The CLS row / column / corner hold their own entries.
  np.testing.assert_array_equal(got_full[:, 0, 1:], np.broadcast_to(glob[0][:, None], (3, 64)))
  np.testing.assert_array_equal(got_full[:, 1:, 0], np.broadcast_to(glob[1][:, None], (3, 64)))
  np.testing.assert_array_equal(got_full[:, 0, 0], glob[2])
  # After (two rounds of) pruning: the bias read at the kept tokens' original positions is the
  # unpruned bias gathered at those tokens, different per example.
  kept = []
  for _ in range(2):
    patches = np.sort(rng.choice(64, size=23, replace=False)) + 1
    kept.append(np.concatenate([[0], patches]))
  kept = np.stack(kept)
  got = np.asarray(relative_position_bias(offset, glob, kept))
  for b in range(2):
    np.testing.assert_array_equal(got[b], want_full[:, kept[b]][:, :, kept[b]].astype(np.float32))
    np.testing.assert_allclose(got[b], ref_bias(offset, glob, kept[b], GRID), rtol=0, atol=1e-6)
  # The module: zero-initialised tables (BEiT), SViTT's flat table = offsets (t, h, w) then CLS.
  module = SvittRelativePositionBias(GRID, heads)
  params = nn.meta.unbox(module.init(jax.random.key(0), kept))['params']
  assert params['offset_table'].shape == (7, 7, 7, heads)
  assert params['global_table'].shape == (3, heads)
  assert not np.any(np.asarray(module.apply({'params': params}, kept)))


# ----------------------------------------------------------------------------------------------
# the whole encoder against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('keep_rate, shared', [(1.0, False), (0.7, False), (0.7, True)])
def test_dense_encoder_matches_reference(keep_rate, shared):
  """The whole encoder (dense attention) against the reference; with pruning (4 frames × 4×4
  patches at 0.7: 64 → 45 → 32 → 23), every pruning block keeps kept_counts tokens, exactly the
  top mean-over-heads CLS attention ones of the reference, in their original order."""
  model = tiny(keep_rate=keep_rate, shared_relative_bias=shared)
  frames = clip(1)
  v = variables(model, frames)
  assert ('relative_position_bias' in v['params']) == shared
  assert ('relative_position_bias' in v['params']['block_00']) != shared
  capture = lambda mdl, _: isinstance(mdl, SvittBlock)  # noqa: E731
  out, state = apply_fn(model, capture_intermediates=capture)(v, frames)
  want = ref_encoder(
    v['params'], frames, keep_rate=keep_rate, drop_loc=model.token_drop_loc, shared=shared
  )
  counts = kept_counts(64, keep_rate, 3) if keep_rate < 1 else (64,)
  if keep_rate < 1:
    assert counts == (64, 45, 32, 23)
    assert model.kept_patch_counts() == (64, 45, 32, 23, 23)
  else:
    assert model.kept_patch_counts() == (64,) * 5
  assert out.tokens.shape == (2, 1 + counts[-1], 32)
  assert out.positions.shape == (2, 1 + counts[-1])
  assert out.representation.shape == (2, 32)
  blocks = [state['intermediates'][f'block_{i:02d}']['__call__'][0] for i in range(4)]
  pruned = [isinstance(o, tuple) for o in blocks]
  assert pruned == ([True, True, True, False] if keep_rate < 1 else [False] * 4)
  for b, (tokens, representation, positions, pruning) in enumerate(want):
    # Block by block: the number of tokens, and which ones (the reference's top CLS attention).
    running = np.arange(65)
    for layer, (scores, want_kept, margin) in enumerate(pruning):
      assert margin > 2e-6, 'the reference ranking is too close to call in float32'
      x, kept = blocks[layer]
      kept = np.asarray(kept[b])
      assert x.shape[1] == len(kept) == 1 + counts[layer + 1]
      assert kept[0] == 0 and np.all(np.diff(kept) > 0)  # CLS first, original order
      np.testing.assert_array_equal(kept[1:] - 1, want_kept)
      assert set(np.argsort(-scores, kind='stable')[: counts[layer + 1]]) == set(kept[1:] - 1)
      running = running[kept]
    np.testing.assert_array_equal(running, positions)  # positions compose through the layers
    np.testing.assert_array_equal(np.asarray(out.positions[b]), positions)
    np.testing.assert_allclose(np.asarray(out.tokens[b]), tokens, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(
      np.asarray(out.representation[b]), representation, rtol=TOL, atol=TOL
    )
  positions = np.asarray(out.positions)
  assert np.all(positions[:, 0] == 0)
  assert np.all(np.diff(positions, axis=1) > 0)
  if keep_rate < 1:  # the two clips keep different tokens
    assert not np.array_equal(positions[0], positions[1])


# ----------------------------------------------------------------------------------------------
# block-sparse attention
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_block_sparse_with_one_block_equals_dense():
  frames = clip(2)
  dense = tiny(keep_rate=0.7)
  v = variables(dense, frames)
  want = apply_fn(dense)(v, frames)
  # One block of 64 (≥ every layer's N): every patch query sees every key; the CLS rows that rank
  # the tokens come from return_global_probs.
  sparse = tiny(keep_rate=0.7, attention='block_sparse', block_size=64, random_blocks=0)
  got = apply_fn(sparse)(v, frames)
  np.testing.assert_array_equal(np.asarray(got.positions), np.asarray(want.positions))
  np.testing.assert_allclose(np.asarray(got.tokens), np.asarray(want.tokens), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(got.representation), np.asarray(want.representation), rtol=1e-5, atol=1e-5
  )


@pytest.mark.slow
def test_block_sparse_train_and_eval_under_jit():
  """Really sparse (16 blocks of 4, w = 1, R = 3): eval is reproducible and differs from dense;
  training draws a new pattern per 'sparse' key, with dropout and stochastic depth."""
  frames = clip(3)
  model = tiny(
    keep_rate=0.7,
    attention='block_sparse',
    block_size=4,
    drop_path_rate=0.2,
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
  )
  v = variables(model, frames)
  evaluate = apply_fn(model)
  first, second = evaluate(v, frames), evaluate(v, frames)
  np.testing.assert_array_equal(np.asarray(first.tokens), np.asarray(second.tokens))
  np.testing.assert_array_equal(np.asarray(first.positions), np.asarray(second.positions))
  dense = apply_fn(tiny(keep_rate=0.7))(v, frames)
  assert not np.allclose(np.asarray(first.tokens), np.asarray(dense.tokens), atol=1e-3)

  @jax.jit
  def train(v, frames, sparse_key, dropout_key):
    def loss(params):
      out = model.apply(
        {'params': params},
        frames,
        deterministic=False,
        rngs={'sparse': sparse_key, 'dropout': dropout_key},
      )
      return jnp.sum(out.representation**2), out

    return jax.value_and_grad(loss, has_aux=True)(v['params'])

  (l1, out1), grads = train(v, frames, jax.random.key(1), jax.random.key(5))
  (l2, out2), _ = train(v, frames, jax.random.key(2), jax.random.key(5))
  assert out1.tokens.shape == (2, 24, 32) and out1.positions.shape == (2, 24)
  assert np.isfinite(float(l1)) and float(l1) != float(l2)
  table = np.asarray(grads['block_03']['relative_position_bias']['offset_table'])
  assert np.all(np.isfinite(table)) and np.any(table != 0)


@pytest.mark.parametrize(
  'num_patches, group, local, random_, num_global',
  [(64, 4, 1, 3, 1), (45, 8, 3, 2, 1), (23, 5, 1, 1, 2)],
)
def test_bias_fn_kernel_equals_block_sparse_attention(
  num_patches, group, local, random_, num_global
):
  """The local kernel (bias as a function of the attended pairs) equals the shared
  block_sparse_attention given the full bias: several (N, G, w, R), padding, a key mask, a
  hand-made random_index with repeats and out-of-range names, two global tokens, dropout."""
  rng = np.random.default_rng(num_patches)
  batch, heads, depth = 2, 2, 8
  length = num_global + num_patches
  q, k, v = (
    jnp.asarray(rng.normal(size=(batch, heads, length, depth)), jnp.float32) for _ in 'qkv'
  )
  offset = jnp.asarray(rng.normal(size=(7, 7, 7, heads)), jnp.float32)
  glob = jnp.asarray(rng.normal(size=(2 * num_global + num_global**2, heads)), jnp.float32)
  positions = np.stack(
    [np.concatenate([np.arange(num_global), np.sort(rng.choice(64, num_patches, replace=False))
                     + num_global]) for _ in range(batch)]
  )  # fmt: skip
  full = relative_position_bias(offset, glob, positions, num_global)
  key_mask = rng.random((batch, length)) > 0.2
  key_mask[:, :num_global] = True
  num_blocks = -(-num_patches // group)
  patterns = [random_block_index(jax.random.key(7), num_blocks, local, random_)]
  if num_blocks > 2:
    odd = np.asarray(patterns[0]).copy()
    odd[:, 0] = np.arange(num_blocks)  # names its own (local) block again
    patterns.append(np.concatenate([odd, np.full((num_blocks, 1), num_blocks + 3)], axis=1))
  static = dict(block_size=group, local_blocks=local, num_global=num_global)

  @functools.partial(jax.jit, static_argnames=('dropout',))
  def both(index, key_mask, dropout):
    drop = dict(dropout_rate=0.3, dropout_rng=jax.random.key(3)) if dropout else {}
    want = block_sparse_attention(
      q, k, v, index, bias=full, key_mask=key_mask, return_global_probs=True, **static, **drop
    )
    fn = relative_bias_fn(offset, glob, positions, num_global)
    got = block_sparse_attention(
      q, k, v, index, bias_fn=fn, key_mask=key_mask, return_global_probs=True, **static, **drop
    )
    return want, got

  for index, dropout in zip(patterns, (False, True), strict=False):
    (want, want_probs), (got, got_probs) = both(index, key_mask, dropout)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_probs), np.asarray(want_probs), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# temporal sparse expansion
# ----------------------------------------------------------------------------------------------


def test_temporal_offset_source():
  # 4 → 8 frames: 7 → 15 t-offset rows.
  np.testing.assert_array_equal(
    temporal_offset_source(4, 8, 'replicate'), [0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6]
  )
  # SViTT's F.interpolate(mode='nearest'): floor(i · 7 / 15).
  np.testing.assert_array_equal(
    temporal_offset_source(4, 8, 'nearest'), [math.floor(i * 7 / 15) for i in range(15)]
  )
  np.testing.assert_array_equal(temporal_offset_source(4, 4, 'replicate'), np.arange(7))
  np.testing.assert_array_equal(temporal_offset_source(4, 4, 'nearest'), np.arange(7))
  with pytest.raises(ValueError, match='rule'):
    temporal_offset_source(4, 8, 'cubic')


@pytest.mark.slow
def test_expand_temporal_4_to_8_frames():
  frames4 = clip(4)
  model4 = tiny(keep_rate=0.7)
  v4 = variables(model4, frames4)
  v8 = expand_temporal(v4, 8)
  model8 = tiny(keep_rate=0.6, num_frames=8)
  frames8 = clip(5, frames=8)
  # Shapes: the 8-frame model's own init.
  abstract = nn.meta.unbox(jax.eval_shape(lambda: model8.init(jax.random.key(0), frames8)))
  shapes = lambda t: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), t)  # noqa: E731
  assert shapes(v8) == shapes(abstract)
  flat4, flat8 = traverse_util.flatten_dict(v4), traverse_util.flatten_dict(v8)
  for path, old in flat4.items():
    new = np.asarray(flat8[path])
    if path[-1] != 'offset_table':
      np.testing.assert_array_equal(new, np.asarray(old))  # nothing else changes
      continue
    old = np.asarray(old)
    assert old.shape[0] == 7 and new.shape[0] == 15
    np.testing.assert_array_equal(new[4:11], old)  # offsets −3 … 3 unchanged
    np.testing.assert_array_equal(new[:4], np.broadcast_to(old[:1], (4,) + old.shape[1:]))
    np.testing.assert_array_equal(new[11:], np.broadcast_to(old[-1:], (4,) + old.shape[1:]))
  # The invariant of 'replicate': in the 8-frame model, any 4 consecutive frames get exactly the
  # bias of the 4-frame model (frames 3…6 here), here for block 0's table.
  table4 = v4['params']['block_00']['relative_position_bias']
  table8 = v8['params']['block_00']['relative_position_bias']
  window = np.concatenate([[0], 1 + np.arange(3 * 16, 7 * 16)])
  bias8 = relative_position_bias(table8['offset_table'], table8['global_table'], window[None])
  bias4 = relative_position_bias(
    table4['offset_table'], table4['global_table'], np.arange(65)[None]
  )
  np.testing.assert_array_equal(np.asarray(bias8), np.asarray(bias4))
  # The 8-frame model runs with the expanded parameters: 128 → 77 → 47 → 29 patch tokens at 0.6.
  out = apply_fn(model8)(v8, frames8)
  assert kept_counts(128, 0.6, 3) == (128, 77, 47, 29)
  assert out.tokens.shape == (2, 30, 32) and out.positions.shape == (2, 30)
  assert int(np.max(out.positions)) <= 128 and np.all(np.isfinite(np.asarray(out.tokens)))
  # Boxed parameters (straight from init) keep their boxes.
  boxed = jax.jit(lambda x: model4.init(jax.random.key(0), x))(frames4)
  expanded = expand_temporal(boxed, 8, rule='nearest')
  leaf = expanded['params']['block_01']['relative_position_bias']['offset_table']
  assert isinstance(leaf, nn.LogicallyPartitioned) and leaf.value.shape == (15, 7, 7, 2)
  with pytest.raises(ValueError, match='offset_table'):
    expand_temporal({'params': {'dense': {'kernel': jnp.zeros((2, 2))}}}, 8)


# ----------------------------------------------------------------------------------------------
# the shared Encoder's block hook
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_block_fits_the_shared_encoder_hook(monkeypatch):
  """SvittBlock in transformer.BLOCKS: the Encoder composes the positions of a pruning block and
  gathers the (one, shared) bias for the next blocks."""
  monkeypatch.setitem(
    transformer.BLOCKS, 'svitt_test', lambda **kw: SvittBlock(keep_rate=0.5, **kw)
  )
  encoder = Encoder(EncoderSize(2, 16, 32, 2), block='svitt_test', bias_all_layers=True)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(1, 2, 9, 9)), jnp.float32)
  v = jax.jit(lambda x, bias: encoder.init(jax.random.key(0), x, bias=bias))(x, bias)
  out, positions = jax.jit(
    lambda v, x, bias: encoder.apply(v, x, bias=bias, return_positions=True)
  )(v, x, bias)
  assert out.shape == (2, 1 + 2, 16) and positions.shape == (2, 3)
  assert np.all(np.asarray(positions)[:, 0] == 0)
