"""The pretraining pipeline over record shards: clips of frames, synced audio, 5 narrations.

  shards (per host) ─▶ round-robin reader ─▶ shuffle ─▶ enumerate ─▶ parse + sample + augment
        ─▶ drop/mask bad input (counted) ─▶ batch ─▶ prefetch ─▶ numpy dicts

Training samples one random clip per record; evaluation takes `eval_clips` uniformly spaced clips
per record, each in `eval_crops` crops (1: the central square; 3: left/centre/right), so a video
batch holds eval_clips × eval_crops views per record, clip-major. Every random choice is a stateless
function of (seed, element index), so in deterministic mode the same config gives the same batches,
and a restored position (`set_state`) replays the stream from exactly where it stopped.
data.deterministic=False lets the parallel maps emit out of order (the reader's interleave stays
ordered): the same records and draws, not the same batches, and no exact replay.

Shards this config cannot use fail at construction, one line naming the split (cli.UserError):
no shard, no record, none with video frames (a video model) or enough captions (long_video), audio
stored at another rate than data.sample_rate, another format version. It reads the converter's
`.done.json` counts beside the shards and the first records. Shards without counts can still hold
nothing usable: the endless training stream then ends after three epochs' worth of records
without one element out of `_process` and next() raises the same kind of line, with the records
counted by reason; an evaluation pass that yields nothing does the same.

Fine-tuning options (config.data): `modalities` (default all three) limits what is decoded and
emitted (a video classifier needs no audio, text or tokenizer); `multi_label` with `num_classes`
turns each record's label list into a multi-hot float32 [num_classes] "label" (otherwise the first
label, or −1); `split_folders` maps a split name to its folder under `path` (e.g. train →
segments_train).

EgoVLP / SViTT-Ego options (config.data; docs/DATA.md):
  num_nouns, num_verbs (0: off): the batch carries `noun` [B, num_nouns] and `verb` [B, num_verbs]
    float32 multi-hots of the chosen caption's class tags (the first narration when K > 1). A
    record with a class index >= num_* is data that disagrees with the config: skipped and
    counted (noun_out_of_range / verb_out_of_range), or fatal with on_bad_input='fatal'. When the
    shards' folder holds the converter's taxonomy.json, a config whose sizes differ is refused.
  caption_clips (False): a clip is anchored on ONE caption, drawn uniformly among the record's
    non-empty captions (records without one: skipped, counted as no_captions): T frames spread over
    the caption's [start, end], one at a random point of each of T equal segments in training, at
    the segment centres in evaluation (EgoVLP's 'rand' / 'uniform'), whatever data.fps says; then
    the usual crop, flip and jitter. Text: that caption first, then (K > 1) the captions nearest
    it in time order. Evaluation gives one such clip per record (data.eval_clips is not used) in
    data.eval_crops crops. Audio is not cut over caption spans: refused with 'audio' in
    data.modalities.
  scene_negative_window (0: off; EgoVLP: 60 s; needs caption_clips; training only): the batch also
    carries the clip of another caption j of the same record whose time ((start + end) / 2, close to
    EgoClip's narration_time) lies within ±window of the chosen caption's, j drawn uniformly among
    those: neg_video [B, T, S, S, 3], neg_text [B, K, W], neg_noun / neg_verb, neg_mask [B] float32
    (0, with zeros in the other neg_ fields, where the record has no such caption). As in
    vatt_jax.losses.egonce.scene_negative_index.
Every draw is a stateless function of (seed, element index), like the rest of this pipeline.
"""

from __future__ import annotations

import atexit
import collections
import glob
import json
import os
import struct
import threading
import weakref

import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from data_pipelines import audio as audio_ops
from data_pipelines import labels as labels_ops
from data_pipelines import options, schema, taxonomy
from data_pipelines import text as text_ops
from data_pipelines import video as video_ops
from vatt_jax.cli import UserError

tf.config.set_visible_devices([], 'GPU')  # TensorFlow never takes an accelerator from JAX

MODALITIES = ('video', 'audio', 'text')
# Why _process rejects an element (its '_reject' code), as named in `counts`; 0 keeps it.
REJECT_REASONS = {1: 'noun_out_of_range', 2: 'verb_out_of_range', 3: 'no_captions'}
_NOUN_OUT_OF_RANGE, _VERB_OUT_OF_RANGE, _NO_CAPTIONS = 1, 2, 3


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


# Sources still open at exit are closed while Python is alive: TensorFlow cannot finalize an iterator
# holding a py_function (the end-of-shard check) once the interpreter has begun tearing down.
_OPEN_SOURCES = weakref.WeakSet()
atexit.register(lambda: [source.close() for source in list(_OPEN_SOURCES)])


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


class ShardSource:
  """Iterator of numpy batch dicts read from record shards; see the module docstring.

  Train batch: video [B, T, S, S, 3] f32 in [-1, 1], audio [B, N] f32, text [B, K, W] int32,
  video_mask / audio_mask / text_mask [B] f32, label [B] int32 (-1: none) or [B, C] f32 multi-hot;
  with data.num_nouns / num_verbs > 0 noun [B, num_nouns] / verb [B, num_verbs] f32 multi-hot;
  with data.scene_negative_window > 0 neg_video [B, T, S, S, 3], neg_text [B, K, W] int32,
  neg_noun / neg_verb, neg_mask [B] f32 (module docstring).
  Eval adds a view axis: video [B, k·c, T, S, S, 3] (k clips × c crops, clip-major; k = 1 with
  data.caption_clips), audio [B, k, N], and media_id [B] bytes. Only the fields of config
  data.modalities are present. `counts` holds what was skipped or masked, by reason.
  """

  min_captions = 0  # records with fewer non-empty captions cannot be used (long_video.py: C)

  def __init__(
    self,
    cfg: ml_collections.ConfigDict,
    split: str,
    *,
    batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if cfg.on_bad_input not in ('skip', 'fatal'):
      raise ValueError(
        f"config data.on_bad_input must be 'skip' or 'fatal', got {cfg.on_bad_input!r}"
      )
    self.modalities = tuple(cfg.get('modalities', MODALITIES))
    if not self.modalities or set(self.modalities) - set(MODALITIES):
      raise ValueError(
        f'config data.modalities must be a non-empty subset of {MODALITIES}, got {self.modalities}'
      )
    if 'video' in self.modalities:
      self.clip_seconds = cfg.num_frames / cfg.fps
      if (
        'audio' in self.modalities
        and abs(cfg.num_samples - self.clip_seconds * cfg.sample_rate) > 1
      ):
        raise ValueError(
          f'config data.num_samples={cfg.num_samples} at {cfg.sample_rate} Hz is not the '
          f'{self.clip_seconds:.3f} s that {cfg.num_frames} frames at {cfg.fps} fps last'
        )
    else:  # audio (and text) only: the clip is the waveform's length
      self.clip_seconds = cfg.num_samples / cfg.sample_rate
    self.eval_crops = video_ops.eval_crops(cfg)
    self.random_flip = options.random_flip(cfg)
    self.multi_label, self.num_classes = labels_ops.options(cfg)
    self._ego_options(cfg)
    self.cfg, self.split, self.seed = cfg, split, seed
    self.train = split == 'train'
    self.local_batch_size = batch_size // process_count
    folder = dict(cfg.get('split_folders', {})).get(split, split)
    self.files = shard_files(cfg.path, folder, process_index, process_count)
    self.where = f'split {split!r} in {os.path.join(cfg.path, folder)}'  # for messages
    self.tokenizer = None
    if 'text' in self.modalities:
      self._load_tokenizer()
    self._check_taxonomy()
    self._check_shards()
    self.counts = collections.Counter()
    self._position = 0  # stream elements consumed (emitted or dropped)
    self._records_read = 0
    self._bad_shards = set()
    self._iterator = None
    # Whether the stream can still yield anything (see _hopeless): records each shard held when
    # last read, and the elements that came out of _process in the current stream.
    self._lock = threading.Lock()
    self._shard_records = {}
    self._passed = tf.Variable(0, dtype=tf.int64, trainable=False)
    self._progress = (0, 0)  # (passed, records read) when `passed` last grew
    self._stop = None  # an error raised on a tf.data thread, re-raised by __next__ as it is
    # Elements _process rejected (index, reason) not yet consumed, and how many were since start.
    self._rejected = []
    self._rejected_lock = threading.Lock()
    self._rejected_since_start = 0
    _OPEN_SOURCES.add(self)

  def _ego_options(self, cfg: ml_collections.ConfigDict) -> None:
    """Reads and checks num_nouns, num_verbs, caption_clips and scene_negative_window."""
    for name in ('num_nouns', 'num_verbs'):
      value = cfg.get(name, 0)
      if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 0:
        raise ValueError(f'config data.{name} must be an integer >= 0, got {value!r}')
    self.num_nouns, self.num_verbs = int(cfg.get('num_nouns', 0)), int(cfg.get('num_verbs', 0))
    self.caption_clips = bool(cfg.get('caption_clips', False))
    window = cfg.get('scene_negative_window', 0.0)
    if not isinstance(window, int | float) or not np.isfinite(window) or window < 0:
      raise ValueError(f'config data.scene_negative_window must be >= 0 seconds, got {window!r}')
    self.scene_negative_window = float(window)
    if self.scene_negative_window > 0 and not self.caption_clips:
      raise ValueError(
        f'config data.scene_negative_window={window} needs data.caption_clips=True: a scene '
        'negative is the clip of another caption of the same video'
      )
    if self.caption_clips and 'audio' in self.modalities:
      raise ValueError(
        "config data.caption_clips=True cuts no audio over caption spans: drop 'audio' from "
        f'data.modalities (now {self.modalities})'
      )
    used = [
      f'data.{name}'
      for name, on in (
        ('num_nouns', self.num_nouns),
        ('num_verbs', self.num_verbs),
        ('caption_clips', self.caption_clips),
      )
      if on
    ]
    if used and type(self) is not ShardSource:
      raise ValueError(
        f'config {", ".join(used)}: not supported by {type(self).__name__} (data.long_video); '
        'set them to 0 / False'
      )
    if self.caption_clips:
      self.min_captions = max(self.min_captions, 1)
    self._may_reject = bool(self.num_nouns or self.num_verbs or self.caption_clips)

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

  def _load_tokenizer(self) -> None:
    cfg = self.cfg
    self.tokenizer = text_ops.Tokenizer(options.tokenizer_path(cfg))
    if self.tokenizer.vocab_size > cfg.vocab_size:
      raise ValueError(
        f'tokenizer {self.tokenizer.model_path} has {self.tokenizer.vocab_size} pieces, more than the '
        f'model vocabulary (config model.text.vocab_size={cfg.vocab_size})'
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

  def _captions_needed(self) -> str:
    # A subclass that needs captions (min_captions > 0) says why.
    if self.caption_clips:
      return 'data.caption_clips anchors each clip on a caption'
    return ''

  # ---- checkpointable position ------------------------------------------------------------
  def get_state(self) -> dict:
    return {'position': self._position}

  def set_state(self, state: dict) -> None:
    self._position = int(state['position'])
    self._iterator = None

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

  def _process(self, index, serialized):
    cfg = self.cfg
    ex = schema.parse(serialized)
    seed = tf.stack([tf.cast(self.seed, tf.int64), index])
    seeds = tf.random.experimental.stateless_split(seed, 3)
    out = {
      'label': self._label(ex['labels']),
      '_index': index,
      '_audio_incomplete': tf.constant(False),
      '_audio_rate_mismatch': tf.constant(False),
      '_empty_captions': tf.constant(0, tf.int32),
    }
    if self._may_reject:
      out.update(self._rejection(ex))
    if self.caption_clips:
      out.update(self._caption_clip(ex, seeds))
      if not self.train:
        out['media_id'] = ex['media_id']
      return out
    clip_seconds = self.clip_seconds
    starts = video_ops.clip_starts(
      ex['duration'], clip_seconds, seeds[0], train=self.train, eval_clips=cfg.eval_clips
    )
    if 'video' in self.modalities:
      out['video'] = self._video(ex, starts, seeds[1])
      out['video_mask'] = tf.ones([], tf.float32)  # records without frames were dropped
    if 'audio' in self.modalities:
      out.update(self._audio(ex, starts))
    if 'text' in self.modalities or self.num_nouns or self.num_verbs:
      out.update(self._text(ex, starts, clip_seconds))
    if not self.train:
      out['media_id'] = ex['media_id']
    return out

  def _rejection(self, ex):
    """'_reject' (a REJECT_REASONS code, 0: keep) and '_reject_value' (the class index past the
    config, or −1) of a record: a tag class past data.num_nouns / num_verbs on any caption, or
    (caption_clips) no non-empty caption to anchor a clip on. Checked in that order."""
    reject, value = tf.constant(0), tf.constant(-1, tf.int64)
    checks = []
    if self.num_nouns:
      checks.append((_NOUN_OUT_OF_RANGE, ex['caption_noun'], self.num_nouns))
    if self.num_verbs:
      checks.append((_VERB_OUT_OF_RANGE, ex['caption_verb'], self.num_verbs))
    if self.caption_clips:
      nonempty = tf.strings.length(tf.strings.strip(ex['captions'])) > 0
      reject = tf.where(tf.reduce_any(nonempty), reject, _NO_CAPTIONS)
    for code, tags, limit in reversed(checks):  # the first check that fails names the reason
      largest = tf.reduce_max(tf.concat([tf.reshape(tags, [-1]), tf.constant([-1], tf.int64)], 0))
      reject = tf.where(largest >= limit, code, reject)
      value = tf.where(largest >= limit, largest, value)
    return {'_reject': reject, '_reject_value': value, '_media_id': ex['media_id']}

  def _captions(self, ex):
    """The record's non-empty captions, in stored order: ({captions [n], caption_start [n],
    caption_end [n], caption_noun [n, L], caption_verb [n, L]}, n, nonempty [C] bool), with one
    empty placeholder caption when n = 0 (so that indexing never fails; its users mask it)."""
    nonempty = tf.strings.length(tf.strings.strip(ex['captions'])) > 0
    keys = ('captions', 'caption_start', 'caption_end', 'caption_noun', 'caption_verb')
    found = {key: tf.boolean_mask(ex[key], nonempty) for key in keys}
    count = tf.shape(found['captions'])[0]

    def no_tags(key):
      return tf.fill(tf.stack([1, tf.shape(ex[key])[1]]), tf.constant(-1, tf.int64))

    def placeholder():
      return {
        'captions': tf.constant(['']),
        'caption_start': tf.constant([0.0]),
        'caption_end': tf.constant([0.0]),
        'caption_noun': no_tags('caption_noun'),
        'caption_verb': no_tags('caption_verb'),
      }

    return tf.cond(count > 0, lambda: found, placeholder), count, nonempty

  def _tags(self, caps, chosen, present, prefix: str = ''):
    """noun [num_nouns] / verb [num_verbs] f32 multi-hots of caption `chosen` (zeros unless
    `present`), for the sizes that are > 0."""
    out = {}
    for key, size in (('noun', self.num_nouns), ('verb', self.num_verbs)):
      if size:
        row = caps[f'caption_{key}'][chosen]
        # Records with a class past `size` are rejected (_rejection); clipped here only so that
        # one_hot never sees them.
        hot = tf.one_hot(tf.boolean_mask(row, (row >= 0) & (row < size)), size, dtype=tf.float32)
        hot = tf.reduce_max(tf.concat([hot, tf.zeros([1, size])], 0), axis=0)
        out[prefix + key] = hot * tf.cast(present, tf.float32)
    return out

  def _label(self, labels):
    """The record's label list → its first label (−1: none), or multi-hot [num_classes]."""
    if not self.multi_label:
      return tf.cond(tf.size(labels) > 0, lambda: tf.cast(labels[0], tf.int32), lambda: -1)
    return labels_ops.multi_hot(labels, self.num_classes)

  def _video(self, ex, starts, seed):
    """Train: one clip [T, S, S, 3]; eval: [k·c, T, S, S, 3], the c crops of each of k clips."""
    cfg = self.cfg
    num_stored = tf.shape(ex['frames'])[0]
    # A record without frames fails here: dropped by ignore_errors and counted by the index gap
    # in 'skip' mode, raised in 'fatal' mode.
    tf.debugging.assert_greater(num_stored, 0, message='record without frames')
    crops = 1 if self.train else self.eval_crops
    windows = None
    if not self.train:
      windows = video_ops.eval_windows(tf.image.extract_jpeg_shape(ex['frames'][0]), crops)

    def one_clip(start):
      if self.train:
        return self._clip(ex, start, seed)
      return tf.stack([self._clip(ex, start, seed, windows[c]) for c in range(crops)])

    if self.train:
      return one_clip(starts[0])
    size = cfg.frame_size
    clips = tf.map_fn(
      one_clip, starts, fn_output_signature=tf.TensorSpec([crops, cfg.num_frames, size, size, 3])
    )
    return tf.reshape(clips, [-1, cfg.num_frames, size, size, 3])

  def _clip(self, ex, start, seed, window=None):
    """[T, S, S, 3]: the stored frames shown from `start` s, decoded in `window` [y, x, h, w], else
    with the training augmentation drawn from `seed` (train; the flip coin only with
    data.random_flip) or the central square (eval)."""
    cfg = self.cfg
    num_stored = tf.shape(ex['frames'])[0]
    index = video_ops.frame_indices(start, ex['frame_rate'], num_stored, cfg.num_frames, cfg.fps)
    return video_ops.decode_clip(
      tf.gather(ex['frames'], index), cfg.frame_size, seed, train=self.train, window=window,
      area_range=cfg.crop_area_range, aspect_range=cfg.crop_aspect_range, flip=self.random_flip,
    )  # fmt: skip

  def _audio(self, ex, starts):
    cfg = self.cfg

    def one_clip(start):
      return audio_ops.cut_waveform_bytes(
        ex['waveform_bytes'], start, cfg.sample_rate, cfg.num_samples
      )

    if self.train:
      waves, complete = one_clip(starts[0])
    else:
      waves, complete = tf.map_fn(
        one_clip,
        starts,
        fn_output_signature=(
          tf.TensorSpec([cfg.num_samples], tf.float32),
          tf.TensorSpec([], tf.bool),
        ),
      )
    rate_ok = tf.equal(ex['sample_rate'], cfg.sample_rate)
    has_audio = tf.equal(ex['has_audio'], 1)
    audio_complete = tf.reduce_all(complete)
    audio_ok = has_audio & rate_ok & audio_complete
    return {
      'audio': waves * tf.cast(audio_ok, tf.float32),
      'audio_mask': tf.cast(audio_ok, tf.float32),
      '_audio_incomplete': has_audio & rate_ok & ~audio_complete,
      '_audio_rate_mismatch': has_audio & ~rate_ok,
    }

  def _text(self, ex, starts, clip_seconds):
    """text [K] strings and text_mask (when the model reads text), and the first narration's
    noun / verb multi-hots (data.num_nouns / num_verbs)."""
    cfg = self.cfg
    caps, count, nonempty = self._captions(ex)
    has_text = count > 0
    centre = starts[tf.shape(starts)[0] // 2]
    chosen = text_ops.narration_indices(
      caps['caption_start'], caps['caption_end'], centre, centre + clip_seconds, cfg.num_narrations
    )
    out = self._tags(caps, chosen[0], has_text)
    if 'text' in self.modalities:
      # Strings now, ids after batching: one tokenizer call per batch, not one per example.
      out['text'] = tf.where(has_text, tf.gather(caps['captions'], chosen), '')
      out['text_mask'] = tf.cast(has_text, tf.float32)
      out['_empty_captions'] = tf.reduce_sum(tf.cast(~nonempty, tf.int32))
    return out

  # ---- caption-anchored clips and scene negatives (data.caption_clips) ----------------------
  def _caption_clip(self, ex, seeds):
    """The fields of a clip anchored on one caption, drawn uniformly (module docstring), and of
    its scene negative (training, data.scene_negative_window > 0)."""
    caps, count, nonempty = self._captions(ex)
    present = count > 0  # records without a caption are rejected (_rejection)
    # seeds[0] (the clip start's outside this mode) is split for this mode's draws; seeds[1]
    # augments the clip as in the other mode. Not stateless_fold_in: its seeds [u, 1], [u, 2], …
    # differ only in the counter word, and Philox's first draws from them are correlated.
    choice, offsets, negative_choice, negative_offsets, negative_augment = tf.unstack(
      tf.random.experimental.stateless_split(seeds[0], 5), num=5
    )
    chosen = tf.random.stateless_uniform([], choice, 0, tf.maximum(count, 1), dtype=tf.int32)
    out = self._anchored(ex, caps, count, chosen, offsets, seeds[1], present)
    out['_empty_captions'] = tf.reduce_sum(tf.cast(~nonempty, tf.int32))
    if self.train and self.scene_negative_window > 0:
      other, has_other = self._scene_negative(caps, count, chosen, negative_choice)
      negative = self._anchored(
        ex, caps, count, other, negative_offsets, negative_augment, has_other, prefix='neg_'
      )
      for key in ('text_mask', 'video_mask'):
        negative.pop('neg_' + key, None)
      out.update(negative)
      out['neg_mask'] = tf.cast(has_other, tf.float32)
    return out

  def _anchored(self, ex, caps, count, chosen, offset_seed, augment_seed, present, prefix=''):
    """video (train [T, S, S, 3], eval [c, T, S, S, 3]) over caption `chosen`'s span, its text
    [K] (the caption, then the captions nearest it in time order) and tags; zeros and '' unless
    `present` (the video is then not decoded)."""
    cfg = self.cfg
    out = self._tags(caps, chosen, present, prefix)
    if 'video' in self.modalities:
      crops = 1 if self.train else self.eval_crops
      shape = [cfg.num_frames, cfg.frame_size, cfg.frame_size, 3]
      shape = shape if self.train else [crops, *shape]
      start, end = caps['caption_start'][chosen], caps['caption_end'][chosen]
      out[prefix + 'video'] = tf.cond(
        present,
        lambda: self._span_clip(ex, start, end, offset_seed, augment_seed),
        lambda: tf.zeros(shape, tf.float32),
      )
      out[prefix + 'video_mask'] = tf.ones([], tf.float32)
    if 'text' in self.modalities:
      text = tf.gather(caps['captions'], self._nearest_captions(caps, count, chosen))
      out[prefix + 'text'] = tf.where(present, text, '')
      out[prefix + 'text_mask'] = tf.cast(present, tf.float32)
    return out

  def _nearest_captions(self, caps, count, chosen):
    """[K] caption indices: `chosen`, then the others nearest it in time order (start times;
    the earlier first on a tie), `chosen` repeated when there are fewer than K."""
    order = tf.argsort(caps['caption_start'], stable=True)  # time position → caption
    position = tf.argmax(tf.cast(tf.equal(order, chosen), tf.int32), output_type=tf.int32)
    positions = tf.range(tf.shape(order)[0])
    key = 2 * tf.abs(positions - position) - tf.cast(positions < position, tf.int32)
    nearest = tf.argsort(key, stable=True)  # nearest[0] is `position` (key 0)
    k = tf.range(self.cfg.num_narrations)
    return tf.gather(order, tf.gather(nearest, tf.where(k < count, k, 0)))

  def _span_clip(self, ex, start, end, offset_seed, augment_seed):
    """T frames over [start, end] s: frame k at a random point (train) or the centre (eval) of the
    k-th of T equal segments, shown as stored at that time; then augmented (train) or the
    data.eval_crops crops (eval, [c, T, S, S, 3])."""
    cfg = self.cfg
    num_stored = tf.shape(ex['frames'])[0]
    # A record without frames fails here: dropped and counted, as _video does.
    tf.debugging.assert_greater(num_stored, 0, message='record without frames')
    start = tf.clip_by_value(start, 0.0, ex['duration'])
    length = tf.maximum(tf.clip_by_value(end, 0.0, ex['duration']) - start, 0.0)
    if self.train:
      within = tf.random.stateless_uniform([cfg.num_frames], offset_seed)
    else:
      within = tf.fill([cfg.num_frames], 0.5)
    segment = tf.range(cfg.num_frames, dtype=tf.float32)
    times = start + (segment + within) * length / cfg.num_frames
    index = tf.cast(tf.floor(times * ex['frame_rate']), tf.int32)
    jpegs = tf.gather(ex['frames'], tf.clip_by_value(index, 0, num_stored - 1))
    if self.train:
      return video_ops.decode_clip(
        jpegs, cfg.frame_size, augment_seed, train=True, area_range=cfg.crop_area_range,
        aspect_range=cfg.crop_aspect_range, flip=self.random_flip,
      )  # fmt: skip
    windows = video_ops.eval_windows(tf.image.extract_jpeg_shape(jpegs[0]), self.eval_crops)
    return tf.stack([
      video_ops.decode_clip(jpegs, cfg.frame_size, augment_seed, train=False, window=windows[c])
      for c in range(self.eval_crops)
    ])  # fmt: skip

  def _scene_negative(self, caps, count, chosen, seed):
    """(j, whether there is one): another caption of the record whose time ((start + end) / 2)
    lies within ±scene_negative_window of caption `chosen`'s, drawn uniformly among them."""
    times = tf.cast(caps['caption_start'], tf.float64) + tf.cast(caps['caption_end'], tf.float64)
    times = times / 2
    others = tf.range(tf.shape(times)[0]) != chosen
    near = others & (tf.abs(times - times[chosen]) <= self.scene_negative_window) & (count > 0)
    candidates = tf.cast(tf.where(near)[:, 0], tf.int32)
    num = tf.shape(candidates)[0]
    pick = tf.random.stateless_uniform([], seed, 0, tf.maximum(num, 1), dtype=tf.int32)
    # Without a candidate: `chosen` itself as a placeholder, masked by the caller.
    return tf.concat([candidates, [chosen]], 0)[pick], num > 0

  def _dataset(self) -> tf.data.Dataset:
    cfg = self.cfg
    ds = self._records()
    if self.train:
      ds = ds.shuffle(cfg.shuffle_buffer, seed=self.seed)
    ds = self._select(ds.enumerate().skip(self._position))
    process = self._counted if self.train else self._process
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=cfg.deterministic)
    if cfg.on_bad_input == 'skip':
      ds = ds.ignore_errors()  # undecodable records/frames: dropped here, counted by index gaps
    if self._may_reject:
      ds = ds.filter(self._accept)
    ds = self._batch(ds)
    if self.tokenizer is not None:
      ds = ds.map(
        self._tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=cfg.deterministic
      )
    return ds.prefetch(tf.data.AUTOTUNE)

  def _counted(self, index, serialized):
    """_process, counting the element in `_passed` once all its fields were made (_hopeless);
    an element _process rejects does not count."""
    out = self._process(index, serialized)
    kept = tf.cast(tf.equal(out['_reject'], 0), tf.int64) if '_reject' in out else 1
    with tf.control_dependencies(tf.nest.flatten(out)):
      passed = self._passed.assign_add(kept)
    with tf.control_dependencies([passed]):
      out['_index'] = tf.identity(out['_index'])
    return out

  def _accept(self, element) -> tf.Tensor:
    """Whether to keep an element; a rejected one is noted (_reject_element) and dropped."""
    return tf.cond(
      tf.equal(element['_reject'], 0),
      lambda: tf.constant(True),
      lambda: tf.py_function(
        self._reject_element,
        [element['_index'], element['_reject'], element['_reject_value'], element['_media_id']],
        tf.bool,
      ),
    )

  def _reject_element(self, index, reason, value, media_id) -> bool:
    """Runs once per rejected element, as the filter reaches it; always False. A tag class past
    the config stops the stream with data.on_bad_input='fatal'."""
    reason, value = int(reason), int(value)
    if self.cfg.on_bad_input == 'fatal' and reason in (_NOUN_OUT_OF_RANGE, _VERB_OUT_OF_RANGE):
      kind, limit = (
        ('noun', self.num_nouns) if reason == _NOUN_OUT_OF_RANGE else ('verb', self.num_verbs)
      )
      error = UserError(
        f'{self.where}: record {media_id.numpy().decode("utf-8", "replace")} has {kind} class '
        f'{value}, config data.num_{kind}s={limit} (tagged with another taxonomy?; config '
        'data.on_bad_input=fatal)'
      )
      # The first one is told: prefetching may read on past it before __next__ raises it.
      self._stop = self._stop or error
      raise error
    with self._rejected_lock:
      self._rejected.append((int(index), REJECT_REASONS[reason]))
    return False

  def _count_rejected(self) -> None:
    """Moves the rejected elements before the position from skipped_records to their reasons."""
    with self._rejected_lock:
      consumed = [reason for index, reason in self._rejected if index < self._position]
      self._rejected = [(i, r) for i, r in self._rejected if i >= self._position]
    for reason in consumed:
      self.counts[reason] += 1
    self._rejected_since_start += len(consumed)
    self.counts['skipped_records'] -= self._rejected_since_start

  def _select(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    """The (index, record) elements to process: all of them (a subclass may drop some)."""
    return ds

  def _batch(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds.batch(self.local_batch_size, drop_remainder=self.train)

  def _tokenize(self, batch):
    """text (and neg_text): [B, K] caption strings ('' for none) → [B, K, max_words] ids (all 0
    for '')."""
    out = dict(batch)
    for key in ('text', 'neg_text'):
      if key in batch:
        shape = tf.shape(batch[key])
        ids = self.tokenizer.tf_encode(tf.reshape(batch[key], [-1]), self.cfg.max_words)
        out[key] = tf.reshape(ids, [shape[0], shape[1], self.cfg.max_words])
    return out

  def close(self) -> None:
    """Releases the tf.data iterator (and its reader) while Python is still alive."""
    self._iterator = None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._seen, self._start, self._records_read = 0, self._position, 0
      self._passed.assign(0)
      self._progress, self._stop = (0, self._position), None
      with self._rejected_lock:
        self._rejected = []
      self._rejected_since_start = 0
      self._iterator = self._dataset().as_numpy_iterator()
    try:
      batch = next(self._iterator)
    except StopIteration:
      if self.train or self._start == self._seen == 0:
        # The endless training stream gave up (_hopeless), or a whole evaluation pass gave nothing.
        self._iterator = None
        raise self._no_usable_record() from None
      # A finite (evaluation) stream is over: whatever was read and not emitted was dropped.
      self.counts['skipped_records'] = self._records_read - self._start - self._seen
      self._position = self._records_read
      self._count_rejected()
      raise
    except tf.errors.OpError:
      if self._stop is not None:  # raised on a tf.data thread: the message is ours, one line
        raise self._stop from None
      raise
    index = batch.pop('_index')
    self._seen += len(index)
    self._position = max(self._position, int(index.max()) + 1)
    # Elements consumed but not emitted were dropped: unreadable, undecodable or without frames.
    self.counts['skipped_records'] = self._position - self._start - self._seen
    self._count_rejected()
    for key in ('_reject', '_reject_value', '_media_id'):
      batch.pop(key, None)
    self.counts['audio_incomplete'] += int(batch.pop('_audio_incomplete').sum())
    self.counts['audio_rate_mismatch'] += int(batch.pop('_audio_rate_mismatch').sum())
    self.counts['empty_captions'] += int(batch.pop('_empty_captions').sum())
    return batch

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
