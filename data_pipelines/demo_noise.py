"""Misalignment injected into the demo dataset in known amounts (data_pipelines/demo.py applies it
to the planned manifest rows; scripts/make_demo_data.py's --caption_* / --audio_swap flags and the
noisy-correspondence benchmark set it): captions replaced by irrelevant text, shifted onto the
neighbouring segment, rotated among a video's segments, and audio taken from another video.
Each kind draws from its own random stream, so switching one on changes nothing of the others."""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.demo_vocab import IRRELEVANT, SPLITS


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
  """Fractions in [0, 1]. Caption fractions count captions, the others videos, per split."""

  caption_irrelevant: float = 0.0  # caption text replaced by a cooking/weather sentence
  caption_shift: float = 0.0  # caption moved by ± its segment's length (staying inside the video)
  caption_swap: float = 0.0  # a video's caption texts rotated among its segments
  audio_swap: float = 0.0  # a video's audio track taken from another video of the split

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f'--{field.name} must be a fraction in [0, 1], got {value}')


def pick(rng: np.random.Generator, n: int, fraction: float) -> list[int]:
  """Exactly round(fraction · n) distinct indices out of n, in a random order."""
  return rng.permutation(n)[: int(np.floor(fraction * n + 0.5))].tolist()


def apply_noise(videos: list[dict], rows: list[dict], noise: NoiseConfig, seed: int, split: str):
  """Corrupts manifest rows in place; one stream per noise kind so switches don't interact."""
  streams = {
    k: np.random.default_rng([seed, SPLITS.index(split), 1000 + i])
    for i, k in enumerate(('caption_irrelevant', 'caption_shift', 'caption_swap', 'audio_swap'))
  }
  for v in pick(streams['caption_swap'], len(rows), noise.caption_swap):
    m = len(rows[v]['captions'])
    perm = np.roll(np.arange(m), int(streams['caption_swap'].integers(1, m))).tolist()
    # The text and the classes it names move together.
    said = [{k: c[k] for k in ('text', 'nouns', 'verbs') if k in c} for c in rows[v]['captions']]
    for caption, source in zip(rows[v]['captions'], perm, strict=True):
      caption.update(said[source])
    rows[v]['noise']['caption_swap'] = perm
  flat = [(v, c) for v, row in enumerate(rows) for c in range(len(row['captions']))]
  for i in sorted(pick(streams['caption_irrelevant'], len(flat), noise.caption_irrelevant)):
    v, c = flat[i]
    caption = rows[v]['captions'][c]
    caption['text'] = IRRELEVANT[streams['caption_irrelevant'].integers(12)]
    if 'nouns' in caption:  # it names no digit and no motion
      caption['nouns'], caption['verbs'] = [], []
    rows[v]['noise'].setdefault('caption_irrelevant', []).append(c)
  for i in sorted(pick(streams['caption_shift'], len(flat), noise.caption_shift)):
    v, c = flat[i]
    caption, duration = rows[v]['captions'][c], rows[v]['duration']
    length = round(caption['end'] - caption['start'], 4)
    # Only moves that leave at least a sliver of the caption inside the video.
    moves = [b for b in (-length, length) if 0 <= caption['start'] + b < duration - 0.1]
    by = moves[streams['caption_shift'].integers(len(moves))]
    caption['start'] = round(caption['start'] + by, 4)
    caption['end'] = round(min(caption['end'] + by, duration), 4)
    rows[v]['noise'].setdefault('caption_shift', []).append(dict(index=c, by=by))
  chosen = pick(streams['audio_swap'], len(rows), noise.audio_swap)
  for j, v in enumerate(chosen):
    if len(chosen) > 1:  # a cycle through the chosen videos: nobody keeps its own audio
      source = chosen[(j + 1) % len(chosen)]
    elif len(rows) > 1:
      source = (v + 1 + int(streams['audio_swap'].integers(len(rows) - 1))) % len(rows)
    else:
      break  # a split of one video has nothing to swap with
    videos[v]['audio_source'] = {
      k: videos[source][k] for k in ('segments', 'duration', 'audio_seed')
    }
    rows[v]['noise']['audio_swap'] = rows[source]['media']


def noise_counts(rows: list[dict]) -> dict[str, int]:
  """How many captions (caption_*) or videos (caption_swap, audio_swap) each noise kind touched."""
  counts = dict.fromkeys(dataclasses.asdict(NoiseConfig()), 0)
  for row in rows:
    for kind, what in row['noise'].items():
      counts[kind] += len(what) if kind in ('caption_irrelevant', 'caption_shift') else 1
  return counts
