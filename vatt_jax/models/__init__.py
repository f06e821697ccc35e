"""Models: `build_model(config.model)` → an object of the model contract (contract.Model).

`MODELS` is the registry, one dict: config model.name → a builder (config.model → Model). A model
defined outside this package registers itself with `register_model` when its module is imported;
config model.register_from names that module, so that every script (which reads the run's stored
config) imports it before the lookup.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from flax import traverse_util
from jax.sharding import PartitionSpec

from vatt_jax.models import allinone, classifier, svitt, vatt
from vatt_jax.models.contract import FlaxModel, InputSpec, Model, PairScore
from vatt_jax.models.partitioning import ACTIVATION_AXES, PARAM_AXES
from vatt_jax.models.transformer import REMAT_POLICIES, SIZES, get_size

__all__ = [
  'ACTIVATION_AXES',
  'MODELS',
  'PARAM_AXES',
  'REMAT_POLICIES',
  'SIZES',
  'FlaxModel',
  'InputSpec',
  'Model',
  'PairScore',
  'build_model',
  'get_size',
  'logical_specs',
  'register_model',
]

# One dict per kind: config.model.name → builder.
MODELS: dict[str, Callable[[ml_collections.ConfigDict], Model]] = {
  'vatt': vatt.VattModel,
  'classifier': classifier.ClassifierModel,
  'svitt': svitt.SvittModel,
  'allinone': allinone.AllInOneModel,
}


def register_model(name: str, builder: Callable[[ml_collections.ConfigDict], Model]) -> None:
  """Adds a model to MODELS (a model module outside vatt_jax calls this when imported)."""
  if name in MODELS and MODELS[name] is not builder:
    raise ValueError(f'model name {name!r} is already registered to {MODELS[name]}')
  MODELS[name] = builder


def build_model(cfg: ml_collections.ConfigDict) -> Model:
  """The model config.model describes (model.name, after importing model.register_from)."""
  if cfg.get('register_from'):
    try:
      importlib.import_module(cfg.register_from)
    except ImportError as e:
      raise ValueError(f'config model.register_from={cfg.register_from!r}: {e}') from None
  if cfg.get('name') not in MODELS:
    raise ValueError(f'config model.name {cfg.get("name")!r} is not one of {sorted(MODELS)}')
  model = MODELS[cfg.name](cfg)
  if not isinstance(model, Model):
    raise TypeError(f'the builder of model {cfg.name!r} returned {type(model)}, not a Model')
  return model


def logical_specs(model: Model, example_batch) -> dict[str, Any]:
  """Logical PartitionSpecs (one name, or None, per dimension) of every variable.

  Traces `model.init(boxed=True)` abstractly (jax.eval_shape: no FLOPs, no memory). Batch-norm
  statistics get the spec of their norm's scale (('common',) in the common-space heads).

  Returns:
    {'params': tree of PartitionSpec, 'batch_stats': tree of PartitionSpec} (the latter only for
    models with batch norm, as VATT), shaped like those collections of `model.init`.
  """
  abstract = jax.eval_shape(
    lambda batch: model.init(jax.random.key(0), batch, boxed=True), example_batch
  )
  params = nn.get_partition_spec(abstract['params'])
  flat_params = traverse_util.flatten_dict(params)

  def stat_spec(path, leaf):
    for sibling in ('scale', 'bias'):
      spec = flat_params.get(path[:-1] + (sibling,))
      if spec is not None and len(spec) == leaf.ndim:
        return spec
    return PartitionSpec(*(None,) * leaf.ndim)

  specs = {'params': params}
  if 'batch_stats' in abstract:
    stats = traverse_util.flatten_dict(nn.meta.unbox(abstract['batch_stats']))
    specs['batch_stats'] = traverse_util.unflatten_dict(
      {p: stat_spec(p, leaf) for p, leaf in stats.items()}
    )
  return specs
