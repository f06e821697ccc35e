"""Checkpoints: orbax's CheckpointManager under `workdir/checkpoints/<step>/`, saved asynchronously
(reading a finished run's parameters is vatt_jax/workdir.py's).

A step directory holds three items:
  params  {'params', 'batch_stats'}: what a model needs (fine-tuning restores only this item)
  train   {'step', 'opt_state', 'rng', 'nonfinite_steps', 'nonfinite_run'}: the rest of TrainState
  data    JSON: each process's input position ({'process_<i>': get_state() of its data source})
orbax writes each step into a temporary directory and renames it when complete, so a step that
was being written when the process died is never taken for the latest; leftovers are removed when
the run that resumes is accepted (`Checkpointer.open`). Restoring takes abstract arrays with
shardings, so a checkpoint written on one mesh restores onto any other (8 devices → 1, 1 → 8,
another layout).

A finished step that no longer reads (a truncated or overwritten file) is skipped on resume for the
one before it (`restore_latest`, with a warning); once the run is accepted it is renamed
`<step>.damaged` beside the others (kept, never deleted; orbax no longer counts it, so saving that
step again and keeping the last K work as usual). A save that cannot be written (full disk, quota,
permissions) stops the run with one line naming the step and the directory (CheckpointWriteError).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from vatt_jax import cli
from vatt_jax import workdir as workdir_lib
from vatt_jax.models.contract import check_variables, flat_paths
from vatt_jax.models.vatt_config import ADDED_FIELDS
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


class CheckpointWriteError(cli.UserError):
  """A checkpoint could not be written (full disk, quota, permissions): the message is one line
  that names the step and the checkpoint directory (the cause is chained)."""


class Checkpointer:
  """Saves and restores TrainState + data position in `workdir/checkpoints`.

  save_steps: save every this many steps (a final or preemption save is forced); keep: the last K
  are kept; keep_period: every M-th step is also kept for good (0: none).

  Opening one writes nothing: an existing directory is read (latest_step, restore) until `open()`
  (or the first `save`) creates the directory, moves damaged steps aside and removes what an
  interrupted save left — the trainer calls it once the run is accepted.
  """

  def __init__(self, workdir: str, *, save_steps: int, keep: int, keep_period: int = 0):
    if save_steps < 1 or keep < 1 or keep_period < 0:
      raise ValueError(
        f'config checkpoint_steps={save_steps} and keep_checkpoints={keep} must be >= 1, '
        f'keep_checkpoint_period={keep_period} >= 0'
      )
    self.directory = workdir_lib.checkpoint_dir(workdir)
    self.save_steps = save_steps
    self._options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_steps,
      max_to_keep=keep,
      keep_period=keep_period or None,
      enable_async_checkpointing=True,
      cleanup_tmp_directories=True,
      create=True,
    )
    self.manager: ocp.CheckpointManager | None = None  # the writer, from open()
    self._reader: ocp.CheckpointManager | None = None
    if os.path.isdir(self.directory):  # only reads: creates, cleans and deletes nothing
      self._reader = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False),
        item_handlers=workdir_lib.item_handlers(),
      )
    self.damaged: dict[int, str] = {}  # step → why it could not be restored (moved aside by open)
    self._last_saved = self.latest_step()
    self._in_flight: int | None = None  # the step an asynchronous save is writing

  def _current(self) -> ocp.CheckpointManager | None:
    return self.manager or self._reader

  def latest_step(self) -> int | None:
    manager = self._current()
    return None if manager is None else manager.latest_step()

  def all_steps(self) -> list[int]:
    manager = self._current()
    return [] if manager is None else list(manager.all_steps())

  def open(self) -> None:
    """Makes the directory writable for saves (the run is accepted): creates it, moves the
    damaged steps found by restore_latest aside (<step>.damaged: kept, never deleted) and lets
    orbax remove the temporary directories of interrupted saves."""
    if self.manager is not None:
      return
    if self._reader is not None:
      self._reader.close()
      self._reader = None
    if self.damaged and jax.process_index() == 0:
      for step in sorted(self.damaged):
        source = os.path.join(self.directory, str(step))
        target = _free_name(f'{source}.damaged')
        os.rename(source, target)
        logging.warning(
          'moved the damaged checkpoint aside: %s → %s (not read again; delete it when you no '
          'longer need it)', source, target,
        )  # fmt: skip
    if self.damaged and jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices('vatt_jax: damaged checkpoints moved aside')
    try:
      self.manager = ocp.CheckpointManager(
        self.directory, options=self._options, item_handlers=workdir_lib.item_handlers()
      )
    except OSError as e:
      raise CheckpointWriteError(
        f'cannot create the checkpoint directory {self.directory}: {_cause(e)}'
      ) from e
    self._last_saved = self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> bool:
    """Starts an asynchronous save if `step` is due (or forced); every process calls it at every
    step. Returns at once (the previous save is awaited first); True if this step is saved.
    Raises CheckpointWriteError (one line) when this or the previous save cannot be written."""
    if not (force or step % self.save_steps == 0):  # (orbax on its own also saves the first step)
      return False
    if step == self._last_saved:  # e.g. a signal right after a periodic save, or after a restore
      return True
    self.open()
    self.wait()  # the previous save's failure is reported as that step's
    params, train = _split(state)
    self._last_saved = self._in_flight = step
    with self._writing(step):
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
    params, _ = _split(abstract_state)
    self.check(step, params)
    return self._restore(step, abstract_state)

  def _restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
    params, train = _split(abstract_state)
    restored = self._current().restore(
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
    if not positions or positions == {'process_0': {}}:  # written by scripts/convert_official.py
      logging.info('checkpoint %d has no input position (converted): the input starts anew', step)
    elif mine is None:
      logging.warning(
        'checkpoint %d has no input position for process %d (written by %d processes): this '
        "process's input starts from the beginning", step, jax.process_index(), len(positions),
      )  # fmt: skip
    return state, mine

  def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, dict, int]:
    """(state, data position, step) of the newest checkpoint that restores.

    A checkpoint that cannot be read (a damaged or truncated file) is skipped for the one before
    it, with a warning naming the step and the error; it stays where it is until `open()` moves
    it aside. A checkpoint of another model is refused (ValueError), never skipped. Raises
    cli.UserError when no checkpoint restores."""
    params, _ = _split(abstract_state)
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise cli.UserError(f'no checkpoint to resume from in {self.directory}')
    for step in steps:
      error = None
      try:
        stored = self._current().item_metadata(step)['params']
      except Exception as e:  # an unreadable step: damaged
        error = e
      if error is None:
        _check_model(stored, params, f'{self.directory}/{step}')  # another model: refused
        try:
          state, position = self._restore(step, abstract_state)
        except Exception as e:  # TensorStore / JSON errors of a damaged or truncated file
          error = e
      if not _everywhere(error is None):  # every process resumes from the same step
        self.damaged[step] = _cause(error or RuntimeError('another process could not read it'))
        continue
      self._last_saved = step
      for bad, why in sorted(self.damaged.items()):
        logging.warning(
          'checkpoint step %d in %s is damaged (%s): resuming from step %d instead; the damaged '
          'step is kept, moved aside to %d.damaged when the run starts', bad, self.directory,
          why, step, bad,
        )  # fmt: skip
      return state, position, step
    raise cli.UserError(
      f'no checkpoint in {self.directory} can be restored ('
      + '; '.join(f'step {s}: {why}' for s, why in sorted(self.damaged.items(), reverse=True))
      + '); they are left as they are: move them aside to start over, or use a new --workdir'
    )

  def check(self, step: int, abstract_params: dict) -> None:
    """Fails before any restore (and compilation) when the stored model has other shapes."""
    workdir_lib.check_params_item(
      self._current(), step, abstract_params, f'{self.directory}/{step}'
    )

  def wait(self) -> None:
    """Waits for the asynchronous save; CheckpointWriteError when it failed."""
    if self.manager is None:
      return
    with self._writing(self._in_flight):
      self.manager.wait_until_finished()
    self._in_flight = None

  def close(self) -> None:
    """Waits for the last save and releases the managers; CheckpointWriteError (after releasing
    them) when the last save failed."""
    error = None
    try:
      self.wait()
    except CheckpointWriteError as e:
      error = e
    for manager in (self.manager, self._reader):
      if manager is None:
        continue
      try:
        # orbax removes an interrupted save's leftovers in a background thread that close() does
        # not join; one still running at interpreter exit ends in a traceback.
        getattr(manager, '_maybe_await_cleanup_tmp_directory', lambda: None)()
        manager.close()
      except (OSError, ValueError, RuntimeError) as e:
        error = error or self._write_error(self._in_flight, e)
    self.manager = self._reader = None
    if error is not None:
      raise error

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    try:
      yield
    except (OSError, ValueError, RuntimeError) as e:
      if isinstance(e, CheckpointWriteError):
        raise
      raise self._write_error(step, e) from e

  def _write_error(self, step: int | None, error: BaseException) -> CheckpointWriteError:
    """A failed write (orbax/TensorStore errors: full disk, quota, permissions) as one line that
    names the step and the directory."""
    which = f'step {step}' if step is not None else 'a checkpoint'
    return CheckpointWriteError(
      f'could not write the checkpoint of {which} into {self.directory}: {_cause(error)}. Make '
      'room there (or lower config.keep_checkpoints) and run the same command again: it resumes '
      'from the last complete checkpoint'
    )


_STORAGE_HINTS = (
  ('No space left on device', 'no space left on the device'),
  ('Disk quota exceeded', 'disk quota exceeded'),
  ('Permission denied', 'permission denied'),
  ('Read-only file system', 'read-only file system'),
)


def _cause(error: BaseException) -> str:
  """One short line for an error from orbax or TensorStore: the innermost cause's first line,
  or what a full disk / quota / permission error means."""
  chain, e = [], error
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  for e in chain:
    if isinstance(e, OSError) and e.errno is not None:
      return cli.describe(e)
  text = ' '.join(str(e) for e in chain)
  for needle, hint in _STORAGE_HINTS:
    if needle in text:
      return hint
  first = next((str(e).strip().splitlines()[0] for e in reversed(chain) if str(e).strip()), '')
  first = first or type(chain[-1]).__name__
  return first if len(first) <= 300 else first[:297] + '...'


def _check_model(stored, abstract_params: dict, where: str) -> None:
  """As workdir_lib.check_params_item, on metadata already read."""
  try:
    check_variables(flat_paths(stored), flat_paths(abstract_params), where)
  except ValueError as e:
    raise ValueError(f'{e} (a checkpoint of another model)') from None


def _free_name(path: str) -> str:
  candidate, n = path, 1
  while os.path.exists(candidate):
    n += 1
    candidate = f'{path}-{n}'
  return candidate


def _everywhere(ok: bool) -> bool:
  """True when `ok` holds on every process."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


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
  A field the stored run predates (vatt_jax.models.vatt_config.ADDED_FIELDS) counts as its default.
  """
  with open(config_path) as f:
    stored = json.load(f).get('model', {})
  current = json.loads(config.model.to_json_best_effort())
  old, new = _flatten(stored, 'model.'), _flatten(current, 'model.')
  for name, default in ADDED_FIELDS.items():
    old.setdefault(f'model.{name}', default)
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
