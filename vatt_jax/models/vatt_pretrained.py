"""A pretrained VATT (or classifier) parameter tree adapted to the model it is loaded into: position
tables resized for another input size (fine-tuning at 320², another clip or waveform length), and
the common-space head's parts of modalities the model was built without dropped
(`VattModel.load_pretrained`, `ClassifierModel.load_pretrained`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vatt_jax.models.tokenizers import interpolate_positions

# Where each tower's learned position tables are, in VATT's and the classifier's parameter trees.
POSITION_TABLES = {
  'video_tower': ('temporal_position', 'horizontal_position', 'vertical_position'),
  'audio_tower': ('position',),
}


def resize_positions(
  params: dict, *, video_grid: Sequence[int] | None = None, audio_patches: int | None = None
) -> dict:
  """A copy of a VATT (or classifier) parameter tree whose position tables fit another input size.

  video_grid: the new (t, h, w) patch grid (e.g. (8, 20, 20) for 32 × 320² with 4×16×16 patches);
  audio_patches: the new number of waveform patches. Tables are resized with
  `interpolate_positions`; everything else is shared, not copied.
  """
  params = dict(params)
  new = {
    'video_tower': video_grid,
    'audio_tower': None if audio_patches is None else [audio_patches],
  }
  if video_grid is not None and len(video_grid) != 3:
    raise ValueError(f'video_grid must be (t, h, w), got {video_grid!r}')
  for tower, lengths in new.items():
    if lengths is None:
      continue
    tokenizer = dict(params[tower]['tokenizer'])
    for name, length in zip(POSITION_TABLES[tower], lengths, strict=True):
      tokenizer[name] = interpolate_positions(tokenizer[name], int(length))
    params[tower] = {**params[tower], 'tokenizer': tokenizer}
  return params


def head_of_built_modalities(pretrained: dict, params: dict) -> dict:
  """`pretrained` without the common-space head's parts for a modality this model has none of.

  A model built for fewer modalities (Norton post-training reads video and text only) has no head
  projections for the others: flax creates only what init calls. Those parts of a pretraining
  checkpoint are not another architecture of the head, only unused; anything else of the head
  still has to match (contract.load_by_name)."""
  head, have = pretrained.get('head'), params.get('head', {})
  if not head or not have:
    return pretrained
  unbuilt = [m for m in ('video', 'audio', 'text') if not any(k.startswith(f'{m}_') for k in have)]
  kept = {k: v for k, v in head.items() if not any(k.startswith(f'{m}_') for m in unbuilt)}
  return {**pretrained, 'head': kept}


def adapt_positions(pretrained: dict, params: dict) -> tuple[dict, dict]:
  """contract.load_by_name's `adapt`: the pretrained position tables resized (cubically) to the
  shapes `params` has, where the patch grid changed (fine-tuning at 320², another clip length or
  waveform length). Returns (pretrained, {path: (old shape, new shape)})."""

  def shape(tree, tower, table):
    leaf = tree.get(tower, {}).get('tokenizer', {}).get(table)
    return None if leaf is None else tuple(np.shape(leaf))

  resized, lengths = {}, {}
  for tower, tables in POSITION_TABLES.items():
    for table in tables:
      new, old = shape(params, tower, table), shape(pretrained, tower, table)
      if new is not None and old is not None and new != old:
        resized[f'{tower}/tokenizer/{table}'] = (old, new)
        lengths[tower] = [shape(params, tower, t)[0] for t in tables]
  if lengths:
    pretrained = resize_positions(
      pretrained,
      video_grid=lengths.get('video_tower'),
      audio_patches=lengths['audio_tower'][0] if 'audio_tower' in lengths else None,
    )
  return pretrained, resized
