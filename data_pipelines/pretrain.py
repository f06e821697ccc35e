"""The pretraining pipeline over record shards: clips of frames, synced audio, 5 narrations.

  shards (per host) ─▶ round-robin reader ─▶ shuffle ─▶ enumerate ─▶ parse + sample + augment
        ─▶ drop/mask bad input (counted) ─▶ batch ─▶ prefetch ─▶ numpy dicts

Training samples one random clip per record; evaluation takes `eval_clips` uniformly spaced clips
per record, each in `eval_crops` crops (1: the central square; 3: left/centre/right), so a video
batch holds eval_clips × eval_crops views per record, clip-major. Every random choice is a stateless
function of (seed, element index), so in deterministic mode the same config gives the same batches,
and a restored position (`set_state`) replays the stream from exactly where it stopped.

Fine-tuning options (config.data): `modalities` (default all three) limits what is decoded and
emitted (a video classifier needs no audio, text or tokenizer); `multi_label` with `num_classes`
turns each record's label list into a multi-hot float32 [num_classes] "label" (otherwise the first
label, or −1); `split_folders` maps a split name to its folder under `path` (e.g. train →
segments_train).
"""

from __future__ import annotations

import atexit
import collections
import glob
import os
import struct
import weakref

import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from data_pipelines import audio as audio_ops
from data_pipelines import labels as labels_ops
from data_pipelines import options, schema
from data_pipelines import text as text_ops
from data_pipelines import video as video_ops

tf.config.set_visible_devices([], 'GPU')  # TensorFlow never takes an accelerator from JAX

MODALITIES = ('video', 'audio', 'text')


def shard_files(path: str, split: str, process_index: int, process_count: int) -> list[str]:
  """This host's shards: every process_count-th file of `{path}/{split}/*.tfrecord`."""
  if not path:
    raise ValueError(
      'config data.path is empty: set --config.data.path=DIR, a folder of {split}/*.tfrecord '
      'shards made by scripts/prepare_data.py'
    )
  pattern = os.path.join(path, split, '*.tfrecord')
  files = sorted(glob.glob(pattern))
  if not files:
    raise FileNotFoundError(f'no shards match {pattern} (config data.path, split {split!r})')
  mine = files[process_index::process_count]
  if not mine:
    raise ValueError(f'{len(files)} shards under {pattern} cannot feed {process_count} hosts')
  return mine


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
  video_mask / audio_mask / text_mask [B] f32, label [B] int32 (-1: none) or [B, C] f32 multi-hot.
  Eval adds a view axis: video [B, k·c, T, S, S, 3] (k clips × c crops, clip-major), audio
  [B, k, N], and media_id [B] bytes. Only the fields of config data.modalities are present.
  `counts` holds what was skipped or masked, by reason.
  """

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
    self.multi_label, self.num_classes = labels_ops.options(cfg)
    self.cfg, self.split, self.seed = cfg, split, seed
    self.train = split == 'train'
    self.local_batch_size = batch_size // process_count
    folder = dict(cfg.get('split_folders', {})).get(split, split)
    self.files = shard_files(cfg.path, folder, process_index, process_count)
    self.tokenizer = None
    if 'text' in self.modalities:
      self._load_tokenizer()
    self._check_format()
    self.counts = collections.Counter()
    self._position = 0  # stream elements consumed (emitted or dropped)
    self._records_read = 0
    self._bad_shards = set()
    self._iterator = None
    _OPEN_SOURCES.add(self)

  def _load_tokenizer(self) -> None:
    cfg = self.cfg
    self.tokenizer = text_ops.Tokenizer(options.tokenizer_path(cfg))
    if self.tokenizer.vocab_size > cfg.vocab_size:
      raise ValueError(
        f'tokenizer {self.tokenizer.model_path} has {self.tokenizer.vocab_size} pieces, more than the '
        f'model vocabulary (config model.text.vocab_size={cfg.vocab_size})'
      )

  def _check_format(self) -> None:
    """Fails now on shards of another format or version: a stream that skipped every record would
    otherwise wait forever for its first batch. Looks at the first record of a few shards."""
    errors = []
    for path in self.files[:4]:
      try:
        for record in tf.data.TFRecordDataset(path).take(1):
          version = int(schema.parse(record)['version'])
          if version != schema.SCHEMA_VERSION:
            raise ValueError(
              f'{path} holds records of format version {version}; this vatt-jax reads version '
              f'{schema.SCHEMA_VERSION}: convert the media again with scripts/prepare_data.py'
            )
          return
      except tf.errors.OpError as e:  # unreadable or not our records; a damaged shard may follow
        errors.append(f'{path}: {e.message.strip()[:200]}')
    if errors:
      raise ValueError(
        'no readable vatt-jax record at the start of the first shards (made by another tool, or a '
        'format older than version ' + str(schema.SCHEMA_VERSION) + '? scripts/prepare_data.py '
        'makes them): ' + '; '.join(errors)
      )

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
    self._records_read += read
    complete, cut = framing(path)
    if cut is not None:
      self._bad_shard(path, f'truncated at byte {cut}; the {read} complete records were read')
    elif read < complete:
      self._bad_shard(
        path, f'corrupted record {read} of {complete}; the {read} before it were read'
      )
    return False

  def _bad_shard(self, path: str, what: str) -> None:
    if path not in self._bad_shards:  # once per shard, not once per epoch
      self._bad_shards.add(path)
      logging.warning('shard %s: %s', path, what)
    self.counts['corrupt_shards'] = len(self._bad_shards)
    if self.cfg.on_bad_input == 'fatal':
      raise ValueError(f'corrupted shard {path}: {what} (config data.on_bad_input=fatal)')

  def _process(self, index, serialized):
    cfg = self.cfg
    ex = schema.parse(serialized)
    seed = tf.stack([tf.cast(self.seed, tf.int64), index])
    seeds = tf.random.experimental.stateless_split(seed, 3)
    clip_seconds = self.clip_seconds
    starts = video_ops.clip_starts(
      ex['duration'], clip_seconds, seeds[0], train=self.train, eval_clips=cfg.eval_clips
    )
    out = {
      'label': self._label(ex['labels']),
      '_index': index,
      '_audio_incomplete': tf.constant(False),
      '_audio_rate_mismatch': tf.constant(False),
      '_empty_captions': tf.constant(0, tf.int32),
    }
    if 'video' in self.modalities:
      out['video'] = self._video(ex, starts, seeds[1])
      out['video_mask'] = tf.ones([], tf.float32)  # records without frames were dropped
    if 'audio' in self.modalities:
      out.update(self._audio(ex, starts))
    if 'text' in self.modalities:
      out.update(self._text(ex, starts, clip_seconds))
    if not self.train:
      out['media_id'] = ex['media_id']
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
    with the training augmentation drawn from `seed` (train) or the central square (eval)."""
    cfg = self.cfg
    num_stored = tf.shape(ex['frames'])[0]
    index = video_ops.frame_indices(start, ex['frame_rate'], num_stored, cfg.num_frames, cfg.fps)
    return video_ops.decode_clip(
      tf.gather(ex['frames'], index), cfg.frame_size, seed, train=self.train, window=window,
      area_range=cfg.crop_area_range, aspect_range=cfg.crop_aspect_range,
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
    cfg = self.cfg
    nonempty = tf.strings.length(tf.strings.strip(ex['captions'])) > 0
    captions = tf.boolean_mask(ex['captions'], nonempty)
    cap_start = tf.boolean_mask(ex['caption_start'], nonempty)
    cap_end = tf.boolean_mask(ex['caption_end'], nonempty)
    has_text = tf.size(captions) > 0
    captions, cap_start, cap_end = tf.cond(
      has_text,
      lambda: (captions, cap_start, cap_end),
      lambda: (tf.constant(['']), tf.constant([0.0]), tf.constant([0.0])),
    )
    centre = starts[tf.shape(starts)[0] // 2]
    chosen = text_ops.narration_indices(
      cap_start, cap_end, centre, centre + clip_seconds, cfg.num_narrations
    )
    return {
      # Strings now, ids after batching: one tokenizer call per batch, not one per example.
      'text': tf.where(has_text, tf.gather(captions, chosen), ''),
      'text_mask': tf.cast(has_text, tf.float32),
      '_empty_captions': tf.reduce_sum(tf.cast(~nonempty, tf.int32)),
    }

  def _dataset(self) -> tf.data.Dataset:
    cfg = self.cfg
    ds = self._records()
    if self.train:
      ds = ds.shuffle(cfg.shuffle_buffer, seed=self.seed)
    ds = self._select(ds.enumerate().skip(self._position))
    ds = ds.map(self._process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=cfg.deterministic)
    if cfg.on_bad_input == 'skip':
      ds = ds.ignore_errors()  # undecodable records/frames: dropped here, counted by index gaps
    ds = self._batch(ds)
    if self.tokenizer is not None:
      ds = ds.map(
        self._tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=cfg.deterministic
      )
    return ds.prefetch(tf.data.AUTOTUNE)

  def _select(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    """The (index, record) elements to process: all of them (a subclass may drop some)."""
    return ds

  def _batch(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds.batch(self.local_batch_size, drop_remainder=self.train)

  def _tokenize(self, batch):
    """text: [B, K] caption strings ('' for none) → [B, K, max_words] ids (all 0 for '')."""
    shape = tf.shape(batch['text'])
    ids = self.tokenizer.tf_encode(tf.reshape(batch['text'], [-1]), self.cfg.max_words)
    return {**batch, 'text': tf.reshape(ids, [shape[0], shape[1], self.cfg.max_words])}

  def close(self) -> None:
    """Releases the tf.data iterator (and its reader) while Python is still alive."""
    self._iterator = None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._dataset().as_numpy_iterator()
      self._seen, self._start, self._records_read = 0, self._position, 0
    try:
      batch = next(self._iterator)
    except StopIteration:
      # A finite (evaluation) stream is over: whatever was read and not emitted was dropped.
      self.counts['skipped_records'] = self._records_read - self._start - self._seen
      self._position = self._records_read
      raise
    index = batch.pop('_index')
    self._seen += len(index)
    self._position = max(self._position, int(index.max()) + 1)
    # Elements consumed but not emitted were dropped: unreadable, undecodable or without frames.
    self.counts['skipped_records'] = self._position - self._start - self._seen
    self.counts['audio_incomplete'] += int(batch.pop('_audio_incomplete').sum())
    self.counts['audio_rate_mismatch'] += int(batch.pop('_audio_rate_mismatch').sum())
    self.counts['empty_captions'] += int(batch.pop('_empty_captions').sum())
    return batch
