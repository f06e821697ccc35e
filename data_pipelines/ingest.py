"""Manifest → TFRecord shards of `schema` records: sharded, parallel and resumable.

`convert` reads a manifest (JSONL or CSV, see docs/DATA.md; parsed by `manifest`), decodes every
media file with `decode` and writes `output_dir/shard-SSSSS-of-NNNNN.tfrecord`; row i goes to shard
i % N.

Bad input never stops the run: a row that cannot be converted is skipped, counted and listed in
`output_dir/report.jsonl`. Each shard is written under a temporary name and renamed when complete,
next to a `.done.json` with its counts, so a rerun with the same arguments converts only the shards
that are missing.
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
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf
from tqdm import tqdm

from data_pipelines import schema
from data_pipelines.decode import MediaError, Options, _hide_gpus_from_tensorflow, convert_row
from data_pipelines.manifest import ManifestRow, read_manifest

_hide_gpus_from_tensorflow()

REPORT_NAME = 'report.jsonl'
_SHARD_RE = re.compile(r'^shard-(\d{5})-of-(\d{5})\.tfrecord$')
# A file whose decoding killed the worker process (decoder crash, out of memory) this many times,
# in consecutive runs, is skipped and reported instead of killing every rerun.
_WORKER_DEATHS_TO_SKIP = 2


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
    schema_version=schema.SCHEMA_VERSION,
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
  if stats.get('schema_version', 1) != schema.SCHEMA_VERSION:
    raise ValueError(
      f'{final} holds records of format version {stats.get("schema_version", 1)}; this vatt-jax '
      f'writes and reads version {schema.SCHEMA_VERSION}: use a new --output_dir or delete the old '
      'shards'
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
