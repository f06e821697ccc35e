"""Record shards: finding a split's shards, checking them against the config before anything is
read, reading them with damaged shards detected and counted, and saying why a split gave nothing.

`ShardReader` is mixed into data_pipelines.pretrain.ShardSource (docstring there: the checks and
what fails how) and reads its attributes: cfg, where, files, modalities, clip_seconds, seed, train,
min_captions, num_nouns, num_verbs, counts and the reading state set in its __init__
(_lock, _shard_records, _records_read, _passed, _progress, _bad_shards, _stop).
"""

from __future__ import annotations

import glob
import json
import os
import struct

import tensorflow as tf
from absl import logging

from data_pipelines import schema, taxonomy
from vatt_jax.cli import UserError

tf.config.set_visible_devices([], 'GPU')  # TensorFlow never takes an accelerator from JAX


class NoShardsError(UserError, FileNotFoundError):
  """A split's folder holds no shard file."""


def shard_files(path: str, split: str, process_index: int, process_count: int) -> list[str]:
  """This host's shards: every process_count-th file of `{path}/{split}/*.tfrecord`."""
  if not path:
    raise UserError(
      'config data.path is empty: set --config.data.path=DIR, a folder of {split}/*.tfrecord '
      'shards made by scripts/prepare_data.py'
    )
  directory = os.path.join(path, split)
  files = sorted(glob.glob(os.path.join(directory, '*.tfrecord')))
  if not files:
    raise NoShardsError(
      f'split {split!r}: no shards in {directory} (no *.tfrecord file; config data.path={path} '
      f'must hold a {split}/ folder made by scripts/prepare_data.py)'
    )
  mine = files[process_index::process_count]
  if not mine:
    raise UserError(f'{len(files)} shards in {directory} cannot feed {process_count} hosts')
  return mine


def done_counts(path: str) -> dict | None:
  """The converter's counts stored beside a shard (`shard-….done.json`, data_pipelines/ingest.py:
  written, with_video, with_audio, with_captions, rows, skipped, schema_version, options), or None
  when there are none (shards made another way)."""
  try:
    with open(path[: -len('.tfrecord')] + '.done.json', encoding='utf-8') as f:
      counts = json.load(f)
  except (OSError, ValueError):
    return None
  return counts if isinstance(counts, dict) else None


def framing(path: str) -> tuple[int, int | None]:
  """(complete records, byte offset where the file ends mid-record or None) of a TFRecord file.

  TensorFlow's reader takes a cut-off last record for the end of the file; walking the length
  headers (8-byte length, 4-byte CRC, data, 4-byte CRC) finds the cut with one seek per record.
  """
  size = os.path.getsize(path)
  offset = records = 0
  with open(path, 'rb') as f:
    while offset < size:
      header = f.read(12)
      if len(header) < 12:
        return records, offset
      (length,) = struct.unpack('<Q', header[:8])
      if offset + 12 + length + 4 > size:
        return records, offset
      offset += 12 + length + 4
      records += 1
      f.seek(offset)
  return records, None


class ShardReader:
  """Checks and reads the shards of a ShardSource (module docstring)."""

  def _check_taxonomy(self) -> None:
    """Refuses num_nouns / num_verbs that differ from the sizes of the taxonomy the converter
    copied beside the shards (scripts/prepare_data.py --taxonomy), when there is one."""
    if not (self.num_nouns or self.num_verbs):
      return
    shard_dir = os.path.dirname(self.files[0])
    stored = taxonomy.stored_taxonomy(shard_dir)
    if stored is None:
      return
    where = os.path.join(shard_dir, taxonomy.TAXONOMY_FILENAME)
    for name, wanted, found in (
      ('num_nouns', self.num_nouns, stored.num_nouns),
      ('num_verbs', self.num_verbs, stored.num_verbs),
    ):
      if wanted and wanted != found:
        kind = name[len('num_') :]
        raise UserError(
          f'{self.where}: its taxonomy {where} has {found} {kind}, config data.{name}={wanted}: '
          f'set --config.data.{name}={found} or convert with the taxonomy the config expects'
        )

  # ---- shards against the config, before anything is read -----------------------------------
  def _check_shards(self) -> None:
    """Fails now, naming the split, on shards this config cannot use: a training stream repeats
    forever and would otherwise wait for its first batch without end (no record, none with what
    the model reads), or train on masked audio (another sample rate). Reads the converter's
    counts beside the shards when every shard has them, and the first records of a few shards."""
    stored = [done_counts(path) for path in self.files]
    rate_checked = False
    if all(stored):
      rate_checked = self._check_counts(stored)
    if all(os.path.getsize(path) == 0 for path in self.files):
      raise UserError(f'{self.where}: no record in its {len(self.files)} shards (all empty files)')
    self._check_first_records(check_rate='audio' in self.modalities and not rate_checked)

  def _check_counts(self, stored: list[dict]) -> bool:
    """Checks the converter's per-shard counts; True when they told the audio sample rate."""

    def total(key):
      return sum(int(counts.get(key) or 0) for counts in stored)

    versions = {int(counts.get('schema_version', 1)) for counts in stored}
    if versions - {schema.SCHEMA_VERSION}:
      raise UserError(
        f'{self.where}: shards hold records of format version '
        f'{min(versions - {schema.SCHEMA_VERSION})}, this code reads version '
        f'{schema.SCHEMA_VERSION}: convert the media again with scripts/prepare_data.py'
      )
    records = total('written')
    if records == 0:
      raise UserError(
        f'{self.where}: no record in its {len(self.files)} shards (the converter skipped all '
        f'{total("rows")} rows of the manifest; its report.jsonl says why)'
      )
    missing = []
    if 'video' in self.modalities and 'with_video' in stored[0] and not total('with_video'):
      missing.append(('without video frames', 'the model reads video'))
    if self.min_captions and 'with_captions' in stored[0] and not total('with_captions'):
      missing.append(('without captions', self._captions_needed()))
    if missing:
      raise UserError(
        f'{self.where}: no usable record in {records} records ('
        + ', '.join(f'{records} {what}' for what, _ in missing)
        + '); '
        + '; '.join(why for _, why in missing)
      )
    if 'audio' not in self.modalities:
      return True
    rates = [
      (counts.get('options') or {}).get('sample_rate') if counts.get('with_audio') else 0
      for counts in stored
    ]
    if any(rate is None for rate in rates):
      return False
    for rate in rates:
      self._check_rate(int(rate))
    return True

  def _check_rate(self, rate: int) -> None:
    """`rate`: the Hz a shard stores its audio at (0: a record without audio, which is masked)."""
    cfg = self.cfg
    if rate in (0, cfg.sample_rate):
      return
    also = ''
    if 'video' in self.modalities:
      samples = round(self.clip_seconds * rate)
      also = f' (and num_samples={samples} for the same {self.clip_seconds:g} s clips)'
    raise UserError(
      f'shards of {self.where} store audio at {rate} Hz, config data.sample_rate='
      f'{cfg.sample_rate}: set --config.data.sample_rate={rate}{also} or convert the media again '
      f'with scripts/prepare_data.py --sample_rate={cfg.sample_rate}'
    )

  def _check_first_records(self, check_rate: bool) -> None:
    """The format version of the first record, and (check_rate) the sample rate of the first
    record with audio among the first 4 records of the first 4 shards."""
    errors, version_checked = [], False
    for path in self.files[:4]:
      record = None
      try:
        for record in tf.data.TFRecordDataset(path).take(4 if check_rate else 1):
          ex = schema.parse(record)
          if not version_checked:
            version = int(ex['version'])
            if version != schema.SCHEMA_VERSION:
              raise UserError(
                f'{self.where}: {os.path.basename(path)} holds records of format version '
                f'{version}, this code reads version {schema.SCHEMA_VERSION}: convert the media '
                'again with scripts/prepare_data.py'
              )
            version_checked = True
          if check_rate and int(ex['sample_rate']) > 0:
            self._check_rate(int(ex['sample_rate']))
            check_rate = False
          if not check_rate:
            return
      except tf.errors.OpError as e:  # unreadable or not our records; a damaged shard may follow
        stored = None if record is None else schema.record_version(record.numpy())
        if stored is not None and stored[0] != schema.SCHEMA_VERSION:
          raise UserError(
            f'{self.where}: {os.path.basename(path)} holds records of format version '
            f'{stored[0]}, this code reads version {schema.SCHEMA_VERSION}: convert the media '
            'again with scripts/prepare_data.py'
          ) from None
        errors.append(f'{os.path.basename(path)}: {e.message.strip().splitlines()[0][:200]}')
    if errors and not version_checked:
      raise UserError(
        f'{self.where}: no readable vatt-jax record at the start of the first shards (made by '
        f'another tool, or a format older than version {schema.SCHEMA_VERSION}? '
        'scripts/prepare_data.py makes them): ' + '; '.join(errors)
      )

  # ---- the stream ---------------------------------------------------------------------------
  def _records(self) -> tf.data.Dataset:
    """Serialized records, round-robin over `cycle_length` open shards; forever in training.

    Read in the graph (TFRecordDataset checks every CRC). A shard that ends early, at a corrupted
    record or cut off mid-record, keeps the records before the damage; when each shard has been
    read, `_end_of_shard` compares the count with the file's framing and reports the damage.
    """
    files = tf.data.Dataset.from_tensor_slices(self.files)
    if self.train:  # a new shard order every epoch, the same for the same seed
      files = files.shuffle(len(self.files), seed=self.seed, reshuffle_each_iteration=True)
      files = files.repeat()
      # Ends the endless stream when it can yield nothing (asked once per shard opened).
      files = files.take_while(lambda path: tf.py_function(self._keep_reading, [], tf.bool))

    def read(path):
      records = tf.data.TFRecordDataset(path, buffer_size=4 << 20)
      if self.cfg.on_bad_input == 'skip':
        records = records.ignore_errors()  # the shard ends at a corrupted record
      marker = tf.data.Dataset.from_tensors(('', True))
      records = records.map(lambda r: (r, False)).concatenate(marker)
      # (record, is the end marker, records read before it)
      return records.scan(tf.constant(0, tf.int64), lambda n, x: (n + 1, (x[0], x[1], n))).filter(
        lambda record, end, n: tf.cond(
          end,
          lambda: tf.py_function(self._end_of_shard, [path, n], tf.bool),
          lambda: tf.constant(True),
        )
      )

    records = files.interleave(
      read,
      cycle_length=self.cfg.cycle_length,
      block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )
    return records.map(lambda record, end, n: record)

  def _end_of_shard(self, path, read) -> bool:
    """Runs once per shard read (the end marker): counts it, checks its framing; always False."""
    path, read = path.numpy().decode(), int(read)
    with self._lock:
      self._records_read += read
      self._shard_records[path] = read
    complete, cut = framing(path)
    if cut is not None:
      self._bad_shard(path, f'truncated at byte {cut}; the {read} complete records were read')
    elif read < complete:
      self._bad_shard(
        path, f'corrupted record {read} of {complete}; the {read} before it were read'
      )
    return False

  def _keep_reading(self) -> bool:
    """Whether the endless training stream may open another shard: False once it has read its
    way past any usable record (_hopeless); the stream then ends and __next__ says why."""
    with self._lock:
      return not self._hopeless()

  def _hopeless(self) -> bool:
    """Whether no record read can come out of _process (lock held).

    Once every shard has been read, an epoch is known to hold R records; if 3·R + shuffle_buffer
    + 256 records (past the restored position) were read since an element last came out of
    _process (`_passed`), none will: the stream would spin for ever. A valid stream pays a
    variable increment per element and a few integer compares per shard opened."""
    if len(self._shard_records) < len(self.files):
      return False
    records = sum(self._shard_records.values())
    passed = int(self._passed.numpy())
    if passed != self._progress[0]:
      self._progress = (passed, self._records_read)
      return False
    slack = 3 * records + self.cfg.shuffle_buffer + 256
    return records == 0 or self._records_read - self._progress[1] >= slack

  def _bad_shard(self, path: str, what: str) -> None:
    if path not in self._bad_shards:  # once per shard, not once per epoch
      self._bad_shards.add(path)
      logging.warning('shard %s: %s', path, what)
    self.counts['corrupt_shards'] = len(self._bad_shards)
    if self.cfg.on_bad_input == 'fatal':
      self._stop = UserError(
        f'{self.where}: corrupted shard {os.path.basename(path)}: {what} '
        '(config data.on_bad_input=fatal)'
      )
      raise self._stop

  # ---- why a stream gave nothing ------------------------------------------------------------
  def _no_usable_record(self) -> UserError:
    """The error of a split none of whose records can be used: the records by reason (one pass
    over the shards; only a stream that yielded nothing pays it)."""
    records = sum(self._shard_records.values())
    if records == 0:
      damaged = len(self._bad_shards)
      why = f'{damaged} corrupted or cut off: see the warnings above' if damaged else 'all empty'
      return UserError(f'{self.where}: no readable record in its {len(self.files)} shards ({why})')
    parsed, no_video, few_captions, tags_past = self._survey()
    other = parsed - no_video - few_captions - tags_past
    parts, needs = [], []
    if records > parsed:
      parts.append(f'{records - parsed} not vatt-jax records')
      needs.append('scripts/prepare_data.py makes the records')
    if no_video:
      parts.append(f'{no_video} without video frames')
      needs.append('the model reads video')
    if few_captions:
      parts.append(f'{few_captions} with fewer than {self.min_captions} non-empty captions')
      needs.append(self._captions_needed())
    if tags_past:
      parts.append(
        f'{tags_past} with noun / verb classes past data.num_nouns={self.num_nouns} / '
        f'data.num_verbs={self.num_verbs}'
      )
      needs.append("the config's taxonomy sizes must cover the shards' tags")
    if other:
      parts.append(f'{other} that fail to decode')
      needs.append(
        f'scripts/validate_shards.py --input_dir={os.path.dirname(self.files[0])} --decode_all '
        'names them'
      )
    return UserError(
      f'{self.where}: no usable record in {records} records ({", ".join(parts)}); '
      + '; '.join(needs)
    )

  def _survey(self) -> tuple[int, int, int, int]:
    """(records that parse, of them without video frames when the model reads video, of the
    others with fewer than min_captions non-empty captions, of the others with a noun / verb
    class past data.num_nouns / num_verbs) over this host's shards."""

    def reasons(serialized):
      ex = schema.parse(serialized)
      no_video = tf.size(ex['frames']) == 0 if 'video' in self.modalities else tf.constant(False)
      nonempty = tf.strings.length(tf.strings.strip(ex['captions'])) > 0
      few = tf.reduce_sum(tf.cast(nonempty, tf.int32)) < self.min_captions
      past = tf.constant(False)
      for key, limit in (('caption_noun', self.num_nouns), ('caption_verb', self.num_verbs)):
        if limit:
          past = past | tf.reduce_any(ex[key] >= limit)
      fine = ~no_video & ~few
      return tf.cast(tf.stack([True, no_video, ~no_video & few, fine & past]), tf.int64)

    files = tf.data.Dataset.from_tensor_slices(self.files)
    records = files.interleave(
      lambda path: tf.data.TFRecordDataset(path).ignore_errors(),
      cycle_length=4,
      num_parallel_calls=tf.data.AUTOTUNE,
    )
    counts = records.map(reasons, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    parsed, no_video, few, past = counts.reduce(tf.zeros([4], tf.int64), tf.add).numpy()
    return int(parsed), int(no_video), int(few), int(past)
