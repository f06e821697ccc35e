"""Checks the VATT contrastive losses against an independent float64 numpy reference.

The reference below is written from the specification (official VATT MIL-NCE form), not from
the implementation: both sides are L2-normalised, s(i, j, l) = <v_i, t_{j,l}> / temperature, and
for anchor b

  loss_b = logsumexp({s(b, j, l)} U {s(j, b, l)}) - logsumexp({s(b, b, l)}),

where masked samples are dropped both as negatives and as anchors, the loss is the mean over valid
anchors, and it is exactly 0 when no sample is valid.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vatt_jax.losses import mil_nce, nce, vatt_pretraining_loss

RTOL = 1e-5
ATOL = 1e-5

# Jitted wrappers: op-by-op (eager) execution compiles every primitive for every new shape, which
# is far slower on CPU than compiling each loss once. The losses are used under jit in training.
_mil_nce = jax.jit(mil_nce, static_argnames=('temperature',))
_nce = jax.jit(nce, static_argnames=('temperature',))
_mil_nce_vg = jax.jit(jax.value_and_grad(mil_nce, argnums=(0, 1)), static_argnames=('temperature',))
_nce_vg = jax.jit(jax.value_and_grad(nce, argnums=(0, 1)), static_argnames=('temperature',))

# ----------------------------------------------------------------------------------------------
# float64 numpy reference
# ----------------------------------------------------------------------------------------------


def _logsumexp(x: np.ndarray) -> float:
  x = np.asarray(x, np.float64).ravel()
  m = np.max(x)
  return float(m + np.log(np.sum(np.exp(x - m))))


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ref_mil_nce(video, text, mask=None, temperature=0.07) -> float:
  """video [B, D], text [B, L, D], mask [B] -> scalar loss, all in float64."""
  v = _l2_normalize(video)
  t = _l2_normalize(text)
  b_size = v.shape[0]
  valid = np.ones(b_size, bool) if mask is None else np.asarray(mask).astype(bool)
  # s[i, j, l] = <v_i, t_{j,l}> / temperature
  s = np.einsum('id,jld->ijl', v, t) / temperature
  losses = []
  for b in range(b_size):
    if not valid[b]:
      continue
    v2t = s[b, valid, :]  # video b against the L texts of every valid sample
    t2v = s[valid, b, :]  # the L texts of b against every valid video
    denom = _logsumexp(np.concatenate([v2t.ravel(), t2v.ravel()]))
    numer = _logsumexp(s[b, b, :])
    losses.append(denom - numer)
  if not losses:
    return 0.0
  return float(np.mean(losses))


def ref_nce(video, audio, mask=None, temperature=0.07) -> float:
  return ref_mil_nce(video, np.asarray(audio)[:, None, :], mask, temperature)


def ref_vatt(embeddings, batch, temperature=0.07, weight_va=1.0, weight_vt=1.0):
  b_size = embeddings['video_va'].shape[0]

  def combine(*keys):
    m = np.ones(b_size, bool)
    for k in keys:
      if k in batch:
        m &= np.asarray(batch[k]).astype(bool)
    return m

  loss_va = ref_nce(
    embeddings['video_va'],
    embeddings['audio_va'],
    combine('video_mask', 'audio_mask'),
    temperature,
  )
  loss_vt = ref_mil_nce(
    embeddings['video_vt'],
    embeddings['text_vt'],
    combine('video_mask', 'text_mask'),
    temperature,
  )
  total = (weight_va * loss_va + weight_vt * loss_vt) / (weight_va + weight_vt)
  return total, loss_va, loss_vt


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _randn(rng, shape, scale=1.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _random_mask(rng, b_size, min_valid=1):
  """Random boolean mask with at least `min_valid` valid and (if possible) one masked entry."""
  while True:
    m = rng.random(b_size) < 0.6
    if m.sum() >= min_valid and (b_size == 1 or not m.all()):
      return m


def _assert_close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# 1. mil_nce vs reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'seed, b_size, n_text, dim, scale, temperature, masked',
  [
    (0, 1, 1, 8, 1.0, 0.07, False),
    (1, 1, 5, 8, 1.0, 0.07, False),
    (3, 6, 5, 16, 1.0, 0.07, False),
    (4, 8, 3, 32, 7.5, 0.07, False),
    (5, 8, 5, 16, 0.01, 0.2, False),
    (6, 8, 3, 16, 3.0, 0.07, True),
    (7, 12, 1, 24, 1.0, 0.5, True),
    (8, 5, 4, 8, 1.0, 1.0, True),
  ],
)
def test_mil_nce_matches_reference(seed, b_size, n_text, dim, scale, temperature, masked):
  rng = np.random.default_rng(seed)
  video = _randn(rng, (b_size, dim), scale)
  text = _randn(rng, (b_size, n_text, dim), scale * 2.0)
  mask = _random_mask(rng, b_size) if masked else None
  out = _mil_nce(
    jnp.asarray(video),
    jnp.asarray(text),
    None if mask is None else jnp.asarray(mask),
    temperature=temperature,
  )
  assert out.shape == ()
  assert out.dtype == jnp.float32
  _assert_close(out, ref_mil_nce(video, text, mask, temperature))


@pytest.mark.parametrize('mask_dtype', [bool, np.float32])
def test_mil_nce_mask_dtypes(mask_dtype):
  rng = np.random.default_rng(11)
  video = _randn(rng, (8, 16))
  text = _randn(rng, (8, 3, 16))
  mask = np.array([1, 0, 1, 1, 0, 1, 1, 0])
  out = _mil_nce(jnp.asarray(video), jnp.asarray(text), jnp.asarray(mask.astype(mask_dtype)))
  _assert_close(out, ref_mil_nce(video, text, mask.astype(bool)))


def test_all_ones_mask_equals_no_mask():
  rng = np.random.default_rng(12)
  video = jnp.asarray(_randn(rng, (8, 16)))
  text = jnp.asarray(_randn(rng, (8, 3, 16)))
  _assert_close(_mil_nce(video, text, jnp.ones((8,), bool)), float(_mil_nce(video, text)))


# ----------------------------------------------------------------------------------------------
# 2. nce vs reference, and the exact log 2 case
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'seed, b_size, dim, temperature, masked',
  [
    (20, 2, 8, 0.07, False),
    (22, 8, 16, 0.07, True),
    (23, 5, 12, 0.7, True),
  ],
)
def test_nce_matches_reference(seed, b_size, dim, temperature, masked):
  rng = np.random.default_rng(seed)
  video = _randn(rng, (b_size, dim), 3.0)
  audio = _randn(rng, (b_size, dim), 0.5)
  mask = _random_mask(rng, b_size) if masked else None
  out = _nce(
    jnp.asarray(video),
    jnp.asarray(audio),
    None if mask is None else jnp.asarray(mask),
    temperature=temperature,
  )
  assert out.shape == ()
  assert out.dtype == jnp.float32
  _assert_close(out, ref_nce(video, audio, mask, temperature))


def test_nce_equals_mil_nce_with_one_text():
  rng = np.random.default_rng(24)
  video = jnp.asarray(_randn(rng, (8, 16)))
  audio = jnp.asarray(_randn(rng, (8, 16)))
  mask = jnp.asarray(_random_mask(rng, 8))
  _assert_close(_nce(video, audio, mask), float(_mil_nce(video, audio[:, None, :], mask)))


@pytest.mark.parametrize('seed, scale', [(30, 1.0), (31, 1.0), (32, 0.05), (33, 1e3), (34, 1e4)])
def test_nce_single_sample_is_log2(seed, scale):
  rng = np.random.default_rng(seed)
  video = _randn(rng, (1, 16), scale)
  audio = _randn(rng, (1, 16), scale)
  out = _nce(jnp.asarray(video), jnp.asarray(audio))
  assert np.isfinite(float(out))
  _assert_close(out, np.log(2.0), rtol=1e-6, atol=1e-6)
  _assert_close(ref_nce(video, audio), np.log(2.0), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 3. all samples masked -> exactly 0 with zero (finite) gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'loss_name, b_size, n_text, mask_dtype',
  [('mil_nce', 8, 3, bool), ('mil_nce', 3, 2, np.float32), ('nce', 1, 1, np.float32)],
)
def test_all_masked_is_zero_with_zero_grad(loss_name, b_size, n_text, mask_dtype):
  rng = np.random.default_rng(40 + b_size)
  video = jnp.asarray(_randn(rng, (b_size, 16)))
  text = jnp.asarray(_randn(rng, (b_size, n_text, 16)))
  mask = jnp.zeros((b_size,), mask_dtype)
  if loss_name == 'mil_nce':
    loss, grads = _mil_nce_vg(video, text, mask)
  else:
    loss, grads = _nce_vg(video, text[:, 0], mask)
  assert float(loss) == 0.0
  for g in grads:
    g = np.asarray(g)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g, np.zeros_like(g))


# ----------------------------------------------------------------------------------------------
# 4. masked samples have no influence
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('seed', [50, 51, 52])
def test_masked_samples_do_not_affect_loss(seed):
  rng = np.random.default_rng(seed)
  b_size, n_text, dim = 8, 3, 16
  video = _randn(rng, (b_size, dim))
  text = _randn(rng, (b_size, n_text, dim))
  mask = _random_mask(rng, b_size, min_valid=2)
  loss, (g_video, g_text) = _mil_nce_vg(jnp.asarray(video), jnp.asarray(text), jnp.asarray(mask))
  loss = float(loss)

  # Replace every masked sample with something very different (including a copy of a valid
  # sample's embeddings, which would be a strong negative if it leaked into the denominators).
  video2, text2 = video.copy(), text.copy()
  first_valid = int(np.flatnonzero(mask)[0])
  for j in np.flatnonzero(~mask):
    video2[j] = video[first_valid] if j % 2 else _randn(rng, (dim,), 50.0)
    text2[j] = text[first_valid] if j % 2 else _randn(rng, (n_text, dim), 50.0)
  loss2, _ = _mil_nce_vg(jnp.asarray(video2), jnp.asarray(text2), jnp.asarray(mask))
  _assert_close(loss2, loss, rtol=1e-6, atol=1e-6)
  _assert_close(loss, ref_mil_nce(video, text, mask))

  # The masked samples' gradients are zero, too.
  np.testing.assert_array_equal(np.asarray(g_video)[~mask], 0.0)
  np.testing.assert_array_equal(np.asarray(g_text)[~mask], 0.0)


# ----------------------------------------------------------------------------------------------
# 5. permutation equivariance
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('seed, masked', [(60, False), (61, True), (62, True)])
def test_permutation_invariance(seed, masked):
  rng = np.random.default_rng(seed)
  b_size, n_text, dim = 8, 3, 16
  video = _randn(rng, (b_size, dim))
  text = _randn(rng, (b_size, n_text, dim))
  mask = _random_mask(rng, b_size) if masked else np.ones(b_size, bool)
  perm = rng.permutation(b_size)
  loss = _mil_nce(jnp.asarray(video), jnp.asarray(text), jnp.asarray(mask))
  loss_p = _mil_nce(jnp.asarray(video[perm]), jnp.asarray(text[perm]), jnp.asarray(mask[perm]))
  _assert_close(loss_p, float(loss), rtol=1e-6, atol=1e-6)
  # Permuting the L texts inside each sample does not matter either.
  text_l = text[:, rng.permutation(n_text), :]
  loss_l = _mil_nce(jnp.asarray(video), jnp.asarray(text_l), jnp.asarray(mask))
  _assert_close(loss_l, float(loss), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 6. gradients vs float64 finite differences of the reference
# ----------------------------------------------------------------------------------------------


def _fd_grad(fn, x, index, eps=1e-5):
  xp, xm = x.copy(), x.copy()
  xp[index] += eps
  xm[index] -= eps
  return (fn(xp) - fn(xm)) / (2 * eps)


@pytest.mark.parametrize(
  'seed, b_size, n_text, dim, temperature, masked',
  [
    (70, 3, 2, 4, 0.5, False),
    (71, 4, 3, 5, 0.2, True),
  ],
)
def test_grad_matches_finite_differences(seed, b_size, n_text, dim, temperature, masked):
  rng = np.random.default_rng(seed)
  video = _randn(rng, (b_size, dim))
  text = _randn(rng, (b_size, n_text, dim))
  mask = _random_mask(rng, b_size, min_valid=min(2, b_size)) if masked else None
  jmask = None if mask is None else jnp.asarray(mask)

  loss, (g_video, g_text) = _mil_nce_vg(
    jnp.asarray(video), jnp.asarray(text), jmask, temperature=temperature
  )
  g_video, g_text = np.asarray(g_video), np.asarray(g_text)

  video64, text64 = video.astype(np.float64), text.astype(np.float64)
  _assert_close(loss, ref_mil_nce(video64, text64, mask, temperature))
  for _ in range(6):
    i = tuple(int(rng.integers(n)) for n in video.shape)
    fd = _fd_grad(lambda v: ref_mil_nce(v, text64, mask, temperature), video64, i)
    np.testing.assert_allclose(g_video[i], fd, rtol=1e-3, atol=1e-4)
  for _ in range(6):
    i = tuple(int(rng.integers(n)) for n in text.shape)
    fd = _fd_grad(lambda t: ref_mil_nce(video64, t, mask, temperature), text64, i)
    np.testing.assert_allclose(g_text[i], fd, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# 7. vatt_pretraining_loss
# ----------------------------------------------------------------------------------------------


def _vatt_inputs(rng, b_size=8, n_text=3, d_va=12, d_vt=16):
  return {
    'video_va': _randn(rng, (b_size, d_va)),
    'audio_va': _randn(rng, (b_size, d_va), 2.0),
    'video_vt': _randn(rng, (b_size, d_vt)),
    'text_vt': _randn(rng, (b_size, n_text, d_vt), 0.5),
  }


@pytest.mark.parametrize(
  'masks, kwargs',
  [
    # Default temperature and weights, no masks.
    ({}, {}),
    ({'video_mask': bool}, {'temperature': 0.1, 'weight_va': 0.3, 'weight_vt': 2.0}),
    # The audio mask only affects loss_va and the text mask only loss_vt; mixed mask dtypes.
    ({'audio_mask': np.float32, 'text_mask': bool}, {'weight_va': 1.0, 'weight_vt': 1.0}),
    (
      {'video_mask': bool, 'audio_mask': bool, 'text_mask': np.float32},
      {'temperature': 0.2, 'weight_va': 0.3, 'weight_vt': 2.0},
    ),
  ],
)
def test_vatt_pretraining_loss_matches_reference(masks, kwargs):
  rng = np.random.default_rng(80 + len(masks))
  b_size = 8
  embeddings = _vatt_inputs(rng, b_size)
  batch = {}
  for k, dtype in masks.items():
    m = np.ones(b_size, bool)
    m[rng.choice(b_size, size=2, replace=False)] = False
    batch[k] = m.astype(dtype)
  # Jitted with the scalars static: one compile per case is cheaper on CPU than op-by-op.
  loss_fn = jax.jit(functools.partial(vatt_pretraining_loss, **kwargs))
  total, terms = loss_fn(
    {k: jnp.asarray(v) for k, v in embeddings.items()},
    {k: jnp.asarray(v) for k, v in batch.items()},
  )
  ref_total, ref_va, ref_vt = ref_vatt(embeddings, batch, **kwargs)
  assert set(terms) == {'loss_va', 'loss_vt'}
  assert total.shape == ()
  _assert_close(total, ref_total)
  _assert_close(terms['loss_va'], ref_va)
  _assert_close(terms['loss_vt'], ref_vt)
  # Both terms carry information: with these masks neither is trivially zero.
  assert ref_va > 0.0 and ref_vt > 0.0


@pytest.mark.parametrize('weights', [(-1.0, 1.0), (1.0, -0.5), (0.0, 0.0)])
def test_vatt_pretraining_loss_rejects_bad_weights(weights):
  rng = np.random.default_rng(91)
  embeddings = {k: jnp.asarray(v) for k, v in _vatt_inputs(rng).items()}
  with pytest.raises(ValueError):
    vatt_pretraining_loss(embeddings, {}, weight_va=weights[0], weight_vt=weights[1])


# ----------------------------------------------------------------------------------------------
# 8. bfloat16 inputs
# ----------------------------------------------------------------------------------------------


def test_bfloat16_inputs():
  rng = np.random.default_rng(100)
  b_size, n_text, dim = 8, 3, 16
  video = jnp.asarray(_randn(rng, (b_size, dim)), jnp.bfloat16)
  text = jnp.asarray(_randn(rng, (b_size, n_text, dim)), jnp.bfloat16)
  mask = _random_mask(rng, b_size)
  # Reference from the bf16-rounded values, in float64.
  video64 = np.asarray(video.astype(jnp.float32), np.float64)
  text64 = np.asarray(text.astype(jnp.float32), np.float64)

  loss = _mil_nce(video, text)
  assert loss.dtype == jnp.float32
  _assert_close(loss, ref_mil_nce(video64, text64), rtol=1e-3, atol=1e-3)

  loss = _nce(video, text[:, 0], jnp.asarray(mask))
  assert loss.dtype == jnp.float32
  _assert_close(loss, ref_nce(video64, text64[:, 0], mask), rtol=1e-3, atol=1e-3)
