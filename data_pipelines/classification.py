"""Labelled clips from TFDS video, audio or image datasets, with the pretraining preprocessing.

  config.data = dict(name='tfds', tfds_name='ucf101', modality='video', stored_fps=25.0, ...)

Video datasets (ucf101, hmdb51, kinetics…) give decoded uint8 frames; audio datasets give integer or
float waveforms; image datasets (imagenet2012, …; modality 'image') give one uint8 image, which
becomes a clip of num_frames copies of the same frame (VATT's ImageNet fine-tuning feeds the video
tower "the input image replicated"). Clips are sampled at data.fps from data.stored_fps (TFDS stores
no frame rate), cropped and jittered exactly as in pretraining (random resized crop and, unless
data.random_flip=False, a flip coin for training; for evaluation `eval_clips` uniformly spaced
clips, each in `eval_crops` crops: the central square, or n squares spaced along the long side,
clip-major). With data.multi_label the label feature is a list of classes and "label" a
multi-hot float32 [num_classes]. Shards made by
scripts/prepare_data.py that carry labels are read by the shard pipeline instead
(data.name='shards'); its batches have `label` too.

The position (`get_state`) is the number of batches yielded. Every random choice is a stateless
function of (seed, element index), the file order and the shuffle are seeded, so with
data.deterministic=True the stream is a function of (seed, position) and `set_state` resumes it
bit for bit: the rebuilt stream skips position × batch elements in tf.data, before any of them
is processed. Images and video frames are read undecoded (tfds SkipDecoding) and decoded in the
pipeline's map, so the skipped ones are never decoded and a clip decodes only the frames it shows.
With data.deterministic=False the parallel map may reorder elements and a resumed stream is only
statistically the same.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import audio as audio_ops
from data_pipelines import labels as labels_ops
from data_pipelines import options
from data_pipelines import video as video_ops
from vatt_jax.cli import UserError

tf.config.set_visible_devices([], 'GPU')

MODALITIES = ('video', 'audio', 'image')


class TfdsSource:
  """Iterator of numpy batches {'video' | 'audio', 'label'}; eval batches add a view axis.

  Train: video [B, T, S, S, 3] (an image: T equal frames) or audio [B, N]; eval: video
  [B, k·c, T, S, S, 3] (k clips × c crops; an image: c crops) or audio [B, k, N]. label: int32 [B],
  or float32 [B, num_classes] multi-hot with data.multi_label.
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
    if cfg.modality not in MODALITIES:
      raise ValueError(f'config data.modality must be one of {MODALITIES}, got {cfg.modality!r}')
    self.eval_crops = video_ops.eval_crops(cfg)
    self.random_flip = options.random_flip(cfg)
    self.multi_label, self.num_classes = labels_ops.options(cfg)
    self.cfg, self.split, self.seed = cfg, split, seed
    self.train = split.startswith('train')
    self.local_batch_size = batch_size // process_count
    self._input_context = tf.distribute.InputContext(
      num_input_pipelines=process_count, input_pipeline_id=process_index
    )
    # The media feature read undecoded (decoded in _process): images and video frames.
    self._media_key = None  # audio: decoded by TFDS
    if cfg.modality == 'image':
      self._media_key = cfg.get('image_key', 'image')
    elif cfg.modality == 'video':
      self._media_key = cfg.video_key
    self._features = None  # the dataset's tfds features, known once it is loaded
    self._batches = 0  # batches yielded: the position
    self._iterator = None

  # ---- checkpointable position ------------------------------------------------------------
  def get_state(self) -> dict:
    return {'batches': self._batches}

  def set_state(self, state: dict) -> None:
    if 'batches' not in state:
      raise ValueError(
        f'input state {state} is not a TFDS position ({{"batches": n}}): the checkpoint was '
        'written by another data source (config data.name)'
      )
    self._batches = int(state['batches'])
    self._iterator = None

  def _clip_starts(self, duration, seed):
    return video_ops.clip_starts(
        duration, self.cfg.num_frames / self.cfg.fps, seed,
        train=self.train, eval_clips=self.cfg.eval_clips,
    )  # fmt: skip

  def _label(self, value):
    if not self.multi_label:
      return tf.cast(value, tf.int32)
    return labels_ops.multi_hot(value, self.num_classes)

  def _crops(self, frames, seed):
    """uint8 frames [T, H, W, 3] → a train clip [T, S, S, 3] or eval crops [c, T, S, S, 3]."""
    size = self.cfg.frame_size
    if self.train:
      return video_ops.crop_clip(
        frames, size, seed, train=True,
        area_range=tuple(self.cfg.get('crop_area_range', video_ops.AREA_RANGE)),
        aspect_range=tuple(self.cfg.get('crop_aspect_range', video_ops.ASPECT_RANGE)),
        flip=self.random_flip,
      )  # fmt: skip
    windows = video_ops.eval_windows(tf.shape(frames)[1:], self.eval_crops)
    return tf.stack(
      [
        video_ops.crop_clip(frames, size, seed, train=False, window=windows[c])
        for c in range(self.eval_crops)
      ]
    )

  def _decode(self, encoded):
    """The media feature's stored form (an encoded image, or [n] encoded frames) → uint8 pixels."""
    return self._features[self._media_key].decode_example(encoded)

  def _process(self, index, example):
    cfg = self.cfg
    seed = tf.stack([tf.cast(self.seed, tf.int64), index])
    seeds = tf.random.experimental.stateless_split(seed, 2)
    label = self._label(example[cfg.label_key])
    size = cfg.frame_size
    if cfg.modality == 'image':
      image = self._decode(example[self._media_key])
      # Crop and resize one frame, then repeat it: the same pixels as repeating first.
      views = self._crops(image[None], seeds[1])
      return {'video': tf.repeat(views, cfg.num_frames, axis=-4), 'label': label}
    if cfg.modality == 'video':
      encoded = example[self._media_key]  # [n] encoded frames
      num = tf.shape(encoded)[0]
      starts = self._clip_starts(tf.cast(num, tf.float32) / cfg.stored_fps, seeds[0])

      def clip(start):
        idx = video_ops.frame_indices(start, cfg.stored_fps, num, cfg.num_frames, cfg.fps)
        return self._crops(self._decode(tf.gather(encoded, idx)), seeds[1])

      if self.train:
        return {'video': clip(starts[0]), 'label': label}
      clips = tf.map_fn(
        clip,
        starts,
        fn_output_signature=tf.TensorSpec([self.eval_crops, cfg.num_frames, size, size, 3]),
      )
      return {'video': tf.reshape(clips, [-1, cfg.num_frames, size, size, 3]), 'label': label}
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
    """The stream from the current position: (seed, position) fix it when deterministic."""
    cfg = self.cfg
    # A seeded file shuffle: TFDS then interleaves its files deterministically too (it reads in a
    # nondeterministic order only when shuffle_files has no seed).
    read_config = tfds.ReadConfig(
      input_context=self._input_context, shuffle_seed=self.seed, interleave_cycle_length=4
    )
    decoders = {self._media_key: tfds.decode.SkipDecoding()} if self._media_key else None
    ds, info = tfds.load(
        cfg.tfds_name, split=self.split, data_dir=cfg.get('tfds_data_dir') or None,
        shuffle_files=self.train, read_config=read_config, decoders=decoders, with_info=True,
    )  # fmt: skip
    self._features = info.features
    if self.train:
      ds = ds.repeat().shuffle(cfg.shuffle_buffer, seed=self.seed)
    # Skipped elements keep their indices (their random draws) and are never decoded.
    ds = ds.enumerate().skip(self._batches * self.local_batch_size)
    ds = ds.map(self._process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=cfg.deterministic)
    ds = ds.batch(self.local_batch_size, drop_remainder=self.train)
    return ds.prefetch(tf.data.AUTOTUNE)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._dataset().as_numpy_iterator()
    try:
      batch = next(self._iterator)
    except StopIteration:
      if self.train or self._batches == 0:  # training repeats: it ends only when there is nothing
        self._iterator = None
        raise UserError(
          f'split {self.split!r} of TFDS dataset {self.cfg.tfds_name!r} gave no example '
          f'(config data.tfds_name, tfds_data_dir={self.cfg.get("tfds_data_dir") or None})'
        ) from None
      raise
    self._batches += 1
    return batch

  def close(self) -> None:
    """Releases the tf.data iterator; a later next() resumes from the same position."""
    self._iterator = None
