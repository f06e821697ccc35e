"""Checkpoints: orbax's CheckpointManager under `workdir/checkpoints/<step>/`, saved asynchronously
(reading a finished run's parameters is vatt_jax/workdir.py's).

A step directory holds three items:
  params  {'params', 'batch_stats'}: what a model needs (fine-tuning restores only this item)
  train   {'step', 'opt_state', 'rng', 'nonfinite_steps', 'nonfinite_run'}: the rest of TrainState
  data    JSON: each process's input position ({'process_<i>': get_state() of its data source})
orbax writes each step into a temporary directory and renames it when complete, so a step that
was being written when the process died is never taken for the latest; leftovers are removed when
the next manager opens the directory. Restoring takes abstract arrays with shardings, so a
checkpoint written on one mesh restores onto any other (8 devices → 1, 1 → 8, another layout).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from vatt_jax import workdir as workdir_lib
from vatt_jax.train.state import TrainState

_TRAIN_FIELDS = ('step', 'opt_state', 'rng', 'nonfinite_steps', 'nonfinite_run')


def _split(state: TrainState) -> tuple[dict, dict]:
  params = {'params': state.params, 'batch_stats': state.batch_stats}
  train = {k: getattr(state, k) for k in _TRAIN_FIELDS}
  train['rng'] = _key_data(state.rng)  # typed PRNG keys are stored as their raw uint32 data
  return params, train


def _key_data(rng):
  if isinstance(rng, jax.ShapeDtypeStruct):
    data = jax.eval_shape(jax.random.key_data, rng)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=rng.sharding)
  return jax.random.key_data(rng)


def _gather_data_states(local: dict) -> dict:
  """{'process_<i>': data position of process i} on every process (orbax's JSON item is written
  by process 0 only, so the others' positions travel to it first)."""
  if jax.process_count() == 1:
    return {'process_0': local}
  from jax.experimental import multihost_utils

  blob = np.frombuffer(json.dumps(local).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([blob.size])).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[: blob.size] = blob
  blobs = multihost_utils.process_allgather(padded)
  return {
    f'process_{i}': json.loads(bytes(blobs[i, : lengths[i]]).decode())
    for i in range(jax.process_count())
  }


class Checkpointer:
  """Saves and restores TrainState + data position in `workdir/checkpoints`.

  save_steps: save every this many steps (a final or preemption save is forced); keep: the last K
  are kept; keep_period: every M-th step is also kept for good (0: none).
  """

  def __init__(self, workdir: str, *, save_steps: int, keep: int, keep_period: int = 0):
    if save_steps < 1 or keep < 1 or keep_period < 0:
      raise ValueError(
        f'config checkpoint_steps={save_steps} and keep_checkpoints={keep} must be >= 1, '
        f'keep_checkpoint_period={keep_period} >= 0'
      )
    self.directory = workdir_lib.checkpoint_dir(workdir)
    self.save_steps = save_steps
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_steps,
      max_to_keep=keep,
      keep_period=keep_period or None,
      enable_async_checkpointing=True,
      cleanup_tmp_directories=True,
      create=True,
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_handlers=workdir_lib.item_handlers()
    )
    self._last_saved = self.manager.latest_step()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
    """Starts an asynchronous save if `step` is due (or forced); every process calls it at every
    step. Returns at once (the previous save is awaited first); True if this step is saved."""
    if not (force or step % self.save_steps == 0):  # (orbax on its own also saves the first step)
      return False
    if step == self._last_saved:  # e.g. a signal right after a periodic save, or after a restore
      return True
    params, train = _split(state)
    self._last_saved = step
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        train=ocp.args.StandardSave(train),
        data=ocp.args.JsonSave(_gather_data_states(data_state or {})),
      ),
      force=True,
    )

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
    """The state at `step`, placed as `abstract_state`'s shardings say, and the data position."""
    params, train = _split(abstract_state)
    self.check(step, params)
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params),
        train=ocp.args.StandardRestore(train),
        data=ocp.args.JsonRestore(),
      ),
    )
    train = dict(restored['train'])
    train['rng'] = jax.random.wrap_key_data(train['rng'])
    state = abstract_state.replace(**restored['params'], **train)
    positions = dict(restored['data'] or {})
    mine = positions.get(f'process_{jax.process_index()}')
    if mine is None:
      logging.warning(
        'checkpoint %d has no input position for process %d (written by %d processes): this '
        "process's input starts from the beginning", step, jax.process_index(), len(positions),
      )  # fmt: skip
    return state, mine

  def check(self, step: int, abstract_params: dict) -> None:
    """Fails before any restore (and compilation) when the stored model has other shapes."""
    workdir_lib.check_params_item(self.manager, step, abstract_params, f'{self.directory}/{step}')

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def check_resume_config(config: ml_collections.ConfigDict, config_path: str) -> None:
  """Refuses to resume a run whose stored config describes another model (names the fields).

  Other sections (steps, optimizer, data, logging) may change between a run and its resumption.
  """
  with open(config_path) as f:
    stored = json.load(f).get('model', {})
  current = json.loads(config.model.to_json_best_effort())
  old, new = _flatten(stored, 'model.'), _flatten(current, 'model.')
  differ = [
    f'{k}: {old.get(k, "<absent>")!r} in the stored run, {new.get(k, "<absent>")!r} now'
    for k in sorted(old.keys() | new.keys())
    if old.get(k) != new.get(k)
  ]
  if differ:
    raise ValueError(
      f'{config_path}: the checkpoints in this workdir are of another model ('
      + '; '.join(differ)
      + '). Use a new --workdir, or the stored model config.'
    )
