"""Labelled clips from TFDS video or audio datasets, with the pretraining pipeline's preprocessing.

  config.data = dict(name='tfds', tfds_name='ucf101', modality='video', stored_fps=25.0, ...)

Video datasets (ucf101, hmdb51, kinetics…) give decoded uint8 frames; audio datasets give integer or
float waveforms. Clips are sampled at data.fps from data.stored_fps (TFDS stores no frame rate),
cropped and jittered exactly as in pretraining (random resized crop for training, central crop and
`eval_clips` uniformly spaced clips for evaluation). Shards made by scripts/prepare_data.py that carry
labels are read by the shard pipeline instead (data.name='shards'); its batches have `label` too.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import audio as audio_ops
from data_pipelines import video as video_ops

tf.config.set_visible_devices([], 'GPU')


class TfdsSource:
  """Iterator of numpy batches {'video' | 'audio', 'label'}; eval batches add a clip axis.

  Train: video [B, T, S, S, 3] or audio [B, N]; eval: video [B, k, T, S, S, 3] or audio [B, k, N].
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
    if cfg.modality not in ('video', 'audio'):
      raise ValueError(f"config data.modality must be 'video' or 'audio', got {cfg.modality!r}")
    self.cfg, self.split, self.seed = cfg, split, seed
    self.train = split.startswith('train')
    self.local_batch_size = batch_size // process_count
    self._input_context = tf.distribute.InputContext(
      num_input_pipelines=process_count, input_pipeline_id=process_index
    )
    self._iterator = None

  def _clip_starts(self, duration, seed):
    return video_ops.clip_starts(
        duration, self.cfg.num_frames / self.cfg.fps, seed,
        train=self.train, eval_clips=self.cfg.eval_clips,
    )  # fmt: skip

  def _process(self, index, example):
    cfg = self.cfg
    seed = tf.stack([tf.cast(self.seed, tf.int64), index])
    seeds = tf.random.experimental.stateless_split(seed, 2)
    label = tf.cast(example[cfg.label_key], tf.int32)
    if cfg.modality == 'video':
      frames = example[cfg.video_key]
      num = tf.shape(frames)[0]
      starts = self._clip_starts(tf.cast(num, tf.float32) / cfg.stored_fps, seeds[0])

      def clip(start):
        idx = video_ops.frame_indices(start, cfg.stored_fps, num, cfg.num_frames, cfg.fps)
        return video_ops.crop_clip(
          tf.gather(frames, idx), cfg.frame_size, seeds[1], train=self.train
        )

      clips = tf.map_fn(
          clip, starts,
          fn_output_signature=tf.TensorSpec([cfg.num_frames, cfg.frame_size, cfg.frame_size, 3]),
      )  # fmt: skip
      return {'video': clips[0] if self.train else clips, 'label': label}
    wave = example[cfg.audio_key]
    if wave.dtype.is_integer:  # PCM: int16 full scale is 32768
      wave = tf.cast(wave, tf.float32) / 32768.0
    wave = tf.reshape(tf.cast(wave, tf.float32), [-1])
    starts = self._clip_starts(tf.cast(tf.shape(wave)[0], tf.float32) / cfg.sample_rate, seeds[0])
    pieces = tf.map_fn(
      lambda s: audio_ops.cut_waveform(wave, s, cfg.sample_rate, cfg.num_samples)[0],
      starts,
      fn_output_signature=tf.TensorSpec([cfg.num_samples]),
    )
    return {'audio': pieces[0] if self.train else pieces, 'label': label}

  def _dataset(self) -> tf.data.Dataset:
    cfg = self.cfg
    read_config = tfds.ReadConfig(
      input_context=self._input_context, shuffle_seed=self.seed, interleave_cycle_length=4
    )
    ds = tfds.load(
        cfg.tfds_name, split=self.split, data_dir=cfg.get('tfds_data_dir') or None,
        shuffle_files=self.train, read_config=read_config,
    )  # fmt: skip
    if self.train:
      ds = ds.repeat().shuffle(cfg.shuffle_buffer, seed=self.seed)
    ds = ds.enumerate().map(
      self._process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=cfg.deterministic
    )
    ds = ds.batch(self.local_batch_size, drop_remainder=self.train)
    return ds.prefetch(tf.data.AUTOTUNE)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._dataset().as_numpy_iterator()
    return next(self._iterator)

  def close(self) -> None:
    self._iterator = None
