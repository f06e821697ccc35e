"""The bundled demo dataset: real mp4 files of handwritten digits moving over textured backgrounds.

Each video (default 64×64 px at 10 fps, H.264 yuv420p + mono 48 kHz AAC) is 3–4 segments of
1.8–2.2 s over one of NUM_BACKGROUNDS shared textures. A segment shows one scikit-learn
`load_digits` digit (8×8, upscaled to 3/8 of the frame) crossing the frame left/right/up/down at constant speed, while the audio plays that digit's
three-tone chord (DIGIT_TONES, Hz) with 20 ms fades and a little noise. Every segment has a caption
naming digit and direction. So video, audio and text share two measurable concepts per segment.

Layout under output_dir: media/{split}/{id}.mp4, {split}.jsonl (one row per video: media path
relative to the manifest, duration s, captions [{start, end, text, nouns, verbs}], label = first
segment's digit, segments [{start, end, digit, direction}], noise = what was corrupted),
retrieval_{split}.jsonl (one row per segment: a manifest of windows with the clean caption and the
digit as label), taxonomy.json, egomcq_{split}.json and mc_{direction,appearance}_{split}.json
(when asked for), dataset_info.json and README.txt.

Taxonomy (taxonomy.json, `taxonomy()`; tags=False leaves it and the tags out): {"nouns": {class:
[synonyms]}, "verbs": {…}}, class index = key order. Nouns are the ten digits ("zero": ["zero",
"0"], …: the words and numerals the captions use); verbs the four directions ("move left": every
caption phrase of the direction after every motion verb, "moves to the left", "drifting
leftwards", …), so synonymous motion verbs are one class and two captions share a noun and a verb
exactly when they show the same digit moving the same way. Matching synonyms as whole phrases,
lower case, finds exactly one noun and one verb in every clean caption. Each caption's "nouns" and
"verbs" are the classes of what its text says: its segment's digit and direction index, those of
the caption it was swapped with (caption_swap), none for an irrelevant one.

EgoMCQ (egomcq_{split}.json, `egomcq_questions`): EgoMCQ's released format, {"<i>": {"query":
{video_uid, video_dur, clip_start, clip_end, clip_text, tag_noun, tag_verb}, "choices": {"0": …,
…, "4": …}, "answer": k, "types": 1 | 2}}, video_uid being the video's manifest media path (the
media id of its record) and the times its segment's. For every segment of every video of the split,
an inter-video question (types 1: the segment and one segment of each of 4 other videos) and, when
its video has at least 5 segments, an intra-video one (types 2: the segment and 4 other segments of
its video); choices in random order, the query the segment's clean caption. Every choice other
than the answer shows another digit or direction than the query says (within a video, the digits
differ anyway), so each question has one right answer. Videos of fewer than 5 segments (the
default 3–4) give inter-video questions only: --segments=5,8 makes intra-video ones.

Caption multiple choice (mc_direction_{split}.json, mc_appearance_{split}.json,
`caption_mc_questions`): the other way round, MSR-VTT style: a video clip as the query and
captions as the choices, {"<i>": {"query": {video_uid, video_dur, clip_start, clip_end}, "choices":
{"0": {"clip_text": …}, …}, "answer": k, "types": "direction" | "appearance"}}, one question per
segment of every video of the split (the query: the segment). The candidates are the segment's
clean caption and the same wording (template, verb, phrase index) with only the tested words
changed: 'direction', 4 candidates, one per direction phrase (chance 25 %); 'appearance', 5
candidates, the segment's digit and 4 others (its word or numeral, with "a"/"an"; chance 20 %).
Exactly one candidate says what the clip shows. Direction questions are only fair to a model
trained without mirrored clips (data.random_flip=False): a flip turns left into right.

Never overwrites: a file it would write that is already there stops it before it writes anything,
unless the folder holds this very dataset (the same arguments), finished (nothing to do) or
unfinished (MARKER_NAME is there until the end: only the missing files are written).

Optional noise (fractions, exact counts per split, chosen from the seed) corrupts captions or audio
for robustness experiments; the clean content of every video does not depend on it. Same arguments
→ byte-identical manifests and identical decoded media (mp4 bytes carry encoder metadata).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib
import time
from collections.abc import Mapping, Sequence

import numpy as np

from data_pipelines.demo_media import DIGIT_TONES, make_video
from data_pipelines.demo_noise import NoiseConfig, apply_noise, noise_counts
from data_pipelines.demo_questions import (
  MC_KINDS,
  MCQ_CHOICES,
  caption_mc_questions,
  egomcq_questions,
)
from data_pipelines.demo_vocab import (
  DIGIT_WORDS,
  DIRECTIONS,
  SPLITS,
  caption_form,
  caption_tags,
  caption_text,
  taxonomy,
)
from data_pipelines.manifest import check_output_dir
from vatt_jax import cli

DEFAULT_NUM_VIDEOS = {'train': 96, 'val': 24, 'test': 24}
# Segments per video, an inclusive range; with ~2 s segments a video lasts 5.4–8.8 s. plan() and
# generate() take another (num_segments; make_demo_data.py --segments=LO,HI), e.g. (8, 8) for
# long-video (video–paragraph) training; the default's files are byte-identical to before it.
NUM_SEGMENTS = (3, 4)
# A video's digits are distinct, so each caption matches exactly one of its video's segments (the
# clip–caption alignment within a video, which long-video objectives learn, is unambiguous): at
# most 10 segments.
MAX_SEGMENTS = 10
SEGMENT_SECONDS = (1.8, 2.2)  # inclusive range, rounded to whole frames
NUM_BACKGROUNDS = 8  # textures shared by all videos (so no video is recognisable by its own)
_SEGMENT_KEYS = ('start', 'end', 'digit', 'direction')  # a segment as the manifest shows it
_RETRIEVAL_KEYS = ('start', 'end', 'caption', 'digit', 'direction')
# Written first and removed last: an output folder holding it is an unfinished run of generate().
MARKER_NAME = 'make_demo_data.unfinished.json'
TAXONOMY_NAME = 'taxonomy.json'


def _digit_pools() -> tuple[np.ndarray, dict[str, list[np.ndarray]]]:
  """Images [1797, 8, 8] in 0..16 and, per split and digit, the indices that split may use."""
  from sklearn.datasets import load_digits  # slow import: only the planning process needs it

  digits = load_digits()
  # A fixed (seed-independent) 70/15/15 partition, so val/test never reuse a train handwriting.
  order = np.random.default_rng(1234).permutation(len(digits.target))
  cuts = np.split(order, [int(0.7 * len(order)), int(0.85 * len(order))])
  pools = {
    s: [np.sort(c[digits.target[c] == d]) for d in range(10)]
    for s, c in zip(SPLITS, cuts, strict=True)
  }
  return digits.images, pools


def _plan_video(
  seed: int, split: str, index: int, fps: int, pools, images, segment_range=NUM_SEGMENTS
) -> dict:
  """Everything needed to render one clean video, drawn from its own stream (seed, split, index)."""
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  num_segments = int(rng.integers(segment_range[0], segment_range[1] + 1))
  lo, hi = round(SEGMENT_SECONDS[0] * fps), round(SEGMENT_SECONDS[1] * fps)
  digits = rng.choice(10, num_segments, replace=False)  # distinct: see MAX_SEGMENTS
  segments, frame = [], 0
  for digit in digits.tolist():
    num_frames = int(rng.integers(lo, hi + 1))
    pool = pools[split][digit]
    direction = DIRECTIONS[rng.integers(4)]
    form = caption_form(rng)
    segments.append(
      dict(
        start=round(frame / fps, 4),
        end=round((frame + num_frames) / fps, 4),
        digit=digit,
        direction=direction,
        num_frames=num_frames,
        caption=caption_text(digit, direction, form),
        caption_form=form,  # for the caption multiple-choice questions' candidates
        pixels=images[pool[rng.integers(len(pool))]],
        cross=float(rng.random()),  # position across the motion axis, as a fraction of the room
        colour=rng.uniform(215, 255, 3),  # bright, so the digit stands out from any background
      )
    )
    frame += num_frames
  video_id = f'{split}_{index:05d}'
  return dict(
    id=video_id,
    media=f'media/{split}/{video_id}.mp4',
    duration=round(frame / fps, 4),
    fps=fps,
    segments=segments,
    # From a small pool shared by all splits: a background of its own would let a model tell the
    # training videos apart (and match them to their captions) without looking at the digits.
    background_seed=int(
      np.random.default_rng([seed, 1000 + int(rng.integers(NUM_BACKGROUNDS))]).integers(2**63)
    ),  # fmt: skip
    audio_seed=int(rng.integers(2**63)),
  )


def _check_segments(num_segments) -> tuple[int, int]:
  """(lo, hi) segments per video, checked: integers with 1 ≤ lo ≤ hi ≤ MAX_SEGMENTS."""
  try:
    lo, hi = (int(n) for n in num_segments)
    valid = (lo, hi) == tuple(num_segments)
  except (TypeError, ValueError):
    valid = False
  if not valid or not 1 <= lo <= hi <= MAX_SEGMENTS:
    raise ValueError(
      f'--segments must be two integers LO,HI with 1 <= LO <= HI <= {MAX_SEGMENTS} (a video '
      f'shows distinct digits), got {num_segments!r}'
    )
  return lo, hi


def plan(
  num_videos: Mapping[str, int] = DEFAULT_NUM_VIDEOS,
  *,
  seed: int = 0,
  fps: int = 10,
  noise: NoiseConfig = NoiseConfig(),
  num_segments: tuple[int, int] = NUM_SEGMENTS,
  tags: bool = True,
) -> dict[str, tuple[list[dict], list[dict]]]:
  """Per split: (render specs, manifest rows), without writing anything (cheap: no encoding).

  num_segments: (lo, hi), the inclusive range of segments per video, 1 ≤ lo ≤ hi ≤ MAX_SEGMENTS;
  tags: each caption carries its "nouns" and "verbs" (module docstring).
  """
  for split in SPLITS:
    n = num_videos.get(split, 0)
    if not isinstance(n, int | np.integer) or n < 0:
      raise ValueError(f'--num_{split} must be a non-negative integer, got {n!r}')
  if set(num_videos) - set(SPLITS):
    raise ValueError(f'num_videos splits must be among {SPLITS}, got {sorted(num_videos)}')
  if fps < 1:
    raise ValueError(f'--fps must be a positive integer, got {fps}')
  if seed < 0:
    raise ValueError(f'--seed must be >= 0, got {seed}')
  num_segments = _check_segments(num_segments)
  images, pools = _digit_pools()
  result = {}
  for split in SPLITS:
    videos = [
      _plan_video(seed, split, i, fps, pools, images, num_segments)
      for i in range(num_videos.get(split, 0))
    ]
    rows = []
    for video in videos:
      segs = video['segments']
      rows.append(
        dict(
          id=video['id'],
          media=video['media'],
          duration=video['duration'],
          captions=[
            dict(
              start=s['start'],
              end=s['end'],
              text=s['caption'],
              **(caption_tags(s['digit'], s['direction']) if tags else {}),
            )
            for s in segs
          ],
          label=segs[0]['digit'],
          segments=[{k: s[k] for k in _SEGMENT_KEYS} for s in segs],
          noise={},
        )
      )
    apply_noise(videos, rows, noise, seed, split)
    result[split] = (videos, rows)
  return result


_README = """vatt-jax demo dataset, written by scripts/make_demo_data.py (seed {seed}).
Videos per split: {counts}. Noise fractions: {noise}.
"""


def _write_text(path: pathlib.Path, text: str) -> None:
  """Via a temporary file, so a file there is always complete."""
  tmp = path.with_name(path.name + '.part')
  tmp.write_text(text)
  os.replace(tmp, path)


def _manifests(planned: dict, tags: bool) -> dict[str, str]:
  """{file name: text} of the manifests: {split}.jsonl and retrieval_{split}.jsonl."""
  texts = {}
  for split, (videos, rows) in planned.items():
    texts[f'{split}.jsonl'] = ''.join(json.dumps(r) + '\n' for r in rows)
    # A YouCook2-style manifest: prepare_data converts each segment (start/end) into its own
    # record, labelled with its digit and captioned with its clean caption.
    pairs = [
      {
        'id': f'{v["id"]}/{k}',
        'media': v['media'],
        **{key: seg[key] for key in _RETRIEVAL_KEYS},
        'captions': [
          {
            'start': seg['start'],
            'end': seg['end'],
            'text': seg['caption'],
            **(caption_tags(seg['digit'], seg['direction']) if tags else {}),
          }
        ],
        'label': seg['digit'],
      }
      for v in videos
      for k, seg in enumerate(v['segments'])
    ]
    texts[f'retrieval_{split}.jsonl'] = ''.join(json.dumps(p) + '\n' for p in pairs)
  return texts


def _output_state(out: pathlib.Path, paths: list[pathlib.Path], info: dict) -> str:
  """'new', 'resume' (this dataset, unfinished) or 'done' (this dataset, finished); raises
  `cli.UserError` when writing would overwrite anything else."""

  def load(path: pathlib.Path):
    try:
      return json.loads(path.read_text())
    except (OSError, ValueError):
      return None

  expected = json.loads(json.dumps(info))
  marker, info_path = out / MARKER_NAME, out / 'dataset_info.json'
  if marker.exists():
    if load(marker) == expected:
      return 'resume'
    raise cli.UserError(
      f'--output_dir={out} holds an unfinished demo dataset made with other arguments '
      f'({marker.name}): use a new --output_dir, or delete that folder first'
    )
  earlier = load(info_path) if info_path.exists() else None
  if earlier == expected:
    return 'done' if all(p.exists() for p in paths) else 'resume'
  if isinstance(earlier, dict) and earlier.get('name') == info['name']:
    raise cli.UserError(
      f'--output_dir={out} holds a demo dataset made with other arguments (dataset_info.json): '
      'use a new --output_dir, or delete that folder first'
    )
  parts = [p.with_name(p.name + '.part') for p in paths]  # temporary names: see _write_text
  clashes = [p for p in paths + parts if os.path.lexists(p)]
  if clashes:
    names = ', '.join(str(p.relative_to(out)) for p in clashes[:3])
    more = f' and {len(clashes) - 3} more' if len(clashes) > 3 else ''
    raise cli.UserError(
      f'--output_dir={out} already holds {names}{more}: make_demo_data never overwrites files; '
      'use a new or empty --output_dir'
    )
  return 'new'


def generate(
  output_dir: str | os.PathLike,
  *,
  num_videos: Mapping[str, int] = DEFAULT_NUM_VIDEOS,
  seed: int = 0,
  fps: int = 10,
  size: int = 64,
  sample_rate: int = 48_000,
  noise: NoiseConfig = NoiseConfig(),
  workers: int = 2,
  num_segments: tuple[int, int] = NUM_SEGMENTS,
  tags: bool = True,
  egomcq_splits: Sequence[str] = (),
  mc_splits: Sequence[str] = (),
) -> dict:
  """Writes the dataset (see the module docstring) and returns dataset_info plus elapsed_s (and
  unchanged=True when output_dir already held it, finished).

  size: frame side in px (even, ≥ 32); fps: frames per second; sample_rate: Hz; workers: encoding
  processes (1 = in this process); num_segments: (lo, hi) segments per video (see `plan`);
  tags: write taxonomy.json and each caption's classes; egomcq_splits: the splits to write
  egomcq_{split}.json for; mc_splits: the splits to write mc_direction_{split}.json and
  mc_appearance_{split}.json for.
  Raises ValueError naming the flag for a bad argument and `cli.UserError` for an output folder it
  cannot write or would overwrite files in, before writing anything.
  """
  if size < 32 or size % 2:
    raise ValueError(f'--size must be an even number of pixels >= 32, got {size}')
  if not 8000 <= sample_rate <= 96_000:
    raise ValueError(f'--sample_rate must be in [8000, 96000] Hz (AAC), got {sample_rate}')
  if workers < 1:
    raise ValueError(f'--workers must be >= 1, got {workers}')
  num_segments = _check_segments(num_segments)
  egomcq_splits = list(dict.fromkeys(egomcq_splits))
  if set(egomcq_splits) - set(SPLITS):
    raise ValueError(f'--egomcq_splits must be among {SPLITS}, got {",".join(egomcq_splits)}')
  mc_splits = list(dict.fromkeys(mc_splits))
  if set(mc_splits) - set(SPLITS):
    raise ValueError(f'--mc_splits must be among {SPLITS}, got {",".join(mc_splits)}')
  started = time.perf_counter()
  out = pathlib.Path(output_dir)
  planned = plan(num_videos, seed=seed, fps=fps, noise=noise, num_segments=num_segments, tags=tags)
  manifests = _manifests(planned, tags)
  questions = {
    split: egomcq_questions(planned[split][0], seed=seed, split=split, tags=tags)
    for split in egomcq_splits
  }
  caption_mc = {
    f'mc_{kind}_{split}.json': caption_mc_questions(
      planned[split][0], seed=seed, split=split, kind=kind
    )
    for split in mc_splits
    for kind in MC_KINDS
  }
  splits = {}
  for split, (_, rows) in planned.items():
    splits[split] = dict(
      videos=len(rows),
      segments=manifests[f'retrieval_{split}.jsonl'].count('\n'),
      seconds=round(sum(r['duration'] for r in rows), 4),
      noise_applied=noise_counts(rows),
    )
  info = dict(
    name='vatt-jax demo digits',
    seed=seed,
    fps=fps,
    size=size,
    sample_rate=sample_rate,
    video_codec='h264 (libx264, yuv420p, crf 18)',
    audio_codec='aac (mono, 96 kb/s)',
    splits=splits,
    noise=dataclasses.asdict(noise),
    directions=list(DIRECTIONS),
    digit_words=list(DIGIT_WORDS),
    digit_tones_hz=[list(t) for t in DIGIT_TONES],
  )
  if num_segments != NUM_SEGMENTS:  # absent at the default: its files stay as they were
    info['num_segments'] = list(num_segments)
  classes = taxonomy()
  if tags:  # absent with tags=False, whose files are the generator's from before tags
    info['taxonomy'] = dict(
      file=TAXONOMY_NAME, nouns=len(classes['nouns']), verbs=len(classes['verbs'])
    )
  if questions:
    info['egomcq'] = {
      split: {
        kind: sum(q['types'] == t for q in qs.values()) for t, kind in ((1, 'inter'), (2, 'intra'))
      }
      for split, qs in questions.items()
    }
  if mc_splits:  # absent when not asked for: the other files stay as they were
    info['mc'] = {
      split: {kind: len(caption_mc[f'mc_{kind}_{split}.json']) for kind in MC_KINDS}
      for split in mc_splits
    }
  counts = ', '.join(f'{s} {v["videos"]}' for s, v in splits.items())
  # The module docstring documents content and layout; the README carries it with the data.
  readme = _README.format(seed=seed, counts=counts, noise=info['noise'])
  if 'num_segments' in info:
    lo, hi = num_segments
    readme += f'Segments per video: {lo}–{hi} (the description below gives the default range).\n'
  if tags:
    readme += (
      f'{TAXONOMY_NAME}: {len(classes["nouns"])} noun classes (the digits) and '
      f'{len(classes["verbs"])} verb classes (the directions); every caption of the manifests '
      'carries its "nouns" and "verbs".\n'
    )
  for split, asked in info.get('egomcq', {}).items():
    readme += (
      f'egomcq_{split}.json: {asked["inter"]} inter-video and {asked["intra"]} intra-video '
      f'questions of {MCQ_CHOICES} choices about the {split} videos'
    )
    short = sum(len(v['segments']) < MCQ_CHOICES for v in planned[split][0])
    if short:
      readme += (
        f' ({short} of its {len(planned[split][0])} videos have fewer than {MCQ_CHOICES} '
        'segments and give inter-video questions only; --segments=5,8 makes longer videos)'
      )
    readme += '.\n'
  for split, asked in info.get('mc', {}).items():
    readme += (
      f'mc_direction_{split}.json, mc_appearance_{split}.json: {asked["direction"]} and '
      f'{asked["appearance"]} questions (one per segment of the {split} videos): a clip and '
      f'{MC_KINDS["direction"]} captions that differ only in the direction, or '
      f'{MC_KINDS["appearance"]} that differ only in the digit.\n'
    )
  readme += '\n' + __doc__
  # dataset_info.json last: `make demo` takes it for a finished dataset.
  texts = {
    **manifests,
    **({TAXONOMY_NAME: json.dumps(classes, indent=2) + '\n'} if tags else {}),
    **{f'egomcq_{split}.json': json.dumps(qs) + '\n' for split, qs in questions.items()},
    **{name: json.dumps(qs) + '\n' for name, qs in caption_mc.items()},
    'README.txt': readme,
    'dataset_info.json': json.dumps(info, indent=2) + '\n',
  }
  videos = [v for videos, _ in planned.values() for v in videos]
  media = [out / v['media'] for v in videos]

  check_output_dir(str(output_dir))
  state = _output_state(out, [*media, *(out / n for n in texts)], info)
  result = dict(info, output_dir=str(out))
  if state == 'done':
    return dict(result, elapsed_s=round(time.perf_counter() - started, 2), unchanged=True)
  # Accepted: from here on things are written, and (resuming) only what is missing.
  out.mkdir(parents=True, exist_ok=True)
  marker = out / MARKER_NAME
  if not marker.exists():
    _write_text(marker, json.dumps(info, indent=2) + '\n')
  jobs = []
  for video, path in zip(videos, media, strict=True):
    if not path.exists():
      path.parent.mkdir(parents=True, exist_ok=True)
      jobs.append((str(path), video, size, sample_rate))
  if workers > 1 and len(jobs) > 1:
    # spawn, not fork: the caller may hold threads (JAX, TF) that a forked child would inherit.
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      list(pool.map(make_video, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
  else:
    for job in jobs:
      make_video(job)
  # Manifests after the media, so none ever names a file that is not there yet.
  for name, text in texts.items():
    if not (out / name).exists():
      _write_text(out / name, text)
  marker.unlink()
  return dict(result, elapsed_s=round(time.perf_counter() - started, 2))
