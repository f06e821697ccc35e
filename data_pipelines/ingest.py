"""Raw media → TFRecord shards of `schema` records, and the statistics the shard validator prints.

`convert` reads a manifest (JSONL or CSV, see docs/DATA.md), decodes every media file with PyAV and
writes `output_dir/shard-SSSSS-of-NNNNN.tfrecord`; row i goes to shard i % N. Per file:

* video: output frame k (at k / fps seconds) shows the source frame with the latest presentation
  timestamp <= k / fps, so any source rate, constant or variable, comes out at exactly `fps`; the
  frame is resized so its short side is `short_side` (never upscaled) and stored as JPEG.
* audio: resampled to `sample_rate`, averaged to mono, float32 in [-1, 1].

Bad input never stops the run: a row that cannot be converted is skipped, counted and listed in
`output_dir/report.jsonl`. Each shard is written under a temporary name and renamed when complete,
next to a `.done.json` with its counts, so a rerun with the same arguments converts only the shards
that are missing.

`inspect_shards` reads shards back with `schema.parse` and computes what scripts/validate_shards.py
prints.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import fractions
import glob
import hashlib
import json
import math
import multiprocessing
import os
import queue
import re
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import av
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from data_pipelines import schema


def _hide_gpus_from_tensorflow() -> None:
  # TensorFlow only serialises and JPEG-codes here; left alone it would grab every GPU's memory
  # that JAX needs. set_visible_devices raises once TF's runtime is up (another module imported and
  # used it first); whoever did that chose the devices already.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass


_hide_gpus_from_tensorflow()

Fraction = fractions.Fraction

JSONL_SUFFIXES = ('.jsonl', '.ndjson')
CSV_SUFFIXES = ('.csv',)
REPORT_NAME = 'report.jsonl'
_SHARD_RE = re.compile(r'^shard-(\d{5})-of-(\d{5})\.tfrecord$')
# Encoders pad the last audio packet (AAC: up to 1024 samples); a decoded stream that overshoots its
# declared duration by at most this much is trimmed to it. Larger gaps mean the header is wrong,
# and then the decoded samples are trusted instead.
_AUDIO_PADDING_TOLERANCE_S = 0.1
# A file that decodes to less than its header declares, by more than this many seconds and this
# fraction, was cut short (an interrupted download): FFmpeg just stops at the cut without an error.
# The margins allow for headers that estimate the duration from the bitrate (VBR MP3).
_TRUNCATION_TOLERANCE_S = 1.0
_TRUNCATION_TOLERANCE = 0.1
# A file whose decoding killed the worker process (decoder crash, out of memory) this many times,
# in consecutive runs, is skipped and reported instead of killing every rerun.
_WORKER_DEATHS_TO_SKIP = 2


class MediaError(Exception):
  """A media file that decodes to nothing usable (the message says why)."""


# ----------------------------------------------------------------------------------------------
# Manifest


@dataclasses.dataclass(frozen=True)
class ManifestRow:
  """One manifest row. `error` is set (and the rest may be empty) when the row itself is malformed.

  index: 0-based data row (blank JSONL lines and the CSV header do not count); decides the shard.
  line: 1-based line of the manifest file, for people looking for the row.
  media: the path as written (becomes the record's media_id); path: where to open it.
  """

  index: int
  line: int
  media: str
  path: str
  captions: tuple[schema.Caption, ...] = ()
  labels: tuple[int, ...] = ()
  error: str | None = None


def _is_number(value: Any) -> bool:
  # bool is an int subclass; `"start": true` is a typo, not a timestamp.
  return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _parse_captions(value: Any) -> tuple[schema.Caption, ...]:
  if value is None:
    return ()
  if not isinstance(value, list):
    raise ValueError(
      f'captions: expected a list of {{start, end, text}}, got {type(value).__name__}'
    )
  captions = []
  for j, item in enumerate(value):
    where = f'captions[{j}]'
    if not isinstance(item, dict):
      raise ValueError(f'{where}: expected an object, got {type(item).__name__}')
    for key in ('start', 'end', 'text'):
      if key not in item:
        raise ValueError(f'{where}: missing field {key!r}')
    start, end, text = item['start'], item['end'], item['text']
    for key, number in (('start', start), ('end', end)):
      if not _is_number(number):
        raise ValueError(f'{where}.{key}: {number!r} is not a finite number')
    if start < 0:
      raise ValueError(f'{where}.start: {start} is negative')
    if end < start:
      raise ValueError(f'{where}: end {end} < start {start}')
    if not isinstance(text, str):
      raise ValueError(f'{where}.text: expected a string, got {type(text).__name__}')
    captions.append(schema.Caption(float(start), float(end), text))
  return tuple(captions)


def _parse_labels(value: Any) -> tuple[int, ...]:
  if value is None:
    return ()
  values = value if isinstance(value, list) else [value]
  for v in values:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ValueError(f'label: {v!r} is not a non-negative integer class index')
  return tuple(values)


def _parse_csv_labels(text: str) -> tuple[int, ...]:
  # Several labels in one cell are ';'-separated (a comma would split the CSV cell).
  labels = []
  for part in (p.strip() for p in text.split(';')):
    if not part:
      continue
    if not part.isdigit():
      raise ValueError(f'label: {part!r} is not a non-negative integer class index')
    labels.append(int(part))
  return tuple(labels)


def _resolve(media: str, base_dir: str) -> str:
  if '://' in media:  # a URL: FFmpeg opens it as it is
    return media
  return os.path.normpath(os.path.join(base_dir, os.path.expanduser(media)))


def _row_from_fields(
  index: int, line: int, fields: dict, base_dir: str, csv_row: bool
) -> ManifestRow:
  media = fields.get('media')
  if not isinstance(media, str) or not media.strip():
    raise ValueError(f'media: missing or empty (got {media!r})')
  media = media.strip()
  if csv_row:
    labels = _parse_csv_labels(fields.get('label') or '')
    captions: tuple[schema.Caption, ...] = ()
  else:
    labels = _parse_labels(fields.get('label'))
    captions = _parse_captions(fields.get('captions'))
  return ManifestRow(index, line, media, _resolve(media, base_dir), captions, labels)


def read_manifest(path: str) -> list[ManifestRow]:
  """Reads a JSONL or CSV manifest; malformed rows come back with `error` set (never raised).

  Raises ValueError only when the manifest as a whole is unusable (unknown suffix, no `media`
  column) and OSError when it cannot be read.
  """
  base_dir = os.path.dirname(os.path.abspath(path))
  suffix = os.path.splitext(path)[1].lower()
  rows: list[ManifestRow] = []

  def bad(index: int, line: int, media: Any, error: str) -> ManifestRow:
    media = media if isinstance(media, str) else ''
    return ManifestRow(index, line, media, '', error=f'{path} line {line}: {error}')

  if suffix in JSONL_SUFFIXES:
    # utf-8-sig: editors on Windows (and Excel, for CSV) start the file with a byte-order mark.
    with open(path, encoding='utf-8-sig') as f:
      for line_no, text in enumerate(f, start=1):
        if not text.strip():
          continue
        index = len(rows)
        try:
          fields = json.loads(text)
        except json.JSONDecodeError as e:
          rows.append(bad(index, line_no, None, f'not valid JSON ({e})'))
          continue
        if not isinstance(fields, dict):
          rows.append(
            bad(index, line_no, None, f'expected a JSON object, got {type(fields).__name__}')
          )
          continue
        try:
          rows.append(_row_from_fields(index, line_no, fields, base_dir, csv_row=False))
        except ValueError as e:
          rows.append(bad(index, line_no, fields.get('media'), str(e)))
  elif suffix in CSV_SUFFIXES:
    with open(path, encoding='utf-8-sig', newline='') as f:
      reader = csv.DictReader(f)
      columns = [c.strip() for c in reader.fieldnames or []]
      if 'media' not in columns:
        raise ValueError(f'{path}: the CSV header needs a "media" column, found {columns}')
      reader.fieldnames = columns
      for index, fields in enumerate(reader):
        try:
          rows.append(_row_from_fields(index, reader.line_num, fields, base_dir, csv_row=True))
        except ValueError as e:
          rows.append(bad(index, reader.line_num, fields.get('media'), str(e)))
  else:
    raise ValueError(
      f'{path}: unknown manifest type {suffix!r}; use {JSONL_SUFFIXES + CSV_SUFFIXES} files'
    )
  return rows


# ----------------------------------------------------------------------------------------------
# Decoding


@dataclasses.dataclass(frozen=True)
class Options:
  """What a record looks like; stored with each finished shard so a resume cannot mix settings."""

  fps: float = 10.0
  short_side: int = 256  # 0 keeps the source size
  sample_rate: int = 48000
  jpeg_quality: int = 90
  max_duration: float | None = None  # seconds kept from the start of each file; None: all

  def __post_init__(self):
    if not self.fps > 0:
      raise ValueError(f'fps must be > 0, got {self.fps}')
    if self.short_side < 0:
      raise ValueError(f'short_side must be >= 0, got {self.short_side}')
    if self.sample_rate <= 0:
      raise ValueError(f'sample_rate must be > 0, got {self.sample_rate}')
    if not 1 <= self.jpeg_quality <= 100:
      raise ValueError(f'jpeg_quality must be in [1, 100], got {self.jpeg_quality}')
    if self.max_duration is not None and not self.max_duration > 0:
      raise ValueError(f'max_duration must be > 0 when given, got {self.max_duration}')


class FrameSchedule:
  """Nearest-frame resampling to a fixed rate, one source frame at a time.

  Output frame k (time k / fps) shows the source frame whose timestamp is the latest <= k / fps;
  outputs before the first source frame show the first frame. Source frames only need to be held
  until the next one arrives, so memory does not grow with the video. Exact rational arithmetic
  keeps a source frame at exactly k / fps (25 fps → 10 fps: every 5th) on the right side.
  """

  def __init__(self, fps: float | Fraction, limit: Fraction | None = None):
    self._fps = Fraction(fps)
    self._cap = None
    self._cap = None if limit is None else self._outputs_before(limit)
    self._assigned = 0
    self._started = False

  def _outputs_before(self, t: Fraction) -> int:
    n = max(0, math.ceil(t * self._fps))  # #{k >= 0 : k / fps < t}
    return n if self._cap is None else min(n, self._cap)

  def push(self, ts: Fraction) -> int:
    """Adds a source frame at `ts`; returns how many outputs the previous source frame fills."""
    if not self._started:
      self._started = True
      return 0
    # max(0, …): a timestamp that goes backwards (broken file) gives the previous frame nothing.
    n = max(0, self._outputs_before(ts) - self._assigned)
    self._assigned += n
    return n

  def finish(self, end: Fraction) -> int:
    """The stream ended at `end`; returns how many outputs the last source frame fills."""
    if not self._started:
      return 0
    n = max(0, self._outputs_before(end) - self._assigned)
    self._assigned += n
    return n


def frame_repeats(timestamps: Sequence[float], fps: float, end: float) -> list[int]:
  """How many output frames each source frame fills (see FrameSchedule); sums to ceil(end * fps)."""

  def exact(t: float) -> Fraction:
    # 5 / 25 as a float is a hair above 0.2; decoded timestamps are exact (pts * time_base).
    return Fraction(t).limit_denominator(1_000_000)

  schedule = FrameSchedule(exact(fps))
  repeats = [schedule.push(exact(t)) for t in timestamps][1:]
  return repeats + [schedule.finish(exact(end))] if timestamps else []


def output_size(width: int, height: int, short_side: int, pixel_aspect: Fraction | None = None):
  """(width, height) with the short side at `short_side`, aspect kept; never upscales.

  Smaller sources keep their size: upscaling stores more bytes without more detail, and the
  training pipelines resize crops anyway. Non-square pixels (anamorphic video) are made square.
  """
  display_w = Fraction(width) * (pixel_aspect if pixel_aspect else 1)
  display_h = Fraction(height)
  short = min(display_w, display_h)
  scale = Fraction(short_side) / short if 0 < short_side < short else Fraction(1)
  return max(1, round(display_w * scale)), max(1, round(display_h * scale))


def _time(pts: int | None, time_base: Fraction | None) -> Fraction | None:
  if pts is None or time_base is None:
    return None
  return Fraction(pts) * time_base


def _rotation_quarters(frame: av.VideoFrame) -> int:
  # Phone videos store a display rotation instead of rotated pixels. PyAV's `rotation` is the
  # counter-clockwise angle the display matrix applies; np.rot90(k=1) rotates counter-clockwise.
  try:
    angle = frame.rotation
  except Exception:  # side data that PyAV cannot read: show the pixels as stored
    return 0
  return round((angle or 0) / 90) % 4


class _VideoSink:
  def __init__(self, stream: av.video.stream.VideoStream, origin: Fraction, options: Options):
    self._stream = stream
    self._origin = origin
    self._options = options
    self._limit = None if options.max_duration is None else Fraction(options.max_duration)
    self._schedule = FrameSchedule(options.fps, self._limit)
    self._prev: av.VideoFrame | None = None
    self._prev_ts: Fraction | None = None
    self._last_step: Fraction | None = None
    self._prev_duration: Fraction | None = None
    self._size: tuple[int, int] | None = None  # (width, height) before rotation
    self._quarters = 0
    self.frames: list[bytes] = []
    self.done = False

  def stored_size(self) -> tuple[int, int]:
    """(height, width) of the stored frames: a quarter turn swaps them."""
    if self._size is None:
      return 0, 0
    width, height = self._size
    return (width, height) if self._quarters % 2 else (height, width)

  def _emit(self, frame: av.VideoFrame, repeats: int) -> None:
    if repeats <= 0:
      return  # dropped by the resampling: don't pay for a colour conversion and a JPEG
    width, height = self._size
    # Shrink in the source's YUV, then convert the few remaining pixels to RGB: 4x faster than
    # converting at full size. AREA averages (no aliasing) when shrinking.
    small = frame.reformat(width=width, height=height, interpolation='AREA')
    rgb = small.to_ndarray(format='rgb24')
    if self._quarters:
      rgb = np.ascontiguousarray(np.rot90(rgb, k=self._quarters))
    jpeg = tf.io.encode_jpeg(rgb, quality=self._options.jpeg_quality).numpy()
    self.frames.extend([jpeg] * repeats)  # duplicates share one bytes object

  def add(self, frame: av.VideoFrame) -> None:
    if self.done:
      return
    ts = _time(frame.pts, frame.time_base or self._stream.time_base)
    if ts is None:  # no timestamp (some AVI): continue the cadence
      step = self._last_step or self._nominal_step()
      ts = Fraction(0) if self._prev_ts is None else self._prev_ts + step
    else:
      ts -= self._origin
    if self._limit is not None and ts >= self._limit:
      self.done = True
      return
    if self._size is None:
      sar = self._stream.codec_context.sample_aspect_ratio
      self._size = output_size(frame.width, frame.height, self._options.short_side, sar)
      self._quarters = _rotation_quarters(frame)
    if self._prev is not None:
      self._emit(self._prev, self._schedule.push(ts))
      if ts > self._prev_ts:
        self._last_step = ts - self._prev_ts
    else:
      self._schedule.push(ts)
    self._prev, self._prev_ts = frame, ts
    self._prev_duration = _time(frame.duration, frame.time_base or self._stream.time_base)

  def _nominal_step(self) -> Fraction:
    rate = self._stream.average_rate or self._stream.guessed_rate
    return 1 / Fraction(rate) if rate else 1 / Fraction(self._options.fps)

  def finish(self) -> Fraction:
    """Emits the last frame; returns where the video ends (seconds from the origin)."""
    if self._prev is None:
      return Fraction(0)
    step = self._prev_duration if self._prev_duration else self._last_step or self._nominal_step()
    end = self._prev_ts + step
    if self._limit is not None:
      end = min(end, self._limit)
    self._emit(self._prev, self._schedule.finish(end))
    self._prev = None
    return end


class _AudioSink:
  def __init__(self, stream: av.audio.stream.AudioStream, origin: Fraction, options: Options):
    self._stream = stream
    self._origin = origin
    self._rate = options.sample_rate
    self._limit = None if options.max_duration is None else Fraction(options.max_duration)
    # Keep the source channels and average them ourselves: swresample's mono downmix adds channels
    # with a 1/sqrt(2) gain, which clips loud in-phase stereo.
    self._resampler = av.AudioResampler(format='fltp', layout=None, rate=self._rate)
    self._chunks: list[np.ndarray] = []
    self._offset: Fraction | None = None
    self._samples = 0
    self.done = False

  def _take(self, frames: Iterable[av.AudioFrame]) -> None:
    for out in frames:
      chunk = out.to_ndarray().mean(axis=0, dtype=np.float32)
      self._chunks.append(chunk)
      self._samples += len(chunk)

  def add(self, frame: av.AudioFrame) -> None:
    if self.done:
      return
    ts = _time(frame.pts, frame.time_base or self._stream.time_base)
    if self._offset is None:
      self._offset = Fraction(0) if ts is None else ts - self._origin
    if (
      self._limit is not None and self._offset + Fraction(self._samples, self._rate) >= self._limit
    ):
      self.done = True
      return
    self._take(self._resampler.resample(frame))

  def finish(self) -> np.ndarray | None:
    self._take(self._resampler.resample(None))
    if not self._chunks:
      return None
    wave = np.concatenate(self._chunks)
    # Audio that starts after the origin (video first) is delayed to stay in sync with the frames;
    # audio before it (negative offset) is cut.
    shift = round((self._offset or 0) * self._rate)
    wave = np.concatenate([np.zeros(shift, np.float32), wave]) if shift > 0 else wave[-shift:]
    stream = self._stream
    if stream.duration and stream.start_time is not None and stream.time_base:
      declared = (stream.start_time + stream.duration) * stream.time_base - self._origin
      excess = len(wave) / self._rate - declared
      if 0 < excess <= _AUDIO_PADDING_TOLERANCE_S:
        wave = wave[: round(declared * self._rate)]
    if self._limit is not None:
      wave = wave[: math.floor(self._limit * self._rate)]
    # Float decoders (AAC, MP3) overshoot full scale slightly; the schema promises [-1, 1].
    return np.clip(wave, -1.0, 1.0) if len(wave) else None


def decode_media(path: str, options: Options) -> tuple[schema.Record, float]:
  """Decodes one file into a Record without media_id, captions or labels.

  Returns (record, seconds decoded). Raises MediaError or PyAV's errors for unusable files.
  """
  with av.open(path, metadata_errors='ignore') as container:
    # Cover art in audio files is a one-frame "video" stream: not video.
    videos = [
      s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic
    ]
    video = videos[0] if videos else None
    audio = container.streams.audio[0] if container.streams.audio else None
    if video is None and audio is None:
      raise MediaError('no video or audio stream')
    starts = [
      Fraction(s.start_time) * s.time_base
      for s in (video, audio)
      if s is not None and s.start_time is not None and s.time_base
    ]
    # t = 0 is where the earliest stream starts; captions count from there.
    origin = min(starts) if starts else Fraction(0)
    video_sink = _VideoSink(video, origin, options) if video is not None else None
    audio_sink = _AudioSink(audio, origin, options) if audio is not None else None
    sinks = [s for s in (video_sink, audio_sink) if s is not None]
    if video is not None:
      video.thread_type = 'AUTO'  # frame threads: several times faster H.264 decoding
    for frame in container.decode(*(s for s in (video, audio) if s is not None)):
      (video_sink if isinstance(frame, av.VideoFrame) else audio_sink).add(frame)
      if all(s.done for s in sinks):
        break  # past max_duration everywhere
    video_end = video_sink.finish() if video_sink else Fraction(0)
    waveform = audio_sink.finish() if audio_sink else None
    declared = container.duration / av.time_base if container.duration else None
  frames = video_sink.frames if video_sink else []
  height, width = video_sink.stored_size() if frames else (0, 0)
  if not frames and waveform is None:
    raise MediaError('no decodable video frames or audio samples')
  audio_end = Fraction(len(waveform), options.sample_rate) if waveform is not None else 0
  duration = float(max(video_end, audio_end))
  if declared is not None and declared > 0:
    expected = min(declared, options.max_duration or declared)
    if expected - duration > max(_TRUNCATION_TOLERANCE_S, _TRUNCATION_TOLERANCE * expected):
      raise MediaError(
        f'truncated: decodes to {duration:.2f} s, its header declares {declared:.2f} s'
      )
  record = schema.Record(
    media_id='',
    duration=duration,
    frame_rate=float(options.fps) if frames else 0.0,
    frames=frames,
    height=height,
    width=width,
    waveform=waveform,
    sample_rate=options.sample_rate if waveform is not None else 0,
  )
  return record, duration


def _clip_captions(captions: Sequence[schema.Caption], duration: float) -> list[schema.Caption]:
  # Captions past the end of the stored media (max_duration, or ASR running long) describe nothing
  # that is in the record.
  return [
    schema.Caption(c.start, min(c.end, duration), c.text) for c in captions if c.start < duration
  ]


def convert_row(row: ManifestRow, options: Options) -> schema.Record:
  """Decodes a manifest row into a full Record. Raises for a row that cannot be converted."""
  if row.error:
    raise ValueError(row.error)
  if '://' not in row.path and not os.path.isfile(row.path):
    raise FileNotFoundError(f'no such file: {row.path}')
  record, duration = decode_media(row.path, options)
  record.media_id = row.media
  record.captions = _clip_captions(row.captions, duration)
  record.labels = list(row.labels)
  return record


# ----------------------------------------------------------------------------------------------
# Shards


def shard_name(shard: int, num_shards: int) -> str:
  return f'shard-{shard:05d}-of-{num_shards:05d}.tfrecord'


def _done_path(output_dir: str, shard: int, num_shards: int) -> str:
  return os.path.join(output_dir, shard_name(shard, num_shards)[: -len('.tfrecord')] + '.done.json')


def _marker_path(output_dir: str, shard: int, num_shards: int) -> str:
  return os.path.join(output_dir, shard_name(shard, num_shards) + '.current.json')


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _error_text(e: BaseException) -> str:
  text = (e.message if isinstance(e, tf.errors.OpError) else str(e)).strip() or repr(e)
  # TensorFlow wraps eager errors in graph plumbing ({{function_node …}} … [Op:IteratorGetNext]).
  text = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', text)
  text = re.sub(r'\s*\[Op:[^\]]*\].*$', '', text, flags=re.S)
  return f'{type(e).__name__}: {text}'


# The marker of the row being converted in this process, for the SIGTERM handler.
_active_marker: str | None = None


def convert_shard(
  shard: int,
  num_shards: int,
  rows: Sequence[ManifestRow],
  output_dir: str,
  options: Options,
  manifest_sha256: str,
  on_row: Callable[[], None] | None = None,
) -> dict:
  """Converts `rows` into one shard file; returns (and stores as .done.json) its counts."""
  final = os.path.join(output_dir, shard_name(shard, num_shards))
  tmp = final + '.tmp'
  marker = _marker_path(output_dir, shard, num_shards)
  # A marker left behind means a worker died (not an exception: those remove it) on that row.
  poisoned_row, deaths = None, 0
  if os.path.exists(marker):
    try:
      with open(marker, encoding='utf-8') as f:
        left = json.load(f)
      poisoned_row, deaths = int(left['row']), int(left['worker_deaths']) + 1
    except (OSError, ValueError, KeyError, TypeError):
      pass
  start = time.time()
  stats = {
    'shard': shard, 'num_shards': num_shards, 'rows': len(rows), 'written': 0, 'skipped': 0,
    'duration_s': 0.0, 'frames': 0, 'with_video': 0, 'with_audio': 0, 'with_captions': 0,
  }  # fmt: skip
  errors = []
  global _active_marker
  _active_marker = marker
  try:
    with tf.io.TFRecordWriter(tmp) as writer:
      for row in rows:
        died_here = deaths if row.index == poisoned_row else 0
        try:
          if died_here >= _WORKER_DEATHS_TO_SKIP:
            raise MediaError(
              f'the converter process died {died_here} times decoding this file (decoder crash '
              'or out of memory; try --max_duration)'
            )
          _write_json_atomic(marker, {'row': row.index, 'worker_deaths': died_here})
          record = convert_row(row, options)
          writer.write(schema.encode(record))
        except Exception as e:  # bad input of any kind: report, skip, carry on
          stats['skipped'] += 1
          error = {'row': row.index, 'line': row.line, 'media': row.media, 'shard': shard}
          errors.append({**error, 'error': _error_text(e)})
        else:
          stats['written'] += 1
          stats['duration_s'] += record.duration
          stats['frames'] += len(record.frames)
          stats['with_video'] += int(len(record.frames) > 0)
          stats['with_audio'] += int(record.waveform is not None)
          stats['with_captions'] += int(len(record.captions) > 0)
        if on_row is not None:
          on_row()
    _fsync(tmp)
  except BaseException:
    # Interrupted or failed for a reason other than a worker death: this was not the file's fault.
    if os.path.exists(marker):
      os.remove(marker)
    raise
  finally:
    _active_marker = None
  stats.update(
    errors=errors,
    options=dataclasses.asdict(options),
    manifest_sha256=manifest_sha256,
    seconds=round(time.time() - start, 3),
  )
  # The .done.json goes first: a final .tfrecord therefore always has its counts next to it.
  _write_json_atomic(_done_path(output_dir, shard, num_shards), stats)
  os.replace(tmp, final)
  if os.path.exists(marker):
    os.remove(marker)
  return stats


_progress_queue = None


def _on_sigterm(signum, frame) -> None:
  # Terminated from outside: the pool stopping the others after one worker died, or a shutdown.
  # Not this file's fault, so its marker must not count towards skipping it.
  if _active_marker and os.path.exists(_active_marker):
    os.remove(_active_marker)
  os._exit(128 + signum)


def _init_worker(progress_queue) -> None:
  global _progress_queue
  _progress_queue = progress_queue
  signal.signal(signal.SIGTERM, _on_sigterm)
  _hide_gpus_from_tensorflow()


def _convert_shard_in_worker(*args) -> dict:
  return convert_shard(*args, on_row=lambda: _progress_queue.put(1))


def _culprit(
  output_dir: str, shard: int, num_shards: int, by_shard: list[list[ManifestRow]]
) -> str:
  """'; it was converting row R (MEDIA)' when a dead worker's marker names the file."""
  try:
    with open(_marker_path(output_dir, shard, num_shards), encoding='utf-8') as f:
      index = int(json.load(f)['row'])
  except (OSError, ValueError, KeyError, TypeError):
    return ''
  media = next((r.media for r in by_shard[shard] if r.index == index), '?')
  return f'; it was converting row {index} ({media})'


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _finished_shard(
  output_dir: str, shard: int, num_shards: int, options: Options, manifest_sha256: str
) -> dict | None:
  """The stored counts of a finished shard, None if it must be (re)done; raises on a mismatch."""
  final = os.path.join(output_dir, shard_name(shard, num_shards))
  done = _done_path(output_dir, shard, num_shards)
  if not os.path.exists(final):
    return None
  try:
    with open(done, encoding='utf-8') as f:
      stats = json.load(f)
  except (OSError, ValueError):
    return None  # counts lost: convert again rather than report wrong totals
  if stats.get('manifest_sha256') != manifest_sha256:
    raise ValueError(
      f'{final} was written from a different manifest (sha256 {stats.get("manifest_sha256")}); '
      'use a new --output_dir or delete the old shards'
    )
  stored = stats.get('options', {})
  for key, value in dataclasses.asdict(options).items():
    if stored.get(key) != value:
      raise ValueError(
        f'{final} was written with {key}={stored.get(key)!r}, this run asks for {value!r}; '
        'use a new --output_dir or delete the old shards'
      )
  return stats


def convert(
  manifest: str,
  output_dir: str,
  num_shards: int,
  options: Options | None = None,
  workers: int = 2,
  progress: bool = True,
) -> dict:
  """Converts a manifest into `num_shards` shards in `output_dir`, resuming an earlier run.

  workers <= 1 converts in this process; more start that many processes (spawn: TensorFlow does
  not survive fork), one shard per task. Returns the run's summary. A shard that fails for reasons
  other than its input (a worker killed, a full disk) stops the run once the running shards are
  done: RuntimeError naming the shards (and the row a dead worker was on); finished shards stay.
  """
  options = options or Options()
  if num_shards < 1:
    raise ValueError(f'num_shards must be >= 1, got {num_shards}')
  start = time.time()
  rows = read_manifest(manifest)
  manifest_sha256 = _file_sha256(manifest)
  os.makedirs(output_dir, exist_ok=True)
  for existing in sorted(glob.glob(os.path.join(output_dir, 'shard-*.tfrecord'))):
    match = _SHARD_RE.match(os.path.basename(existing))
    if match and int(match.group(2)) != num_shards:
      raise ValueError(
        f'{existing} belongs to a {int(match.group(2))}-shard run, this run asks for {num_shards} '
        'shards; use a new --output_dir or delete the old shards'
      )

  by_shard: list[list[ManifestRow]] = [[] for _ in range(num_shards)]
  for row in rows:
    by_shard[row.index % num_shards].append(row)
  results: dict[int, dict] = {}
  for shard in range(num_shards):
    stats = _finished_shard(output_dir, shard, num_shards, options, manifest_sha256)
    if stats is not None:
      results[shard] = stats
  reused = sorted(results)
  todo = [s for s in range(num_shards) if s not in results]
  failures: dict[int, str] = {}

  with tqdm(
    total=len(rows),
    initial=sum(len(by_shard[s]) for s in reused),
    unit='row',
    desc='convert',
    disable=not progress,
    smoothing=0.1,
  ) as bar:

    def args(s: int) -> tuple:
      return s, num_shards, by_shard[s], output_dir, options, manifest_sha256

    if workers <= 1:
      for shard in todo:
        results[shard] = convert_shard(*args(shard), on_row=lambda: bar.update(1))
    elif todo:
      ctx = multiprocessing.get_context('spawn')
      progress_queue = ctx.Queue()

      def drain() -> None:
        n = 0
        while True:
          try:
            n += progress_queue.get_nowait()
          except queue.Empty:
            break
        if n:  # update(0) would still redraw the bar
          bar.update(n)

      max_workers = min(workers, len(todo))
      with concurrent.futures.ProcessPoolExecutor(
        max_workers=max_workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(progress_queue,),
      ) as pool:
        # At most one shard per worker is handed over at a time: the executor cannot take back work
        # it has queued, so after Ctrl-C it would otherwise go on converting queued shards.
        waiting, running = list(todo), {}
        try:
          while waiting or running:
            while waiting and len(running) < max_workers and not failures:
              shard = waiting.pop(0)
              running[pool.submit(_convert_shard_in_worker, *args(shard))] = shard
            finished, _ = concurrent.futures.wait(
              running, timeout=0.25, return_when=concurrent.futures.FIRST_COMPLETED
            )
            drain()
            for future in finished:
              shard = running.pop(future)
              try:
                results[shard] = future.result()
              except Exception as e:  # a worker died or the disk is full: not the input's fault
                failures[shard] = _error_text(e).rstrip('.')
            if failures and not running:
              for shard in waiting:  # the pool is likely broken; a rerun picks these up
                failures[shard] = 'not started after an earlier shard failed'
              waiting = []
        except KeyboardInterrupt:
          pool.shutdown(wait=False, cancel_futures=True)
          raise
      drain()
      # Only now, with every worker gone: a worker stopped by the pool removes its marker on the way
      # out, so what is left names the file a worker died on.
      for shard in failures:
        failures[shard] += _culprit(output_dir, shard, num_shards, by_shard)

  report = os.path.join(output_dir, REPORT_NAME)
  errors = sorted((e for s in results.values() for e in s['errors']), key=lambda e: e['row'])
  tmp = report + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for error in errors:
      f.write(json.dumps(error, ensure_ascii=False) + '\n')
  os.replace(tmp, report)

  def total(key: str) -> float:
    return sum(s[key] for s in results.values())

  summary = {
    'rows': len(rows),
    'written': int(total('written')),
    'skipped': int(total('skipped')),
    'duration_s': round(total('duration_s'), 3),
    'frames': int(total('frames')),
    'with_video': int(total('with_video')),
    'with_audio': int(total('with_audio')),
    'with_captions': int(total('with_captions')),
    'shards': num_shards,
    'shards_converted': len(todo) - len(failures),
    'shards_reused': len(reused),
    'seconds': round(time.time() - start, 3),
    'report': report,
  }
  if failures:
    details = '; '.join(f'{shard_name(s, num_shards)}: {e}' for s, e in sorted(failures.items()))
    raise RuntimeError(
      f'{len(failures)} shard(s) failed ({details}). Finished shards are kept; rerun with the '
      'same arguments to convert the rest.'
    )
  return summary


# ----------------------------------------------------------------------------------------------
# Validation


def _caption_coverage(starts: np.ndarray, ends: np.ndarray, duration: float) -> float:
  """Fraction of [0, duration] inside the union of the caption intervals."""
  if duration <= 0 or len(starts) == 0:
    return 0.0
  covered, reach = 0.0, 0.0
  for s, e in sorted(zip(np.clip(starts, 0, duration), np.clip(ends, 0, duration), strict=True)):
    s = max(s, reach)
    if e > s:
      covered += e - s
      reach = e
  return covered / duration


def _check_record(parsed: dict, decode_all: bool) -> tuple[str | None, dict]:
  """Returns (why the record is bad or None, a few facts about it)."""
  frames = parsed['frames'].numpy()
  wave = parsed['waveform'].numpy()
  height, width = int(parsed['height']), int(parsed['width'])
  has_video, has_audio = int(parsed['has_video']), int(parsed['has_audio'])
  if has_video != int(len(frames) > 0):
    return f'has_video={has_video} but {len(frames)} frames', {}
  if has_audio != int(len(wave) > 0):
    return f'has_audio={has_audio} but {len(wave)} samples', {}
  if has_audio and int(parsed['sample_rate']) <= 0:
    return f'audio without a sample rate ({int(parsed["sample_rate"])})', {}
  if len(wave) and not (np.all(np.isfinite(wave)) and np.abs(wave).max() <= 1.0):
    return 'waveform has values outside [-1, 1] or non-finite ones', {}
  starts, ends = parsed['caption_start'].numpy(), parsed['caption_end'].numpy()
  if not len(starts) == len(ends) == len(parsed['captions']):
    return 'caption/string, caption/start and caption/end have different lengths', {}
  if np.any(ends < starts):
    return f'caption {int(np.argmax(ends < starts))} ends before it starts', {}
  picks = range(len(frames)) if decode_all else sorted({0, len(frames) // 2, len(frames) - 1})
  for i in picks if len(frames) else ():
    try:
      image = tf.io.decode_jpeg(frames[i])
    except tf.errors.OpError as e:
      return f'frame {i} is not a decodable JPEG ({e.message.strip()[:200]})', {}
    if tuple(image.shape) != (height, width, 3):
      return f'frame {i} is {tuple(image.shape)}, the record says {(height, width, 3)}', {}
  duration = float(parsed['duration'])
  return None, {
    'coverage': _caption_coverage(starts, ends, duration) if len(starts) else None,
    'frames': len(frames),
  }


def inspect_shards(input_dir: str, decode_all: bool = False) -> dict:
  """Reads every record of every *.tfrecord in `input_dir` and computes the validator's figures.

  `unreadable_shards` lists shards whose file is corrupt or truncated (records before the damage
  still count); `bad_records` lists records that do not parse, whose JPEG frames do not decode, or
  whose fields contradict each other.
  """
  paths = sorted(glob.glob(os.path.join(input_dir, '*.tfrecord')))
  counts = {'records': 0, 'with_video': 0, 'with_audio': 0, 'with_captions': 0, 'with_labels': 0}
  durations, coverages = [], []
  fps_hist: dict[str, int] = {}
  rate_hist: dict[str, int] = {}
  size_hist: dict[str, int] = {}
  labels: set[int] = set()
  bad, unreadable, mismatches = [], [], []
  max_frame_error = 0.0
  for path in paths:
    name = os.path.basename(path)
    index = -1
    try:
      for index, serialized in enumerate(tf.data.TFRecordDataset(path)):  # noqa: B007
        counts['records'] += 1
        try:
          parsed = schema.parse(serialized)
          media_id = parsed['media_id'].numpy().decode('utf-8', 'replace')
        except (tf.errors.OpError, ValueError) as e:
          bad.append({'shard': name, 'index': index, 'media_id': None, 'error': _error_text(e)})
          continue
        why, facts = _check_record(parsed, decode_all)
        if why is not None:
          bad.append({'shard': name, 'index': index, 'media_id': media_id, 'error': why})
          continue
        duration = float(parsed['duration'])
        durations.append(duration)
        has_video = int(parsed['has_video'])
        counts['with_video'] += has_video
        counts['with_audio'] += int(parsed['has_audio'])
        counts['with_captions'] += int(parsed['has_captions'])
        record_labels = parsed['labels'].numpy().tolist()
        counts['with_labels'] += int(len(record_labels) > 0)
        labels.update(record_labels)
        if facts['coverage'] is not None:
          coverages.append(facts['coverage'])
        if has_video:
          fps = float(parsed['frame_rate'])
          fps_hist[f'{fps:g}'] = fps_hist.get(f'{fps:g}', 0) + 1
          size = f'{int(parsed["height"])}x{int(parsed["width"])}'
          size_hist[size] = size_hist.get(size, 0) + 1
          expected = duration * fps
          error = abs(facts['frames'] - expected)
          max_frame_error = max(max_frame_error, error)
          # Audio that runs on past the last frame makes duration * fps a little larger than the
          # frame count; beyond a frame or 2% something is off.
          if error > max(1.0, 0.02 * expected):
            mismatches.append(
              {'shard': name, 'index': index, 'media_id': media_id, 'frames': facts['frames'],
               'expected': round(expected, 2)}
            )  # fmt: skip
        if int(parsed['has_audio']):
          rate = str(int(parsed['sample_rate']))
          rate_hist[rate] = rate_hist.get(rate, 0) + 1
    except tf.errors.OpError as e:  # DataLossError: truncated or corrupted file
      unreadable.append(
        {'shard': name, 'records_read': index + 1, 'error': _error_text(e).splitlines()[0]}
      )
  total = float(sum(durations))
  return {
    'input_dir': input_dir,
    'shards': len(paths),
    **counts,
    'good_records': counts['records'] - len(bad),
    'total_duration_s': round(total, 3),
    'total_duration_h': round(total / 3600, 4),
    'mean_duration_s': round(total / len(durations), 3) if durations else 0.0,
    'fps_histogram': dict(sorted(fps_hist.items())),
    'sample_rate_histogram': dict(sorted(rate_hist.items())),
    'frame_size_histogram': dict(sorted(size_hist.items(), key=lambda kv: -kv[1])[:10]),
    'distinct_labels': len(labels),
    'caption_coverage_mean': round(float(np.mean(coverages)), 4) if coverages else None,
    'frame_count_mismatches': len(mismatches),
    'frame_count_max_error': round(max_frame_error, 3),
    'frame_count_mismatch_examples': mismatches[:20],
    'bad_records': len(bad),
    'bad_record_list': bad[:100],
    'unreadable_shards': unreadable,
  }
