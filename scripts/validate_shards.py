r"""Reads every record of every *.tfrecord in a folder and prints what is in them.

  python scripts/validate_shards.py --input_dir=data/shards [--json] [--decode_all]

Exit status: 0 all good; 1 some records are bad (do not parse, JPEG frames that do not decode,
contradictory fields); 2 a shard cannot be read (corrupt or truncated file), holds records of
another format version ('format version 1, this code reads 2: convert the media again with
scripts/prepare_data.py'), or there are no shards. See docs/DATA.md for the figures.
"""

from __future__ import annotations

import json
import os
import sys

# TensorFlow's C++ start-up chatter (CUDA probing, dataset defaults) says nothing about the data.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags

from data_pipelines import validate
from vatt_jax import cli

_INPUT_DIR = flags.DEFINE_string('input_dir', None, 'Folder holding the *.tfrecord shards.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of text.')
_DECODE_ALL = flags.DEFINE_bool(
  'decode_all', False, 'Decode every JPEG frame (default: first, middle and last of each record).'
)
flags.mark_flags_as_required(['input_dir'])


def _histogram(hist: dict) -> str:
  return ', '.join(f'{k}: {v}' for k, v in hist.items()) or '-'


def _print_text(stats: dict) -> None:
  n = stats['records']
  coverage = stats['caption_coverage_mean']
  lines = [
    f'{stats["input_dir"]}: {stats["shards"]} shards, {n} records ({stats["good_records"]} good)',
    f'  with video {stats["with_video"]}, with audio {stats["with_audio"]}, '
    f'with captions {stats["with_captions"]}, with labels {stats["with_labels"]} '
    f'({stats["distinct_labels"]} distinct)',
    f'  duration total {stats["total_duration_h"]:.3f} h ({stats["total_duration_s"]:.1f} s), '
    f'mean {stats["mean_duration_s"]:.2f} s',
    f'  fps: {_histogram(stats["fps_histogram"])}',
    f'  sample rate: {_histogram(stats["sample_rate_histogram"])}',
    f'  frame sizes (HxW): {_histogram(stats["frame_size_histogram"])}',
    '  caption coverage (mean over captioned records): '
    + ('-' if coverage is None else f'{coverage:.1%}'),
    f'  frame count vs duration x fps: {stats["frame_count_mismatches"]} mismatches, '
    f'largest difference {stats["frame_count_max_error"]} frames',
  ]
  for m in stats['frame_count_mismatch_examples']:
    lines.append(
      f'    {m["shard"]} #{m["index"]} {m["media_id"]}: {m["frames"]} frames, '
      f'expected {m["expected"]}'
    )
  lines.append(f'  unreadable shards: {len(stats["unreadable_shards"])}')
  lines.append(f'  shards of another format version: {len(stats["old_format_shards"])}')
  for u in stats['unreadable_shards']:
    lines.append(f'    {u["shard"]} after {u["records_read"]} records: {u["error"]}')
  lines.append(f'  bad records: {stats["bad_records"]}')
  for b in stats['bad_record_list']:
    lines.append(f'    {b["shard"]} #{b["index"]} {b["media_id"]}: {b["error"]}')
  print('\n'.join(lines))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not os.path.isdir(_INPUT_DIR.value):
    print(f'error: {_INPUT_DIR.value} is not a folder', file=sys.stderr)
    return 2
  stats = validate.inspect_shards(_INPUT_DIR.value, decode_all=_DECODE_ALL.value)
  if _JSON.value:
    print(json.dumps(stats))
  else:
    _print_text(stats)
  problems = validate.problems(stats)
  for line in problems:
    print(f'error: {line}', file=sys.stderr)
  if problems:
    return 2
  return 1 if stats['bad_records'] else 0


if __name__ == '__main__':
  cli.run(main)
