"""The synthetic source (runlocal and unit tests): shapes, ranges, determinism, checkpointable position, host sharding."""

from __future__ import annotations

import numpy as np
import pytest

import data_pipelines
from tests.conftest import ROOT, load_config


def _source(batch_size=8, **kwargs):
  config = load_config(ROOT / 'configs' / 'demo_tiny.py')
  config.data.name = 'synthetic'
  return data_pipelines.build(config.data, 'train', batch_size=batch_size, **kwargs), config


def test_batch_layout_and_ranges():
  source, config = _source()
  batch = next(source)
  m = config.model
  assert batch['video'].shape == (8, m.video.num_frames, 32, 32, 3)
  assert batch['audio'].shape == (8, m.audio.num_samples)
  assert batch['text'].shape == (8, m.text.num_narrations, m.text.max_words)
  assert batch['video'].dtype == batch['audio'].dtype == np.float32
  assert batch['text'].dtype == np.int32
  assert -1 <= batch['video'].min() and batch['video'].max() <= 1
  assert -1 <= batch['audio'].min() and batch['audio'].max() <= 1
  assert 0 <= batch['text'].min() and batch['text'].max() < m.text.vocab_size
  for mask in ('video_mask', 'audio_mask', 'text_mask'):
    assert batch[mask].shape == (8,)


def test_missing_text_is_zeros_and_masked():
  source, config = _source(batch_size=64)
  batch = next(source)
  missing = batch['text_mask'] == 0
  assert missing.any() and (~missing).any()
  assert (batch['text'][missing] == 0).all()
  assert (batch['text'][~missing, :, 0] > 0).all()  # every valid narration has a first word


def test_deterministic_and_resumable():
  a, _ = _source(seed=3)
  b, _ = _source(seed=3)
  first = [next(a) for _ in range(3)]
  for x in first:
    y = next(b)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  state = a.get_state()
  expected = next(a)
  c, _ = _source(seed=3)
  c.set_state(state)
  np.testing.assert_array_equal(next(c)['video'], expected['video'])


def test_hosts_read_different_shares():
  a, _ = _source(batch_size=8, process_index=0, process_count=2)
  b, _ = _source(batch_size=8, process_index=1, process_count=2)
  xa, xb = next(a), next(b)
  assert xa['video'].shape[0] == xb['video'].shape[0] == 4
  assert not np.array_equal(xa['video'], xb['video'])
  # Together they are the one-host global batch: the data do not depend on the host count.
  whole, _ = _source(batch_size=8)
  x = next(whole)
  for key in x:
    np.testing.assert_array_equal(np.concatenate([xa[key], xb[key]]), x[key])


def test_bad_arguments_are_named():
  config = load_config(ROOT / 'configs' / 'demo_tiny.py')
  config.data.name = 'synthetic'
  with pytest.raises(ValueError, match='batch_size'):
    data_pipelines.build(config.data, 'train', batch_size=7, process_count=2)
  with pytest.raises(ValueError, match='split'):
    data_pipelines.build(config.data, 'dev', batch_size=8)
  config.data.name = 'kinetics'
  with pytest.raises(ValueError, match='data.name'):
    data_pipelines.build(config.data, 'train', batch_size=8)
