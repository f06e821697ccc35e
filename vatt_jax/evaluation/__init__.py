"""Evaluation: metrics, linear probe, retrieval (cosine or pair score), long-video retrieval,
multiple choice (EgoMCQ-format questions: a text query, video clips as choices), fine-tuned
classification.

Evaluations are config data (DESIGN.md): `config.evals = {name: dict(type=…, log_steps=…, …)}`.
Each type is an evaluator class in `EVALUATORS`, built as `cls(eval_cfg, config, model)` with the
run's model (the contract object of vatt_jax/models/contract.py: evaluators use its declared
functions, never its modules), whose `run(variables) -> {metric: float}` takes {'params',
'batch_stats'}; the trainer calls it every `eval_cfg.log_steps` steps and at the end, and the
standalone scripts (scripts/linear_probe.py, scripts/retrieval.py, scripts/evaluate.py,
scripts/report.py) call the same classes on a loaded checkpoint.
"""

from __future__ import annotations

import ml_collections

from vatt_jax.evaluation.finetune import ClassificationEvaluator
from vatt_jax.evaluation.linear_probe import LinearProbeEvaluator
from vatt_jax.evaluation.long_video import LongVideoRetrievalEvaluator
from vatt_jax.evaluation.multiple_choice import MultipleChoiceEvaluator
from vatt_jax.evaluation.retrieval import RetrievalEvaluator
from vatt_jax.models import Model

# One dict per kind: eval type → evaluator class.
EVALUATORS = {
  'linear_probe': LinearProbeEvaluator,
  'retrieval': RetrievalEvaluator,
  'long_video_retrieval': LongVideoRetrievalEvaluator,
  'multiple_choice': MultipleChoiceEvaluator,
  'classification': ClassificationEvaluator,
}


def build_evaluator(
  eval_cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict, model: Model
):
  """The evaluator named by eval_cfg.type, for a run of `config` with `model`."""
  if eval_cfg.type not in EVALUATORS:
    raise ValueError(f'config evals type {eval_cfg.type!r} is not one of {sorted(EVALUATORS)}')
  return EVALUATORS[eval_cfg.type](eval_cfg, config, model)
