"""TFDS classification pipelines, read through tfds.testing.mock_data (no download)."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tensorflow_datasets.testing.mocking  # noqa: F401 (at collection; see tests/conftest.py)

import data_pipelines


def _config(**overrides):
  cfg = dict(
      name='tfds', tfds_name='ucf101', modality='video', video_key='video', audio_key='audio',
      label_key='label', stored_fps=25.0, fps=10.0, num_frames=4, frame_size=32,
      sample_rate=16_000, num_samples=4000, shuffle_buffer=4, deterministic=True, eval_clips=3,
  )  # fmt: skip
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def test_ucf101_train_and_eval_clips():
  with tfds.testing.mock_data(num_examples=6):
    train = next(data_pipelines.build(_config(), 'train', batch_size=4, seed=0))
    test = next(data_pipelines.build(_config(), 'test', batch_size=4, seed=0))
  assert train['video'].shape == (4, 4, 32, 32, 3) and train['label'].shape == (4,)
  assert -1 <= train['video'].min() and train['video'].max() <= 1
  assert ((0 <= train['label']) & (train['label'] < 101)).all()
  assert test['video'].shape == (4, 3, 4, 32, 32, 3)


def test_deterministic_mode_repeats():
  with tfds.testing.mock_data(num_examples=6):
    a = next(data_pipelines.build(_config(), 'train', batch_size=4, seed=1))
    b = next(data_pipelines.build(_config(), 'train', batch_size=4, seed=1))
  np.testing.assert_array_equal(a['video'], b['video'])
  np.testing.assert_array_equal(a['label'], b['label'])


def test_audio_dataset():
  cfg = _config(tfds_name='crema_d', modality='audio')
  with tfds.testing.mock_data(num_examples=4):
    batch = next(data_pipelines.build(cfg, 'test', batch_size=2, seed=0))
  assert batch['audio'].shape == (2, 3, 4000) and batch['label'].shape == (2,)
  assert np.abs(batch['audio']).max() <= 1.0


def test_bad_modality_is_named():
  with pytest.raises(ValueError, match='data.modality'):
    data_pipelines.build(_config(modality='text'), 'train', batch_size=4)
