"""A training workdir as the other commands see it: its resolved config and its checkpoints.

  WORKDIR/config.json             the resolved config the run trained with (save_config)
  WORKDIR/checkpoints/<step>/     orbax items 'params' ({'params', 'batch_stats'}), 'train', 'data'
  WORKDIR/provenance.json, WORKDIR/tokenizer.model   what results depend on (vatt_jax.provenance)

`load_model(workdir)` is the entry point of evaluation, embedding extraction, export and init_from:
the model rebuilt from config.json through the model registry, and its variables restored from a
checkpoint after their shapes were checked against that model. This layer sits above
vatt_jax.models and below everything that reads a run (train, the scripts, export).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from vatt_jax import provenance
from vatt_jax.models import Model, build_model
from vatt_jax.models.contract import Variables, abstract_variables, check_variables, flat_paths

CONFIG_FILENAME = 'config.json'
CHECKPOINT_DIR = 'checkpoints'


def item_handlers() -> dict:
  """The orbax handlers of a checkpoint step's three items."""
  return {
    'params': ocp.StandardCheckpointHandler(),
    'train': ocp.StandardCheckpointHandler(),
    'data': ocp.JsonCheckpointHandler(),
  }


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the fully resolved config (references expanded) into the workdir, atomically."""
  path = os.path.join(workdir, CONFIG_FILENAME)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)  # never a half-written config
  return path


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run stored in its workdir (config.json)."""
  path = os.path.join(workdir, CONFIG_FILENAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: {workdir} is not a training workdir')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not a readable config: {e}') from None


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The stored config as the run's readers use it: with the run's recorded tokenizer
  (provenance.run_config)."""
  return provenance.run_config(workdir, read_config(workdir))


def _manager(workdir: str, *, handlers: bool = True) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    checkpoint_dir(workdir),
    options=ocp.CheckpointManagerOptions(create=False),
    item_handlers=item_handlers() if handlers else None,
  )


def latest_step(workdir: str) -> int | None:
  """The newest finished checkpoint step of a workdir (None: none)."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  manager = _manager(workdir, handlers=False)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def check_params_item(manager: ocp.CheckpointManager, step: int, abstract: dict, where: str):
  """Fails before any restore (and compilation) when the stored model has other shapes."""
  stored = manager.item_metadata(step)['params']
  try:
    check_variables(flat_paths(stored), flat_paths(abstract), where)
  except ValueError as e:
    raise ValueError(f'{e} (a checkpoint of another model)') from None


def restore_params(workdir: str, abstract: dict, step: int | None = None) -> Variables:
  """Only {'params', 'batch_stats'} of a run's checkpoint (latest unless `step`), placed as the
  abstract arrays' shardings say (jax.ShapeDtypeStruct with shardings)."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoint under {directory}')
  manager = _manager(workdir)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint under {directory}')
    if step not in manager.all_steps():
      raise FileNotFoundError(f'no checkpoint of step {step} under {directory}')
    check_params_item(manager, step, abstract, f'{directory}/{step}')
    restored = manager.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
    )
    return dict(restored['params'])
  finally:
    manager.close()


def load_model(
  workdir: str, step: int | None = None
) -> tuple[ml_collections.ConfigDict, Model, Variables]:
  """(config, model, variables) of a trained run, on this process's first device: the model
  rebuilt from the workdir's config.json, {'params', 'batch_stats'} from its checkpoint (latest
  unless `step`). Text is read with the run's copy of its tokenizer (provenance.run_config)."""
  config = run_config(workdir)
  model = build_model(config.model)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return config, model, restore_params(workdir, abstract_variables(model, device), step)


def load(workdir: str, *, step: int | None = None, random_init: bool = False, seed: int = 0):
  """(config, model, variables, description) of a training workdir: its checkpoint (latest unless
  `step`), or with random_init the same model freshly initialised from `seed` (the baseline)."""
  if not random_init:
    config, model, variables = load_model(workdir, step)
    used = step if step is not None else latest_step(workdir)
    return config, model, variables, f'{workdir} step {used}'
  config = run_config(workdir)
  model = build_model(config.model)
  example = {k: jnp.zeros(s.shape, s.dtype) for k, s in model.example_batch().items()}
  variables = jax.jit(lambda key: model.init(key, example))(jax.random.key(seed))
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  return config, model, variables, f'random init (seed {seed}) of the model of {workdir}'
