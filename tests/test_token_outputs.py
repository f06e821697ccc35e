"""VATT's token outputs (config model.token_outputs): per-frame and per-word video–text embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_models import Tiny, rngs, train_apply
from vatt_jax.models.heads import CommonSpace
from vatt_jax.models.vatt import frame_means


def _reference_frame_means(tokens, grid, kept):
  t, h, w = grid
  tokens = np.asarray(tokens, np.float64)
  positions = np.arange(t * h * w) if kept is None else np.asarray(kept)
  frames = np.zeros((tokens.shape[0], t, tokens.shape[-1]))
  mask = np.zeros((tokens.shape[0], t))
  for frame in range(t):
    mine = [k for k, p in enumerate(positions) if p // (h * w) == frame]
    if mine:
      frames[:, frame] = tokens[:, mine].mean(axis=1)
      mask[:, frame] = 1.0
  return frames, mask


@pytest.mark.parametrize('dropped', [False, True])
def test_frame_means_match_reference(dropped):
  rng = np.random.default_rng(7)
  grid = (4, 2, 3)
  kept = None
  if dropped:  # positions of frames 0 and 2 only: frames 1 and 3 have no token left
    kept = np.sort(rng.choice([p for p in range(24) if p // 6 in (0, 2)], 7, replace=False))
  tokens = rng.normal(size=(3, 24 if kept is None else len(kept), 5)).astype(np.float32)
  frames, mask = frame_means(jnp.asarray(tokens), grid, None if kept is None else jnp.asarray(kept))
  want_frames, want_mask = _reference_frame_means(tokens, grid, kept)
  np.testing.assert_allclose(frames, want_frames, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(mask, want_mask)
  if dropped:
    assert want_mask[0].tolist() == [1, 0, 1, 0]


@pytest.fixture(scope='module')
def tiny():
  return Tiny()


@pytest.mark.slow  # ~10 s
def test_token_outputs_leave_the_other_outputs_unchanged(tiny):
  with_tokens = tiny.variant(token_outputs=True)
  out = jax.jit(lambda v, b: with_tokens.apply(v, b, train=False))(tiny.variables, tiny.batch)
  for key, value in tiny.eval_out.items():
    np.testing.assert_array_equal(out[key], value, err_msg=key)
  cfg = tiny.cfg
  batch, narrations, words = tiny.batch['text'].shape
  frames = cfg.video.num_frames // cfg.video.patch_size[0]
  assert out['video_frames_vt'].shape == (batch, frames, cfg.head.vt_dim)
  assert out['text_words_vt'].shape == (batch, narrations, words, cfg.head.vt_dim)
  np.testing.assert_array_equal(out['video_frames_mask'], np.ones((batch, frames)))
  np.testing.assert_array_equal(out['text_words_mask'], tiny.batch['text'] != 0)

  # Training (DropToken on): the same draws, so the same outputs and batch statistics.
  plain, updates = train_apply(tiny.module)(tiny.variables, tiny.batch, rngs=rngs(3))
  out, token_updates = train_apply(with_tokens)(tiny.variables, tiny.batch, rngs=rngs(3))
  for key, value in plain.items():
    np.testing.assert_array_equal(out[key], value, err_msg=key)
  jax.tree.map(np.testing.assert_array_equal, token_updates, updates)
  mask = np.asarray(out['video_frames_mask'])
  assert set(np.unique(mask)) <= {0.0, 1.0} and mask.max() == 1.0
  assert np.all(np.isfinite(out['video_frames_vt'])) and np.all(np.isfinite(out['text_words_vt']))


def test_head_projects_tokens_along_the_representations_path():
  """A token equal to the representation lands where the representation does (running
  statistics), in training too, and does not touch the batch statistics."""
  rng = np.random.default_rng(0)
  head = CommonSpace(va_dim=6, vt_dim=4, relu_before_vt=True)
  video = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(5, 2, 7)), jnp.float32)
  variables = head.init(jax.random.key(0), video=video, text=text, train=False)
  # Non-trivial running statistics, so using them differs from using the batch's.
  variables = {
    'params': variables['params'],
    'batch_stats': jax.tree.map(
      lambda x: x + jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32),
      variables['batch_stats'],
    ),
  }
  kwargs = dict(video=video, text=text, video_frames=video[:, None], text_words=text[:, :, None])
  out = head.apply(variables, **kwargs, train=False)
  np.testing.assert_allclose(out['video_frames_vt'][:, 0], out['video_vt'], rtol=1e-6)
  np.testing.assert_allclose(out['text_words_vt'][:, :, 0], out['text_vt'], rtol=1e-6)

  trained, updates = head.apply(variables, **kwargs, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(trained['video_frames_vt'], out['video_frames_vt'], rtol=1e-6)
  np.testing.assert_allclose(trained['text_words_vt'], out['text_words_vt'], rtol=1e-6)
  assert not np.allclose(trained['video_vt'], out['video_vt'])  # batch statistics in training
  _, plain_updates = head.apply(
    variables, video=video, text=text, train=True, mutable=['batch_stats']
  )
  jax.tree.map(np.testing.assert_array_equal, updates, plain_updates)
