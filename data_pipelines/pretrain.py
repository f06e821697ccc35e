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

EgoVLP / SViTT-Ego options (num_nouns, num_verbs, caption_clips, scene_negative_window):
data_pipelines/caption_clips.py.
"""

from __future__ import annotations

import atexit
import collections
import os
import threading
import weakref

import ml_collections
import numpy as np
import tensorflow as tf

from data_pipelines import audio as audio_ops
from data_pipelines import labels as labels_ops
from data_pipelines import options, schema
from data_pipelines import text as text_ops
from data_pipelines import video as video_ops
from data_pipelines.caption_clips import (
  NOUN_OUT_OF_RANGE,
  REJECT_REASONS,
  VERB_OUT_OF_RANGE,
  CaptionClips,
)
from data_pipelines.shards import ShardReader, shard_files
from vatt_jax.cli import UserError

tf.config.set_visible_devices([], 'GPU')  # TensorFlow never takes an accelerator from JAX

MODALITIES = ('video', 'audio', 'text')


# Sources still open at exit are closed while Python is alive: TensorFlow cannot finalize an iterator
# holding a py_function (the end-of-shard check) once the interpreter has begun tearing down.
_OPEN_SOURCES = weakref.WeakSet()
atexit.register(lambda: [source.close() for source in list(_OPEN_SOURCES)])


class ShardSource(ShardReader, CaptionClips):
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

  def _load_tokenizer(self) -> None:
    cfg = self.cfg
    self.tokenizer = text_ops.Tokenizer(options.tokenizer_path(cfg))
    if self.tokenizer.vocab_size > cfg.vocab_size:
      raise ValueError(
        f'tokenizer {self.tokenizer.model_path} has {self.tokenizer.vocab_size} pieces, more than the '
        f'model vocabulary (config model.text.vocab_size={cfg.vocab_size})'
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
    if self.cfg.on_bad_input == 'fatal' and reason in (NOUN_OUT_OF_RANGE, VERB_OUT_OF_RANGE):
      kind, limit = (
        ('noun', self.num_nouns) if reason == NOUN_OUT_OF_RANGE else ('verb', self.num_verbs)
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
