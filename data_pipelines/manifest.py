"""Manifests: the JSONL / CSV files that list the media to convert (format in docs/DATA.md).

`read_manifest` turns each data row into a `ManifestRow`: the media path as written and where to
open it, its captions and labels. A malformed row is returned with `error` set, never raised, so the
converter can report it and carry on; a file that is not UTF-8 text is refused as a whole, naming
the line. `duplicates` finds rows that would make records with the same id. `check_output_dir`
vets the folder a data tool is about to write to, before it writes anything.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from typing import Any

from data_pipelines import schema
from vatt_jax import cli

JSONL_SUFFIXES = ('.jsonl', '.ndjson')
CSV_SUFFIXES = ('.csv',)
_BOM = b'\xef\xbb\xbf'  # the UTF-8 byte-order mark


@dataclasses.dataclass(frozen=True)
class ManifestRow:
  """One manifest row. `error` is set (and the rest may be empty) when the row itself is malformed.

  index: 0-based data row (blank JSONL lines and the CSV header do not count); decides the shard.
  line: 1-based line of the manifest file, for people looking for the row.
  media: the path as written; path: where to open it.
  start, end: a window of the media in seconds (a YouCook2 segment, a Kinetics clip): only it is
    converted, and time 0 of the record is `start`; None: the whole file.
  """

  index: int
  line: int
  media: str
  path: str
  captions: tuple[schema.Caption, ...] = ()
  labels: tuple[int, ...] = ()
  error: str | None = None
  start: float | None = None
  end: float | None = None

  @property
  def media_id(self) -> str:
    """The record's id: the media path as written, plus `#t=start,end` (a W3C media fragment)
    for a window, so the segments of one video have distinct ids."""
    if self.start is None:
      return self.media
    return f'{self.media}#t={self.start:g},{self.end:g}'


def _is_number(value: Any) -> bool:
  # bool is an int subclass; `"start": true` is a typo, not a timestamp.
  return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _parse_captions(value: Any) -> tuple[schema.Caption, ...]:
  if value is None:
    return ()
  if not isinstance(value, list):
    raise ValueError(
      f'captions: expected a list of {{start, end, text}}, got {type(value).__name__}'
    )
  captions = []
  for j, item in enumerate(value):
    where = f'captions[{j}]'
    if not isinstance(item, dict):
      raise ValueError(f'{where}: expected an object, got {type(item).__name__}')
    for key in ('start', 'end', 'text'):
      if key not in item:
        raise ValueError(f'{where}: missing field {key!r}')
    start, end, text = item['start'], item['end'], item['text']
    for key, number in (('start', start), ('end', end)):
      if not _is_number(number):
        raise ValueError(f'{where}.{key}: {number!r} is not a finite number')
    if start < 0:
      raise ValueError(f'{where}.start: {start} is negative')
    if end < start:
      raise ValueError(f'{where}: end {end} < start {start}')
    if not isinstance(text, str):
      raise ValueError(f'{where}.text: expected a string, got {type(text).__name__}')
    captions.append(schema.Caption(float(start), float(end), text))
  return tuple(captions)


def _parse_labels(value: Any) -> tuple[int, ...]:
  if value is None:
    return ()
  values = value if isinstance(value, list) else [value]
  for v in values:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ValueError(f'label: {v!r} is not a non-negative integer class index')
  return tuple(values)


def _parse_csv_labels(text: str) -> tuple[int, ...]:
  # Several labels in one cell are ';'-separated (a comma would split the CSV cell).
  labels = []
  for part in (p.strip() for p in text.split(';')):
    if not part:
      continue
    if not part.isdigit():
      raise ValueError(f'label: {part!r} is not a non-negative integer class index')
    labels.append(int(part))
  return tuple(labels)


def _parse_window(start: Any, end: Any) -> tuple[float | None, float | None]:
  if start is None and end is None:
    return None, None
  if start is None or end is None:
    raise ValueError(f'start and end: give both or neither (got start={start!r}, end={end!r})')
  for key, value in (('start', start), ('end', end)):
    if isinstance(value, str):  # CSV cells
      try:
        value = float(value)
      except ValueError:
        raise ValueError(f'{key}: {value!r} is not a number') from None
    if not _is_number(value):
      raise ValueError(f'{key}: {value!r} is not a finite number')
    if key == 'start':
      start = float(value)
    else:
      end = float(value)
  if start < 0:
    raise ValueError(f'start: {start} is negative')
  if not end > start:
    raise ValueError(f'end {end} is not after start {start}')
  return start, end


def _resolve(media: str, base_dir: str) -> str:
  if '://' in media:  # a URL: FFmpeg opens it as it is
    return media
  return os.path.normpath(os.path.join(base_dir, os.path.expanduser(media)))


def _row_from_fields(
  index: int, line: int, fields: dict, base_dir: str, csv_row: bool
) -> ManifestRow:
  media = fields.get('media')
  if not isinstance(media, str) or not media.strip():
    raise ValueError(f'media: missing or empty (got {media!r})')
  media = media.strip()
  if csv_row:
    labels = _parse_csv_labels(fields.get('label') or '')
    captions: tuple[schema.Caption, ...] = ()
    window = _parse_window(fields.get('start') or None, fields.get('end') or None)
  else:
    labels = _parse_labels(fields.get('label'))
    captions = _parse_captions(fields.get('captions'))
    window = _parse_window(fields.get('start'), fields.get('end'))
  return ManifestRow(index, line, media, _resolve(media, base_dir), captions, labels, None, *window)


def read_utf8(path: str) -> str:
  """The text of a UTF-8 file (a leading byte-order mark dropped).

  Raises `cli.UserError` naming the line and byte offset of the first bytes that are not UTF-8
  (a file saved as Latin-1 or Windows-1252), OSError when the file cannot be read.
  """
  with open(path, 'rb') as f:
    data = f.read()
  # Editors on Windows (and Excel, for CSV) start the file with a byte-order mark.
  skip = len(_BOM) if data.startswith(_BOM) else 0
  try:
    return data[skip:].decode('utf-8')
  except UnicodeDecodeError as e:
    offset = skip + e.start
    line = data.count(b'\n', 0, offset) + 1
    raise cli.UserError(
      f'{path} line {line} (byte {offset}): not UTF-8 text ({e.reason}: '
      f'{data[offset : offset + 4]!r}); save the file as UTF-8'
    ) from None


def read_manifest(path: str) -> list[ManifestRow]:
  """Reads a JSONL or CSV manifest; malformed rows come back with `error` set (never raised).

  Raises ValueError only when the manifest as a whole is unusable (unknown suffix, no `media`
  column, not UTF-8: `cli.UserError` naming the line) and OSError when it cannot be read. An empty
  manifest gives no rows.
  """
  base_dir = os.path.dirname(os.path.abspath(path))
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in JSONL_SUFFIXES + CSV_SUFFIXES:
    raise ValueError(
      f'{path}: unknown manifest type {suffix!r}; use {JSONL_SUFFIXES + CSV_SUFFIXES} files'
    )
  text = read_utf8(path)
  rows: list[ManifestRow] = []

  def bad(index: int, line: int, media: Any, error: str) -> ManifestRow:
    media = media if isinstance(media, str) else ''
    return ManifestRow(index, line, media, '', error=f'{path} line {line}: {error}')

  if suffix in JSONL_SUFFIXES:
    # newline=None: '\r\n' and '\r' end lines too, as they did when the file was opened as text.
    for line_no, line in enumerate(io.StringIO(text, newline=None), start=1):
      if not line.strip():
        continue
      index = len(rows)
      try:
        fields = json.loads(line)
      except json.JSONDecodeError as e:
        rows.append(bad(index, line_no, None, f'not valid JSON ({e})'))
        continue
      if not isinstance(fields, dict):
        rows.append(
          bad(index, line_no, None, f'expected a JSON object, got {type(fields).__name__}')
        )
        continue
      try:
        rows.append(_row_from_fields(index, line_no, fields, base_dir, csv_row=False))
      except ValueError as e:
        rows.append(bad(index, line_no, fields.get('media'), str(e)))
  else:
    if not text.strip():
      return rows  # not even a header
    reader = csv.DictReader(io.StringIO(text, newline=''))
    columns = [c.strip() for c in reader.fieldnames or []]
    if 'media' not in columns:
      raise ValueError(f'{path}: the CSV header needs a "media" column, found {columns}')
    reader.fieldnames = columns
    for index, fields in enumerate(reader):
      try:
        rows.append(_row_from_fields(index, reader.line_num, fields, base_dir, csv_row=True))
      except ValueError as e:
        rows.append(bad(index, reader.line_num, fields.get('media'), str(e)))
  return rows


def duplicates(rows: list[ManifestRow]) -> dict[int, ManifestRow]:
  """{index of a later row: the first row} for well-formed rows with the same record id (media as
  written, and window): converting both would put two records with one id into the shards."""
  first: dict[str, ManifestRow] = {}
  later = {}
  for row in rows:
    if row.error is None:
      seen = first.setdefault(row.media_id, row)
      if seen is not row:
        later[row.index] = seen
  return later


def check_output_dir(path: str, flag: str = '--output_dir') -> None:
  """Raises `cli.UserError` (one line naming the folder) unless `path` is a folder this process can
  write into, or one it can create. Creates nothing."""
  absolute = os.path.abspath(path)
  existing = absolute
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    if existing == absolute:
      raise cli.UserError(f'{flag}={path} is not a folder (it is a file): give a folder')
    raise cli.UserError(f'{flag}={path} cannot be created: {existing} is a file, not a folder')
  if not os.access(existing, os.W_OK | os.X_OK):
    try:
      read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
      read_only = False
    why = 'on a read-only file system' if read_only else 'not writable by this user'
    where = path if existing == absolute else f'{path} (in {existing})'
    raise cli.UserError(f'{flag}={where}: cannot write there, the folder is {why}')
