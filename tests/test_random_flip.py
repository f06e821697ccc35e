"""data.random_flip: False never mirrors a training clip (every training-time caller honours it),
True mirrors some; the rest of the augmentation draws the same either way."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from configs import common
from data_pipelines import options, schema
from data_pipelines import video as video_ops
from data_pipelines.classification import TfdsSource
from data_pipelines.long_video import LongVideoSource
from data_pipelines.pretrain import ShardSource
from tests import toy_models
from tests.test_pipeline import _write

HEIGHT, WIDTH, FPS, DURATION = 48, 64, 5.0, 3.0
DARK, BRIGHT = (
  77,
  179,
)  # 0.3 and 0.7: no colour jitter reaches 0 or 1 (clipping), none reorders them


def _asymmetric_frame() -> np.ndarray:
  """[H, W, 3] uint8: the left half dark, the right half bright."""
  frame = np.full((HEIGHT, WIDTH, 3), DARK, np.uint8)
  frame[:, WIDTH // 2 :] = BRIGHT
  return frame


def _mirrored(clips: np.ndarray) -> np.ndarray:
  """[N] bool of clips [N, T, S, S, 3]: the left third brighter than the right third. Crops of at
  least 90 % of the frame keep the left third dark and the right third bright unless mirrored."""
  third = clips.shape[-2] // 3
  left = clips[..., :third, :].mean(axis=(1, 2, 3, 4))
  right = clips[..., -third:, :].mean(axis=(1, 2, 3, 4))
  assert (np.abs(left - right) > 0.2).all()  # every clip is clearly one way or the other
  return left > right


def test_decode_and_crop_never_mirror_without_the_flip():
  frame = _asymmetric_frame()
  jpegs = tf.constant([tf.io.encode_jpeg(frame, quality=100).numpy()] * 2)
  whole = tf.constant([0, 0, HEIGHT, WIDTH])
  decoded = {flip: [] for flip in (True, False)}
  cropped = {flip: [] for flip in (True, False)}
  for i in range(32):
    seed = tf.constant([7, i], tf.int64)
    for flip in (True, False):
      decoded[flip].append(
        video_ops.decode_clip(jpegs, 24, seed, train=True, window=whole, flip=flip).numpy()
      )
      cropped[flip].append(
        video_ops.crop_clip(tf.constant(frame[None]), 24, seed, train=True, flip=flip,
                            area_range=(0.9, 1.0), aspect_range=(1.2, 1.5)).numpy()
      )  # fmt: skip
  for clips in (decoded, cropped):
    with_flip, without = np.stack(clips[True]), np.stack(clips[False])
    assert not _mirrored(without).any()
    mirrored = _mirrored(with_flip)
    assert 4 <= mirrored.sum() <= 28
    # The switch removes the coin only: the same crop and colour jitter from the same seed.
    np.testing.assert_array_equal(with_flip[~mirrored], without[~mirrored])
    np.testing.assert_allclose(with_flip[mirrored], without[mirrored][..., ::-1, :], atol=1e-6)
  # Evaluation never flips, whatever the switch.
  seed = tf.constant([7, 0], tf.int64)
  np.testing.assert_array_equal(
    video_ops.decode_clip(jpegs, 24, seed, train=False, flip=True),
    video_ops.decode_clip(jpegs, 24, seed, train=False, flip=False),
  )


def test_the_switch_is_a_checked_config_field():
  data = common.pretraining_config(toy_models.model_config()).data
  assert data.random_flip is True and options.random_flip(data) is True
  assert options.random_flip(ml_collections.ConfigDict()) is True  # configs from before it
  assert options.random_flip(ml_collections.ConfigDict(dict(random_flip=False))) is False
  with pytest.raises(ValueError, match="config data.random_flip must be True or False, got 'no'"):
    options.random_flip(ml_collections.ConfigDict(dict(random_flip='no')))


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp('flip')
  jpeg = tf.io.encode_jpeg(_asymmetric_frame(), quality=100).numpy()
  records = [
    schema.Record(
      media_id=f'v{i}.mp4',
      duration=DURATION,
      frame_rate=FPS,
      height=HEIGHT,
      width=WIDTH,
      frames=[jpeg] * int(DURATION * FPS),
      captions=[schema.Caption(j, j + 1.0, f'caption {j}') for j in range(3)],
    )  # fmt: skip
    for i in range(8)
  ]
  _write(root / 'train' / 'a.tfrecord', records)
  return root


def _config(path, flip: bool, **overrides):
  cfg = dict(
      name='shards', path=str(path), tokenizer='', fps=FPS, num_frames=2, frame_size=24,
      sample_rate=8000, num_samples=3200, max_words=4, num_narrations=1, vocab_size=64,
      shuffle_buffer=1, cycle_length=1, deterministic=True, on_bad_input='fatal', eval_clips=1,
      crop_area_range=(0.9, 1.0), crop_aspect_range=(1.2, 1.5), modalities=('video',),
      random_flip=flip,
  )  # fmt: skip
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


SOURCES = {
  'clips': (ShardSource, {}),
  'caption_clips': (ShardSource, dict(caption_clips=True)),
  'long_video': (LongVideoSource, dict(long_video=dict(clips=2, max_clips=3))),
}


@pytest.mark.parametrize('kind', list(SOURCES))
def test_training_sources_honour_the_switch(shards, kind):
  source_class, overrides = SOURCES[kind]
  mirrored = {}
  for flip in (True, False):
    source = source_class(_config(shards, flip, **overrides), 'train', batch_size=16, seed=0)
    clips = next(source)['video']
    assert clips.shape == (16, 2, 24, 24, 3)
    mirrored[flip] = _mirrored(clips)
  assert not mirrored[False].any()
  assert 0 < mirrored[True].sum() < 16


def test_tfds_training_crops_honour_the_switch():
  frames = tf.constant(np.stack([_asymmetric_frame()] * 2))
  cfg = dict(name='tfds', tfds_name='ucf101', modality='video', video_key='video',
             label_key='label', num_frames=2, frame_size=24, crop_area_range=(0.9, 1.0),
             crop_aspect_range=(1.2, 1.5))  # fmt: skip
  mirrored = {}
  for flip in (True, False):
    source = TfdsSource(ml_collections.ConfigDict(dict(cfg, random_flip=flip)), 'train',
                        batch_size=1)  # fmt: skip
    clips = [source._crops(frames, tf.constant([0, i], tf.int64)).numpy() for i in range(16)]
    mirrored[flip] = _mirrored(np.stack(clips))
  assert not mirrored[False].any() and 0 < mirrored[True].sum() < 16
