"""Captions: choosing a clip's narrations by timestamp, and sentencepiece tokenization."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm
import tensorflow as tf
from absl import logging

PAD_ID = 0  # the models mask id 0; sentencepiece is trained with pad_id=0 to match


def narration_indices(
  starts: tf.Tensor, ends: tf.Tensor, clip_start: tf.Tensor, clip_end: tf.Tensor, count: int
) -> tf.Tensor:
  """Indices of `count` captions for a clip: the one overlapping it most, plus its neighbours.

  Captions are taken in time order; the centre is the caption with the largest overlap with
  [clip_start, clip_end] (or, if none overlaps, the nearest by midpoint); neighbours are the
  captions just before and after it. With fewer captions than `count`, indices repeat.
  Requires at least one caption.
  """
  order = tf.argsort(starts, stable=True)
  starts, ends = tf.gather(starts, order), tf.gather(ends, order)
  overlap = tf.minimum(ends, clip_end) - tf.maximum(starts, clip_start)
  distance = tf.abs((starts + ends) / 2 - (clip_start + clip_end) / 2)
  score = tf.where(overlap > 0, overlap, -distance - 1.0)
  centre = tf.argmax(score, output_type=tf.int32)
  num = tf.shape(starts)[0]
  first = tf.clip_by_value(centre - (count - 1) // 2, 0, tf.maximum(num - count, 0))
  window = tf.minimum(first + tf.range(count), num - 1)
  return tf.gather(order, window)


class Tokenizer:
  """A sentencepiece model; id 0 is padding. Encodes to fixed-length int32 rows."""

  def __init__(self, model_path: str):
    if not os.path.exists(model_path):
      raise FileNotFoundError(
        f'sentencepiece model {model_path!r} not found (config data.tokenizer); make one with '
        'scripts/train_tokenizer.py'
      )
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    if self._sp.pad_id() != PAD_ID:
      raise ValueError(f'{model_path}: pad_id is {self._sp.pad_id()}, the models expect {PAD_ID}')

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, texts: Iterable[str | bytes], length: int) -> np.ndarray:
    """[N] strings → [N, length] int32 ids, truncated or padded with 0."""
    texts = [t.decode('utf-8', 'replace') if isinstance(t, bytes) else t for t in texts]
    out = np.zeros((len(texts), length), np.int32)
    for i, ids in enumerate(self._sp.encode(texts)):
      ids = ids[:length]
      out[i, : len(ids)] = ids
    return out

  def decode(self, ids: np.ndarray) -> list[str]:
    return [self._sp.decode([int(i) for i in row if i != PAD_ID]) for row in np.atleast_2d(ids)]

  def tf_encode(self, texts: tf.Tensor, length: int) -> tf.Tensor:
    """The same as encode, inside a tf.data map."""
    ids = tf.numpy_function(lambda t: self.encode(t, length), [texts], tf.int32, stateful=False)
    return tf.ensure_shape(ids, [None, length])


def train_tokenizer(
  texts: Iterable[str], model_prefix: str, vocab_size: int, *, model_type: str = 'unigram'
) -> str:
  """Trains a sentencepiece model (pad 0, unk 1, bos/eos off) and returns the .model path.

  vocab_size is an upper bound: a small corpus (the demo's captions) yields fewer pieces, which the
  model's larger embedding table holds fine.
  """
  with tempfile.NamedTemporaryFile('w', suffix='.txt', delete=False, encoding='utf-8') as f:
    count = 0
    for text in texts:
      text = text.strip()
      if text:
        f.write(text + '\n')
        count += 1
    corpus = f.name
  if count == 0:
    raise ValueError('no non-empty caption to train the tokenizer on')
  options = dict(
    input=corpus,
    model_prefix=model_prefix,
    model_type=model_type,
    pad_id=PAD_ID,
    unk_id=1,
    bos_id=-1,
    eos_id=-1,
    character_coverage=1.0,
    minloglevel=2,
  )
  try:
    try:
      spm.SentencePieceTrainer.train(vocab_size=vocab_size, **options)
    except RuntimeError as e:
      # A small corpus cannot fill a large vocabulary; sentencepiece names the size it can reach.
      reachable = re.search(r'Please set it to a value <= (\d+)', str(e))
      if not reachable:
        raise
      logging.warning(
        'captions support only %s pieces, not %d; training with %s',
        reachable[1],
        vocab_size,
        reachable[1],
      )
      spm.SentencePieceTrainer.train(vocab_size=int(reachable[1]), **options)
  finally:
    os.unlink(corpus)
  return model_prefix + '.model'
