"""Device mesh and the placement of batches and state (data parallel for now)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A one-axis ('data') mesh over `cfg.data` devices (-1: all of them)."""
  devices = list(jax.devices() if devices is None else devices)
  size = len(devices) if cfg.data == -1 else cfg.data
  if size < 1 or size > len(devices):
    raise ValueError(f'config mesh.data={cfg.data} does not fit the {len(devices)} devices present')
  return Mesh(np.asarray(devices[:size]), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  devices = mesh.shape[DATA_AXIS]
  if batch_size % devices:
    raise ValueError(
      f'config batch_size={batch_size} (global) does not divide over {devices} data-parallel devices'
    )


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's local share into global arrays sharded over the data axis."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }
