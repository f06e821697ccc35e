"""Frame sampling and VATT's video augmentation, in TensorFlow ops (CPU only).

Training: one random resized crop (area [0.08, 1], aspect [0.5, 2]) for every frame of the clip, one
horizontal flip coin (`flip=False`, config data.random_flip=False: none, for tasks whose labels
say left or right), one set of colour jitters (brightness 32/255, saturation 0.4, contrast 0.4,
hue 0.2), clip to [0, 1], scale to [-1, 1]. Evaluation: the central square, resized; with
`eval_crops` = n > 1, n squares of the short side spaced evenly along the long side (first, …,
last; 3 = the left/centre/right crops of SlowFast and VATT's 3-crop test), each resized. All
randomness is stateless, from a per-example seed, so deterministic mode replays exactly.
"""

from __future__ import annotations

import tensorflow as tf


def clip_starts(
  duration: tf.Tensor, clip_seconds: float, seed: tf.Tensor, *, train: bool, eval_clips: int
) -> tf.Tensor:
  """Start times (s) of the clips taken from a video: one at random in training, `eval_clips`
  uniformly spaced over the whole video in evaluation."""
  latest = tf.maximum(tf.cast(duration, tf.float32) - clip_seconds, 0.0)
  if train:
    return tf.random.stateless_uniform([1], seed) * latest
  return tf.linspace(0.0, 1.0, eval_clips) * latest


def frame_indices(
  start_time: tf.Tensor, stored_fps: tf.Tensor, num_stored: tf.Tensor, num_frames: int, fps: float
) -> tf.Tensor:
  """Indices of the stored frames shown at start_time + k / fps, k < num_frames.

  Resamples from whatever rate was stored; past the end the last frame repeats.
  """
  times = start_time + tf.range(num_frames, dtype=tf.float32) / fps
  index = tf.cast(tf.floor(times * stored_fps + 1e-3), tf.int32)
  return tf.clip_by_value(index, 0, tf.cast(num_stored, tf.int32) - 1)


# The paper's random resized crop (appendix A.2.1); configs may narrow it (data.crop_area_range).
AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (0.5, 2.0)


def _crop_window(
  shape: tf.Tensor, seed: tf.Tensor, train: bool, area_range=AREA_RANGE, aspect_range=ASPECT_RANGE
) -> tf.Tensor:
  """[y, x, h, w] of the crop of a frame of `shape` ([H, W, C]), chosen once per clip."""
  if train:
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed,
      min_object_covered=0.0,
      area_range=area_range,
      aspect_ratio_range=aspect_range,
      max_attempts=50,
      use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])
  return eval_windows(shape, 1)[0]


def eval_crops(cfg) -> int:
  """config.data.eval_crops (default 1), checked."""
  crops = int(cfg.get('eval_crops', 1))
  if crops < 1:
    raise ValueError(f'config data.eval_crops must be >= 1, got {crops}')
  return crops


def eval_windows(shape: tf.Tensor, crops: int) -> tf.Tensor:
  """[crops, 4] windows [y, x, h, w] of a frame of `shape` ([H, W, C]) for evaluation.

  Each is the square of the short side; along the long side crop i of n starts at
  round(i · (long − short) / (n − 1)): the first, evenly spaced ones, the last. One crop is the
  central square ((long − short) // 2). Resizing the square to S is the same as resizing the short
  side to S and cropping S × S, the SlowFast / VATT recipe.
  """
  if crops < 1:
    raise ValueError(f'config data.eval_crops must be >= 1, got {crops}')
  height, width = shape[0], shape[1]
  side = tf.minimum(height, width)
  if crops == 1:
    offsets = tf.reshape((tf.maximum(height, width) - side) // 2, [1])
  else:
    spare = tf.cast(tf.maximum(height, width) - side, tf.float32)
    offsets = tf.cast(tf.round(tf.linspace(0.0, 1.0, crops) * spare), tf.int32)
  zeros = tf.zeros_like(offsets)
  tall = height > width
  ys = tf.where(tall, offsets, zeros)
  xs = tf.where(tall, zeros, offsets)
  sides = tf.fill(tf.shape(offsets), side)
  return tf.stack([ys, xs, sides, sides], axis=1)


def _finish(frames: tf.Tensor, size: int, seed: tf.Tensor, train: bool, flip: bool) -> tf.Tensor:
  """Cropped uint8 frames [T, h, w, 3] → resized, flipped (train and `flip`) and jittered (train),
  in [-1, 1]."""
  # Bilinear without antialiasing, as the official VATT/DMVR code resizes (and 1.7× faster here).
  frames = tf.image.resize(frames, (size, size), method='bilinear') / 255.0
  if train:
    # Five seeds whether or not there is a coin: without it the jitter draws stay the same.
    seeds = tf.random.experimental.stateless_split(seed, 5)
    if flip:
      # One coin per clip: tf.image's random flip on [T, H, W, C] would flip each frame on its own.
      heads = tf.random.stateless_uniform([], seeds[0]) < 0.5
      frames = tf.cond(heads, lambda: tf.reverse(frames, axis=[2]), lambda: frames)
    # On a [T, H, W, C] tensor each of these draws one factor for the whole clip.
    frames = tf.image.stateless_random_brightness(frames, 32.0 / 255.0, seeds[1])
    frames = tf.image.stateless_random_saturation(frames, 0.6, 1.4, seeds[2])
    frames = tf.image.stateless_random_contrast(frames, 0.6, 1.4, seeds[3])
    frames = tf.image.stateless_random_hue(frames, 0.2, seeds[4])
  frames = tf.clip_by_value(frames, 0.0, 1.0)
  return frames * 2.0 - 1.0


def decode_clip(
  jpegs: tf.Tensor,
  size: int,
  seed: tf.Tensor,
  *,
  train: bool,
  area_range=AREA_RANGE,
  aspect_range=ASPECT_RANGE,
  window: tf.Tensor | None = None,
  flip: bool = True,
) -> tf.Tensor:
  """Decodes [T] JPEG frames into a [T, size, size, 3] float32 clip in [-1, 1].

  Only the crop window is decoded (decode_and_crop_jpeg), the same window for every frame: the
  given `window` [y, x, h, w] (one of `eval_windows`), else a random one (train) or the centre.
  `flip` (train only): the horizontal flip coin; False never mirrors a clip (data.random_flip).
  """
  if window is None:
    window = _crop_window(
      tf.image.extract_jpeg_shape(jpegs[0]), seed, train, area_range, aspect_range
    )
  frames = tf.map_fn(
    lambda jpeg: tf.image.decode_and_crop_jpeg(jpeg, window, channels=3),
    jpegs,
    fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
  )
  return _finish(frames, size, seed, train, flip)


def crop_clip(
  frames: tf.Tensor,
  size: int,
  seed: tf.Tensor,
  *,
  train: bool,
  area_range=AREA_RANGE,
  aspect_range=ASPECT_RANGE,
  window: tf.Tensor | None = None,
  flip: bool = True,
) -> tf.Tensor:
  """The same as decode_clip for already decoded uint8 frames [T, H, W, 3] (e.g. from TFDS)."""
  if window is None:
    window = _crop_window(tf.shape(frames)[1:], seed, train, area_range, aspect_range)
  frames = frames[:, window[0] : window[0] + window[2], window[1] : window[1] + window[3]]
  return _finish(frames, size, seed, train, flip)
