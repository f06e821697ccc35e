"""Captions: choosing a clip's narrations by timestamp, and tokenization (a sentencepiece model or
a DMVR word vocabulary, one Tokenizer for both)."""

from __future__ import annotations

import os
import re
import string
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


SENTENCEPIECE, WORDS = 'sentencepiece', 'words'  # Tokenizer.kind

# A DMVR word vocabulary (dmvr.tokenizers.WordTokenizer, the official VATT text path): a UTF-8 text
# file, one 'word' (its id is the line index, from 0) or 'id word' per line; words lower case and
# unique, ids unique, and the four basic tokens present. The models mask id 0, so '<pad>' must be 0.
BASIC_WORDS = ('<pad>', '<bos>', '<eos>', '<unk>')
# Encoding as DMVR's TF path (string_tensor_to_indices, with VATT's prepend_bos=append_eos=False):
# ASCII punctuation removed (RE2 [[:punct:]]), ASCII letters lower-cased (tf.strings.lower), split
# on Unicode White_Space (tensorflow_text.WhitespaceTokenizer: ICU u_isUWhiteSpace), unknown words
# → '<unk>', truncated or padded with '<pad>'.
_NORMALIZE = str.maketrans(
  {
    **{c: None for c in string.punctuation},
    **dict(zip(string.ascii_uppercase, string.ascii_lowercase, strict=True)),
  }
)
_WHITE_SPACE = '\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000'
_SPLIT = re.compile(f'[{_WHITE_SPACE}]+')
# Bytes no text file holds (C0 controls other than \t \n \v \f \r, and DEL). Every sentencepiece
# model has them (its protobuf field tags, e.g. 0x15 before each piece's score).
_BINARY = re.compile(rb'[\x00-\x08\x0e-\x1f\x7f]')


def tokenizer_kind(path: str) -> str:
  """SENTENCEPIECE or WORDS, by content (the workdir's copy is always named tokenizer.model): a
  file with no control byte but whitespace is text, hence a word vocabulary; anything else is
  taken for a sentencepiece model."""
  with open(path, 'rb') as f:
    data = f.read()
  return SENTENCEPIECE if _BINARY.search(data) else WORDS


def read_word_vocabulary(path: str) -> dict[str, int]:
  """A DMVR word vocabulary file → {word: id}. Raises ValueError naming the file and line for a
  malformed line, a duplicate word or id, an upper-case word, text that is not UTF-8, missing basic
  tokens or a '<pad>' id other than 0. Blank lines are skipped (they still count as a line index)."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    text = data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = data[: e.start].count(b'\n') + 1
    raise ValueError(
      f'{path}, line {line}: not UTF-8 (byte {data[e.start]:#04x}); a word vocabulary is UTF-8 text'
    ) from None
  lines = text.split('\n')
  if lines and lines[-1] == '':
    lines.pop()  # (the newline that ends the last line)
  word_to_id: dict[str, int] = {}
  id_lines: dict[int, int] = {}
  word_lines: dict[str, int] = {}
  for index, raw in enumerate(lines):
    line, where = raw.strip(), f'{path}, line {index + 1}'
    if not line:
      continue
    parts = line.split(' ')
    if len(parts) not in (1, 2) or any(_SPLIT.search(p) for p in parts):
      raise ValueError(f"{where}: {raw!r} is neither 'word' nor 'id word' (one space between)")
    if len(parts) == 2:
      if not (parts[0].isascii() and parts[0].isdigit()):
        raise ValueError(f'{where}: id {parts[0]!r} is not a non-negative integer')
      token_id, word = int(parts[0]), parts[1]
    else:
      token_id, word = index, parts[0]
    if word != word.lower():
      raise ValueError(f'{where}: word {word!r} is not lower case')
    if token_id in id_lines:
      raise ValueError(f'{where}: id {token_id} is already the id of line {id_lines[token_id]}')
    if word in word_lines:
      raise ValueError(f'{where}: word {word!r} is already on line {word_lines[word]}')
    id_lines[token_id], word_lines[word] = index + 1, index + 1
    word_to_id[word] = token_id
  missing = [w for w in BASIC_WORDS if w not in word_to_id]
  if missing:
    raise ValueError(
      f'{path}: the word vocabulary lacks the basic tokens {", ".join(missing)} '
      f'(it needs all of {", ".join(BASIC_WORDS)})'
    )
  if word_to_id['<pad>'] != PAD_ID:
    raise ValueError(
      f"{path}, line {word_lines['<pad>']}: '<pad>' has id {word_to_id['<pad>']}, the models "
      f'expect {PAD_ID} (they mask id {PAD_ID})'
    )
  return word_to_id


def split_words(text: str) -> list[str]:
  """A caption's words as DMVR's WordTokenizer finds them (see _NORMALIZE and _SPLIT)."""
  return [w for w in _SPLIT.split(text.translate(_NORMALIZE)) if w]


class Tokenizer:
  """The run's tokenizer, detected by content (tokenizer_kind): a sentencepiece model, or a DMVR
  word vocabulary (the official VATT text path). Id 0 is padding. Encodes to fixed-length int32
  rows.

  Attributes: model_path (the file), kind (SENTENCEPIECE or WORDS), vocab_size (largest id + 1).
  """

  def __init__(self, model_path: str):
    if not os.path.exists(model_path):
      raise FileNotFoundError(
        f'tokenizer {model_path!r} not found (config data.tokenizer): a sentencepiece model (make '
        'one with scripts/train_tokenizer.py) or a word vocabulary'
      )
    self.model_path = model_path
    self.kind = tokenizer_kind(model_path)
    if self.kind == WORDS:
      self._sp = None
      self._word_to_id = read_word_vocabulary(model_path)
      self._id_to_word = {i: w for w, i in self._word_to_id.items()}
      self._unk = self._word_to_id['<unk>']
      self._stop = {self._word_to_id['<pad>'], self._word_to_id['<eos>']}
      self._size = max(self._id_to_word) + 1
      return
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    if self._sp.pad_id() != PAD_ID:
      raise ValueError(f'{model_path}: pad_id is {self._sp.pad_id()}, the models expect {PAD_ID}')

  @property
  def vocab_size(self) -> int:
    return self._size if self._sp is None else self._sp.get_piece_size()

  def encode(self, texts: Iterable[str | bytes], length: int) -> np.ndarray:
    """[N] strings → [N, length] int32 ids, truncated or padded with 0."""
    texts = [t.decode('utf-8', 'replace') if isinstance(t, bytes) else t for t in texts]
    out = np.zeros((len(texts), length), np.int32)
    if self._sp is None:
      rows = ([self._word_to_id.get(w, self._unk) for w in split_words(t)] for t in texts)
    else:
      rows = self._sp.encode(texts)
    for i, ids in enumerate(rows):
      ids = ids[:length]
      out[i, : len(ids)] = ids
    return out

  def decode(self, ids: np.ndarray) -> list[str]:
    """[N, W] ids → N strings. A word vocabulary's row ends at its first '<pad>' or '<eos>' (as
    DMVR's indices_to_string); an id without a word reads '<unk>'."""
    if self._sp is None:
      out = []
      for row in np.atleast_2d(ids):
        words = []
        for i in row:
          if int(i) in self._stop:
            break
          words.append(self._id_to_word.get(int(i), '<unk>'))
        out.append(' '.join(words))
      return out
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
