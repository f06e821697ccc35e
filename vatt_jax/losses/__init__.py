"""Objectives: `build_loss(config.loss)` returns fn(embeddings, batch) -> (loss, terms)."""

from __future__ import annotations

import functools

import ml_collections

from vatt_jax.losses.contrastive import mil_nce, nce, vatt_pretraining_loss

__all__ = ['build_loss', 'mil_nce', 'nce', 'vatt_pretraining_loss', 'LOSSES']


def _vatt(cfg: ml_collections.ConfigDict):
  return functools.partial(
    vatt_pretraining_loss,
    temperature=cfg.temperature,
    weight_va=cfg.weight_va,
    weight_vt=cfg.weight_vt,
  )


LOSSES = {'vatt': _vatt}


def build_loss(cfg: ml_collections.ConfigDict):
  if cfg.name not in LOSSES:
    raise ValueError(f'config loss.name {cfg.name!r} is not one of {sorted(LOSSES)}')
  return LOSSES[cfg.name](cfg)
