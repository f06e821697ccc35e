"""Checks Norton's losses against independent float64 numpy references.

The references below are written from the paper and Norton's procedure (mmpt/losses/nce.py), with
the mask handling this project specifies: masked words / frames take no part in the soft-maximum
similarity, and an empty caption or clip gives 0. The Sinkhorn loops run rows then columns from
u = v = 0 in the log domain, as Norton's `log_sinkhorn_iterations`. The video–paragraph reference
cuts its blocks by explicit slicing, sim[a·L:(a+1)·L, b·L:(b+1)·L], not by reshaping.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.test_losses import ref_mil_nce
from vatt_jax.losses import (
  bucket_value,
  build_loss,
  clip_caption_loss,
  fine_grained_similarity,
  fused_similarity,
  min_max,
  norton_loss,
  vatt_pretraining_loss,
  video_paragraph_loss,
)

RTOL = 1e-4
ATOL = 1e-5

# ----------------------------------------------------------------------------------------------
# float64 numpy references
# ----------------------------------------------------------------------------------------------


def _lse(x, axis=None):
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=axis, keepdims=True)
  out = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
  return np.squeeze(out, axis=axis) if axis is not None else float(out.ravel()[0])


def _l2n(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ref_fine_grained(words, word_mask, frames, frame_mask, alpha=1.0):
  words, frames = _l2n(words), _l2n(frames)
  t2v = np.zeros((words.shape[0], frames.shape[0]))
  v2t = np.zeros_like(t2v)
  for a in range(words.shape[0]):
    for b in range(frames.shape[0]):
      ts, vs = np.flatnonzero(word_mask[a]), np.flatnonzero(frame_mask[b])
      if len(ts) == 0 or len(vs) == 0:
        continue
      c = words[a, ts] @ frames[b, vs].T  # [valid words, valid frames]
      t2v[a, b] = np.mean([alpha * _lse(c[i] / alpha) for i in range(len(ts))])
      v2t[a, b] = np.mean([alpha * _lse(c[:, j] / alpha) for j in range(len(vs))])
  return t2v, v2t


def ref_min_max(x, mask=None):
  x = np.asarray(x, np.float64)
  sel = x if mask is None else x[mask]
  lo, hi = sel.min(), sel.max()
  return np.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


def ref_fused(video, text, frames, frame_mask, words, word_mask, alpha, fusion_weight, valid=None):
  pair = None if valid is None else np.outer(valid, valid)
  pooled = ref_min_max(_l2n(text) @ _l2n(video).T, pair)
  t2v, v2t = ref_fine_grained(words, word_mask, frames, frame_mask, alpha)
  fine = (ref_min_max(t2v, pair) + ref_min_max(v2t, pair)) / 2
  return (fusion_weight * pooled + fine) / (fusion_weight + 1)


def ref_kth(sim, ratio, valid=None):
  diag = np.diag(sim) if valid is None else np.diag(sim)[valid]
  return np.sort(diag)[max(1, int(ratio * len(diag))) - 1]


def _log_sinkhorn(z, log_mu, log_nu, iters):
  u, v = np.zeros_like(log_mu), np.zeros_like(log_nu)
  for _ in range(iters):
    u = log_mu - _lse(z + v[None, :], axis=1)
    v = log_nu - _lse(z + u[:, None], axis=0)
  return z + u[:, None] + v[None, :]


def ref_block_plan(block, p, eps, iters):
  """Norton's prompt-bucket plan (p None: uniform marginals), rescaled to mass m."""
  m, n = block.shape
  if p is None:
    plan = np.exp(_log_sinkhorn(block / eps, np.full(m, -np.log(m)), np.full(n, -np.log(n)), iters))
  else:
    couplings = np.full((m + 1, n + 1), p, np.float64)
    couplings[:m, :n] = block
    norm = -np.log(m + n)
    log_mu = np.r_[np.full(m, norm), np.log(n) + norm]
    log_nu = np.r_[np.full(n, norm), np.log(m) + norm]
    plan = np.exp(_log_sinkhorn(couplings / eps, log_mu, log_nu, iters) - norm)[:m, :n]
  return plan * m / plan.sum()


def _ref_ce(logits, valid):
  rows = [_lse(logits[i, valid]) - logits[i, i] for i in np.flatnonzero(valid)]
  return float(np.mean(rows)) if rows else 0.0


def ref_paragraph(sim, length, eps, iters, ratio, temperature, valid=None):
  n = sim.shape[0]
  s = n // length
  valid = np.ones(n, bool) if valid is None else valid
  p = None if ratio is None else ref_kth(sim, ratio, valid)
  logits = np.zeros((s, s))
  for a in range(s):
    for b in range(s):
      block = sim[a * length : (a + 1) * length, b * length : (b + 1) * length]
      logits[a, b] = np.sum(ref_block_plan(block, p, eps, iters) * block) / temperature
  seq_valid = valid.reshape(s, length).all(1)
  return _ref_ce(logits, seq_valid) + _ref_ce(logits.T, seq_valid)


def _log_softmax(x):
  return x - _lse(x, axis=1)[:, None]


def ref_clip(video, text, temperature, beta, eps, iters, valid=None):
  idx = np.arange(len(video)) if valid is None else np.flatnonzero(valid)
  if len(idx) == 0:
    return 0.0
  logits = _l2n(video[idx]) @ _l2n(text[idx]).T / temperature
  k = len(idx)
  eye = np.eye(k)
  if beta == 0 or not iters:
    tv = tt = eye
  else:
    norm = np.full(k, -np.log(2 * k))
    q = np.exp(_log_sinkhorn(logits / eps, norm, norm, iters)) * (2 * k)
    tv, tt = beta * q + (1 - beta) * eye, beta * q.T + (1 - beta) * eye
  loss_v = -np.mean(np.sum(tv * _log_softmax(logits), axis=1))
  loss_t = -np.mean(np.sum(tt * _log_softmax(logits.T), axis=1))
  return float(loss_v + loss_t)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _randn(rng, shape, scale=1.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def _token_masks(rng, n, w, f):
  """Word and frame masks with ragged lengths, one caption and one clip fully masked."""
  word_mask = np.arange(w)[None] < rng.integers(1, w + 1, n)[:, None]
  frame_mask = rng.random((n, f)) < 0.7
  frame_mask[:, 0] = True
  word_mask[1] = False
  frame_mask[2] = False
  return word_mask, frame_mask


def _embeddings(rng, n=8, d=6, w=4, f=3, k=1):
  word_mask, frame_mask = _token_masks(rng, n, w, f)
  return {
    'video_vt': _randn(rng, (n, d)),
    'text_vt': _randn(rng, (n, k, d)),
    'video_frames_vt': _randn(rng, (n, f, d)),
    'video_frames_mask': frame_mask,
    'text_words_vt': _randn(rng, (n, k, w, d)),
    'text_words_mask': np.repeat(word_mask[:, None], k, 1),
  }


def _jnp(tree):
  return jax.tree.map(jnp.asarray, tree)


_fine = jax.jit(fine_grained_similarity, static_argnames=('alpha',))


# ----------------------------------------------------------------------------------------------
# 1. fine-grained (soft-maximum) similarity, min–max, fused similarity
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('seed, alpha', [(0, 1.0), (1, 0.1), (2, 4.0)])
def test_fine_grained_matches_reference(seed, alpha):
  rng = np.random.default_rng(seed)
  words, frames = _randn(rng, (5, 4, 8)), _randn(rng, (6, 3, 8), 2.0)
  word_mask, frame_mask = _token_masks(rng, 6, 4, 3)
  word_mask = word_mask[:5]
  t2v, v2t = _fine(*_jnp((words, word_mask, frames, frame_mask)), alpha=alpha)
  ref_t2v, ref_v2t = ref_fine_grained(words, word_mask, frames, frame_mask, alpha)
  assert t2v.shape == (5, 6) and t2v.dtype == jnp.float32
  _close(t2v, ref_t2v)
  _close(v2t, ref_v2t)
  # The fully masked caption 1 and clip 2 give exactly 0, not NaN.
  assert np.all(np.asarray(t2v)[1] == 0) and np.all(np.asarray(v2t)[:, 2] == 0)


def test_fine_grained_masked_tokens_have_no_effect():
  rng = np.random.default_rng(3)
  words, frames = _randn(rng, (4, 5, 8)), _randn(rng, (4, 3, 8))
  word_mask, frame_mask = _token_masks(rng, 4, 5, 3)
  words[1] = 0.0  # the fully masked caption is all zero vectors (padding)

  def total(words, frames):
    t2v, v2t = fine_grained_similarity(words, word_mask, frames, frame_mask, 0.5)
    return jnp.sum(t2v * jnp.arange(4.0)[None]) + jnp.sum(v2t**2)

  value, (g_words, g_frames) = jax.jit(jax.value_and_grad(total, (0, 1)))(words, frames)
  assert np.isfinite(float(value))
  assert np.all(np.isfinite(g_words)) and np.all(np.isfinite(g_frames))
  np.testing.assert_array_equal(np.asarray(g_words)[~word_mask], 0.0)
  np.testing.assert_array_equal(np.asarray(g_frames)[~frame_mask], 0.0)
  words2, frames2 = words.copy(), frames.copy()
  words2[~word_mask] = _randn(rng, (int((~word_mask).sum()), 8), 30.0)
  frames2[~frame_mask] = _randn(rng, (int((~frame_mask).sum()), 8), 30.0)
  out1 = _fine(*_jnp((words, word_mask, frames, frame_mask)), alpha=0.5)
  out2 = _fine(*_jnp((words2, word_mask, frames2, frame_mask)), alpha=0.5)
  for x, y in zip(out1, out2, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_min_max():
  rng = np.random.default_rng(4)
  x = _randn(rng, (5, 5), 3.0)
  mm = jax.jit(min_max)
  _close(mm(jnp.asarray(x)), ref_min_max(x), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(mm(jnp.full((3, 3), 2.5))), 0.0)
  mask = np.outer(*(2 * [np.array([1, 0, 1, 1, 0], bool)]))
  x[~mask] = 100.0  # out-of-mask entries do not set the scale
  _close(jax.jit(min_max)(jnp.asarray(x), jnp.asarray(mask))[mask], ref_min_max(x, mask)[mask])


@pytest.mark.parametrize(
  'seed, alpha, fusion_weight, masked', [(5, 1.0, 0.5, False), (6, 0.3, 2.0, True)]
)
def test_fused_similarity_matches_reference(seed, alpha, fusion_weight, masked):
  rng = np.random.default_rng(seed)
  e = _embeddings(rng, n=6)
  valid = np.array([1, 1, 0, 1, 1, 1], bool) if masked else None
  args = (
    e['video_vt'],
    e['text_vt'][:, 0],
    e['video_frames_vt'],
    e['video_frames_mask'],
    e['text_words_vt'][:, 0],
    e['text_words_mask'][:, 0],
  )
  fn = jax.jit(functools.partial(fused_similarity, alpha=alpha, fusion_weight=fusion_weight))
  out = np.asarray(fn(*_jnp(args), mask=None if valid is None else jnp.asarray(valid)))
  ref = ref_fused(*args, alpha, fusion_weight, valid)
  sel = np.ones_like(ref, bool) if valid is None else np.outer(valid, valid)
  _close(out[sel], ref[sel])
  assert out.shape == (6, 6) and out[sel].min() >= 0 and out[sel].max() <= 1 + 1e-6


# ----------------------------------------------------------------------------------------------
# 2. bucket value
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('n, ratio, k', [(3, 0.3, 1), (10, 0.3, 3), (10, 1.0, 10), (8, 0.05, 1)])
def test_bucket_value_kth(n, ratio, k):
  rng = np.random.default_rng(n)
  sim = _randn(rng, (n, n))
  out = bucket_value(jnp.asarray(sim), ratio)
  assert float(out) == np.sort(np.diag(sim))[k - 1]
  grad = jax.grad(lambda s: bucket_value(s, ratio))(jnp.asarray(sim))
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_bucket_value_masked():
  rng = np.random.default_rng(7)
  sim = _randn(rng, (10, 10))
  valid = np.array([1, 1, 0, 1, 1, 0, 1, 1, 1, 1], bool)  # 8 valid: k = 2
  fn = jax.jit(bucket_value, static_argnames=('ratio',))
  assert float(fn(jnp.asarray(sim), 0.3, jnp.asarray(valid))) == ref_kth(sim, 0.3, valid)
  assert float(fn(jnp.asarray(sim), 0.3, jnp.ones(10, bool))) == ref_kth(sim, 0.3)
  assert float(fn(jnp.asarray(sim), 0.3, jnp.zeros(10, bool))) == 0.0


# ----------------------------------------------------------------------------------------------
# 3. video–paragraph loss
# ----------------------------------------------------------------------------------------------

_paragraph = jax.jit(
  video_paragraph_loss,
  static_argnames=('length', 'epsilon', 'num_iters', 'prompt_ratio', 'temperature'),
)


@pytest.mark.parametrize(
  'seed, n, length, eps, ratio, temperature, masked',
  [
    (10, 8, 4, 0.1, 0.3, 0.07, False),
    (11, 12, 3, 0.05, 0.5, 0.1, False),
    (12, 8, 2, 0.1, None, 0.07, False),
    (13, 12, 4, 0.2, 0.3, 0.07, True),
  ],
)
def test_video_paragraph_matches_reference(seed, n, length, eps, ratio, temperature, masked):
  rng = np.random.default_rng(seed)
  sim = rng.random((n, n)).astype(np.float32)
  sim[np.arange(n), np.arange(n)] += 0.3  # matched pairs tend to be more similar
  valid = None
  if masked:
    valid = np.ones(n, bool)
    valid[[1, length + 2]] = False
  out = _paragraph(
    jnp.asarray(sim),
    length=length,
    epsilon=eps,
    num_iters=50,
    prompt_ratio=ratio,
    temperature=temperature,
    mask=None if valid is None else jnp.asarray(valid),
  )
  assert out.shape == () and out.dtype == jnp.float32
  _close(out, ref_paragraph(sim.astype(np.float64), length, eps, 50, ratio, temperature, valid))


def test_video_paragraph_block_pairing():
  """With constant blocks c[a, b], every plan of mass L gives logit[a, b] = L·c[a, b] / τ: the loss
  is the CE of known logits, whatever the plan, if and only if the blocks are cut right."""
  rng = np.random.default_rng(14)
  s, length = 3, 2
  c = rng.random((s, s))
  sim = np.kron(c, np.ones((length, length))).astype(np.float32)  # sim[aL+i, bL+j] = c[a, b]
  logits = length * c / 0.1
  expected = _ref_ce(logits, np.ones(s, bool)) + _ref_ce(logits.T, np.ones(s, bool))
  out = _paragraph(jnp.asarray(sim), length=length, temperature=0.1, num_iters=5)
  _close(out, expected)


def test_video_paragraph_gradient_treats_plan_as_constant():
  rng = np.random.default_rng(15)
  n, length, eps = 8, 4, 0.01
  sim = jnp.asarray(rng.random((n, n)).astype(np.float32))
  kw = dict(length=length, epsilon=eps, num_iters=50, prompt_ratio=0.3, temperature=0.07)
  grad = jax.jit(jax.grad(functools.partial(video_paragraph_loss, **kw)))(sim)
  assert np.all(np.isfinite(grad))

  s = n // length
  sim64 = np.asarray(sim, np.float64)
  p = ref_kth(sim64, 0.3)
  cut = lambda x, i, j: x[i * length : (i + 1) * length, j * length : (j + 1) * length]  # noqa: E731
  plan = np.stack(
    [np.stack([ref_block_plan(cut(sim64, i, j), p, eps, 50) for j in range(s)]) for i in range(s)]
  )
  plan = jnp.asarray(plan, jnp.float32)

  def with_fixed_plan(sim):
    b = jnp.stack([jnp.stack([cut(sim, i, j) for j in range(s)]) for i in range(s)])
    logits = jnp.sum(plan * b, axis=(-2, -1)) / 0.07
    diag = jnp.arange(s)
    ce = lambda lg: jnp.mean(jax.nn.logsumexp(lg, 1) - lg[diag, diag])  # noqa: E731
    return ce(logits) + ce(logits.T)

  _close(grad, np.asarray(jax.jit(jax.grad(with_fixed_plan))(sim)), rtol=1e-4, atol=1e-5)


def test_video_paragraph_rejects_bad_length():
  with pytest.raises(ValueError, match='loss.length'):
    video_paragraph_loss(jnp.zeros((8, 8)), length=3)
  with pytest.raises(ValueError, match='clips per video'):
    video_paragraph_loss(jnp.zeros((8, 8)), length=4, clips_per_video=6)


# ----------------------------------------------------------------------------------------------
# 4. clip–caption loss
# ----------------------------------------------------------------------------------------------

_clip = jax.jit(clip_caption_loss, static_argnames=('temperature', 'beta', 'epsilon', 'num_iters'))


@pytest.mark.parametrize(
  'seed, n, temperature, beta, eps, iters, masked',
  [
    (20, 6, 0.07, 0.3, 1.0, 50, False),
    (21, 5, 0.2, 0.7, 0.5, 20, False),
    (22, 8, 0.07, 0.3, 1.0, 50, True),
    (23, 6, 0.07, 0.0, 1.0, 50, True),
    (24, 6, 0.1, 0.3, 1.0, 0, False),
  ],
)
def test_clip_caption_matches_reference(seed, n, temperature, beta, eps, iters, masked):
  rng = np.random.default_rng(seed)
  video, text = _randn(rng, (n, 8)), _randn(rng, (n, 8))
  text[1] = video[1] + 0.3 * text[1]  # a near-duplicate: a faulty negative for its neighbours
  valid = np.array([1, 1, 0, 1] + [1] * (n - 4), bool) if masked else None
  out = _clip(
    *_jnp((video, text)),
    temperature=temperature,
    beta=beta,
    epsilon=eps,
    num_iters=iters,
    mask=None if valid is None else jnp.asarray(valid),
  )
  assert out.shape == () and out.dtype == jnp.float32
  _close(out, ref_clip(video, text, temperature, beta, eps, iters, valid))


def test_clip_caption_beta0_is_symmetric_infonce():
  rng = np.random.default_rng(25)
  video, text = _randn(rng, (6, 8)), _randn(rng, (6, 8))
  logits = _l2n(video) @ _l2n(text).T / 0.07
  diag = np.arange(6)
  infonce = np.mean(_lse(logits, 1) - logits[diag, diag])
  infonce += np.mean(_lse(logits.T, 1) - logits[diag, diag])
  _close(_clip(*_jnp((video, text)), beta=0.0), infonce)
  _close(_clip(*_jnp((video, text)), num_iters=None), infonce)


def test_clip_caption_gradient_treats_plan_as_constant():
  rng = np.random.default_rng(26)
  video, text = _jnp((_randn(rng, (6, 8)), _randn(rng, (6, 8))))
  kw = dict(temperature=0.07, beta=0.3, epsilon=0.01, num_iters=50)
  grads = jax.jit(jax.grad(functools.partial(clip_caption_loss, **kw), (0, 1)))(video, text)
  assert all(np.all(np.isfinite(g)) for g in grads)

  def normed_logits(v, t):
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    return v @ (t / jnp.linalg.norm(t, axis=-1, keepdims=True)).T / 0.07

  logits = _l2n(video) @ _l2n(text).T / 0.07
  norm = np.full(6, -np.log(12))
  q = jnp.asarray(np.exp(_log_sinkhorn(logits / 0.01, norm, norm, 50)) * 12, jnp.float32)
  eye = jnp.eye(6)

  def with_fixed_targets(v, t):
    lg = normed_logits(v, t)
    loss_v = -jnp.mean(jnp.sum((0.3 * q + 0.7 * eye) * jax.nn.log_softmax(lg, 1), 1))
    return loss_v - jnp.mean(jnp.sum((0.3 * q.T + 0.7 * eye) * jax.nn.log_softmax(lg.T, 1), 1))

  expected = jax.jit(jax.grad(with_fixed_targets, (0, 1)))(video, text)
  for g, e in zip(grads, expected, strict=True):
    _close(g, np.asarray(e), rtol=1e-4, atol=5e-5)


def test_vmap_matches_loop():
  rng = np.random.default_rng(27)
  videos, texts = _randn(rng, (2, 6, 8)), _randn(rng, (2, 6, 8))
  clip = jax.vmap(functools.partial(clip_caption_loss, beta=0.5))
  out = jax.jit(clip)(*_jnp((videos, texts)))
  for i in range(2):
    _close(out[i], ref_clip(videos[i], texts[i], 0.07, 0.5, 1.0, 50))
  sims = rng.random((2, 8, 8)).astype(np.float32)
  para = jax.jit(jax.vmap(functools.partial(video_paragraph_loss, length=4)))
  out = para(jnp.asarray(sims))
  for i in range(2):
    _close(out[i], ref_paragraph(sims[i].astype(np.float64), 4, 0.1, 50, 0.3, 0.07))


# ----------------------------------------------------------------------------------------------
# 5. norton_loss, the config builder, and the 'vatt' loss without audio
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('masked', [False, True])
def test_norton_loss_matches_reference(masked):
  rng = np.random.default_rng(30 + masked)
  e = _embeddings(rng, n=8, k=2)
  batch = {}
  valid = None
  if masked:
    batch = {'video_mask': np.ones(8, bool), 'text_mask': np.ones(8, np.float32)}
    batch['text_mask'][5] = 0.0
    valid = np.arange(8) != 5
  kw = dict(length=4, paragraph_weight=0.5, sinkhorn_iters=30, alpha=0.5)
  floats = {k: v for k, v in e.items() if not k.endswith('mask')}
  masks = {k: v for k, v in e.items() if k.endswith('mask')}

  def loss(floats, masks, batch):
    return norton_loss({**floats, **masks}, batch, **kw)

  fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (total, terms), grads = fn(_jnp(floats), _jnp(masks), _jnp(batch))
  assert set(terms) == {'loss_clip', 'loss_paragraph'}
  assert total.dtype == jnp.float32 and total.shape == ()
  args = (e['video_vt'], e['text_vt'][:, 0], e['video_frames_vt'], e['video_frames_mask'])
  args += (e['text_words_vt'][:, 0], e['text_words_mask'][:, 0])
  sim = ref_fused(*args, 0.5, 0.5, valid)
  ref_par = ref_paragraph(sim, 4, 0.1, 30, 0.3, 0.07, valid)
  ref_clip_loss = ref_clip(e['video_vt'], e['text_vt'][:, 0], 0.07, 0.3, 1.0, 30, valid)
  _close(terms['loss_paragraph'], ref_par)
  _close(terms['loss_clip'], ref_clip_loss)
  _close(total, ref_clip_loss + 0.5 * ref_par)
  for name in ('video_vt', 'text_vt', 'video_frames_vt', 'text_words_vt'):
    assert np.all(np.isfinite(grads[name])), name
  if masked:  # nothing valid: every term is 0, with zero (finite) gradients
    batch['video_mask'][:] = False
    (total, terms), grads = fn(_jnp(floats), _jnp(masks), _jnp(batch))
    assert float(total) == 0.0 and float(terms['loss_paragraph']) == 0.0
    for g in jax.tree.leaves(grads):
      np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_norton_loss_without_paragraph_needs_no_tokens():
  rng = np.random.default_rng(32)
  e = {'video_vt': _randn(rng, (6, 8)), 'text_vt': _randn(rng, (6, 1, 8))}
  total, terms = jax.jit(functools.partial(norton_loss, paragraph_weight=0.0))(_jnp(e), {})
  assert float(terms['loss_paragraph']) == 0.0
  _close(total, ref_clip(e['video_vt'], e['text_vt'][:, 0], 0.07, 0.3, 1.0, 50))


def test_build_loss_norton_minimal_config():
  rng = np.random.default_rng(33)
  e = _embeddings(rng, n=16)
  loss_fn = build_loss(ml_collections.ConfigDict({'name': 'norton'}))  # Norton's defaults: L = 8
  total, terms = jax.jit(loss_fn)(_jnp(e), {})
  assert np.isfinite(float(total)) and float(terms['loss_paragraph']) > 0
  # N = 12 clips do not split into sequences of 8.
  e12 = jax.tree.map(lambda x: x[:12], e)
  with pytest.raises(ValueError, match='loss.length'):
    jax.jit(loss_fn)(_jnp(e12), {})


@pytest.mark.parametrize(
  'field, value',
  [
    ('temperature', 0.0),
    ('beta', 1.5),
    ('clip_epsilon', -1.0),
    ('sinkhorn_iters', -1),
    ('paragraph_weight', -0.1),
    ('length', 0),
    ('paragraph_epsilon', 0.0),
    ('prompt_ratio', 0.0),
    ('paragraph_temperature', -0.07),
    ('alpha', 0.0),
    ('fusion_weight', -1.0),
    ('clips_per_video', 12),  # not a multiple of length 8
  ],
)
def test_build_loss_norton_rejects_bad_fields(field, value):
  with pytest.raises(ValueError, match=f'loss.{field}' if field != 'clips_per_video' else 'length'):
    build_loss(ml_collections.ConfigDict({'name': 'norton', field: value}))


def test_vatt_loss_without_audio_or_text():
  rng = np.random.default_rng(34)
  video, text = _randn(rng, (6, 8)), _randn(rng, (6, 2, 8))
  batch = {'text_mask': np.array([1, 1, 0, 1, 1, 1], bool)}
  cfg = ml_collections.ConfigDict({'name': 'vatt', 'temperature': 0.07})
  cfg.weight_va, cfg.weight_vt = 0.0, 1.0
  total, terms = jax.jit(build_loss(cfg))(_jnp({'video_vt': video, 'text_vt': text}), _jnp(batch))
  assert float(terms['loss_va']) == 0.0
  _close(terms['loss_vt'], ref_mil_nce(video, text, batch['text_mask']))
  _close(total, float(terms['loss_vt']))
  # And the video–audio term alone, without text.
  audio = _randn(rng, (6, 8))
  fn = jax.jit(functools.partial(vatt_pretraining_loss, weight_va=1.0, weight_vt=0.0))
  total, terms = fn(_jnp({'video_va': video[:, :8], 'audio_va': audio}), {})
  assert float(terms['loss_vt']) == 0.0
  _close(total, ref_mil_nce(video, audio[:, None]))
