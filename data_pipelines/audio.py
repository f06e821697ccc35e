"""Cutting the waveform in sync with the sampled frames."""

from __future__ import annotations

import tensorflow as tf


def cut_waveform(
  waveform: tf.Tensor, start_time: tf.Tensor, sample_rate: int, num_samples: int
) -> tuple[tf.Tensor, tf.Tensor]:
  """The num_samples samples starting at start_time seconds, scaled to [-1, 1].

  Returns (audio [num_samples] float32, complete bool): complete is False when the waveform ends
  before the clip does (the caller decides whether that is a masked or a skipped example).
  """
  start = tf.maximum(tf.cast(tf.round(start_time * sample_rate), tf.int32), 0)
  length = tf.shape(waveform)[0]
  # A clip ending within 50 ms of the track's end (rounding, container padding) is pulled back to fit;
  # a track genuinely shorter than the clip is not shifted out of sync but reported incomplete.
  overshoot = start + num_samples - length
  tolerance = max(1, sample_rate // 20)
  start = tf.where((overshoot > 0) & (overshoot <= tolerance), length - num_samples, start)
  piece = waveform[start : start + num_samples]
  complete = tf.shape(piece)[0] >= num_samples
  piece = tf.pad(piece, [[0, num_samples - tf.shape(piece)[0]]])
  return tf.clip_by_value(piece, -1.0, 1.0), complete
