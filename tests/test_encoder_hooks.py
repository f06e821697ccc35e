"""The encoder's hooks (vatt_jax/models/transformer.py) and the voxel tokenizer's temporal layout.

attention  Encoder(attention=name) builds every block's self-attention from attention.ATTENTION;
           config model.<tower>.attention picks it per tower.
block      Encoder(block=name) builds its blocks from transformer.BLOCKS; a block that returns
           (tokens, kept) prunes tokens: the encoder gathers the key mask and the attention bias to
           the kept tokens for the blocks that follow and returns the output tokens' positions.
flatten    VoxelTokenizer(flatten=False) keeps the temporal layout [B, nt, nh·nw, D].

Test attention classes and blocks are registered with monkeypatch; numerics are checked against
the float64 numpy reference of tests/test_models.py.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_models import (
  assert_close,
  random_variables,
  ref_attention,
  ref_dense,
  ref_gelu,
  ref_layer_norm,
  ref_voxel_tokens,
  tiny_config,
  to64,
)
from vatt_jax.models import attention as attention_lib
from vatt_jax.models import build_model, transformer
from vatt_jax.models.attention import MultiHeadSelfAttention
from vatt_jax.models.tokenizers import VoxelTokenizer
from vatt_jax.models.transformer import Encoder, EncoderBlock, EncoderSize

B, N, D, H, MLP = 3, 9, 16, 4, 32  # N: the AGG slot and 8 tokens
SIZE = EncoderSize(num_layers=2, width=D, mlp_dim=MLP, num_heads=H)
FACTOR = -0.5  # ScaledAttention's output is FACTOR × dense attention's


class ScaledAttention(MultiHeadSelfAttention):
  """Dense attention (same parameters) with its output scaled by FACTOR."""

  @nn.compact
  def __call__(self, x, *, mask=None, bias=None, deterministic=True):
    return FACTOR * super().__call__(x, mask=mask, bias=bias, deterministic=deterministic)


class ZeroAttention(nn.Module):
  """No attention at all: zeros, no parameters (the ATTENTION attributes, unused)."""

  num_heads: int
  attention_dropout_rate: float = 0.0
  scale_logits: bool = True
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, mask=None, bias=None, deterministic=True):
    return jnp.zeros_like(x)


def kept_positions(batch: int, num_tokens: int) -> np.ndarray:
  """[B, 1 + (N-1)//2] int32: what PruningBlock keeps of N tokens: the AGG slot first, then half
  of the other positions, a different subset in a scrambled order for each example."""
  rng = np.random.default_rng(num_tokens)
  rows = [1 + rng.permutation(num_tokens - 1)[: (num_tokens - 1) // 2] for _ in range(batch)]
  return np.stack([np.concatenate([[0], row]) for row in rows]).astype(np.int32)


class PruningBlock(EncoderBlock):
  """The dense pre-LN block (same attributes and parameters), then kept_positions of its output."""

  @nn.compact
  def __call__(self, x, mask=None, bias=None, deterministic=True):
    y = super().__call__(x, mask, bias, deterministic)
    kept = jnp.asarray(kept_positions(*x.shape[:2]))
    return jnp.take_along_axis(y, kept[..., None], axis=1), kept


@pytest.fixture
def hooks(monkeypatch):
  monkeypatch.setitem(attention_lib.ATTENTION, 'scaled', ScaledAttention)
  monkeypatch.setitem(attention_lib.ATTENTION, 'zeros', ZeroAttention)
  monkeypatch.setitem(transformer.BLOCKS, 'pruning', PruningBlock)


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(20)
  x = rng.normal(size=(B, N, D)).astype(np.float32)
  mask = np.ones((B, N), bool)
  first = kept_positions(B, N)
  final = np.take_along_axis(first, kept_positions(B, first.shape[1]), axis=1)
  for b in range(B):
    mask[b, final[b, -1]] = False  # masked, and kept by both layers
    mask[b, np.setdiff1d(np.arange(1, N), first[b])[0]] = False  # masked, pruned by the first
  bias = rng.normal(size=(B, H, N, N)).astype(np.float32)
  return x, mask, bias


# ----------------------------------------------------------------------------------------------
# float64 reference
# ----------------------------------------------------------------------------------------------


def ref_block(p, x, *, mask=None, bias=None, factor=1.0):
  """The pre-LN block with its attention output scaled by `factor` (0: no attention)."""
  if factor:
    y = ref_layer_norm(x, p['norm_attention'])
    x = x + factor * ref_attention(p['attention'], y, mask=mask, bias=bias)
  y = ref_gelu(ref_dense(ref_layer_norm(x, p['norm_mlp']), p['mlp']['fc1']))
  return x + ref_dense(y, p['mlp']['fc2'])


def ref_pruning_encoder(p, x, mask, bias, *, gather=True):
  """Both blocks prune (bias in every layer). Returns (tokens, positions in x).

  gather=False: the mask and bias of the second block are the first N' of the unpruned ones (what
  an encoder that forgets to gather them would do)."""
  batch, num = x.shape[:2]
  bias = np.broadcast_to(bias, (batch, *bias.shape[1:]))
  positions = np.broadcast_to(np.arange(num), (batch, num))
  for i in range(SIZE.num_layers):
    x = ref_block(p[f'block_{i:02d}'], x, mask=mask, bias=bias)
    keep = kept_positions(batch, x.shape[1])
    x = np.stack([x[b, keep[b]] for b in range(batch)])
    positions = np.stack([positions[b, keep[b]] for b in range(batch)])
    if gather:
      mask = np.stack([mask[b, keep[b]] for b in range(batch)])
      bias = np.stack([bias[b][:, keep[b]][:, :, keep[b]] for b in range(batch)])
    else:
      mask, bias = mask[:, : keep.shape[1]], bias[:, :, : keep.shape[1], : keep.shape[1]]
  return ref_layer_norm(x, p['final_norm']), positions


# ----------------------------------------------------------------------------------------------
# 1. the attention hook
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name, factor', [('scaled', FACTOR), ('zeros', 0.0)])
def test_block_attention_hook(hooks, inputs, name, factor):
  x, mask, bias = inputs
  module = EncoderBlock(mlp_dim=MLP, num_heads=H, attention=name)
  params = random_variables(module, x, seed=21)
  assert ('attention' in params['params']) == bool(factor)  # ZeroAttention has no parameters
  got = jax.jit(lambda p, x: module.apply(p, x, mask, bias))(params, x)
  p64 = to64(params['params'])
  assert_close(got, ref_block(p64, x.astype(np.float64), mask=mask, bias=bias, factor=factor))


@pytest.mark.parametrize('name, factor', [('scaled', FACTOR), ('zeros', 0.0)])
def test_encoder_attention_hook(hooks, inputs, name, factor):
  x, mask, bias = inputs
  module = Encoder(size=SIZE, attention=name, bias_all_layers=True)
  params = random_variables(module, x, seed=22)
  got = jax.jit(lambda p, x: module.apply(p, x, mask=mask, bias=bias))(params, x)
  p64, h = to64(params['params']), x.astype(np.float64)
  for i in range(SIZE.num_layers):
    h = ref_block(p64[f'block_{i:02d}'], h, mask=mask, bias=bias, factor=factor)
  assert_close(got, ref_layer_norm(h, p64['final_norm']))
  if factor:  # the same parameters under dense attention give another output
    dense = Encoder(size=SIZE, bias_all_layers=True)
    other = jax.jit(lambda p, x: dense.apply(p, x, mask=mask, bias=bias))(params, x)
    assert not np.allclose(got, other, atol=1e-3)


def test_unknown_attention_is_named(hooks, inputs):
  module = Encoder(size=SIZE, attention='sparse_nope')
  with pytest.raises(ValueError, match=r"attention 'sparse_nope' is not one of .*'dense'"):
    module.init(jax.random.key(0), inputs[0])


def test_unknown_block_is_named(hooks, inputs):
  module = Encoder(size=SIZE, block='post_ln_nope')
  with pytest.raises(ValueError, match=r"block 'post_ln_nope' is not one of .*'pre_ln'"):
    module.init(jax.random.key(0), inputs[0])


def test_config_attention_per_tower(hooks):
  cfg = tiny_config()
  cfg.video.attention = 'zeros'
  model = build_model(cfg)
  params = jax.eval_shape(lambda b: model.init(jax.random.key(0), b), model.example_batch(2))
  params = params['params']
  assert 'attention' not in params['video_tower']['encoder']['block_00']
  assert 'attention' in params['audio_tower']['encoder']['block_00']
  assert 'attention' in params['text_tower']['encoder']['block_01']

  agnostic = tiny_config(shared_size='medium')
  agnostic.shared_attention = 'zeros'
  model = build_model(agnostic)
  params = jax.eval_shape(lambda b: model.init(jax.random.key(0), b), model.example_batch(2))
  assert 'attention' not in params['params']['shared_encoder']['block_00']

  cfg.audio.attention = 'sparse_nope'
  with pytest.raises(ValueError, match=r"config model.audio.attention .*got 'sparse_nope'"):
    build_model(cfg)


# ----------------------------------------------------------------------------------------------
# 2. a block that prunes tokens
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'bias_batch, remat', [(1, 'none'), (B, 'full')], ids=['shared_bias', 'per_example_bias_remat']
)
def test_pruning_blocks_gather_mask_bias_and_positions(hooks, inputs, bias_batch, remat):
  x, mask, bias = inputs
  bias = bias[:bias_batch]
  module = Encoder(size=SIZE, block='pruning', bias_all_layers=True, remat=remat)
  params = random_variables(module, x, seed=23)
  apply = jax.jit(lambda p, x: module.apply(p, x, mask=mask, bias=bias, return_positions=True))
  got, positions = apply(params, x)
  first = kept_positions(B, N)
  final = np.take_along_axis(first, kept_positions(B, first.shape[1]), axis=1)
  assert got.shape == (B, 3, D)
  assert positions.dtype == jnp.int32 and positions.shape == (B, 3)
  np.testing.assert_array_equal(positions, final)  # composed over the two pruning layers
  assert len({tuple(row) for row in final}) == B  # each example kept other tokens
  assert np.all(final[:, 0] == 0)  # the AGG token stays in slot 0

  p64 = to64(params['params'])
  want, want_positions = ref_pruning_encoder(p64, x.astype(np.float64), mask, bias)
  np.testing.assert_array_equal(want_positions, final)
  assert_close(got, want)
  # The second block sees a masked key, and forgetting to gather would give another output.
  assert not np.take_along_axis(mask, first, axis=1).all()
  stale, _ = ref_pruning_encoder(p64, x.astype(np.float64), mask, bias, gather=False)
  assert not np.allclose(want, stale, atol=1e-3)

  tokens_only = jax.jit(lambda p, x: module.apply(p, x, mask=mask, bias=bias))(params, x)
  np.testing.assert_array_equal(tokens_only, got)


def test_encoder_without_pruning_returns_no_positions(inputs):
  x, mask, bias = inputs
  module = Encoder(size=SIZE)
  params = random_variables(module, x, seed=24)
  got, positions = module.apply(params, x, mask=mask, bias=bias[:1], return_positions=True)
  assert positions is None
  assert got.shape == x.shape
  np.testing.assert_array_equal(got, module.apply(params, x, mask=mask, bias=bias[:1]))


# ----------------------------------------------------------------------------------------------
# 3. the voxel tokenizer's temporal layout
# ----------------------------------------------------------------------------------------------


def test_voxel_tokenizer_without_flatten_keeps_the_frames():
  patch, grid, width = (2, 4, 4), (2, 2, 3), 8
  video = np.random.default_rng(25).uniform(-1, 1, (2, 4, 8, 12, 3)).astype(np.float32)
  flat = VoxelTokenizer(width=width, patch_size=patch, grid=grid)
  framed = VoxelTokenizer(width=width, patch_size=patch, grid=grid, flatten=False)
  params = random_variables(flat, video, seed=26)
  got = np.asarray(jax.jit(framed.apply)(params, video))
  want = np.asarray(jax.jit(flat.apply)(params, video))
  assert got.shape == (2, grid[0], grid[1] * grid[2], width)
  np.testing.assert_array_equal(got, want.reshape(got.shape))
  assert_close(
    got.reshape(2, math.prod(grid), width), ref_voxel_tokens(to64(params['params']), video, patch)
  )
