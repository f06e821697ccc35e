"""Evaluation metrics for VATT: retrieval ranks, top-k accuracy, AudioSet-style multi-label.

Everything here is plain numpy and computed in float64.

Tie rule (retrieval and top-k alike): candidates are ordered by score, highest first, and
equal scores are broken deterministically by index (a stable order: the lower index comes
first). The rank of a query is therefore

  1 + #{incorrect j : s[j] > s[b]} + #{incorrect j : s[j] == s[b] and j < b},

where ``b`` is the best-placed correct target in that order. Correct targets (members of the
query's group) never push each other down.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

_CHUNK = 1024  # queries per block, bounds the [chunk, T] temporaries


def _scores_2d(x: Any, name: str) -> np.ndarray:
  a = np.asarray(x, dtype=np.float64)
  if a.ndim != 2:
    raise ValueError(f'{name} must be 2-D, got shape {a.shape}')
  if a.shape[0] == 0 or a.shape[1] == 0:
    raise ValueError(f'{name} must be non-empty, got shape {a.shape}')
  if np.isnan(a).any():
    raise ValueError(f'{name} contains NaN')
  return a


def _groups(x: Any, n: int, name: str) -> list[Hashable]:
  keys = list(x)
  if len(keys) != n:
    raise ValueError(f'{name} must have length {n}, got {len(keys)}')
  for k in keys:
    try:
      hash(k)
    except TypeError as e:
      raise ValueError(f'{name} entries must be hashable, got {type(k).__name__}') from e
  return keys


def _codes(query_keys: Sequence[Hashable], target_keys: Sequence[Hashable]):
  table: dict[Hashable, int] = {}
  tc = np.array([table.setdefault(k, len(table)) for k in target_keys], dtype=np.int64)
  qc = np.array([table.get(k, -1) for k in query_keys], dtype=np.int64)
  return qc, tc


def _stable_ranks(s: np.ndarray, correct: np.ndarray) -> np.ndarray:
  """1-based rank of the best correct column per row of ``s`` [N, M] under the tie rule."""
  masked = np.where(correct, s, -np.inf)
  best = masked.max(axis=1, keepdims=True)
  # Lowest-index correct column attaining the best score (also handles a best score of -inf).
  b = np.argmax(correct & (s == best), axis=1)[:, None]
  idx = np.arange(s.shape[1])[None, :]
  wrong = ~correct
  above = wrong & ((s > best) | ((s == best) & (idx < b)))
  return 1 + above.sum(axis=1)


def retrieval_metrics(
  similarity: Any,
  query_to_target: Any = None,
  *,
  ks: Sequence[int] = (1, 5, 10),
  query_groups: Any = None,
  target_groups: Any = None,
  correct: Any = None,
) -> dict[str, Any]:
  """Recall@k, median and mean rank for a [Q, T] similarity matrix (higher = more similar).

  Correct targets of query i are the targets j with ``key_t(j) == key_q(i)``, where
  ``key_t(j) = target_groups[j]`` (default ``j``) and
    * with ``query_to_target`` [Q] ints: ``key_q(i) = key_t(query_to_target[i])`` (e.g. several
      captions per video: caption -> its video; all targets sharing that target's group count);
    * else with ``query_groups`` [Q]: ``key_q(i) = query_groups[i]``; if only ``query_groups``
      is given (requires Q == T, pair i <-> i) it is also used as ``key_t``;
    * else (requires Q == T): ``key_q(i) = key_t(i)``, i.e. the diagonal.
    * or with ``correct`` [Q, T] bool, given directly (many-to-many: a caption shared by several
      videos is correct for each of them); it excludes the three arguments above.
  Ties are broken by target index (see the module docstring). Returns ``{'R<k>': % for k in ks,
  'MedR': float, 'MeanR': float, 'ranks': int ndarray [Q]}``.
  """
  s = _scores_2d(similarity, 'similarity')
  nq, nt = s.shape
  ks = tuple(int(k) for k in ks)
  if any(k < 1 for k in ks):
    raise ValueError(f'ks must be positive integers, got {ks}')
  if correct is not None:
    if query_to_target is not None or query_groups is not None or target_groups is not None:
      raise ValueError('correct cannot be combined with query_to_target or groups')
    correct = np.asarray(correct)
    if correct.shape != (nq, nt) or correct.dtype != bool:
      raise ValueError(f'correct must be a bool array of shape ({nq}, {nt}), got {correct.shape}')
    if not correct.any(axis=1).all():
      raise ValueError(
        f'correct: query {int(np.argmin(correct.any(axis=1)))} has no correct target'
      )
    return _summarise(s, lambda lo, hi: correct[lo:hi], ks)
  if query_to_target is not None and query_groups is not None:
    raise ValueError('query_groups cannot be combined with query_to_target')
  if query_to_target is None and (query_groups is None or target_groups is None) and nq != nt:
    raise ValueError(
      f'similarity must be square ({nq}x{nt}) unless query_to_target or both groups are given'
    )
  if target_groups is not None:
    tkeys = _groups(target_groups, nt, 'target_groups')
  elif query_groups is not None and query_to_target is None:
    tkeys = _groups(query_groups, nq, 'query_groups')
  else:
    tkeys = list(range(nt))
  if query_to_target is not None:
    q2t = np.asarray(query_to_target)
    if q2t.shape != (nq,) or not np.issubdtype(q2t.dtype, np.integer):
      raise ValueError(f'query_to_target must be an int array of shape ({nq},), got {q2t.shape}')
    if (q2t < 0).any() or (q2t >= nt).any():
      raise ValueError(f'query_to_target entries must lie in [0, {nt})')
    qkeys = [tkeys[int(j)] for j in q2t]
  elif query_groups is not None:
    qkeys = _groups(query_groups, nq, 'query_groups')
  else:
    qkeys = tkeys[:nq]
  qc, tc = _codes(qkeys, tkeys)
  if (qc < 0).any():
    raise ValueError(f'query_groups: query {int(np.argmax(qc < 0))} has no correct target')

  return _summarise(s, lambda lo, hi: qc[lo:hi, None] == tc[None, :], ks)


def _summarise(s: np.ndarray, correct_rows, ks: tuple[int, ...]) -> dict[str, Any]:
  nq = s.shape[0]
  ranks = np.empty(nq, dtype=np.int64)
  for lo in range(0, nq, _CHUNK):
    hi = min(lo + _CHUNK, nq)
    ranks[lo:hi] = _stable_ranks(s[lo:hi], correct_rows(lo, hi))
  out: dict[str, Any] = {f'R{k}': 100.0 * float(np.mean(ranks <= k)) for k in ks}
  out['MedR'] = float(np.median(ranks))
  out['MeanR'] = float(np.mean(ranks))
  out['ranks'] = ranks
  return out


def topk_accuracy(logits: Any, labels: Any, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """Top-k accuracy in percent, ``{'top<k>': %}``; ties broken by class index (lower first).

  A class with a logit equal to the label's and a lower index counts against the label. For
  k >= number of classes the accuracy is 100 %.
  """
  x = _scores_2d(logits, 'logits')
  n, c = x.shape
  y = np.asarray(labels)
  if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'labels must be an int array of shape ({n},), got {y.shape} {y.dtype}')
  if (y < 0).any() or (y >= c).any():
    raise ValueError(f'labels must lie in [0, {c})')
  ks = tuple(int(k) for k in ks)
  if any(k < 1 for k in ks):
    raise ValueError(f'ks must be positive integers, got {ks}')
  ranks = _stable_ranks(x, np.arange(c)[None, :] == y[:, None])
  return {f'top{k}': 100.0 * float(np.mean(ranks <= k)) for k in ks}


def multilabel_metrics(scores: Any, targets: Any) -> dict[str, float | int]:
  """AudioSet-style multi-label metrics over [N, C] scores and binary targets.

  ``mAP``: mean over classes of ``sklearn.metrics.average_precision_score``; ``AUC``: mean of
  ``roc_auc_score``; ``d_prime = sqrt(2) * norm.ppf(AUC)``. Classes without a positive or
  without a negative are skipped and counted in ``skipped_classes``.
  """
  from scipy.stats import norm
  from sklearn.metrics import average_precision_score, roc_auc_score

  x = _scores_2d(scores, 'scores')
  t = np.asarray(targets)
  if t.shape != x.shape:
    raise ValueError(f'targets must have shape {x.shape}, got {t.shape}')
  if not np.isin(t, (0, 1)).all():
    raise ValueError('targets must be binary (0/1)')
  t = t.astype(np.int64)
  pos = t.sum(axis=0)
  keep = np.flatnonzero((pos > 0) & (pos < t.shape[0]))
  if keep.size == 0:
    raise ValueError('targets: every class lacks a positive or a negative example')
  aps = [average_precision_score(t[:, c], x[:, c]) for c in keep]
  aucs = [roc_auc_score(t[:, c], x[:, c]) for c in keep]
  auc = float(np.mean(aucs))
  return {
    'mAP': float(np.mean(aps)),
    'AUC': auc,
    'd_prime': float(np.sqrt(2.0) * norm.ppf(auc)),
    'skipped_classes': int(t.shape[1] - keep.size),
  }
