"""Checks EgoNCE / InfoNCE against an independent float64 numpy reference, and the scene-aware
negative sampler against a brute-force one.

The reference is written from the definition (vatt_jax/losses/egonce.py's docstring), not from the
implementation: on L2-normalised embeddings, s(i, j) = <t_i, v_j> / τ; j is a positive of i when
j = i or (if use_noun) the captions share a noun class and (if use_verb) a verb class; for every
valid anchor, minus the log of the softmax mass (over the valid columns) on its valid positives,
averaged over valid anchors, text→video (rows) plus video→text (columns).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vatt_jax.losses.egonce import egonce, infonce, positive_mask, scene_negative_index

RTOL = 2e-5
ATOL = 2e-5
SWITCHES = [(True, True), (True, False), (False, True), (False, False)]

_egonce = jax.jit(egonce, static_argnames=('use_noun', 'use_verb'))
_infonce = jax.jit(infonce)


@functools.partial(jax.jit, static_argnames=('use_noun', 'use_verb'))
def _egonce_grad(text, video, noun, verb, temperature, use_noun, use_verb, valid):
  def loss(t, v):
    return egonce(
      t, v, noun, verb, temperature=temperature, use_noun=use_noun, use_verb=use_verb, valid=valid
    )[0]

  return jax.value_and_grad(loss, argnums=(0, 1))(text, video)


# ----------------------------------------------------------------------------------------------
# float64 numpy reference
# ----------------------------------------------------------------------------------------------


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _lse(values):
  values = np.asarray(values, np.float64)
  top = values.max()
  return top + np.log(np.exp(values - top).sum())


def ref_positive(noun, verb, use_noun, use_verb, i, j):
  if i == j:
    return True
  if not (use_noun or use_verb):
    return False
  ok = True
  if use_noun:
    ok = ok and bool(np.any((noun[i] > 0) & (noun[j] > 0)))
  if use_verb:
    ok = ok and bool(np.any((verb[i] > 0) & (verb[j] > 0)))
  return ok


def ref_egonce(text, video, noun, verb, temperature=0.05, use_noun=True, use_verb=True, valid=None):
  """(loss_t2v, loss_v2t) in float64."""
  t, v = _normalize(text), _normalize(video)
  s = t @ v.T / temperature
  m = s.shape[0]
  valid = np.ones(m, bool) if valid is None else np.asarray(valid, bool)
  live = [k for k in range(m) if valid[k]]

  def direction(sim):  # rows are anchors
    terms = []
    for i in live:
      positives = [j for j in live if ref_positive(noun, verb, use_noun, use_verb, i, j)]
      # −log(Σ_{j ∈ P} softmax_j) = LSE over all valid columns − LSE over the positives
      terms.append(_lse(sim[i, live]) - _lse(sim[i, positives]))
    return float(np.mean(terms)) if terms else 0.0

  return direction(s), direction(s.T)


def ref_infonce(text, video, temperature):
  """Cross-entropy with diagonal targets, both directions, float64."""
  t, v = _normalize(text), _normalize(video)
  s = t @ v.T / temperature
  t2v = np.mean([_lse(s[i]) - s[i, i] for i in range(len(s))])
  v2t = np.mean([_lse(s[:, j]) - s[j, j] for j in range(len(s))])
  return t2v + v2t


def _tags(rng, m, classes, max_tags=2):
  """Multi-hot rows with 0…max_tags classes from a small vocabulary (so pairs overlap)."""
  out = np.zeros((m, classes), np.float32)
  for i in range(m):
    k = rng.integers(0, max_tags + 1)
    out[i, rng.choice(classes, size=k, replace=False)] = 1.0
  return out


def _batch(seed, m=8, d=6, nouns=5, verbs=4):
  rng = np.random.default_rng(seed)
  text = rng.normal(size=(m, d)).astype(np.float32)
  video = (0.6 * text + rng.normal(size=(m, d))).astype(np.float32)
  noun = _tags(rng, m, nouns)
  verb = _tags(rng, m, verbs)
  # Duplicated tags: off-diagonal positives under every switch.
  noun[1], verb[1] = noun[0], verb[0]
  noun[0, 0] = noun[1, 0] = 1.0
  verb[0, 0] = verb[1, 0] = 1.0
  noun[3], verb[3] = noun[2], verb[2]
  return text, video, noun, verb


def _check(got, want_t2v, want_v2t):
  loss, metrics = got
  np.testing.assert_allclose(float(metrics['loss_t2v']), want_t2v, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(float(metrics['loss_v2t']), want_v2t, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(float(loss), want_t2v + want_v2t, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# EgoNCE / InfoNCE against the reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('use_noun,use_verb', SWITCHES)
def test_egonce_matches_reference(seed, use_noun, use_verb):
  text, video, noun, verb = _batch(seed)
  got = _egonce(text, video, noun, verb, use_noun=use_noun, use_verb=use_verb)
  _check(got, *ref_egonce(text, video, noun, verb, 0.05, use_noun, use_verb))
  m = len(text)
  want_pos = np.mean(
    [sum(ref_positive(noun, verb, use_noun, use_verb, i, j) for j in range(m)) for i in range(m)]
  )
  np.testing.assert_allclose(float(got[1]['positives']), want_pos, rtol=1e-6)
  assert float(got[1]['anchors']) == m


def test_batches_have_off_diagonal_positives():
  """The fixtures exercise what distinguishes EgoNCE from InfoNCE, and the switches differ."""
  for seed in range(3):
    text, video, noun, verb = _batch(seed)
    masks = {}
    for use_noun, use_verb in SWITCHES:
      mask = np.asarray(positive_mask(noun, verb, use_noun=use_noun, use_verb=use_verb))
      want = np.array(
        [
          [ref_positive(noun, verb, use_noun, use_verb, i, j) for j in range(len(noun))]
          for i in range(len(noun))
        ]
      )
      np.testing.assert_array_equal(mask, want)
      np.testing.assert_array_equal(mask, mask.T)
      masks[use_noun, use_verb] = mask
    assert (masks[True, True] & ~np.eye(len(noun), dtype=bool)).any()
    assert (masks[True, False] != masks[True, True]).any() or (
      masks[False, True] != masks[True, True]
    ).any()
    loss_ego = float(_egonce(text, video, noun, verb)[0])
    loss_info = float(_infonce(text, video)[0])
    assert loss_ego < loss_info  # extra positives only add probability mass


@pytest.mark.parametrize('temperature', [0.01, 0.05, 0.3, 1.0])
def test_temperature(temperature):
  text, video, noun, verb = _batch(7)
  got = _egonce(text, video, noun, verb, temperature=temperature)
  _check(got, *ref_egonce(text, video, noun, verb, temperature))


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('use_noun,use_verb', [(True, True), (False, True)])
def test_valid_mask(seed, use_noun, use_verb):
  text, video, noun, verb = _batch(seed)
  valid = np.random.default_rng(100 + seed).random(len(text)) < 0.6
  valid[0] = True
  valid[2] = False
  got = _egonce(text, video, noun, verb, use_noun=use_noun, use_verb=use_verb, valid=valid)
  _check(got, *ref_egonce(text, video, noun, verb, 0.05, use_noun, use_verb, valid))
  # An invalid sample is as if it were not in the batch at all.
  sub = _egonce(
    text[valid], video[valid], noun[valid], verb[valid], use_noun=use_noun, use_verb=use_verb
  )
  np.testing.assert_allclose(float(got[0]), float(sub[0]), rtol=RTOL, atol=ATOL)
  assert float(got[1]['anchors']) == valid.sum()
  # ... and takes no gradient, whatever its embedding.
  _, (g_text, g_video) = _egonce_grad(text, video, noun, verb, 0.05, use_noun, use_verb, valid)
  assert np.all(np.asarray(g_text)[~valid] == 0) and np.all(np.asarray(g_video)[~valid] == 0)


def test_all_invalid_is_zero_with_zero_finite_gradients():
  text, video, noun, verb = _batch(3)
  valid = np.zeros(len(text), bool)
  loss, metrics = _egonce(text, video, noun, verb, valid=valid)
  assert float(loss) == 0.0 and float(metrics['anchors']) == 0.0
  assert float(metrics['positives']) == 0.0
  value, grads = _egonce_grad(text, video, noun, verb, 0.05, True, True, valid)
  assert float(value) == 0.0
  for g in grads:
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.all(g == 0)


def test_single_sample():
  text, video, noun, verb = _batch(4)
  got = _egonce(text[:1], video[:1], noun[:1], verb[:1])
  assert ref_egonce(text[:1], video[:1], noun[:1], verb[:1]) == (0.0, 0.0)
  _check(got, 0.0, 0.0)
  _, grads = _egonce_grad(text[:1], video[:1], noun[:1], verb[:1], 0.05, True, True, None)
  for g in grads:
    np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-6)


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('use_noun,use_verb', [(True, True), (True, False), (False, False)])
def test_gradient_matches_finite_differences(seed, use_noun, use_verb):
  """jax.grad (float32) against central differences of the float64 reference."""
  text, video, noun, verb = _batch(seed)
  valid = np.ones(len(text), bool)
  valid[-1] = False
  temperature = 0.1
  _, (g_text, g_video) = _egonce_grad(
    text, video, noun, verb, temperature, use_noun, use_verb, valid
  )
  rng = np.random.default_rng(seed + 50)
  eps = 1e-5

  def f(t, v):
    return sum(ref_egonce(t, v, noun, verb, temperature, use_noun, use_verb, valid))

  t64, v64 = text.astype(np.float64), video.astype(np.float64)
  for which, grad in (('text', g_text), ('video', g_video)):
    grad = np.asarray(grad, np.float64)
    scale = np.abs(grad).max()
    for _ in range(4):
      i = int(rng.integers(0, len(text) - 1))  # a valid row
      k = int(rng.integers(0, text.shape[1]))
      plus, minus = [a.copy() for a in (t64, v64)], [a.copy() for a in (t64, v64)]
      slot = 0 if which == 'text' else 1
      plus[slot][i, k] += eps
      minus[slot][i, k] -= eps
      numeric = (f(*plus) - f(*minus)) / (2 * eps)
      np.testing.assert_allclose(grad[i, k], numeric, atol=2e-4 * max(scale, 1.0), rtol=1e-3)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_infonce_is_egonce_without_tags(seed):
  text, video, noun, verb = _batch(seed)
  info, info_metrics = _infonce(text, video, 0.07)
  ego, _ = _egonce(text, video, noun, verb, temperature=0.07, use_noun=False, use_verb=False)
  np.testing.assert_allclose(float(info), float(ego), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(info), ref_infonce(text, video, 0.07), rtol=RTOL, atol=ATOL)
  assert float(info_metrics['positives']) == 1.0


def test_egonce_reduces_to_infonce_when_no_pair_shares_noun_and_verb():
  """Pairs share nouns or verbs but never both: only the diagonal is positive."""
  text, video, _, _ = _batch(5)
  m = len(text)
  noun = np.zeros((m, 2), np.float32)
  verb = np.zeros((m, m), np.float32)
  noun[:, 0] = 1.0  # every pair shares a noun ...
  verb[np.arange(m), np.arange(m)] = 1.0  # ... and no pair a verb
  verb[0, 1] = verb[1, 1] = 0.0  # and sample 1 has no verb at all
  ego, metrics = _egonce(text, video, noun, verb)
  info, _ = _infonce(text, video)
  np.testing.assert_allclose(float(ego), float(info), rtol=1e-6, atol=1e-6)
  assert float(metrics['positives']) == 1.0
  # The noun-only switch makes every pair positive: each softmax sums to 1, the loss is 0.
  noun_only, _ = _egonce(text, video, noun, verb, use_verb=False)
  np.testing.assert_allclose(float(noun_only), 0.0, atol=1e-5)


def test_stable_when_positive_probability_underflows():
  """EgoVLP's log(Σ softmax · mask) is −inf here; the loss must stay finite and exact."""
  d = 4
  text = np.eye(d, dtype=np.float32)[:3]
  video = np.stack([-text[0], text[0], text[2]])  # anchor 0's only positive is opposite to it
  noun = np.eye(3, dtype=np.float32)
  verb = np.eye(3, dtype=np.float32)
  temperature = 0.01  # logit gap 200: exp(−200) underflows float32
  got = _egonce(text, video, noun, verb, temperature=temperature)
  assert np.isfinite(float(got[0]))
  _check(got, *ref_egonce(text, video, noun, verb, temperature))
  _, grads = _egonce_grad(text, video, noun, verb, temperature, True, True, None)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_low_precision_inputs_are_computed_in_float32():
  text, video, noun, verb = _batch(6)
  got = _egonce(jnp.asarray(text, jnp.bfloat16), jnp.asarray(video, jnp.bfloat16), noun, verb)
  assert got[0].dtype == jnp.float32
  t = np.asarray(jnp.asarray(text, jnp.bfloat16), np.float32)
  v = np.asarray(jnp.asarray(video, jnp.bfloat16), np.float32)
  _check(got, *ref_egonce(t, v, noun, verb))


def test_bad_arguments():
  text, video, noun, verb = _batch(0)
  with pytest.raises(ValueError, match='same shape'):
    egonce(text, video[:-1], noun, verb)
  with pytest.raises(ValueError, match='needs the noun'):
    egonce(text, video, None, verb)
  with pytest.raises(ValueError, match='needs the verb'):
    egonce(text, video, noun, None)
  with pytest.raises(ValueError, match='rows'):
    egonce(text, video, noun[:-1], verb)
  with pytest.raises(ValueError, match='valid'):
    egonce(text, video, noun, verb, valid=np.ones(3, bool))
  with pytest.raises(ValueError, match='temperature'):
    egonce(text, video, noun, verb, temperature=0.0)
  # Tags of the switched-off kind are not needed.
  egonce(text, video, noun, None, use_verb=False)


# ----------------------------------------------------------------------------------------------
# Scene-aware negatives and the doubled batch
# ----------------------------------------------------------------------------------------------


def _candidates(video_ids, times, window, i):
  return [
    j
    for j in range(len(times))
    if j != i and video_ids[j] == video_ids[i] and abs(times[j] - times[i]) <= window
  ]


def _clips(seed, m=40):
  rng = np.random.default_rng(seed)
  video_ids = np.array([f'vid{k}' for k in rng.integers(0, 5, size=m)])
  times = np.round(rng.uniform(0, 400, size=m), 1)
  times[1] = times[0]  # a duplicate time
  video_ids[1] = video_ids[0]
  video_ids[2] = 'lonely'  # a video with one clip
  return video_ids, times


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('window', [0.0, 30.0, 60.0])
def test_scene_negative_index_picks_a_neighbour(seed, window):
  video_ids, times = _clips(seed)
  index = scene_negative_index(video_ids, times, window, rng=seed)
  assert index.dtype == np.int64 and index.shape == times.shape
  for i in range(len(times)):
    cands = _candidates(video_ids, times, window, i)
    if cands:
      assert index[i] in cands
    else:
      assert index[i] == -1
  assert index[2] == -1
  assert index[0] == 1 and index[1] == 0 or window > 0  # duplicates see each other at window 0
  np.testing.assert_array_equal(index, scene_negative_index(video_ids, times, window, rng=seed))


def test_scene_negative_index_window_edges_and_types():
  times = np.array([0.0, 59.9, 60.1, 120.1, 500.0])
  index = scene_negative_index(np.zeros(5, int), times, 60.0, rng=0)
  assert index[3] == 2 and index[4] == -1  # 120.1 − 60.1 = 60 is inside (inclusive)
  assert index[2] in (1, 3) and index[1] in (0, 2) and index[0] == 1
  assert scene_negative_index([], [], 60.0, rng=0).shape == (0,)
  with pytest.raises(ValueError):
    scene_negative_index([0, 0], [0.0, np.nan], 60.0)
  with pytest.raises(ValueError):
    scene_negative_index([0, 0], [0.0, 1.0], -1.0)


def test_scene_negative_index_is_uniform():
  video_ids = np.zeros(4, int)
  times = np.array([0.0, 10.0, 20.0, 30.0])  # clip 1 has candidates 0, 2, 3
  picks = np.array([scene_negative_index(video_ids, times, 60.0, rng=s)[1] for s in range(600)])
  counts = np.array([(picks == j).sum() for j in (0, 2, 3)])
  assert counts.sum() == 600
  assert np.all(np.abs(counts - 200) < 50), counts  # ~5 standard deviations


@pytest.mark.parametrize('seed', [0, 1])
def test_doubled_batch_with_scene_negatives(seed):
  """Sample i's scene negative is appended as sample M + i, an anchor too; a missing one (−1) is
  a placeholder that `valid` removes."""
  rng = np.random.default_rng(seed)
  pool = 12
  video_ids = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 4])
  times = rng.uniform(0, 100, size=pool)
  text, video, noun, verb = _batch(seed, m=pool)
  batch = np.arange(6)
  neg = scene_negative_index(video_ids, times, 30.0, rng=seed)[batch]
  has = neg >= 0
  take = np.where(has, neg, 0)
  doubled = [np.concatenate([a[batch], np.where(has[:, None], a[take], 0)]) for a in (text, video)]
  doubled[0][6:][~has] = 1.0  # placeholder embeddings (normalisable), removed by valid
  doubled[1][6:][~has] = 1.0
  tags = [np.concatenate([a[batch], a[take]]) for a in (noun, verb)]
  valid = np.concatenate([np.ones(6, bool), has])
  got = _egonce(*doubled, *tags, valid=valid)
  _check(got, *ref_egonce(*doubled, *tags, valid=valid))
  assert float(got[1]['anchors']) == 6 + has.sum()
