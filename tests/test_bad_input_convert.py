"""The media → shard converter and the data tools on bad input and bad luck (issue 15).

Empty, repeated and non-UTF-8 manifests; shards of an old format; a full disk (which must not mark a
good file as one that kills the converter); kill -9 of the converter (its workers must go too); a
demo output folder that holds a user's files; output folders that cannot be written.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import errno
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import demo, demo_media, ingest, ingest_shard, schema, validate
from data_pipelines.manifest import read_manifest
from tests.test_ingest import OPTIONS, RED, _write_jsonl, _write_video
from vatt_jax import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARD = 'shard-00000-of-00001'


@pytest.fixture(scope='module')
def media(tmp_path_factory):
  root = tmp_path_factory.mktemp('media')
  for name in ('a.mp4', 'b.mp4'):
    _write_video(root / name, 1, 10, 16, 16, [RED])
  return root


def _convert(manifest, output_dir, num_shards=1):
  return ingest.convert(
    str(manifest), str(output_dir), num_shards, OPTIONS, workers=1, progress=False
  )


def _one_line(main, monkeypatch, capsys) -> str:
  """What the command line prints when `main` fails: the one 'error: …' line (checked)."""
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  with pytest.raises(SystemExit) as exit_info:
    cli.guard(main)(['prog'])
  err = capsys.readouterr().err
  assert exit_info.value.code == cli.EXIT_ERROR
  assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
  return err.strip()


# ---- manifests ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
  'name, text', [('m.jsonl', ''), ('m.jsonl', '\n  \n'), ('m.csv', 'media,label\n'), ('m.csv', '')]
)
def test_empty_manifest_is_refused_before_anything_is_written(
  tmp_path, name, text, monkeypatch, capsys
):
  (tmp_path / name).write_text(text)
  out = tmp_path / 'out'
  line = _one_line(lambda argv: _convert(tmp_path / name, out), monkeypatch, capsys)
  assert line == f'error: {tmp_path / name} lists no media (no data rows): nothing to convert'
  assert not out.exists()


def test_manifest_without_a_usable_row_is_refused(tmp_path):
  manifest = tmp_path / 'm.jsonl'
  manifest.write_text('not json\n{"path": "a.mp4"}\n')
  with pytest.raises(
    cli.UserError, match=r'no row of .*m.jsonl can be converted \(2 rows\): .*line 1'
  ):
    _convert(manifest, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def test_repeated_media_rows_warn_and_only_the_first_is_converted(media, tmp_path, caplog):
  rows = [
    {'media': 'a.mp4', 'label': 1},
    {'media': 'b.mp4'},
    {'media': 'a.mp4', 'label': 2},  # line 3: repeats line 1
    {'media': 'a.mp4', 'start': 0.0, 'end': 0.5},  # a window of it: another record
    {'media': 'a.mp4'},  # line 5: repeats line 1
  ]
  manifest = _write_jsonl(media / 'repeats.jsonl', rows)
  with caplog.at_level('WARNING'):
    summary = _convert(manifest, tmp_path, num_shards=2)
  assert (summary['written'], summary['skipped'], summary['duplicates']) == (3, 2, 2)
  warning = ' '.join(r.getMessage() for r in caplog.records if r.levelname == 'WARNING')
  assert 'a.mp4 (lines 1, 3, 5)' in warning and '2 repeats are skipped' in warning
  report = [json.loads(line) for line in (tmp_path / 'report.jsonl').read_text().splitlines()]
  assert [(e['line'], e['media']) for e in report] == [(3, 'a.mp4'), (5, 'a.mp4')]
  assert 'repeats line 1' in report[0]['error']


@pytest.mark.parametrize(
  'name, data, line, bad',
  [
    ('m.jsonl', b'{"media": "a.mp4"}\n{"media": "caf\xe9.mp4"}\n', 2, b'\xe9'),
    # A byte-order mark counts in the offset; a caption in Latin-1 on line 3.
    (
      'm.jsonl',
      b'\xef\xbb\xbf{"media": "a.mp4"}\n\n'
      b'{"media": "b.mp4", "captions": [{"start": 0, "end": 1, "text": "\xe0 la"}]}\n',
      3,
      b'\xe0',
    ),
    ('m.csv', b'media,label\na.mp4,1\nna\xefve.mp4,2\n', 3, b'\xef'),
  ],
)
def test_non_utf8_manifest_names_file_and_line(
  tmp_path, name, data, line, bad, monkeypatch, capsys
):
  (tmp_path / name).write_bytes(data)
  offset = data.index(bad)  # in bytes, a byte-order mark included
  out = tmp_path / 'out'
  error = _one_line(lambda argv: _convert(tmp_path / name, out), monkeypatch, capsys)
  assert error.startswith(f'error: {tmp_path / name} line {line} (byte {offset}): not UTF-8 text')
  assert error.endswith('save the file as UTF-8')
  assert not out.exists()


def test_utf8_manifest_with_byte_order_mark_and_crlf(tmp_path):
  (tmp_path / 'm.jsonl').write_bytes(
    b'\xef\xbb\xbf{"media": "\xc3\xa9.mp4"}\r\n\r\n{"media": "b.mp4"}\r\n'
  )
  rows = read_manifest(str(tmp_path / 'm.jsonl'))
  assert [(r.media, r.line, r.error) for r in rows] == [('é.mp4', 1, None), ('b.mp4', 3, None)]


# ---- old shards ---------------------------------------------------------------------------------
def _version_1_record(media_id: str, samples: int) -> bytes:
  """A record as the first format wrote it: no schema/version, the waveform as a float list."""
  record = schema.Record(media_id, 0.5, waveform=np.zeros(samples, np.float32), sample_rate=8000)
  example = tf.train.SequenceExample.FromString(schema.encode(record))
  del example.context.feature[schema.VERSION]
  if samples:
    step = example.feature_lists.feature_list[schema.WAVEFORM].feature[0]
    step.Clear()
    step.float_list.value.extend([0.0] * samples)
  return example.SerializeToString()


def test_validator_says_which_format_version_old_shards_hold(tmp_path):
  with tf.io.TFRecordWriter(str(tmp_path / 'old-0.tfrecord')) as writer:
    writer.write(_version_1_record('with_audio', 100))  # does not parse as version 2
    writer.write(_version_1_record('silent', 0))  # parses, version read as 1
  with tf.io.TFRecordWriter(str(tmp_path / 'new-0.tfrecord')) as writer:
    writer.write(schema.encode(schema.Record('new', 0.5)))
    writer.write(b'not a record at all')
  stats = validate.inspect_shards(str(tmp_path))
  assert stats['old_format_shards'] == [{'shard': 'old-0.tfrecord', 'version': 1, 'records': 2}]
  old = [b for b in stats['bad_record_list'] if b['shard'] == 'old-0.tfrecord']
  assert [b['media_id'] for b in old] == ['with_audio', 'silent']
  for b in old:
    assert b['error'].startswith('record format version 1, this code reads 2: convert the media')
  assert (stats['good_records'], stats['bad_records']) == (1, 3)
  assert validate.problems(stats) == [
    f'{tmp_path}: 1 of 2 shards (old-0.tfrecord) hold records of format version 1, this code '
    'reads 2: convert the media again with scripts/prepare_data.py'
  ]
  assert schema.record_version(b'not a record at all') is None
  assert schema.record_version(schema.encode(schema.Record('x', 1.0))) == (2, 'x')


# ---- a full disk --------------------------------------------------------------------------------
class _FullDisk:
  """`open` for ingest in which writing to files whose name ends with `suffix` fails like a full
  disk does: OSError ENOSPC without a file name, at the write."""

  def __init__(self, suffix: str):
    self.suffix = suffix

  def __call__(self, path, mode='r', *args, **kwargs):
    f = builtins.open(path, mode, *args, **kwargs)
    if 'w' in mode and str(path).endswith(self.suffix):
      f.close()

      class Full(io.StringIO):
        def write(self, text):
          raise OSError(errno.ENOSPC, 'No space left on device')

      return Full()
    return f


class _FullWriter:
  """tf.io.TFRecordWriter on a full disk: TensorFlow's error on the first write."""

  def __init__(self, path):
    self.path = path

  def write(self, data):
    raise tf.errors.ResourceExhaustedError(None, None, f'{self.path}; No space left on device')

  def close(self):
    pass


@pytest.mark.parametrize(
  'where, path',
  [
    ('record', f'{SHARD}.tfrecord.tmp'),  # TensorFlow's writer
    ('marker', f'{SHARD}.tfrecord.current.json'),  # the marker of the row being decoded
    ('done', f'{SHARD}.done.json'),  # the counts, after every row
  ],
)
def test_full_disk_is_one_line_and_does_not_mark_the_file(
  media, tmp_path, where, path, monkeypatch, capsys
):
  manifest = _write_jsonl(media / 'full.jsonl', [{'media': 'a.mp4'}, {'media': 'b.mp4'}])
  out = tmp_path / 'out'
  for _ in range(3):  # the reported failure: the third run skipped a good file as a killer
    with monkeypatch.context() as m:
      if where == 'record':
        m.setattr(tf.io, 'TFRecordWriter', _FullWriter)
      else:
        m.setattr(ingest_shard, 'open', _FullDisk(path + '.tmp'), raising=False)
      line = _one_line(lambda argv: _convert(manifest, out), monkeypatch, capsys)
    assert line == (
      f'error: no space left on the device: {out / path} (0 of 1 shards are finished and kept; '
      'fix that and rerun with the same arguments to convert the rest)'
    )
    # Nothing left that a rerun could take for a worker death, nor a partial shard taking space.
    assert sorted(p.name for p in out.iterdir()) == ['report.jsonl']
  summary = _convert(manifest, out)  # space freed
  assert (summary['written'], summary['skipped']) == (2, 0)
  assert (out / 'report.jsonl').read_text() == ''


def test_a_dead_workers_marker_counts_only_once_the_converter_confirmed_it(media, tmp_path):
  manifest = _write_jsonl(media / 'deaths.jsonl', [{'media': 'a.mp4'}, {'media': 'b.mp4'}])
  marker = tmp_path / f'{SHARD}.tfrecord.current.json'

  def run(left: dict) -> dict:
    for p in tmp_path.iterdir():
      p.unlink()
    marker.write_text(json.dumps(left))
    return _convert(manifest, tmp_path)

  # A worker killed with the converter (kill -9 of the run): not the file's fault.
  assert run({'row': 1, 'worker_deaths': 1, 'in_pool': True})['skipped'] == 0
  # A worker that died while the converter lived, confirmed by it: its second death.
  assert run({'row': 1, 'worker_deaths': 1, 'in_pool': True, 'confirmed': True})['skipped'] == 1
  assert 'died 2 times' in (tmp_path / 'report.jsonl').read_text()
  # _confirm_death marks a marker so, and returns the row it names.
  marker.write_text(json.dumps({'row': 1, 'worker_deaths': 0, 'in_pool': True}))
  assert ingest_shard.confirm_death(str(tmp_path), 0, 1) == 1
  assert json.loads(marker.read_text())['confirmed'] is True
  assert ingest_shard.confirm_death(str(tmp_path / 'nowhere'), 0, 1) is None


def test_failed_shards_end_in_one_line():
  full = OSError(errno.ENOSPC, 'No space left on device', '/out/shard-00001-of-00004.tfrecord.tmp')
  broken = concurrent.futures.process.BrokenProcessPool('a process terminated abruptly')
  error = ingest._failure({1: 'x', 2: 'y', 3: 'not started'}, {1: full, 2: broken}, 4)
  assert isinstance(error, cli.UserError) and str(error) == (
    'no space left on the device: /out/shard-00001-of-00004.tfrecord.tmp (1 of 4 shards are '
    'finished and kept; fix that and rerun with the same arguments to convert the rest)'
  )
  error = ingest._failure({2: 'worker died; it was converting row 6 (x.mp4)'}, {2: broken}, 4)
  assert str(error) == (
    '1 shard(s) failed (shard-00002-of-00004.tfrecord: worker died; it was converting row 6 '
    '(x.mp4)); 3 of 4 shards are finished and kept: rerun with the same arguments to convert the rest'
  )


# ---- output folders -----------------------------------------------------------------------------
def _unwritable_cases(tmp_path, monkeypatch):
  (tmp_path / 'file').write_text('a file')
  yield tmp_path / 'file', f'--output_dir={tmp_path / "file"} is not a folder'
  yield tmp_path / 'file' / 'out', f'cannot be created: {tmp_path / "file"} is a file'
  readonly = tmp_path / 'readonly'
  readonly.mkdir()
  real_access = os.access
  monkeypatch.setattr(
    os, 'access', lambda p, mode: False if str(p) == str(readonly) else real_access(p, mode)
  )
  yield readonly / 'out', f'--output_dir={readonly / "out"} (in {readonly}): cannot write there'
  yield readonly, f'--output_dir={readonly}: cannot write there, the folder is not writable'


def test_unwritable_output_dirs_are_refused_first(media, tmp_path, monkeypatch):
  manifest = _write_jsonl(media / 'one.jsonl', [{'media': 'a.mp4'}])
  for out, message in _unwritable_cases(tmp_path, monkeypatch):
    with pytest.raises(cli.UserError) as converter:
      _convert(manifest, out)
    with pytest.raises(cli.UserError) as generator:
      demo.generate(out, num_videos={'train': 1}, size=32, workers=1)
    for error in (converter, generator):
      assert message in str(error.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['file', 'readonly']
  assert list((tmp_path / 'readonly').iterdir()) == []


# ---- the demo generator never overwrites ---------------------------------------------------------
TINY = dict(num_videos={'train': 2}, size=32, workers=1)


def _files(root: pathlib.Path) -> dict[str, int]:
  return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()}


def test_demo_refuses_a_folder_holding_files_it_would_write(tmp_path):
  (tmp_path / 'train.jsonl').write_text('my own manifest\n')
  (tmp_path / 'README.txt').write_text('my notes\n')
  (tmp_path / 'other.txt').write_text('unrelated\n')
  with pytest.raises(cli.UserError) as error:
    demo.generate(tmp_path, **TINY)
  assert str(error.value) == (
    f'--output_dir={tmp_path} already holds train.jsonl, README.txt: make_demo_data never '
    'overwrites files; use a new or empty --output_dir'
  )
  assert (tmp_path / 'train.jsonl').read_text() == 'my own manifest\n'
  assert (tmp_path / 'README.txt').read_text() == 'my notes\n'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['README.txt', 'other.txt', 'train.jsonl']


def test_demo_rerun_leaves_a_finished_dataset_and_finishes_an_interrupted_one(
  tmp_path, monkeypatch
):
  # Interrupted after the first video (Ctrl-C): the marker tells the rerun the files are its own.
  make_video = demo_media.make_video
  made = []

  def interrupted(job):
    if made:
      raise KeyboardInterrupt
    made.append(job[0])
    make_video(job)

  monkeypatch.setattr(demo, 'make_video', interrupted)
  with pytest.raises(KeyboardInterrupt):
    demo.generate(tmp_path, **TINY)
  monkeypatch.setattr(demo, 'make_video', make_video)
  assert sorted(_files(tmp_path)) == [demo.MARKER_NAME, 'media/train/train_00000.mp4']
  first = _files(tmp_path)['media/train/train_00000.mp4']
  summary = demo.generate(tmp_path, **TINY)  # the rerun writes only what is missing
  assert not summary.get('unchanged')
  files = _files(tmp_path)
  assert files['media/train/train_00000.mp4'] == first
  assert demo.MARKER_NAME not in files and 'dataset_info.json' in files
  assert 'media/train/train_00001.mp4' in files and 'retrieval_test.jsonl' in files
  # Finished: a rerun with the same arguments leaves it as it is.
  assert demo.generate(tmp_path, **TINY)['unchanged'] is True
  assert _files(tmp_path) == files
  # Other arguments: refused, nothing touched.
  with pytest.raises(cli.UserError, match='holds a demo dataset made with other arguments'):
    demo.generate(tmp_path, **dict(TINY, num_videos={'train': 3}))
  assert _files(tmp_path) == files


# ---- workers end with the converter --------------------------------------------------------------
def test_watchdog_ends_a_worker_whose_parent_is_gone(monkeypatch):
  monkeypatch.setattr(ingest_shard.os, 'getppid', lambda: 1)

  def exit_(code):
    raise SystemExit(code)

  monkeypatch.setattr(ingest_shard.os, '_exit', exit_)
  with pytest.raises(SystemExit):
    ingest_shard._watch_parent(parent_pid=12345)


def _stat(pid: int) -> list[str] | None:
  """/proc/PID/stat's fields after the command name (state first, then the parent's pid)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()
  except OSError:
    return None


def _gone(pid: int) -> bool:
  fields = _stat(pid)
  return fields is None or fields[0] in ('Z', 'X')


def _children(pid: int) -> set[int]:
  """Every live descendant of `pid` (from /proc: Linux, like the converter's parent-death signal)."""
  parents = {}
  for entry in os.listdir('/proc'):
    fields = _stat(int(entry)) if entry.isdigit() else None
    if fields is not None:
      parents[int(entry)] = int(fields[1])
  found, frontier = set(), {pid}
  while frontier:
    frontier = {child for child, parent in parents.items() if parent in frontier} - found
    found |= frontier
  return found


@pytest.mark.slow  # starts the converter and its workers (each imports TensorFlow): ~20 s
def test_kill_9_of_the_converter_ends_its_workers(media, tmp_path):
  for i in range(8):
    os.link(media / 'a.mp4', tmp_path / f'v{i}.mp4')
  # Enough rows that the workers are busy converting when the converter is killed.
  rows = [{'media': f'v{i % 8}.mp4', 'start': 0.0, 'end': 0.5 + i / 1000} for i in range(4000)]
  manifest = _write_jsonl(tmp_path / 'many.jsonl', rows)
  out = tmp_path / 'out'
  args = [
    sys.executable, str(ROOT / 'scripts' / 'prepare_data.py'), f'--manifest={manifest}',
    f'--output_dir={out}', '--num_shards=2', '--short_side=16', '--workers=2',
  ]  # fmt: skip
  log = open(tmp_path / 'stderr.txt', 'wb')  # (a pipe nobody reads could fill and stall it)
  converter = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
  children: set[int] = set()
  try:
    deadline = time.monotonic() + 1800  # no tighter than CI's own limit
    while len(list(out.glob('*.current.json'))) < 2:  # both workers are decoding
      assert converter.poll() is None, (tmp_path / 'stderr.txt').read_text()[-2000:]
      assert time.monotonic() < deadline, 'the workers did not start converting'
      time.sleep(0.2)
    children = _children(converter.pid)
    assert len(children) >= 2
    os.kill(converter.pid, signal.SIGKILL)
    converter.wait()
    deadline = time.monotonic() + 600  # generous: the kernel kills them at once
    while not all(_gone(pid) for pid in children) and time.monotonic() < deadline:
      time.sleep(0.2)
    assert [pid for pid in children if not _gone(pid)] == []
  finally:
    for pid in [converter.pid, *children]:
      try:
        os.kill(pid, signal.SIGKILL)
      except OSError:
        pass
    log.close()


@pytest.mark.slow  # two runs of the converter with a worker pool (each process imports TensorFlow)
def test_full_disk_in_a_worker_is_one_line_and_the_rerun_converts_everything(media, tmp_path):
  if not os.path.exists('/dev/full'):
    pytest.skip('needs /dev/full (Linux)')
  rows = [{'media': 'a.mp4'}, {'media': 'b.mp4'}, {'media': 'a.mp4', 'start': 0.0, 'end': 0.5}]
  manifest = _write_jsonl(media / 'pool_full.jsonl', rows)
  out = tmp_path / 'out'
  out.mkdir()
  # Shard 1's file on a "full disk": every write to /dev/full fails with ENOSPC.
  full = out / 'shard-00001-of-00002.tfrecord.tmp'
  full.symlink_to('/dev/full')
  args = [
    sys.executable, str(ROOT / 'scripts' / 'prepare_data.py'), f'--manifest={manifest}',
    f'--output_dir={out}', '--num_shards=2', '--short_side=16', '--workers=2',
  ]  # fmt: skip
  env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
  failed = subprocess.run(args, capture_output=True, text=True, env=env)
  assert failed.returncode == 1, failed.stderr
  assert 'Traceback' not in failed.stderr, failed.stderr
  assert failed.stderr.strip().splitlines()[-1] == (
    f'error: no space left on the device: {full} (1 of 2 shards are finished and kept; fix that '
    'and rerun with the same arguments to convert the rest)'
  )
  assert not list(out.glob('*.current.json')) and not os.path.lexists(full)
  # In this process (no worker pool to start): space freed, the rerun converts the missing shard.
  rerun = subprocess.run([*args, '--workers=1'], capture_output=True, text=True, env=env)
  assert rerun.returncode == 0, rerun.stderr
  assert 'rows 3, written 3, skipped 0' in rerun.stdout
  assert '1 converted now, 1 finished earlier' in rerun.stdout
