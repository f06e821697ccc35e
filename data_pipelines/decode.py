"""One media file → one `schema.Record`: PyAV decoding, frame-rate resampling, resizing, audio.

* video: output frame k (at k / fps seconds) shows the source frame with the latest presentation
  timestamp <= k / fps, so any source rate, constant or variable, comes out at exactly `fps`; the
  frame is resized so its short side is `short_side` (never upscaled) and stored as JPEG.
* audio: resampled to `sample_rate`, averaged to mono, float32 in [-1, 1].

`convert_row` does this for a manifest row; files that decode to nothing usable raise `MediaError`.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import os
from collections.abc import Iterable, Sequence

import av
import numpy as np
import tensorflow as tf

from data_pipelines import schema
from data_pipelines.manifest import ManifestRow


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

# Encoders pad the last audio packet (AAC: up to 1024 samples); a decoded stream that overshoots its
# declared duration by at most this much is trimmed to it. Larger gaps mean the header is wrong,
# and then the decoded samples are trusted instead.
_AUDIO_PADDING_TOLERANCE_S = 0.1
# A file that decodes to less than its header declares, by more than this many seconds and this
# fraction, was cut short (an interrupted download): FFmpeg just stops at the cut without an error.
# The margins allow for headers that estimate the duration from the bitrate (VBR MP3).
_TRUNCATION_TOLERANCE_S = 1.0
_TRUNCATION_TOLERANCE = 0.1


class MediaError(Exception):
  """A media file that decodes to nothing usable (the message says why)."""


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


def _seconds(value: float | None) -> Fraction | None:
  # The decimal a person wrote: 1.8 s is 9/5, not the binary float just above it (which would
  # keep a frame at exactly 1.8 s).
  return None if value is None else Fraction(repr(float(value)))


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
    self._limit = _seconds(options.max_duration)
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
    self._limit = _seconds(options.max_duration)
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
  return [dataclasses.replace(c, end=min(c.end, duration)) for c in captions if c.start < duration]


def convert_row(row: ManifestRow, options: Options) -> schema.Record:
  """Decodes a manifest row into a full Record. Raises for a row that cannot be converted."""
  if row.error:
    raise ValueError(row.error)
  if '://' not in row.path and not os.path.isfile(row.path):
    raise FileNotFoundError(f'no such file: {row.path}')
  if row.start is None:
    record, duration = decode_media(row.path, options)
    captions = row.captions
  else:
    # Decode up to the window's end, then cut: frames and samples are on fixed grids from time 0.
    limit = row.end if options.max_duration is None else min(row.end, options.max_duration)
    record, duration = decode_media(row.path, dataclasses.replace(options, max_duration=limit))
    record, duration = _cut(record, row.start, duration, row.media)
    # Tags travel with their caption.
    captions = [
      dataclasses.replace(c, start=max(c.start - row.start, 0.0), end=c.end - row.start)
      for c in row.captions
      if c.end > row.start
    ]
  record.media_id = row.media_id
  record.captions = _clip_captions(captions, duration)
  record.labels = list(row.labels)
  return record


def _cut(record: schema.Record, start: float, end: float, media: str):
  """The part of a decoded record from `start` to its end (the window's end) s; time 0 = start."""
  if start >= end:
    raise MediaError(
      f'{media}: the window starts at {start:g} s, after the media ends ({end:.2f} s)'
    )
  if record.frames:
    first = math.floor(start * record.frame_rate + 0.5)
    record.frames = record.frames[first:]
    if not record.frames:
      raise MediaError(f'{media}: no video frame after {start:g} s')
  if record.waveform is not None:
    record.waveform = record.waveform[math.floor(start * record.sample_rate + 0.5) :]
  record.duration = end - start
  return record, record.duration
