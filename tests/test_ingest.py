"""Raw media → shards → records: the converter and the validator on small media made here with PyAV."""

from __future__ import annotations

import fractions
import json
import pathlib
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import decode, ingest, schema, validate
from data_pipelines.manifest import read_manifest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
OPTIONS = decode.Options(fps=10, short_side=32, sample_rate=48000, jpeg_quality=90)


def _write_video(path, seconds, fps, height, width, colours, audio_rate=None, tone=0.0):
  """H.264 video showing colours[s] during second s, with an optional stereo AAC sine tone."""
  container = av.open(str(path), 'w')
  video = container.add_stream('libx264', rate=fps)
  video.width, video.height, video.pix_fmt = width, height, 'yuv420p'
  if audio_rate:  # every stream before the first packet: the header lists them
    audio = container.add_stream('aac', rate=audio_rate)
    audio.layout = 'stereo'
  for i in range(seconds * fps):
    image = np.empty((height, width, 3), np.uint8)
    image[:] = colours[i // fps]
    frame = av.VideoFrame.from_ndarray(image, format='rgb24')
    frame.pts = i
    container.mux(video.encode(frame))
  container.mux(video.encode())
  if audio_rate:
    n = seconds * audio_rate
    wave = (0.5 * np.sin(2 * np.pi * tone * np.arange(n) / audio_rate)).astype(np.float32)
    for s in range(0, n, 1024):
      chunk = np.ascontiguousarray(np.stack([wave[s : s + 1024]] * 2))
      frame = av.AudioFrame.from_ndarray(chunk, format='fltp', layout='stereo')
      frame.sample_rate, frame.pts = audio_rate, s
      container.mux(audio.encode(frame))
    container.mux(audio.encode())
  container.close()


def _write_wav(path, seconds, rate, tone):
  container = av.open(str(path), 'w')
  stream = container.add_stream('pcm_s16le', rate=rate)
  stream.layout = 'mono'
  t = np.arange(seconds * rate) / rate
  samples = (0.5 * np.sin(2 * np.pi * tone * t) * 32767).astype(np.int16)[None]
  frame = av.AudioFrame.from_ndarray(samples, format='s16', layout='mono')
  frame.sample_rate, frame.pts = rate, 0
  container.mux(stream.encode(frame))
  container.mux(stream.encode())
  container.close()


def _write_vfr(path):
  """Frames at 0, 50, 300, 310 and 700 ms, each its own colour: a variable-rate source."""
  container = av.open(str(path), 'w')
  stream = container.add_stream('libx264', rate=25)
  stream.width = stream.height = 16
  stream.pix_fmt = 'yuv420p'
  stream.codec_context.time_base = fractions.Fraction(1, 1000)
  for ms, colour in zip(
    (0, 50, 300, 310, 700), (RED, GREEN, BLUE, (255,) * 3, (0,) * 3), strict=True
  ):
    image = np.empty((16, 16, 3), np.uint8)
    image[:] = colour
    frame = av.VideoFrame.from_ndarray(image, format='rgb24')
    frame.pts, frame.time_base = ms, fractions.Fraction(1, 1000)
    container.mux(stream.encode(frame))
  container.mux(stream.encode())
  container.close()


def _dominant_peak_hz(wave, rate):
  spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
  return np.argmax(spectrum) * rate / len(wave)


def _mean_colour(jpeg):
  return tf.io.decode_jpeg(jpeg).numpy().reshape(-1, 3).mean(0)


def _read_records(output_dir):
  records = {}
  for path in sorted(pathlib.Path(output_dir).glob('*.tfrecord')):
    for serialized in tf.data.TFRecordDataset(str(path)):
      parsed = {k: v.numpy() for k, v in schema.parse(serialized).items()}
      records[parsed['media_id'].decode()] = parsed
  return records


def _comparable_records(path):
  return [
    {k: np.asarray(v).tolist() for k, v in schema.parse(serialized).items()}
    for serialized in tf.data.TFRecordDataset(str(path))
  ]


@pytest.fixture(scope='module')
def media(tmp_path_factory):
  root = tmp_path_factory.mktemp('media')
  _write_video(root / 'av.mp4', 2, 25, 48, 64, [RED, BLUE], audio_rate=44100, tone=1000.0)
  _write_video(root / 'silent.mp4', 1, 25, 40, 80, [GREEN])
  _write_wav(root / 'tone.wav', 1, 22050, 440.0)
  _write_vfr(root / 'vfr.mkv')
  (root / 'text.mp4').write_text('this is not a video\n')
  (root / 'truncated.mp4').write_bytes((root / 'av.mp4').read_bytes()[:1024])
  # Matroska needs no index at the end: cut in half, it still opens and decodes up to the cut.
  _write_video(root / 'five.mkv', 5, 25, 16, 16, [RED, BLUE, GREEN, RED, BLUE])
  data = (root / 'five.mkv').read_bytes()
  (root / 'cut.mkv').write_bytes(data[: len(data) // 2])
  return root


CAPTIONS = [
  {'start': 0.0, 'end': 0.8, 'text': 'a red square'},
  {'start': 1.0, 'end': 2.5, 'text': 'now blue — ünïcode'},
]
GOOD_ROWS = [
  {'media': 'av.mp4', 'captions': CAPTIONS, 'label': 3, 'extra': 'ignored'},
  {'media': 'silent.mp4', 'label': [1, 2]},
  {'media': 'tone.wav'},
]
BAD_ROWS = [  # (row, what the report must say)
  ({'media': 'text.mp4'}, 'InvalidDataError'),
  ({'media': 'missing.mp4'}, 'no such file'),
  ({'media': 'truncated.mp4'}, 'InvalidDataError'),
  ({'media': 'cut.mkv'}, 'truncated: decodes to'),
  ({'captions': CAPTIONS}, 'media: missing'),
  (
    {'media': 'av.mp4', 'captions': [{'start': 2.0, 'end': 1.0, 'text': 'x'}]},
    'end 1.0 < start 2.0',
  ),
  (
    {'media': 'av.mp4', 'captions': [{'start': 'soon', 'end': 1.0, 'text': 'x'}]},
    'captions[0].start',
  ),
]


def _write_jsonl(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return path


@pytest.fixture(scope='module')
def converted(media, tmp_path_factory):
  manifest = _write_jsonl(media / 'manifest.jsonl', GOOD_ROWS + [r for r, _ in BAD_ROWS])
  output_dir = tmp_path_factory.mktemp('shards')
  summary = ingest.convert(str(manifest), str(output_dir), 3, OPTIONS, workers=1, progress=False)
  return output_dir, summary, _read_records(output_dir)


def test_video_with_audio_round_trip(converted):
  _, _, records = converted
  r = records['av.mp4']
  assert (r['has_video'], r['has_audio'], r['has_captions']) == (1, 1, 1)
  assert r['duration'] == pytest.approx(2.0, abs=0.03)
  # 25 fps → 10 fps: one stored frame per 0.1 s, the source frame at or just before it.
  assert r['frame_rate'] == 10 and len(r['frames']) == 20
  # 48x64 → short side 32, aspect kept (64 * 32 / 48 = 42.7).
  assert (r['height'], r['width']) == (32, 43)
  for k, jpeg in enumerate(r['frames']):
    assert tf.io.decode_jpeg(jpeg).shape == (32, 43, 3)
    np.testing.assert_allclose(_mean_colour(jpeg), RED if k < 10 else BLUE, atol=12)
  wave = r['waveform']
  assert r['sample_rate'] == 48000 and wave.dtype == np.float32 and wave.ndim == 1
  assert len(wave) == pytest.approx(2 * 48000, abs=100)
  assert np.abs(wave).max() <= 1.0
  # Stereo averaged to mono keeps the tone's amplitude; 44.1 → 48 kHz keeps its pitch.
  middle = wave[12000:84000]
  assert np.abs(middle).max() == pytest.approx(0.5, abs=0.05)
  assert _dominant_peak_hz(middle, 48000) == pytest.approx(1000.0, abs=2.0)
  assert [c.decode() for c in r['captions']] == [c['text'] for c in CAPTIONS]
  np.testing.assert_allclose(r['caption_start'], [0.0, 1.0])
  # The second caption runs past the end of the media and is clipped to it.
  np.testing.assert_allclose(r['caption_end'], [0.8, r['duration']], rtol=1e-6)
  assert r['labels'].tolist() == [3]


def test_video_without_audio(converted):
  r = converted[2]['silent.mp4']
  assert (r['has_video'], r['has_audio'], r['has_captions']) == (1, 0, 0)
  assert r['sample_rate'] == 0 and len(r['waveform']) == 0
  assert len(r['frames']) == 10 and r['duration'] == pytest.approx(1.0)
  assert (r['height'], r['width']) == (32, 64)  # 40x80 → short side 32, 2:1 kept
  np.testing.assert_allclose(_mean_colour(r['frames'][5]), GREEN, atol=12)
  assert r['labels'].tolist() == [1, 2]


def test_audio_only(converted):
  r = converted[2]['tone.wav']
  assert (r['has_video'], r['has_audio'], r['has_captions']) == (0, 1, 0)
  assert len(r['frames']) == 0 and r['frame_rate'] == 0 and (r['height'], r['width']) == (0, 0)
  assert r['sample_rate'] == 48000 and len(r['waveform']) == pytest.approx(48000, abs=50)
  assert r['duration'] == pytest.approx(1.0, abs=0.01)
  assert _dominant_peak_hz(r['waveform'], 48000) == pytest.approx(440.0, abs=2.0)
  assert r['labels'].tolist() == []


def test_bad_input_is_reported_and_skipped(converted):
  output_dir, summary, records = converted
  assert set(records) == {'av.mp4', 'silent.mp4', 'tone.wav'}
  rows = len(GOOD_ROWS) + len(BAD_ROWS)
  assert (summary['rows'], summary['written'], summary['skipped']) == (rows, 3, len(BAD_ROWS))
  report = [json.loads(line) for line in (output_dir / 'report.jsonl').read_text().splitlines()]
  assert [e['row'] for e in report] == list(range(len(GOOD_ROWS), rows))
  for entry, (row, expected) in zip(report, BAD_ROWS, strict=True):
    assert entry['media'] == row.get('media', '')
    assert entry['shard'] == entry['row'] % 3
    assert expected in entry['error'], entry
  assert summary['duration_s'] == pytest.approx(4.0, abs=0.05)


def test_shards_and_done_files(converted):
  output_dir, _, _ = converted
  names = sorted(p.name for p in output_dir.iterdir())
  for s in range(3):
    assert f'shard-{s:05d}-of-00003.tfrecord' in names
    assert f'shard-{s:05d}-of-00003.done.json' in names
  assert not [n for n in names if n.endswith('.tmp') or n.endswith('.current.json')]
  done = json.loads((output_dir / 'shard-00000-of-00003.done.json').read_text())
  assert done['rows'] == 4 and done['options']['fps'] == 10  # rows 0, 3, 6, 9


def test_variable_frame_rate_picks_latest_frame_at_or_before(media):
  record, _ = decode.decode_media(str(media / 'vfr.mkv'), OPTIONS)
  # Outputs at 0, .1, … .7 s: the frames at 0, .05, .05, .3, .31, .31, .31, .7 s.
  expected = [RED, GREEN, GREEN, BLUE, (255,) * 3, (255,) * 3, (255,) * 3, (0,) * 3]
  assert len(record.frames) == len(expected)
  for jpeg, colour in zip(record.frames, expected, strict=True):
    np.testing.assert_allclose(_mean_colour(jpeg), colour, atol=12)


def test_max_duration_truncates_everything(media):
  record, duration = decode.decode_media(
    str(media / 'av.mp4'), decode.Options(fps=10, short_side=0, max_duration=1.0)
  )
  assert duration == pytest.approx(1.0)
  assert len(record.frames) == 10 and (record.height, record.width) == (48, 64)  # not resized
  assert len(record.waveform) == 48000
  captions = [schema.Caption(**c) for c in CAPTIONS]
  assert [c.text for c in decode._clip_captions(captions, duration)] == ['a red square']


def test_window_rows_convert_only_their_segment(media, tmp_path):
  """YouCook2 / Kinetics rows: start and end cut the media; time 0 of the record is `start`."""
  rows = [
    {'media': 'five.mkv', 'start': 1.0, 'end': 3.0, 'label': 2},  # seconds 1–3: BLUE, GREEN
    {'media': 'av.mp4', 'start': 0.5, 'end': 1.8, 'captions': CAPTIONS},
    {'media': 'av.mp4', 'start': 5.0, 'end': 6.0},  # after the end of the media
  ]
  manifest = _write_jsonl(media / 'windows.jsonl', rows)
  summary = ingest.convert(str(manifest), str(tmp_path), 1, OPTIONS, workers=1, progress=False)
  assert (summary['written'], summary['skipped']) == (2, 1)
  assert 'the window starts at 5 s' in (tmp_path / 'report.jsonl').read_text()
  records = _read_records(tmp_path)
  five = records['five.mkv#t=1,3']
  assert five['duration'] == pytest.approx(2.0) and len(five['frames']) == 20
  assert five['labels'].tolist() == [2]
  np.testing.assert_allclose(_mean_colour(five['frames'][0]), BLUE, atol=12)
  np.testing.assert_allclose(_mean_colour(five['frames'][9]), BLUE, atol=12)
  np.testing.assert_allclose(_mean_colour(five['frames'][10]), GREEN, atol=12)
  av_clip = records['av.mp4#t=0.5,1.8']
  assert av_clip['duration'] == pytest.approx(1.3) and len(av_clip['frames']) == 13
  assert len(av_clip['waveform']) == round(1.3 * 48000)
  np.testing.assert_allclose(_mean_colour(av_clip['frames'][4]), RED, atol=12)  # at 0.9 s
  np.testing.assert_allclose(_mean_colour(av_clip['frames'][6]), BLUE, atol=12)  # at 1.1 s
  # Captions move with the window and are clipped to it.
  assert [t.decode() for t in av_clip['captions']] == ['a red square', 'now blue — ünïcode']
  np.testing.assert_allclose(av_clip['caption_start'], [0.0, 0.5])
  np.testing.assert_allclose(av_clip['caption_end'], [0.3, 1.3])


@pytest.mark.parametrize(
  'window, error',
  [
    ({'start': 1.0}, 'give both or neither'),
    ({'start': 2.0, 'end': 2.0}, 'not after start'),
    ({'start': -1.0, 'end': 2.0}, 'start: -1.0 is negative'),
    ({'start': 'soon', 'end': 2.0}, "start: 'soon'"),
  ],
)
def test_malformed_windows(tmp_path, window, error):
  (row,) = read_manifest(str(_write_jsonl(tmp_path / 'm.jsonl', [{'media': 'a.mp4', **window}])))
  assert error in row.error


def test_frame_repeats():
  # 25 → 10 fps over 2 s: 20 outputs at 0, .1, .2, …: the source frames at 0, .08, .2 (exactly
  # on time counts as at or before), .28, …
  repeats = decode.frame_repeats([i / 25 for i in range(50)], 10, 2.0)
  assert sum(repeats) == 20 and repeats[:8] == [1, 0, 1, 0, 0, 1, 0, 1]
  # 5 → 10 fps: each source frame shown twice, never more than needed.
  assert decode.frame_repeats([i / 5 for i in range(5)], 10, 1.0) == [2] * 5
  # Outputs before the first source frame show it.
  assert decode.frame_repeats([0.25, 0.5], 10, 0.6) == [5, 1]
  # A timestamp going backwards gives the frame before it nothing.
  assert decode.frame_repeats([0.0, 0.3, 0.2], 10, 0.4) == [3, 0, 1]
  assert decode.frame_repeats([], 10, 1.0) == []


def test_output_size():
  assert decode.output_size(64, 48, 32) == (43, 32)
  assert decode.output_size(48, 64, 32) == (32, 43)  # portrait
  assert decode.output_size(1920, 1080, 256) == (455, 256)
  assert decode.output_size(64, 48, 256) == (64, 48)  # never upscaled
  assert decode.output_size(64, 48, 0) == (64, 48)
  # Anamorphic 720x480 with 32:27 pixels displays as 853x480.
  assert decode.output_size(720, 480, 240, fractions.Fraction(32, 27)) == (427, 240)


@pytest.mark.parametrize(
  'row, error',
  [
    ({'media': ''}, 'media: missing or empty'),
    ({'media': 'a.mp4', 'label': '3'}, "label: '3'"),
    ({'media': 'a.mp4', 'label': [1, True]}, 'label: True'),
    ({'media': 'a.mp4', 'label': -1}, 'label: -1'),
    ({'media': 'a.mp4', 'captions': 'hello'}, 'captions: expected a list'),
    ({'media': 'a.mp4', 'captions': [{'start': 0, 'end': 1}]}, "captions[0]: missing field 'text'"),
    ({'media': 'a.mp4', 'captions': [{'start': -1, 'end': 1, 'text': ''}]}, 'is negative'),
    (
      {'media': 'a.mp4', 'captions': [{'start': 0, 'end': float('nan'), 'text': ''}]},
      'captions[0].end',
    ),
    ([1, 2], 'expected a JSON object'),
  ],
)
def test_malformed_jsonl_rows_name_the_field(tmp_path, row, error):
  manifest = _write_jsonl(tmp_path / 'm.jsonl', [{'media': 'ok.mp4'}, row])
  first, second = read_manifest(str(manifest))
  assert first.error is None and first.path == str(tmp_path / 'ok.mp4')
  assert second.index == 1 and second.line == 2
  assert error in second.error and 'm.jsonl line 2' in second.error


def test_manifest_errors(tmp_path):
  (tmp_path / 'm.csv').write_text('path,label\na.mp4,1\n')
  with pytest.raises(ValueError, match='"media" column'):
    read_manifest(str(tmp_path / 'm.csv'))
  (tmp_path / 'm.txt').write_text('a.mp4\n')
  with pytest.raises(ValueError, match='unknown manifest type'):
    read_manifest(str(tmp_path / 'm.txt'))
  (tmp_path / 'm.jsonl').write_text('{"media": "a.mp4"}\n\nnot json\n')
  rows = read_manifest(str(tmp_path / 'm.jsonl'))
  assert [r.index for r in rows] == [0, 1] and 'line 3: not valid JSON' in rows[1].error


def test_csv_manifest_with_labels(media, tmp_path):
  manifest = media / 'labels.csv'
  manifest.write_text(
    f'media,label,note\nsilent.mp4,7,x\ntone.wav,,y\n{media / "tone.wav"},4;5,z\nsilent.mp4,cat,w\n'
  )
  summary = ingest.convert(str(manifest), str(tmp_path), 2, OPTIONS, workers=1, progress=False)
  assert (summary['written'], summary['skipped']) == (3, 1)
  report = (tmp_path / 'report.jsonl').read_text()
  assert '"row": 3' in report and "label: 'cat'" in report
  records = _read_records(tmp_path)
  assert records['silent.mp4']['labels'].tolist() == [7]
  assert records['tone.wav']['labels'].tolist() == []
  assert records[str(media / 'tone.wav')]['labels'].tolist() == [4, 5]  # absolute path kept as id


@pytest.mark.slow
def test_resume_rewrites_only_missing_shards(media, tmp_path):
  manifest = _write_jsonl(media / 'resume.jsonl', GOOD_ROWS + [{'media': 'missing.mp4'}])
  output_dir = tmp_path / 'out'
  # The first run through the command line, in its own process; the rerun through a spawned
  # worker pool (one shard to do: one worker). Each of those processes imports TensorFlow.
  args = [
    sys.executable, str(ROOT / 'scripts' / 'prepare_data.py'), f'--manifest={manifest}',
    f'--output_dir={output_dir}', '--num_shards=3', '--short_side=32', '--workers=1',
  ]  # fmt: skip
  run = subprocess.run(args, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  assert 'rows 4, written 3, skipped 1' in run.stdout
  shards = sorted(output_dir.glob('shard-*.tfrecord'))
  before = {p.name: (p.stat().st_mtime_ns, _comparable_records(p)) for p in shards}
  shards[1].unlink()
  summary = ingest.convert(str(manifest), str(output_dir), 3, OPTIONS, workers=2, progress=False)
  assert (summary['shards_converted'], summary['shards_reused']) == (1, 2)
  assert (summary['written'], summary['skipped']) == (3, 1)  # counts include the reused shards
  after = {
    p.name: (p.stat().st_mtime_ns, _comparable_records(p))
    for p in output_dir.glob('shard-*.tfrecord')
  }
  assert after.keys() == before.keys()
  for name in (shards[0].name, shards[2].name):
    assert after[name][0] == before[name][0]  # untouched
  assert after[shards[1].name][0] != before[shards[1].name][0]
  # The same records again (compared parsed: protobuf promises no byte order for its maps).
  assert after[shards[1].name][1] == before[shards[1].name][1]
  assert '"missing.mp4"' in (output_dir / 'report.jsonl').read_text()
  # Finished shards made with other settings are not mixed with new ones.
  with pytest.raises(ValueError, match='fps=10.0'):
    ingest.convert(str(manifest), str(output_dir), 3, decode.Options(fps=5), progress=False)
  with pytest.raises(ValueError, match='3-shard run'):
    ingest.convert(str(manifest), str(output_dir), 4, OPTIONS, progress=False)
  # Shards of an older record format are not mixed with new ones either.
  done = next(output_dir.glob('shard-00000-*.done.json'))
  stats = json.loads(done.read_text())
  del stats['schema_version']  # what the first format's converter wrote
  done.write_text(json.dumps(stats))
  with pytest.raises(ValueError, match='format version 1'):
    ingest.convert(str(manifest), str(output_dir), 3, OPTIONS, progress=False)


def test_file_that_kills_the_worker_twice_is_skipped(media, tmp_path):
  manifest = _write_jsonl(media / 'poison.jsonl', [{'media': 'tone.wav'}, {'media': 'silent.mp4'}])
  # What a worker killed while decoding row 1 (a second time) leaves behind.
  marker = tmp_path / 'shard-00000-of-00001.tfrecord.current.json'
  marker.write_text(json.dumps({'row': 1, 'worker_deaths': 1}))
  summary = ingest.convert(str(manifest), str(tmp_path), 1, OPTIONS, workers=1, progress=False)
  assert (summary['written'], summary['skipped']) == (1, 1)
  assert 'died 2 times' in (tmp_path / 'report.jsonl').read_text()
  assert not marker.exists()


def _validate(input_dir):
  return subprocess.Popen(
    [
      sys.executable,
      str(ROOT / 'scripts' / 'validate_shards.py'),
      f'--input_dir={input_dir}',
      '--json',
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


@pytest.mark.slow
def test_validator(converted, tmp_path):
  output_dir, _, records = converted
  corrupt_dir = tmp_path / 'corrupt'
  shutil.copytree(output_dir, corrupt_dir)
  victim = max(corrupt_dir.glob('*.tfrecord'), key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  # Both validators at once: each spends most of its time importing TensorFlow.
  good, bad = _validate(output_dir), _validate(corrupt_dir)
  good_out, good_err = good.communicate()
  bad_out, bad_err = bad.communicate()

  assert good.returncode == 0, good_err
  stats = json.loads(good_out)
  assert (stats['records'], stats['bad_records'], stats['shards']) == (3, 0, 3)
  assert (stats['with_video'], stats['with_audio'], stats['with_captions']) == (2, 2, 1)
  assert stats['with_labels'] == 2 and stats['distinct_labels'] == 3
  assert stats['fps_histogram'] == {'10': 2} and stats['sample_rate_histogram'] == {'48000': 2}
  assert stats['total_duration_s'] == pytest.approx(4.0, abs=0.05)
  assert stats['frame_count_mismatches'] == 0 and stats['unreadable_shards'] == []
  # Captions cover [0, 0.8] and [1, 2] of the 2 s clip.
  assert stats['caption_coverage_mean'] == pytest.approx(0.9, abs=0.02)

  assert bad.returncode == 2
  assert victim.name in bad_err
  assert [u['shard'] for u in json.loads(bad_out)['unreadable_shards']] == [victim.name]


def test_validator_finds_undecodable_frames(tmp_path):
  good = schema.Record(
    'ok', 0.2, 10.0, [tf.io.encode_jpeg(np.zeros((4, 6, 3), np.uint8)).numpy()] * 2, 4, 6
  )
  broken = schema.Record('broken', 0.2, 10.0, [b'\xff\xd8 not a jpeg'] * 2, 4, 6)
  old = tf.train.SequenceExample.FromString(schema.encode(good))
  old.context.feature[schema.VERSION].int64_list.value[0] = 1
  with tf.io.TFRecordWriter(str(tmp_path / 'x.tfrecord')) as writer:
    writer.write(schema.encode(good))
    writer.write(schema.encode(broken))
    writer.write(b'not a SequenceExample')
    writer.write(old.SerializeToString())
  stats = validate.inspect_shards(str(tmp_path))
  assert (stats['records'], stats['good_records'], stats['bad_records']) == (4, 1, 3)
  assert [(b['index'], b['media_id']) for b in stats['bad_record_list']] == [
    (1, 'broken'),
    (2, None),
    (3, 'ok'),
  ]
  assert 'frame 0 is not a decodable JPEG' in stats['bad_record_list'][0]['error']
  assert 'format version 1' in stats['bad_record_list'][2]['error']
