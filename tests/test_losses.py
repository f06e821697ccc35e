"""Checks the VATT contrastive losses against an independent float64 numpy reference.

The reference below is written from the specification of the official VATT code (objectives.py
AsymmetricNCE, embed_1 = video, embed_2 = text or audio, embed_2_mask = text / audio mask), not from
the implementation: both sides are L2-normalised, s(i, j, l) = <v_i, t_{j,l}> / temperature, and
for anchor b

  loss_b = logsumexp(H1(b) U H2(b)) - logsumexp({s(b, b, l)}),
  H1(b) = {s(b, j, l) : text j valid}     (video b against the texts of every sample),
  H2(b) = {s(i, b, l) : video i valid}    (the texts of b against the video of every sample).

A masked text is removed as a negative (H1) but its sample's video stays a negative (H2); a masked
video (vatt-jax's extension, the mirror image) is removed from H2 but its sample's texts stay in H1.
Anchors are the samples valid in both masks; the loss is their mean, exactly 0 when there is none.
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


def _valid(mask, b_size) -> np.ndarray:
  return np.ones(b_size, bool) if mask is None else np.asarray(mask).astype(bool)


def ref_per_anchor(video, text, text_mask=None, temperature=0.07, video_mask=None) -> dict:
  """{anchor b: loss_b} over the valid anchors, in float64."""
  v = _l2_normalize(video)
  t = _l2_normalize(text)
  b_size = v.shape[0]
  text_valid = _valid(text_mask, b_size)
  video_valid = _valid(video_mask, b_size)
  # s[i, j, l] = <v_i, t_{j,l}> / temperature
  s = np.einsum('id,jld->ijl', v, t) / temperature
  losses = {}
  for b in range(b_size):
    if not (text_valid[b] and video_valid[b]):
      continue
    h1 = s[b, text_valid, :]  # video b against the L texts of every sample with valid text
    h2 = s[video_valid, b, :]  # the L texts of b against every valid video
    denom = _logsumexp(np.concatenate([h1.ravel(), h2.ravel()]))
    numer = _logsumexp(s[b, b, :])
    losses[b] = denom - numer
  return losses


def ref_mil_nce(video, text, text_mask=None, temperature=0.07, video_mask=None) -> float:
  """video [B, D], text [B, L, D], masks [B] -> scalar loss, all in float64."""
  losses = ref_per_anchor(video, text, text_mask, temperature, video_mask)
  if not losses:
    return 0.0
  return float(np.mean(list(losses.values())))


def ref_nce(video, audio, mask=None, temperature=0.07, video_mask=None) -> float:
  return ref_mil_nce(video, np.asarray(audio)[:, None, :], mask, temperature, video_mask)


def ref_vatt(embeddings, batch, temperature=0.07, weight_va=1.0, weight_vt=1.0):
  video_mask = batch.get('video_mask')
  loss_va = ref_nce(
    embeddings['video_va'],
    embeddings['audio_va'],
    batch.get('audio_mask'),
    temperature,
    video_mask,
  )
  loss_vt = ref_mil_nce(
    embeddings['video_vt'],
    embeddings['text_vt'],
    batch.get('text_mask'),
    temperature,
    video_mask,
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


def _random_masks(rng, b_size, which, min_anchors=1):
  """(text_mask, video_mask) for which in {None, 'text', 'video', 'both'}; each mask present has
  a masked entry, and at least `min_anchors` samples are valid in both."""
  while True:
    text_mask = _random_mask(rng, b_size) if which in ('text', 'both') else None
    video_mask = _random_mask(rng, b_size) if which in ('video', 'both') else None
    anchors = _valid(text_mask, b_size) & _valid(video_mask, b_size)
    if anchors.sum() >= min(min_anchors, b_size):
      return text_mask, video_mask


def _j(x):
  return None if x is None else jnp.asarray(x)


def _assert_close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# 1. mil_nce vs reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'seed, b_size, n_text, dim, scale, temperature, masks',
  [
    (0, 1, 1, 8, 1.0, 0.07, None),
    (1, 1, 5, 8, 1.0, 0.07, None),
    (3, 6, 5, 16, 1.0, 0.07, None),
    (4, 8, 3, 32, 7.5, 0.07, None),
    (5, 8, 5, 16, 0.01, 0.2, None),
    (6, 8, 3, 16, 3.0, 0.07, 'text'),
    (7, 12, 1, 24, 1.0, 0.5, 'text'),
    (8, 5, 4, 8, 1.0, 1.0, 'text'),
    (9, 8, 3, 16, 3.0, 0.07, 'video'),
    (10, 12, 1, 24, 1.0, 0.5, 'video'),
    (13, 8, 5, 16, 1.0, 0.07, 'both'),
    (14, 16, 2, 8, 2.0, 0.1, 'both'),
    (15, 7, 3, 12, 1.0, 1.0, 'both'),
  ],
)
def test_mil_nce_matches_reference(seed, b_size, n_text, dim, scale, temperature, masks):
  rng = np.random.default_rng(seed)
  video = _randn(rng, (b_size, dim), scale)
  text = _randn(rng, (b_size, n_text, dim), scale * 2.0)
  text_mask, video_mask = _random_masks(rng, b_size, masks)
  out = _mil_nce(
    jnp.asarray(video),
    jnp.asarray(text),
    _j(text_mask),
    temperature=temperature,
    video_mask=_j(video_mask),
  )
  assert out.shape == ()
  assert out.dtype == jnp.float32
  _assert_close(out, ref_mil_nce(video, text, text_mask, temperature, video_mask))


@pytest.mark.parametrize('mask_dtype', [bool, np.float32, np.int32])
def test_mil_nce_mask_dtypes(mask_dtype):
  rng = np.random.default_rng(11)
  video = _randn(rng, (8, 16))
  text = _randn(rng, (8, 3, 16))
  mask = np.array([1, 0, 1, 1, 0, 1, 1, 0])
  vmask = np.array([1, 1, 0, 1, 1, 1, 0, 1])
  out = _mil_nce(jnp.asarray(video), jnp.asarray(text), jnp.asarray(mask.astype(mask_dtype)))
  _assert_close(out, ref_mil_nce(video, text, mask.astype(bool)))
  out = _mil_nce(
    jnp.asarray(video),
    jnp.asarray(text),
    jnp.asarray(mask.astype(mask_dtype)),
    video_mask=jnp.asarray(vmask.astype(mask_dtype)),
  )
  _assert_close(out, ref_mil_nce(video, text, mask.astype(bool), video_mask=vmask.astype(bool)))


def test_all_ones_mask_equals_no_mask():
  rng = np.random.default_rng(12)
  video = jnp.asarray(_randn(rng, (8, 16)))
  text = jnp.asarray(_randn(rng, (8, 3, 16)))
  ones = jnp.ones((8,), bool)
  unmasked = float(_mil_nce(video, text))
  _assert_close(_mil_nce(video, text, ones), unmasked)
  _assert_close(_mil_nce(video, text, video_mask=ones), unmasked)
  _assert_close(_mil_nce(video, text, ones, video_mask=ones), unmasked)


# ----------------------------------------------------------------------------------------------
# 2. the official value from the issue: the masked sample's video stays a negative
# ----------------------------------------------------------------------------------------------

# Generator and temperature that reproduce the issue's numbers: numpy default_rng(1), video drawn
# before text, float64 draws, temperature 0.07, mask [1, 1, 0] as the text (embed_2) mask.
_ISSUE_UNMASKED = 6.627159
_ISSUE_MASKED = 5.761703
_ISSUE_OLD_MASKED = 3.825  # what vatt-jax gave when it also dropped the masked sample's video


def _issue_inputs():
  rng = np.random.default_rng(1)
  video = rng.normal(size=(3, 4))
  text = rng.normal(size=(3, 2, 4))
  return video, text, np.array([1, 1, 0], bool)


def test_issue_example_matches_official_values():
  video, text, mask = _issue_inputs()
  # The float64 reference.
  _assert_close(ref_mil_nce(video, text), _ISSUE_UNMASKED, rtol=0, atol=1e-6)
  _assert_close(ref_mil_nce(video, text, mask), _ISSUE_MASKED, rtol=0, atol=1e-6)
  # mil_nce (float32).
  jv, jt = jnp.asarray(video, jnp.float32), jnp.asarray(text, jnp.float32)
  _assert_close(_mil_nce(jv, jt), _ISSUE_UNMASKED, rtol=0, atol=1e-5)
  _assert_close(_mil_nce(jv, jt, jnp.asarray(mask)), _ISSUE_MASKED, rtol=0, atol=1e-5)
  # Dropping the masked sample's video too (old behaviour) is what the video mask adds.
  old = _mil_nce(jv, jt, jnp.asarray(mask), video_mask=jnp.asarray(mask))
  _assert_close(old, _ISSUE_OLD_MASKED, rtol=0, atol=1e-3)
  _assert_close(old, ref_mil_nce(video, text, mask, video_mask=mask))


def test_issue_example_by_hand():
  """The masked value, spelled out for anchors 0 and 1 of the 3-sample example."""
  video, text, _ = _issue_inputs()
  v = video / np.linalg.norm(video, axis=-1, keepdims=True)
  t = text / np.linalg.norm(text, axis=-1, keepdims=True)
  s = np.einsum('id,jld->ijl', v, t) / 0.07
  losses = []
  for b in (0, 1):
    h1 = [s[b, j, k] for j in (0, 1) for k in range(2)]  # text 2 removed
    h2 = [s[i, b, k] for i in (0, 1, 2) for k in range(2)]  # video 2 kept
    losses.append(_logsumexp(h1 + h2) - _logsumexp(s[b, b]))
  _assert_close(np.mean(losses), _ISSUE_MASKED, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 3. nce vs reference, mirror symmetry, and the exact log 2 case
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'seed, b_size, dim, temperature, masks',
  [
    (20, 2, 8, 0.07, None),
    (22, 8, 16, 0.07, 'text'),
    (23, 5, 12, 0.7, 'text'),
    (25, 8, 16, 0.07, 'video'),
    (26, 9, 12, 0.3, 'both'),
  ],
)
def test_nce_matches_reference(seed, b_size, dim, temperature, masks):
  rng = np.random.default_rng(seed)
  video = _randn(rng, (b_size, dim), 3.0)
  audio = _randn(rng, (b_size, dim), 0.5)
  audio_mask, video_mask = _random_masks(rng, b_size, masks)
  out = _nce(
    jnp.asarray(video),
    jnp.asarray(audio),
    _j(audio_mask),
    temperature=temperature,
    video_mask=_j(video_mask),
  )
  assert out.shape == ()
  assert out.dtype == jnp.float32
  _assert_close(out, ref_nce(video, audio, audio_mask, temperature, video_mask))


@pytest.mark.parametrize('seed', [24, 27])
def test_nce_equals_mil_nce_with_one_text(seed):
  rng = np.random.default_rng(seed)
  video = jnp.asarray(_randn(rng, (8, 16)))
  audio = jnp.asarray(_randn(rng, (8, 16)))
  mask = jnp.asarray(_random_mask(rng, 8))
  vmask = jnp.asarray(_random_mask(rng, 8))
  _assert_close(_nce(video, audio, mask), float(_mil_nce(video, audio[:, None, :], mask)))
  _assert_close(
    _nce(video, audio, mask, video_mask=vmask),
    float(_mil_nce(video, audio[:, None, :], mask, video_mask=vmask)),
  )


@pytest.mark.parametrize('seed, which', [(28, 'text'), (29, 'video'), (35, 'both'), (36, None)])
def test_nce_video_mask_is_mirror_of_mask(seed, which):
  """With L = 1 swapping the two modalities swaps the halves, so the audio mask of nce(v, a) is
  the video mask of nce(a, v) and vice versa."""
  rng = np.random.default_rng(seed)
  video = jnp.asarray(_randn(rng, (10, 12)))
  audio = jnp.asarray(_randn(rng, (10, 12), 2.0))
  audio_mask, video_mask = _random_masks(rng, 10, which)
  out = _nce(video, audio, _j(audio_mask), video_mask=_j(video_mask))
  swapped = _nce(audio, video, _j(video_mask), video_mask=_j(audio_mask))
  _assert_close(swapped, float(out), rtol=1e-6, atol=1e-6)
  _assert_close(out, ref_nce(video, audio, audio_mask, video_mask=video_mask))


@pytest.mark.parametrize('seed, scale', [(30, 1.0), (31, 1.0), (32, 0.05), (33, 1e3), (34, 1e4)])
def test_nce_single_sample_is_log2(seed, scale):
  rng = np.random.default_rng(seed)
  video = _randn(rng, (1, 16), scale)
  audio = _randn(rng, (1, 16), scale)
  out = _nce(jnp.asarray(video), jnp.asarray(audio))
  assert np.isfinite(float(out))
  _assert_close(out, np.log(2.0), rtol=1e-6, atol=1e-6)
  _assert_close(ref_nce(video, audio), np.log(2.0), rtol=1e-12, atol=1e-12)
  # A valid single sample under either mask is the same.
  one = jnp.ones((1,), bool)
  _assert_close(
    _nce(jnp.asarray(video), jnp.asarray(audio), one, video_mask=one),
    np.log(2.0),
    rtol=1e-6,
    atol=1e-6,
  )


@pytest.mark.parametrize('seed, n_text', [(37, 1), (38, 5)])
def test_mil_nce_single_sample_is_log2(seed, n_text):
  rng = np.random.default_rng(seed)
  video = _randn(rng, (1, 16))
  text = _randn(rng, (1, n_text, 16))
  _assert_close(_mil_nce(jnp.asarray(video), jnp.asarray(text)), np.log(2.0), rtol=1e-6, atol=1e-6)
  _assert_close(ref_mil_nce(video, text), np.log(2.0), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 4. no valid anchor -> exactly 0 with zero (finite) gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'loss_name, b_size, n_text, mask_dtype, which',
  [
    ('mil_nce', 8, 3, bool, 'text'),
    ('mil_nce', 3, 2, np.float32, 'text'),
    ('nce', 1, 1, np.float32, 'text'),
    ('mil_nce', 8, 3, bool, 'video'),
    ('nce', 5, 1, np.float32, 'video'),
    ('mil_nce', 6, 2, bool, 'both'),
    ('nce', 1, 1, bool, 'both'),
    # Complementary masks: every sample has a valid modality but none both.
    ('mil_nce', 8, 3, bool, 'complementary'),
    ('nce', 6, 1, np.float32, 'complementary'),
  ],
)
def test_all_masked_is_zero_with_zero_grad(loss_name, b_size, n_text, mask_dtype, which):
  rng = np.random.default_rng(40 + b_size)
  video = jnp.asarray(_randn(rng, (b_size, 16)))
  text = jnp.asarray(_randn(rng, (b_size, n_text, 16)))
  zeros = np.zeros((b_size,), bool)
  if which == 'complementary':
    tm = np.arange(b_size) % 2 == 0
    text_mask, video_mask = tm, ~tm
  else:
    text_mask = zeros if which in ('text', 'both') else None
    video_mask = zeros if which in ('video', 'both') else None
  text_mask = None if text_mask is None else jnp.asarray(text_mask.astype(mask_dtype))
  video_mask = None if video_mask is None else jnp.asarray(video_mask.astype(mask_dtype))
  if loss_name == 'mil_nce':
    loss, grads = _mil_nce_vg(video, text, text_mask, video_mask=video_mask)
  else:
    loss, grads = _nce_vg(video, text[:, 0], text_mask, video_mask=video_mask)
  assert float(loss) == 0.0
  for g in grads:
    g = np.asarray(g)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g, np.zeros_like(g))


# ----------------------------------------------------------------------------------------------
# 5. what a masked text / a masked video does and does not influence
# ----------------------------------------------------------------------------------------------


def _scramble(rng, x, rows, first_valid, scale=50.0):
  """Replace rows of x by something very different: a copy of a valid row (a strong negative if it
  leaked) or a large random vector."""
  x = x.copy()
  for j in rows:
    x[j] = x[first_valid] if j % 2 else _randn(rng, x.shape[1:], scale)
  return x


@pytest.mark.parametrize('seed', [50, 51, 52, 53])
def test_masked_text_is_no_negative_but_its_video_is(seed):
  rng = np.random.default_rng(seed)
  b_size, n_text, dim = 8, 3, 16
  video = _randn(rng, (b_size, dim))
  text = _randn(rng, (b_size, n_text, dim))
  mask = _random_mask(rng, b_size, min_valid=2)
  masked, valid = np.flatnonzero(~mask), np.flatnonzero(mask)
  loss, (g_video, g_text) = _mil_nce_vg(jnp.asarray(video), jnp.asarray(text), jnp.asarray(mask))
  loss = float(loss)
  _assert_close(loss, ref_mil_nce(video, text, mask))

  # The masked samples' texts have no influence at all.
  text2 = _scramble(rng, text, masked, int(valid[0]))
  loss2 = _mil_nce(jnp.asarray(video), jnp.asarray(text2), jnp.asarray(mask))
  _assert_close(loss2, loss, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(g_text)[~mask], 0.0)

  # Their videos do: they stay negatives for the valid samples' texts (official behaviour).
  video2 = _scramble(rng, video, masked, int(valid[0]))
  video2[masked] = text[valid[0], 0]  # aligned with a valid sample's text: a hard negative
  loss3 = float(_mil_nce(jnp.asarray(video2), jnp.asarray(text), jnp.asarray(mask)))
  assert loss3 > loss + 1e-3
  _assert_close(loss3, ref_mil_nce(video2, text, mask))
  assert np.all(np.linalg.norm(np.asarray(g_video)[~mask], axis=-1) > 0.0)

  # Their own anchor rows do not count: the loss is the mean over the valid anchors only.
  per_anchor = ref_per_anchor(video, text, mask)
  assert sorted(per_anchor) == list(valid)
  _assert_close(loss, np.mean(list(per_anchor.values())))
  # And it differs from dropping the masked videos too (the old, non-official behaviour).
  assert abs(loss - ref_mil_nce(video, text, mask, video_mask=mask)) > 1e-4


@pytest.mark.parametrize('seed', [54, 55, 56])
def test_masked_video_is_no_negative_but_its_text_is(seed):
  rng = np.random.default_rng(seed)
  b_size, n_text, dim = 8, 3, 16
  video = _randn(rng, (b_size, dim))
  text = _randn(rng, (b_size, n_text, dim))
  vmask = _random_mask(rng, b_size, min_valid=2)
  masked, valid = np.flatnonzero(~vmask), np.flatnonzero(vmask)
  jvm = jnp.asarray(vmask)
  loss, (g_video, g_text) = _mil_nce_vg(jnp.asarray(video), jnp.asarray(text), video_mask=jvm)
  loss = float(loss)
  _assert_close(loss, ref_mil_nce(video, text, video_mask=vmask))

  # The masked samples' videos have no influence at all.
  video2 = _scramble(rng, video, masked, int(valid[0]))
  loss2 = _mil_nce(jnp.asarray(video2), jnp.asarray(text), video_mask=jvm)
  _assert_close(loss2, loss, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(g_video)[~vmask], 0.0)

  # Their texts do: they stay negatives for the valid samples' videos.
  text2 = text.copy()
  text2[masked] = video[valid[0]]  # aligned with a valid sample's video: hard negatives
  loss3 = float(_mil_nce(jnp.asarray(video), jnp.asarray(text2), video_mask=jvm))
  assert loss3 > loss + 1e-3
  _assert_close(loss3, ref_mil_nce(video, text2, video_mask=vmask))
  assert np.all(np.linalg.norm(np.asarray(g_text)[~vmask].reshape(len(masked), -1), axis=-1) > 0)

  assert sorted(ref_per_anchor(video, text, video_mask=vmask)) == list(valid)
  assert abs(loss - ref_mil_nce(video, text, vmask, video_mask=vmask)) > 1e-4


@pytest.mark.parametrize('seed', [57, 58, 59])
def test_equal_masks_equal_the_valid_subbatch(seed):
  """Masking both modalities of a sample removes it entirely: the loss is that of the sub-batch of
  the other samples."""
  rng = np.random.default_rng(seed)
  b_size, n_text, dim = 9, 4, 16
  video = _randn(rng, (b_size, dim))
  text = _randn(rng, (b_size, n_text, dim))
  mask = _random_mask(rng, b_size, min_valid=2)
  both = _mil_nce(jnp.asarray(video), jnp.asarray(text), jnp.asarray(mask), video_mask=mask)
  sub = _mil_nce(jnp.asarray(video[mask]), jnp.asarray(text[mask]))
  _assert_close(both, float(sub), rtol=1e-6, atol=1e-6)
  _assert_close(both, ref_mil_nce(video[mask], text[mask]))


@pytest.mark.parametrize('seed', [63, 64, 65])
def test_both_masks_together(seed):
  rng = np.random.default_rng(seed)
  b_size, n_text, dim = 10, 3, 16
  video = _randn(rng, (b_size, dim))
  text = _randn(rng, (b_size, n_text, dim))
  text_mask, video_mask = _random_masks(rng, b_size, 'both', min_anchors=2)
  # A sample with a valid text but masked video, and one the other way round.
  text_mask[0], video_mask[0] = True, False
  text_mask[1], video_mask[1] = False, True
  jtm, jvm = jnp.asarray(text_mask), jnp.asarray(video_mask)
  loss, (g_video, g_text) = _mil_nce_vg(jnp.asarray(video), jnp.asarray(text), jtm, video_mask=jvm)
  _assert_close(loss, ref_mil_nce(video, text, text_mask, video_mask=video_mask))
  anchors = text_mask & video_mask
  assert sorted(ref_per_anchor(video, text, text_mask, video_mask=video_mask)) == list(
    np.flatnonzero(anchors)
  )
  # Exactly-zero gradients: masked videos and masked texts; nonzero: the kept modality.
  g_video, g_text = np.asarray(g_video), np.asarray(g_text)
  np.testing.assert_array_equal(g_video[~video_mask], 0.0)
  np.testing.assert_array_equal(g_text[~text_mask], 0.0)
  assert np.linalg.norm(g_video[1]) > 0.0  # text masked, video a negative
  assert np.linalg.norm(g_text[0]) > 0.0  # video masked, texts negatives
  # Changing what is masked changes nothing.
  video2, text2 = video.copy(), text.copy()
  video2[~video_mask] = _randn(rng, (int((~video_mask).sum()), dim), 30.0)
  text2[~text_mask] = _randn(rng, (int((~text_mask).sum()), n_text, dim), 30.0)
  loss2 = _mil_nce(jnp.asarray(video2), jnp.asarray(text2), jtm, video_mask=jvm)
  _assert_close(loss2, float(loss), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 6. permutation equivariance
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'seed, masks', [(60, None), (61, 'text'), (62, 'text'), (66, 'video'), (67, 'both')]
)
def test_permutation_invariance(seed, masks):
  rng = np.random.default_rng(seed)
  b_size, n_text, dim = 8, 3, 16
  video = _randn(rng, (b_size, dim))
  text = _randn(rng, (b_size, n_text, dim))
  text_mask, video_mask = _random_masks(rng, b_size, masks)
  text_mask, video_mask = _valid(text_mask, b_size), _valid(video_mask, b_size)
  perm = rng.permutation(b_size)
  loss = _mil_nce(
    jnp.asarray(video), jnp.asarray(text), jnp.asarray(text_mask), video_mask=video_mask
  )
  loss_p = _mil_nce(
    jnp.asarray(video[perm]),
    jnp.asarray(text[perm]),
    jnp.asarray(text_mask[perm]),
    video_mask=jnp.asarray(video_mask[perm]),
  )
  _assert_close(loss_p, float(loss), rtol=1e-6, atol=1e-6)
  # Permuting the L texts inside each sample does not matter either.
  text_l = text[:, rng.permutation(n_text), :]
  loss_l = _mil_nce(
    jnp.asarray(video), jnp.asarray(text_l), jnp.asarray(text_mask), video_mask=video_mask
  )
  _assert_close(loss_l, float(loss), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 7. gradients vs float64 finite differences of the reference
# ----------------------------------------------------------------------------------------------


def _fd_grad(fn, x, index, eps=1e-5):
  xp, xm = x.copy(), x.copy()
  xp[index] += eps
  xm[index] -= eps
  return (fn(xp) - fn(xm)) / (2 * eps)


@pytest.mark.parametrize(
  'seed, b_size, n_text, dim, temperature, masks',
  [
    (70, 3, 2, 4, 0.5, None),
    (71, 4, 3, 5, 0.2, 'text'),
    (72, 4, 2, 5, 0.3, 'video'),
    (73, 5, 2, 4, 0.5, 'both'),
  ],
)
def test_grad_matches_finite_differences(seed, b_size, n_text, dim, temperature, masks):
  rng = np.random.default_rng(seed)
  video = _randn(rng, (b_size, dim))
  text = _randn(rng, (b_size, n_text, dim))
  text_mask, video_mask = _random_masks(rng, b_size, masks, min_anchors=2)

  loss, (g_video, g_text) = _mil_nce_vg(
    jnp.asarray(video),
    jnp.asarray(text),
    _j(text_mask),
    temperature=temperature,
    video_mask=_j(video_mask),
  )
  g_video, g_text = np.asarray(g_video), np.asarray(g_text)

  video64, text64 = video.astype(np.float64), text.astype(np.float64)
  ref = functools.partial(ref_mil_nce, temperature=temperature, video_mask=video_mask)
  _assert_close(loss, ref(video64, text64, text_mask))
  # Every coordinate (the inputs are small), so the masked samples' rows are checked too.
  for i in np.ndindex(*video.shape):
    fd = _fd_grad(lambda v: ref(v, text64, text_mask), video64, i)
    np.testing.assert_allclose(g_video[i], fd, rtol=1e-3, atol=1e-4)
  for i in np.ndindex(*text.shape):
    fd = _fd_grad(lambda t: ref(video64, t, text_mask), text64, i)
    np.testing.assert_allclose(g_text[i], fd, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# 8. vatt_pretraining_loss
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


@pytest.mark.parametrize('seed', [85, 86])
def test_vatt_pretraining_loss_passes_each_mask_to_its_modality(seed):
  rng = np.random.default_rng(seed)
  b_size = 8
  embeddings = _vatt_inputs(rng, b_size)
  video_mask, audio_mask, text_mask = (_random_mask(rng, b_size, 3) for _ in range(3))
  batch = {'video_mask': video_mask, 'audio_mask': audio_mask, 'text_mask': text_mask}
  total, terms = jax.jit(vatt_pretraining_loss)(
    {k: jnp.asarray(v) for k, v in embeddings.items()},
    {k: jnp.asarray(v) for k, v in batch.items()},
  )
  e = {k: jnp.asarray(v) for k, v in embeddings.items()}
  _assert_close(
    terms['loss_va'], float(_nce(e['video_va'], e['audio_va'], audio_mask, video_mask=video_mask))
  )
  _assert_close(
    terms['loss_vt'], float(_mil_nce(e['video_vt'], e['text_vt'], text_mask, video_mask=video_mask))
  )
  _assert_close(
    total,
    0.5
    * (
      ref_nce(embeddings['video_va'], embeddings['audio_va'], audio_mask, 0.07, video_mask)
      + ref_mil_nce(embeddings['video_vt'], embeddings['text_vt'], text_mask, 0.07, video_mask)
    ),
  )

  # Without a video mask, a text-less clip's video is still a negative of the video–text term:
  # the official loss, not the one over the sub-batch of clips with text.
  batch = {'text_mask': jnp.asarray(text_mask)}
  _, terms = jax.jit(vatt_pretraining_loss)(e, batch)
  _assert_close(
    terms['loss_vt'], ref_mil_nce(embeddings['video_vt'], embeddings['text_vt'], text_mask)
  )
  sub = ref_mil_nce(embeddings['video_vt'][text_mask], embeddings['text_vt'][text_mask])
  assert abs(float(terms['loss_vt']) - sub) > 1e-4
  _assert_close(terms['loss_va'], ref_nce(embeddings['video_va'], embeddings['audio_va']))


@pytest.mark.parametrize('weights', [(-1.0, 1.0), (1.0, -0.5), (0.0, 0.0)])
def test_vatt_pretraining_loss_rejects_bad_weights(weights):
  rng = np.random.default_rng(91)
  embeddings = {k: jnp.asarray(v) for k, v in _vatt_inputs(rng).items()}
  with pytest.raises(ValueError):
    vatt_pretraining_loss(embeddings, {}, weight_va=weights[0], weight_vt=weights[1])


# ----------------------------------------------------------------------------------------------
# 9. bfloat16 inputs
# ----------------------------------------------------------------------------------------------


def test_bfloat16_inputs():
  rng = np.random.default_rng(100)
  b_size, n_text, dim = 8, 3, 16
  video = jnp.asarray(_randn(rng, (b_size, dim)), jnp.bfloat16)
  text = jnp.asarray(_randn(rng, (b_size, n_text, dim)), jnp.bfloat16)
  mask = _random_mask(rng, b_size)
  vmask = _random_mask(rng, b_size)
  # Reference from the bf16-rounded values, in float64.
  video64 = np.asarray(video.astype(jnp.float32), np.float64)
  text64 = np.asarray(text.astype(jnp.float32), np.float64)

  loss = _mil_nce(video, text)
  assert loss.dtype == jnp.float32
  _assert_close(loss, ref_mil_nce(video64, text64), rtol=1e-3, atol=1e-3)

  loss = _nce(video, text[:, 0], jnp.asarray(mask))
  assert loss.dtype == jnp.float32
  _assert_close(loss, ref_nce(video64, text64[:, 0], mask), rtol=1e-3, atol=1e-3)

  loss = _mil_nce(video, text, jnp.asarray(mask), video_mask=jnp.asarray(vmask))
  _assert_close(loss, ref_mil_nce(video64, text64, mask, video_mask=vmask), rtol=1e-3, atol=1e-3)
