"""All-in-one (vatt_jax/models/allinone.py, vatt_jax/losses/allinone.py): temporal token rolling,
the whole forward pass against a float64 numpy reference written from the module docstrings, the
structure of the joint pass, parameter counts, the objective and its config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import erf

from tests.conftest import ROOT, load_config
from vatt_jax import losses
from vatt_jax.losses.allinone import allinone_loss, reference_negatives
from vatt_jax.losses.matching import IGNORE, matching_loss
from vatt_jax.models import build_model, contract
from vatt_jax.models.temporal_roll import temporal_roll

# ------------------------------------------------------------------------------------------------
# Temporal token rolling
# ------------------------------------------------------------------------------------------------


def np_temporal_roll(x: np.ndarray, num_frames: int, n_div: int) -> np.ndarray:
  """float64 reference, token by token: in frame t, tokens 1 … fold are frame t−1's and the last
  fold tokens frame t+1's (circular in time); x [B·T, l, c]."""
  rows, length, _ = x.shape
  fold = length // n_div
  clips = x.reshape(rows // num_frames, num_frames, *x.shape[1:])
  out = clips.copy()
  for t in range(num_frames):
    for k in range(1, fold + 1):
      out[:, t, k] = clips[:, (t - 1) % num_frames, k]
    for k in range(length - fold, length):
      out[:, t, k] = clips[:, (t + 1) % num_frames, k]
  return out.reshape(x.shape)


def test_temporal_roll_the_issues_example():
  """T = 3 frames of 17 tokens (fold 2), token value 100·frame + index, two clips."""
  frames, length, channels = 3, 17, 2
  value = 100 * np.arange(frames)[:, None] + np.arange(length)[None, :]  # [T, l]
  clips = np.stack([value, value + 1000])  # clip 1 offset by 1000: clips never mix
  x = np.broadcast_to(clips[..., None], (2, frames, length, channels)).astype(np.float32)
  out = np.asarray(temporal_roll(jnp.asarray(x.reshape(6, length, channels)), frames))
  out = out.reshape(2, frames, length, channels)
  middle = list(range(3, 15))
  want = np.array(
    [
      [0, 201, 202, *middle, 115, 116],
      [100, 1, 2, *(100 + i for i in middle), 215, 216],
      [200, 101, 102, *(200 + i for i in middle), 15, 16],
    ]
  )
  for clip, offset in ((0, 0), (1, 1000)):
    for channel in range(channels):
      np.testing.assert_array_equal(out[clip, :, :, channel], want + offset)
  # The CLS (token 0) and the middle tokens stay where they are.
  np.testing.assert_array_equal(out[:, :, 0], x[:, :, 0])
  np.testing.assert_array_equal(out[:, :, 3:15], x[:, :, 3:15])


@pytest.mark.parametrize(
  'batch,frames,length,n_div',
  [
    (2, 3, 17, 8),
    (1, 4, 9, 8),
    (3, 2, 6, 8),
    (2, 3, 5, 8),
    (2, 1, 17, 8),
    (2, 3, 13, 4),
    (1, 5, 10, 3),
  ],
)
def test_temporal_roll_matches_the_reference(batch, frames, length, n_div):
  rng = np.random.default_rng(length * 10 + n_div)
  x = rng.normal(size=(batch * frames, length, 3))
  got = np.asarray(temporal_roll(jnp.asarray(x, jnp.float32), frames, n_div))
  want = np_temporal_roll(x, frames, n_div)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  if length // n_div == 0 or frames == 1:  # no token to roll, or no other frame
    np.testing.assert_array_equal(got, x.astype(np.float32))
  # T rolls bring every token back.
  y = jnp.asarray(x, jnp.float32)
  for _ in range(frames):
    y = temporal_roll(y, frames, n_div)
  np.testing.assert_array_equal(np.asarray(y), x.astype(np.float32))


def test_temporal_roll_refuses_rows_not_a_multiple_of_the_frames():
  with pytest.raises(ValueError, match='not a multiple of 3 frames'):
    temporal_roll(jnp.zeros((4, 17, 2)), 3)


@pytest.mark.parametrize('length,n_div', [(4, 2), (10, 2), (5, 1)])
def test_temporal_roll_keeps_the_token_count_or_refuses(length, n_div):
  x = jnp.zeros((3, length, 2))
  # The two rolled slices would overlap (2·fold + 1 > l): refused, naming n_div.
  with pytest.raises(ValueError, match='n_div'):
    temporal_roll(x, 3, n_div)


# ------------------------------------------------------------------------------------------------
# A float64 numpy reference of the whole model
# ------------------------------------------------------------------------------------------------

VOCAB, WORDS = 20, 5


def _tiny_config(temporal='roll', mlm_tied=True, pair_score='match_logit', num_frames=3):
  """2 blocks of width 16 (2 heads) over 3 frames of 8×32 in 4×4 patches: 17 tokens per frame
  (fold 2), 5 caption ids (7 text tokens)."""
  config = load_config(ROOT / 'configs' / 'allinone_demo.py', 'runlocal')
  m = config.model
  m.num_layers, m.width, m.mlp_dim, m.num_heads = 2, 16, 32, 2
  # Its own video section: the config's frame_size is an int shared with config.data.
  m.video = ml_collections.ConfigDict(dict(num_frames=num_frames, frame_size=(8, 32), patch_size=4))
  m.text.vocab_size, m.text.max_words = VOCAB, WORDS
  m.embed_dim = 8
  m.dropout_rate = m.attention_dropout_rate = m.drop_path_rate = 0.0
  m.temporal, m.mlm_tied, m.pair_score = temporal, mlm_tied, pair_score
  return config


def _random_params(model, seed: int) -> dict:
  """Every parameter random (no zero bias, no unit LayerNorm scale), from the abstract shapes."""
  rng = np.random.default_rng(seed)
  shapes = contract.abstract_variables(model)['params']

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      fan_in = leaf.shape[0] if "['out']" not in name else int(np.prod(leaf.shape[:-1]))
      value = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
    elif name.endswith("['scale']"):
      value = 1.0 + 0.3 * rng.normal(size=leaf.shape)
    else:
      value = 0.3 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _inputs(model, batch: int, seed: int):
  """Random video in [−1, 1] and right-padded ids: full, 2 tokens, 1 token, …"""
  rng = np.random.default_rng(seed)
  frames, height, width = model.module.num_frames, *model.module.image_size
  video = rng.uniform(-1, 1, (batch, frames, height, width, 3)).astype(np.float32)
  lengths = [WORDS, 2, 1, 3][:batch]
  ids = np.zeros((batch, WORDS), np.int32)
  for row, n in enumerate(lengths):
    ids[row, :n] = rng.integers(1, VOCAB, n)
  return video, ids


def _everything(module, video, ids):
  """Every output of the model on (video, ids), evaluation mode."""
  text_out, pooled = module.joint(video, ids)
  text_rep, video_rep = module.text_only(ids), module.video_only(video)
  return {
    'text_out': text_out,
    'pooled': pooled,
    'vtm': module.vtm_logits(pooled),
    'mlm': module.mlm_logits(text_out),
    'text_only': text_rep,
    'video_only': video_rep,
    'text_vt': module.project_text(text_rep),
    'video_vt': module.project_video(video_rep),
    'score': module.score_pairs(video, ids),
  }


def _run(model, params, video, ids):
  fn = jax.jit(lambda p, v, t: model.module.apply({'params': p}, v, t, method=_everything))
  return {k: np.asarray(v, np.float64) for k, v in fn(params, video, ids).items()}


def np_layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def np_gelu(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def np_dense(x, p):
  return x @ p['kernel'] + p['bias']


def np_block(x, p, mask):
  """Pre-LN block (LayerNorm ε 1e-6): x + Attn(LN(x)), then x + MLP(LN(x)); x [S, n, D], mask
  [S, n] (False: never attended to)."""
  y = np_layer_norm(x, p['norm_attention'], 1e-6)
  a = p['attention']
  q, k, v = (
    np.einsum('snd,dhk->snhk', y, a[n]['kernel']) + a[n]['bias'] for n in ('query', 'key', 'value')
  )
  logits = np.einsum('sqhk,slhk->shql', q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[:, None, None, :], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  heads = np.einsum('shql,slhk->sqhk', probs, v)
  x = x + np.einsum('sqhk,hkd->sqd', heads, a['out']['kernel']) + a['out']['bias']
  y = np_layer_norm(x, p['norm_mlp'], 1e-6)
  return x + np_dense(np_gelu(np_dense(y, p['mlp']['fc1'])), p['mlp']['fc2'])


def np_encode(p, x, mask=None, roll_from=None, num_frames=1, n_div=8):
  """Every block (before each, with roll_from, the tokens from that position on rolled in time),
  then the final LayerNorm (ε 1e-6)."""
  mask = np.ones(x.shape[:2], bool) if mask is None else mask.astype(bool)
  for i in range(sum(name.startswith('block_') for name in p)):
    if roll_from is not None:
      x = x.copy()
      x[:, roll_from:] = np_temporal_roll(x[:, roll_from:], num_frames, n_div)
    x = np_block(x, p[f'block_{i:02d}'], mask)
  return np_layer_norm(x, p['final_norm'], 1e-6)


def np_text_embed(p, ids):
  """[CLS] = V, the ids up to the first padding, [SEP] = V + 1, padding; word + position →
  LayerNorm (ε 1e-12) → + token type 0. Returns tokens [B, W + 2, D], mask [B, W + 2]."""
  batch, width = ids.shape
  full = np.zeros((batch, width + 2), np.int64)
  mask = np.zeros((batch, width + 2), bool)
  for row in range(batch):
    n = int(np.argmin(np.append(ids[row] > 0, False)))  # leading real ids
    full[row, : n + 2] = [VOCAB, *ids[row, :n], VOCAB + 1]
    mask[row, : n + 2] = True
  x = p['word_embeddings'][full] + p['text_positions'][None]
  return np_layer_norm(x, p['text_norm'], 1e-12) + p['token_type'][0], mask


def np_frame_embed(p, video, patch, temporal):
  """Per frame: p×p patches in raster order, each flattened (row, column, channel) → dense;
  [CLS; patches] + positions (+ temporal position with 'flatten') + token type 1 →
  [B, T, 1 + N, D]."""
  batch, frames, height, width, _ = video.shape
  patches = [
    video[:, :, i : i + patch, j : j + patch, :].reshape(batch, frames, -1)
    for i in range(0, height, patch)
    for j in range(0, width, patch)
  ]
  x = np_dense(np.stack(patches, 2), p['patch_embed'])
  cls = np.broadcast_to(p['frame_cls'], (batch, frames, 1, x.shape[-1]))
  x = np.concatenate([cls, x], 2) + p['frame_positions']
  if temporal == 'flatten':
    x = x + p['temporal_positions'][None, :, None]
  return x + p['token_type'][1]


def np_allinone(p, video, ids, *, temporal, patch, tied, pair_score):
  """The whole model (allinone.py's docstring) in float64 numpy."""
  text, text_mask = np_text_embed(p, ids)
  frames = np_frame_embed(p, video, patch, temporal)
  batch, num_frames, tokens, width = frames.shape
  length = text.shape[1]
  if temporal == 'flatten':
    x = np.concatenate([text, frames.reshape(batch, -1, width)], 1)
    mask = np.concatenate([text_mask, np.ones((batch, num_frames * tokens), bool)], 1)
    joint = np_encode(p, x, mask)
  else:
    # One sequence per (example, frame), frame-major within an example: row b·T + t.
    x = np.stack([np.concatenate([text, frames[:, t]], 1) for t in range(num_frames)], 1)
    mask = np.concatenate([text_mask, np.ones((batch, tokens), bool)], 1)
    mask = np.repeat(mask, num_frames, 0)
    roll_from = length if temporal == 'roll' else None
    joint = np_encode(p, x.reshape(batch * num_frames, -1, width), mask, roll_from, num_frames)
    joint = joint.reshape(batch, num_frames, -1, width).mean(1)
  text_out = joint[:, :length]
  pooled = np.tanh(np_dense(text_out[:, 0], p['pooler']))
  vtm = np_dense(pooled, p['vtm_head'])
  hidden = np_layer_norm(np_gelu(np_dense(text_out, p['mlm_transform'])), p['mlm_norm'], 1e-12)
  decoder = p['word_embeddings'].T if tied else p['mlm_decoder']['kernel']
  mlm = hidden @ decoder + p['mlm_bias']
  text_rep = np_encode(p, text, text_mask)[:, 0]
  if temporal == 'flatten':
    video_out = np_encode(p, frames.reshape(batch, -1, width)).reshape(frames.shape)
  else:
    video_out = np_encode(p, frames.reshape(-1, tokens, width)).reshape(frames.shape)
  video_rep = video_out[:, :, 0].mean(1)
  score = vtm[:, 1] - vtm[:, 0] if pair_score == 'log_odds' else vtm[:, 1]
  return {
    'text_out': text_out,
    'pooled': pooled,
    'vtm': vtm,
    'mlm': mlm,
    'text_only': text_rep,
    'video_only': video_rep,
    'text_vt': np_dense(text_rep, p['text_proj']),
    'video_vt': np_dense(video_rep, p['video_proj']),
    'score': score,
  }


VARIANTS = {
  'roll': dict(temporal='roll'),
  'none': dict(temporal='none'),
  'flatten': dict(temporal='flatten'),
  'roll_untied_log_odds': dict(temporal='roll', mlm_tied=False, pair_score='log_odds'),
}


@pytest.fixture(scope='module')
def forward():
  """variant → (model, params, video, ids, outputs), computed once per variant. Every variant has
  the same parameters where their trees agree ('roll' and 'none' identical)."""
  cache = {}

  def get(variant):
    if variant not in cache:
      model = build_model(_tiny_config(**VARIANTS[variant]).model)
      params = _random_params(model, 0)
      if variant == 'flatten':  # the shared parameters from the 'roll' draw, plus its own
        shared = _random_params(build_model(_tiny_config().model), 0)
        params = {**shared, 'temporal_positions': params['temporal_positions']}
      video, ids = _inputs(model, 3, 1)
      cache[variant] = (model, params, video, ids, _run(model, params, video, ids))
    return cache[variant]

  return get


# 'roll' runs in the fast tier; the other variants (a compilation each) in the full suite.
@pytest.mark.parametrize(
  'variant', [pytest.param(v, marks=() if v == 'roll' else pytest.mark.slow) for v in VARIANTS]
)
def test_forward_matches_the_float64_reference(forward, variant):
  model, params, video, ids, got = forward(variant)
  assert ids[:, 0].all() and not ids[1:, 2:].any()  # padded rows, one of a single token
  options = VARIANTS[variant]
  want = np_allinone(
    jax.tree.map(lambda a: np.asarray(a, np.float64), params),
    video.astype(np.float64),
    ids,
    temporal=options['temporal'],
    patch=model.module.patch_size,
    tied=options.get('mlm_tied', True),
    pair_score=options.get('pair_score', 'match_logit'),
  )
  assert set(got) == set(want)
  for name in want:
    assert got[name].shape == want[name].shape, name
    scale = np.abs(want[name]).max()
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4 * scale, err_msg=name)


# ------------------------------------------------------------------------------------------------
# Structure of the joint and unimodal passes
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unimodal_passes_never_roll(forward):
  *_, rolled = forward('roll')
  *_, plain = forward('none')
  for name in ('text_only', 'video_only', 'text_vt', 'video_vt'):
    np.testing.assert_allclose(rolled[name], plain[name], rtol=1e-6, atol=1e-6, err_msg=name)
  # The joint pass does roll: the two models disagree there.
  assert np.abs(rolled['text_out'] - plain['text_out']).max() > 1e-3


@pytest.mark.slow
def test_time_average_joint_is_the_mean_of_one_frame_passes(forward):
  """temporal='none': each frame's sequence goes through the transformer alone, so the joint
  text output is the mean of a 1-frame model's over the frames (same parameters)."""
  _, params, video, ids, plain = forward('none')
  single = build_model(_tiny_config('none', num_frames=1).model)
  per_frame = [_run(single, params, video[:, t : t + 1], ids) for t in range(video.shape[1])]
  mean = np.mean([out['text_out'] for out in per_frame], axis=0)
  np.testing.assert_allclose(plain['text_out'], mean, rtol=1e-5, atol=1e-5)


def _per_frame(module, video, ids):
  """The joint sequences [B·T, L + 1 + N, D] after the transformer, with and without rolling."""
  text, text_mask = module.embed_text(ids)
  frames = module.embed_frames(video)
  batch, num_frames, tokens, width = frames.shape
  x = jnp.concatenate(
    [jnp.repeat(text, num_frames, 0), frames.reshape(batch * num_frames, tokens, width)], 1
  )
  mask = jnp.concatenate(
    [jnp.repeat(text_mask, num_frames, 0), jnp.ones((batch * num_frames, tokens), jnp.int32)], 1
  )
  shape = (batch, num_frames, *x.shape[1:])
  rolled = module.encode(x, mask, roll_from=text.shape[1]).reshape(shape)
  return rolled, module.encode(x, mask).reshape(shape)


@pytest.mark.slow
def test_rolling_mixes_frames_and_time_average_does_not(forward):
  """Changing frame 1 changes frames 0 and 2's joint outputs under rolling, not without it."""
  model, params, video, ids, rolled_out = forward('roll')
  changed = video.copy()
  changed[:, 1] = np.random.default_rng(5).uniform(-1, 1, changed[:, 1].shape)
  fn = jax.jit(lambda p, v, t: model.module.apply({'params': p}, v, t, method=_per_frame))
  rolled, plain = (
    np.asarray(a) for a in fn(params, np.concatenate([video, changed]), np.tile(ids, (2, 1)))
  )
  b = video.shape[0]
  # The wrapper is the model's joint pass before the average over frames.
  length = ids.shape[1] + 2
  joint = rolled[:b].mean(1)[:, :length]
  np.testing.assert_allclose(joint, rolled_out['text_out'], rtol=1e-5, atol=1e-5)
  for t in (0, 2):
    np.testing.assert_array_equal(plain[:b, t], plain[b:, t])
    assert np.abs(rolled[:b, t] - rolled[b:, t]).max() > 1e-3, t
    assert np.abs(rolled[:b, t, :length] - rolled[b:, t, :length]).max() > 1e-3, t  # text too
  assert np.abs(plain[:b, 1] - plain[b:, 1]).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Parameter counts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('variant,millions', [('', 110), ('tiny', 12), ('small', 33)])
def test_parameter_counts_match_the_papers(variant, millions):
  config = load_config(ROOT / 'configs' / 'allinone_base.py', variant or None)
  config.model.text.vocab_size = 30519  # BERT's 30522-row word table with the 3 specials
  model = build_model(config.model)
  params = contract.abstract_variables(model)['params']
  assert params['word_embeddings'].shape[0] == 30522
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
  assert abs(count - millions * 1e6) <= 0.05 * millions * 1e6, count


# ------------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('num', [1, 2, 5, 8])
def test_reference_negatives_label_half_and_draw_other_valid_videos(num):
  draw = jax.jit(jax.vmap(reference_negatives, in_axes=(0, None)))
  keys = jax.random.split(jax.random.key(num), 300)
  masks = [np.ones(num, bool)]
  if num > 2:
    masks.append(np.arange(num) % 3 != 1)  # some invalid samples
  for valid in masks:
    index, labels, weights = (np.asarray(a) for a in draw(keys, jnp.asarray(valid)))
    assert labels.dtype == np.int32 and index.dtype == np.int32 and weights.dtype == np.float32
    np.testing.assert_array_equal(labels.sum(1), num // 2)
    rows = np.arange(num)[None].repeat(len(keys), 0)
    own = labels == 1
    np.testing.assert_array_equal(index[own], rows[own])
    others = valid.sum() - valid  # valid candidates j ≠ i of each row
    want_weights = valid[None] & (own | (others[None] > 0))
    np.testing.assert_array_equal(weights, want_weights.astype(np.float32))
    counted_negative = ~own & (weights > 0)
    assert (index[counted_negative] != rows[counted_negative]).all()
    assert valid[index[counted_negative]].all()  # never an invalid video
    # Every row is labelled 1 about ⌊M/2⌋/M of the time (a random half, not a fixed one).
    if num > 1:
      np.testing.assert_allclose(own.mean(0), (num // 2) / num, atol=0.12)


def test_reference_negatives_draw_uniformly_among_other_valid_videos():
  valid = np.array([1, 1, 0, 1, 1], bool)
  keys = jax.random.split(jax.random.key(3), 3000)
  index, labels, _ = jax.jit(jax.vmap(reference_negatives, in_axes=(0, None)))(keys, valid)
  picked = np.asarray(index)[np.asarray(labels)[:, 0] == 0, 0]  # row 0's negatives
  counts = np.bincount(picked, minlength=5)
  assert counts[0] == counts[2] == 0
  expected = len(picked) / 3
  assert (np.abs(counts[[1, 3, 4]] - expected) < 0.15 * expected).all(), counts


def test_one_valid_sample_counts_no_negative():
  valid = jnp.array([False, True, False])
  for seed in range(6):
    _, labels, weights = reference_negatives(jax.random.key(seed), valid)
    labels, weights = np.asarray(labels), np.asarray(weights)
    assert weights[0] == weights[2] == 0
    assert weights[1] == (labels[1] == 1)


def np_cross_entropy(logits, labels):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


def test_matching_loss_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(7, 2)).astype(np.float32) * 3
  labels = rng.integers(0, 2, 7).astype(np.int32)
  weights = np.array([1, 0, 1, 1, 0, 1, 1], np.float32)
  loss, terms = matching_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  nll = np_cross_entropy(logits, labels)
  np.testing.assert_allclose(loss, (nll * weights).sum() / weights.sum(), rtol=1e-6)
  right = (logits.argmax(1) == labels) * weights
  np.testing.assert_allclose(terms['vtm_accuracy'], right.sum() / weights.sum(), rtol=1e-6)
  assert float(terms['vtm_pairs']) == weights.sum()
  loss, terms = matching_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.zeros(7))
  assert float(loss) == float(terms['vtm_accuracy']) == float(terms['vtm_pairs']) == 0.0
  with pytest.raises(ValueError, match='logits'):
    matching_loss(jnp.zeros((7, 3)), jnp.asarray(labels), jnp.asarray(weights))


def np_infonce(text, video, temperature, valid):
  """−mean log p(t→v) − mean log p(v→t) over valid anchors, valid columns only."""
  t = text / np.linalg.norm(text, axis=1, keepdims=True)
  v = video / np.linalg.norm(video, axis=1, keepdims=True)
  logits = (t @ v.T / temperature)[np.ix_(valid, valid)]
  diagonal = np.arange(valid.sum())
  return np_cross_entropy(logits, diagonal).mean() + np_cross_entropy(logits.T, diagonal).mean()


def _loss_inputs(seed=0):
  rng = np.random.default_rng(seed)
  m, p, w, v, e = 4, 6, 5, 11, 8
  valid = np.array([True, True, False, True])
  mlm_labels = np.where(rng.random((m, w)) < 0.4, rng.integers(1, v, (m, w)), IGNORE)
  mlm_labels[2] = IGNORE
  mlm_labels[0, 0] = 3  # at least one target
  out = {
    'vtm_logits': rng.normal(size=(p, 2)),
    'vtm_labels': rng.integers(0, 2, p),
    'vtm_weights': np.array([1, 1, 0, 1, 0, 1.0]),
    'mlm_logits': rng.normal(size=(m, w, v)) * 2,
    'mlm_labels': mlm_labels,
    'text_vt': rng.normal(size=(m, e)),
    'video_vt': rng.normal(size=(m, e)),
  }
  return out, {'valid': valid}


def test_allinone_loss_is_the_weighted_sum_of_its_terms():
  out, batch = _loss_inputs()
  cast = {
    k: jnp.asarray(x, jnp.int32 if k.endswith('labels') else jnp.float32) for k, x in out.items()
  }
  weights = dict(vtm_weight=0.3, mlm_weight=0.5, itc_weight=2.0)
  valid = {'valid': jnp.asarray(batch['valid'])}
  loss, terms = allinone_loss(cast, valid, temperature=0.1, **weights)
  nll = np_cross_entropy(out['vtm_logits'], out['vtm_labels'])
  vtm = (nll * out['vtm_weights']).sum() / out['vtm_weights'].sum()
  chosen = out['mlm_labels'] != IGNORE
  mlm = np_cross_entropy(out['mlm_logits'], np.where(chosen, out['mlm_labels'], 0))[chosen].mean()
  itc = np_infonce(out['text_vt'], out['video_vt'], 0.1, batch['valid'])
  got = [terms['loss_vtm'], terms['loss_mlm'], terms['loss_itc']]
  np.testing.assert_allclose(got, [vtm, mlm, itc], rtol=1e-5)
  np.testing.assert_allclose(loss, 0.3 * vtm + 0.5 * mlm + 2.0 * itc, rtol=1e-5)
  # Without the contrastive term its inputs are not needed.
  del cast['text_vt'], cast['video_vt']
  loss, terms = allinone_loss(cast, {}, vtm_weight=1.0, mlm_weight=1.0, itc_weight=0.0)
  assert 'loss_itc' not in terms
  np.testing.assert_allclose(loss, vtm + mlm, rtol=1e-5)


@pytest.mark.parametrize(
  'field,value,match',
  [
    ('vtm_weight', -1.0, 'weights'),
    ('itc_weight', -0.5, 'weights'),
    ('temperature', 0.0, 'temperature'),
    ('temperature', -0.1, 'temperature'),
  ],
)
def test_loss_builder_refuses_bad_weights_and_temperature(field, value, match):
  cfg = ml_collections.ConfigDict(
    dict(name='allinone', temperature=0.05, vtm_weight=1.0, mlm_weight=1.0, itc_weight=1.0)
  )
  losses.build_loss(cfg)  # the defaults build
  cfg[field] = value
  with pytest.raises(ValueError, match=match) as error:
    losses.build_loss(cfg)
  assert '\n' not in str(error.value)


def test_loss_builder_refuses_all_zero_weights():
  cfg = ml_collections.ConfigDict(
    dict(name='allinone', temperature=0.05, vtm_weight=0.0, mlm_weight=0.0, itc_weight=0.0)
  )
  with pytest.raises(ValueError, match='not all 0'):
    losses.build_loss(cfg)


# ------------------------------------------------------------------------------------------------
# The model's objective
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize('negatives', ['reference', 'hard'])
def test_objective_trains_every_parameter_and_ignores_invalid_rows(negatives):
  config = _tiny_config()
  config.loss.negatives = negatives
  config.loss.mlm_probability = 0.5
  # Training randomness on: the invalid row must not matter under dropout either.
  config.model.dropout_rate = config.model.drop_path_rate = 0.1
  model = build_model(config.model)
  params = _random_params(model, 2)
  video, ids = _inputs(model, 4, 3)
  ids[3] = 0  # an all-padding caption: sample 3 is invalid
  batch = {'video': jnp.asarray(video), 'text': jnp.asarray(ids[:, None])}
  step = jax.jit(jax.value_and_grad(model.objective(config.loss), has_aux=True))

  def run(video):  # the same step key: the same dropout masks, negatives and MLM choices
    return step({'params': params}, {**batch, 'video': jnp.asarray(video)}, jax.random.key(7))

  (loss, (terms, state)), grads = run(video)
  assert np.isfinite(loss) and state == {}
  assert float(terms['mlm_tokens']) > 0 and float(terms['vtm_pairs']) > 0
  np.testing.assert_allclose(
    loss, terms['loss_vtm'] + terms['loss_mlm'] + terms['loss_itc'], rtol=1e-6
  )
  for path, grad in jax.tree_util.tree_leaves_with_path(grads['params']):
    grad = np.asarray(grad)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0, jax.tree_util.keystr(path)
  changed = video.copy()
  changed[3] = np.random.default_rng(9).uniform(-1, 1, video[3].shape)
  (loss2, (terms2, _)), _ = run(changed)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  for name in terms:
    np.testing.assert_allclose(terms2[name], terms[name], rtol=1e-6, err_msg=name)
  # The change reaches the model: a valid sample's video does change the loss.
  changed[0] = changed[3]
  (loss3, _), _ = run(changed)
  assert abs(float(loss3) - float(loss)) > 1e-4


def test_hard_negatives_need_the_contrastive_term():
  config = _tiny_config()
  config.loss.negatives = 'hard'
  config.loss.itc_weight = 0.0
  model = build_model(config.model)
  with pytest.raises(ValueError, match='itc_weight'):
    model.objective(config.loss)
  config.loss.negatives = 'mined'
  config.loss.itc_weight = 1.0
  with pytest.raises(ValueError, match='loss.negatives'):
    model.objective(config.loss)


# ------------------------------------------------------------------------------------------------
# Config errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'field,value,match',
  [
    ('temporal', 'shift', 'model.temporal'),
    ('video.patch_size', 5, 'model.video.patch_size'),
    ('text.num_narrations', 2, 'model.text.num_narrations'),
    ('pair_score', 'cosine', 'model.pair_score'),
  ],
)
def test_model_config_errors_are_one_line(field, value, match):
  config = _tiny_config()
  section = config.model
  *parents, leaf = field.split('.')
  for name in parents:
    section = section[name]
  section[leaf] = value
  with pytest.raises(ValueError, match=match) as error:
    build_model(config.model)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('arg', ['tiny,small', 'none,flatten'])
def test_exclusive_variants_are_refused(arg):
  with pytest.raises(ValueError, match='exclude each other') as error:
    load_config(ROOT / 'configs' / 'allinone_base.py', arg)
  assert '\n' not in str(error.value)
