"""Optimizers: `build_optimizer(config.optimizer, total_steps)` → (optax transform, lr schedule).

With config.optimizer.harmonization switched on (realign, curriculum or monitor), the transform takes
K-stacked per-loss gradients and chains the gradient harmonization of `harmonization.py` in front of
the optimizer (and of its clipping, which acts on the combined gradient).

`config.optimizer.trainable` restricts training to the parameters whose '/'-joined path matches a
regular expression (or a preset: 'all', 'layernorm' — the encoders' and tokenizers' layer norms, as
Norton post-trains); the others get zero updates and no optimizer state.

Schedules come from optax. The paper's "quarter-period cosine" from the peak to the end value is
optax's cosine decay with exponent 0.5, since (½(1 + cos πp))^½ = cos(πp/2) for p in [0, 1].
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import ml_collections
import optax
from absl import logging

from vatt_jax.optim import harmonization

_COSINE_EXPONENT = {'quarter_cosine': 0.5, 'cosine': 1.0}


def warmup_steps(cfg: ml_collections.ConfigDict, total_steps: int) -> int:
  """cfg.warmup_steps, or half the run when the warm-up would not end before the run does (a short
  run of a long recipe, e.g. --config.total_steps=10 on a 30-step warm-up; said in a warning)."""
  if total_steps < 1:
    raise ValueError(f'config total_steps={total_steps} must be >= 1')
  warmup = cfg.warmup_steps
  if warmup < 0:
    raise ValueError(f'config optimizer.warmup_steps={warmup} must be >= 0')
  if warmup < total_steps:
    return warmup
  fitted = total_steps // 2
  logging.warning(
    'config optimizer.warmup_steps=%d does not end before total_steps=%d: warming up over %d steps '
    '(half the run) instead; set --config.optimizer.warmup_steps to choose', warmup, total_steps,
    fitted,
  )  # fmt: skip
  return fitted


def build_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> Callable:
  """Linear warm-up from 0 to cfg.learning_rate, then decay to cfg.end_learning_rate at total_steps
  ('quarter_cosine', 'cosine' or 'linear'; 'constant': no warm-up, no decay). A warm-up as long as
  the run or longer is cut to half the run (`warmup_steps`)."""
  kind = cfg.schedule
  if kind == 'constant':
    return optax.constant_schedule(cfg.learning_rate)
  if kind == 'linear':  # ViLT / All-in-one: polynomial decay of power 1 after the warm-up
    warmup = warmup_steps(cfg, total_steps)
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, cfg.learning_rate, warmup),
        optax.linear_schedule(cfg.learning_rate, cfg.end_learning_rate, total_steps - warmup),
      ],
      [warmup],
    )
  if kind not in _COSINE_EXPONENT:
    raise ValueError(
      'config optimizer.schedule must be one of '
      f'{sorted(_COSINE_EXPONENT) + ["constant", "linear"]}, got {kind!r}'
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.learning_rate,
    warmup_steps=warmup_steps(cfg, total_steps),
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

# config.optimizer.trainable presets → the regular expression over parameter paths.
TRAINABLE = {
  'all': '',
  'layernorm': r'(^|/)(norm_attention|norm_mlp|final_norm|position_norm)/(scale|bias)$',
}


def trainable_labels(trainable: str) -> Callable | None:
  """params → a tree of 'train' / 'frozen' labels for `trainable` (a TRAINABLE preset or a regular
  expression searched in each '/'-joined parameter path); None when everything trains. Raises when
  the expression matches no parameter (a typo would otherwise train nothing)."""
  pattern = TRAINABLE.get(trainable, trainable)
  if not pattern:
    return None
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(
      f'config optimizer.trainable={trainable!r} is not a regular expression: {e}'
    ) from None

  def labels(params):
    def label(path, _):
      name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
      return 'train' if regex.search(name) else 'frozen'

    tree = jax.tree_util.tree_map_with_path(label, params)
    if 'train' not in jax.tree.leaves(tree):
      raise ValueError(f'config optimizer.trainable={trainable!r} matches no parameter')
    return tree

  return labels


def build_optimizer(
  cfg: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, Callable]:
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f'config optimizer.name {cfg.name!r} is not one of {sorted(OPTIMIZERS)}')
  schedule = build_schedule(cfg, total_steps)
  tx = OPTIMIZERS[cfg.name](cfg, schedule)
  if cfg.get('grad_clip_norm'):
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  labels = trainable_labels(cfg.get('trainable', 'all'))
  if labels is not None:  # clipping and the optimizer see the trainable gradients only
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
  harmonized = harmonization.build(cfg.get('harmonization'), total_steps, tx)
  return (harmonized or tx), schedule


def learning_rate(opt_state, schedule: Callable) -> jax.Array:
  """The learning rate the next update applies: the schedule at optax's own count of the updates
  it has applied (the count in the schedule's ScaleByScheduleState; a rejected or skipped step
  does not advance it)."""
  count = optax.tree_utils.tree_get(
    opt_state,
    'count',
    filtering=lambda path, _: getattr(path[-1], 'tuple_name', '') == 'ScaleByScheduleState',
  )
  if count is None:
    raise ValueError('the optimizer state has no learning-rate schedule count')
  return schedule(count)


def harmonized(cfg: ml_collections.ConfigDict) -> bool:
  """Whether build_optimizer's transform takes per-loss (K-stacked) gradients."""
  h = cfg.get('harmonization')
  return bool(h and (h.get('realign') or h.get('curriculum') or h.get('monitor')))
