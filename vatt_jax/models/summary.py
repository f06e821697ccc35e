"""Parameter counts and forward FLOPs from a model's own shapes and XLA: VATT's per backbone (the
paper's Tables 5 and 7), All-in-one's per parameter group and for its joint pass with and without
temporal token rolling.

Nothing is allocated: parameters come from `jax.eval_shape(model.init, ...)` and FLOPs from XLA's
cost analysis of a lowered (not executed) forward pass. VATT: one clip of one tower, in training
mode (DropToken on). All-in-one: the joint pass of one video–text pair in evaluation mode, and the
attention's share of it counted analytically. Each summary reads its model's parameter tree.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import jax
import ml_collections

from vatt_jax.models.allinone import AllInOne, AllInOneModel
from vatt_jax.models.allinone_config import TEMPORAL
from vatt_jax.models.vatt import VATT, VattModel
from vatt_jax.models.vatt_config import MODALITIES

SUPPORTED = ('allinone', 'vatt')  # config model.name values the summary reads
VOCABULARY_PATH = ('text_tower', 'tokenizer', 'vocabulary')


def _count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _subtree(params, path):
  for key in path:
    params = params[key]
  return params


def count_parameters(params) -> dict[str, int]:
  """Splits the parameters into backbones, the text vocabulary, the shared encoder and the heads.

  A backbone is a tower: tokenizer + positions + AGG + transformer + final norm (for text also the
  relative position bias), without the vocabulary table and without the common-space heads. In the
  modality-agnostic variant the shared encoder is counted once, under 'shared_encoder'.
  """
  counts = {}
  for m in MODALITIES:
    counts[m] = _count(params[f'{m}_tower'])
  counts['vocab'] = _count(_subtree(params, VOCABULARY_PATH))
  counts['text'] -= counts['vocab']
  counts['shared_encoder'] = _count(params.get('shared_encoder', {}))
  counts['heads'] = _count(params.get('head', {}))
  return counts


def forward_gflops(module: VATT, params_shape, inputs: dict[str, Any], modality: str) -> float:
  """XLA-counted GFLOPs of one training-shaped forward pass of one modality's backbone."""
  fn = getattr(VATT, f'encode_{modality}')

  def forward(params, x):
    return module.apply(
      {'params': params}, x, train=True, method=fn, rngs={'droptoken': jax.random.key(0)}
    )

  cost = jax.jit(forward).lower(params_shape, inputs[modality]).cost_analysis()
  if isinstance(cost, list | tuple):  # older jax returned one dict per device
    cost = cost[0]
  return float(cost['flops']) / 1e9


def summarize(model_cfg: ml_collections.ConfigDict, drop_token_rate: float | None = 0.0) -> dict:
  """Parameters and forward GFLOPs per backbone for one clip.

  Args:
    model_cfg: config.model.
    drop_token_rate: DropToken rate applied to video and audio for the FLOP count (None keeps the
      config's rates). Dropout is switched off so that only the network's own arithmetic is counted.
  Returns:
    {"backbones": {"video": {"params", "gflops"}, "audio": {…}, "text": {…}}, "vocab_params",
     "heads_params", "total_params", "total_gflops"} (+ "shared_encoder" for the agnostic variant).
  """
  cfg = copy.deepcopy(model_cfg)
  cfg.dropout_rate = cfg.attention_dropout_rate = 0.0
  if drop_token_rate is not None:
    cfg.video.drop_token_rate = cfg.audio.drop_token_rate = drop_token_rate
  if cfg.get('name') != 'vatt':
    raise ValueError(
      f"the model summary counts VATT's towers (config model.name 'vatt'), got {cfg.get('name')!r}"
      f' (summarize_allinone reads model.name allinone)'
    )
  model = VattModel(cfg)
  inputs = model.example_batch()
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), inputs)
  params = variables['params']
  counts = count_parameters(params)
  backbones = {
    m: {'params': counts[m], 'gflops': forward_gflops(model.module, params, inputs, m)}
    for m in MODALITIES
  }
  summary = {
    'backbones': backbones,
    'vocab_params': counts['vocab'],
    'heads_params': counts['heads'],
    'total_params': sum(b['params'] for b in backbones.values()) + counts['shared_encoder'],
    'total_gflops': sum(b['gflops'] for b in backbones.values()),
  }
  if counts['shared_encoder']:
    summary['shared_encoder'] = {'params': counts['shared_encoder']}
  return summary


def check_supported(model_cfg: ml_collections.ConfigDict) -> str:
  """config.model.name when the summary reads that model, else a one-line ValueError."""
  name = model_cfg.get('name')
  if name not in SUPPORTED:
    raise ValueError(
      f'the model summary supports config model.name {" or ".join(map(repr, SUPPORTED))}, '
      f'got {name!r}'
    )
  return name


# ---- All-in-one (model.name 'allinone') ----------------------------------------------------------

ATTENTION_FORMULA = (
  'analytic: 4·n²·d FLOPs per block and sequence of n tokens (QKᵀ and AV, 2 per multiply-add; '
  'padded text tokens are computed too, as the dense kernel does)'
)
# All-in-one's parameter groups by top-level name (every block_NN is in 'blocks' too).
ALLINONE_GROUPS = {
  'vocab': ('word_embeddings',),
  'embeddings': (
    'text_positions',
    'text_norm',
    'token_type',
    'patch_embed',
    'frame_cls',
    'frame_positions',
    'temporal_positions',
  ),
  'blocks': ('final_norm',),
  'pooler': ('pooler',),
  'vtm': ('vtm_head',),
  'mlm': ('mlm_transform', 'mlm_norm', 'mlm_bias', 'mlm_decoder'),
  'projections': ('text_proj', 'video_proj'),
}
HEADS = ('pooler', 'vtm', 'mlm', 'projections')


def count_allinone_parameters(params) -> dict[str, int]:
  """All-in-one's parameters by group (ALLINONE_GROUPS): 'vocab' (the word table, V + 3 rows),
  'embeddings' (text positions, token types, text LayerNorm, patch embedding, frame CLS, frame and
  temporal positions), 'blocks' (every block and the final LayerNorm), the heads 'pooler', 'vtm',
  'mlm' (transform, LayerNorm, bias; the decoder when untied) and 'projections' (text_proj,
  video_proj), their sum 'heads', 'total' and 'without_vocab'. A top-level name in no group is a
  ValueError: a new parameter is placed, never dropped from the total."""
  group_of = {name: group for group, names in ALLINONE_GROUPS.items() for name in names}
  counts = dict.fromkeys(ALLINONE_GROUPS, 0)
  for name, subtree in params.items():
    group = 'blocks' if name.startswith('block_') else group_of.get(name)
    if group is None:
      raise ValueError(f'allinone parameter {name!r} is in no group of the model summary')
    counts[group] += _count(subtree)
  counts['heads'] = sum(counts[h] for h in HEADS)
  counts['total'] = _count(params)
  counts['without_vocab'] = counts['total'] - counts['vocab']
  return counts


def attention_flops(num_layers: int, width: int, num_sequences: int, tokens: int) -> int:
  """ATTENTION_FORMULA summed: num_layers · num_sequences · 4 · tokens² · width."""
  return num_layers * num_sequences * 4 * tokens * tokens * width


def joint_gflops(module: AllInOne, params_shape, batch: dict[str, Any]) -> float:
  """XLA-counted GFLOPs of AllInOne.joint in evaluation mode on an abstract batch (video [B, T,
  H, W, 3] float32, text [B, W] int32): lowered, never run."""

  def forward(params, video, text):
    return module.apply({'params': params}, video, text, method=AllInOne.joint)

  cost = jax.jit(forward).lower(params_shape, batch['video'], batch['text']).cost_analysis()
  if isinstance(cost, list | tuple):  # older jax returned one dict per device
    cost = cost[0]
  return float(cost['flops']) / 1e9


def _allinone_variant(model_cfg: ml_collections.ConfigDict, temporal: str) -> tuple[AllInOne, dict]:
  """(module, {'counts': parameter counts, 'joint': the joint-pass cost of one video–text pair})
  with model.temporal = temporal."""
  cfg = copy.deepcopy(model_cfg)
  cfg.temporal = temporal
  model = AllInOneModel(cfg)
  module = model.module
  batch = model.example_batch(1)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), batch)['params']
  layers, width = module.size.num_layers, module.size.width
  frames, frame_tokens = module.num_frames, 1 + module.num_patches
  text_tokens = module.max_words + 2
  if temporal == 'flatten':  # one sequence: the text and every frame
    sequences, frame_sequences, frame_length = 1, 1, frames * frame_tokens
  else:  # one sequence per frame: the text and that frame
    sequences, frame_sequences, frame_length = frames, frames, frame_tokens
  tokens = text_tokens + frame_length
  counts = count_allinone_parameters(params)
  joint = {
    'sequences': sequences,
    'tokens_per_sequence': tokens,
    'params': counts['total'],
    'attention_gflops': attention_flops(layers, width, sequences, tokens) / 1e9,
    'frame_attention_gflops': attention_flops(layers, width, frame_sequences, frame_length) / 1e9,
    'gflops': joint_gflops(module, params, batch),
  }
  return module, {'counts': counts, 'joint': joint}


def summarize_allinone(model_cfg: ml_collections.ConfigDict) -> dict:
  """All-in-one's parameters and the cost of its joint pass per video–text pair for temporal
  'roll' (T per-frame sequences, frame tokens rolled), 'none' (the same sequences, no rolling)
  and 'flatten' (one sequence of the text and every frame), at the config's frames, frame size
  and text length, in evaluation mode (no dropout).

  Returns {'model': 'allinone', 'temporal': the config's,
    'shape': {'layers', 'width', 'heads', 'mlp_dim', 'frames', 'frame_size' [H, W], 'patch_size',
              'frame_tokens' (1 + N), 'text_tokens' (W + 2)},
    'params': count_allinone_parameters of the config's variant,
    'joint': {temporal: {'sequences', 'tokens_per_sequence', 'params', 'attention_gflops',
              'frame_attention_gflops' (frame tokens with frame tokens only), 'gflops' (XLA: the
              whole joint pass, embeddings and pooler included)}},
    'ratios': {'attention' | 'frame_attention' | 'total': {'roll/flatten', 'roll/none'}},
    'attention_formula': ATTENTION_FORMULA}.
  """
  if model_cfg.get('name') != 'allinone':
    raise ValueError(
      f"summarize_allinone reads config model.name 'allinone', got {model_cfg.get('name')!r}"
    )
  configured = model_cfg.get('temporal', 'roll')
  if configured not in TEMPORAL:
    raise ValueError(f'config model.temporal must be one of {sorted(TEMPORAL)}, got {configured!r}')
  variants = {temporal: _allinone_variant(model_cfg, temporal) for temporal in TEMPORAL}
  module = variants[configured][0]
  joint = {temporal: result['joint'] for temporal, (_, result) in variants.items()}
  ratios = {}
  keys = {'attention': 'attention_gflops', 'frame_attention': 'frame_attention_gflops',
          'total': 'gflops'}  # fmt: skip
  for name, key in keys.items():
    ratios[name] = {
      f'roll/{other}': joint['roll'][key] / joint[other][key] for other in ('flatten', 'none')
    }
  return {
    'model': 'allinone',
    'temporal': configured,
    'shape': {
      'layers': module.size.num_layers,
      'width': module.size.width,
      'heads': module.size.num_heads,
      'mlp_dim': module.size.mlp_dim,
      'frames': module.num_frames,
      'frame_size': list(module.image_size),
      'patch_size': module.patch_size,
      'frame_tokens': 1 + module.num_patches,
      'text_tokens': module.max_words + 2,
    },
    'params': variants[configured][1]['counts'],
    'joint': joint,
    'ratios': ratios,
    'attention_formula': ATTENTION_FORMULA,
  }
