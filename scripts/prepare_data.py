r"""Converts raw media listed in a manifest into TFRecord shards of schema records.

  python scripts/prepare_data.py --manifest=data/howto.jsonl --output_dir=data/shards \
      --num_shards=64 [--fps=10 --short_side=256 --sample_rate=48000 --jpeg_quality=90 \
      --workers=2 --max_duration=SECONDS --media_root=DIR --taxonomy=taxonomy.json]

  # EgoClip's released metadata (TAB-separated egoclip.csv): one record per 600 s chunk of a video
  python scripts/prepare_data.py --manifest=egoclip.csv --media_root=ego4d/videos \
      --output_dir=data/egoclip/train --num_shards=1024 [--egoclip_chunk_seconds=600]

Rerunning with the same arguments after an interruption converts only the missing shards. Files
that cannot be converted, and rows that repeat an earlier row's media, are skipped and listed in
OUTPUT_DIR/report.jsonl. Refused before anything is written, with one line: an empty manifest, one
that is not UTF-8, an --output_dir that cannot be written. A full disk ends the run with one line
naming the path; the rerun after freeing space converts the rest. With --taxonomy, captions that
carry no noun / verb tags are tagged by matching the taxonomy's names and synonyms in their text,
and the taxonomy is copied to OUTPUT_DIR/taxonomy.json. See docs/DATA.md.
"""

from __future__ import annotations

import os

# TensorFlow's C++ start-up chatter (CUDA probing, dataset defaults) says nothing about the data.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags

from data_pipelines import decode, ingest, manifest, taxonomy
from vatt_jax import cli

_MANIFEST = flags.DEFINE_string('manifest', None, 'JSONL or CSV manifest (docs/DATA.md).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Folder for the shards and report.jsonl.')
_NUM_SHARDS = flags.DEFINE_integer('num_shards', None, 'Number of shards; row i goes to i % N.')
_FPS = flags.DEFINE_float('fps', 10.0, 'Stored frames per second.')
_SHORT_SIDE = flags.DEFINE_integer(
  'short_side', 256, 'Frames are shrunk to this short side (never enlarged); 0 keeps the size.'
)
_SAMPLE_RATE = flags.DEFINE_integer('sample_rate', 48000, 'Stored audio sample rate (Hz, mono).')
_JPEG_QUALITY = flags.DEFINE_integer('jpeg_quality', 90, 'JPEG quality of the stored frames.')
_WORKERS = flags.DEFINE_integer(
  'workers', 2, 'Processes converting shards in parallel; 1 converts in this process.'
)
_MAX_DURATION = flags.DEFINE_float(
  'max_duration', None, 'Keep at most this many seconds from the start of each file.'
)
_MEDIA_ROOT = flags.DEFINE_string(
  'media_root',
  None,
  'Folder that relative media paths (EgoClip: {video_uid}.mp4) are opened from; default: the '
  "manifest's folder.",
)
_TAXONOMY = flags.DEFINE_string(
  'taxonomy',
  None,
  'JSON {"nouns": {class: [synonyms]}, "verbs": {…}}: tags the captions without noun/verb tags '
  'and is copied to OUTPUT_DIR/taxonomy.json.',
)
_EGOCLIP_CHUNK_SECONDS = flags.DEFINE_float(
  'egoclip_chunk_seconds',
  manifest.EGOCLIP_CHUNK_SECONDS,
  'EgoClip manifests: one record per chunk of this many seconds of a video.',
)
flags.mark_flags_as_required(['manifest', 'output_dir', 'num_shards'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    options = decode.Options(
      fps=_FPS.value,
      short_side=_SHORT_SIDE.value,
      sample_rate=_SAMPLE_RATE.value,
      jpeg_quality=_JPEG_QUALITY.value,
      max_duration=_MAX_DURATION.value,
    )
  except ValueError as e:
    raise app.UsageError(f'--{e}') from e
  chunk = _EGOCLIP_CHUNK_SECONDS.value
  if not chunk > 0:
    raise app.UsageError(f'--egoclip_chunk_seconds must be > 0, got {chunk}')
  if _MEDIA_ROOT.value and not os.path.isdir(_MEDIA_ROOT.value):
    raise cli.UserError(f'--media_root={_MEDIA_ROOT.value} is not a folder')
  # Read before anything is written: a malformed taxonomy is refused with one line.
  tags = taxonomy.read_taxonomy(_TAXONOMY.value) if _TAXONOMY.value else None
  summary = ingest.convert(
    _MANIFEST.value,
    _OUTPUT_DIR.value,
    _NUM_SHARDS.value,
    options,
    workers=_WORKERS.value,
    media_root=_MEDIA_ROOT.value,
    taxonomy=tags,
    egoclip_chunk_seconds=chunk,
  )
  repeats = f', {summary["duplicates"]} of them repeated rows' if summary['duplicates'] else ''
  print(
    f'rows {summary["rows"]}, written {summary["written"]}, skipped {summary["skipped"]} '
    f'(listed in {summary["report"]}{repeats})\n'
    f'duration {summary["duration_s"] / 3600:.2f} h ({summary["duration_s"]:.1f} s): '
    f'{summary["with_video"]} with video, {summary["with_audio"]} with audio, '
    f'{summary["with_captions"]} with captions ({summary["with_tags"]} with noun/verb tags), '
    f'{summary["frames"]} frames\n'
    f'shards {summary["shards"]}: {summary["shards_converted"]} converted now, '
    f'{summary["shards_reused"]} finished earlier; {summary["seconds"]:.1f} s'
  )
  if summary['taxonomy']:
    found = summary['taxonomy']
    print(
      f'taxonomy: {found["nouns"]} noun and {found["verbs"]} verb classes, copied to '
      f'{found["path"]} (set config data.num_nouns / data.num_verbs to them)'
    )


if __name__ == '__main__':
  cli.run(main)
