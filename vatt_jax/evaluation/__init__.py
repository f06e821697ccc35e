"""Evaluation: metrics, linear probe, retrieval, fine-tuned classification.

Evaluations are config data (DESIGN.md): `config.evals = {name: dict(type=…, log_steps=…, …)}`.
Each type is an evaluator class in `EVALUATORS`, built as `cls(eval_cfg, config, model)`, whose
`run(variables) -> {metric: float}` takes {'params', 'batch_stats'}; the trainer calls it every
`eval_cfg.log_steps` steps and at the end, and the standalone scripts (scripts/linear_probe.py,
scripts/retrieval.py, scripts/evaluate.py) call the same classes on a loaded checkpoint.
"""

from __future__ import annotations

import importlib

import ml_collections

# One dict per kind: eval type → 'module:Class' (imported on use: TensorFlow loads only when needed).
EVALUATORS = {
  'linear_probe': 'vatt_jax.evaluation.linear_probe:LinearProbeEvaluator',
  'retrieval': 'vatt_jax.evaluation.retrieval:RetrievalEvaluator',
  'long_video_retrieval': 'vatt_jax.evaluation.long_video:LongVideoRetrievalEvaluator',
  'classification': 'vatt_jax.evaluation.finetune:ClassificationEvaluator',
}


def build_evaluator(eval_cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict, model):
  """The evaluator named by eval_cfg.type, for a run of `config` with `model`."""
  if eval_cfg.type not in EVALUATORS:
    raise ValueError(f'config evals type {eval_cfg.type!r} is not one of {sorted(EVALUATORS)}')
  module, name = EVALUATORS[eval_cfg.type].split(':')
  return getattr(importlib.import_module(module), name)(eval_cfg, config, model)
