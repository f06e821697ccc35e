"""Shards a config cannot use end a command at once with one line naming the split and why (no
hang, no silent masking), and the deterministic stream is a function of (seed, position)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tensorflow_datasets.testing.mocking  # noqa: F401 (at collection; see tests/conftest.py)

import data_pipelines
from data_pipelines import ingest
from data_pipelines.decode import Options
from data_pipelines.pretrain import ShardSource
from data_pipelines.shards import NoShardsError
from tests import test_long_video
from tests.conftest import ROOT
from tests.test_ingest import _write_wav
from tests.test_pipeline import _config, _record, _write, tokenizer_path  # noqa: F401 (a fixture)
from vatt_jax.cli import UserError


def _audio_only(root, n=12, shards=2):
  """`n` records of audio and captions, no video frames, over `shards` files under root/train."""
  for s in range(shards):
    _write(
      root / 'train' / f'{s}.tfrecord', [_record(i, frames=False) for i in range(s, n, shards)]
    )


def _converted(root, split, rows, sample_rate=8000):
  """Shards of split made by the converter (with their .done.json counts) from wav files."""
  media = root / 'media'
  media.mkdir(parents=True, exist_ok=True)
  for name in rows:
    if name.endswith('.wav'):
      _write_wav(media / name, 1, 8000, 440.0)
  manifest = media / f'{split}.jsonl'
  manifest.write_text(''.join(json.dumps({'media': name}) + '\n' for name in rows))
  options = Options(sample_rate=sample_rate)
  ingest.convert(str(manifest), str(root / split), 2, options, workers=1, progress=False)


def test_records_without_video_end_the_training_stream(tmp_path, tokenizer_path):  # noqa: F811
  _audio_only(tmp_path)
  source = data_pipelines.build(_config(tmp_path, tokenizer_path), 'train', batch_size=4)
  with pytest.raises(UserError) as error:
    next(source)
  assert str(error.value) == (
    f"split 'train' in {tmp_path}/train: no usable record in 12 records (12 without video "
    'frames); the model reads video'
  )
  # An audio model reads the same shards.
  audio = _config(tmp_path, tokenizer_path, modalities=('audio',), num_samples=6400)
  batch = next(data_pipelines.build(audio, 'train', batch_size=4))
  np.testing.assert_array_equal(batch['audio_mask'], 1)


def test_evaluation_split_without_usable_records(tmp_path, tokenizer_path):  # noqa: F811
  _write(tmp_path / 'val' / 'a.tfrecord', [_record(i, frames=False) for i in range(3)])
  _write(tmp_path / 'val' / 'b.tfrecord', [b'not a record'])
  source = data_pipelines.build(_config(tmp_path, tokenizer_path), 'val', batch_size=4)
  with pytest.raises(UserError, match=r'no usable record in 4 records \(1 not vatt-jax records, '):
    list(source)


def test_frames_that_never_decode_end_the_stream(tmp_path, tokenizer_path):  # noqa: F811
  broken = []
  for i in range(4):
    record = _record(i)
    record.frames = [b'not a jpeg'] * len(record.frames)
    broken.append(record)
  _write(tmp_path / 'train' / 'a.tfrecord', broken)
  source = data_pipelines.build(_config(tmp_path, tokenizer_path), 'train', batch_size=2)
  with pytest.raises(UserError, match=r'4 records \(4 that fail to decode\); .*--decode_all'):
    next(source)


def test_long_video_records_with_too_few_captions(tmp_path, tokenizer_path):  # noqa: F811
  _write(tmp_path / 'train' / 'a.tfrecord', [test_long_video._record(i, 2) for i in range(3)])
  cfg = test_long_video._config(tmp_path, tokenizer_path, clips=3)
  source = data_pipelines.build(cfg, 'train', batch_size=3)
  with pytest.raises(UserError) as error:
    next(source)
  assert str(error.value) == (
    f"split 'train' in {tmp_path}/train: no usable record in 3 records (3 with fewer than 3 "
    'non-empty captions); data.long_video.clips=3 takes a run of 3 captions per video'
  )


def test_no_shards_and_no_records(tmp_path, tokenizer_path):  # noqa: F811
  cfg = _config(tmp_path, tokenizer_path)
  with pytest.raises(NoShardsError, match=f"split 'train': no shards in {tmp_path}/train"):
    data_pipelines.build(cfg, 'train', batch_size=2)
  for name in ('a', 'b'):
    _write(tmp_path / 'train' / f'{name}.tfrecord', [])
  with pytest.raises(UserError, match=r'no record in its 2 shards \(all empty files\)'):
    data_pipelines.build(cfg, 'train', batch_size=2)
  # Past the first shards, which a build looks into: a file that holds no record either.
  for name in 'cde':
    _write(tmp_path / 'train' / f'{name}.tfrecord', [])
  (tmp_path / 'train' / 'f.tfrecord').write_bytes(b'\x07' * 40)
  source = data_pipelines.build(cfg, 'train', batch_size=2)
  with pytest.raises(UserError, match=r'no readable record in its 6 shards \(1 corrupted'):
    next(source)


def test_converter_counts_fail_at_build(tmp_path, tokenizer_path):  # noqa: F811
  _converted(tmp_path, 'train', ['a.wav', 'b.wav', 'c.wav'])
  cfg = _config(tmp_path, tokenizer_path)
  with pytest.raises(UserError) as error:
    data_pipelines.build(cfg, 'train', batch_size=2)  # before any record is read
  assert str(error.value) == (
    f"split 'train' in {tmp_path}/train: no usable record in 3 records (3 without video frames); "
    'the model reads video'
  )
  wrong_rate = _config(tmp_path, tokenizer_path, modalities=('audio',), sample_rate=16000)
  with pytest.raises(UserError) as error:
    data_pipelines.build(wrong_rate, 'train', batch_size=2)
  assert str(error.value) == (
    f"shards of split 'train' in {tmp_path}/train store audio at 8000 Hz, config "
    'data.sample_rate=16000: set --config.data.sample_rate=8000 or convert the media again with '
    'scripts/prepare_data.py --sample_rate=16000'
  )
  _converted(tmp_path, 'val', ['missing.mp4', 'gone.mkv'])
  with pytest.raises(UserError) as error:
    data_pipelines.build(cfg, 'val', batch_size=2)
  assert str(error.value) == (
    f"split 'val' in {tmp_path}/val: no record in its 2 shards (the converter skipped all 2 rows "
    'of the manifest; its report.jsonl says why)'
  )
  done = tmp_path / 'train' / 'shard-00000-of-00002.done.json'
  counts = json.loads(done.read_text())
  done.write_text(json.dumps({**counts, 'schema_version': 1}))
  with pytest.raises(UserError, match='format version 1, this code reads version 2'):
    data_pipelines.build(cfg, 'train', batch_size=2)


def test_sample_rate_of_the_records_must_be_the_config_s(tmp_path, tokenizer_path):  # noqa: F811
  _write(tmp_path / 'train' / 'a.tfrecord', [_record(0, audio=False), _record(1), _record(2)])
  cfg = _config(tmp_path, tokenizer_path, sample_rate=16000, num_samples=12800)
  with pytest.raises(UserError) as error:
    data_pipelines.build(cfg, 'train', batch_size=2)
  assert str(error.value) == (
    f"shards of split 'train' in {tmp_path}/train store audio at 8000 Hz, config "
    'data.sample_rate=16000: set --config.data.sample_rate=8000 (and num_samples=6400 for the '
    'same 0.8 s clips) or convert the media again with scripts/prepare_data.py --sample_rate=16000'
  )
  # Records without audio (sample rate 0) are no mismatch: their audio is masked.
  silent = tmp_path / 'silent'
  _write(silent / 'train' / 'a.tfrecord', [_record(i, audio=False) for i in range(2)])
  batch = next(data_pipelines.build(_config(silent, tokenizer_path, sample_rate=16000,
                                            num_samples=12800), 'train', batch_size=2))  # fmt: skip
  np.testing.assert_array_equal(batch['audio_mask'], 0)


def test_fatal_corrupted_shard_is_one_line(tmp_path, tokenizer_path):  # noqa: F811
  _write(tmp_path / 'train' / 'a.tfrecord', [_record(i) for i in range(3)])
  data = (tmp_path / 'train' / 'a.tfrecord').read_bytes()
  (tmp_path / 'train' / 'b.tfrecord').write_bytes(data[: len(data) - 100])
  cfg = _config(tmp_path, tokenizer_path, on_bad_input='fatal')
  source = data_pipelines.build(cfg, 'train', batch_size=2)
  with pytest.raises(UserError) as error:
    for _ in range(4):
      next(source)
  assert str(error.value).startswith(
    f"split 'train' in {tmp_path}/train: corrupted shard b.tfrecord"
  )
  assert '\n' not in str(error.value)


@pytest.mark.slow  # builds a TFDS dataset (~12 s)
def test_tfds_split_without_examples():
  from tests import test_classification

  cfg = test_classification._config(
    tfds_name='imagenet2012', modality='image', image_key='image', num_frames=2, frame_size=16
  )
  with tfds.testing.mock_data(num_examples=0):
    for split in ('train', 'validation'):
      source = data_pipelines.build(cfg, split, batch_size=2)
      with pytest.raises(UserError, match=f"split '{split}' of TFDS dataset 'imagenet2012' gave"):
        next(source)


def _stream(cfg, state=None, n=6):
  source = ShardSource(cfg, 'train', batch_size=3, seed=11)
  if state is not None:
    source.set_state(state)
  batches, states = [], []
  for _ in range(n):
    batches.append(next(source))
    states.append(source.get_state())
  source.close()
  return batches, states


def test_deterministic_stream_is_a_function_of_seed_and_position(tmp_path, tokenizer_path):  # noqa: F811
  # Five shards read three at a time, with records the stream drops (no frames, garbage).
  for s in range(5):
    records = [_record(4 * s + k, static=k % 2 == 0) for k in range(3)]
    records.insert(s % 3, _record(99, frames=False) if s % 2 else b'garbage')
    _write(tmp_path / 'train' / f'{s}.tfrecord', records)
  cfg = _config(tmp_path, tokenizer_path, cycle_length=3, shuffle_buffer=5)
  first, states = _stream(cfg)  # 18 clips: past one epoch of 15 usable records
  again, _ = _stream(cfg)
  for a, b in zip(first, again, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  for k in (1, 4):
    resumed, _ = _stream(cfg, states[k], n=len(first) - k - 1)
    for a, b in zip(first[k + 1 :], resumed, strict=True):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f'resumed after batch {k}: {key}')


@pytest.mark.slow  # a subprocess: the trainer's own start
def test_train_script_ends_with_one_line_on_audio_only_shards(tmp_path, tokenizer_path):  # noqa: F811
  _audio_only(tmp_path / 'shards')
  out = subprocess.run(
      [sys.executable, 'scripts/train.py', '--config=configs/demo_tiny.py',
       f'--workdir={tmp_path / "run"}', f'--config.data.path={tmp_path / "shards"}',
       f'--config.data.tokenizer={tokenizer_path}', '--config.total_steps=2'],
      cwd=ROOT, capture_output=True, text=True,
  )  # fmt: skip
  assert out.returncode == 1, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == (
    f"error: split 'train' in {tmp_path}/shards/train: no usable record in 12 records (12 without "
    'video frames); the model reads video'
  )


def test_old_format_records_without_converter_counts_name_the_version(tmp_path, tokenizer_path):  # noqa: F811
  from tests.test_bad_input_convert import _version_1_record

  _write(tmp_path / 'train' / 'a.tfrecord', [_version_1_record('old.mp4', 100)])  # no .done.json
  with pytest.raises(UserError) as error:
    data_pipelines.build(_config(tmp_path, tokenizer_path), 'train', batch_size=2)
  assert str(error.value) == (
    f"split 'train' in {tmp_path}/train: a.tfrecord holds records of format version 1, this code "
    'reads version 2: convert the media again with scripts/prepare_data.py'
  )
