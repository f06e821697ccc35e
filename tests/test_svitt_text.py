"""SViTT's text + multimodal encoder (vatt_jax/models/svitt_text.py) against float64 numpy
references, written from the definitions, one example at a time:

  embeddings  LN(E[ids] + P[0 … L − 1] + t)
  attention   q, k, v = x·Wq + bq, c·Wk + bk, c·Wv + bv per head; p = softmax(q·kᵀ/√d_head) over
              the keys the mask allows (uniform over all keys when it allows none); out = p·v·Wo + bo
  layer       x = LN(x + SelfAttn(x)); [x = LN(x + CrossAttn(x, video))]; x = LN(x + MLP(x)),
              MLP(x) = gelu_erf(x·W1 + b1)·W2 + b2
  pruning     after the cross-attention of fusion layer `prune_layer`: the video CLS and the
              ceil(r·(N − 1)) patch tokens ranked first, the valid ones by the text CLS query's
              probability averaged over heads (ties to the lower index), then the masked ones by
              index; kept in their original order, the mask with them
  MLM head    LN(gelu_erf(h·W + b))·Eᵀ + bias (E the word-embedding table)
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
from vatt_jax.models.svitt_text import FusionOutput, SvittTextEncoder

TOL = 2e-4
EPS = 1e-12
VOCAB, WIDTH, DEPTH, FUSION, HEADS, MLP, MAX_LEN = 40, 32, 4, 2, 2, 64, 12
BATCH, LENGTH, NUM_VIDEO, VIDEO_DIM = 3, 8, 13, 24  # 1 video CLS + 12 patch tokens of width 24
KEEP = 0.25  # 12 patch tokens → 3


def tiny(**overrides) -> SvittTextEncoder:
  attrs = dict(
    vocab_size=VOCAB,
    width=WIDTH,
    depth=DEPTH,
    num_heads=HEADS,
    mlp_dim=MLP,
    max_length=MAX_LEN,
    fusion_layer=FUSION,
    video_keep_rate=KEEP,
    prune_layer=0,
  )
  attrs.update(overrides)
  return SvittTextEncoder(**attrs)


def inputs(seed=0):
  """ids/mask: example 0 full, example 1 ragged, example 2 empty (no text token at all);
  video_mask: example 0 all valid, example 1 four patch tokens masked, example 2 only two valid
  patch tokens (fewer than the 3 kept)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)
  lengths = np.array([LENGTH, 5, 0])
  mask = (np.arange(LENGTH) < lengths[:, None]).astype(np.int32)
  video = rng.normal(size=(BATCH, NUM_VIDEO, VIDEO_DIM)).astype(np.float32)
  video_mask = np.ones((BATCH, NUM_VIDEO), bool)
  video_mask[1, [2, 5, 6, 11]] = False
  video_mask[2, 1:] = False
  video_mask[2, [4, 9]] = True
  return ids, mask, video, video_mask


@functools.cache
def variables(seed=0):
  ids, mask, video, video_mask = inputs()
  return random_variables(tiny(), ids, mask, video, video_mask, seed=seed)


def f64(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


# ----------------------------------------------------------------------------------------------
# float64 references
# ----------------------------------------------------------------------------------------------


def ref_layernorm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + EPS) * p['scale'] + p['bias']


def ref_gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def ref_attention(x, context, key_mask, p):
  """x [Lq, D], context [Lk, Dc], key_mask [Lk] bool → (out [Lq, D], probs [H, Lq, Lk])."""
  q, k, v = (
    np.einsum('ld,dhk->hlk', t, p[name]['kernel']) + p[name]['bias'][:, None]
    for t, name in ((x, 'query'), (context, 'key'), (context, 'value'))
  )
  logits = np.einsum('hqd,hkd->hqk', q, k) / math.sqrt(q.shape[-1])
  if key_mask.any():
    logits = np.where(key_mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
  else:
    probs = np.full(logits.shape, 1.0 / logits.shape[-1])
  out = np.einsum('hqk,hkd->qhd', probs, v)
  return np.einsum('qhd,hde->qe', out, p['out']['kernel']) + p['out']['bias'], probs


def ref_layer(x, mask, p, video=None, video_mask=None):
  """(x, text-CLS cross-attention probabilities [H, N] or None)."""
  x = ref_layernorm(x + ref_attention(x, x, mask, p['attention'])[0], p['norm_attention'])
  cls = None
  if video is not None:
    y, probs = ref_attention(x, video, video_mask, p['cross_attention'])
    x = ref_layernorm(x + y, p['norm_cross_attention'])
    cls = probs[:, 0]
  m = p['mlp']
  y = ref_gelu(x @ m['fc1']['kernel'] + m['fc1']['bias']) @ m['fc2']['kernel'] + m['fc2']['bias']
  return ref_layernorm(x + y, p['norm_mlp']), cls


def ref_text(p, ids, mask, fusion=FUSION):
  outs = []
  for ids_, mask_ in zip(ids, np.asarray(mask, bool), strict=True):
    x = p['word_embeddings'][ids_] + p['position_embeddings'][: len(ids_)]
    x = ref_layernorm(x + p['token_type_embedding'], p['embedding_norm'])
    for i in range(fusion):
      x, _ = ref_layer(x, mask_, p[f'layer_{i:02d}'])
    outs.append(x)
  return np.stack(outs)


def ref_kept(scores, valid, rate):
  """Kept patch indices (sorted) and the score margin at the cut (inf when the cut is not between
  two valid tokens)."""
  count = math.ceil(fractions.Fraction(str(rate)) * len(scores))
  order = sorted(range(len(scores)), key=lambda i: (not valid[i], -scores[i] if valid[i] else 0, i))
  margin = np.inf
  if count < len(scores) and valid[order[count - 1]] and valid[order[count]]:
    margin = scores[order[count - 1]] - scores[order[count]]
  return sorted(order[:count]), margin


def ref_fusion(p, hidden, mask, video, video_mask, *, rate, prune_layer, fusion=FUSION):
  """(hidden [B, L, D], kept [B, 1 + K] or None, smallest ranking margin)."""
  outs, kepts, margins = [], [], [np.inf]
  for x, mask_, v, vm in zip(hidden, np.asarray(mask, bool), video, video_mask, strict=True):
    kept = None
    for j, i in enumerate(range(fusion, DEPTH)):
      x, cls = ref_layer(x, mask_, p[f'layer_{i:02d}'], v, vm)
      if rate < 1 and j == prune_layer:
        patches, margin = ref_kept(cls.mean(0)[1:], vm[1:], rate)
        margins.append(margin)
        kept = np.array([0] + [k + 1 for k in patches])
        v, vm = v[kept], vm[kept]
    outs.append(x)
    kepts.append(kept)
  kept = None if kepts[0] is None else np.stack(kepts)
  return np.stack(outs), kept, min(margins)


def ref_mlm(p, hidden):
  y = ref_gelu(hidden @ p['mlm_transform']['kernel'] + p['mlm_transform']['bias'])
  return ref_layernorm(y, p['mlm_norm']) @ p['word_embeddings'].T + p['mlm_bias']


# ----------------------------------------------------------------------------------------------
# jitted module functions (one compilation each, shared by the tests)
# ----------------------------------------------------------------------------------------------


@functools.cache
def call_fn(deterministic=True, **overrides):
  model = tiny(**overrides)
  return jax.jit(
    lambda v, *args, rngs=None: model.apply(v, *args, deterministic=deterministic, rngs=rngs)
  )


@functools.cache
def method_fn(method, **overrides):
  model = tiny(**overrides)
  return jax.jit(lambda v, *args: model.apply(v, *args, method=method))


# ----------------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------------


def test_text_fusion_and_mlm_match_reference():
  """Text layers, fusion layers with pruning after the first fusion layer (so the last layer
  attends to the kept tokens only), the tied MLM head; padded and empty texts, masked video."""
  v = variables()
  p = f64(v['params'])
  ids, mask, video, video_mask = inputs()

  text_hidden = method_fn('text')(v, ids, mask)
  want_text = ref_text(p, ids, mask)
  np.testing.assert_allclose(np.asarray(text_hidden), want_text, rtol=TOL, atol=TOL)
  assert np.isfinite(np.asarray(text_hidden)).all()  # the empty text attends uniformly

  fused, logits = call_fn()(v, ids, mask, video, video_mask)
  assert isinstance(fused, FusionOutput)
  want, want_kept, margin = ref_fusion(
    p, want_text, mask, video.astype(np.float64), video_mask, rate=KEEP, prune_layer=0
  )
  assert margin > 1e-3, f'ranking margin {margin} too small for a float32 comparison'
  np.testing.assert_array_equal(np.asarray(fused.video_kept), want_kept)
  assert fused.video_kept.dtype == jnp.int32 and fused.video_kept.shape == (BATCH, 1 + 3)
  np.testing.assert_allclose(np.asarray(fused.hidden), want, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(np.asarray(logits), ref_mlm(p, want), rtol=TOL, atol=5 * TOL)
  assert logits.dtype == jnp.float32 and logits.shape == (BATCH, LENGTH, VOCAB)

  # Example 2 has 2 valid patch tokens (4, 9) for 3 places: both, then the first masked one.
  np.testing.assert_array_equal(np.asarray(fused.video_kept)[2], [0, 1, 4, 9])
  # Example 1: no masked token is kept while valid ones remain.
  assert video_mask[1][np.asarray(fused.video_kept)[1]].all()

  # The last layer saw the kept tokens only: without pruning the output is different.
  unpruned, _, _ = ref_fusion(
    p, want_text, mask, video.astype(np.float64), video_mask, rate=1.0, prune_layer=0
  )
  assert np.abs(unpruned - want).max() > 100 * TOL

  # Masked video tokens get no attention and are not ranked by their content: changing them
  # changes nothing.
  changed = np.where(video_mask[..., None], video, 100.0 * np.sign(video) + 7.0)
  fused2, logits2 = call_fn()(v, ids, mask, changed.astype(np.float32), video_mask)
  np.testing.assert_array_equal(np.asarray(fused2.video_kept), np.asarray(fused.video_kept))
  np.testing.assert_allclose(np.asarray(fused2.hidden), np.asarray(fused.hidden), atol=1e-5)
  # … whereas changing valid ones does.
  fused3, _ = call_fn()(v, ids, mask, video + 1.0, video_mask)
  assert np.abs(np.asarray(fused3.hidden) - np.asarray(fused.hidden)).max() > 1e-3


def test_masked_video_tokens_never_outrank_valid_ones():
  """A valid token whose probability underflows to 0 still ranks ahead of every masked token
  (whose probability is 0 too): example 2 has exactly 3 valid patch tokens, one of them pointed
  away from the text CLS query's keys so hard that its probability is 0 in float32."""
  v = variables()
  p = f64(v['params'])
  ids, mask, video, video_mask = inputs()
  video_mask[2] = False
  video_mask[2, [0, 4, 9, 12]] = True
  # The text CLS query of the first fusion layer's cross-attention, per head, and the direction
  # of video space that lowers its logit in every head.
  x = ref_text(p, ids[2:], mask[2:])[0]
  layer = p[f'layer_{FUSION:02d}']
  x = ref_layernorm(
    x + ref_attention(x, x, mask[2] > 0, layer['attention'])[0], layer['norm_attention']
  )
  cross = layer['cross_attention']
  q = np.einsum('d,dhk->hk', x[0], cross['query']['kernel']) + cross['query']['bias']
  g = np.einsum('ehk,hk->he', cross['key']['kernel'], q)  # [H, Dv]: d logit_h / d token
  u = -(g / np.linalg.norm(g, axis=1, keepdims=True)).sum(0)
  slopes = g @ u
  assert (slopes < 0).all(), slopes
  video[2, 12] = u * (2e3 * math.sqrt(WIDTH // HEADS) / -slopes.max())  # logits ≤ −2000 + O(1)
  _, probs = ref_attention(x, video[2].astype(np.float64), video_mask[2], cross)
  assert probs[:, 0, 12].max() < 1e-300

  fused, _ = call_fn()(v, ids, mask, video, video_mask)
  np.testing.assert_array_equal(np.asarray(fused.video_kept)[2], [0, 4, 9, 12])
  _, want_kept, _ = ref_fusion(
    p, ref_text(p, ids, mask), mask, f64(video), video_mask, rate=KEEP, prune_layer=0
  )
  np.testing.assert_array_equal(np.asarray(fused.video_kept), want_kept)


def test_prune_layer_counts_fusion_layers_and_no_pruning():
  """prune_layer=1 prunes after the second fusion layer (here the last: indices reported, the
  hidden states unchanged); keep rate 1.0 or prune_layer −1 prune nothing (video_kept None)."""
  v = variables()
  p = f64(v['params'])
  ids, mask, video, _ = inputs(seed=1)
  hidden = method_fn('text')(v, ids, mask)
  ones = np.ones((BATCH, NUM_VIDEO), bool)
  want, _, _ = ref_fusion(p, f64(hidden), mask, f64(video), ones, rate=1.0, prune_layer=-1)

  last = method_fn('fusion', prune_layer=1)(v, hidden, mask, video)
  _, want_kept, margin = ref_fusion(
    p, f64(hidden), mask, f64(video), ones, rate=KEEP, prune_layer=1
  )
  assert margin > 1e-3
  np.testing.assert_array_equal(np.asarray(last.video_kept), want_kept)
  np.testing.assert_allclose(np.asarray(last.hidden), want, rtol=TOL, atol=TOL)

  for overrides in (dict(video_keep_rate=1.0), dict(prune_layer=-1)):
    out = method_fn('fusion', **overrides)(v, hidden, mask, video)
    assert out.video_kept is None, overrides
    np.testing.assert_allclose(np.asarray(out.hidden), want, rtol=TOL, atol=TOL)


def test_mlm_decoder_is_tied_to_word_embeddings():
  v = variables()
  flat = traverse_util.flatten_dict(v['params'])
  vocab_sized = sorted('/'.join(k) for k, a in flat.items() if VOCAB in a.shape)
  assert vocab_sized == ['mlm_bias', 'word_embeddings']  # no decoder kernel of its own
  hidden = np.random.default_rng(2).normal(size=(2, 5, WIDTH)).astype(np.float32)
  fn = method_fn('mlm_logits')
  before = fn(v, hidden)
  params = dict(v['params'])
  params['word_embeddings'] = params['word_embeddings'] + jnp.asarray(
    np.random.default_rng(3).normal(size=(VOCAB, WIDTH)), jnp.float32
  )
  after = fn({'params': params}, hidden)
  np.testing.assert_allclose(np.asarray(after), ref_mlm(f64(params), f64(hidden)), atol=5 * TOL)
  assert np.abs(np.asarray(after) - np.asarray(before)).max() > 0.1


# ----------------------------------------------------------------------------------------------
# dropout, init, sharing, errors
# ----------------------------------------------------------------------------------------------


def test_dropout_only_when_not_deterministic():
  v = variables()
  ids, mask, video, video_mask = inputs()
  args = (v, ids, mask, video, video_mask)
  rngs = lambda seed: {'dropout': jax.random.key(seed)}  # noqa: E731
  det = call_fn()(*args)
  det_rng = call_fn()(*args, rngs=rngs(5))
  np.testing.assert_array_equal(np.asarray(det[1]), np.asarray(det_rng[1]))
  train = call_fn(deterministic=False)
  a, b, a2 = train(*args, rngs=rngs(0)), train(*args, rngs=rngs(1)), train(*args, rngs=rngs(0))
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(a2[1]))  # same key, same draw
  assert np.abs(np.asarray(a[1]) - np.asarray(b[1])).max() > 1e-3
  assert np.abs(np.asarray(a[1]) - np.asarray(det[1])).max() > 1e-3


@pytest.mark.slow
def test_attention_dropout_alone_is_active():
  v = variables()
  ids, mask, video, video_mask = inputs()
  fn = call_fn(deterministic=False, dropout_rate=0.0, attention_dropout_rate=0.5)
  a = fn(v, ids, mask, video, video_mask, rngs={'dropout': jax.random.key(0)})
  b = fn(v, ids, mask, video, video_mask, rngs={'dropout': jax.random.key(1)})
  assert np.abs(np.asarray(a[0].hidden) - np.asarray(b[0].hidden)).max() > 1e-3


def test_init_values_and_logical_axes():
  ids, mask, video, video_mask = inputs()
  boxed = tiny().init(jax.random.key(0), ids, mask, video, video_mask)['params']
  flat = traverse_util.flatten_dict(boxed)
  names = {'/'.join(k): box.names for k, box in flat.items()}
  assert names['word_embeddings'] == ('vocab', 'embed')
  assert names['position_embeddings'] == ('positions', 'embed')
  assert names['mlm_bias'] == ('vocab',)
  assert names['layer_02/cross_attention/key/kernel'] == ('embed', 'heads', 'kv')
  assert names['layer_00/attention/out/kernel'] == ('heads', 'kv', 'embed')
  assert names['layer_03/mlp/fc1/kernel'] == ('embed', 'mlp')
  assert all(box.names is not None for box in flat.values())
  values = {k: np.asarray(box.unbox()) for k, box in zip(names, flat.values(), strict=True)}
  # Only the fusion layers have cross-attention, mapping the video's width to the text's.
  assert values['layer_02/cross_attention/key/kernel'].shape == (VIDEO_DIM, HEADS, WIDTH // HEADS)
  assert not any(k.startswith(('layer_00/cross', 'layer_01/cross')) for k in values)
  for key, value in values.items():
    leaf = key.rsplit('/', 1)[-1]
    if leaf == 'bias' or key == 'mlm_bias':
      assert not value.any(), key
    elif leaf == 'scale':
      np.testing.assert_array_equal(value, 1.0)
    else:  # kernels and embedding tables: truncated normal, std 0.02 before truncation at 2σ
      assert np.abs(value).max() <= 0.04 + 1e-6, key
  std = np.std(values['word_embeddings'])
  assert 0.014 < std < 0.021, std


def test_parent_shares_parameters_across_methods():
  """A parent calling text / fusion / mlm_logits separately owns exactly the encoder's params."""

  class Parent(nn.Module):
    encoder: SvittTextEncoder

    def __call__(self, ids, mask, video):
      hidden = self.encoder.text(ids, mask)
      contrastive = hidden[:, 0]
      fused = self.encoder.fusion(hidden, mask, video)
      return contrastive, self.encoder.mlm_logits(fused.hidden)

  ids, mask, video, video_mask = inputs()
  shapes = lambda t: jax.tree_util.tree_map(jnp.shape, nn.meta.unbox(t))  # noqa: E731
  own = jax.eval_shape(lambda: tiny().init(jax.random.key(0), ids, mask, video))
  parent = jax.eval_shape(lambda: Parent(tiny()).init(jax.random.key(0), ids, mask, video))
  assert shapes(parent['params']) == {'encoder': shapes(own['params'])}


@pytest.mark.parametrize(
  'overrides, message',
  [
    (dict(fusion_layer=5), 'fusion_layer'),
    (dict(prune_layer=2), 'prune_layer'),
    (dict(prune_layer=-2), 'prune_layer'),
    (dict(fusion_layer=4), 'prune_layer'),  # no fusion layer to prune in
    (dict(video_keep_rate=0.0), 'video_keep_rate'),
    (dict(video_keep_rate=1.5), 'video_keep_rate'),
    (dict(num_heads=3), 'num_heads'),
    (dict(remat='some'), 'remat'),
    (dict(num_video_global=-1), 'num_video_global'),
    (dict(max_length=LENGTH - 1), 'max_length'),
  ],
)
def test_bad_config(overrides, message):
  ids, mask, video, video_mask = inputs()
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda: tiny(**overrides).init(jax.random.key(0), ids, mask, video, video_mask))


def test_bad_inputs():
  ids, mask, video, video_mask = inputs()
  model = tiny()

  def init(*args):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *args))

  with pytest.raises(ValueError, match='text mask'):
    init(ids, mask[:, :-1], video, video_mask)
  with pytest.raises(ValueError, match='video_mask'):
    init(ids, mask, video, video_mask[:, :-1])
  with pytest.raises(ValueError, match='video must be'):
    init(ids, mask, video[0], video_mask)
  with pytest.raises(ValueError, match='num_video_global'):
    jax.eval_shape(
      lambda: tiny(num_video_global=NUM_VIDEO + 1).init(jax.random.key(0), ids, mask, video)
    )
  with pytest.raises(ValueError, match='hidden must be'):
    jax.eval_shape(
      lambda: model.apply(variables(), np.zeros((BATCH, LENGTH, 7)), mask, video, method='fusion')
    )


# ----------------------------------------------------------------------------------------------
# remat and dtype
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_remat_and_bfloat16():
  """remat changes neither parameters, outputs nor gradients; bfloat16 matmuls stay close and
  return float32."""
  v = variables()
  ids, mask, video, video_mask = inputs()

  def loss(model):
    def fn(params):
      fused, logits = model.apply({'params': params}, ids, mask, video, video_mask)
      return jnp.sum(logits * jnp.cos(jnp.arange(VOCAB))) + jnp.sum(fused.hidden**2)

    return jax.jit(jax.value_and_grad(fn))

  base_value, base_grad = loss(tiny())(v['params'])
  value, grad = loss(tiny(remat='full'))(v['params'])
  np.testing.assert_allclose(value, base_value, rtol=1e-5)
  for path, g in traverse_util.flatten_dict(grad).items():
    want = traverse_util.flatten_dict(base_grad)[path]
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4, err_msg='/'.join(path))
  # The text layers (no pruning whose ranking could flip between precisions).
  low = method_fn('text', dtype=jnp.bfloat16)(v, ids, mask)
  assert low.dtype == jnp.float32
  high = method_fn('text')(v, ids, mask)
  np.testing.assert_allclose(np.asarray(low), np.asarray(high), atol=0.1)
  fused, logits = jax.eval_shape(call_fn(dtype=jnp.bfloat16), v, ids, mask, video, video_mask)
  assert fused.hidden.dtype == jnp.float32 and logits.dtype == jnp.float32
