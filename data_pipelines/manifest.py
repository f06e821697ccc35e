"""Manifests: the JSONL / CSV files that list the media to convert (format in docs/DATA.md).

`read_manifest` turns each data row into a `ManifestRow`: the media path as written and where to
open it, its captions (with their noun / verb class tags) and labels. EgoClip's released metadata
(a TAB-separated `.csv` whose header names `video_uid` and `clip_text`) is read as a manifest too:
its narrations are grouped per video into chunks of `egoclip_chunk_seconds`, one window row each
(`read_egoclip`). A malformed row is returned with `error` set, never raised, so the
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
# EgoVLP cuts Ego4D's hours-long videos into 600 s chunks; one record per chunk here.
EGOCLIP_CHUNK_SECONDS = 600.0
EGOCLIP_COLUMNS = ('video_uid', 'clip_start', 'clip_end', 'clip_text')  # required; tags optional
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


def _parse_tags(value: Any, where: str) -> tuple[int, ...]:
  """A caption's "nouns" / "verbs": a list of non-negative integer class indices (None: none)."""
  if value is None:
    return ()
  if not isinstance(value, list):
    raise ValueError(f'{where}: expected a list of class indices, got {type(value).__name__}')
  for v in value:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ValueError(f'{where}: {v!r} is not a non-negative integer class index')
  return tuple(value)


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
    nouns = _parse_tags(item.get('nouns'), f'{where}.nouns')
    verbs = _parse_tags(item.get('verbs'), f'{where}.verbs')
    captions.append(schema.Caption(float(start), float(end), text, nouns, verbs))
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


def is_egoclip(path: str, text: str | None = None) -> bool:
  """Whether `path` is EgoClip metadata: a `.csv` whose first line, split at TABs, names the
  columns video_uid and clip_text (the other CSV format has media,label)."""
  if os.path.splitext(path)[1].lower() not in CSV_SUFFIXES:
    return False
  if text is None:
    text = read_utf8(path)
  header = text.split('\n', 1)[0].rstrip('\r')
  columns = {c.strip() for c in header.split('\t')}
  return {'video_uid', 'clip_text'} <= columns


def read_manifest(
  path: str,
  media_root: str | None = None,
  egoclip_chunk_seconds: float = EGOCLIP_CHUNK_SECONDS,
) -> list[ManifestRow]:
  """Reads a JSONL, CSV or EgoClip manifest; malformed rows come back with `error` set (never
  raised).

  media_root: the folder relative media paths (EgoClip: `{video_uid}.mp4`) are opened from; None:
  the manifest's folder. egoclip_chunk_seconds: the length of an EgoClip window (`read_egoclip`).
  Raises ValueError only when the manifest as a whole is unusable (unknown suffix, no `media`
  column, an EgoClip header without the columns it needs, not UTF-8: `cli.UserError` naming the
  line) and OSError when it cannot be read. An empty manifest gives no rows.
  """
  base_dir = os.path.abspath(media_root) if media_root else os.path.dirname(os.path.abspath(path))
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in JSONL_SUFFIXES + CSV_SUFFIXES:
    raise ValueError(
      f'{path}: unknown manifest type {suffix!r}; use {JSONL_SUFFIXES + CSV_SUFFIXES} files'
    )
  text = read_utf8(path)
  if is_egoclip(path, text):
    return read_egoclip(path, text, base_dir, egoclip_chunk_seconds)
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


def _egoclip_tags(cell: str | None, column: str) -> tuple[int, ...]:
  # Released as Python list literals, "[192, 115]": the same text is a JSON list.
  if cell is None or not cell.strip():
    return ()
  try:
    value = json.loads(cell)
  except json.JSONDecodeError:
    raise ValueError(f'{column}: {cell!r} is not a list like [192, 115]') from None
  return _parse_tags(value, column)


def _egoclip_time(cell: str | None, column: str) -> float:
  try:
    value = float(cell)  # type: ignore[arg-type]
  except (TypeError, ValueError):
    raise ValueError(f'{column}: {cell!r} is not a number') from None
  if not math.isfinite(value):
    raise ValueError(f'{column}: {cell!r} is not a finite number')
  return value


def read_egoclip(
  path: str, text: str, media_root: str, chunk_seconds: float = EGOCLIP_CHUNK_SECONDS
) -> list[ManifestRow]:
  """EgoClip metadata (TAB-separated, a header row) → one window row per (video, chunk).

  Each line is one narration: `video_uid`, `clip_start`, `clip_end` (seconds in the video),
  `clip_text` (kept exactly as released, "#C C picks up a knife" included: the tokenizer sees it),
  and optionally `tag_noun` / `tag_verb` (class indices of Ego4D's taxonomy, "[192, 115]"); other
  columns (narration_time, video_dur, narration_source, …) are ignored. A negative clip_start is
  read as 0, as EgoVLP reads it. A narration belongs to chunk k = ⌊clip_start / chunk_seconds⌋
  of its video; chunk k becomes the window row over `{media_root}/{video_uid}.mp4` from
  k · chunk_seconds to the latest end of its narrations (so a narration that starts before the
  chunk's end keeps its whole span), with its narrations, in start order, as captions (in the
  video's time: the converter moves them to the window's clock, as for any window row). Rows come
  in the order of their first line; a malformed line is a row of its own with `error` set.
  """
  if not (math.isfinite(chunk_seconds) and chunk_seconds > 0):
    raise ValueError(f'egoclip_chunk_seconds must be > 0, got {chunk_seconds}')
  reader = csv.DictReader(io.StringIO(text, newline=''), delimiter='\t')
  columns = [c.strip() for c in reader.fieldnames or []]
  missing = [c for c in EGOCLIP_COLUMNS if c not in columns]
  if missing:
    raise ValueError(f'{path}: the EgoClip header lacks the column(s) {missing}, found {columns}')
  reader.fieldnames = columns
  # Rows with index -1 until all are made: index = the order of their (first) lines.
  rows: list[ManifestRow] = []
  chunks: dict[tuple[str, int], list[tuple[int, schema.Caption]]] = {}
  for fields in reader:
    line = reader.line_num  # where the row ends, as for the other CSV format
    try:
      if None in fields or any(fields.get(c) is None for c in EGOCLIP_COLUMNS):
        raise ValueError(f'expected {len(columns)} TAB-separated cells')
      video_uid = (fields['video_uid'] or '').strip()
      if not video_uid:
        raise ValueError('video_uid: empty')
      start = max(_egoclip_time(fields['clip_start'], 'clip_start'), 0.0)
      end = _egoclip_time(fields['clip_end'], 'clip_end')
      if end < start:
        raise ValueError(f'clip_end {end:g} < clip_start {start:g}')
      caption = schema.Caption(
        start,
        end,
        fields['clip_text'],
        _egoclip_tags(fields.get('tag_noun'), 'tag_noun'),
        _egoclip_tags(fields.get('tag_verb'), 'tag_verb'),
      )
    except ValueError as e:
      rows.append(ManifestRow(-1, line, '', '', error=f'{path} line {line}: {e}'))
      continue
    chunks.setdefault((video_uid, int(start // chunk_seconds)), []).append((line, caption))
  for (video_uid, chunk), items in chunks.items():
    line = items[0][0]
    captions = tuple(c for _, c in sorted(items, key=lambda item: (item[1].start, item[0])))
    start, end = chunk * chunk_seconds, max(c.end for c in captions)
    media = f'{video_uid}.mp4'
    if end > start:
      opened = _resolve(media, media_root)
      rows.append(ManifestRow(-1, line, media, opened, captions, (), None, start, end))
    else:  # every narration of the chunk is an instant at its very start
      rows.append(ManifestRow(-1, line, media, '', error=(
        f'{path} line {line}: video {video_uid} chunk {chunk}: its narrations end at {end:g} s, '
        'where the chunk starts (an empty window)'
      )))  # fmt: skip
  rows.sort(key=lambda row: row.line)
  return [dataclasses.replace(row, index=index) for index, row in enumerate(rows)]


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
