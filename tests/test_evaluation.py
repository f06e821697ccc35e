"""Embedding extraction, zero-shot retrieval with duplicate captions, chance levels and plots."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT, load_config
from vatt_jax import plots
from vatt_jax.evaluation import embeddings as emb
from vatt_jax.evaluation import retrieval
from vatt_jax.models import build_model


@pytest.fixture(scope='module')
def tiny():
  config = load_config(ROOT / 'configs' / 'demo_tiny.py', 'runlocal')
  model = build_model(config.model)
  example = {k: jnp.zeros(s.shape, s.dtype) for k, s in model.example_batch(2).items()}
  variables = model.init(jax.random.key(0), example)
  # Batch norm at init has mean 0 / var 1: give it statistics so the eval path is not an identity.
  rng = np.random.default_rng(0)
  variables['batch_stats'] = jax.tree.map(
    lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype), variables['batch_stats']
  )
  return config, model, variables


def _inputs(config, n, rng):
  m = config.model
  side = m.video.frame_size
  return {
    'video': rng.uniform(-1, 1, (n, m.video.num_frames, side, side, 3)).astype(np.float32),
    'audio': rng.uniform(-1, 1, (n, m.audio.num_samples)).astype(np.float32),
    'text': rng.integers(1, m.text.vocab_size, (n, m.text.max_words)).astype(np.int32),
  }


@pytest.mark.slow
def test_embedder_matches_the_model_for_any_batch_size(tiny):
  config, model, variables = tiny
  rng = np.random.default_rng(1)
  x = _inputs(config, 5, rng)
  x['text'][1, 3:] = 0  # padding
  x['text'][2, 1:] = 0
  out = model.module.apply(
    variables, {'video': x['video'], 'audio': x['audio'], 'text': x['text'][:, None]}
  )
  for batch_size in (2, 5, 8):  # last batch padded; one batch; one padded batch
    embedder = emb.Embedder(model, variables, batch_size=batch_size)
    video, audio, text = (embedder(m, x[m]) for m in ('video', 'audio', 'text'))
    np.testing.assert_allclose(video['agg'], out['video_agg'], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(video['va'], out['video_va'], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(video['vt'], out['video_vt'], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(audio['va'], out['audio_va'], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(text['vt'], out['text_vt'][:, 0], rtol=1e-5, atol=1e-5)
    assert set(video) == {'input', 'agg', 'va', 'vt'} and set(audio) == {'input', 'agg', 'va'}
  # The text input space: the word embeddings of the non-padding ids, averaged (float64 reference).
  table = np.asarray(
    variables['params']['text_tower']['tokenizer']['vocabulary']['embedding'], np.float64
  )
  for i, ids in enumerate(x['text']):
    expected = table[ids[ids != 0]].mean(0)
    np.testing.assert_allclose(text['input'][i], expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='has no image embedding'):
    embedder('image', x['video'])


def test_embed_source_averages_the_clips_of_each_record(tiny):
  config, model, variables = tiny
  rng = np.random.default_rng(2)
  k = 3
  clips = _inputs(config, 4 * k, rng)
  batches = [
    {
      'video': clips['video'][i * 2 * k : (i + 1) * 2 * k].reshape(2, k, *clips['video'].shape[1:]),
      'label': np.array([i, i + 5]),
      'media_id': np.array([f'a{i}'.encode(), f'b{i}'.encode()]),
    }
    for i in range(2)
  ]
  embedder = emb.Embedder(model, variables, batch_size=4)
  out = emb.embed_source(iter(batches), embedder, ['video'])
  per_clip = embedder('video', clips['video'])
  for name in ('agg', 'vt', 'input'):
    expected = per_clip[name].reshape(4, k, -1).mean(1)
    np.testing.assert_allclose(out[f'video/{name}'], expected, rtol=1e-5, atol=1e-6)
  assert out['label'].tolist() == [0, 5, 1, 6] and out['media_id'].tolist() == [
    'a0',
    'b0',
    'a1',
    'b1',
  ]
  with pytest.raises(ValueError, match='no clip axis'):
    emb.embed_source(iter([{'video': clips['video'][:2]}]), embedder, ['video'])
  with pytest.raises(ValueError, match='gave no records'):
    emb.embed_source(iter([]), embedder, ['video'])


def test_caption_queries_merge_duplicates():
  videos = ['v0', 'v1', 'v2', 'v3']
  captions = {
    'v0': ['a dog runs', 'A  dog runs '],  # the same caption twice in one video
    'v1': ['a dog runs', 'a cat sleeps'],  # shared with v0
    'v2': ['a bird sings'],
    # v3 has none: a distractor only
  }
  texts, correct = retrieval.caption_queries(videos, captions)
  assert texts == ['a dog runs', 'a cat sleeps', 'a bird sings']
  np.testing.assert_array_equal(correct, [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])


def test_zero_shot_against_hand_computed_ranks():
  # Directions in the plane: cosines are cos(angle difference); norms must not matter.
  angle = lambda deg: np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])  # noqa: E731
  video = np.stack([angle(a) for a in (0, 90, 180, 270)]) * [[1.0], [2.0], [0.5], [3.0]]
  text = np.stack([angle(a) for a in (10, 100, 120)])
  # q0 describes v0 and v1 (a shared caption), q1 describes v3, q2 describes v2.
  correct = np.array([[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], bool)
  out = retrieval.zero_shot(video, text, correct, ks=(1, 2))
  # t2v: q0 → v0 (cos 10°) first: 1; q1 → v3 (cos 170°) last: 4; q2 → v2 (cos 60°) after v1: 2.
  assert out['t2v'] == pytest.approx(
    {'R1': 100 / 3, 'R2': 200 / 3, 'MedR': 2.0, 'MeanR': 7 / 3, 'queries': 3}
  )
  # v2t: v0 → q0: 1; v1 → q0 (cos 80°) after q1 (10°), q2 (30°): 3; v2 → q2 (60°) first: 1;
  # v3 → q1 (cos 170°) after q0 (cos 260°) and q2 (cos 150°): 3.
  assert out['v2t'] == pytest.approx(
    {'R1': 50.0, 'R2': 50.0, 'MedR': 2.0, 'MeanR': 2.0, 'queries': 4}
  )
  # A video without any caption is a distractor for t2v and not a v2t query.
  out = retrieval.zero_shot(
    np.concatenate([video, angle(12)[None]]), text, np.pad(correct, ((0, 0), (0, 1)))
  )
  assert out['v2t']['queries'] == 4 and out['t2v']['R1'] == 0.0  # q0 now prefers the distractor


def test_chance_recall():
  # 1 correct among 10: R@5 chance is 50 %; 2 correct: 1 − C(8,5)/C(10,5) = 1 − 56/252.
  correct = np.zeros((2, 10), bool)
  correct[0, 3] = True
  correct[1, [1, 7]] = True
  assert retrieval.chance_recall(correct, 5) == pytest.approx(100 * (0.5 + 1 - 56 / 252) / 2)
  # Monte-Carlo check of the formula on random rankings.
  rng = np.random.default_rng(0)
  hits = []
  for _ in range(4000):
    order = rng.permutation(10)[:5]
    hits.append([correct[0, order].any(), correct[1, order].any()])
  assert 100 * np.mean(hits) == pytest.approx(retrieval.chance_recall(correct, 5), abs=2.0)


def test_plots_are_written(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 10)
  x = rng.normal(size=(30, 8)) + labels[:, None]
  path = plots.tsne_grid(
    [[('a', x, labels), ('b', x[:, :4], labels)], [('c', x * 2, labels)]], str(tmp_path / 't.png')
  )
  pos, neg = plots.pair_similarities(x, x + 0.1 * rng.normal(size=x.shape))
  assert pos.shape == (30,) and neg.shape == (870,) and pos.mean() > neg.mean()
  hist = plots.similarity_histograms([('pairs', pos, neg)], str(tmp_path / 's.png'))
  metrics_path = tmp_path / 'metrics.jsonl'
  metrics_path.write_text(
    '{"step": 1, "loss": 2.0, "loss_va": 1.0, "learning_rate": 0.1}\n'
    '{"step": 2, "loss": 1.5, "loss_va": 0.9, "learning_rate": 0.2}\n'
    '{"step": 2, "retrieval/t2v/R1": 10.0}\n'
    '{"step": 3, "loss": 1.'  # cut by a crash: skipped
  )
  curves = plots.training_curves(str(metrics_path), str(tmp_path / 'c.png'))
  for p in (path, hist, curves):
    assert open(p, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(ValueError, match='t-SNE needs'):
    plots.tsne_2d(x[:3])


def test_tsne_of_features_without_spread_is_the_origin():
  # sklearn's Barnes-Hut t-SNE crashes the process on identical rows: they map to zeros instead.
  same = np.tile(np.random.default_rng(0).normal(size=(1, 8)), (12, 1))
  for x in (same, np.zeros((12, 8)), same * 1e6):
    points = plots.tsne_2d(x)
    assert points.shape == (12, 2)
    np.testing.assert_array_equal(points, 0.0)
  # Some spread: a real embedding.
  spread = same + np.random.default_rng(1).normal(size=same.shape)
  assert plots.tsne_2d(spread).std(0).min() > 0
  bad = same.copy()
  bad[3, 2] = np.nan
  with pytest.raises(ValueError, match='non-finite'):
    plots.tsne_2d(bad)
  bad[3, 2] = np.inf
  with pytest.raises(ValueError, match='non-finite'):
    plots.tsne_2d(bad)
