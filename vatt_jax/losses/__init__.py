"""Losses: `build_loss(config.loss)` returns fn(model output, batch) -> (loss, terms).

A model's training objective (vatt_jax/models/contract.py) applies one of these to its outputs;
which losses a model trains with is the model's to say (Model.losses).

Pretraining: 'vatt' (NCE + MIL-NCE on the common-space embeddings), 'norton' (clip–caption and
video–paragraph losses with optimal transport, on long videos), 'egonce' and 'infonce' (the dual
encoder's term of SViTT-Ego's objective, on out['video_vt'] / out['text_vt'] and the samples'
noun / verb tags and `valid`; the model adds VTM and MLM, losses/matching.py), 'allinone'
(All-in-one's VTM + MLM + unimodal contrastive loss, losses/allinone.py); fine-tuning: 'softmax_xent' (label
smoothing) and 'sigmoid_xent' (multi-label) on a classifier's logits.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import ml_collections

from vatt_jax.losses.allinone import allinone_loss
from vatt_jax.losses.classification import BALANCES, sigmoid_xent, softmax_xent
from vatt_jax.losses.contrastive import mil_nce, nce, vatt_pretraining_loss
from vatt_jax.losses.egonce import egonce, infonce
from vatt_jax.losses.norton import (
  NortonOptions,
  bucket_value,
  clip_caption_loss,
  fine_grained_similarity,
  fused_similarity,
  min_max,
  norton_loss,
  video_paragraph_loss,
)

__all__ = [
  'NortonOptions',
  'allinone_loss',
  'register_loss',
  'bucket_value',
  'build_loss',
  'clip_caption_loss',
  'egonce',
  'infonce',
  'fine_grained_similarity',
  'fused_similarity',
  'loss_components',
  'mil_nce',
  'min_max',
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
  """Norton's losses with NortonOptions' defaults, overridden by the config's fields."""
  return functools.partial(norton_loss, **dataclasses.asdict(NortonOptions.from_config(cfg)))


def _check_temperature(cfg: ml_collections.ConfigDict) -> float:
  if not cfg.temperature > 0:
    raise ValueError(f'config loss.temperature must be > 0, got {cfg.temperature}')
  return float(cfg.temperature)


def _egonce(cfg: ml_collections.ConfigDict):
  """EgoNCE on out['text_vt'], out['video_vt'] with batch['noun'], batch['verb'] (multi-hot)
  and batch['valid']; use_noun / use_verb choose what a positive pair must share."""
  temperature = _check_temperature(cfg)
  use_noun, use_verb = bool(cfg.get('use_noun', True)), bool(cfg.get('use_verb', True))

  def loss(out, batch):
    return egonce(
      out['text_vt'],
      out['video_vt'],
      batch.get('noun') if use_noun else None,
      batch.get('verb') if use_verb else None,
      temperature=temperature,
      use_noun=use_noun,
      use_verb=use_verb,
      valid=batch.get('valid'),
    )

  return loss


def _infonce(cfg: ml_collections.ConfigDict):
  """Symmetric InfoNCE on out['text_vt'], out['video_vt'] (batch['valid'] masks samples)."""
  temperature = _check_temperature(cfg)

  def loss(out, batch):
    return infonce(out['text_vt'], out['video_vt'], temperature, valid=batch.get('valid'))

  return loss


def _allinone(cfg: ml_collections.ConfigDict):
  """All-in-one's VTM + MLM + unimodal contrastive objective on the model's outputs
  (losses/allinone.py); the weights and the contrastive temperature from the config."""
  temperature = _check_temperature(cfg)
  weights = {k: float(cfg.get(k, 1.0)) for k in ('vtm_weight', 'mlm_weight', 'itc_weight')}
  if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
    raise ValueError(f'config loss weights must be >= 0 and not all 0, got {weights}')
  return functools.partial(allinone_loss, temperature=temperature, **weights)


# One dict per kind: config.loss.name → builder (config.loss → loss function).
LOSSES: dict[str, Callable] = {
  'vatt': _vatt,
  'norton': _norton,
  'egonce': _egonce,
  'infonce': _infonce,
  'allinone': _allinone,
  'softmax_xent': _softmax_xent,
  'sigmoid_xent': _sigmoid_xent,
}


def register_loss(name: str, builder: Callable) -> None:
  """Adds a loss to LOSSES (a loss module outside vatt_jax calls this when imported)."""
  if name in LOSSES and LOSSES[name] is not builder:
    raise ValueError(f'loss name {name!r} is already registered to {LOSSES[name]}')
  LOSSES[name] = builder


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
