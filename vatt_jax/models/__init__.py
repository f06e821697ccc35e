"""Model construction: `build_model(config.model)` is the one entry point."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util
from jax.sharding import PartitionSpec

from vatt_jax.models.classifier import build_classifier
from vatt_jax.models.heads import CommonSpace
from vatt_jax.models.partitioning import ACTIVATION_AXES, PARAM_AXES
from vatt_jax.models.transformer import REMAT_POLICIES, SIZES, get_size
from vatt_jax.models.vatt import VATT, AudioSpec, TextSpec, VideoSpec

__all__ = [
  'ACTIVATION_AXES',
  'MODEL_BUILDERS',
  'PARAM_AXES',
  'REMAT_POLICIES',
  'SIZES',
  'VATT',
  'build_model',
  'get_size',
  'init_variables',
  'logical_specs',
]

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _build_vatt(cfg: ml_collections.ConfigDict) -> VATT:
  backbone = cfg.get('backbone', 'modality_specific')
  if backbone not in ('modality_specific', 'modality_agnostic'):
    raise ValueError(
      f"config model.backbone must be 'modality_specific' or 'modality_agnostic', got {backbone!r}"
    )
  if cfg.dtype not in _DTYPES:
    raise ValueError(f'config model.dtype must be one of {sorted(_DTYPES)}, got {cfg.dtype!r}')
  remat = cfg.get('remat', 'none')
  if remat not in REMAT_POLICIES:
    raise ValueError(f'config model.remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}')
  v, a, t = cfg.video, cfg.audio, cfg.text
  frames, (height, width) = v.num_frames, _pair(v.frame_size)
  grid = tuple(math.ceil(d / p) for d, p in zip((frames, height, width), v.patch_size, strict=True))
  shared = get_size(cfg.shared_size) if backbone == 'modality_agnostic' else None
  return VATT(
    video=VideoSpec(
      size=get_size(v.size),
      patch_size=tuple(v.patch_size),
      grid=grid,
      drop_token_rate=v.drop_token_rate,
      position_layernorm=cfg.position_layernorm,
    ),
    audio=AudioSpec(
      size=get_size(a.size),
      patch_size=a.patch_size,
      num_patches=math.ceil(a.num_samples / a.patch_size),
      drop_token_rate=a.drop_token_rate,
      position_layernorm=cfg.position_layernorm,
    ),
    text=TextSpec(
      size=get_size(t.size),
      vocab_size=t.vocab_size,
      num_buckets=t.relative_buckets,
      max_distance=t.relative_max_distance,
      bias_all_layers=t.bias_all_layers,
      norm_type=t.norm_type,
      scale_logits=t.scale_logits,
    ),
    head=CommonSpace(
      va_dim=cfg.head.va_dim,
      vt_dim=cfg.head.vt_dim,
      relu_before_vt=cfg.head.relu_before_vt,
      bn_momentum=cfg.head.bn_momentum,
      bn_epsilon=cfg.head.bn_epsilon,
    ),
    shared=shared,
    dropout_rate=cfg.dropout_rate,
    attention_dropout_rate=cfg.attention_dropout_rate,
    remat=remat,
    dtype=_DTYPES[cfg.dtype],
    token_outputs=cfg.get('token_outputs', False),
  )


def _pair(size):
  return (size, size) if isinstance(size, int) else tuple(size)


# One dict per kind: config.model.name → builder.
MODEL_BUILDERS = {
  'vatt': _build_vatt,
  'classifier': lambda cfg: build_classifier(cfg, _build_vatt(cfg)),
}


def build_model(cfg: ml_collections.ConfigDict):
  """Builds the flax module named by `cfg.name` (config.model)."""
  try:
    builder = MODEL_BUILDERS[cfg.name]
  except KeyError:
    raise ValueError(
      f'config model.name {cfg.name!r} is not one of {sorted(MODEL_BUILDERS)}'
    ) from None
  return builder(cfg)


def init_variables(model: nn.Module, rng_or_rngs, example_batch, **kwargs) -> dict[str, Any]:
  """`model.init` with the logical-partitioning boxes removed: plain arrays.

  Args:
    model: a module from build_model.
    rng_or_rngs: a PRNG key (used for 'params') or a dict of keys by RNG stream.
    example_batch: arrays (or anything with their shapes and dtypes, under jit/eval_shape).
    **kwargs: passed to model.init (VATT's `train` defaults to False).
  Returns:
    {'params': …, 'batch_stats': …} of arrays.
  """
  return nn.meta.unbox(model.init(rng_or_rngs, example_batch, **kwargs))


def logical_specs(model: nn.Module, example_batch, **kwargs) -> dict[str, Any]:
  """Logical PartitionSpecs (one name, or None, per dimension) of every variable.

  Traces `model.init` abstractly (jax.eval_shape: no FLOPs, no memory). Batch-norm statistics get
  the spec of their norm's scale (('common',) in the common-space heads).

  Returns:
    {'params': tree of PartitionSpec, 'batch_stats': tree of PartitionSpec} (the latter only for
    models with batch norm, as VATT), shaped like those collections of `init_variables`.
  """
  abstract = jax.eval_shape(
    lambda batch: model.init(jax.random.key(0), batch, **kwargs), example_batch
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
