"""Model construction: `build_model(config.model)` is the one entry point."""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections

from vatt_jax.models.heads import CommonSpace
from vatt_jax.models.transformer import SIZES, get_size
from vatt_jax.models.vatt import VATT, AudioSpec, TextSpec, VideoSpec

__all__ = ['SIZES', 'VATT', 'build_model', 'get_size', 'MODEL_BUILDERS']

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _build_vatt(cfg: ml_collections.ConfigDict) -> VATT:
  backbone = cfg.get('backbone', 'modality_specific')
  if backbone not in ('modality_specific', 'modality_agnostic'):
    raise ValueError(
      f"config model.backbone must be 'modality_specific' or 'modality_agnostic', got {backbone!r}"
    )
  if cfg.dtype not in _DTYPES:
    raise ValueError(f'config model.dtype must be one of {sorted(_DTYPES)}, got {cfg.dtype!r}')
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
    dtype=_DTYPES[cfg.dtype],
  )


def _pair(size):
  return (size, size) if isinstance(size, int) else tuple(size)


# One dict per kind: config.model.name → builder.
MODEL_BUILDERS = {'vatt': _build_vatt}


def build_model(cfg: ml_collections.ConfigDict):
  """Builds the flax module named by `cfg.name` (config.model)."""
  try:
    builder = MODEL_BUILDERS[cfg.name]
  except KeyError:
    raise ValueError(
      f'config model.name {cfg.name!r} is not one of {sorted(MODEL_BUILDERS)}'
    ) from None
  return builder(cfg)
