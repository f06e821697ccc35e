"""config.model → VATT's tower specs and input specs (vatt_jax/models/vatt.py builds the module
from them; vatt_jax/models/classifier.py reuses them for its towers).

The specs are frozen dataclasses, one per modality; `check_model_config` refuses a config.model
that cannot work with a one-line error naming the field; `ADDED_FIELDS` lists the fields added
after runs were first written, with the value a config without them means.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections

from data_pipelines.options import frame_hw
from vatt_jax.models import contract
from vatt_jax.models.attention import ATTENTION
from vatt_jax.models.transformer import REMAT_POLICIES, EncoderSize, get_size

MODALITIES = ('video', 'audio', 'text')

# Every spec's pre_projection / post_projection: the official modality-agnostic model's
# per-modality Dense + GELU after the patch (word) embedding, and Dense(post_projection) + GELU
# after the encoder whose AGG row is the representation (0: none). See configs/common.py.


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  size: EncoderSize
  patch_size: Sequence[int] = (4, 16, 16)
  grid: Sequence[int] = (8, 14, 14)
  drop_token_rate: float = 0.5
  position_layernorm: bool = False
  attention: str = 'dense'
  pre_projection: bool = False
  post_projection: int = 0


@dataclasses.dataclass(frozen=True)
class AudioSpec:
  size: EncoderSize
  patch_size: int = 128
  num_patches: int = 1200
  drop_token_rate: float = 0.5
  position_layernorm: bool = False
  attention: str = 'dense'
  pre_projection: bool = False
  post_projection: int = 0


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """The text tower. positions: 'relative' (T5 bias, every tower's default) or 'absolute' (a
  learned table of max_words rows, with position_layernorm: the official modality-agnostic
  model). embedding_dim / trainable_embedding: the word table (0 = the width, trainable; official:
  300-d frozen word2vec). norm_type / mlp_norm_type / use_bias / scale_logits: the encoder's
  (official T5: 'rmsnorm' / 'layernorm' / no biases / no scaling)."""

  size: EncoderSize
  vocab_size: int = 2**16
  num_buckets: int = 32
  max_distance: int = 64
  bias_all_layers: bool = False
  norm_type: str = 'layernorm'
  mlp_norm_type: str = ''
  use_bias: bool = True
  scale_logits: bool = True
  attention: str = 'dense'
  embedding_dim: int = 0
  trainable_embedding: bool = True
  positions: str = 'relative'
  max_words: int = 16
  position_layernorm: bool = False
  pre_projection: bool = False
  post_projection: int = 0


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
BACKBONES = ('modality_specific', 'modality_agnostic')
NORMS = ('layernorm', 'rmsnorm')

# config.model fields added after runs were first written, with the value a config without them
# means (what those runs trained with): read with these defaults, and not a difference of model
# when an older run is resumed (vatt_jax/train/checkpoint.py check_resume_config).
ADDED_FIELDS = {
  'pre_projection': False,
  'post_projection': 0,
  'text.mlp_norm_type': '',
  'text.use_bias': True,
  'text.embedding_dim': 0,
  'text.trainable_embedding': True,
  'text.positions': 'relative',
  'head.audio_text_bn': True,
}


def added_field(cfg: ml_collections.ConfigDict, name: str):
  """config.model.<name> (dotted), or ADDED_FIELDS[name] when the config predates it."""
  *sections, field = name.split('.')
  for section in sections:
    cfg = cfg.get(section, ml_collections.ConfigDict())
  return cfg.get(field, ADDED_FIELDS[name])


def check_model_config(cfg: ml_collections.ConfigDict) -> None:
  backbone = cfg.get('backbone', 'modality_specific')
  if backbone not in BACKBONES:
    raise ValueError(f'config model.backbone must be one of {BACKBONES}, got {backbone!r}')
  if cfg.dtype not in DTYPES:
    raise ValueError(f'config model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}')
  remat = cfg.get('remat', 'none')
  if remat not in REMAT_POLICIES:
    raise ValueError(f'config model.remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}')
  for tower in ('video', 'audio', 'text'):
    attention = cfg[tower].get('attention', 'dense')
    if attention not in ATTENTION:
      raise ValueError(
        f'config model.{tower}.attention must be one of {sorted(ATTENTION)}, got {attention!r}'
      )
  text = cfg.get('text', ml_collections.ConfigDict())
  checks = {
    'text.positions': (added_field(cfg, 'text.positions'), ('relative', 'absolute')),
    'text.norm_type': (text.get('norm_type', 'layernorm'), NORMS),
    'text.mlp_norm_type': (added_field(cfg, 'text.mlp_norm_type'), ('', *NORMS)),
  }
  for name, (value, allowed) in checks.items():
    if value not in allowed:
      raise ValueError(f'config model.{name} must be one of {allowed}, got {value!r}')
  for name, value in (
    ('text.embedding_dim', added_field(cfg, 'text.embedding_dim')),
    ('post_projection', added_field(cfg, 'post_projection')),
  ):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ValueError(f'config model.{name} must be an integer >= 0 (0: none), got {value!r}')


def _projections(cfg: ml_collections.ConfigDict) -> dict:
  """Every tower's pre_projection / post_projection (config model.pre_projection and
  model.post_projection; absent in configs written before they existed: off)."""
  return dict(
    pre_projection=bool(added_field(cfg, 'pre_projection')),
    post_projection=int(added_field(cfg, 'post_projection')),
  )


def video_spec(cfg: ml_collections.ConfigDict) -> VideoSpec:
  v = cfg.video
  dims = (v.num_frames, *frame_hw(v.frame_size))
  return VideoSpec(
    size=get_size(v.size),
    patch_size=tuple(v.patch_size),
    grid=tuple(math.ceil(d / p) for d, p in zip(dims, v.patch_size, strict=True)),
    drop_token_rate=v.drop_token_rate,
    position_layernorm=cfg.position_layernorm,
    attention=v.get('attention', 'dense'),
    **_projections(cfg),
  )


def audio_spec(cfg: ml_collections.ConfigDict) -> AudioSpec:
  a = cfg.audio
  return AudioSpec(
    size=get_size(a.size),
    patch_size=a.patch_size,
    num_patches=math.ceil(a.num_samples / a.patch_size),
    drop_token_rate=a.drop_token_rate,
    position_layernorm=cfg.position_layernorm,
    attention=a.get('attention', 'dense'),
    **_projections(cfg),
  )


def text_spec(cfg: ml_collections.ConfigDict) -> TextSpec:
  t = cfg.text
  return TextSpec(
    size=get_size(t.size),
    vocab_size=t.vocab_size,
    num_buckets=t.relative_buckets,
    max_distance=t.relative_max_distance,
    bias_all_layers=t.bias_all_layers,
    norm_type=t.norm_type,
    mlp_norm_type=added_field(cfg, 'text.mlp_norm_type'),
    use_bias=added_field(cfg, 'text.use_bias'),
    scale_logits=t.scale_logits,
    attention=t.get('attention', 'dense'),
    embedding_dim=int(added_field(cfg, 'text.embedding_dim')),
    trainable_embedding=bool(added_field(cfg, 'text.trainable_embedding')),
    positions=added_field(cfg, 'text.positions'),
    max_words=t.max_words,
    position_layernorm=cfg.position_layernorm,
    **_projections(cfg),
  )


def shared_size(cfg: ml_collections.ConfigDict) -> EncoderSize | None:
  """The shared encoder's size of the modality-agnostic backbone, None for modality-specific."""
  return get_size(cfg.shared_size) if cfg.get('backbone') == 'modality_agnostic' else None


def media_inputs(cfg: ml_collections.ConfigDict, modalities=MODALITIES) -> dict:
  """The InputSpecs of config.model's video / audio / text inputs."""
  specs = {
    'video': contract.InputSpec(
      (cfg.video.num_frames, *frame_hw(cfg.video.frame_size), 3), 'float32', -1.0, 1.0
    ),
    'audio': contract.InputSpec((cfg.audio.num_samples,), 'float32', -1.0, 1.0),
    'text': contract.InputSpec(
      (cfg.text.max_words,), 'int32', 0, cfg.text.vocab_size - 1, padding_id=0
    ),
  }
  return {m: specs[m] for m in modalities}
