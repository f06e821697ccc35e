"""Tests for vatt_jax.evaluation.metrics (hand-computed cases and a brute-force reference)."""

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

from vatt_jax.evaluation.metrics import multilabel_metrics, retrieval_metrics, topk_accuracy


def _brute_ranks(s, qkeys, tkeys):
  ranks = []
  for i in range(s.shape[0]):
    order = np.argsort(-s[i].astype(np.float64), kind='stable')
    r = 1
    for j in order:
      if tkeys[j] == qkeys[i]:
        break
      r += 1
    ranks.append(r)
  return np.array(ranks)


def test_known_3x3():
  s = np.array([[0.9, 0.1, 0.2], [0.8, 0.5, 0.3], [0.1, 0.2, 0.05]])
  m = retrieval_metrics(s)
  np.testing.assert_array_equal(m['ranks'], [1, 2, 3])
  assert m['R1'] == pytest.approx(100 / 3)
  assert m['R5'] == 100.0 and m['R10'] == 100.0
  assert m['MedR'] == 2.0 and m['MeanR'] == 2.0


def test_all_equal_scores_rank_by_index():
  m = retrieval_metrics(np.ones((4, 4)), ks=(1, 2))
  # Every incorrect target with a lower index comes first: rank = 1 + i.
  np.testing.assert_array_equal(m['ranks'], [1, 2, 3, 4])
  assert m['R1'] == 25.0 and m['R2'] == 50.0
  assert m['MedR'] == 2.5 and m['MeanR'] == 2.5  # even Q


def test_duplicate_targets_best_counts():
  s = np.array([[0.1, 0.9, 0.5], [0.9, 0.2, 0.5], [0.7, 0.6, 0.5]])
  m = retrieval_metrics(s, target_groups=['a', 'a', 'b'])
  np.testing.assert_array_equal(m['ranks'], [1, 1, 3])
  np.testing.assert_array_equal(retrieval_metrics(s)['ranks'], [3, 3, 3])
  # Ties within a group: group members never push each other down.
  m = retrieval_metrics(np.ones((3, 3)), target_groups=['a', 'a', 'b'])
  np.testing.assert_array_equal(m['ranks'], [1, 1, 3])
  # Only query_groups (diagonal pairing): used on both sides, e.g. identical captions.
  m = retrieval_metrics(s, query_groups=['x', 'x', 'y'])
  np.testing.assert_array_equal(m['ranks'], [1, 1, 3])


def test_query_to_target_several_captions_per_video():
  s = np.array([[0.9, 0.1], [0.2, 0.3], [0.5, 0.5], [0.5, 0.5], [0.0, 1.0]])
  m = retrieval_metrics(s, [0, 0, 0, 1, 1], ks=(1,))
  np.testing.assert_array_equal(m['ranks'], [1, 2, 1, 2, 1])
  assert m['R1'] == 60.0
  assert m['MedR'] == 1.0 and m['MeanR'] == pytest.approx(7 / 5)  # odd Q


def test_video_to_text_with_groups():
  s = np.array([[0.1, 0.8, 0.9, 0.2], [0.3, 0.3, 0.3, 0.1]])
  m = retrieval_metrics(s, query_groups=[0, 1], target_groups=[0, 0, 1, 1])
  np.testing.assert_array_equal(m['ranks'], [2, 3])
  assert m['MedR'] == 2.5
  # Same through query_to_target (caption index of each video).
  m2 = retrieval_metrics(s, [1, 3], target_groups=[0, 0, 1, 1])
  np.testing.assert_array_equal(m2['ranks'], [2, 3])


def test_correct_matrix_many_to_many():
  # A caption shared by videos 0 and 2 (q0), one only of video 1 (q1).
  s = np.array([[0.2, 0.9, 0.5], [0.4, 0.4, 0.9]])
  correct = np.array([[1, 0, 1], [0, 1, 0]], bool)
  m = retrieval_metrics(s, correct=correct, ks=(1, 2))
  # q0: best correct is video 2 (0.5) behind video 1 (0.9): 2; q1: video 1 (0.4) behind video 2
  # (0.9) and tied with video 0 (0.4, lower index, comes first): 3.
  np.testing.assert_array_equal(m['ranks'], [2, 3])
  assert m['R2'] == 50.0 and m['MedR'] == 2.5
  with pytest.raises(ValueError, match='query 1 has no correct target'):
    retrieval_metrics(s, correct=np.array([[1, 0, 0], [0, 0, 0]], bool))
  with pytest.raises(ValueError, match='bool array of shape'):
    retrieval_metrics(s, correct=correct.astype(int))
  with pytest.raises(ValueError, match='cannot be combined'):
    retrieval_metrics(s, [0, 1], correct=correct)


@pytest.mark.parametrize('seed', range(5))
def test_against_brute_force(seed):
  rng = np.random.default_rng(seed)
  q, t = 37, 23
  s = np.round(rng.normal(size=(q, t)), 1)  # rounding forces many ties
  if seed == 0:
    s = s.astype(np.float32)
  tg = rng.integers(0, 9, size=t)
  q2t = rng.integers(0, t, size=q)
  m = retrieval_metrics(s, q2t, target_groups=tg)
  np.testing.assert_array_equal(m['ranks'], _brute_ranks(s, tg[q2t], tg))
  sq = s[:t]
  m = retrieval_metrics(sq, target_groups=tg)
  np.testing.assert_array_equal(m['ranks'], _brute_ranks(sq, tg, tg))
  m = retrieval_metrics(sq)
  ref = _brute_ranks(sq, np.arange(t), np.arange(t))
  np.testing.assert_array_equal(m['ranks'], ref)
  assert m['R5'] == pytest.approx(100 * np.mean(ref <= 5))
  assert m['MedR'] == np.median(ref)


def test_topk_with_ties():
  logits = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 1.0, 3.0]])
  out = topk_accuracy(logits, np.array([2, 0, 2]), ks=(1, 2, 3, 10))
  # ranks: 3 (two lower-index ties), 1, 3 (3.0 and 2.0 above); k=10 > C -> 100 %.
  assert out == {
    'top1': pytest.approx(100 / 3),
    'top2': pytest.approx(100 / 3),
    'top3': 100.0,
    'top10': 100.0,
  }
  assert set(topk_accuracy(logits, np.array([0, 1, 3]))) == {'top1', 'top5'}


def test_multilabel_matches_sklearn():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(50, 6))
  targets = (rng.random((50, 6)) < 0.3).astype(int)
  targets[:, 4] = 0  # no positive -> skipped
  targets[:, 5] = 1  # no negative -> skipped
  m = multilabel_metrics(scores, targets)
  ap = np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in range(4)])
  auc = np.mean([roc_auc_score(targets[:, c], scores[:, c]) for c in range(4)])
  assert m['mAP'] == pytest.approx(ap) and m['AUC'] == pytest.approx(auc)
  assert m['d_prime'] == pytest.approx(np.sqrt(2) * norm.ppf(auc))
  assert m['skipped_classes'] == 2


def test_d_prime_known_values():
  t = np.array([[1], [1], [0], [0]])
  m = multilabel_metrics(np.zeros((4, 1)), t)  # constant scores -> AUC 0.5
  assert m['AUC'] == 0.5 and m['d_prime'] == pytest.approx(0.0, abs=1e-12)
  m = multilabel_metrics(np.array([[0.9], [0.4], [0.5], [0.1]]), t)  # 3 of 4 pairs ordered
  assert m['AUC'] == 0.75
  assert m['d_prime'] == pytest.approx(np.sqrt(2) * 0.6744897501960817)


@pytest.mark.parametrize(
  'kwargs,name',
  [
    ({'similarity': np.array([[1.0, np.nan], [0.0, 1.0]])}, 'similarity'),
    ({'similarity': np.zeros((0, 0))}, 'similarity'),
    ({'similarity': np.zeros(3)}, 'similarity'),
    ({'similarity': np.zeros((2, 3))}, 'similarity'),
    ({'similarity': np.zeros((2, 3)), 'query_to_target': [0, 5]}, 'query_to_target'),
    ({'similarity': np.zeros((2, 3)), 'query_to_target': [0]}, 'query_to_target'),
    ({'similarity': np.zeros((2, 2)), 'target_groups': [0]}, 'target_groups'),
    ({'similarity': np.zeros((2, 2)), 'query_groups': [0, 1, 2]}, 'query_groups'),
    (
      {'similarity': np.zeros((1, 2)), 'query_groups': [7], 'target_groups': [0, 1]},
      'query_groups',
    ),
    ({'similarity': np.zeros((2, 2)), 'ks': (0,)}, 'ks'),
  ],
)
def test_retrieval_bad_inputs(kwargs, name):
  with pytest.raises(ValueError, match=name):
    retrieval_metrics(**kwargs)


def test_classification_bad_inputs():
  with pytest.raises(ValueError, match='labels'):
    topk_accuracy(np.zeros((2, 3)), np.array([0]))
  with pytest.raises(ValueError, match='labels'):
    topk_accuracy(np.zeros((2, 3)), np.array([0, 3]))
  with pytest.raises(ValueError, match='logits'):
    topk_accuracy(np.full((1, 3), np.nan), np.array([0]))
  with pytest.raises(ValueError, match='targets'):
    multilabel_metrics(np.zeros((2, 3)), np.zeros((2, 2)))
  with pytest.raises(ValueError, match='targets'):
    multilabel_metrics(np.zeros((2, 3)), np.zeros((2, 3)))
  with pytest.raises(ValueError, match='scores'):
    multilabel_metrics(np.zeros((0, 3)), np.zeros((0, 3)))
