"""The shard pipeline: clip sampling, consistent crops, sync, narrations, bad input, determinism."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import schema
from data_pipelines import text as text_ops
from data_pipelines.pretrain import ShardSource
from data_pipelines.shards import shard_files

FPS, SAMPLE_RATE, DURATION = 5.0, 8000, 4.0  # stored: 5 fps (resampled to 10), 8 kHz, 4 s
WORDS = ['red', 'green', 'blue', 'cyan', 'pink', 'gold', 'gray', 'navy']


def _frame(value: int, pattern: np.ndarray | None = None) -> bytes:
  image = np.full((48, 64, 3), value, np.uint8) if pattern is None else pattern
  return tf.io.encode_jpeg(image, quality=100).numpy()


def _record(i: int, *, audio=True, captions=True, frames=True, static=False, **kw) -> schema.Record:
  n = int(DURATION * FPS)
  pattern = np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)
  # Frame k is uniform grey 10·k (time readable from brightness), or one fixed texture (static).
  jpegs = [_frame(10 * k, pattern if static else None) for k in range(n)] if frames else []
  t = np.arange(int(DURATION * SAMPLE_RATE)) / SAMPLE_RATE
  wave = (t / DURATION * 1.8 - 0.9).astype(np.float32)  # a ramp: the sample value says the time
  caps = [schema.Caption(j, j + 1.0, f'{WORDS[j]} {WORDS[(i + j) % 8]}') for j in range(4)]
  return schema.Record(
      media_id=f'v{i}.mp4', duration=DURATION, frame_rate=FPS, frames=jpegs, height=48, width=64,
      waveform=wave if audio else None, sample_rate=SAMPLE_RATE,
      captions=caps if captions else [], labels=[i % 3], **kw,
  )  # fmt: skip


def _write(path, records):
  path.parent.mkdir(parents=True, exist_ok=True)
  with tf.io.TFRecordWriter(str(path)) as writer:
    for r in records:
      writer.write(r if isinstance(r, bytes) else schema.encode(r))


@pytest.fixture(scope='module')
def tokenizer_path(tmp_path_factory):
  prefix = tmp_path_factory.mktemp('tok') / 'tokenizer'
  corpus = [f'{a} {b}' for a in WORDS for b in WORDS] * 3
  return text_ops.train_tokenizer(corpus, str(prefix), 64)


def _config(path, tokenizer, **overrides):
  cfg = dict(
      name='shards', path=str(path), tokenizer=tokenizer, fps=10.0, num_frames=8, frame_size=32,
      sample_rate=SAMPLE_RATE, num_samples=6400, max_words=6, num_narrations=5, vocab_size=128,
      shuffle_buffer=8, cycle_length=2, deterministic=True, on_bad_input='skip', eval_clips=3,
      crop_area_range=(0.08, 1.0), crop_aspect_range=(0.5, 2.0),
  )  # fmt: skip
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp('shards')
  _write(root / 'train' / 'a.tfrecord', [_record(i) for i in range(6)])
  _write(root / 'train' / 'b.tfrecord', [_record(i, static=True) for i in range(6, 12)])
  _write(root / 'val' / 'a.tfrecord', [_record(i) for i in range(5)])
  return root


def test_train_batch_layout_and_ranges(shards, tokenizer_path):
  source = ShardSource(_config(shards, tokenizer_path), 'train', batch_size=4, seed=0)
  batch = next(source)
  assert batch['video'].shape == (4, 8, 32, 32, 3) and batch['video'].dtype == np.float32
  assert batch['audio'].shape == (4, 6400) and batch['text'].shape == (4, 5, 6)
  assert -1.0 <= batch['video'].min() and batch['video'].max() <= 1.0
  assert -1.0 <= batch['audio'].min() and batch['audio'].max() <= 1.0
  np.testing.assert_array_equal(batch['audio_mask'], 1)
  np.testing.assert_array_equal(batch['text_mask'], 1)
  assert set(batch) == {'video', 'audio', 'text', 'video_mask', 'audio_mask', 'text_mask', 'label'}


def test_crop_flip_and_colour_are_the_same_for_every_frame(shards, tokenizer_path):
  cfg = _config(shards, tokenizer_path, shuffle_buffer=1)
  source = ShardSource(cfg, 'train', batch_size=12, seed=3)
  batch = next(source)
  static = [i for i in range(12) if batch['label'][i] >= 0]
  checked = 0
  for i in static:
    clip = batch['video'][i]
    if np.abs(clip - clip[0]).max() < 1e-6:  # a static texture stays identical frame to frame
      checked += 1
  # The six textured (static) records must all come out frame-constant; the grey ramps cannot.
  assert checked == 6


def test_eval_clips_frames_and_audio_in_sync(shards, tokenizer_path):
  source = ShardSource(_config(shards, tokenizer_path), 'val', batch_size=8, seed=0)
  batch = next(source)
  assert batch['video'].shape == (5, 3, 8, 32, 32, 3) and batch['audio'].shape == (5, 3, 6400)
  assert list(batch['media_id']) == [f'v{i}.mp4'.encode() for i in range(5)]
  starts = np.linspace(0, DURATION - 0.8, 3)
  for clip in range(3):
    for k in range(8):
      # Stored frame index floor((start + k/10) · 5) shows grey 10·index.
      grey = 10 * np.floor((starts[clip] + k / 10) * FPS + 1e-3)
      value = (batch['video'][0, clip, k] + 1) / 2 * 255
      assert abs(value.mean() - grey) < 2.0
    first_sample = batch['audio'][0, clip, 0]
    assert abs((first_sample + 0.9) / 1.8 * DURATION - starts[clip]) < 2 / SAMPLE_RATE


def test_narrations_are_chosen_by_timestamp(shards, tokenizer_path):
  tokenizer = text_ops.Tokenizer(tokenizer_path)
  source = ShardSource(_config(shards, tokenizer_path, eval_clips=1), 'val', batch_size=8, seed=0)
  batch = next(source)
  # One clip at t = 0 ([0, 0.8]): the centre is caption 0, and the window is captions 0..3 with
  # the last repeated (4 captions for 5 narrations).
  decoded = tokenizer.decode(batch['text'][2])
  assert decoded == [f'{WORDS[j]} {WORDS[(2 + j) % 8]}' for j in (0, 1, 2, 3, 3)]


@pytest.mark.parametrize('seed', range(5))
def test_narration_indices_against_reference(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 9))
  starts = np.sort(rng.uniform(0, 20, n)).astype(np.float32)
  ends = (starts + rng.uniform(0.5, 4, n)).astype(np.float32)
  perm = rng.permutation(n)
  clip_start = float(rng.uniform(0, 20))
  got = text_ops.narration_indices(
    tf.constant(starts[perm]), tf.constant(ends[perm]), clip_start, clip_start + 0.8, 5
  ).numpy()
  overlap = np.minimum(ends, clip_start + 0.8) - np.maximum(starts, clip_start)
  distance = np.abs((starts + ends) / 2 - (clip_start + 0.4))
  centre = int(np.argmax(np.where(overlap > 0, overlap, -distance - 1)))
  first = min(max(centre - 2, 0), max(n - 5, 0))
  expected_sorted = [min(first + k, n - 1) for k in range(5)]
  np.testing.assert_array_equal(perm[got], expected_sorted)  # got indexes the permuted list


def test_deterministic_mode_and_resume(shards, tokenizer_path):
  cfg = _config(shards, tokenizer_path)
  a = ShardSource(cfg, 'train', batch_size=4, seed=5)
  b = ShardSource(cfg, 'train', batch_size=4, seed=5)
  for _ in range(4):  # crosses an epoch (12 records)
    x, y = next(a), next(b)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  state, expected = a.get_state(), next(a)
  c = ShardSource(cfg, 'train', batch_size=4, seed=5)
  c.set_state(state)
  got = next(c)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])
  other = next(ShardSource(cfg, 'train', batch_size=4, seed=6))
  assert not np.array_equal(other['video'], expected['video'])


def test_bad_input_is_skipped_or_masked_and_counted(tmp_path, tokenizer_path):
  good = [_record(i) for i in range(4)]
  broken_jpeg = _record(4)
  broken_jpeg.frames = [b'not a jpeg'] * len(broken_jpeg.frames)
  short_audio = _record(5)
  short_audio.waveform = short_audio.waveform[: SAMPLE_RATE // 2]  # 0.5 s, the clip is 0.8 s
  empty_caption = _record(6)
  empty_caption.captions = [schema.Caption(0.0, 1.0, '  ')]
  records = [*good, broken_jpeg, short_audio, empty_caption, _record(7, frames=False), b'garbage']
  _write(tmp_path / 'val' / 'a.tfrecord', records)
  valid = tmp_path / 'val' / 'b.tfrecord'
  _write(valid, [_record(i) for i in range(8, 12)])
  data = valid.read_bytes()
  (tmp_path / 'val' / 'c.tfrecord').write_bytes(data[: len(data) // 2 + 7])  # truncated mid-record
  flipped = bytearray(data)
  flipped[len(data) // 2 + 40] ^= 0xFF  # a flipped byte in the third record: its CRC fails
  (tmp_path / 'val' / 'd.tfrecord').write_bytes(bytes(flipped))

  source = ShardSource(_config(tmp_path, tokenizer_path), 'val', batch_size=64, seed=0)
  batches = list(source)
  ids = [m.decode() for b in batches for m in b['media_id']]
  assert 'v4.mp4' not in ids and 'v7.mp4' not in ids  # undecodable frames, no frames: skipped
  assert {'v0.mp4', 'v5.mp4', 'v6.mp4', 'v8.mp4'} <= set(ids)
  by_id = {m: i for i, m in enumerate(ids)}
  batch = batches[0]
  assert batch['audio_mask'][by_id['v5.mp4']] == 0 and batch['text_mask'][by_id['v6.mp4']] == 0
  np.testing.assert_array_equal(batch['audio'][by_id['v5.mp4']], 0)
  np.testing.assert_array_equal(batch['text'][by_id['v6.mp4']], 0)
  assert source.counts['skipped_records'] == 3  # broken JPEGs, no frames, garbage bytes
  assert source.counts['audio_incomplete'] == 1 and source.counts['empty_captions'] == 1
  assert source.counts['corrupt_shards'] == 2  # the truncated one and the flipped one

  fatal = ShardSource(_config(tmp_path, tokenizer_path, on_bad_input='fatal'), 'val', batch_size=64)
  with pytest.raises((tf.errors.OpError, ValueError)):
    list(fatal)


def test_config_errors_name_the_field(shards, tokenizer_path, tmp_path):
  with pytest.raises(ValueError, match='data.path'):
    ShardSource(_config('', tokenizer_path), 'train', batch_size=4)
  with pytest.raises(FileNotFoundError, match='data.path'):
    ShardSource(_config(tmp_path, tokenizer_path), 'train', batch_size=4)
  with pytest.raises(ValueError, match='num_samples'):
    ShardSource(_config(shards, tokenizer_path, num_samples=1000), 'train', batch_size=4)
  with pytest.raises(ValueError, match='vocab_size'):
    ShardSource(_config(shards, tokenizer_path, vocab_size=8), 'train', batch_size=4)
  with pytest.raises(FileNotFoundError, match='data.tokenizer'):
    ShardSource(_config(shards, str(tmp_path / 'nope.model')), 'train', batch_size=4)


def test_hosts_get_disjoint_shards(shards):
  a = shard_files(str(shards), 'train', 0, 2)
  b = shard_files(str(shards), 'train', 1, 2)
  assert len(a) == len(b) == 1 and set(a).isdisjoint(b)
  with pytest.raises(ValueError, match='hosts'):
    shard_files(str(shards), 'train', 2, 3)


def test_tokenizer_round_trip(tokenizer_path):
  tokenizer = text_ops.Tokenizer(tokenizer_path)
  texts = ['red green', 'navy gold blue', '']
  ids = tokenizer.encode(texts, 8)
  assert ids.shape == (3, 8) and ids.dtype == np.int32
  assert (ids[2] == 0).all() and (ids[0] > 0).any()
  assert tokenizer.decode(ids) == texts


def _reference_cut(wave: np.ndarray, start_time: float, rate: int, n: int):
  """float64 numpy reference of the synced waveform cut (the 50 ms pull-back, padding, clipping)."""
  start = max(int(np.round(start_time * rate)), 0)
  over = start + n - len(wave)
  if 0 < over <= max(1, rate // 20):
    start = len(wave) - n
  piece = np.asarray(wave[start : start + n], np.float64)
  complete = len(piece) >= n
  return np.clip(np.pad(piece, (0, n - len(piece))), -1, 1), complete


@pytest.mark.parametrize('seed', range(4))
def test_waveform_cut_from_pcm_bytes_matches_reference(seed):
  from data_pipelines import audio as audio_ops

  rng = np.random.default_rng(seed)
  rate, n = 8000, 800
  wave = rng.uniform(-1.2, 1.2, int(rng.integers(1, 3000))).astype(np.float32)
  stored = np.round(np.clip(wave.astype(np.float64), -1, 1) * schema.PCM_SCALE) / schema.PCM_SCALE
  data = tf.constant([schema.pcm16(wave)])
  # Start samples at random, past the end, and around the 50 ms pull-back (400 samples) edges;
  # times a fifth of a sample past them, so float32 and float64 rounding agree.
  starts = [0, *rng.integers(0, len(wave) + 4000, 6)]
  starts += [len(wave) - n + d for d in (0, 1, 399, 400, 401, 480)]
  for start_time in [(k + 0.2) / rate for k in starts]:
    got, complete = audio_ops.cut_waveform_bytes(data, tf.constant(start_time, tf.float32), rate, n)
    want, want_complete = _reference_cut(stored, float(np.float32(start_time)), rate, n)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert bool(complete) == want_complete
    floats, _ = audio_ops.cut_waveform(
      tf.constant(stored, tf.float32), tf.constant(start_time, tf.float32), rate, n
    )
    np.testing.assert_allclose(got.numpy(), floats.numpy(), atol=1e-6)
  silent, complete = audio_ops.cut_waveform_bytes(tf.constant([], tf.string), 0.5, rate, n)
  np.testing.assert_array_equal(silent.numpy(), 0)
  assert not bool(complete)


def test_pcm_round_trip_and_range():
  wave = np.array([-1.5, -1.0, -0.25, 0.0, 1e-6, 0.5, 1.0, 2.0], np.float32)
  record = schema.Record('a.wav', 1.0, waveform=wave, sample_rate=8000)
  parsed = schema.parse(tf.constant(schema.encode(record)))
  got = parsed['waveform'].numpy()
  assert int(parsed['version']) == schema.SCHEMA_VERSION
  np.testing.assert_allclose(got, np.clip(wave, -1, 1), atol=0.5 / schema.PCM_SCALE)
  assert got.min() == -1.0 and got.max() == 1.0


def _version1_record(i: int) -> bytes:
  """A record of the first format: the waveform as a float list, no version field."""
  example = tf.train.SequenceExample.FromString(schema.encode(_record(i)))
  del example.context.feature[schema.VERSION]
  samples = np.frombuffer(
    example.feature_lists.feature_list[schema.WAVEFORM].feature[0].bytes_list.value[0], '<i2'
  )
  waveform = example.feature_lists.feature_list[schema.WAVEFORM]
  del waveform.feature[:]
  waveform.feature.add().float_list.value.extend(samples / schema.PCM_SCALE)
  return example.SerializeToString()


def test_shards_of_another_format_fail_at_construction(tmp_path, tokenizer_path):
  _write(tmp_path / 'train' / 'old.tfrecord', [_version1_record(i) for i in range(2)])
  with pytest.raises(ValueError, match='prepare_data'):
    ShardSource(_config(tmp_path, tokenizer_path), 'train', batch_size=2)
  no_audio = tmp_path / 'noaudio'
  _write(no_audio / 'train' / 'a.tfrecord', [_record(0, audio=False)])
  example = tf.train.SequenceExample.FromString(schema.encode(_record(0, audio=False)))
  example.context.feature[schema.VERSION].int64_list.value[0] = 1  # parses, but says version 1
  _write(no_audio / 'train' / 'a.tfrecord', [example.SerializeToString()])
  with pytest.raises(ValueError, match='version 1'):
    ShardSource(_config(no_audio, tokenizer_path), 'train', batch_size=2)
  other = tmp_path / 'other'
  plain = tf.train.Example(features=tf.train.Features(feature={}))  # another tool's records
  _write(other / 'train' / 'a.tfrecord', [b'not a record', plain.SerializeToString()])
  with pytest.raises(ValueError, match='no readable vatt-jax record'):
    ShardSource(_config(other, tokenizer_path), 'train', batch_size=2)


def test_damaged_shard_counted_once_over_epochs(tmp_path, tokenizer_path):
  _write(tmp_path / 'train' / 'a.tfrecord', [_record(i) for i in range(3)])
  data = (tmp_path / 'train' / 'a.tfrecord').read_bytes()
  (tmp_path / 'train' / 'b.tfrecord').write_bytes(data[: len(data) - 100])  # 2 complete records
  source = ShardSource(_config(tmp_path, tokenizer_path), 'train', batch_size=5, seed=1)
  for _ in range(4):  # 5 readable records per epoch: four batches span four epochs
    batch = next(source)
    assert batch['video'].shape[0] == 5
  assert source.counts['corrupt_shards'] == 1 and source.counts['skipped_records'] == 0


def test_crop_ranges_from_the_config_are_used():
  from data_pipelines import video as video_ops

  shape = tf.constant([48, 64, 3])
  for seed in range(5):
    window = video_ops._crop_window(
      shape, tf.constant([seed, 1]), True, area_range=(1.0, 1.0), aspect_range=(4 / 3, 4 / 3)
    )
    np.testing.assert_array_equal(window.numpy(), [0, 0, 48, 64])  # the whole frame, every time
    small = video_ops._crop_window(
      shape, tf.constant([seed, 1]), True, area_range=(0.05, 0.15), aspect_range=(0.5, 2.0)
    ).numpy()
    assert small[2] * small[3] <= 0.2 * 48 * 64  # (the paper's range allows up to the whole frame)
