"""The device mesh and where every array lives on it: batches, parameters, optimizer state.

The mesh has three named axes (config.mesh): `data` (pure data parallelism: parameters
replicated), `fsdp` (data parallel too, but parameters and optimizer state are split along it and
gathered where used) and `model` (wide layers split: attention heads, MLP hidden units, the
vocabulary). The model names the axes of every parameter logically ('embed', 'mlp', 'heads', …,
see vatt_jax/models); `config.mesh.rules` maps logical names to mesh axes, so the sharding
strategy is data in the config. A batch is split over ('data', 'fsdp').
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')

# Logical axis → mesh axis (or None: replicated). The first rule naming a logical axis wins; flax
# leaves an axis unsharded when its mesh axis is already used by another dimension of the array.
DEFAULT_RULES = (
  ('batch', BATCH_AXES),
  ('embed', 'fsdp'),
  ('mlp', 'model'),
  ('heads', 'model'),
  ('vocab', 'model'),
  ('kv', None),
  ('patch', None),
  ('positions', None),
  ('common', None),
  ('length', None),
  ('embed_act', None),
)


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves config.mesh ({data, fsdp, model}; one of them may be -1: the remaining devices)."""
  sizes = {axis: int(cfg.get(axis, 1)) for axis in MESH_AXES}
  unknown = [k for k in sizes if sizes[k] == -1]
  if len(unknown) > 1:
    raise ValueError(f'config mesh: only one axis may be -1, got {unknown}')
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f'config mesh sizes must be positive (or -1), got {sizes}')
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(
        f'config mesh {sizes}: the fixed axes ({known} devices) do not divide the {num_devices} '
        'devices present'
      )
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes.values()) > num_devices:
    named = ' × '.join(f'mesh.{k}={v}' for k, v in sizes.items())
    raise ValueError(
      f'config {named} needs {math.prod(sizes.values())} devices; {num_devices} are present'
    )
  return sizes


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'model') mesh over the first prod(shape) devices.

  With all devices of several hosts, `jax.make_mesh` orders them so that the `model` and `fsdp`
  axes stay within a host (fast interconnect) where the shape allows.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  size = math.prod(shape.values())
  axes = tuple(shape[a] for a in MESH_AXES)
  if size == len(jax.devices()) and devices == list(jax.devices()):
    # Auto axes: shardings propagate through the program as under pjit (not explicit-sharding mode).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(axes, MESH_AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices[:size]).reshape(axes), MESH_AXES)


def rules(cfg: ml_collections.ConfigDict) -> tuple:
  """config.mesh.rules as flax wants them: ((logical, mesh axis or tuple or None), …)."""
  given = cfg.get('rules') or DEFAULT_RULES
  out = []
  for rule in given:
    if len(rule) != 2:
      raise ValueError(f'config mesh.rules: each rule is (logical_name, mesh_axes), got {rule!r}')
    name, axes = rule
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for axis in axes if isinstance(axes, tuple) else (axes,):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f'config mesh.rules: {name!r} maps to unknown mesh axis {axis!r}')
    out.append((name, axes))
  return tuple(out)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh | None = None) -> None:
  """The global batch is a positive integer that the mesh's data-parallel devices divide (without
  a mesh: only the first)."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(
      f'config batch_size={batch_size!r} must be a positive integer (the global batch: clips per '
      'step over all devices)'
    )
  if mesh is None:
    return
  devices = data_parallel_size(mesh)
  if batch_size % devices:
    raise ValueError(
      f'config batch_size={batch_size} (global) does not divide over the {devices} devices of the '
      f'mesh axes {BATCH_AXES} ({dict(mesh.shape)}): use a multiple of {devices}'
    )


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, name: str) -> PartitionSpec:
  """Drops the sharding of dimensions the mesh axes do not divide (tiny models, odd widths)."""
  dims = list(spec) + [None] * (len(shape) - len(spec))
  for i, axes in enumerate(dims):
    if axes is None:
      continue
    size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
    if shape[i] % size:
      logging.log_first_n(
        logging.INFO, '%s: dimension %d (%d) not divisible by %s=%d; replicated', 20,
        name, i, shape[i], axes, size,
      )  # fmt: skip
      dims[i] = None
  return PartitionSpec(*dims)


def logical_shardings(logical_specs, abstract, mesh: Mesh, axis_rules: tuple):
  """NamedShardings for a tree of arrays from its tree of logical PartitionSpecs."""

  def one(path, spec, leaf):
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), axis_rules) if spec is not None else None
    mesh_spec = PartitionSpec() if mesh_spec is None else mesh_spec
    return NamedSharding(mesh, _fit(mesh_spec, leaf.shape, mesh, jax.tree_util.keystr(path)))

  return jax.tree_util.tree_map_with_path(
    one, logical_specs, abstract, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
  )


def state_shardings(abstract_state, param_specs, batch_stat_specs, tx, mesh: Mesh, axis_rules):
  """Shardings of a TrainState: parameters by the rules, optimizer moments like their parameters,
  everything else (step, RNG, counters, schedules' counts) replicated.

  A leaf of the optimizer state is a moment of parameter p when its path ends with p's path and it
  has p's shape; this finds them under any wrapper (chains, optax.multi_transform's masked states
  of a trainable subset, gradient harmonization), where optax.tree_utils.tree_map_params cannot
  follow a transform whose labels depend on the parameters."""
  del tx  # the state's own structure says where the moments are
  params = logical_shardings(param_specs, abstract_state.params, mesh, axis_rules)
  by_path = {
    jax.tree_util.keystr(path): (sharding, leaf.shape)
    for (path, sharding), leaf in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.leaves(abstract_state.params),
      strict=True,
    )
  }

  def moment(path, leaf):
    for start in range(len(path)):
      found = by_path.get(jax.tree_util.keystr(path[start:]))
      if found is not None:
        return found[0] if found[1] == leaf.shape else replicated(mesh)
    return replicated(mesh)

  batch_stats = logical_shardings(batch_stat_specs, abstract_state.batch_stats, mesh, axis_rules)
  opt_state = jax.tree_util.tree_map_with_path(moment, abstract_state.opt_state)
  everything = jax.tree.map(lambda _: replicated(mesh), abstract_state)
  return everything.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's local share into global arrays split over ('data', 'fsdp')."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }


def describe(mesh: Mesh) -> str:
  """One line per host: its devices and their mesh coordinates."""
  lines = [
    f'mesh {dict(mesh.shape)} over {mesh.devices.size} devices, '
    f'{jax.process_count()} process(es); this is process {jax.process_index()}'
  ]
  coords = {d: idx for idx, d in np.ndenumerate(mesh.devices)}
  by_host: dict[int, list[str]] = {}
  for device, idx in coords.items():
    by_host.setdefault(device.process_index, []).append(
      f'{device.platform}:{device.id}@{dict(zip(MESH_AXES, idx, strict=True))}'
    )
  for host, entries in sorted(by_host.items()):
    lines.append(f'  process {host}: ' + ', '.join(entries))
  return '\n'.join(lines)
