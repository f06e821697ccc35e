"""Tests for the linear-probe classifiers (low-rank softmax and linear SVM)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vatt_jax.evaluation import linear_probe as lp

FAST = lp.LowRankConfig(components=32, steps=300, batch_size=32, learning_rate=5e-3)


def _blobs(seed=0, classes=5, per_class=100, dim=32, sep=4.0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, dim)) * sep / np.sqrt(dim) * 2
  y = np.repeat(np.arange(classes), per_class)
  x = centers[y] + rng.normal(size=(y.size, dim))
  perm = rng.permutation(y.size)
  return x[perm].astype(np.float32), y[perm]


def _split(x, y, frac=0.7):
  n = int(frac * len(y))
  return x[:n], y[:n], x[n:], y[n:]


@pytest.mark.parametrize(
  'components,fraction', [(128, 0.1), (10, 0.1), (3, 0.1), (1, 0.1), (7, 0.5), (5, 1.0)]
)
def test_component_mask_exact_k(components, fraction):
  k = lp.num_kept(components, fraction)
  assert k == max(1, round(fraction * components))
  for i in range(5):
    mask = lp.component_mask(jax.random.PRNGKey(i), components, fraction)
    assert mask.shape == (components,) and mask.dtype == jnp.float32
    assert set(np.unique(np.asarray(mask))) <= {0.0, 1.0}
    assert int(mask.sum()) == k


def test_component_mask_keys_and_uniformity():
  n, frac, trials = 20, 0.2, 2000
  a = lp.component_mask(jax.random.PRNGKey(0), n, frac)
  b = lp.component_mask(jax.random.PRNGKey(1), n, frac)
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  keys = jax.random.split(jax.random.PRNGKey(42), trials)
  masks = np.asarray(jax.vmap(lambda k: lp.component_mask(k, n, frac))(keys))
  freq = masks.mean(0)
  k = lp.num_kept(n, frac)
  # Binomial std is sqrt(p(1-p)/trials) ~ 0.009; allow ~5 sigma.
  np.testing.assert_allclose(freq, k / n, atol=0.05)


def _weights(d=6, n=10, c=4, seed=0):
  ku, kv, kb = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {
    'u': jax.random.normal(ku, (d, n)),
    'v': jax.random.normal(kv, (n, c)),
    'b': jax.random.normal(kb, (c,)),
  }


def test_gradient_only_on_sampled_components():
  w = _weights()
  x = jax.random.normal(jax.random.PRNGKey(3), (8, 6))
  y = jnp.array([0, 1, 2, 3, 0, 1, 2, 3])
  mask = lp.component_mask(jax.random.PRNGKey(5), 10, 0.3)
  g = jax.grad(lp.low_rank_loss)(w, x, y, mask)
  on = np.asarray(mask) > 0
  assert np.all(np.asarray(g['u'])[:, ~on] == 0) and np.all(np.asarray(g['v'])[~on] == 0)
  assert np.all(np.abs(np.asarray(g['u'])[:, on]).sum(0) > 0)
  assert np.all(np.abs(np.asarray(g['v'])[on]).sum(1) > 0)
  assert np.any(np.asarray(g['b']) != 0)


def test_inverted_scaling_matches_eval_in_expectation():
  w = _weights(n=20)
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 6))
  eval_logits = lp.low_rank_logits(w, x)
  # Scale factor is exactly n / k on the kept components.
  mask = lp.component_mask(jax.random.PRNGKey(0), 20, 0.1)
  h = x @ w['u']
  np.testing.assert_allclose(
    lp.low_rank_logits(w, x, mask), (h * mask * 10.0) @ w['v'] + w['b'], rtol=1e-5, atol=1e-5
  )
  # Expectation over masks (k = 5 of 20, so the Monte-Carlo error is small enough to bound).
  keys = jax.random.split(jax.random.PRNGKey(1), 8000)
  train_logits = jax.vmap(lambda k: lp.low_rank_logits(w, x, lp.component_mask(k, 20, 0.25)))(keys)
  scale = float(jnp.abs(eval_logits).mean())
  np.testing.assert_allclose(train_logits.mean(0), eval_logits, atol=0.1 * scale)


@pytest.mark.parametrize('classifier', ['low_rank', 'svm'])
def test_learns_separable_blobs(classifier):
  x, y = _blobs()
  res = lp.evaluate(*_split(x, y), 5, classifier=classifier, config=FAST)
  assert res['top1'] >= 90.0, res
  assert res['top5'] == 100.0


@pytest.mark.parametrize('classifier', ['low_rank', 'svm'])
def test_random_labels_near_chance(classifier):
  x, _ = _blobs(seed=1)
  y = np.random.default_rng(7).integers(0, 5, size=len(x))
  res = lp.evaluate(*_split(x, y), 5, classifier=classifier, config=FAST)
  assert res['top1'] <= 40.0, res


def test_small_n_and_predict_shapes():
  x, y = _blobs(classes=3, per_class=4, dim=8)
  cfg = dataclasses.replace(FAST, steps=20, batch_size=64)
  params = lp.train_low_rank(x, y, 3, cfg)
  assert lp.predict_low_rank(params, x).shape == (12, 3)
  two = y % 2
  model = lp.train_svm(x, two)
  scores = lp.predict_svm(model, x)
  assert scores.shape == (12, 2)
  np.testing.assert_array_equal(scores.argmax(1), model.svm.predict(model.scaler.transform(x)))


def test_deterministic():
  x, y = _blobs(per_class=20, dim=8)
  cfg = dataclasses.replace(FAST, steps=50)
  a, b = lp.train_low_rank(x, y, 5, cfg), lp.train_low_rank(x, y, 5, cfg)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  c = lp.train_low_rank(x, y, 5, dataclasses.replace(cfg, seed=1))
  assert not np.array_equal(a['u'], c['u'])


def test_bad_inputs():
  x, y = _blobs(per_class=5, dim=4)
  cfg = dataclasses.replace(FAST, steps=1)
  with pytest.raises(ValueError, match='labels'):
    lp.train_low_rank(x, y + 5, 5, cfg)
  with pytest.raises(ValueError, match='labels'):
    lp.train_low_rank(x, y[:-1], 5, cfg)
  bad = x.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match='features'):
    lp.train_low_rank(bad, y, 5, cfg)
  with pytest.raises(ValueError, match='train_features'):
    lp.evaluate(bad, y, x, y, 5, config=cfg)
  with pytest.raises(ValueError, match='test_labels'):
    lp.evaluate(x, y, x, -y - 1, 5, config=cfg)
  with pytest.raises(ValueError, match='classifier'):
    lp.evaluate(x, y, x, y, 5, classifier='knn')
  with pytest.raises(ValueError, match='labels'):
    lp.train_svm(x, y[:3])
  with pytest.raises(ValueError, match='config.sample_fraction'):
    lp.train_low_rank(x, y, 5, dataclasses.replace(cfg, sample_fraction=0.0))
