"""Optimizers: `build_optimizer(config.optimizer, total_steps)` → (optax transform, lr schedule).

With config.optimizer.harmonization switched on (realign, curriculum or monitor), the transform takes
K-stacked per-loss gradients and chains the gradient harmonization of `harmonization.py` in front of
the optimizer (and of its clipping, which acts on the combined gradient).

Schedules come from optax. The paper's "quarter-period cosine" from the peak to the end value is
optax's cosine decay with exponent 0.5, since (½(1 + cos πp))^½ = cos(πp/2) for p in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
import optax

from vatt_jax.optim import harmonization

_COSINE_EXPONENT = {'quarter_cosine': 0.5, 'cosine': 1.0}


def build_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> Callable:
  """Linear warm-up from 0 to cfg.learning_rate, then decay to cfg.end_learning_rate at total_steps."""
  kind = cfg.schedule
  if kind == 'constant':
    return optax.constant_schedule(cfg.learning_rate)
  if kind not in _COSINE_EXPONENT:
    raise ValueError(
      f'config optimizer.schedule must be one of {sorted(_COSINE_EXPONENT) + ["constant"]}, '
      f'got {kind!r}'
    )
  if not 0 <= cfg.warmup_steps < total_steps:
    raise ValueError(
      f'config optimizer.warmup_steps={cfg.warmup_steps} must be in [0, total_steps={total_steps})'
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.learning_rate,
    warmup_steps=cfg.warmup_steps,
    decay_steps=total_steps,
    end_value=cfg.end_learning_rate,
    exponent=_COSINE_EXPONENT[kind],
  )


def _adam(cfg, schedule):
  return optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)


def _adamw(cfg, schedule):
  return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _sgd(cfg, schedule):
  return optax.sgd(schedule, momentum=cfg.get('momentum', 0.9))


OPTIMIZERS = {'adam': _adam, 'adamw': _adamw, 'sgd': _sgd}


def build_optimizer(
  cfg: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, Callable]:
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f'config optimizer.name {cfg.name!r} is not one of {sorted(OPTIMIZERS)}')
  schedule = build_schedule(cfg, total_steps)
  tx = OPTIMIZERS[cfg.name](cfg, schedule)
  if cfg.get('grad_clip_norm'):
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  harmonized = harmonization.build(cfg.get('harmonization'), total_steps, tx)
  return (harmonized or tx), schedule


def harmonized(cfg: ml_collections.ConfigDict) -> bool:
  """Whether build_optimizer's transform takes per-loss (K-stacked) gradients."""
  h = cfg.get('harmonization')
  return bool(h and (h.get('realign') or h.get('curriculum') or h.get('monitor')))
