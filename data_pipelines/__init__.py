"""Input pipelines: `build(config.data, split, ...)` → a `Source` of numpy batch dicts.

Batch layout (per host): video [B, T, H, W, 3] f32 in [-1, 1], audio [B, S] f32, text [B, K, W]
int32, video_mask / audio_mask / text_mask [B], plus task fields (label, …). Shards with
data.long_video.clips > 0 give long-video batches instead (long_video.py: V videos × C
caption-anchored clips, flat rows).

Every source (every entry of `SOURCES`) speaks one protocol, `Source`:

  iter(source) is source          next(source) → dict[str, np.ndarray], the next batch
  source.get_state() → dict       its position, JSON-serialisable (stored with each checkpoint)
  source.set_state(state)         the next batch is the one that followed that position
  source.close()                  releases readers and threads; a later next() may start again

A state is the source's own: synthetic {'step': batches}, shards {'position': stream elements},
tfds {'batches': batches}. Restoring it on a fresh source of the same config (and seed, split,
batch size and host count) continues the same stream, bit for bit where the source is
deterministic (synthetic always; shards and tfds with data.deterministic=True, the default).

A source that can never yield a batch (no shard or example, no usable record, shards at another
sample rate or format than the config) raises vatt_jax.cli.UserError, one line naming the split and
why, when built or at its first next(): it never waits without end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import ml_collections
import numpy as np

from data_pipelines import synthetic


@runtime_checkable
class Source(Protocol):
  """An iterator of numpy batch dicts with a checkpointable position; see the module docstring."""

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...

  def __next__(self) -> dict[str, np.ndarray]: ...

  def get_state(self) -> dict:
    """The position after the last batch yielded, as a JSON-serialisable dict."""
    ...

  def set_state(self, state: dict) -> None:
    """Moves to `state` (from get_state of a source of the same config): next() then yields the
    batch that followed it."""
    ...

  def close(self) -> None:
    """Releases the source's readers; safe to call more than once."""
    ...


def _shards(cfg, *args, **kwargs) -> Source:
  # TensorFlow loads only when shards are read.
  if (cfg.get('long_video') or {}).get('clips', 0) > 0:  # V videos × C clips (Norton)
    from data_pipelines import long_video

    return long_video.LongVideoSource(cfg, *args, **kwargs)
  from data_pipelines import pretrain

  return pretrain.ShardSource(cfg, *args, **kwargs)


def _tfds(*args, **kwargs) -> Source:
  from data_pipelines import classification

  return classification.TfdsSource(*args, **kwargs)


# One dict per kind: config.data.name → a callable (cfg, split, *, batch_size, seed, process_index,
# process_count) → Source.
SOURCES = {'synthetic': synthetic.SyntheticSource, 'shards': _shards, 'tfds': _tfds}


def build(
  cfg: ml_collections.ConfigDict,
  split: str,
  *,
  batch_size: int,
  seed: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Source:
  """Builds this host's share (batch_size / process_count) of the global batch stream."""
  if cfg.name not in SOURCES:
    raise ValueError(f'config data.name {cfg.name!r} is not one of {sorted(SOURCES)}')
  if batch_size % process_count:
    raise ValueError(f'global batch_size {batch_size} does not divide over {process_count} hosts')
  return SOURCES[cfg.name](
    cfg,
    split,
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
  )
