"""The pure, jit-able training step."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vatt_jax.models.contract import Objective
from vatt_jax.optim import harmonization, learning_rate
from vatt_jax.train.state import TrainState

_AUGMENT_STREAM = 0x6D6978  # fold_in constant of the batch transform's key ('mix')


def make_train_step(
  objective: Objective,
  tx: optax.GradientTransformation,
  schedule: Callable,
  *,
  axis_rules: tuple = (),
  augment: Callable[[dict, jax.Array], dict] | None = None,
  per_loss: tuple[tuple[str, float], ...] | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Returns train_step(state, batch) -> (state, metrics).

  objective: the model's (vatt_jax/models/contract.py), (variables, batch, rng) → (loss, (terms,
  model state)); its key is fold_in(state.rng, state.step), so a resumed run draws the same masks.
  The loss sees the global batch (all devices' samples), so contrastive negatives span it. A step
  whose loss or gradient is not finite is not applied (the official VATT code silently zeroes NaN;
  we report it): the state advances only its step and rejected-step counters, and the learning-rate
  schedule (driven by optax's count of applied updates; the logged learning rate is the schedule at
  that count) does not move. `nonfinite_run` counts the
  rejected steps in a row (the trainer stops after config.max_nonfinite_steps of them).

  axis_rules: logical → mesh axis rules for the model's activation-sharding constraints (traced
  under them; without a mesh they are no-ops).
  augment: an optional pure batch transform (batch, rng) -> batch run on the global batch before
  the objective (fine-tuning's mixup, vatt_jax/train/augment.py); its key is its own stream, so the
  objective's draws are those of a run without it.
  per_loss: ((term, weight), …) for gradient harmonization: the loss terms whose weighted sum is the
  loss, each differentiated on its own in the same forward pass; `tx` then takes K-stacked per-loss
  gradients (vatt_jax.optim.harmonization). The metrics add grad_cosine and grad_conflict (terms 0
  and 1 over their shared parameters) and, with a curriculum, grad_skipped and skipped_steps; a
  skipped step, like a rejected one, does not advance the learning-rate schedule.
  """

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    with nn.logical_axis_rules(axis_rules):
      return _train_step(state, batch)

  def _train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    if augment is not None:
      batch = augment(batch, jax.random.fold_in(step_rng, _AUGMENT_STREAM))

    def compute_loss(params):
      loss, (terms, model_state) = objective(
        {'params': params, 'batch_stats': state.batch_stats}, batch, step_rng
      )
      return loss, (terms, model_state.get('batch_stats', state.batch_stats))

    extra = {}
    if per_loss is None:
      (loss, (terms, batch_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
        state.params
      )
      grad_norm = optax.global_norm(grads)
    else:

      def components(params):
        loss, (terms, batch_stats) = compute_loss(params)
        return tuple(terms[name] * weight for name, weight in per_loss), (loss, terms, batch_stats)

      (_, (loss, terms, batch_stats)), grads = harmonization.value_and_per_loss_grad(
        components, has_aux=True
      )(state.params)
      grad_norm = optax.global_norm(jax.tree.map(lambda g: jnp.sum(g, axis=0), grads))
      extra.update(harmonization.alignment(grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      batch_stats=keep(batch_stats, state.batch_stats),
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
      nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
    )
    for after in harmonization.curriculum_states(new_state.opt_state):
      extra['grad_skipped'] = (finite & ~after.applied).astype(jnp.float32)
      extra['skipped_steps'] = after.skipped
    metrics = {
      'loss': loss,
      **terms,
      **extra,
      'grad_norm': grad_norm,
      'learning_rate': learning_rate(state.opt_state, schedule),
      'nonfinite_steps': new_state.nonfinite_steps,
      'nonfinite_run': new_state.nonfinite_run,
    }
    return new_state, metrics

  return train_step
