"""Objectives: `build_loss(config.loss)` returns fn(model output, batch) -> (loss, terms).

Pretraining: 'vatt' (NCE + MIL-NCE on the common-space embeddings) and 'norton' (clip–caption and
video–paragraph losses with optimal transport, on long videos); fine-tuning: 'softmax_xent' (label
smoothing) and 'sigmoid_xent' (multi-label) on a classifier's logits.
"""

from __future__ import annotations

import functools

import ml_collections

from vatt_jax.losses.classification import BALANCES, mixup, sigmoid_xent, softmax_xent
from vatt_jax.losses.contrastive import mil_nce, nce, vatt_pretraining_loss
from vatt_jax.losses.norton import (
  bucket_value,
  clip_caption_loss,
  fine_grained_similarity,
  fused_similarity,
  min_max,
  norton_loss,
  video_paragraph_loss,
)

__all__ = [
  'bucket_value',
  'build_loss',
  'clip_caption_loss',
  'fine_grained_similarity',
  'fused_similarity',
  'loss_components',
  'mil_nce',
  'min_max',
  'mixup',
  'nce',
  'norton_loss',
  'sigmoid_xent',
  'softmax_xent',
  'vatt_pretraining_loss',
  'video_paragraph_loss',
  'LOSSES',
]


def _vatt(cfg: ml_collections.ConfigDict):
  return functools.partial(
    vatt_pretraining_loss,
    temperature=cfg.temperature,
    weight_va=cfg.weight_va,
    weight_vt=cfg.weight_vt,
  )


def _softmax_xent(cfg: ml_collections.ConfigDict):
  smoothing = cfg.get('label_smoothing', 0.0)
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f'config loss.label_smoothing must be in [0, 1), got {smoothing}')
  return functools.partial(softmax_xent, label_smoothing=smoothing)


def _sigmoid_xent(cfg: ml_collections.ConfigDict):
  balance = cfg.get('balance', 'none')
  if balance not in BALANCES:
    raise ValueError(f'config loss.balance must be one of {BALANCES}, got {balance!r}')
  return functools.partial(sigmoid_xent, balance=balance)


def _norton(cfg: ml_collections.ConfigDict):
  """Norton's defaults; every field optional. Optional extras: paragraph_iters (Sinkhorn iterations
  of the paragraph plan; default sinkhorn_iters, or 50 when that is 0/None) and clips_per_video
  (checked to be a multiple of length)."""
  kw = {
    'temperature': cfg.get('temperature', 0.07),
    'beta': cfg.get('beta', 0.3),
    'clip_epsilon': cfg.get('clip_epsilon', 1.0),
    'sinkhorn_iters': cfg.get('sinkhorn_iters', 50),
    'paragraph_weight': cfg.get('paragraph_weight', 0.1),
    'length': cfg.get('length', 8),
    'paragraph_epsilon': cfg.get('paragraph_epsilon', 0.1),
    'prompt_ratio': cfg.get('prompt_ratio', 0.3),
    'paragraph_temperature': cfg.get('paragraph_temperature', 0.07),
    'alpha': cfg.get('alpha', 1.0),
    'fusion_weight': cfg.get('fusion_weight', 0.5),
    'paragraph_iters': cfg.get('paragraph_iters', None),
    'clips_per_video': cfg.get('clips_per_video', None),
  }
  checks = [
    ('temperature', kw['temperature'] > 0, '> 0'),
    ('beta', 0 <= kw['beta'] <= 1, 'in [0, 1]'),
    ('clip_epsilon', kw['clip_epsilon'] > 0, '> 0'),
    ('paragraph_weight', kw['paragraph_weight'] >= 0, '>= 0'),
    ('paragraph_epsilon', kw['paragraph_epsilon'] > 0, '> 0'),
    ('paragraph_temperature', kw['paragraph_temperature'] > 0, '> 0'),
    ('alpha', kw['alpha'] > 0, '> 0'),
    ('fusion_weight', kw['fusion_weight'] >= 0, '>= 0'),
  ]
  for name in ('sinkhorn_iters', 'paragraph_iters'):
    value = kw[name]
    checks.append((name, value is None or (isinstance(value, int) and value >= 0), 'an int >= 0'))
  for name in ('length', 'clips_per_video'):
    value = kw[name]
    ok = isinstance(value, int) and value >= 1
    checks.append((name, ok or (name == 'clips_per_video' and value is None), 'an int >= 1'))
  ratio = kw['prompt_ratio']
  checks.append(('prompt_ratio', ratio is None or 0 < ratio <= 1, 'None or in (0, 1]'))
  for name, ok, want in checks:
    if not ok:
      raise ValueError(f'config loss.{name} must be {want}, got {kw[name]!r}')
  if kw['clips_per_video'] is not None and kw['clips_per_video'] % kw['length']:
    raise ValueError(
      f'config loss.length ({kw["length"]}) must divide loss.clips_per_video '
      f'({kw["clips_per_video"]}): a clip sequence may not straddle two videos'
    )
  return functools.partial(norton_loss, **kw)


LOSSES = {
  'vatt': _vatt,
  'norton': _norton,
  'softmax_xent': _softmax_xent,
  'sigmoid_xent': _sigmoid_xent,
}


def loss_components(cfg: ml_collections.ConfigDict) -> tuple[tuple[str, float], ...]:
  """((term, weight), …) whose weighted terms sum to the loss: what gradient harmonization
  differentiates separately. Only the VATT objective has several (video–audio first)."""
  if cfg.name != 'vatt':
    raise ValueError(
      f'gradient harmonization (config optimizer.harmonization) needs a loss of several terms; '
      f'config loss.name {cfg.name!r} has one'
    )
  total = cfg.weight_va + cfg.weight_vt
  if cfg.weight_va <= 0 or cfg.weight_vt <= 0:
    raise ValueError(
      'gradient harmonization needs both loss terms: config loss.weight_va and weight_vt must be '
      f'> 0, got {cfg.weight_va}, {cfg.weight_vt}'
    )
  return (('loss_va', cfg.weight_va / total), ('loss_vt', cfg.weight_vt / total))


def build_loss(cfg: ml_collections.ConfigDict):
  if cfg.name not in LOSSES:
    raise ValueError(f'config loss.name {cfg.name!r} is not one of {sorted(LOSSES)}')
  return LOSSES[cfg.name](cfg)
