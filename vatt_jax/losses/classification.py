"""Fine-tuning objectives: softmax cross-entropy with label smoothing and multi-label sigmoid
cross-entropy.

Both losses take the classifier's output {"logits": [B, C]} and the batch's "label", either
  int [B]      one class per example; −1 (no label) leaves the example out, or
  float [B, C] targets: one-hot / multi-hot, or soft (mixed) targets after `mixup`.
Under jit on the global batch the means run over every device's examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

BALANCES = ('none', 'inverse_frequency')


def targets(label: jax.Array, num_classes: int) -> jax.Array:
  """label int [B] (−1: none) or float [B, C] → float32 targets [B, C] (zero rows: no label)."""
  if label.ndim == 2:
    if label.shape[1] != num_classes:
      raise ValueError(f'targets [B, {label.shape[1]}] for {num_classes} classes')
    return label.astype(jnp.float32)
  if label.ndim != 1:
    raise ValueError(f'label must be int [B] or targets [B, C], got shape {label.shape}')
  # one_hot of −1 (or of an out-of-range id) is a zero row: the example carries no target.
  return jax.nn.one_hot(label, num_classes, dtype=jnp.float32)


def softmax_xent(out: dict, batch: dict, *, label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
  """Label-smoothed softmax cross-entropy, the mean over labelled examples.

  With targets y_b (mass m_b = Σ_c y_bc: 1 for a label, 0 for none, λ-weighted after mixing with
  an unlabelled example) the smoothed targets are s_b = (1 − α)·y_b + α·m_b / C (optax's
  `smooth_labels` for m_b = 1) and
    loss = Σ_b −Σ_c s_bc · log softmax(z_b)_c / Σ_b m_b.
  Terms: accuracy = the fraction of labelled examples whose top logit is their top target.
  """
  logits = out['logits'].astype(jnp.float32)
  num_classes = logits.shape[-1]
  y = targets(batch['label'], num_classes)
  mass = jnp.sum(y, axis=-1)
  smoothed = (1.0 - label_smoothing) * y + label_smoothing * mass[:, None] / num_classes
  per_example = optax.softmax_cross_entropy(logits, smoothed)
  total = jnp.maximum(jnp.sum(mass), 1e-6)
  loss = jnp.sum(per_example) / total
  labelled = mass > 0
  hits = (jnp.argmax(logits, -1) == jnp.argmax(y, -1)) & labelled
  accuracy = jnp.sum(hits) / jnp.maximum(jnp.sum(labelled), 1)
  return loss, {'loss_xent': loss, 'accuracy': accuracy}


def inverse_frequency_weights(y: jax.Array) -> jax.Array:
  """[B, C] targets → [B] weights: the mean over b's labels of 1 / (how many examples of the batch
  carry that label), the official VATT AudioSet balancing; 0 for an example without labels."""
  per_class = jnp.sum(y, axis=0, keepdims=True)  # [1, C]
  inverse = jnp.where(per_class > 0, 1.0 / jnp.where(per_class > 0, per_class, 1.0), 0.0)
  count = jnp.sum(y, axis=1)  # [B]
  weighted = jnp.sum(inverse * y, axis=1)
  return jnp.where(count > 0, weighted / jnp.where(count > 0, count, 1.0), 0.0)


def sigmoid_xent(out: dict, batch: dict, *, balance: str = 'none') -> tuple[jax.Array, dict]:
  """Multi-label sigmoid binary cross-entropy: per example the sum over the C classes, then the
  mean over the batch (the official VATT reduction); with balance='inverse_frequency' each
  example's sum is weighted by `inverse_frequency_weights` first."""
  if balance not in BALANCES:
    raise ValueError(f'config loss.balance must be one of {BALANCES}, got {balance!r}')
  logits = out['logits'].astype(jnp.float32)
  y = targets(batch['label'], logits.shape[-1])
  per_example = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, y), axis=-1)
  if balance == 'inverse_frequency':
    per_example = per_example * inverse_frequency_weights(y)
  loss = jnp.mean(per_example)
  return loss, {'loss_bce': loss}


def check_labels(label: np.ndarray, num_classes: int, where: str) -> None:
  """Host-side check of a batch's labels against the classifier (one_hot would silently drop an
  out-of-range class)."""
  label = np.asarray(label)
  if label.ndim == 1:
    if label.size and int(label.max()) >= num_classes:
      raise ValueError(
        f'{where}: label {int(label.max())} is out of range for config model.num_classes='
        f'{num_classes}'
      )
  elif label.ndim != 2 or label.shape[1] != num_classes:
    raise ValueError(
      f'{where}: label of shape {label.shape} does not fit config model.num_classes='
      f'{num_classes} (int [B] or multi-hot [B, {num_classes}])'
    )
