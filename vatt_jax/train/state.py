"""The training state: one pytree that the jitted step takes and returns."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from vatt_jax.models import Model


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps applied
  params: Any
  batch_stats: Any  # the model's non-parameter state: batch-norm running statistics (VATT's heads)
  opt_state: Any
  rng: jax.Array  # base key; step keys are fold_in(rng, step), so a resumed run draws the same
  nonfinite_steps: jax.Array  # int32 scalar: steps rejected for a non-finite loss or gradient
  nonfinite_run: jax.Array  # int32 scalar: of those, how many in a row up to now


def init_train_state(
  model: Model, tx: optax.GradientTransformation, example_batch: dict, rng: jax.Array
) -> TrainState:
  """Initialises parameters from an example batch (only its shapes and dtypes matter)."""
  params_rng, state_rng = jax.random.split(rng)
  variables = model.init(params_rng, example_batch)
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=tx.init(params),
    rng=state_rng,
    nonfinite_steps=jnp.zeros((), jnp.int32),
    nonfinite_run=jnp.zeros((), jnp.int32),
  )
