"""The training loop: the side effects (I/O, logging) around the pure step."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

import data_pipelines
from vatt_jax.losses import build_loss
from vatt_jax.models import build_model
from vatt_jax.optim import build_optimizer
from vatt_jax.train import sharding
from vatt_jax.train.state import init_train_state
from vatt_jax.train.step import make_train_step

CONFIG_FILENAME = 'config.json'
METRICS_FILENAME = 'metrics.jsonl'


def save_resolved_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the fully resolved config (references expanded) into the workdir."""
  path = os.path.join(workdir, CONFIG_FILENAME)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)  # never a half-written config
  return path


def train(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains for config.total_steps; returns the logged metrics (also appended to metrics.jsonl)."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    save_resolved_config(config, workdir)

  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  data = data_pipelines.build(
    config.data,
    'train',
    batch_size=config.batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  model = build_model(config.model)
  loss_fn = build_loss(config.loss)
  tx, schedule = build_optimizer(config.optimizer, config.total_steps)

  first = next(data)
  example = {k: jnp.zeros((2, *v.shape[1:]), v.dtype) for k, v in first.items()}
  replicated = sharding.replicated(mesh)
  state = jax.jit(lambda rng: init_train_state(model, tx, example, rng), out_shardings=replicated)(
    jax.random.key(config.seed)
  )
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('model: %s parameters; mesh: %s', f'{num_params:,}', dict(mesh.shape))

  train_step = jax.jit(
    make_train_step(model, loss_fn, tx, schedule),
    in_shardings=(replicated, sharding.batch_sharding(mesh)),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )

  history = []
  metrics_path = os.path.join(workdir, METRICS_FILENAME)
  batch, window_start, window_wait, window_steps = first, time.perf_counter(), 0.0, 0
  for step in range(1, config.total_steps + 1):
    state, metrics = train_step(state, sharding.put_batch(batch, mesh))
    window_steps += 1
    if step % config.log_steps == 0 or step == config.total_steps:
      record = {'step': step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
      # Throughput over the steps since the last log line (the first window includes compilation).
      elapsed = time.perf_counter() - window_start
      record['clips_per_second'] = window_steps * config.batch_size / elapsed
      record['data_wait_fraction'] = window_wait / elapsed
      history.append(record)
      terms = ' '.join(f'{k}={record[k]:.4f}' for k in sorted(record) if k.startswith('loss'))
      logging.info(
        'step %d/%d  %s  lr=%.3g  grad_norm=%.3g  %.1f clips/s  data-wait %.0f%%',
        step,
        config.total_steps,
        terms,
        record['learning_rate'],
        record['grad_norm'],
        record['clips_per_second'],
        100 * record['data_wait_fraction'],
      )
      if not np.isfinite(record['loss']):
        logging.warning('step %d: non-finite loss; the update was not applied', step)
      if jax.process_index() == 0:
        with open(metrics_path, 'a') as f:
          f.write(json.dumps(record) + '\n')
      window_start, window_wait, window_steps = time.perf_counter(), 0.0, 0
    if step < config.total_steps:
      t0 = time.perf_counter()
      batch = next(data)
      window_wait += time.perf_counter() - t0
  counts = getattr(data, 'counts', None)
  if counts:
    logging.info('input: %s', dict(counts))
  if hasattr(data, 'close'):
    data.close()
  return history
