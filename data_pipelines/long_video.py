"""Long-video batches (Norton's video–paragraph learning): V videos × C consecutive clips each.

  ShardSource's reader, shuffle and position ─▶ drop records with too few captions (counted)
        ─▶ clips anchored on captions ─▶ drop bad input (counted) ─▶ batch ─▶ flatten (train)

Clips are anchored on captions, as Norton samples HowTo100M: a record's non-empty captions, sorted
by start time; clip i is the num_frames / fps seconds (audio only: num_samples / sample_rate)
centred on caption i's midpoint, moved inside the video when it would start before 0 or end after
the video's duration (a video shorter than a clip starts it at 0; its last frame repeats), and its
narration is caption i. Audio is cut at the same window; a clip whose audio is missing, at another
rate or shorter than the clip is masked (audio_mask 0).

Training picks a random run of C = long_video.clips consecutive captions per record (a stateless
function of (seed, element index), so deterministic mode replays and a restored position resumes
exactly) and emits a flat batch of N = V·C rows, batch_size = N: video v's clips are rows
v·C … v·C + C − 1, in time order. The C clips of a video share one augmentation (the same random
crop, flip and colour jitter, drawn once per video): the clips differ in time only, as the frames of
one clip do. Evaluation takes every caption of a record, the first M = long_video.max_clips (the
rest are dropped and counted), decodes the central square and pads to M clips; the last, partial
batch is kept. Records with fewer than C non-empty captions (in evaluation: none) are skipped and
counted, never padded; everything else that is bad is handled as ShardSource handles it.
"""

from __future__ import annotations

import threading

import ml_collections
import numpy as np
import tensorflow as tf

from data_pipelines import audio as audio_ops
from data_pipelines import schema
from data_pipelines.pretrain import ShardSource

# Timestamps of a clip and of its caption, seconds on the record's clock.
TIMES = ('clip_start', 'clip_end', 'caption_start', 'caption_end')


def num_captions(serialized: tf.Tensor) -> tf.Tensor:
  """The number of non-empty captions of a record; parses nothing else."""
  _, sequence = tf.io.parse_single_sequence_example(
    serialized,
    sequence_features={
      schema.CAPTION: tf.io.FixedLenSequenceFeature([], tf.string, allow_missing=True)
    },
  )
  nonempty = tf.strings.length(tf.strings.strip(sequence[schema.CAPTION])) > 0
  return tf.reduce_sum(tf.cast(nonempty, tf.int32))


def clip_starts(
  caption_start: tf.Tensor, caption_end: tf.Tensor, duration: tf.Tensor, clip_seconds: float
) -> tf.Tensor:
  """[k] start times (s) of the clips centred on k captions' midpoints, kept inside the video."""
  middle = (caption_start + caption_end) / 2
  latest = tf.maximum(tf.cast(duration, tf.float32) - clip_seconds, 0.0)
  return tf.clip_by_value(middle - clip_seconds / 2, 0.0, latest)


class LongVideoSource(ShardSource):
  """Iterator of numpy batch dicts of caption-anchored clips; see the module docstring.

  Config: everything ShardSource reads, plus config.data.long_video = dict(clips=C, max_clips=M)
  (M defaults to C). Train batch (N = batch_size rows, V = N / C videos): video [N, T, S, S, 3] f32
  in [-1, 1], audio [N, S_a] f32, text [N, 1, W] int32 (each clip's own caption),
  video_mask / audio_mask / text_mask [N] f32, clip_start / clip_end / caption_start / caption_end
  [N] f32 seconds, video_index [N] int32 (0 … V − 1 within the batch), clip_index [N] int32
  (0 … C − 1). Eval batch (B = batch_size records, the last one may be smaller): video
  [B, M, T, S, S, 3], audio [B, M, S_a], text [B, M, W], the masks and timestamps [B, M] (0 on
  padding), clip_mask [B, M] f32, num_clips [B] int32, media_id [B] bytes. Only the fields of
  config data.modalities are present. `counts` adds too_few_captions (records skipped) and
  clips_truncated (captions past max_clips, dropped) to ShardSource's; audio_incomplete counts
  clips here.
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
    options = dict(cfg.get('long_video') or {})
    self.clips = options.get('clips', 0)
    self.max_clips = options.get('max_clips', self.clips)
    for name, value in (('clips', self.clips), ('max_clips', self.max_clips)):
      if not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f'config data.long_video.{name} must be an integer >= 1, got {value!r}')
    if int(cfg.get('eval_crops', 1)) != 1:
      raise ValueError(
        f'config data.eval_crops={cfg.eval_crops}: long-video evaluation decodes the central '
        'square of each clip; set it to 1'
      )
    if split == 'train' and (batch_size // process_count) % self.clips:
      raise ValueError(
        f'config batch_size {batch_size} ({batch_size // process_count} rows per host) is not a '
        f'multiple of data.long_video.clips {self.clips}: a batch holds batch_size / clips whole '
        'videos'
      )
    # A training record gives a run of C captions; an evaluation record at least one.
    self.min_captions = self.clips if split == 'train' else 1
    super().__init__(
      cfg,
      split,
      batch_size=batch_size,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
    )
    self._too_few = []  # element indices the filter dropped, not yet consumed
    self._too_few_lock = threading.Lock()
    self._too_few_since_start = 0

  # ---- the stream -------------------------------------------------------------------------
  def _select(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    """Drops the records with fewer than C (eval: 1) non-empty captions, noting their indices."""
    ds = ds.map(
      lambda index, record: (index, record, num_captions(record) >= self.min_captions),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=self.cfg.deterministic,
    )
    ds = ds.filter(
      lambda index, record, enough: tf.cond(
        enough, lambda: tf.constant(True), lambda: tf.py_function(self._drop, [index], tf.bool)
      )
    )
    return ds.map(lambda index, record, enough: (index, record))

  def _captions_needed(self) -> str:
    if self.train:
      return f'data.long_video.clips={self.clips} takes a run of {self.clips} captions per video'
    return 'long-video evaluation anchors its clips on captions'

  def _drop(self, index) -> bool:
    """Runs once per record with too few captions, as the filter reaches it; always False."""
    with self._too_few_lock:
      self._too_few.append(int(index))
    return False

  def _process(self, index, serialized):
    ex = schema.parse(serialized)
    seeds = tf.random.experimental.stateless_split(
      tf.stack([tf.cast(self.seed, tf.int64), index]), 2
    )
    nonempty = tf.strings.length(tf.strings.strip(ex['captions'])) > 0
    order = tf.argsort(tf.boolean_mask(ex['caption_start'], nonempty), stable=True)
    available = tf.shape(order)[0]
    if self.train:  # a random run of C consecutive captions (the filter kept >= C)
      first = tf.random.stateless_uniform(
        [], seeds[0], 0, available - self.clips + 1, dtype=tf.int32
      )
      order = tf.ensure_shape(order[first : first + self.clips], [self.clips])
    else:
      order = order[: self.max_clips]

    def chosen(values):
      return tf.gather(tf.boolean_mask(values, nonempty), order)

    cap_start, cap_end = chosen(ex['caption_start']), chosen(ex['caption_end'])
    starts = clip_starts(cap_start, cap_end, ex['duration'], self.clip_seconds)
    count = tf.shape(starts)[0]
    ones = tf.ones([count], tf.float32)
    out = {
      'clip_start': starts,
      'clip_end': starts + self.clip_seconds,
      'caption_start': cap_start,
      'caption_end': cap_end,
    }
    if 'video' in self.modalities:
      out['video'] = self._clips(ex, starts, seeds[1])
      out['video_mask'] = ones  # records without frames were dropped
    if 'audio' in self.modalities:
      out.update(self._audio_clips(ex, starts))
    if 'text' in self.modalities:
      # One caption per clip, K = 1; strings now, ids after batching (ShardSource._tokenize).
      out['text'] = chosen(ex['captions'])[:, None] if self.train else chosen(ex['captions'])
      out['text_mask'] = ones
    private = {  # per record, counted by __next__
      '_index': index,
      '_empty_captions': tf.reduce_sum(tf.cast(~nonempty, tf.int32)),
      # Training's run of C captions is a choice, not a loss; evaluation drops those past M.
      '_clips_truncated': tf.constant(0) if self.train else available - count,
      '_audio_incomplete': out.pop('_audio_incomplete', tf.constant(0)),
      '_audio_rate_mismatch': out.pop('_audio_rate_mismatch', tf.constant(False)),
    }
    if self.train:
      return {**out, **private}
    out = {key: self._pad(value) for key, value in out.items()}
    out['clip_mask'] = self._pad(ones)
    out['num_clips'] = count
    out['media_id'] = ex['media_id']
    return {**out, **private}

  def _pad(self, value: tf.Tensor) -> tf.Tensor:
    """[k, …] → [M, …], zeros ('' for strings) after the k clips of a record."""
    pad = [[0, self.max_clips - tf.shape(value)[0]]] + [[0, 0]] * (value.shape.rank - 1)
    padded = tf.pad(value, pad, constant_values='' if value.dtype == tf.string else 0)
    return tf.ensure_shape(padded, [self.max_clips, *value.shape[1:]])

  def _clips(self, ex, starts, seed):
    """[k, T, S, S, 3]: one clip per start, all k with the same augmentation (train)."""
    cfg = self.cfg
    # A record without frames fails here: dropped and counted as ShardSource does.
    tf.debugging.assert_greater(tf.shape(ex['frames'])[0], 0, message='record without frames')
    size = cfg.frame_size
    return tf.map_fn(
      lambda start: self._clip(ex, start, seed),
      starts,
      fn_output_signature=tf.TensorSpec([cfg.num_frames, size, size, 3], tf.float32),
    )

  def _audio_clips(self, ex, starts):
    """audio [k, S_a] and audio_mask [k] of the clips' windows; masked clips are silent."""
    cfg = self.cfg
    waves, complete = tf.map_fn(
      lambda start: audio_ops.cut_waveform_bytes(
        ex['waveform_bytes'], start, cfg.sample_rate, cfg.num_samples
      ),
      starts,
      fn_output_signature=(
        tf.TensorSpec([cfg.num_samples], tf.float32),
        tf.TensorSpec([], tf.bool),
      ),
    )
    rate_ok = tf.equal(ex['sample_rate'], cfg.sample_rate)
    has_audio = tf.equal(ex['has_audio'], 1)
    audio_ok = has_audio & rate_ok & complete
    return {
      'audio': waves * tf.cast(audio_ok, tf.float32)[:, None],
      'audio_mask': tf.cast(audio_ok, tf.float32),
      '_audio_incomplete': tf.reduce_sum(tf.cast(has_audio & rate_ok & ~complete, tf.int32)),
      '_audio_rate_mismatch': has_audio & ~rate_ok,
    }

  def _batch(self, ds: tf.data.Dataset) -> tf.data.Dataset:
    if not self.train:
      return ds.batch(self.local_batch_size)  # a finite stream: the last batch may be smaller
    ds = ds.batch(self.local_batch_size // self.clips, drop_remainder=True)
    return ds.map(self._flatten)

  def _flatten(self, batch):
    """Per-clip fields [V, C, …] → [V·C, …] rows, plus video_index and clip_index [V·C]."""
    videos = self.local_batch_size // self.clips
    out = {
      key: value if key.startswith('_') else tf.reshape(value, [-1, *value.shape[2:]])
      for key, value in batch.items()
    }
    out['video_index'] = tf.repeat(tf.range(videos, dtype=tf.int32), self.clips)
    out['clip_index'] = tf.tile(tf.range(self.clips, dtype=tf.int32), [videos])
    return out

  # ---- bookkeeping --------------------------------------------------------------------------
  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:  # a new stream (start, or set_state): forget the old one's drops
      with self._too_few_lock:
        self._too_few = []
      self._too_few_since_start = 0
    try:
      batch = super().__next__()
    except StopIteration:
      self._count_too_few()
      raise
    self._count_too_few()
    self.counts['clips_truncated'] += int(batch.pop('_clips_truncated').sum())
    return batch

  def _count_too_few(self) -> None:
    """Moves the dropped records before the position from skipped_records to too_few_captions."""
    with self._too_few_lock:
      consumed = sum(index < self._position for index in self._too_few)
      self._too_few = [index for index in self._too_few if index >= self._position]
    self._too_few_since_start += consumed
    self.counts['too_few_captions'] += consumed
    self.counts['skipped_records'] -= self._too_few_since_start
