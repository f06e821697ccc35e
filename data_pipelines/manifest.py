"""Manifests: the JSONL / CSV files that list the media to convert (format in docs/DATA.md).

`read_manifest` turns each data row into a `ManifestRow`: the media path as written and where to
open it, its captions and labels. A malformed row is returned with `error` set, never raised, so the
converter can report it and carry on.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Any

from data_pipelines import schema

JSONL_SUFFIXES = ('.jsonl', '.ndjson')
CSV_SUFFIXES = ('.csv',)


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


def read_manifest(path: str) -> list[ManifestRow]:
  """Reads a JSONL or CSV manifest; malformed rows come back with `error` set (never raised).

  Raises ValueError only when the manifest as a whole is unusable (unknown suffix, no `media`
  column) and OSError when it cannot be read.
  """
  base_dir = os.path.dirname(os.path.abspath(path))
  suffix = os.path.splitext(path)[1].lower()
  rows: list[ManifestRow] = []

  def bad(index: int, line: int, media: Any, error: str) -> ManifestRow:
    media = media if isinstance(media, str) else ''
    return ManifestRow(index, line, media, '', error=f'{path} line {line}: {error}')

  if suffix in JSONL_SUFFIXES:
    # utf-8-sig: editors on Windows (and Excel, for CSV) start the file with a byte-order mark.
    with open(path, encoding='utf-8-sig') as f:
      for line_no, text in enumerate(f, start=1):
        if not text.strip():
          continue
        index = len(rows)
        try:
          fields = json.loads(text)
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
  elif suffix in CSV_SUFFIXES:
    with open(path, encoding='utf-8-sig', newline='') as f:
      reader = csv.DictReader(f)
      columns = [c.strip() for c in reader.fieldnames or []]
      if 'media' not in columns:
        raise ValueError(f'{path}: the CSV header needs a "media" column, found {columns}')
      reader.fieldnames = columns
      for index, fields in enumerate(reader):
        try:
          rows.append(_row_from_fields(index, reader.line_num, fields, base_dir, csv_row=True))
        except ValueError as e:
          rows.append(bad(index, reader.line_num, fields.get('media'), str(e)))
  else:
    raise ValueError(
      f'{path}: unknown manifest type {suffix!r}; use {JSONL_SUFFIXES + CSV_SUFFIXES} files'
    )
  return rows
