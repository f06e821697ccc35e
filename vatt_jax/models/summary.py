"""VATT's parameter counts and forward FLOPs per backbone (the paper's Tables 5 and 7), from the
model's own shapes and XLA.

Nothing is allocated: parameters come from `jax.eval_shape(model.init, ...)` and FLOPs from XLA's
cost analysis of the lowered (not executed) forward pass of one clip of one tower, in training
mode (DropToken on). This is accounting of VATT's towers, so it reads VATT's parameter tree.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import jax
import ml_collections

from vatt_jax.models.vatt import MODALITIES, VATT, VattModel

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
