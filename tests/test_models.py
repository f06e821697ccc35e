"""Checks the VATT models against an independent float64 numpy reference.

The reference below is written from the paper and the T5 / ViT conventions, not from the
implementation:

  tokenizers   video: non-overlapping t x h x w x 3 voxels (flattened in (t, h, w, c) order, the
               ragged edge zero-padded) @ W + b + temporal[i] + horizontal[j] + vertical[k];
               audio: segments of t' samples (last one zero-padded) @ W + b + position[n];
               text: embedding[id], id 0 = padding, masked out as a key.
  encoder      pre-LN blocks x + MHA(LN(x)); x + MLP(LN(x)), exact (erf) GELU, LayerNorm eps 1e-6,
               final LayerNorm; the AGG token is prepended and its output is the representation.
  attention    softmax(q k^T / sqrt(Dh) + bias) v over the unmasked keys.
  text bias    T5 bidirectional buckets of key_position - query_position (HuggingFace port),
               added to the first layer's logits only.
  common space linear (no bias) + batch norm; video -> va (2 layers, ReLU between) -> vt.

Model parameters are float32 random draws (not the initialisers' values, so LayerNorm scales,
biases and batch statistics are all non-trivial); the reference sees them in float64. Parameters
come from `jax.eval_shape(model.init, ...)` filled with numpy draws, because compiling the
initialisers' random number generation costs far more CPU time than the rest of this file.
"""

from __future__ import annotations

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy.special import erf

from configs import common
from vatt_jax.models import build_model, contract
from vatt_jax.models.attention import (
  MultiHeadSelfAttention,
  RelativePositionBias,
  relative_position_bucket,
)
from vatt_jax.models.tokenizers import (
  VoxelTokenizer,
  WaveformTokenizer,
  drop_token,
  num_kept_tokens,
)
from vatt_jax.models.transformer import Encoder, EncoderBlock, EncoderSize, MlpBlock

RTOL = 1e-4
ATOL = 1e-5
# Training-mode batch norm: flax computes the batch variance as E[y^2] - E[y]^2 in float32, which
# loses digits on channels whose spread is small against their mean (4 examples here).
TRAIN_BN_ATOL = 1e-4
LN_EPS = 1e-6
BATCH = 4
TINY_WIDTH = 64  # the 'tiny' preset: 2 layers, width 64, MLP 256, 4 heads

# ----------------------------------------------------------------------------------------------
# float64 numpy reference
# ----------------------------------------------------------------------------------------------


def ref_layer_norm(x, p, eps=LN_EPS):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def ref_rms_norm(x, p, eps=LN_EPS):
  return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p['scale']


def ref_gelu(x):
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def tanh_gelu(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def ref_dense(x, p):
  return x @ p['kernel'] + p['bias']


def ref_attention(p, x, *, mask=None, bias=None, scale_logits=True):
  """x [B, N, D]; mask [B, N] (True = may be attended to); bias [1|B, H, N, N]."""
  q, k, v = (
    np.einsum('bnd,dhk->bnhk', x, p[name]['kernel']) + p[name]['bias']
    for name in ('query', 'key', 'value')
  )
  logits = np.einsum('bqhk,bshk->bhqs', q, k)
  if scale_logits:
    logits = logits / math.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = probs / probs.sum(-1, keepdims=True)
  heads = np.einsum('bhqs,bshk->bqhk', probs, v)
  return np.einsum('bqhk,hkd->bqd', heads, p['out']['kernel']) + p['out']['bias']


def ref_block(p, x, *, mask=None, bias=None, norm_type='layernorm', scale_logits=True):
  norm = ref_layer_norm if norm_type == 'layernorm' else ref_rms_norm
  y = norm(x, p['norm_attention'])
  x = x + ref_attention(p['attention'], y, mask=mask, bias=bias, scale_logits=scale_logits)
  y = ref_gelu(ref_dense(norm(x, p['norm_mlp']), p['mlp']['fc1']))
  return x + ref_dense(y, p['mlp']['fc2'])


def ref_encoder(
  p, x, *, mask=None, bias=None, bias_all_layers=False, norm_type='layernorm', scale_logits=True
):
  num_layers = sum(name.startswith('block_') for name in p)
  for i in range(num_layers):
    x = ref_block(
      p[f'block_{i:02d}'],
      x,
      mask=mask,
      bias=bias if (i == 0 or bias_all_layers) else None,
      norm_type=norm_type,
      scale_logits=scale_logits,
    )
  norm = ref_layer_norm if norm_type == 'layernorm' else ref_rms_norm
  return norm(x, p['final_norm'])


def ref_bucket(relative_position, num_buckets, max_distance):
  """HuggingFace T5 `_relative_position_bucket`, bidirectional=True, in float64."""
  relative_position = np.asarray(relative_position, np.int64)
  num_buckets //= 2
  buckets = (relative_position > 0).astype(np.int64) * num_buckets
  relative_position = np.abs(relative_position)
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  safe = np.maximum(relative_position, 1).astype(np.float64)  # log(0) is never selected
  if_large = max_exact + (
    np.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
  ).astype(np.int64)
  if_large = np.minimum(if_large, num_buckets - 1)
  return buckets + np.where(is_small, relative_position, if_large)


def ref_relative_bias(table, length, num_buckets, max_distance):
  """[1, H, N, N] with bias[0, h, i, j] = table[bucket(j - i), h]."""
  positions = np.arange(length)
  buckets = ref_bucket(positions[None, :] - positions[:, None], num_buckets, max_distance)
  return table[buckets].transpose(2, 0, 1)[None]


def ref_voxel_tokens(p, video, patch_size, position_layernorm=False):
  batch, *dims, channels = video.shape
  grid = [math.ceil(d / q) for d, q in zip(dims, patch_size, strict=True)]
  padded = np.zeros((batch, *[g * q for g, q in zip(grid, patch_size, strict=True)], channels))
  padded[:, : dims[0], : dims[1], : dims[2]] = video
  (nt, nh, nw), (pt, ph, pw) = grid, patch_size
  width = p['patch']['kernel'].shape[-1]
  tokens = np.zeros((batch, nt * nh * nw, width))
  for i, j, k in itertools.product(range(nt), range(nh), range(nw)):
    patch = padded[:, i * pt : (i + 1) * pt, j * ph : (j + 1) * ph, k * pw : (k + 1) * pw]
    position = p['temporal_position'][i] + p['horizontal_position'][j] + p['vertical_position'][k]
    if position_layernorm:
      position = ref_layer_norm(position, p['position_norm'])
    tokens[:, (i * nh + j) * nw + k] = ref_dense(patch.reshape(batch, -1), p['patch']) + position
  return tokens


def ref_waveform_tokens(p, audio, patch_size):
  batch, samples = audio.shape
  num_patches = math.ceil(samples / patch_size)
  padded = np.zeros((batch, num_patches * patch_size))
  padded[:, :samples] = audio
  tokens = [
    ref_dense(padded[:, n * patch_size : (n + 1) * patch_size], p['patch']) + p['position'][n]
    for n in range(num_patches)
  ]
  return np.stack(tokens, axis=1)


def _with_agg(agg, tokens):
  return np.concatenate([np.broadcast_to(agg, (tokens.shape[0], 1, agg.shape[-1])), tokens], 1)


def ref_encoder_params(params, modality, cfg):
  """The encoder of `modality`'s tower: its own, or the shared one (modality-agnostic)."""
  if cfg.backbone == 'modality_agnostic':
    return params['shared_encoder']
  return params[f'{modality}_tower']['encoder']


def ref_vatt_agg(params, batch, cfg):
  """The AGG outputs {video,audio,text}_agg of a VATT model (eval, or train with no dropout)."""
  out = {}
  if 'video' in batch:
    tower = params['video_tower']
    tokens = ref_voxel_tokens(tower['tokenizer'], batch['video'], cfg.video.patch_size)
    out['video_agg'] = ref_encoder(
      ref_encoder_params(params, 'video', cfg), _with_agg(tower['agg'], tokens)
    )[:, 0]
  if 'audio' in batch:
    tower = params['audio_tower']
    tokens = ref_waveform_tokens(tower['tokenizer'], batch['audio'], cfg.audio.patch_size)
    out['audio_agg'] = ref_encoder(
      ref_encoder_params(params, 'audio', cfg), _with_agg(tower['agg'], tokens)
    )[:, 0]
  if 'text' in batch:
    out['text_agg'] = ref_text_agg(params, batch['text'], cfg)
  return out


def ref_text_agg(params, text, cfg, *, bias_all_layers=None):
  shared = cfg.backbone == 'modality_agnostic'
  tower = params['text_tower']
  ids = text.reshape(-1, text.shape[-1])
  tokens = tower['tokenizer']['vocabulary']['embedding'][ids]
  mask = np.concatenate([np.ones((ids.shape[0], 1), bool), ids != 0], axis=1)
  table = tower['relative_bias']['rel_embedding']
  bias = ref_relative_bias(
    table, ids.shape[1] + 1, cfg.text.relative_buckets, cfg.text.relative_max_distance
  )
  if bias_all_layers is None:
    bias_all_layers = False if shared else cfg.text.bias_all_layers
  out = ref_encoder(
    ref_encoder_params(params, 'text', cfg),
    _with_agg(tower['agg'], tokens),
    mask=mask,
    bias=bias,
    bias_all_layers=bias_all_layers,
    norm_type='layernorm' if shared else cfg.text.norm_type,
    scale_logits=True if shared else cfg.text.scale_logits,
  )
  return out[:, 0].reshape(*text.shape[:-1], -1)


def ref_heads(params, stats, agg, head_cfg, *, train):
  """Common-space projections; `train` uses the batch statistics (biased variance)."""

  def linear_bn(x, name):
    y = x @ params[f'{name}_dense']['kernel']
    if train:
      mean, var = y.mean(0), y.var(0)
    else:
      mean, var = stats[f'{name}_bn']['mean'], stats[f'{name}_bn']['var']
    bn = params[f'{name}_bn']
    return (y - mean) / np.sqrt(var + head_cfg.bn_epsilon) * bn['scale'] + bn['bias']

  out = {}
  if 'video_agg' in agg:
    hidden = np.maximum(linear_bn(agg['video_agg'], 'video_va_1'), 0.0)
    out['video_va'] = linear_bn(hidden, 'video_va_2')
    to_vt = np.maximum(out['video_va'], 0.0) if head_cfg.relu_before_vt else out['video_va']
    out['video_vt'] = linear_bn(to_vt, 'video_vt')
  if 'audio_agg' in agg:
    out['audio_va'] = linear_bn(agg['audio_agg'], 'audio_va')
  if 'text_agg' in agg:
    text = agg['text_agg']
    flat = linear_bn(text.reshape(-1, text.shape[-1]), 'text_vt')
    out['text_vt'] = flat.reshape(*text.shape[:-1], -1)
  return out


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def to64(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def random_like(abstract, seed):
  """Random float32 values for an abstract variable tree, scaled per kind of variable."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in traverse_util.flatten_dict(abstract).items():
    name, shape = path[-1], leaf.shape
    if name == 'kernel':
      fan_in = math.prod(shape[:-1]) if path[-2] == 'out' else shape[0]
      value = rng.normal(size=shape) / math.sqrt(fan_in)
    elif name == 'scale':
      value = 1.0 + 0.2 * rng.normal(size=shape)
    elif name == 'var':
      value = rng.uniform(0.5, 1.5, size=shape)
    elif name in ('bias', 'mean'):
      value = 0.2 * rng.normal(size=shape)
    else:  # positions, AGG tokens, embeddings, relative-bias table
      value = 0.5 * rng.normal(size=shape)
    out[path] = jnp.asarray(value, leaf.dtype)
  return traverse_util.unflatten_dict(out)


def random_variables(module, *args, seed=0, **kwargs):
  """Random variables of a flax module (its init's shapes)."""
  init = lambda: module.init({'params': jax.random.key(0)}, *args, **kwargs)  # noqa: E731
  abstract = nn.meta.unbox(jax.eval_shape(init))
  return random_like(abstract, seed)


def model_variables(model, batch, seed=0):
  """Random {'params', 'batch_stats'} of a contract model (the shapes of `model.init`)."""
  abstract = jax.eval_shape(lambda b: model.init(jax.random.key(0), b), batch)
  return random_like(abstract, seed)


def tiny_config(shared_size=None):
  config = common.pretraining_config(common.model_config(shared_size=shared_size))
  common.runlocal(config)
  return config.model


def make_batch(cfg, rng, batch_size=BATCH):
  """Video and audio in [-1, 1]; text with ragged lengths, a one-word and an empty narration."""
  frames, size = cfg.video.num_frames, cfg.video.frame_size
  narrations, words = cfg.text.num_narrations, cfg.text.max_words
  ids = rng.integers(1, cfg.text.vocab_size, size=(batch_size, narrations, words))
  lengths = rng.integers(1, words + 1, size=(batch_size, narrations))
  lengths[0, 0], lengths[0, -1], lengths[-1, -1] = words, 1, 0
  ids = np.where(np.arange(words) < lengths[..., None], ids, 0).astype(np.int32)
  return {
    'video': rng.uniform(-1, 1, (batch_size, frames, size, size, 3)).astype(np.float32),
    'audio': rng.uniform(-1, 1, (batch_size, cfg.audio.num_samples)).astype(np.float32),
    'text': ids,
  }


def prng(seed):
  # RngBitGenerator keys: compiling threefry's bit generation for every dropout site costs
  # seconds of CPU time per program, and nothing here depends on the generator.
  return jax.random.key(seed, impl='rbg')


def rngs(seed):
  return {'dropout': prng(seed), 'droptoken': prng(seed + 1000)}


class Tiny:
  """A runlocal-sized VATT with random variables, a batch and jitted eval/train applies.

  model: the contract object (build_model); module: its VATT flax module (model internals).
  """

  def __init__(self, shared_size=None, seed=0):
    self.cfg = tiny_config(shared_size)
    self.model = build_model(self.cfg)
    self.module = self.model.module
    self.batch = make_batch(self.cfg, np.random.default_rng(seed))
    self.variables = model_variables(self.model, self.batch, seed=seed)
    self.eval = jax.jit(functools.partial(self.module.apply, train=False))
    self._eval_out = None

  @property
  def eval_out(self):
    if self._eval_out is None:
      self._eval_out = self.eval(self.variables, self.batch)
    return self._eval_out

  def variant(self, **changes):
    """The VATT flax module of a model built from a modified config (rates and flags only: the
    variables stay valid)."""
    cfg = self.cfg.copy_and_resolve_references()
    for dotted, value in changes.items():
      node = cfg
      *parents, leaf = dotted.split('.')
      for parent in parents:
        node = node[parent]
      node[leaf] = value
    return build_model(cfg).module


def train_apply(module):
  return jax.jit(functools.partial(module.apply, train=True, mutable=['batch_stats']))


@pytest.fixture(scope='module')
def specific():
  return Tiny()


@pytest.fixture(scope='module')
def agnostic():
  return Tiny(shared_size='medium', seed=1)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# 1. shapes
# ----------------------------------------------------------------------------------------------


def expected_shapes(cfg, width, keys):
  b, k = BATCH, cfg.text.num_narrations
  shapes = {
    'video_agg': (b, width),
    'audio_agg': (b, width),
    'text_agg': (b, k, width),
    'video_va': (b, cfg.head.va_dim),
    'audio_va': (b, cfg.head.va_dim),
    'video_vt': (b, cfg.head.vt_dim),
    'text_vt': (b, k, cfg.head.vt_dim),
  }
  return {key: shapes[key] for key in keys}


MODALITY_KEYS = {
  'video': ('video_agg', 'video_va', 'video_vt'),
  'audio': ('audio_agg', 'audio_va'),
  'text': ('text_agg', 'text_vt'),
}


@pytest.mark.parametrize('backbone', ['specific', 'agnostic'])
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize(
  'modalities',
  [('video', 'audio', 'text'), ('video',), ('audio', 'text'), ('text',)],
  ids=lambda m: '+'.join(m),
)
def test_output_shapes(backbone, train, modalities, request):
  tiny = request.getfixturevalue(backbone)
  batch = {m: tiny.batch[m] for m in modalities}
  if train:
    out, updates = jax.eval_shape(
      lambda v, b: tiny.module.apply(v, b, train=True, rngs=rngs(0), mutable=['batch_stats']),
      tiny.variables,
      batch,
    )
    assert set(updates) == {'batch_stats'}
  else:
    out = jax.eval_shape(lambda v, b: tiny.module.apply(v, b, train=False), tiny.variables, batch)
  keys = [key for m in modalities for key in MODALITY_KEYS[m]]
  assert {key: value.shape for key, value in out.items()} == expected_shapes(
    tiny.cfg, TINY_WIDTH, keys
  )
  assert all(value.dtype == jnp.float32 for value in out.values())


def test_single_narration_text_shapes(specific):
  text = specific.batch['text'][:, 0]  # [B, W] rather than [B, K, W]
  out = jax.eval_shape(lambda v, t: specific.module.apply(v, {'text': t}), specific.variables, text)
  assert {key: value.shape for key, value in out.items()} == {
    'text_agg': (BATCH, TINY_WIDTH),
    'text_vt': (BATCH, specific.cfg.head.vt_dim),
  }


def test_empty_batch_raises(specific):
  with pytest.raises(ValueError, match='batch has none of'):
    specific.module.apply(specific.variables, {'label': np.zeros(2)}, train=False)


# ----------------------------------------------------------------------------------------------
# 2. multi-head self-attention
# ----------------------------------------------------------------------------------------------

ATT_B, ATT_N, ATT_D, ATT_H = 3, 6, 16, 4


@pytest.fixture(scope='module')
def attention_inputs():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(ATT_B, ATT_N, ATT_D)).astype(np.float32)
  mask = np.ones((ATT_B, ATT_N), bool)
  mask[1] = np.arange(ATT_N) == 3  # exactly one valid key
  mask[2] = rng.random(ATT_N) < 0.5
  mask[2, 0] = True
  bias = rng.normal(size=(1, ATT_H, ATT_N, ATT_N)).astype(np.float32)
  module = MultiHeadSelfAttention(num_heads=ATT_H)
  params = random_variables(module, x, seed=3)
  return x, mask, bias, params


def attention_apply(module, deterministic=True):
  return jax.jit(
    lambda p, x, mask, bias, rng: module.apply(
      p, x, mask=mask, bias=bias, deterministic=deterministic, rngs={'dropout': rng}
    )
  )


@pytest.mark.parametrize('scale_logits', [True, False])
@pytest.mark.parametrize('use_mask', [False, True], ids=['nomask', 'mask'])
@pytest.mark.parametrize('use_bias', [False, True], ids=['nobias', 'bias'])
def test_attention_matches_reference(attention_inputs, scale_logits, use_mask, use_bias):
  x, mask, bias, params = attention_inputs
  mask, bias = (mask if use_mask else None), (bias if use_bias else None)
  module = MultiHeadSelfAttention(num_heads=ATT_H, scale_logits=scale_logits)
  got = attention_apply(module)(params, x, mask, bias, prng(0))
  want = ref_attention(
    to64(params['params']), x.astype(np.float64), mask=mask, bias=bias, scale_logits=scale_logits
  )
  assert got.shape == (ATT_B, ATT_N, ATT_D)
  assert_close(got, want)


def test_attention_single_valid_key_ignores_bias(attention_inputs):
  # Row 1 has one valid key: every query returns that key's value, whatever the logits.
  x, mask, bias, params = attention_inputs
  apply = attention_apply(MultiHeadSelfAttention(num_heads=ATT_H))
  with_bias = apply(params, x, mask, bias, prng(0))
  without = apply(params, x, mask, None, prng(0))
  assert_close(with_bias[1], np.asarray(without[1], np.float64))
  assert_close(with_bias[1], np.broadcast_to(np.asarray(with_bias[1, :1]), (ATT_N, ATT_D)))


@pytest.mark.parametrize('scale_logits', [True, False])
def test_attention_explicit_path_matches_reference(attention_inputs, scale_logits):
  # A vanishing dropout rate with deterministic=False takes the explicit einsum/softmax path
  # while keeping every probability (keep_prob rounds to 1 in float32).
  x, mask, bias, params = attention_inputs
  module = MultiHeadSelfAttention(
    num_heads=ATT_H, attention_dropout_rate=1e-9, scale_logits=scale_logits
  )
  got = attention_apply(module, deterministic=False)(params, x, mask, bias, prng(0))
  want = ref_attention(
    to64(params['params']), x.astype(np.float64), mask=mask, bias=bias, scale_logits=scale_logits
  )
  assert_close(got, want)


def test_attention_dropout(attention_inputs):
  x, mask, bias, params = attention_inputs
  module = MultiHeadSelfAttention(num_heads=ATT_H, attention_dropout_rate=0.5)
  want = ref_attention(to64(params['params']), x.astype(np.float64), mask=mask, bias=bias)
  off = attention_apply(module, deterministic=True)(params, x, mask, bias, prng(0))
  assert_close(off, want)

  on = attention_apply(module, deterministic=False)
  first = np.asarray(on(params, x, mask, bias, prng(0)))
  assert np.all(np.isfinite(first))
  assert not np.allclose(first, want, atol=1e-3)
  np.testing.assert_array_equal(first, on(params, x, mask, bias, prng(0)))
  assert not np.allclose(first, on(params, x, mask, bias, prng(1)), atol=1e-3)
  # Masked keys stay masked under dropout: changing them moves only their own query rows.
  changed = x.copy()
  changed[2, ~mask[2]] += 10.0
  moved = np.asarray(on(params, changed, mask, bias, prng(0)))
  np.testing.assert_allclose(moved[2, mask[2]], first[2, mask[2]], rtol=1e-5, atol=1e-5)


def test_attention_rejects_indivisible_width():
  with pytest.raises(ValueError, match='not divisible'):
    MultiHeadSelfAttention(num_heads=3).init(jax.random.key(0), np.zeros((1, 2, 16), np.float32))


# ----------------------------------------------------------------------------------------------
# 3. T5 relative position bias
# ----------------------------------------------------------------------------------------------


_bucket = jax.jit(relative_position_bucket, static_argnames=('num_buckets', 'max_distance'))


@pytest.mark.parametrize('num_buckets, max_distance', [(32, 64), (32, 128), (16, 32), (64, 256)])
def test_relative_position_bucket_matches_t5(num_buckets, max_distance):
  relative = np.arange(-200, 201)
  got = np.asarray(
    _bucket(jnp.asarray(relative), num_buckets=num_buckets, max_distance=max_distance)
  )
  np.testing.assert_array_equal(got, ref_bucket(relative, num_buckets, max_distance))
  assert 0 <= got.min() and got.max() < num_buckets


def test_relative_position_bucket_known_values():
  # Hand-checked T5 values (32 buckets, max distance 128): keys after the query use 16..31.
  relative = np.array([0, -1, -7, -8, -16, -128, -1000, 1, 7, 8, 16, 128, 1000])
  want = np.array([0, 1, 7, 8, 10, 15, 15, 17, 23, 24, 26, 31, 31])
  got = _bucket(jnp.asarray(relative), num_buckets=32, max_distance=128)
  np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(ref_bucket(relative, 32, 128), want)


@pytest.mark.parametrize('length', [9, 150])
def test_relative_position_bias_module(length):
  module = RelativePositionBias(num_heads=4, num_buckets=32, max_distance=64)
  params = random_variables(module, length, seed=4)
  table = np.asarray(params['params']['rel_embedding'], np.float64)
  assert table.shape == (32, 4)
  got = np.asarray(jax.jit(module.apply, static_argnums=1)(params, length))
  assert got.shape == (1, 4, length, length)
  want = ref_relative_bias(table, length, 32, 64)
  np.testing.assert_array_equal(got, want.astype(np.float32))
  i, j = 2, 7  # spelled out once: bias[0, h, i, j] = table[bucket(j - i), h]
  np.testing.assert_array_equal(
    got[0, :, i, j], table[ref_bucket(j - i, 32, 64)].astype(np.float32)
  )


# ----------------------------------------------------------------------------------------------
# 4-5. tokenizers
# ----------------------------------------------------------------------------------------------

VOXEL_PATCH, VOXEL_GRID, VOXEL_WIDTH = (2, 4, 4), (2, 2, 3), 8


@pytest.mark.parametrize(
  'dims, position_layernorm',
  [((4, 8, 12), False), ((3, 7, 10), False), ((4, 8, 12), True)],
  ids=['exact', 'ragged', 'position_layernorm'],
)
def test_voxel_tokenizer_matches_reference(dims, position_layernorm):
  video = np.random.default_rng(5).uniform(-1, 1, (BATCH, *dims, 3)).astype(np.float32)
  module = VoxelTokenizer(
    width=VOXEL_WIDTH,
    patch_size=VOXEL_PATCH,
    grid=VOXEL_GRID,
    position_layernorm=position_layernorm,
  )
  params = random_variables(module, video, seed=6)
  p = params['params']
  assert p['temporal_position'].shape == (2, VOXEL_WIDTH)
  assert p['horizontal_position'].shape == (2, VOXEL_WIDTH)
  assert p['vertical_position'].shape == (3, VOXEL_WIDTH)
  position_vectors = sum(
    p[f'{axis}_position'].shape[0] for axis in ('temporal', 'horizontal', 'vertical')
  )
  assert position_vectors == 2 + 2 + 3  # factorised: nt + nh + nw vectors, not nt * nh * nw
  assert p['patch']['kernel'].shape == (math.prod(VOXEL_PATCH) * 3, VOXEL_WIDTH)
  got = jax.jit(module.apply)(params, video)
  assert got.shape == (BATCH, math.prod(VOXEL_GRID), VOXEL_WIDTH)
  assert_close(got, ref_voxel_tokens(to64(p), video, VOXEL_PATCH, position_layernorm))


def test_voxel_tokenizer_rejects_bad_input():
  module = VoxelTokenizer(width=VOXEL_WIDTH, patch_size=VOXEL_PATCH, grid=VOXEL_GRID)
  good = np.zeros((1, 4, 8, 12, 3), np.float32)
  params = random_variables(module, good)
  with pytest.raises(ValueError, match=r'\(3, 2, 3\) patch grid.*sized for \(2, 2, 3\)'):
    module.apply(params, np.zeros((1, 6, 8, 12, 3), np.float32))
  with pytest.raises(ValueError, match=r'video must be \[B, T, H, W, C\]'):
    module.apply(params, np.zeros((4, 8, 12, 3), np.float32))


AUDIO_PATCH, AUDIO_WIDTH = 16, 8


@pytest.mark.parametrize('samples', [112, 100, 3], ids=['exact', 'ragged', 'short'])
def test_waveform_tokenizer_matches_reference(samples):
  audio = np.random.default_rng(7).uniform(-1, 1, (BATCH, samples)).astype(np.float32)
  num_patches = math.ceil(samples / AUDIO_PATCH)
  module = WaveformTokenizer(width=AUDIO_WIDTH, patch_size=AUDIO_PATCH, num_patches=num_patches)
  params = random_variables(module, audio, seed=8)
  p = params['params']
  assert p['position'].shape == (num_patches, AUDIO_WIDTH)
  apply = jax.jit(module.apply)
  got = apply(params, audio)
  assert got.shape == (BATCH, num_patches, AUDIO_WIDTH)
  assert_close(got, ref_waveform_tokens(to64(p), audio, AUDIO_PATCH))
  # [B, S, 1] mono is accepted as [B, S].
  np.testing.assert_array_equal(apply(params, audio[..., None]), got)


def test_waveform_tokenizer_rejects_bad_input():
  module = WaveformTokenizer(width=AUDIO_WIDTH, patch_size=AUDIO_PATCH, num_patches=7)
  params = random_variables(module, np.zeros((1, 100), np.float32))
  with pytest.raises(ValueError, match='gives 8 patches of 16.*has 7'):
    module.apply(params, np.zeros((1, 120), np.float32))
  with pytest.raises(ValueError, match=r'audio must be \[B, S\]'):
    module.apply(params, np.zeros((1, 100, 2), np.float32))
  with pytest.raises(ValueError, match=r'audio must be \[B, S\]'):
    module.apply(params, np.zeros((100,), np.float32))


# ----------------------------------------------------------------------------------------------
# 6. DropToken
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'num_tokens, rate, kept',
  [
    (1568, 0.5, 784),
    (1568, 0.25, 1176),
    (1568, 0.75, 392),
    (1200, 0.5, 600),
    (1200, 0.0, 1200),
    (10, 0.3, 7),
    (3, 0.9, 1),
  ],
)
def test_num_kept_tokens(num_tokens, rate, kept):
  assert num_kept_tokens(num_tokens, rate) == kept


@pytest.mark.parametrize('rate', [-0.1, 1.0, 1.5])
def test_drop_token_rate_out_of_range_raises(rate):
  with pytest.raises(ValueError, match='drop_token_rate'):
    num_kept_tokens(100, rate)
  with pytest.raises(ValueError, match='drop_token_rate'):
    drop_token(jnp.zeros((1, 100, 1)), rate, jax.random.key(0))


@functools.cache
def _jit_drop_token(rate):
  return jax.jit(lambda tokens, rng: drop_token(tokens, rate, rng))


@pytest.mark.parametrize('num_tokens, rate', [(1568, 0.5), (1568, 0.25), (1200, 0.75)])
def test_drop_token_keeps_one_ordered_subset_for_the_batch(num_tokens, rate):
  batch = 3
  index = np.arange(num_tokens, dtype=np.float32)
  # Feature 0 encodes the token index (same across the batch); feature 1 also the example.
  tokens = np.stack(
    [np.broadcast_to(index, (batch, num_tokens)), index + 10_000 * np.arange(batch)[:, None]], -1
  )
  out = np.asarray(_jit_drop_token(rate)(tokens, prng(0)))
  kept = num_kept_tokens(num_tokens, rate)
  assert out.shape == (batch, kept, 2)
  kept_index = out[0, :, 0]
  assert np.all(np.diff(kept_index) > 0)  # strictly increasing: original order, no repeats
  assert set(kept_index) <= set(index)
  for b in range(batch):
    np.testing.assert_array_equal(out[b, :, 0], kept_index)  # same subset for every example
    np.testing.assert_array_equal(out[b, :, 1], kept_index + 10_000 * b)  # its own values
  other = np.asarray(_jit_drop_token(rate)(tokens, prng(1)))
  assert not np.array_equal(other[0, :, 0], kept_index)


def test_drop_token_with_the_default_prng():
  tokens = np.broadcast_to(np.arange(1568, dtype=np.float32)[None, :, None], (2, 1568, 1))
  out = np.asarray(_jit_drop_token(0.5)(tokens, jax.random.key(0)))  # threefry key
  assert out.shape == (2, 784, 1)
  assert np.all(np.diff(out[0, :, 0]) > 0)
  np.testing.assert_array_equal(out[0], out[1])


def test_drop_token_rate_zero_is_identity():
  tokens = jnp.arange(24.0).reshape(2, 4, 3)
  assert drop_token(tokens, 0.0, jax.random.key(0)) is tokens


# ----------------------------------------------------------------------------------------------
# full model: numerics, eval/train, DropToken, dropout
# ----------------------------------------------------------------------------------------------


def test_model_eval_matches_reference(specific):
  params, stats = to64(specific.variables['params']), to64(specific.variables['batch_stats'])
  batch = {m: np.asarray(v, np.float64) if m != 'text' else v for m, v in specific.batch.items()}
  agg = ref_vatt_agg(params, batch, specific.cfg)
  want = {**agg, **ref_heads(params['head'], stats['head'], agg, specific.cfg.head, train=False)}
  got = specific.eval_out
  assert set(got) == set(want)
  for key in want:
    assert_close(got[key], want[key])


def test_model_eval_needs_no_rngs_and_ignores_them(specific):
  video = {'video': specific.batch['video']}
  apply = jax.jit(lambda v, b, r: specific.module.apply(v, b, train=False, rngs=r))
  first = apply(specific.variables, video, rngs(1))['video_agg']
  np.testing.assert_array_equal(first, apply(specific.variables, video, rngs(2))['video_agg'])
  assert_close(first, np.asarray(specific.eval_out['video_agg'], np.float64))  # rng-free call
  np.testing.assert_array_equal(
    specific.eval_out['video_agg'], specific.eval(specific.variables, specific.batch)['video_agg']
  )


def test_model_train_without_dropout_matches_eval(specific):
  model = specific.variant(
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    **{'video.drop_token_rate': 0.0, 'audio.drop_token_rate': 0.0},
  )
  out, updates = train_apply(model)(specific.variables, specific.batch, rngs=rngs(3))
  for key in ('video_agg', 'audio_agg', 'text_agg'):
    assert_close(out[key], np.asarray(specific.eval_out[key], np.float64))
  # The heads use the batch statistics in training and update the running averages.
  params, stats = to64(specific.variables['params']), to64(specific.variables['batch_stats'])
  agg = {key: np.asarray(out[key], np.float64) for key in ('video_agg', 'audio_agg', 'text_agg')}
  want = ref_heads(params['head'], stats['head'], agg, specific.cfg.head, train=True)
  for key in want:
    assert_close(out[key], want[key], atol=TRAIN_BN_ATOL)
  momentum = specific.cfg.head.bn_momentum
  y = agg['audio_agg'] @ params['head']['audio_va_dense']['kernel']
  new = updates['batch_stats']['head']['audio_va_bn']
  old = stats['head']['audio_va_bn']
  assert_close(new['mean'], momentum * old['mean'] + (1 - momentum) * y.mean(0))
  assert_close(new['var'], momentum * old['var'] + (1 - momentum) * y.var(0))


def test_model_drop_token_in_training(specific):
  # 8 video tokens at rate 0.5: training encodes a random 4 of them, the same 4 for the batch.
  model = specific.variant(dropout_rate=0.0, attention_dropout_rate=0.0)
  video = {'video': specific.batch['video']}
  apply = train_apply(model)
  outs = [
    np.asarray(apply(specific.variables, video, rngs=rngs(s))[0]['video_agg']) for s in (4, 5)
  ]
  assert not np.allclose(outs[0], outs[1], atol=1e-3)
  np.testing.assert_array_equal(
    outs[0], apply(specific.variables, video, rngs=rngs(4))[0]['video_agg']
  )
  assert not np.allclose(outs[0], specific.eval_out['video_agg'], atol=1e-3)

  tower = to64(specific.variables['params']['video_tower'])
  tokens = ref_voxel_tokens(
    tower['tokenizer'], video['video'].astype(np.float64), specific.cfg.video.patch_size
  )
  num_tokens = tokens.shape[1]
  subsets = list(itertools.combinations(range(num_tokens), num_kept_tokens(num_tokens, 0.5)))
  candidates = np.stack(
    [
      ref_encoder(tower['encoder'], _with_agg(tower['agg'], tokens[:, list(s)]))[:, 0]
      for s in subsets
    ]
  )  # [subsets, B, D]
  for out in outs:
    error = np.abs(candidates - out[None]).max(-1)  # [subsets, B]
    best = error.argmin(0)
    assert error[best, np.arange(BATCH)].max() < ATOL, 'no token subset explains the output'
    assert np.all(best == best[0]), 'examples of one batch kept different tokens'


def test_model_dropout_in_training(specific):
  audio = {'audio': specific.batch['audio']}
  apply = train_apply(specific.module)  # config rates: dropout 0.1, attention 0.1, DropToken 0.5
  first = np.asarray(apply(specific.variables, audio, rngs=rngs(6))[0]['audio_agg'])
  assert np.all(np.isfinite(first))
  np.testing.assert_array_equal(
    first, apply(specific.variables, audio, rngs=rngs(6))[0]['audio_agg']
  )
  assert not np.allclose(first, apply(specific.variables, audio, rngs=rngs(7))[0]['audio_agg'])
  assert not np.allclose(first, specific.eval_out['audio_agg'], atol=1e-3)


# ----------------------------------------------------------------------------------------------
# 7. text: padding and the relative bias
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def padded_text(specific):
  text = np.pad(specific.batch['text'], ((0, 0), (0, 0), (0, 4)))  # W -> W + 4 zeros
  return text, jax.jit(functools.partial(specific.module.apply, train=False))


def test_text_extra_padding_changes_nothing(specific, padded_text):
  text, apply = padded_text
  out = apply(specific.variables, {'text': text})
  for key in ('text_agg', 'text_vt'):
    assert_close(out[key], np.asarray(specific.eval_out[key], np.float64))


def test_text_relative_bias_is_used_in_the_first_layer_only(specific, padded_text):
  text, apply = padded_text
  params = specific.variables['params']
  zeroed = {
    **params,
    'text_tower': {
      **params['text_tower'],
      'relative_bias': {'rel_embedding': jnp.zeros((32, 4), jnp.float32)},
    },
  }
  with_bias = np.asarray(apply(specific.variables, {'text': text})['text_agg'])
  without = np.asarray(apply({**specific.variables, 'params': zeroed}, {'text': text})['text_agg'])
  assert not np.allclose(with_bias, without, atol=1e-3)
  assert_close(without, ref_text_agg(to64(zeroed), text, specific.cfg))
  # The reference with the bias in every layer does not describe the model (default config).
  assert specific.cfg.text.bias_all_layers is False
  all_layers = ref_text_agg(to64(params), text, specific.cfg, bias_all_layers=True)
  assert not np.allclose(with_bias, all_layers, atol=1e-3)
  assert_close(with_bias, ref_text_agg(to64(params), text, specific.cfg))


# ----------------------------------------------------------------------------------------------
# 8. modality-agnostic weight sharing; modality-specific sizes
# ----------------------------------------------------------------------------------------------


def test_modality_agnostic_has_one_shared_encoder(agnostic):
  params = agnostic.variables['params']
  encoders = sorted(name for name in params if name.endswith('encoder'))
  assert encoders == ['shared_encoder']
  for tower in ('video_tower', 'audio_tower', 'text_tower'):
    assert 'encoder' not in params[tower], tower  # tokenizers, AGG (and text bias) only
  assert sum(name.startswith('block_') for name in params['shared_encoder']) == 2


def test_modality_agnostic_matches_reference(agnostic):
  params, stats = to64(agnostic.variables['params']), to64(agnostic.variables['batch_stats'])
  agg = ref_vatt_agg(params, agnostic.batch, agnostic.cfg)
  want = {**agg, **ref_heads(params['head'], stats['head'], agg, agnostic.cfg.head, train=False)}
  for key in want:
    assert_close(agnostic.eval_out[key], want[key])


@pytest.mark.parametrize(
  'perturbed, changed',
  [
    ('shared_encoder', ('video_agg', 'audio_agg', 'text_agg')),
    ('video_tower/tokenizer', ('video_agg',)),
    ('text_tower/agg', ('text_agg',)),
  ],
)
def test_modality_agnostic_perturbation(agnostic, perturbed, changed):
  params = contract.flat_paths(agnostic.variables['params'])
  params = {
    tuple(path.split('/')): (np.asarray(a) * 1.1 + 0.05).astype(np.float32)
    if path == perturbed or path.startswith(perturbed + '/')
    else a
    for path, a in params.items()
  }
  params = traverse_util.unflatten_dict(params)
  out = agnostic.eval({**agnostic.variables, 'params': params}, agnostic.batch)
  for key in ('video_agg', 'audio_agg', 'text_agg'):
    same = np.allclose(out[key], agnostic.eval_out[key], atol=1e-6)
    assert same != (key in changed), key


def test_modality_specific_encoders_follow_configured_sizes():
  cfg = tiny_config()
  cfg.video.size = 'small'  # 6 layers, width 512, MLP 2048, 8 heads; traced, never run
  model = build_model(cfg)
  batch = model.example_batch(BATCH)
  params = jax.eval_shape(lambda b: model.init(jax.random.key(0), b), batch)['params']
  assert sorted(name for name in params if 'encoder' in params[name]) == [
    'audio_tower',
    'text_tower',
    'video_tower',
  ]
  assert 'shared_encoder' not in params
  for name, (layers, width, mlp, heads) in {
    'video_tower': (6, 512, 2048, 8),
    'audio_tower': (2, 64, 256, 4),
    'text_tower': (2, 64, 256, 4),
  }.items():
    encoder = params[name]['encoder']
    assert sum(key.startswith('block_') for key in encoder) == layers
    block = encoder[f'block_{layers - 1:02d}']
    assert block['attention']['query']['kernel'].shape == (width, heads, width // heads)
    assert block['attention']['out']['kernel'].shape == (heads, width // heads, width)
    assert block['mlp']['fc1']['kernel'].shape == (width, mlp)
    assert encoder['final_norm']['scale'].shape == (width,)
  assert params['video_tower']['tokenizer']['patch']['kernel'].shape == (2 * 16 * 16 * 3, 512)
  assert params['video_tower']['agg'].shape == (512,)
  assert params['head']['video_va_1_dense']['kernel'].shape == (512, cfg.head.va_dim)
  assert params['head']['audio_va_dense']['kernel'].shape == (64, cfg.head.va_dim)


# ----------------------------------------------------------------------------------------------
# 9-10. encoder block, encoder, exact GELU
# ----------------------------------------------------------------------------------------------

BLOCK_B, BLOCK_N, BLOCK_D, BLOCK_H, BLOCK_MLP = 2, 5, 16, 4, 32


@pytest.fixture(scope='module')
def block_inputs():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(BLOCK_B, BLOCK_N, BLOCK_D)).astype(np.float32)
  mask = np.ones((BLOCK_B, BLOCK_N), bool)
  mask[1, 3:] = False
  bias = rng.normal(size=(1, BLOCK_H, BLOCK_N, BLOCK_N)).astype(np.float32)
  return x, mask, bias


@pytest.mark.parametrize(
  'norm_type, scale_logits', [('layernorm', True), ('rmsnorm', False)], ids=['ln', 'rms_t5']
)
def test_encoder_block_matches_reference(block_inputs, norm_type, scale_logits):
  x, mask, bias = block_inputs
  module = EncoderBlock(
    mlp_dim=BLOCK_MLP, num_heads=BLOCK_H, norm_type=norm_type, scale_logits=scale_logits
  )
  params = random_variables(module, x, seed=10)
  got = jax.jit(lambda p, x: module.apply(p, x, mask=mask, bias=bias))(params, x)
  want = ref_block(
    to64(params['params']),
    x.astype(np.float64),
    mask=mask,
    bias=bias,
    norm_type=norm_type,
    scale_logits=scale_logits,
  )
  assert_close(got, want)


@pytest.mark.parametrize('bias_all_layers', [False, True])
def test_encoder_matches_reference(block_inputs, bias_all_layers):
  x, mask, bias = block_inputs
  size = EncoderSize(num_layers=3, width=BLOCK_D, mlp_dim=BLOCK_MLP, num_heads=BLOCK_H)
  module = Encoder(size=size, bias_all_layers=bias_all_layers)
  params = random_variables(module, x, seed=11)
  got = jax.jit(lambda p, x: module.apply(p, x, mask=mask, bias=bias))(params, x)
  p64 = to64(params['params'])
  want = ref_encoder(
    p64, x.astype(np.float64), mask=mask, bias=bias, bias_all_layers=bias_all_layers
  )
  assert_close(got, want)
  other = ref_encoder(
    p64, x.astype(np.float64), mask=mask, bias=bias, bias_all_layers=not bias_all_layers
  )
  assert not np.allclose(got, other, atol=1e-3)  # the layers the bias reaches matter


def test_encoder_rejects_wrong_width():
  module = Encoder(size=EncoderSize(num_layers=1, width=16, mlp_dim=32, num_heads=4))
  with pytest.raises(ValueError, match='width 16 got tokens of width 8'):
    module.init(jax.random.key(0), np.zeros((1, 3, 8), np.float32))


def test_gelu_is_exact():
  # A one-unit MLP with unit weights and zero biases returns gelu(x) itself.
  module = MlpBlock(mlp_dim=1)
  x = np.array([[-3.0], [-1.0], [0.5], [1.5], [3.0]], np.float32)
  ones = {'kernel': jnp.ones((1, 1)), 'bias': jnp.zeros((1,))}
  got = np.asarray(module.apply({'params': {'fc1': ones, 'fc2': ones}}, x, deterministic=True))
  x64 = x.astype(np.float64)
  assert abs(ref_gelu(1.5) - tanh_gelu(1.5)) > 1e-4  # the two forms are distinguishable here
  np.testing.assert_allclose(got, ref_gelu(x64), rtol=1e-6, atol=1e-7)
  assert not np.allclose(got, tanh_gelu(x64), rtol=1e-6, atol=1e-5)


def test_mlp_block_matches_reference(block_inputs):
  x = block_inputs[0]
  module = MlpBlock(mlp_dim=BLOCK_MLP)
  params = random_variables(module, x, seed=12, deterministic=True)
  got = jax.jit(lambda p, x: module.apply(p, x, deterministic=True))(params, x)
  p = to64(params['params'])
  assert_close(got, ref_dense(ref_gelu(ref_dense(x.astype(np.float64), p['fc1'])), p['fc2']))


# ----------------------------------------------------------------------------------------------
# 11. bad inputs and bad configs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'video, message',
  [
    (np.zeros((2, 4, 32, 32), np.float32), r'video must be \[B, T, H, W, C\]'),
    (np.zeros((2, 6, 32, 32, 3), np.float32), r'\(3, 2, 2\) patch grid.*\(2, 2, 2\)'),
    (np.zeros((2, 4, 48, 32, 3), np.float32), r'\(2, 3, 2\) patch grid.*num_frames / frame_size'),
  ],
  ids=['rank', 'frames', 'height'],
)
def test_model_rejects_bad_video(specific, video, message):
  with pytest.raises(ValueError, match=message):
    specific.module.apply(specific.variables, {'video': video}, train=False)


@pytest.mark.parametrize(
  'audio, message',
  [
    (np.zeros((2, 2048, 2), np.float32), r'audio must be \[B, S\]'),
    (np.zeros((2048,), np.float32), r'audio must be \[B, S\]'),
    (np.zeros((2, 4096), np.float32), 'gives 32 patches of 128.*has 16'),
  ],
  ids=['stereo', 'rank1', 'length'],
)
def test_model_rejects_bad_audio(specific, audio, message):
  with pytest.raises(ValueError, match=message):
    specific.module.apply(specific.variables, {'audio': audio}, train=False)


@pytest.mark.parametrize('tower', ['video', 'audio', 'text'])
def test_build_rejects_unknown_size(tower):
  cfg = tiny_config()
  cfg[tower].size = 'huge'
  with pytest.raises(ValueError, match="unknown model size 'huge'") as error:
    build_model(cfg)
  for name in ('tiny', 'small', 'base', 'medium', 'large'):
    assert name in str(error.value)


def test_build_rejects_unknown_shared_size():
  cfg = tiny_config(shared_size='medium')
  cfg.shared_size = 'huge'
  with pytest.raises(ValueError, match="unknown model size 'huge'.*known sizes"):
    build_model(cfg)


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('backbone', 'foo', r"backbone must be one of \('modality_specific', 'modality_agnostic'\)"),
    ('dtype', 'float16', 'dtype must be one of'),
    ('name', 'foo', "name 'foo' is not one of"),
  ],
)
def test_build_rejects_bad_config(field, value, message):
  cfg = tiny_config()
  cfg[field] = value
  with pytest.raises(ValueError, match=message):
    build_model(cfg)
