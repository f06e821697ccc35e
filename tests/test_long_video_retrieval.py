"""Long-video retrieval: paragraph→video by bucket optimal transport and caption→clip retrieval."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from scipy.special import logsumexp

from configs import common
from tests.test_long_video import _config, shards, tokenizer_path  # noqa: F401 (fixtures)
from vatt_jax.evaluation import build_evaluator
from vatt_jax.evaluation.long_video import paragraph_scores
from vatt_jax.models import build_model


def _bucket_plan(block: np.ndarray, p: float, epsilon: float, iters: int, mass: float):
  """Norton's bucket transport in float64: rows then columns from zero potentials."""
  m, n = block.shape
  z = np.full((m + 1, n + 1), p, np.float64)
  z[:m, :n] = block
  z /= epsilon
  log_a = np.log(np.r_[np.full(m, 1 / (m + n)), n / (m + n)])
  log_b = np.log(np.r_[np.full(n, 1 / (m + n)), m / (m + n)])
  u, v = np.zeros(m + 1), np.zeros(n + 1)
  for _ in range(iters):
    u = log_a - logsumexp(z + v[None, :], axis=1)
    v = log_b - logsumexp(z + u[:, None], axis=0)
  plan = np.exp(z + u[:, None] + v[None, :])[:m, :n]
  return plan * mass / plan.sum()


def test_paragraph_scores_match_a_float64_reference():
  rng = np.random.default_rng(3)
  sizes = [3, 5, 3, 4]  # paragraphs (and videos) of different lengths
  owner = np.repeat(np.arange(len(sizes)), sizes)
  sim = rng.uniform(0, 1, (len(owner), len(owner)))
  ot, mean = paragraph_scores(sim, owner, owner, 0.4, epsilon=0.1, num_iters=50)
  for i in range(len(sizes)):
    for j in range(len(sizes)):
      block = sim[np.ix_(owner == i, owner == j)]
      plan = _bucket_plan(block, 0.4, 0.1, 50, sizes[i])
      np.testing.assert_allclose(ot[i, j], (plan * block).sum(), rtol=2e-5)
      np.testing.assert_allclose(mean[i, j], block.mean(), rtol=1e-6)


def _model_config():
  config = common.pretraining_config(common.model_config())
  common.runlocal(config)
  m = config.model
  m.video.num_frames, m.video.frame_size, m.video.patch_size = 4, 16, (2, 8, 8)
  m.text.vocab_size, m.text.max_words = 128, 4
  return config


@pytest.fixture(scope='module')
def evaluated(shards, tokenizer_path):  # noqa: F811
  config = _model_config()
  config.data = _config(shards, tokenizer_path, clips=2, max_clips=6)
  eval_cfg = ml_collections.ConfigDict(dict(type='long_video_retrieval', split='val', batch_size=2))
  model = build_model(config.model)
  evaluator = build_evaluator(eval_cfg, config, model)
  batch = {k: np.ones(s.shape, s.dtype) for k, s in model.example_batch(2).items()}
  variables = model.init(jax.random.key(0), batch)
  return evaluator, evaluator.run(variables)


@pytest.mark.slow
def test_long_video_retrieval_on_whole_videos_scores_by_bucket_transport(evaluated):
  evaluator, result = evaluated
  e = evaluator.last['embeddings']
  # The readable val videos: 2 captions, 5 captions, 8 captions of which max_clips = 6 are kept.
  np.testing.assert_array_equal(np.bincount(e['video_index']), [2, 5, 6])
  for name in ('p2v_ot', 'p2v_mean', 't2c'):
    for k in ('R1', 'R5', 'R10', 'MedR', 'MeanR'):
      assert np.isfinite(result[f'{name}/{k}']), (name, k)
  assert result['p2v_ot/R5'] == 100.0  # 3 videos: every paragraph's video is in the top 5

  # The scores are the bucket transport of the gallery similarity (one test: under xdist a
  # module fixture would run once per worker).
  last = evaluator.last
  sim, owner, p = last['similarity'], last['embeddings']['video_index'], last['bucket']
  diagonal = np.sort(np.diag(sim))
  assert p == pytest.approx(diagonal[max(1, int(0.3 * len(diagonal))) - 1], rel=1e-6)
  ot, _ = paragraph_scores(sim, owner, owner, p, epsilon=0.1, num_iters=50)
  ranks = last['results']['p2v_ot']['ranks']
  expected = [1 + np.sum(ot[i] > ot[i, i]) + np.sum((ot[i] == ot[i, i])[:i]) for i in range(3)]
  np.testing.assert_array_equal(ranks, expected)
  # Caption→clip: every clip whose caption has the same tokens is a correct target.
  e = last['embeddings']
  captions = [tuple(row) for row in e['text_ids']]
  text = e['text'].astype(np.float64)
  video = e['video'].astype(np.float64)
  cosine = (text / np.linalg.norm(text, axis=1, keepdims=True)) @ (
    video / np.linalg.norm(video, axis=1, keepdims=True)
  ).T
  for q, ranked in enumerate(last['results']['t2c']['ranks']):
    # The first correct target's rank; ties go to the lower target index.
    score = cosine[q]
    rank = [1 + np.sum(score > score[t]) + np.sum(score[:t] == score[t]) for t in range(len(score))]
    assert ranked == min(rank[t] for t in range(len(captions)) if captions[t] == captions[q])


def test_long_video_retrieval_needs_long_video_data(shards, tokenizer_path):  # noqa: F811
  config = _model_config()
  config.data = _config(shards, tokenizer_path)
  del config.data['long_video']
  eval_cfg = ml_collections.ConfigDict(dict(type='long_video_retrieval', split='val'))
  with pytest.raises(ValueError, match='data.long_video'):
    build_evaluator(eval_cfg, config, None)
