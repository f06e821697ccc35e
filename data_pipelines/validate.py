"""Shard inspection for scripts/validate_shards.py: reads shards back with `schema.parse`.

`inspect_shards` checks every record (fields consistent, JPEG frames decodable) and computes the
counts, durations and histograms the validator prints; records of an older format (which may not
even parse as the current one) are told apart by `schema.record_version` and reported as such.
`problems` gives the validator's error lines.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import tensorflow as tf

from data_pipelines import schema
from data_pipelines.decode import _hide_gpus_from_tensorflow
from data_pipelines.ingest import old_format
from data_pipelines.ingest_shard import error_text

_hide_gpus_from_tensorflow()


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
  """Returns (why the record is bad or None, a few facts about it); the version is checked before."""
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
  whose fields contradict each other; `old_format_shards` the shards holding records of another
  format version ({shard, version, records}), which count as bad records too.
  """
  paths = sorted(glob.glob(os.path.join(input_dir, '*.tfrecord')))
  counts = {'records': 0, 'with_video': 0, 'with_audio': 0, 'with_captions': 0, 'with_labels': 0}
  durations, coverages = [], []
  fps_hist: dict[str, int] = {}
  rate_hist: dict[str, int] = {}
  size_hist: dict[str, int] = {}
  labels: set[int] = set()
  bad, unreadable, mismatches = [], [], []
  old: dict[tuple[str, int], int] = {}  # (shard, version) → records
  max_frame_error = 0.0
  for path in paths:
    name = os.path.basename(path)
    index = -1
    try:
      for index, serialized in enumerate(tf.data.TFRecordDataset(path)):  # noqa: B007
        counts['records'] += 1
        try:
          parsed = schema.parse(serialized)
          stored = int(parsed['version']), parsed['media_id'].numpy().decode('utf-8', 'replace')
        except (tf.errors.OpError, ValueError) as e:
          stored = schema.record_version(serialized.numpy())
          if stored is None or stored[0] == schema.SCHEMA_VERSION:
            error = error_text(e)
            bad.append({'shard': name, 'index': index, 'media_id': None, 'error': error})
            continue
        version, media_id = stored
        if version != schema.SCHEMA_VERSION:
          old[name, version] = old.get((name, version), 0) + 1
          error = f'record {old_format(version)}'
          bad.append({'shard': name, 'index': index, 'media_id': media_id, 'error': error})
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
        {'shard': name, 'records_read': index + 1, 'error': error_text(e).splitlines()[0]}
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
    'old_format_shards': [
      {'shard': shard, 'version': version, 'records': n} for (shard, version), n in old.items()
    ],
  }


def problems(stats: dict) -> list[str]:
  """The validator's error lines (without 'error: '): unreadable shards, shards of another format
  version (one line per version), no shards at all. Bad records are listed, not errors."""
  lines = [
    f'shard {u["shard"]} cannot be read after {u["records_read"]} records: {u["error"]}'
    for u in stats['unreadable_shards']
  ]
  by_version: dict[int, list[str]] = {}
  for o in stats['old_format_shards']:
    by_version.setdefault(o['version'], []).append(o['shard'])
  for version, shards in sorted(by_version.items()):
    which = ', '.join(shards[:3]) + (f' and {len(shards) - 3} more' if len(shards) > 3 else '')
    count = (
      'all shards'
      if len(shards) == stats['shards']
      else f'{len(shards)} of {stats["shards"]} shards'
    )
    lines.append(f'{stats["input_dir"]}: {count} ({which}) hold records of {old_format(version)}')
  if stats['shards'] == 0:
    lines.append(f'no *.tfrecord files in {stats["input_dir"]}')
  return lines
