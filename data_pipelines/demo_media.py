"""The demo dataset's media (data_pipelines.demo): a planned video's frames (its digits crossing a
shared background texture), its audio (each digit's three-tone chord) and their H.264 + AAC mp4.
"""

from __future__ import annotations

import os

import numpy as np

# Three tones per digit on three disjoint ladders: every one of the 30 tones is ≥ 50 Hz from any
# other (separable after AAC and a 1.5 s FFT), and all sit below 3 kHz, which AAC keeps intact.
DIGIT_TONES = tuple((250 + 50 * d, 900 + 70 * d, 1800 + 110 * d) for d in range(10))
FADE_SECONDS = 0.02


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear (corner-aligned) resize of [h, w] or [h, w, C] to [height, width(, C)]."""
  h, w = image.shape[:2]
  ys, xs = np.linspace(0, h - 1, height), np.linspace(0, w - 1, width)
  y0, x0 = np.minimum(ys.astype(int), h - 2), np.minimum(xs.astype(int), w - 2)
  wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
  if image.ndim == 3:
    wy, wx = wy[..., None], wx[..., None]
  top = image[y0][:, x0] * (1 - wx) + image[y0][:, x0 + 1] * wx
  bottom = image[y0 + 1][:, x0] * (1 - wx) + image[y0 + 1][:, x0 + 1] * wx
  return top * (1 - wy) + bottom * wy


def _background(seed: int, size: int) -> np.ndarray:
  """A smooth colour texture [size, size, 3] in [25, 135]: two octaves of bilinear value noise."""
  rng = np.random.default_rng(seed)
  texture = sum(w * resize(rng.random((n, n, 3)), size, size) for n, w in ((4, 1.0), (9, 0.5)))
  texture = (texture - texture.min()) / (np.ptp(texture) + 1e-6)
  return 25.0 + 110.0 * texture


def render_frames(video: dict, size: int) -> np.ndarray:
  """Frames [T, size, size, 3] uint8 of a planned video: the digit crosses the frame per segment."""
  background = _background(video['background_seed'], size)
  d = size * 3 // 8
  lo, hi = size // 16, size - d - size // 16  # the digit's top-left corner stays in [lo, hi]
  frames = []
  for seg in video['segments']:
    alpha = np.clip(resize(seg['pixels'] / 16.0, d, d) * 1.5, 0.0, 1.0)[..., None]
    cross = round(lo + seg['cross'] * (hi - lo))
    for progress in np.linspace(0.0, 1.0, seg['num_frames']):
      if seg['direction'] in ('left', 'up'):
        progress = 1.0 - progress
      main = round(lo + progress * (hi - lo))
      y, x = (cross, main) if seg['direction'] in ('left', 'right') else (main, cross)
      frame = background.copy()
      patch = frame[y : y + d, x : x + d]
      frame[y : y + d, x : x + d] = patch * (1 - alpha) + seg['colour'] * alpha
      frames.append(frame)
  return np.clip(np.stack(frames) + 0.5, 0, 255).astype(np.uint8)


def synthesize_audio(video: dict, sample_rate: int, num_samples: int) -> np.ndarray:
  """Mono waveform [num_samples] float32 in [-1, 1]: each segment's digit chord, tiled if short."""
  rng = np.random.default_rng(video['audio_seed'])
  total = int(round(video['duration'] * sample_rate))
  wave = np.zeros(total)
  fade = int(FADE_SECONDS * sample_rate)
  ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)  # raised cosine: no clicks at edges
  gain = rng.uniform(0.4, 0.6)
  for seg in video['segments']:
    a, b = int(round(seg['start'] * sample_rate)), int(round(seg['end'] * sample_rate))
    t = np.arange(b - a) / sample_rate
    chord = sum(
      np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in DIGIT_TONES[seg['digit']]
    )
    envelope = np.ones(b - a)
    envelope[:fade], envelope[-fade:] = ramp, ramp[::-1]
    wave[a:b] = gain * chord / 3 * envelope
  wave += rng.normal(0.0, 0.01, total)
  return np.clip(np.resize(wave, num_samples), -1, 1).astype(np.float32)


def _encode(path: str, frames: np.ndarray, audio: np.ndarray, fps: int, sample_rate: int) -> None:
  """Writes H.264 (yuv420p, crf 18) + mono AAC (96 kb/s) mp4; via a temp file so never half-written."""
  import av

  tmp = path + '.part'
  with av.open(tmp, 'w', format='mp4') as container:
    # One x264 thread: parallelism comes from encoding many videos at once.
    video = container.add_stream(
      'libx264', rate=fps, options={'crf': '18', 'preset': 'veryfast', 'threads': '1'}
    )
    video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
    sound = container.add_stream('aac', rate=sample_rate, layout='mono')
    sound.bit_rate = 96_000
    for i, image in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts = i
      container.mux(video.encode(frame))
    container.mux(video.encode())
    for start in range(0, len(audio), 1024):  # AAC's frame size
      frame = av.AudioFrame.from_ndarray(
        audio[None, start : start + 1024], format='fltp', layout='mono'
      )
      frame.sample_rate, frame.pts = sample_rate, start
      container.mux(sound.encode(frame))
    container.mux(sound.encode())
  os.replace(tmp, path)


def make_video(job: tuple[str, dict, int, int]) -> None:
  path, video, size, sample_rate = job
  num_samples = int(round(video['duration'] * sample_rate))
  audio = synthesize_audio(video.get('audio_source', video), sample_rate, num_samples)
  _encode(path, render_frames(video, size), audio, video['fps'], sample_rate)
