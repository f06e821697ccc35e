"""Objectives: `build_loss(config.loss)` returns fn(model output, batch) -> (loss, terms).

Pretraining: 'vatt' (NCE + MIL-NCE on the common-space embeddings); fine-tuning: 'softmax_xent'
(label smoothing) and 'sigmoid_xent' (multi-label) on a classifier's logits.
"""

from __future__ import annotations

import functools

import ml_collections

from vatt_jax.losses.classification import BALANCES, mixup, sigmoid_xent, softmax_xent
from vatt_jax.losses.contrastive import mil_nce, nce, vatt_pretraining_loss

__all__ = [
  'build_loss',
  'loss_components',
  'mil_nce',
  'mixup',
  'nce',
  'sigmoid_xent',
  'softmax_xent',
  'vatt_pretraining_loss',
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


LOSSES = {'vatt': _vatt, 'softmax_xent': _softmax_xent, 'sigmoid_xent': _sigmoid_xent}


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
