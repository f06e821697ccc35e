"""config.model of All-in-one (`model.name='allinone'`, vatt_jax/models/allinone.py): the sizes,
the choices, and `check_model_config`, which refuses a config.model that cannot work with a
one-line error naming the field."""

from __future__ import annotations

import dataclasses

import ml_collections

from data_pipelines.options import frame_hw
from vatt_jax.models.transformer import REMAT_POLICIES, EncoderSize
from vatt_jax.models.vatt_config import DTYPES

TEMPORAL = ('roll', 'none', 'flatten')
PAIR_SCORES = ('match_logit', 'log_odds')

# All-in-one-Ti / -S / -B: the ViT-Ti/16, ViT-S/16 and ViT-B/16 transformers (DeiT's Ti and S).
SIZES: dict[str, EncoderSize] = {
  'tiny': EncoderSize(num_layers=12, width=192, mlp_dim=768, num_heads=3),
  'small': EncoderSize(num_layers=12, width=384, mlp_dim=1536, num_heads=6),
  'base': EncoderSize(num_layers=12, width=768, mlp_dim=3072, num_heads=12),
}


def get_size(cfg: ml_collections.ConfigDict) -> EncoderSize:
  """SIZES[model.size] with model.num_layers / width / mlp_dim / num_heads overrides (0: the
  preset's)."""
  if cfg.get('size') not in SIZES:
    raise ValueError(f'config model.size must be one of {sorted(SIZES)}, got {cfg.get("size")!r}')
  size = SIZES[cfg.size]
  overrides = {f: int(cfg.get(f, 0) or 0) for f in ('num_layers', 'width', 'mlp_dim', 'num_heads')}
  size = dataclasses.replace(size, **{f: v for f, v in overrides.items() if v > 0})
  if size.width % size.num_heads:
    raise ValueError(
      f'config model.width {size.width} is not a multiple of model.num_heads {size.num_heads}'
    )
  return size


def check_model_config(cfg: ml_collections.ConfigDict) -> None:
  choices = (('dtype', DTYPES, 'float32'), ('remat', REMAT_POLICIES, 'none'),
             ('temporal', TEMPORAL, 'roll'), ('pair_score', PAIR_SCORES, 'match_logit'))  # fmt: skip
  for field, allowed, default in choices:
    if cfg.get(field, default) not in allowed:
      raise ValueError(
        f'config model.{field} must be one of {sorted(allowed)}, got {cfg.get(field)!r}'
      )
  if cfg.text.get('num_narrations', 1) != 1:
    raise ValueError(
      f'config model.text.num_narrations must be 1 for model allinone (one caption per clip), '
      f'got {cfg.text.num_narrations}'
    )
  if cfg.text.vocab_size < 2 or cfg.text.max_words < 1:
    raise ValueError(
      f'config model.text.vocab_size must be >= 2 and max_words >= 1, got '
      f'{cfg.text.vocab_size}, {cfg.text.max_words}'
    )
  height, width = frame_hw(cfg.video.frame_size)
  patch = cfg.video.patch_size
  if not isinstance(patch, int) or patch < 1 or height % patch or width % patch:
    raise ValueError(
      f'config model.video.patch_size {patch!r} must be an int dividing the frame size '
      f'{height}×{width}'
    )
  if cfg.get('roll_div', 8) < 3:  # 2·fold + 1 <= tokens: the two rolled slices never overlap
    raise ValueError(f'config model.roll_div must be >= 3, got {cfg.roll_div}')
