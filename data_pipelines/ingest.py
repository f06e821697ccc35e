"""Manifest → TFRecord shards of `schema` records: sharded, parallel and resumable.

`convert` reads a manifest (JSONL, CSV or EgoClip metadata, see docs/DATA.md; parsed by
`manifest`), decodes every media file with `decode` and writes
`output_dir/shard-SSSSS-of-NNNNN.tfrecord`; row i goes to shard i % N. With a taxonomy
(`data_pipelines.taxonomy`) the captions without noun / verb tags are tagged from their text, and
the taxonomy is copied to `output_dir/taxonomy.json` for the training pipeline's size check.

Bad input never stops the run: a row that cannot be converted is skipped, counted and listed in
`output_dir/report.jsonl`; so is a row that repeats an earlier row's media (and window), after a
warning. A manifest with no row to convert is refused before anything is written. Each shard is
written under a temporary name and renamed when complete, next to a `.done.json` with its counts,
so a rerun with the same arguments converts only the shards that are missing.

Failures that are not the input's (a full disk, a worker killed, the converter killed) never mark
a media file as bad: a write error removes the shard's partial files and ends the run with one line
naming the path; workers end with the converter, even on kill -9.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import queue
import re
import time

from absl import logging
from tqdm import tqdm

from data_pipelines import schema
from data_pipelines.decode import Options, _hide_gpus_from_tensorflow
from data_pipelines.ingest_shard import (
  confirm_death,
  convert_shard,
  convert_shard_in_worker,
  culprit,
  done_path,
  error_text,
  init_worker,
  remove,
  shard_name,
  write_json_atomic,
  writing,
)
from data_pipelines.manifest import (
  EGOCLIP_CHUNK_SECONDS,
  ManifestRow,
  check_output_dir,
  duplicates,
  is_egoclip,
  read_manifest,
)
from data_pipelines.options import file_sha256
from data_pipelines.taxonomy import TAXONOMY_FILENAME, Taxonomy
from vatt_jax import cli

_hide_gpus_from_tensorflow()

REPORT_NAME = 'report.jsonl'
_SHARD_RE = re.compile(r'^shard-(\d{5})-of-(\d{5})\.tfrecord$')


def old_format(version: int) -> str:
  """What to say about records of another format version."""
  return (
    f'format version {version}, this code reads {schema.SCHEMA_VERSION}: convert the media again '
    'with scripts/prepare_data.py'
  )


def _finished_shard(
  output_dir: str,
  shard: int,
  num_shards: int,
  options: Options,
  manifest_sha256: str,
  manifest_options: dict | None = None,
) -> dict | None:
  """The stored counts of a finished shard, None if it must be (re)done; raises on a mismatch."""
  final = os.path.join(output_dir, shard_name(shard, num_shards))
  done = done_path(output_dir, shard, num_shards)
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
  if stats.get('schema_version', 1) != schema.SCHEMA_VERSION:
    raise ValueError(
      f'{final} holds records of format version {stats.get("schema_version", 1)}, this code '
      f'writes and reads {schema.SCHEMA_VERSION}: use a new --output_dir or delete the old shards'
    )
  # Shards from before manifest options existed were read the one way there was: {}.
  stored_manifest = stats.get('manifest_options') or {}
  for key in sorted(set(stored_manifest) | set(manifest_options or {})):
    then, now = stored_manifest.get(key), (manifest_options or {}).get(key)
    if then != now:
      raise ValueError(
        f'{final} was written with the manifest read with {key}={then!r}, this run asks for '
        f'{now!r}; use a new --output_dir or delete the old shards'
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
  *,
  media_root: str | None = None,
  taxonomy: Taxonomy | None = None,
  egoclip_chunk_seconds: float = EGOCLIP_CHUNK_SECONDS,
) -> dict:
  """Converts a manifest into `num_shards` shards in `output_dir`, resuming an earlier run.

  media_root: where relative media paths (EgoClip: `{video_uid}.mp4`) are opened; None: the
  manifest's folder. taxonomy: tags the captions that carry no tags, and is copied to
  `output_dir/taxonomy.json`. egoclip_chunk_seconds: the window length of an EgoClip manifest.

  workers <= 1 converts in this process; more start that many processes (spawn: TensorFlow does
  not survive fork), one shard per task. Returns the run's summary. Refused before anything is
  written (`cli.UserError`): a manifest with no row or no usable row, one that is not UTF-8, an
  output folder that cannot be written. A shard that fails for reasons other than its input (a full
  disk, a worker killed) stops the run once the running shards are done: `cli.UserError`, one line
  naming the path (write errors) or the shards and the row a dead worker was on; finished shards
  stay.
  """
  options = options or Options()
  if num_shards < 1:
    raise ValueError(f'num_shards must be >= 1, got {num_shards}')
  start = time.time()
  check_output_dir(output_dir)
  rows = read_manifest(manifest, media_root, egoclip_chunk_seconds)
  manifest_options = {}
  if is_egoclip(manifest):
    manifest_options['egoclip_chunk_seconds'] = float(egoclip_chunk_seconds)
  if taxonomy is not None:
    rows = [
      r if r.error else dataclasses.replace(r, captions=taxonomy.tag_captions(r.captions))
      for r in rows
    ]
    canonical = json.dumps(taxonomy.to_json(), ensure_ascii=False).encode()
    manifest_options['taxonomy_sha256'] = hashlib.sha256(canonical).hexdigest()
  if not rows:
    raise cli.UserError(f'{manifest} lists no media (no data rows): nothing to convert')
  if all(r.error for r in rows):
    raise cli.UserError(
      f'no row of {manifest} can be converted ({len(rows)} rows): {rows[0].error}'
    )
  repeated = duplicates(rows)
  if repeated:
    rows = [
      _as_duplicate(r, repeated[r.index], manifest) if r.index in repeated else r for r in rows
    ]
    _warn_duplicates(manifest, rows, repeated)
  manifest_sha256 = file_sha256(manifest)
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
    stats = _finished_shard(
      output_dir, shard, num_shards, options, manifest_sha256, manifest_options
    )
    if stats is not None:
      results[shard] = stats
  os.makedirs(output_dir, exist_ok=True)  # accepted: from here on things are written
  taxonomy_copy = os.path.join(output_dir, TAXONOMY_FILENAME)
  if taxonomy is not None:
    write_json_atomic(taxonomy_copy, taxonomy.to_json())
  else:  # one left by an earlier run would tell training of classes these shards do not have
    remove(taxonomy_copy)
  reused = sorted(results)
  todo = [s for s in range(num_shards) if s not in results]
  failures: dict[int, str] = {}
  raised: dict[int, BaseException] = {}

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

    more = {'manifest_options': manifest_options}

    if workers <= 1:
      for shard in todo:
        try:
          results[shard] = convert_shard(*args(shard), on_row=lambda: bar.update(1), **more)
        except OSError as e:  # a write error (the input's are reported, not raised)
          raised[shard] = e
          failures[shard] = error_text(e).rstrip('.')
          break
      for shard in todo:
        if shard not in results and shard not in failures:
          failures[shard] = 'not started after an earlier shard failed'
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
        initializer=init_worker,
        initargs=(progress_queue, os.getpid()),
      ) as pool:
        # At most one shard per worker is handed over at a time: the executor cannot take back work
        # it has queued, so after Ctrl-C it would otherwise go on converting queued shards.
        waiting, running = list(todo), {}
        try:
          while waiting or running:
            while waiting and len(running) < max_workers and not failures:
              shard = waiting.pop(0)
              running[pool.submit(convert_shard_in_worker, *args(shard), **more)] = shard
            finished, _ = concurrent.futures.wait(
              running, timeout=0.25, return_when=concurrent.futures.FIRST_COMPLETED
            )
            drain()
            for future in finished:
              shard = running.pop(future)
              try:
                results[shard] = future.result()
              except Exception as e:  # a worker died or the disk is full: not the input's fault
                raised[shard] = e
                failures[shard] = error_text(e).rstrip('.')
            if failures and not running:
              for shard in waiting:  # the pool is likely broken; a rerun picks these up
                failures[shard] = 'not started after an earlier shard failed'
              waiting = []
        except KeyboardInterrupt:
          pool.shutdown(wait=False, cancel_futures=True)
          raise
      drain()
      # Only now, with every worker gone: a worker stopped by the pool removes its marker on the way
      # out, and a write error removes it too, so what is left names the file a worker died on.
      for shard, e in raised.items():
        if isinstance(e, concurrent.futures.BrokenExecutor):
          failures[shard] += culprit(confirm_death(output_dir, shard, num_shards), by_shard[shard])

  report = os.path.join(output_dir, REPORT_NAME)
  errors = sorted((e for s in results.values() for e in s['errors']), key=lambda e: e['row'])
  try:
    with writing(report):
      tmp = report + '.tmp'
      with open(tmp, 'w', encoding='utf-8') as f:
        for error in errors:
          f.write(json.dumps(error, ensure_ascii=False) + '\n')
      os.replace(tmp, report)
  except OSError:
    remove(report + '.tmp')
    if not failures:
      raise  # else: the shard's error below tells the cause

  def total(key: str) -> float:
    return sum(s.get(key, 0) for s in results.values())  # with_tags: absent in older shards

  summary = {
    'rows': len(rows),
    'written': int(total('written')),
    'skipped': int(total('skipped')),
    'duplicates': len(repeated),
    'duration_s': round(total('duration_s'), 3),
    'frames': int(total('frames')),
    'with_video': int(total('with_video')),
    'with_audio': int(total('with_audio')),
    'with_captions': int(total('with_captions')),
    'with_tags': int(total('with_tags')),
    'taxonomy': (
      {'path': taxonomy_copy, 'nouns': taxonomy.num_nouns, 'verbs': taxonomy.num_verbs}
      if taxonomy is not None
      else None
    ),
    'shards': num_shards,
    'shards_converted': len(todo) - len(failures),
    'shards_reused': len(reused),
    'seconds': round(time.time() - start, 3),
    'report': report,
  }
  if failures:
    raise _failure(failures, raised, num_shards)
  return summary


def _failure(failures: dict[int, str], raised: dict[int, BaseException], num_shards: int):
  """The one-line error of a run whose shards failed for reasons other than their input."""
  rerun = 'rerun with the same arguments to convert the rest'
  kept = f'{num_shards - len(failures)} of {num_shards} shards are finished and kept'
  write_errors = [e for e in raised.values() if isinstance(e, OSError)]
  if write_errors:  # one cause for all (a full disk): say it once
    return cli.UserError(f'{cli.describe(write_errors[0])} ({kept}; fix that and {rerun})')
  details = '; '.join(f'{shard_name(s, num_shards)}: {e}' for s, e in sorted(failures.items()))
  return cli.UserError(f'{len(failures)} shard(s) failed ({details}); {kept}: {rerun}')


def _as_duplicate(row: ManifestRow, first: ManifestRow, manifest: str) -> ManifestRow:
  return dataclasses.replace(
    row,
    error=f'{manifest} line {row.line}: repeats line {first.line} (the same media '
    f'{first.media_id!r}); only the first is converted',
  )


def _warn_duplicates(manifest: str, rows: list[ManifestRow], repeated: dict) -> None:
  lines: dict[str, list[int]] = {}
  for index, first in repeated.items():
    lines.setdefault(first.media_id, [first.line]).append(rows[index].line)
  shown = [f'{media} (lines {", ".join(map(str, ls))})' for media, ls in list(lines.items())[:5]]
  more = f' and {len(lines) - 5} more' if len(lines) > 5 else ''
  logging.warning(
    '%s lists the same media more than once: %s%s; only the first row of each is converted, the '
    '%d repeats are skipped and listed in report.jsonl',
    manifest, '; '.join(shown), more, len(repeated),
  )  # fmt: skip
