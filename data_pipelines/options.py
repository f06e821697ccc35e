"""Facts about config.data that more than one place reads: the frame size as (height, width),
where a run's tokenizer is (a sentencepiece model or a word vocabulary: data_pipelines.text) and
whether training clips may be mirrored. Nothing here imports TensorFlow."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

# What scripts/train_tokenizer.py writes beside the shards, and the name of a workdir's and a
# bundle's copy of the run's tokenizer whatever its kind (data_pipelines.text tells them by content).
TOKENIZER_FILENAME = 'tokenizer.model'


def frame_hw(frame_size: int | Sequence[int]) -> tuple[int, int]:
  """config frame_size (S, or (H, W)) → (H, W)."""
  if isinstance(frame_size, int):
    return frame_size, frame_size
  height, width = (int(s) for s in frame_size)
  return height, width


def tokenizer_path(data) -> str:
  """The tokenizer of a data config (a sentencepiece model or a word vocabulary): data.tokenizer,
  else {data.path}/tokenizer.model; '' when the config names neither (synthetic data). Existence is not checked."""
  path = data.get('tokenizer') or ''
  if not path and data.get('path'):
    path = os.path.join(data.path, TOKENIZER_FILENAME)
  return path


def random_flip(data) -> bool:
  """config data.random_flip (default True, VATT's augmentation): whether a training clip is
  mirrored left–right on a coin. False keeps every clip as stored, for tasks where left and right
  are the label (a caption saying "moves to the left" under a mirrored clip is a wrong label)."""
  value = data.get('random_flip', True)
  if not isinstance(value, bool):
    raise ValueError(f'config data.random_flip must be True or False, got {value!r}')
  return value


def file_sha256(path: str) -> str:
  """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()
