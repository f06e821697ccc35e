"""Converting one shard of data_pipelines.ingest.convert: its rows decoded and written under a
temporary name, renamed when complete next to a `.done.json` of counts; a marker of the row being
decoded, so that a file whose decoding killed the process is skipped after _WORKER_DEATHS_TO_SKIP
deaths; pool workers that die with the converter; write errors as OSError naming the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import tensorflow as tf

from data_pipelines import schema
from data_pipelines.decode import MediaError, Options, _hide_gpus_from_tensorflow, convert_row
from data_pipelines.manifest import ManifestRow

_hide_gpus_from_tensorflow()

# A file whose decoding killed the worker process (decoder crash, out of memory) this many times,
# in consecutive runs, is skipped and reported instead of killing every rerun.
_WORKER_DEATHS_TO_SKIP = 2
# Words of TensorFlow's file-system errors → the errno they stand for (for the one-line message).
_TF_ERRNOS = (
  ('No space left', errno.ENOSPC),
  ('quota exceeded', errno.EDQUOT),
  ('Read-only file system', errno.EROFS),
  ('Permission denied', errno.EACCES),
)


def shard_name(shard: int, num_shards: int) -> str:
  return f'shard-{shard:05d}-of-{num_shards:05d}.tfrecord'


def done_path(output_dir: str, shard: int, num_shards: int) -> str:
  return os.path.join(output_dir, shard_name(shard, num_shards)[: -len('.tfrecord')] + '.done.json')


def marker_path(output_dir: str, shard: int, num_shards: int) -> str:
  return os.path.join(output_dir, shard_name(shard, num_shards) + '.current.json')


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
  """Write errors inside come out as OSError naming `path` (TensorFlow's and Python's alike)."""
  try:
    yield
  except tf.errors.OpError as e:
    message = e.message.strip()
    code = next((c for words, c in _TF_ERRNOS if words.lower() in message.lower()), errno.EIO)
    raise OSError(code, message, path) from e
  except OSError as e:
    if e.filename is None:
      raise OSError(e.errno, e.strerror or str(e), path) from e
    raise


def remove(path: str) -> None:
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)


def write_json_atomic(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  try:
    with writing(path):
      with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
  except BaseException:
    remove(tmp)
    raise


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def error_text(e: BaseException) -> str:
  text = (e.message if isinstance(e, tf.errors.OpError) else str(e)).strip() or repr(e)
  # TensorFlow wraps eager errors in graph plumbing ({{function_node …}} … [Op:IteratorGetNext]).
  text = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', text)
  text = re.sub(r'\s*\[Op:[^\]]*\].*$', '', text, flags=re.S)
  return f'{type(e).__name__}: {text}'


# The marker of the row being converted in this process, for the SIGTERM handler.
_active_marker: str | None = None


def _read_marker(marker: str) -> tuple[int | None, int]:
  """(row, worker deaths so far) from a marker left behind, (None, 0) without one.

  A marker is left only by a process that died while decoding that row. In a worker pool that may
  be the converter's own death (kill -9; the workers die with it), so a worker's marker counts as
  a death of the file only once the converter, still alive, confirmed it (`confirm_death`).
  """
  try:
    with open(marker, encoding='utf-8') as f:
      left = json.load(f)
    counted = not left.get('in_pool', False) or left.get('confirmed', False)
    return int(left['row']), int(left['worker_deaths']) + int(bool(counted))
  except FileNotFoundError:
    return None, 0
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None, 0  # unreadable: a death that cannot be pinned on a row


def convert_shard(
  shard: int,
  num_shards: int,
  rows: Sequence[ManifestRow],
  output_dir: str,
  options: Options,
  manifest_sha256: str,
  on_row: Callable[[], None] | None = None,
  in_pool: bool = False,
  manifest_options: dict | None = None,
) -> dict:
  """Converts `rows` into one shard file; returns (and stores as .done.json) its counts.

  manifest_options: how the manifest was read into rows beyond its bytes (EgoClip chunk length,
  the taxonomy's sha256), stored so that a resume cannot mix rows read another way.

  Bad rows are skipped and counted. A write error (full disk) raises OSError naming the path, after
  removing the partial shard; nothing of it marks a media file as bad.
  """
  final = os.path.join(output_dir, shard_name(shard, num_shards))
  tmp = final + '.tmp'
  marker = marker_path(output_dir, shard, num_shards)
  # The marker names the row being decoded, and exists only while it is: one left behind means the
  # process died decoding that row (exceptions remove it).
  poisoned_row, deaths = _read_marker(marker)
  start = time.time()
  stats = {
    'shard': shard, 'num_shards': num_shards, 'rows': len(rows), 'written': 0, 'skipped': 0,
    'duration_s': 0.0, 'frames': 0, 'with_video': 0, 'with_audio': 0, 'with_captions': 0,
    'with_tags': 0,
  }  # fmt: skip
  errors = []
  global _active_marker
  _active_marker = marker
  try:
    with writing(tmp):
      writer = tf.io.TFRecordWriter(tmp)
    try:
      for row in rows:
        died_here = deaths if row.index == poisoned_row else 0
        serialized, error = None, None
        if died_here >= _WORKER_DEATHS_TO_SKIP:
          error = MediaError(
            f'the converter process died {died_here} times decoding this file (decoder crash or '
            'out of memory; try --max_duration)'
          )
        else:
          # Not inside the handler below: a failed write is not the row's fault.
          write_json_atomic(
            marker, {'row': row.index, 'worker_deaths': died_here, 'in_pool': in_pool}
          )
          try:
            record = convert_row(row, options)
            serialized = schema.encode(record)
          except Exception as e:  # bad input of any kind: report, skip, carry on
            error = e
          finally:
            remove(marker)
        if serialized is None:
          stats['skipped'] += 1
          where = {'row': row.index, 'line': row.line, 'media': row.media, 'shard': shard}
          errors.append({**where, 'error': error_text(error)})
        else:
          with writing(tmp):
            writer.write(serialized)
          stats['written'] += 1
          stats['duration_s'] += record.duration
          stats['frames'] += len(record.frames)
          stats['with_video'] += int(len(record.frames) > 0)
          stats['with_audio'] += int(record.waveform is not None)
          stats['with_captions'] += int(len(record.captions) > 0)
          stats['with_tags'] += int(any(c.nouns or c.verbs for c in record.captions))
        if on_row is not None:
          on_row()
    except BaseException:
      with contextlib.suppress(Exception):  # the first error is the one to tell
        writer.close()
      raise
    with writing(tmp):
      writer.close()
      _fsync(tmp)
    remove(marker)  # one from an earlier run, when its row was skipped here
    stats.update(
      schema_version=schema.SCHEMA_VERSION,
      errors=errors,
      options=dataclasses.asdict(options),
      manifest_sha256=manifest_sha256,
      manifest_options=dict(manifest_options or {}),
      seconds=round(time.time() - start, 3),
    )
    # The .done.json goes first: a final .tfrecord therefore always has its counts next to it.
    write_json_atomic(done_path(output_dir, shard, num_shards), stats)
    with writing(final):
      os.replace(tmp, final)
  except BaseException:
    # Interrupted or failed for a reason other than a worker death: not the file's fault. The
    # partial shard goes too: a full disk wants its space back, and a rerun starts it afresh.
    remove(marker)
    remove(tmp)
    raise
  finally:
    _active_marker = None
  return stats


_progress_queue = None


def _on_sigterm(signum, frame) -> None:
  # Terminated from outside: the pool stopping the others after one worker died, or a shutdown.
  # Not this file's fault, so its marker must not count towards skipping it.
  if _active_marker:
    with contextlib.suppress(OSError):
      os.remove(_active_marker)
  os._exit(128 + signum)


def _watch_parent(parent_pid: int) -> None:
  while os.getppid() == parent_pid:
    time.sleep(1.0)
  os._exit(1)


def die_with_parent(parent_pid: int) -> None:
  """Makes this (worker) process end when process `parent_pid`, its parent, does, kill -9 included.

  Linux: the kernel sends SIGKILL (prctl PR_SET_PDEATHSIG); elsewhere a daemon thread polls the
  parent id. A worker left running would hold its memory (about 1 GB) until it finished its shard.
  """
  armed = False
  if sys.platform.startswith('linux'):
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      armed = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
      armed = False
  if os.getppid() != parent_pid:  # the parent died before the signal was armed
    os._exit(1)
  if not armed:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def init_worker(progress_queue, parent_pid: int) -> None:
  global _progress_queue
  die_with_parent(parent_pid)
  _progress_queue = progress_queue
  signal.signal(signal.SIGTERM, _on_sigterm)
  _hide_gpus_from_tensorflow()


def convert_shard_in_worker(*args, **kwargs) -> dict:
  return convert_shard(*args, on_row=lambda: _progress_queue.put(1), in_pool=True, **kwargs)


def confirm_death(output_dir: str, shard: int, num_shards: int) -> int | None:
  """Marks the marker a dead worker left as its own death (the converter lives: not a kill -9 of
  the whole run); returns the row it names, None without one."""
  marker = marker_path(output_dir, shard, num_shards)
  try:
    with open(marker, encoding='utf-8') as f:
      left = json.load(f)
    left['confirmed'] = True
    write_json_atomic(marker, left)
    return int(left['row'])
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None


def culprit(index: int | None, rows: list[ManifestRow]) -> str:
  """'; it was converting row R (MEDIA)' when a dead worker's marker names the file."""
  if index is None:
    return ''
  media = next((r.media for r in rows if r.index == index), '?')
  return f'; it was converting row {index} ({media})'
