"""Long-video batches: V videos × C caption-anchored clips in flat rows; eval padding; counts."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

import data_pipelines
from data_pipelines import demo, schema
from data_pipelines import text as text_ops
from data_pipelines.long_video import LongVideoSource
from data_pipelines.pretrain import ShardSource
from tests.conftest import ROOT
from tests.test_pipeline import WORDS, _write, tokenizer_path  # noqa: F401 (a fixture)

FPS, SAMPLE_RATE, DURATION = 5.0, 8000, 10.0  # stored: 5 fps, 8 kHz, 10 s (50 frames)
CLIP = 0.8  # seconds: 4 frames at 5 fps, 6400 samples


def _grey(index):
  return 40 + 3 * np.asarray(index)  # stored frame k is uniform grey 40 + 3k: its time, readable


def _span(j: int) -> tuple[float, float]:
  return 1.2 * j + 0.3, 1.2 * j + 1.1  # caption j; a clip centred on it starts at 1.2j + 0.3


def _record(i: int, num_captions: int, *, static=False, frames=True, last_at_end=False):
  """Captions j < num_captions (j: WORDS[j], record: WORDS[i % 8]), stored out of order and with
  an empty one among them; last_at_end moves the last caption to [9.5, 10] (its clip is clamped)."""
  n = int(DURATION * FPS)
  texture = np.random.default_rng(i).integers(0, 255, (24, 32, 3), dtype=np.uint8)
  images = [texture if static else np.full((24, 32, 3), _grey(k), np.uint8) for k in range(n)]
  t = np.arange(int(DURATION * SAMPLE_RATE)) / SAMPLE_RATE
  spans = [_span(j) for j in range(num_captions)]
  if last_at_end:
    spans[-1] = (9.5, 10.0)
  caps = [schema.Caption(*spans[j], f'{WORDS[j]} {WORDS[i % 8]}') for j in range(num_captions)]
  caps = caps[::-1] + [schema.Caption(0.0, DURATION, '  ')]
  return schema.Record(
      media_id=f'v{i}.mp4', duration=DURATION, frame_rate=FPS, height=24, width=32,
      frames=[tf.io.encode_jpeg(f, quality=100).numpy() for f in images] if frames else [],
      waveform=(t / DURATION * 1.8 - 0.9).astype(np.float32), sample_rate=SAMPLE_RATE,
      captions=caps,
  )  # fmt: skip


def _config(path, tokenizer, clips=3, max_clips=6, **overrides):
  cfg = dict(
      name='shards', path=str(path), tokenizer=tokenizer, fps=FPS, num_frames=4, frame_size=16,
      sample_rate=SAMPLE_RATE, num_samples=6400, max_words=4, num_narrations=5, vocab_size=128,
      shuffle_buffer=8, cycle_length=2, deterministic=True, on_bad_input='skip', eval_clips=2,
      crop_area_range=(0.08, 1.0), crop_aspect_range=(0.5, 2.0),
      long_video=ml_collections.ConfigDict(dict(clips=clips, max_clips=max_clips)),
  )  # fmt: skip
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp('long')
  # Six usable videos of 3–6 captions, one of 2 and one of none (too few for C = 3).
  train = [_record(i, 3 + i % 4) for i in range(6)] + [_record(6, 2), _record(7, 0)]
  _write(root / 'train' / 'a.tfrecord', train[0::2])
  _write(root / 'train' / 'b.tfrecord', train[1::2])
  val = [
    _record(0, 2),
    _record(1, 5, last_at_end=True),
    _record(2, 0),  # no caption: skipped as too few
    b'garbage',  # skipped (not a record)
    _record(3, 8),  # 8 captions, max_clips 6: 2 truncated
    _record(4, 4, frames=False),  # skipped (no frames)
  ]
  _write(root / 'val' / 'a.tfrecord', val)
  _write(root / 'static' / 'train' / 'a.tfrecord', [_record(i, 4, static=True) for i in range(4)])
  return root


def _value(video):
  """[-1, 1] frames → mean 0–255 grey per frame."""
  return ((video + 1) / 2 * 255).mean(axis=(-3, -2, -1))


def test_train_rows_are_videos_of_consecutive_caption_anchored_clips(shards, tokenizer_path):  # noqa: F811
  tokenizer = text_ops.Tokenizer(tokenizer_path)
  source = data_pipelines.build(_config(shards, tokenizer_path), 'train', batch_size=6, seed=0)
  assert isinstance(source, LongVideoSource)
  for _ in range(4):  # more than an epoch (6 usable videos, 2 per batch)
    batch = next(source)
    assert batch['video'].shape == (6, 4, 16, 16, 3) and batch['audio'].shape == (6, 6400)
    assert batch['text'].shape == (6, 1, 4) and batch['text'].dtype == np.int32
    expected = {'video', 'audio', 'text', 'video_mask', 'audio_mask', 'text_mask'}
    expected |= {'clip_start', 'clip_end', 'caption_start', 'caption_end'}
    assert set(batch) == expected | {'video_index', 'clip_index'}
    np.testing.assert_array_equal(batch['video_index'], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(batch['clip_index'], [0, 1, 2, 0, 1, 2])
    for key in ('video_mask', 'audio_mask', 'text_mask'):
      np.testing.assert_array_equal(batch[key], 1)
    texts = tokenizer.decode(batch['text'][:, 0])
    for v in range(2):
      rows = slice(3 * v, 3 * v + 3)
      record = {t.split()[1] for t in texts[rows]}
      assert len(record) == 1  # one video's clips are contiguous
      firsts = [WORDS.index(t.split()[0]) for t in texts[rows]]
      assert firsts == list(range(firsts[0], firsts[0] + 3))  # consecutive captions, in order
      assert np.all(np.diff(batch['clip_start'][rows]) > 0)
      assert len(set(np.round(batch['clip_start'][rows], 3))) == 3
      # Each clip is centred on its own caption, whose span holds the clip's centre.
      for r, j in zip(range(3 * v, 3 * v + 3), firsts, strict=True):
        np.testing.assert_allclose(
          [batch['caption_start'][r], batch['caption_end'][r]], _span(j), atol=1e-5
        )
        np.testing.assert_allclose(batch['clip_start'][r], 1.2 * j + 0.3, atol=1e-5)
        np.testing.assert_allclose(batch['clip_end'][r] - batch['clip_start'][r], CLIP, atol=1e-5)
        centre = (batch['clip_start'][r] + batch['clip_end'][r]) / 2
        assert batch['caption_start'][r] <= centre <= batch['caption_end'][r]
        # The audio is cut at the same window: the ramp's first sample says its time.
        first_sample = batch['audio'][r, 0]
        assert abs((first_sample + 0.9) / 1.8 * DURATION - batch['clip_start'][r]) < 2e-3
      # The frames are the window's: stored frame floor((start + k / 5) · 5), shifted by the
      # video's one brightness jitter (grey stays grey under crop, flip, contrast, hue, saturation).
      starts = batch['clip_start'][rows]
      index = np.floor((starts[:, None] + np.arange(4) / FPS) * FPS + 1e-3)
      shift = _value(batch['video'][rows]) - _grey(index)
      assert np.ptp(shift) < 1.5 and abs(shift.mean()) <= 33
  assert source.counts['skipped_records'] == 0
  # Every consumed record was emitted or had too few captions: 2 of each epoch's 8.
  assert source.counts['too_few_captions'] == source.get_state()['position'] - 4 * 2
  assert source.counts['too_few_captions'] >= 2


def test_clips_of_a_video_share_one_augmentation(shards, tokenizer_path):  # noqa: F811
  cfg = _config(shards / 'static', tokenizer_path, clips=2, shuffle_buffer=1)
  batch = next(LongVideoSource(cfg, 'train', batch_size=8, seed=3))
  video = batch['video'].reshape(4, 2 * 4, 16, 16, 3)  # [V, C·T, …]: a static texture per video
  for v in range(4):
    np.testing.assert_allclose(video[v], np.broadcast_to(video[v, :1], video[v].shape), atol=1e-6)
  # Different videos got different crops (or textures): the check above is not vacuous.
  assert all(np.abs(video[a, 0] - video[b, 0]).max() > 0.1 for a in range(4) for b in range(a))


def test_eval_pads_to_max_clips_and_counts(shards, tokenizer_path):  # noqa: F811
  tokenizer = text_ops.Tokenizer(tokenizer_path)
  source = LongVideoSource(_config(shards, tokenizer_path), 'val', batch_size=2, seed=0)
  batches = list(source)
  assert [len(b['media_id']) for b in batches] == [2, 1]  # the last, partial batch is kept
  batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  assert [m.decode() for m in batch['media_id']] == ['v0.mp4', 'v1.mp4', 'v3.mp4']
  assert batch['video'].shape == (3, 6, 4, 16, 16, 3) and batch['audio'].shape == (3, 6, 6400)
  assert batch['text'].shape == (3, 6, 4)
  np.testing.assert_array_equal(batch['num_clips'], [2, 5, 6])
  for r, n in enumerate([2, 5, 6]):
    valid = np.arange(6) < n
    np.testing.assert_array_equal(batch['clip_mask'][r], valid)
    for key in ('video_mask', 'audio_mask', 'text_mask'):
      np.testing.assert_array_equal(batch[key][r], valid)
    for key in ('video', 'audio', 'text', 'clip_start', 'caption_end'):
      assert not batch[key][r, n:].any()  # padding is zeros
    texts = tokenizer.decode(batch['text'][r, :n])
    assert [t.split()[0] for t in texts] == WORDS[:n]  # every caption in time order, the first M
    # Central crop, no jitter: the frames are exactly the window's greys.
    starts = batch['clip_start'][r, :n]
    index = np.floor((starts[:, None] + np.arange(4) / FPS) * FPS + 1e-3)
    np.testing.assert_allclose(_value(batch['video'][r, :n]), _grey(index), atol=1.5)
  # v1's last caption, [9.5, 10], would put its clip past the end: its clip is the last 0.8 s.
  np.testing.assert_allclose(batch['clip_start'][1, :5], [0.3, 1.5, 2.7, 3.9, 9.2], atol=1e-5)
  np.testing.assert_allclose(batch['caption_start'][1, 4], 9.5)
  assert source.counts['clips_truncated'] == 2
  assert source.counts['too_few_captions'] == 1
  assert source.counts['skipped_records'] == 2  # garbage bytes, no frames
  assert source.counts['empty_captions'] == 3  # the blank caption of each emitted record
  assert source.get_state()['position'] == 6
  fatal = _config(shards, tokenizer_path, on_bad_input='fatal')
  with pytest.raises((tf.errors.OpError, ValueError)):
    list(LongVideoSource(fatal, 'val', batch_size=2))


def test_resume_and_determinism(shards, tokenizer_path):  # noqa: F811
  cfg = _config(shards, tokenizer_path)
  a = LongVideoSource(cfg, 'train', batch_size=6, seed=5)
  b = LongVideoSource(cfg, 'train', batch_size=6, seed=5)
  for _ in range(4):  # crosses an epoch
    x, y = next(a), next(b)
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  state, expected = a.get_state(), next(a)
  c = LongVideoSource(cfg, 'train', batch_size=6, seed=5)
  c.set_state(state)
  got = next(c)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])
  assert c.get_state() == a.get_state()
  other = next(LongVideoSource(cfg, 'train', batch_size=6, seed=6))
  assert not np.array_equal(other['clip_start'], expected['clip_start'])


def test_config_errors_and_dispatch(shards, tokenizer_path):  # noqa: F811
  with pytest.raises(ValueError, match=r'batch_size 7 .*data\.long_video\.clips 3'):
    LongVideoSource(_config(shards, tokenizer_path), 'train', batch_size=7)
  with pytest.raises(ValueError, match='data.long_video.max_clips'):
    LongVideoSource(_config(shards, tokenizer_path, max_clips=0), 'val', batch_size=2)
  with pytest.raises(ValueError, match='data.eval_crops'):
    LongVideoSource(_config(shards, tokenizer_path, eval_crops=3), 'val', batch_size=2)
  LongVideoSource(_config(shards, tokenizer_path), 'val', batch_size=7)  # eval: B records
  plain = data_pipelines.build(_config(shards, tokenizer_path, clips=0), 'train', batch_size=4)
  assert type(plain) is ShardSource


def test_demo_num_segments():
  default = demo.plan({'train': 6}, seed=2)['train'][1]
  assert default == demo.plan({'train': 6}, seed=2, num_segments=(3, 4))['train'][1]
  assert {len(r['captions']) for r in default} <= {3, 4}
  rows = demo.plan({'train': 6, 'val': 2}, seed=2, num_segments=(8, 8))['train'][1]
  for row in rows:
    assert len(row['captions']) == len(row['segments']) == 8
    assert len({s['digit'] for s in row['segments']}) == 8  # distinct digits
    assert row['segments'][-1]['end'] == row['duration'] and row['duration'] > 8 * 1.7
  for bad in [(0, 3), (4, 3), (3, 11), (2.5, 3), (3,)]:
    with pytest.raises(ValueError, match='--segments'):
      demo.plan({'train': 1}, num_segments=bad)


def test_demo_script_segments_flag(tmp_path):
  script = [sys.executable, str(ROOT / 'scripts' / 'make_demo_data.py'), f'--output_dir={tmp_path}']
  tiny = ['--num_train=1', '--num_val=0', '--num_test=0', '--workers=1', '--size=32']
  subprocess.run([*script, *tiny, '--segments=8,8'], capture_output=True, text=True, check=True)
  (row,) = [json.loads(line) for line in (tmp_path / 'train.jsonl').read_text().splitlines()]
  assert len(row['captions']) == 8
  assert json.loads((tmp_path / 'dataset_info.json').read_text())['num_segments'] == [8, 8]
  bad = subprocess.run([*script, *tiny, '--segments=4,11'], capture_output=True, text=True)
  assert bad.returncode != 0 and '--segments' in bad.stderr
