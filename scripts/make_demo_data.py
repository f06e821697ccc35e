r"""Writes the bundled demo dataset: mp4s of moving handwritten digits with per-digit audio chords.

  python scripts/make_demo_data.py --output_dir=/tmp/demo_data
  python scripts/make_demo_data.py --output_dir=/tmp/noisy --caption_irrelevant=0.3 --audio_swap=0.1
  python scripts/make_demo_data.py --output_dir=/tmp/long --segments=8,8   # 8 captions per video
  python scripts/make_demo_data.py --output_dir=/tmp/ego --segments=5,8 --egomcq_splits=test
  python scripts/make_demo_data.py --output_dir=/tmp/mc --mc_splits=test  # caption multiple choice

See data_pipelines/demo.py for the content, the layout, the taxonomy and caption tags (--notags
leaves them out), the EgoMCQ-format questions (--egomcq_splits), the direction and appearance
caption multiple-choice questions (--mc_splits) and the noise switches. It never overwrites a file:
an --output_dir holding any file it would write is refused (one line naming them), unless it
holds this very dataset (same arguments): finished, it is left as it is; unfinished (an
interrupted run), the missing files are written.
"""

from __future__ import annotations

import dataclasses

from absl import app, flags

from data_pipelines import demo, demo_noise
from vatt_jax import cli

_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Directory to write media and manifests to.')
_NUM = {
  split: flags.DEFINE_integer(f'num_{split}', n, f'Videos in the {split} split.')
  for split, n in demo.DEFAULT_NUM_VIDEOS.items()
}
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of all content and noise choices (>= 0).')
_FPS = flags.DEFINE_integer('fps', 10, 'Frames per second.')
_SIZE = flags.DEFINE_integer('size', 64, 'Frame width and height in pixels (even, >= 32).')
_SAMPLE_RATE = flags.DEFINE_integer('sample_rate', 48_000, 'Audio sample rate in Hz.')
_WORKERS = flags.DEFINE_integer('workers', 2, 'Encoding processes (1 = no subprocesses).')
_SEGMENTS = flags.DEFINE_list(
  'segments',
  ','.join(map(str, demo.NUM_SEGMENTS)),
  f'LO,HI: segments (captions) per video, 1 <= LO <= HI <= {demo.MAX_SEGMENTS} (digits are '
  'distinct within a video); e.g. 8,8 for long-video (Norton) training.',
)
_TAGS = flags.DEFINE_bool(
  'tags', True, 'Write taxonomy.json and each caption\'s noun and verb classes ("nouns", "verbs").'
)
_EGOMCQ_SPLITS = flags.DEFINE_list(
  'egomcq_splits',
  [],
  'Splits to write EgoMCQ-format questions egomcq_{split}.json for (e.g. test): inter-video ones, '
  'and intra-video ones about videos of >= 5 segments (--segments=5,8).',
)
_MC_SPLITS = flags.DEFINE_list(
  'mc_splits',
  [],
  'Splits to write video-query caption multiple-choice questions for (e.g. test), one per segment: '
  'mc_direction_{split}.json (4 captions differing only in the direction) and '
  'mc_appearance_{split}.json (5 differing only in the digit).',
)
_NOISE = {
  field.name: flags.DEFINE_float(field.name, 0.0, f'Fraction in [0, 1]: {field.name} noise.')
  for field in dataclasses.fields(demo_noise.NoiseConfig)
}
flags.mark_flag_as_required('output_dir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    if len(_SEGMENTS.value) != 2 or not all(v.strip().isdigit() for v in _SEGMENTS.value):
      raise ValueError(f'--segments must be two integers LO,HI, got {",".join(_SEGMENTS.value)!r}')
    summary = demo.generate(
      _OUTPUT_DIR.value,
      num_videos={split: flag.value for split, flag in _NUM.items()},
      seed=_SEED.value,
      fps=_FPS.value,
      size=_SIZE.value,
      sample_rate=_SAMPLE_RATE.value,
      noise=demo_noise.NoiseConfig(**{name: flag.value for name, flag in _NOISE.items()}),
      workers=_WORKERS.value,
      num_segments=tuple(int(v) for v in _SEGMENTS.value),
      tags=_TAGS.value,
      egomcq_splits=_EGOMCQ_SPLITS.value,
      mc_splits=_MC_SPLITS.value,
    )
  except cli.UserError:  # the output folder: one line
    raise
  except ValueError as e:  # bad flag values: a usage message, not a traceback
    raise app.UsageError(str(e)) from e
  if summary.get('unchanged'):
    print(f'{summary["output_dir"]} already holds this demo dataset: nothing written')
    return
  for split, s in summary['splits'].items():
    noisy = {k: v for k, v in s['noise_applied'].items() if v}
    print(
      f'{split:>5}: {s["videos"]:4d} videos, {s["segments"]:4d} segments, '
      f'{s["seconds"] / 60:6.1f} min' + (f', noise {noisy}' if noisy else '')
    )
  for split, asked in summary.get('egomcq', {}).items():
    print(
      f'egomcq_{split}.json: {asked["inter"]} inter-video, {asked["intra"]} intra-video questions'
    )
  for split, asked in summary.get('mc', {}).items():
    print(
      f'mc_direction_{split}.json: {asked["direction"]} direction questions, '
      f'mc_appearance_{split}.json: {asked["appearance"]} appearance questions'
    )
  print(f'wrote {summary["output_dir"]} in {summary["elapsed_s"]:.1f} s')


if __name__ == '__main__':
  cli.run(main)
