"""Facts about config.data that more than one place reads: the frame size as (height, width) and
where a run's sentencepiece model is. Nothing here imports TensorFlow."""

from __future__ import annotations

import os
from collections.abc import Sequence

TOKENIZER_FILENAME = 'tokenizer.model'  # what scripts/train_tokenizer.py writes beside the shards


def frame_hw(frame_size: int | Sequence[int]) -> tuple[int, int]:
  """config frame_size (S, or (H, W)) → (H, W)."""
  if isinstance(frame_size, int):
    return frame_size, frame_size
  height, width = (int(s) for s in frame_size)
  return height, width


def tokenizer_path(data) -> str:
  """The sentencepiece model of a data config: data.tokenizer, else {data.path}/tokenizer.model;
  '' when the config names neither (synthetic data). Existence is not checked."""
  path = data.get('tokenizer') or ''
  if not path and data.get('path'):
    path = os.path.join(data.path, TOKENIZER_FILENAME)
  return path
