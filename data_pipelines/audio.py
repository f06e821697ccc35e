"""Cutting the waveform in sync with the sampled frames."""

from __future__ import annotations

import tensorflow as tf

from data_pipelines import schema


def _clip_start(length: tf.Tensor, start_time: tf.Tensor, sample_rate: int, num_samples: int):
  """First sample of the clip starting at start_time seconds in a track of `length` samples.

  A clip ending within 50 ms of the track's end (rounding, container padding) is pulled back to fit;
  a track genuinely shorter than the clip is not shifted out of sync (the caller sees it incomplete).
  """
  start = tf.maximum(tf.cast(tf.round(start_time * sample_rate), tf.int32), 0)
  overshoot = start + num_samples - length
  tolerance = max(1, sample_rate // 20)
  return tf.where((overshoot > 0) & (overshoot <= tolerance), length - num_samples, start)


def _complete(piece: tf.Tensor, num_samples: int) -> tuple[tf.Tensor, tf.Tensor]:
  complete = tf.shape(piece)[0] >= num_samples
  piece = tf.pad(piece, [[0, num_samples - tf.shape(piece)[0]]])
  return tf.clip_by_value(piece, -1.0, 1.0), complete


def cut_waveform(
  waveform: tf.Tensor, start_time: tf.Tensor, sample_rate: int, num_samples: int
) -> tuple[tf.Tensor, tf.Tensor]:
  """The num_samples samples of `waveform` [S] starting at start_time seconds, clipped to [-1, 1].

  Returns (audio [num_samples] float32, complete bool): complete is False when the waveform ends
  before the clip does (the caller decides whether that is a masked or a skipped example).
  """
  start = _clip_start(tf.shape(waveform)[0], start_time, sample_rate, num_samples)
  return _complete(waveform[start : start + num_samples], num_samples)


def cut_waveform_bytes(
  data: tf.Tensor, start_time: tf.Tensor, sample_rate: int, num_samples: int
) -> tuple[tf.Tensor, tf.Tensor]:
  """cut_waveform for a stored track (`data`: [0 or 1] strings of 16-bit PCM, as schema.parse's
  waveform_bytes): only the clip's span is decoded."""
  length = tf.cast(tf.reduce_sum(tf.strings.length(data)) // 2, tf.int32)
  start = _clip_start(length, start_time, sample_rate, num_samples)
  # substr fails on a position past the end; there the span is empty (an incomplete clip).
  span = tf.strings.substr(data, 2 * tf.minimum(start, length), 2 * num_samples)
  return _complete(schema.pcm16_to_float(span), num_samples)
