"""VTM negatives, the VTM and MLM losses and BERT's masking (vatt_jax/losses/matching.py), against
float64 numpy references and statistics of many draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vatt_jax.losses import matching


def _softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def test_negatives_are_never_positives_nor_invalid():
  rng = np.random.default_rng(0)
  m = 9
  sim = rng.normal(size=(m, m)) * 5
  pos = rng.random((m, m)) < 0.4
  np.fill_diagonal(pos, True)
  pos[3] = True  # row 3: every column a positive, no negative
  valid = np.ones(m, bool)
  valid[5] = False
  keys = jax.random.split(jax.random.key(1), 200)
  idx, has = jax.vmap(lambda k: matching.sample_negatives(k, sim, pos, valid))(keys)
  idx, has = np.asarray(idx), np.asarray(has)
  expect_has = valid & np.any(~pos & valid[None, :], axis=1)
  assert (has == expect_has[None, :]).all()
  assert not has[:, 3].any() and not has[:, 5].any()
  rows = np.nonzero(expect_has)[0]
  picked = idx[:, rows]
  assert not pos[rows[None, :], picked].any()
  assert (picked != 5).all()  # an invalid column is never drawn


def test_negatives_follow_the_softmax_of_the_non_positives():
  rng = np.random.default_rng(1)
  m, draws = 5, 20000
  sim = rng.normal(size=(m, m)) * 1.5
  pos = np.eye(m, dtype=bool)
  pos[0, 2] = True
  idx, _ = jax.vmap(lambda k: matching.sample_negatives(k, sim, pos))(
    jax.random.split(jax.random.key(2), draws)
  )
  idx = np.asarray(idx)
  for i in range(m):
    logits = np.where(pos[i], -np.inf, sim[i].astype(np.float64))
    want = _softmax(logits)
    got = np.bincount(idx[:, i], minlength=m) / draws
    # 5 standard errors of a binomial proportion
    tol = 5 * np.sqrt(want * (1 - want) / draws) + 1e-9
    assert (np.abs(got - want) <= tol).all(), (i, got, want)


def test_vtm_loss_matches_a_float64_reference():
  rng = np.random.default_rng(3)
  m = 4
  logits = rng.normal(size=(3 * m, 2)).astype(np.float32)
  weights = (rng.random(3 * m) < 0.7).astype(np.float32)
  weights[0] = 1
  loss, terms = matching.vtm_loss(jnp.asarray(logits), jnp.asarray(weights))
  labels = np.r_[np.ones(m), np.zeros(2 * m)].astype(int)
  lp = np.log(_softmax(logits.astype(np.float64)))
  nll = -lp[np.arange(3 * m), labels]
  np.testing.assert_allclose(loss, (nll * weights).sum() / weights.sum(), rtol=1e-5)
  acc = ((logits.argmax(1) == labels) * weights).sum() / weights.sum()
  np.testing.assert_allclose(terms['vtm_accuracy'], acc, rtol=1e-6)
  zero, _ = matching.vtm_loss(jnp.asarray(logits), jnp.zeros(3 * m))
  assert float(zero) == 0.0


def test_vtm_loss_wants_three_groups():
  with pytest.raises(ValueError, match=r'\[3M, 2\]'):
    matching.vtm_loss(jnp.zeros((4, 2)), jnp.ones(4))


def test_mask_tokens_rates_and_padding():
  vocab, mask_id = 50, 53
  rng = np.random.default_rng(4)
  batch, width = 400, 24
  lengths = rng.integers(1, width + 1, batch)
  ids = rng.integers(1, vocab, (batch, width))
  ids = np.where(np.arange(width)[None] < lengths[:, None], ids, 0).astype(np.int32)
  valid = np.ones(batch, bool)
  valid[:10] = False
  out, labels = matching.mask_tokens(
    jax.random.key(5), jnp.asarray(ids), mask_id=mask_id, vocab_size=vocab, valid=valid
  )
  out, labels = np.asarray(out), np.asarray(labels)
  chosen = labels != matching.IGNORE
  real = (ids > 0) & valid[:, None]
  assert not chosen[~real].any()  # padding and invalid rows are never chosen
  assert (out[~chosen] == ids[~chosen]).all()
  assert (labels[chosen] == ids[chosen]).all()
  n = real.sum()
  rate = chosen.sum() / n
  assert abs(rate - 0.15) < 5 * np.sqrt(0.15 * 0.85 / n)
  k = chosen.sum()
  masked = (out[chosen] == mask_id).mean()
  assert abs(masked - 0.8) < 5 * np.sqrt(0.8 * 0.2 / k)
  # the 10 % random ids: uniform over [1, vocab), so an unchanged id is 10 % + 10 %/49
  unchanged = (out[chosen] == ids[chosen]).mean()
  p_same = 0.1 + 0.1 / (vocab - 1)
  assert abs(unchanged - p_same) < 5 * np.sqrt(p_same * (1 - p_same) / k)
  others = out[chosen & (out != mask_id)]
  assert ((others >= 1) & (others < vocab)).all()


def test_mask_tokens_refuses_bad_probability():
  with pytest.raises(ValueError, match='probability'):
    matching.mask_tokens(jax.random.key(0), jnp.ones((2, 3), jnp.int32), mask_id=9, vocab_size=8,
                         probability=1.0)  # fmt: skip


def test_mlm_loss_matches_a_float64_reference():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, (3, 5))
  labels[rng.random((3, 5)) < 0.5] = matching.IGNORE
  labels[0, 0] = 2
  loss, terms = matching.mlm_loss(jnp.asarray(logits), jnp.asarray(labels))
  lp = np.log(_softmax(logits.astype(np.float64)))
  sel = labels != matching.IGNORE
  want = -lp[sel, labels[sel]].mean()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert float(terms['mlm_tokens']) == sel.sum()
  none, _ = matching.mlm_loss(jnp.asarray(logits), jnp.full((3, 5), matching.IGNORE))
  assert float(none) == 0.0
