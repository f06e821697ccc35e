"""config.init_from: a run starts from another run's parameters (fine-tuning from pretraining,
Norton post-training from a VATT run) — matched by name by the model, placed on the run's
shardings, with a fresh optimizer state."""

from __future__ import annotations

import os

import jax
from absl import logging

from vatt_jax import workdir as workdir_lib


def init_from_pretrained(state, program, workdir: str, step: int = -1):
  """`state` (freshly initialised) with its parameters loaded from the run in `workdir` (a
  pretraining or an earlier fine-tuning workdir; checkpoint `step`, −1 for the latest).
  `program`: the run's trainer.Program (its model, optimizer and shardings).

  Parameters are matched by name by the model (Model.load_pretrained: VATT and the classifier
  resize position tables when the patch grid differs; a classifier's head keeps its
  initialisation; any other difference is an error); batch-norm statistics are loaded when the
  run has the same ones (post-training a VATT: the common-space heads) and kept otherwise; the
  optimizer state is rebuilt for the new parameters. Logs what was loaded, resized, kept and left
  unused.
  """
  config_path = os.path.join(workdir, workdir_lib.CONFIG_FILENAME)
  directory = workdir_lib.checkpoint_dir(workdir)
  if not os.path.exists(config_path) or not os.path.isdir(directory):
    raise ValueError(
      f'config init_from={workdir!r} is not a training workdir (it needs '
      f'{workdir_lib.CONFIG_FILENAME} and {workdir_lib.CHECKPOINT_DIR}/ as scripts/train.py '
      'writes them)'
    )
  if step is None or step < 0:
    step = workdir_lib.latest_step(workdir)  # finished checkpoints only
    if step is None:
      raise ValueError(f'config init_from={workdir!r}: no finished checkpoint in {directory}')
  _, _, variables = workdir_lib.load_model(workdir, step)
  pretrained = jax.device_get(variables['params'])
  try:
    params, report = program.model.load_pretrained(state.params, pretrained)
  except ValueError as e:
    raise ValueError(f'config init_from={workdir!r} (step {step}): {e}') from None

  def place(value, sharding):
    if isinstance(value, jax.Array):
      return value  # kept at its initialisation, already placed
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  params = jax.tree.map(place, params, program.shardings.params)
  batch_stats, stats_loaded = _pretrained_batch_stats(state.batch_stats, variables)
  batch_stats = jax.tree.map(place, batch_stats, program.shardings.batch_stats)
  opt_state = jax.jit(program.tx.init, out_shardings=program.shardings.opt_state)(params)
  resized = '; '.join(f'{k} {a} → {b}' for k, (a, b) in sorted(report['resized'].items()))
  logging.info(
    'init_from %s step %d: loaded %d parameters (%s); position tables resized: %s; kept '
    'their initialisation: %s; not used from the checkpoint: %s',
    workdir, step, len(report['loaded']),
    ', '.join(sorted({p.split('/')[0] for p in report['loaded']})), resized or 'none',
    ', '.join(report['kept_init']) or 'none', ', '.join(report['unused']) or 'none',
  )  # fmt: skip
  if stats_loaded:
    logging.info('init_from %s step %d: batch-norm statistics loaded too', workdir, step)
  return state.replace(params=params, opt_state=opt_state, batch_stats=batch_stats)


def _pretrained_batch_stats(batch_stats, variables: dict):
  """(statistics, loaded): the checkpoint's batch-norm statistics when the run has the very same
  ones (same paths and shapes: post-training a VATT), else the run's own (a classifier has none)."""
  theirs = jax.device_get(variables.get('batch_stats') or {})
  if not jax.tree.leaves(batch_stats) or jax.tree.structure(theirs) != jax.tree.structure(
    batch_stats
  ):
    return batch_stats, False
  shapes = zip(jax.tree.leaves(theirs), jax.tree.leaves(batch_stats), strict=True)
  if any(a.shape != b.shape for a, b in shapes):
    return batch_stats, False
  return theirs, True
