"""Class labels of the classification pipelines: the first label, or multi-hot (data.multi_label)."""

from __future__ import annotations

import ml_collections
import tensorflow as tf


def options(cfg: ml_collections.ConfigDict) -> tuple[bool, int]:
  """(multi_label, num_classes) of config.data; multi-label needs num_classes >= 1."""
  multi_label = bool(cfg.get('multi_label', False))
  num_classes = int(cfg.get('num_classes', 0))
  if multi_label and num_classes < 1:
    raise ValueError('config data.multi_label needs config data.num_classes >= 1')
  return multi_label, num_classes


def multi_hot(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
  """Class indices [n] (n may be 0) → float32 [num_classes]. An index past num_classes fails the
  example (skipped and counted, or fatal, by the pipeline), never dropped silently."""
  labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
  tf.debugging.assert_less(labels, num_classes, message='label >= config data.num_classes')
  hot = tf.one_hot(labels, num_classes, dtype=tf.float32)
  return tf.reduce_max(tf.concat([hot, tf.zeros([1, num_classes])], 0), axis=0)
