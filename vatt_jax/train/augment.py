"""Batch transforms the train step runs on the global batch, inside the jitted step: mixup.

Mixup (Zhang et al. 2018; VATT appendix A.3 for AudioSet, Beta(5, 5)) runs after the batch is on
the devices: each example b draws λ_b ~ Beta(α, α) and a partner π(b) (one random permutation of
the batch, as the official VATT code does), and
  x′_b = λ_b·x_b + (1 − λ_b)·x_π(b),   y′_b = λ_b·y_b + (1 − λ_b)·y_π(b)
on the model's float inputs and on the one-hot or multi-hot targets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from vatt_jax.losses.classification import targets
from vatt_jax.models import Model


def mixup_draw(rng: jax.Array, batch_size: int, alpha: float) -> tuple[jax.Array, jax.Array]:
  """(λ [B] float32 ~ Beta(α, α), partner permutation π [B] int32) for one batch."""
  lambda_rng, partner_rng = jax.random.split(rng)
  lam = jax.random.beta(lambda_rng, alpha, alpha, (batch_size,), dtype=jnp.float32)
  return lam, jax.random.permutation(partner_rng, batch_size)


def mixup(
  batch: dict, rng: jax.Array, *, alpha: float, keys: Sequence[str], num_classes: int
) -> dict:
  """The batch with its inputs `keys` and its "label" mixed (module docstring); jit-able.

  "label" becomes float32 targets [B, C] (int labels are one-hot first; −1 gives a zero row).
  Other fields pass through.
  """
  if alpha <= 0:
    raise ValueError(f'mixup needs alpha > 0, got {alpha}')
  batch_size = batch['label'].shape[0]
  lam, partner = mixup_draw(rng, batch_size, alpha)
  out = dict(batch)
  for key in keys:
    x = batch[key]
    weight = lam.reshape((batch_size,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    out[key] = weight * x + (1 - weight) * jnp.take(x, partner, axis=0)
  y = targets(batch['label'], num_classes)
  out['label'] = lam[:, None] * y + (1 - lam[:, None]) * jnp.take(y, partner, axis=0)
  return out


def build_augment(
  config: ml_collections.ConfigDict, model: Model
) -> Callable[[dict, jax.Array], dict] | None:
  """The train step's batch transform from config.mixup (None without mixup: alpha 0 or absent):
  mixup of the model's float inputs and of the labels, for a classifier."""
  alpha = float(config.get('mixup', {}).get('alpha', 0.0))
  if alpha < 0:
    raise ValueError(f'config mixup.alpha must be >= 0 (0: no mixup), got {alpha}')
  if alpha == 0:
    return None
  if not model.num_classes:
    raise ValueError(
      f'config mixup.alpha > 0 mixes labels: it needs a classifier, not model {model.name!r}'
    )
  keys = tuple(m for m, spec in model.inputs.items() if spec.dtype.startswith('float'))
  return functools.partial(mixup, alpha=alpha, keys=keys, num_classes=int(model.num_classes))
