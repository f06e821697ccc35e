"""Multi-view evaluation of a fine-tuned classifier: logits averaged over clips × crops.

An evaluation split (data_pipelines.build with a split other than 'train') gives each example as V
views: video [B, V, T, S, S, 3] with V = data.eval_clips × data.eval_crops (clip-major: the crops
of clip 0, then those of clip 1, …), audio [B, k, N]. Every view goes through the classifier; its
logits are averaged over the V views (`average_views`, as the paper's 4 clips × 3 crops = 12 views
"average the logits … before having the final class predictions"), and the averaged logits are
scored: top-1 / top-5 accuracy (%) for one label per example, mAP / AUC / d′ for multi-hot labels.

  config.evals.test = dict(type='classification', log_steps=1000, split='test', batch_size=8,
                           num_examples=0, data=dict(eval_clips=4, eval_crops=3))

batch_size is global (each process reads its share); num_examples 0 reads the whole split (a
synthetic split never ends: give a number); `data` overrides fields of config.data for this
evaluation only. The same class serves the trainer (`run` every log_steps) and scripts/evaluate.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import data_pipelines
from vatt_jax.evaluation import metrics
from vatt_jax.models import Model

# The rank of one view of each input (the eval layout adds a view axis after the batch axis).
_VIEW_RANK = {'video': 4, 'audio': 1}


def average_views(logits: jax.Array) -> jax.Array:
  """logits [B, V, C] of the V views of each example → [B, C], their mean (float32)."""
  if logits.ndim != 3:
    raise ValueError(f'average_views wants logits [B, V, C], got shape {logits.shape}')
  return jnp.mean(logits.astype(jnp.float32), axis=1)


def with_view_axis(x: np.ndarray, tower: str) -> np.ndarray:
  """[B, V, …] as it is, or a train-layout [B, …] (e.g. the synthetic source) as [B, 1, …]."""
  rank = x.ndim - 1
  if rank == _VIEW_RANK[tower] + 1:
    return x
  if rank == _VIEW_RANK[tower]:
    return x[:, None]
  raise ValueError(f'{tower} batch of shape {x.shape} is neither [B, V, …] nor [B, …]')


class ClassificationEvaluator:
  """See the module docstring. Built as `cls(eval_cfg, config, model)` (vatt_jax.evaluation)."""

  def __init__(
    self, eval_cfg: ml_collections.ConfigDict, config: ml_collections.ConfigDict, model: Model
  ):
    self.num_classes = int(model.num_classes)
    if self.num_classes < 1:
      raise ValueError(
        f'the classification evaluation needs a classifier, not model {model.name!r}'
      )
    self.classify = model.classify()
    self.tower = next(m for m in model.inputs if m in _VIEW_RANK)  # the input it classifies
    self.split = eval_cfg.get('split', 'test')
    if self.split == 'train':
      raise ValueError("config evals: a classification evaluation reads a split other than 'train'")
    self.batch_size = int(eval_cfg.get('batch_size', config.batch_size))
    self.num_examples = int(eval_cfg.get('num_examples', 0))
    if self.batch_size < 1 or self.batch_size % jax.process_count():
      raise ValueError(
        f'config evals batch_size={self.batch_size} must be >= 1 and divide over '
        f'{jax.process_count()} processes'
      )
    self.ks = tuple(int(k) for k in eval_cfg.get('ks', (1, 5)))
    self.data = config.data.copy_and_resolve_references()
    self.data.update(dict(eval_cfg.get('data', {})))
    if self.data.get('eval_crops', 1) < 1 or self.data.get('eval_clips', 1) < 1:
      raise ValueError(
        f'config evals data: eval_clips={self.data.get("eval_clips")} and '
        f'eval_crops={self.data.get("eval_crops")} must be >= 1'
      )
    if self.data.name == 'synthetic' and self.num_examples < 1:
      raise ValueError(
        'config evals num_examples must be set (> 0) on the synthetic source: its splits never end'
      )
    self.seed = int(config.get('seed', 0))
    self._forward = jax.jit(self._views_forward)

  def _views_forward(self, variables: dict, views: jax.Array) -> tuple[jax.Array, jax.Array]:
    """views [B, V, …] → (averaged logits [B, C], per-view logits [B, V, C])."""
    batch, num_views = views.shape[:2]
    flat = views.reshape((batch * num_views, *views.shape[2:]))
    logits = self.classify(variables, {self.tower: flat})
    per_view = logits.reshape(batch, num_views, -1).astype(jnp.float32)
    return average_views(per_view), per_view

  def _source(self):
    return data_pipelines.build(
        self.data, self.split, batch_size=self.batch_size, seed=self.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip

  def predict(self, variables: dict) -> dict[str, np.ndarray]:
    """This process's share of the split: {'logits': [N, C] averaged, 'view_logits': [N, V, C],
    'label': [N] int or [N, C]}; with several processes, every process's rows (all-gathered)."""
    variables = _local_variables(variables)
    local = self.batch_size // jax.process_count()
    limit = self.num_examples // jax.process_count() if self.num_examples else None
    source = self._source()
    parts = {'logits': [], 'view_logits': [], 'label': []}
    count = 0
    try:
      for batch in source:
        views = with_view_axis(np.asarray(batch[self.tower]), self.tower)
        label = np.asarray(batch['label'])
        n = len(views)
        if limit is not None:
          n = min(n, limit - count)
        if n <= 0:
          break
        if len(views) < local:  # the last batch: pad, so one shape compiles once
          pad = np.zeros((local - len(views), *views.shape[1:]), views.dtype)
          views = np.concatenate([views, pad])
        mean, per_view = jax.device_get(self._forward(variables, views))
        parts['logits'].append(np.asarray(mean[:n]))
        parts['view_logits'].append(np.asarray(per_view[:n]))
        parts['label'].append(label[:n])
        count += n
        if limit is not None and count >= limit:
          break
    finally:
      if hasattr(source, 'close'):
        source.close()
    if not count:
      raise ValueError(f'the {self.split!r} split of config.data gave no examples to evaluate')
    out = {k: np.concatenate(v) for k, v in parts.items()}
    return _gather_rows(out) if jax.process_count() > 1 else out

  def score(self, predictions: dict[str, np.ndarray]) -> dict[str, float]:
    """Metrics of `predict`'s output (see the module docstring)."""
    logits, label = predictions['logits'], predictions['label']
    if label.ndim == 2:  # multi-hot: AudioSet-style metrics over the averaged logits
      result = metrics.multilabel_metrics(logits, label)
      result['num_examples'] = len(label)
      return {k: float(v) for k, v in result.items()}
    labelled = label >= 0
    if not labelled.any():
      raise ValueError(f'no example of the {self.split!r} split carries a label')
    label = label[labelled].astype(np.int64)
    if label.max() >= self.num_classes:
      raise ValueError(
        f'the {self.split!r} split has label {int(label.max())}, out of range for config '
        f'model.num_classes={self.num_classes}'
      )
    result = metrics.topk_accuracy(logits[labelled], label, self.ks)
    per_view = predictions['view_logits'][labelled]
    # Single-view accuracy (each view scored alone, averaged over the views): what the multi-view
    # average adds.
    result['top1_single_view'] = float(
      np.mean([metrics.topk_accuracy(per_view[:, v], label, (1,))['top1'] for v in
               range(per_view.shape[1])])
    )  # fmt: skip
    result['num_examples'] = int(labelled.sum())
    result['num_views'] = int(per_view.shape[1])
    return {k: float(v) for k, v in result.items()}

  def run(self, variables: dict) -> dict[str, float]:
    """{'params', 'batch_stats'} → {metric: value} over the evaluation split."""
    return self.score(self.predict(variables))


def _local_variables(variables: dict) -> dict:
  """Parameters this process can compute with: as they are on one process (a single device, or
  sharded over the local mesh), all-gathered to host arrays when they span several processes."""
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  if jax.process_count() == 1:
    return variables
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(variables, tiled=True)


def _gather_rows(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every process's rows, in process order (rows padded to the longest share, then cut)."""
  from jax.experimental import multihost_utils

  counts = multihost_utils.process_allgather(np.array([len(parts['logits'])]))
  counts = np.asarray(counts).reshape(-1)
  most = int(counts.max())
  out = {}
  for key, value in parts.items():
    padded = np.zeros((most, *value.shape[1:]), value.dtype)
    padded[: len(value)] = value
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # [P, most, …]
    out[key] = np.concatenate([gathered[p, : counts[p]] for p in range(len(counts))])
  return out
