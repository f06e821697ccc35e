"""Input pipelines: `build(config.data, split, ...)` → an iterator of numpy batch dicts.

Batch layout (per host): video [B, T, H, W, 3] f32 in [-1, 1], audio [B, S] f32, text [B, K, W]
int32, video_mask / audio_mask / text_mask [B], plus task fields (label, …). The iterator has
get_state() / set_state() so its position can be checkpointed. Shards with data.long_video.clips > 0
give long-video batches instead (long_video.py: V videos × C caption-anchored clips, flat rows).
"""

from __future__ import annotations

import ml_collections

from data_pipelines import synthetic


def _shards(cfg, *args, **kwargs):
  # TensorFlow loads only when shards are read.
  if (cfg.get('long_video') or {}).get('clips', 0) > 0:  # V videos × C clips (Norton)
    from data_pipelines import long_video

    return long_video.LongVideoSource(cfg, *args, **kwargs)
  from data_pipelines import pretrain

  return pretrain.ShardSource(cfg, *args, **kwargs)


def _tfds(*args, **kwargs):
  from data_pipelines import classification

  return classification.TfdsSource(*args, **kwargs)


# One dict per kind: config.data.name → source.
SOURCES = {'synthetic': synthetic.SyntheticSource, 'shards': _shards, 'tfds': _tfds}


def build(
  cfg: ml_collections.ConfigDict,
  split: str,
  *,
  batch_size: int,
  seed: int = 0,
  process_index: int = 0,
  process_count: int = 1,
):
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
