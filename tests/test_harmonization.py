"""Cross-modality gradient harmonization (vatt_jax/optim/harmonization.py) against float64 numpy.

The reference below is written from the rule, not from the implementation (which works on per-leaf
Gram matrices). For K per-loss gradients g_0 … g_{K−1} (pytrees), loss i *uses* a leaf when its
gradient there is not all zero, and losses i and j *share* the leaves both use. For i = 0 … K−1:
ĝ_i starts at g_i; for j = 0 … K−1 ascending (j ≠ i), with the current ĝ_i,

  if ⟨ĝ_i, g_j⟩_S(i,j) < 0:  ĝ_i ← ĝ_i − ⟨ĝ_i, g_j⟩_S(i,j) / ‖g_j‖²_S(i,j) · g_j  on the leaves S(i,j),

dots and norms taken over S(i, j) only; the update is Σ_i ĝ_i. The 'per_leaf' domain applies the
same rule to every leaf on its own. The cosine of a pair is taken over its shared leaves too (0
when they share none). The curriculum applies a step iff the smallest pairwise cosine > γ(t).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import data_pipelines
from configs import common
from tests.conftest import ROOT, load_config
from vatt_jax.losses import build_loss, loss_components
from vatt_jax.models import build_model
from vatt_jax.models.contract import forward_objective
from vatt_jax.optim import build_optimizer, harmonized
from vatt_jax.optim import harmonization as hz
from vatt_jax.train import sharding, trainer
from vatt_jax.train.logging import GRADIENTS_FILENAME, MetricLogger
from vatt_jax.train.state import TrainState
from vatt_jax.train.step import make_train_step

RTOL = 1e-5

# Jitted once per (shapes, K, domain): op-by-op execution would compile every primitive anyway.
_realigned = jax.jit(hz.realigned_sum, static_argnames=('domain',))
_cosines = jax.jit(lambda stacked: hz.cosines(*hz.leaf_grams(stacked)))
_alignment = jax.jit(hz.alignment)

# ----------------------------------------------------------------------------------------------
# float64 numpy reference
# ----------------------------------------------------------------------------------------------


def _uses(leaves) -> list[list[bool]]:
  """uses[l][i]: loss i's gradient is not all zero on leaf l."""
  return [[bool(np.any(leaf[i] != 0)) for i in range(leaf.shape[0])] for leaf in leaves]


def ref_realigned_sum(leaves, domain='global', *, shared_only=True):
  """leaves: arrays [K, ...] → the list of Σ_i ĝ_i per leaf (float64).

  shared_only=False measures dots and norms over every leaf (and projects on every leaf): the
  naive rule, only used to show that a test tells the two apart."""
  leaves = [np.asarray(x, np.float64) for x in leaves]
  if domain == 'per_leaf':
    return [ref_realigned_sum([x], shared_only=shared_only)[0] for x in leaves]
  k = leaves[0].shape[0]
  uses = _uses(leaves)
  out = [np.zeros(x.shape[1:]) for x in leaves]
  for i in range(k):
    g_hat = [x[i].copy() for x in leaves]
    for j in range(k):
      if j == i:
        continue
      shared = [
        index
        for index in range(len(leaves))
        if not shared_only or (uses[index][i] and uses[index][j])
      ]
      dot = sum(float(np.vdot(g_hat[index], leaves[index][j])) for index in shared)
      norm = sum(float(np.vdot(leaves[index][j], leaves[index][j])) for index in shared)
      if dot < 0 and norm > 0:
        for index in shared:
          g_hat[index] = g_hat[index] - dot / norm * leaves[index][j]
    for index in range(len(leaves)):
      out[index] += g_hat[index]
  return out


def ref_cosines(leaves) -> np.ndarray:
  """[K, K] cosines over the leaves each pair shares, 0 where they share none (float64)."""
  leaves = [np.asarray(x, np.float64) for x in leaves]
  k = leaves[0].shape[0]
  uses = _uses(leaves)
  cos = np.zeros((k, k))
  for i in range(k):
    for j in range(k):
      shared = [index for index in range(len(leaves)) if uses[index][i] and uses[index][j]]
      dot = sum(float(np.vdot(leaves[s][i], leaves[s][j])) for s in shared)
      norm_i = sum(float(np.vdot(leaves[s][i], leaves[s][i])) for s in shared)
      norm_j = sum(float(np.vdot(leaves[s][j], leaves[s][j])) for s in shared)
      cos[i, j] = dot / math.sqrt(norm_i * norm_j) if norm_i * norm_j > 0 else 0.0
  return cos


# ----------------------------------------------------------------------------------------------
# random K-stacked gradients
# ----------------------------------------------------------------------------------------------

# Leaves of different ranks and sizes (each of at least 3 elements, for Gram–Schmidt with K = 3).
SHAPES = {'a': (3, 4), 'b': {'c': (5,), 'd': (2, 2, 3)}}


def _stack(per_loss_flat: list[list[np.ndarray]]):
  """[K][L] float arrays → the K-stacked float32 pytree of SHAPES."""
  leaves = [np.stack([g[index] for g in per_loss_flat]) for index in range(len(per_loss_flat[0]))]
  treedef = jax.tree.structure(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  return jax.tree.unflatten(treedef, [x.astype(np.float32) for x in leaves])


def _shapes() -> list[tuple]:
  return jax.tree.leaves(SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def random_stacked(rng: np.random.Generator, k: int, case: str):
  """K-stacked gradients of SHAPES for one of the cases below (fresh random values)."""
  base = [rng.normal(size=s) for s in _shapes()]
  grads = [base]
  for j in range(1, k):
    noise = [rng.normal(size=s) for s in _shapes()]
    if case == 'conflicting':  # every pair with g_0 points away from it, on every leaf
      g = [-0.6 * b + 0.8 * n for b, n in zip(base, noise, strict=True)]
    elif case == 'mixed':  # conflicting on some leaves, aligned on others
      signs = [(-1) ** (index + j) for index in range(len(base))]
      g = [s * 0.7 * b + 0.6 * n for s, b, n in zip(signs, base, noise, strict=True)]
    elif case == 'aligned':  # every coordinate of the same sign: positive dots on any subset
      g = [b * rng.uniform(0.2, 1.5, size=b.shape) for b in base]
    elif case == 'orthogonal':  # orthogonal to all earlier gradients on every leaf
      g = []
      for index, n in enumerate(noise):
        for earlier in grads:
          e = earlier[index]
          n = n - np.vdot(n, e) / np.vdot(e, e) * e
        g.append(n)
    elif case == 'one_zero':  # the last gradient is zero, the others conflict
      g = (
        [np.zeros(s) for s in _shapes()]
        if j == k - 1
        else [-0.6 * b + 0.8 * n for b, n in zip(base, noise, strict=True)]
      )
    elif case == 'all_zero':
      g = [np.zeros(s) for s in _shapes()]
    else:
      raise ValueError(case)
    grads.append(g)
  if case == 'all_zero':
    grads[0] = [np.zeros(s) for s in _shapes()]
  return _stack(grads)


def _leaves64(tree) -> list[np.ndarray]:
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _assert_tree_close(actual, expected_leaves, rtol=RTOL, atol=None, msg=''):
  actual = jax.tree.leaves(actual)
  assert len(actual) == len(expected_leaves)
  scale = max([float(np.max(np.abs(e))) for e in expected_leaves if e.size] + [1.0])
  for a, e in zip(actual, expected_leaves, strict=True):
    assert np.all(np.isfinite(np.asarray(a))), msg
    np.testing.assert_allclose(
      np.asarray(a, np.float64),
      e,
      rtol=rtol,
      atol=1e-5 * scale if atol is None else atol,
      err_msg=msg,
    )


def _plain_sum(stacked) -> list[np.ndarray]:
  return [x.sum(axis=0) for x in _leaves64(stacked)]


# ----------------------------------------------------------------------------------------------
# 1–3. realignment and cosines against the reference
# ----------------------------------------------------------------------------------------------

CASES = ('conflicting', 'mixed', 'aligned', 'orthogonal', 'one_zero', 'all_zero')


@pytest.mark.parametrize('domain', hz.DOMAINS)
@pytest.mark.parametrize('k', [2, 3])
@pytest.mark.parametrize('case', CASES)
def test_realigned_sum_matches_reference(case, k, domain):
  seed = 100 * CASES.index(case) + 10 * k + hz.DOMAINS.index(domain)
  stacked = random_stacked(np.random.default_rng(seed), k, case)
  leaves = _leaves64(stacked)
  expected = ref_realigned_sum(leaves, domain)
  out = _realigned(stacked, domain=domain)
  assert jax.tree.structure(out) == jax.tree.structure(stacked)
  assert [x.shape for x in jax.tree.leaves(out)] == [x.shape[1:] for x in leaves]
  _assert_tree_close(out, expected, msg=f'{case} K={k} {domain}')
  plain = _plain_sum(stacked)
  if case in ('conflicting', 'mixed'):  # the case projects: the plain sum would fail the test
    gap = max(float(np.max(np.abs(e - p))) for e, p in zip(expected, plain, strict=True))
    assert gap > 0.1, gap
  if case in ('aligned', 'orthogonal', 'all_zero') or (case == 'one_zero' and k == 2):
    _assert_tree_close(out, plain, msg=f'{case} K={k} {domain}: not the plain sum')
  if case == 'one_zero' and k == 2:  # the zero gradient is never projected against: exactly g_0
    for a, x in zip(jax.tree.leaves(out), jax.tree.leaves(stacked), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(x[0]))
  # The cosines the curriculum and the logs use, over shared leaves (0 for a zero gradient).
  cos = np.asarray(_cosines(stacked), np.float64)
  assert np.all(np.isfinite(cos))
  np.testing.assert_allclose(cos, ref_cosines(leaves), rtol=RTOL, atol=1e-5)
  aligned = _alignment(stacked)
  assert float(aligned['grad_cosine']) == pytest.approx(ref_cosines(leaves)[0, 1], abs=1e-5)
  assert float(aligned['grad_conflict']) == float(float(aligned['grad_cosine']) < 0)


@pytest.mark.parametrize('domain', hz.DOMAINS)
def test_paper_example(domain):
  stacked = {'w': jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
  # ĝ_1 = g_1 + ½ g_2 = (½, ½), ĝ_2 = g_2 + g_1 = (0, 1): the update is (½, 3/2).
  np.testing.assert_allclose(np.asarray(_realigned(stacked, domain=domain)['w']), [0.5, 1.5])
  # Both domains are the same on one leaf; over two leaves they differ (here: no global conflict).
  two = {'u': jnp.array([[1.0, 0.0], [-1.0, 1.0]]), 'v': jnp.array([[2.0], [3.0]])}
  out = _realigned(two, domain=domain)
  expected = ref_realigned_sum(_leaves64(two), domain)
  _assert_tree_close(out, expected)
  if domain == 'global':  # ⟨g_1, g_2⟩ = −1 + 6 > 0: the plain sum
    _assert_tree_close(out, _plain_sum(two))


@pytest.mark.parametrize('scale', [1e-11, 1.0, 3e9])
def test_cosine_does_not_underflow_or_overflow(scale):
  g = np.array([[1.0, 2.0, 3.0], [2.0, 1.0, 3.5]])
  expected = g[0] @ g[1] / np.linalg.norm(g[0]) / np.linalg.norm(g[1])
  got = hz.alignment({'w': jnp.asarray(g * scale, jnp.float32)})['grad_cosine']
  assert float(got) == pytest.approx(expected, rel=1e-5)


def test_a_tiny_gradient_still_counts_as_using_its_leaf():
  # Squares of 1e-20 underflow in float32; whether a loss uses a leaf must not depend on them.
  _, used = hz.leaf_grams({'w': jnp.array([[1e-20, 0.0], [-1e-20, 1e-20]]), 'v': jnp.zeros((2, 3))})
  # Leaves in pytree order: 'v' (unused by both), then 'w' (used by both).
  np.testing.assert_array_equal(np.asarray(used), [[False, False], [True, True]])


@pytest.mark.parametrize('domain', hz.DOMAINS)
def test_leaves_of_one_loss_pass_through_and_coefficients_use_shared_leaves(domain):
  rng = np.random.default_rng(7 + hz.DOMAINS.index(domain))
  g0_shared = rng.normal(size=(6,))
  g1_shared = -0.7 * g0_shared + 0.5 * rng.normal(size=(6,))  # the shared leaves conflict
  g0_cube = rng.normal(size=(2, 2, 2))
  g1_cube = -0.5 * g0_cube + 0.5 * rng.normal(size=(2, 2, 2))
  only0, only1 = 3 * rng.normal(size=(4,)), 3 * rng.normal(size=(3,))  # large: norms would show
  stacked = {
    'shared': np.stack([g0_shared, g1_shared]).astype(np.float32),
    'cube': np.stack([g0_cube, g1_cube]).astype(np.float32),
    'only0': np.stack([only0, np.zeros(4)]).astype(np.float32),
    'only1': np.stack([np.zeros(3), only1]).astype(np.float32),
  }
  out = _realigned(stacked, domain=domain)
  np.testing.assert_array_equal(np.asarray(out['only0']), stacked['only0'][0])
  np.testing.assert_array_equal(np.asarray(out['only1']), stacked['only1'][1])
  names = sorted(stacked)  # jax's dict order
  leaves = [np.asarray(stacked[n], np.float64) for n in names]
  expected = ref_realigned_sum(leaves, domain)
  _assert_tree_close(out, expected)
  if domain == 'global':
    # Dots and norms over every leaf (‖g_j‖² including the leaves only g_j uses) give another
    # coefficient on the shared leaves: the test above tells the two apart.
    naive = ref_realigned_sum(leaves, domain, shared_only=False)
    shared = names.index('shared')
    assert np.max(np.abs(naive[shared] - expected[shared])) > 1e-2
  # The cosine is the one over the shared leaves, not over all of them.
  cos = float(_alignment(stacked)['grad_cosine'])
  assert cos == pytest.approx(ref_cosines(leaves)[0, 1], abs=1e-5)
  full = np.concatenate([x[0].ravel() for x in leaves]) @ np.concatenate(
    [x[1].ravel() for x in leaves]
  )
  full /= np.linalg.norm(np.concatenate([x[0].ravel() for x in leaves]))
  full /= np.linalg.norm(np.concatenate([x[1].ravel() for x in leaves]))
  assert abs(cos - full) > 1e-2


@pytest.mark.parametrize('domain', hz.DOMAINS)
def test_three_losses_sharing_some_leaves(domain):
  """K = 3 with leaves used by {0, 1, 2}, {0, 1}, {0, 2} and {2}: the order and the pairwise
  shared sets of the rule."""
  rng = np.random.default_rng(31 + hz.DOMAINS.index(domain))
  v = rng.normal(size=(3, 7))
  v[1] = -0.5 * v[0] + 0.6 * v[1]
  v[2] = -0.4 * v[1] - 0.3 * v[0] + 0.5 * v[2]
  a = rng.normal(size=(3, 2, 3))
  a[1] = -0.8 * a[0] + 0.4 * a[1]
  a[2] = 0.0
  t = rng.normal(size=(3, 4))
  t[2] = -0.6 * t[0] + 0.5 * t[2]
  t[1] = 0.0
  x = np.zeros((3, 5))
  x[2] = rng.normal(size=5)
  stacked = {name: arr.astype(np.float32) for name, arr in dict(a=a, t=t, v=v, x=x).items()}
  leaves = _leaves64(stacked)
  out = _realigned(stacked, domain=domain)
  _assert_tree_close(out, ref_realigned_sum(leaves, domain))
  np.testing.assert_array_equal(np.asarray(out['x']), stacked['x'][2])
  np.testing.assert_allclose(np.asarray(_cosines(stacked)), ref_cosines(leaves), atol=1e-5)


@pytest.mark.parametrize('k', [2, 3])
def test_without_conflict_the_update_is_the_plain_sum(k):
  for seed in range(3):
    stacked = random_stacked(np.random.default_rng(1000 + seed), k, 'aligned')
    for domain in hz.DOMAINS:
      out = _realigned(stacked, domain=domain)
      for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(stacked), strict=True):
        x = np.asarray(x)
        plain = x[0] + x[1] if k == 2 else (x[0] + x[1]) + x[2]  # float32, in loss order
        np.testing.assert_allclose(np.asarray(o), plain, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# 4. the curriculum
# ----------------------------------------------------------------------------------------------

CURRICULUM_STEPS = 16


def _pair_with_cosine(rng: np.random.Generator, cosine: float):
  """K = 2 gradients with the given cosine over their shared leaves ('s', 't'); leaf 'u' is used
  by loss 0 only (large, so counting it would change the cosine)."""
  sizes = (6, 4)
  n = sum(sizes)
  u = rng.normal(size=n)
  u /= np.linalg.norm(u)
  w = rng.normal(size=n)
  w -= (w @ u) * u
  w /= np.linalg.norm(w)
  g0 = rng.uniform(0.5, 2.0) * u
  g1 = rng.uniform(0.5, 2.0) * (cosine * u + math.sqrt(1 - cosine**2) * w)
  stacked = {
    's': np.stack([g0[:6], g1[:6]]).astype(np.float32),
    't': np.stack([g0[6:], g1[6:]]).reshape(2, 2, 2).astype(np.float32),
    'u': np.stack([3 * rng.normal(size=3), np.zeros(3)]).astype(np.float32),
  }
  return stacked, ref_cosines(_leaves64(stacked))[0, 1]


def _cosine_gamma(init, end, steps):
  return lambda t: end + (init - end) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))


SCHEDULES = {
  'constant': (lambda: 0.2, lambda t: 0.2),
  'linear': (
    lambda: optax.linear_schedule(-0.6, 0.6, CURRICULUM_STEPS),
    lambda t: -0.6 + 1.2 * min(t, CURRICULUM_STEPS) / CURRICULUM_STEPS,
  ),
  'cosine': (
    lambda: hz.gamma_schedule(
      ml_collections.ConfigDict(
        dict(gamma_schedule='cosine', gamma_init=-0.7, gamma_end=0.5, gamma_steps=0)
      ),
      CURRICULUM_STEPS - 4,  # total_steps: γ reaches its end before the last steps
    ),
    _cosine_gamma(-0.7, 0.5, CURRICULUM_STEPS - 4),
  ),
}


@pytest.mark.parametrize('schedule', sorted(SCHEDULES))
def test_curriculum_skips_exactly_the_steps_at_or_below_gamma(schedule):
  make, reference_gamma = SCHEDULES[schedule]
  tx = hz.gradient_curriculum(make())
  rng = np.random.default_rng(sorted(SCHEDULES).index(schedule))
  update = jax.jit(tx.update)
  state = tx.init(None)
  assert int(state.count) == 0 and int(state.skipped) == 0
  rejected = []
  for t in range(CURRICULUM_STEPS):
    gamma = reference_gamma(t)
    while True:  # a fresh cosine in [-1, 1], not within 1e-4 of the threshold
      stacked, cos = _pair_with_cosine(rng, rng.uniform(-1, 1))
      if abs(cos - gamma) > 1e-4:
        break
    out, state = update(stacked, state)
    applied = cos > gamma
    if not applied:
      rejected.append(t)
    for name in stacked:  # K-stacked still: the input, or exactly zero
      expected = stacked[name] if applied else np.zeros_like(stacked[name])
      np.testing.assert_array_equal(np.asarray(out[name]), expected, err_msg=f'step {t}')
    assert bool(state.applied) == applied, (t, cos, gamma)
    assert int(state.count) == t + 1
    assert int(state.skipped) == len(rejected)
    assert float(state.cosine) == pytest.approx(cos, abs=1e-5)
    assert float(state.threshold) == pytest.approx(gamma, abs=1e-6)
  assert 0 < len(rejected) < CURRICULUM_STEPS, rejected  # both kinds of steps were seen


def test_curriculum_uses_the_smallest_pairwise_cosine():
  rng = np.random.default_rng(5)
  tx = hz.gradient_curriculum(-0.2)
  update = jax.jit(tx.update)
  seen = set()
  for case in ('mixed', 'aligned') * 3:
    stacked = random_stacked(rng, 3, case)
    cos = ref_cosines(_leaves64(stacked))
    worst = np.min(cos[~np.eye(3, dtype=bool)])
    out, state = update(stacked, tx.init(None))
    assert float(state.cosine) == pytest.approx(worst, abs=1e-5)
    assert bool(state.applied) == (worst > -0.2)
    seen.add(bool(state.applied))
    if not bool(state.applied):
      assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(out))
  # A zero gradient: cosine 0 with anything, no NaN.
  zero = random_stacked(rng, 2, 'one_zero')
  _, state = update(zero, tx.init(None))
  assert float(state.cosine) == 0.0 and bool(state.applied)
  assert seen == {True, False}


def test_gamma_schedule_values():
  cfg = lambda **kw: ml_collections.ConfigDict(dict(gamma_init=-1.0, gamma_end=0.5, **kw))  # noqa: E731
  linear = hz.gamma_schedule(cfg(gamma_schedule='linear', gamma_steps=10), 1000)
  cosine = hz.gamma_schedule(cfg(gamma_schedule='cosine', gamma_steps=0), 20)
  constant = hz.gamma_schedule(cfg(gamma_schedule='constant'), 20)
  reference = _cosine_gamma(-1.0, 0.5, 20)
  for t in (0, 1, 5, 10, 13, 20, 40):
    assert float(linear(t)) == pytest.approx(-1.0 + 1.5 * min(t, 10) / 10, abs=1e-6)
    assert float(cosine(t)) == pytest.approx(reference(t), abs=1e-6)
    assert float(constant(t)) == -1.0


# ----------------------------------------------------------------------------------------------
# 5. composition with optax
# ----------------------------------------------------------------------------------------------

PARAMS = {'b': np.zeros(5, np.float32), 'w': np.zeros((3, 4), np.float32)}


def _pair(rng: np.random.Generator, case: str):
  g0 = {n: rng.normal(size=x.shape) for n, x in PARAMS.items()}
  if case == 'aligned':
    g1 = {n: g * rng.uniform(0.2, 1.5, size=g.shape) for n, g in g0.items()}
  else:
    g1 = {n: -0.6 * g + 0.5 * rng.normal(size=g.shape) for n, g in g0.items()}
  return {n: np.stack([g0[n], g1[n]]).astype(np.float32) for n in PARAMS}


def _adam_state(opt_state) -> optax.ScaleByAdamState:
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
  (adam,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
  return adam


def _ref_realigned_dict(stacked) -> dict:
  names = sorted(stacked)
  out = ref_realigned_sum([np.asarray(stacked[n], np.float64) for n in names])
  return dict(zip(names, out, strict=True))


def test_chains_init_and_update_under_jit():
  rng = np.random.default_rng(11)
  conflicting = _pair(rng, 'conflicting')
  cos = ref_cosines([conflicting[n] for n in sorted(conflicting)])[0, 1]
  assert -0.9 < cos < 0
  realigned = _ref_realigned_dict(conflicting)

  # Curriculum (passes: γ = −0.9) → realignment → Adam: Adam sees the realigned gradient.
  tx = optax.chain(hz.gradient_curriculum(-0.9), hz.cross_modal_realignment(), optax.adam(1e-2))
  state = jax.jit(tx.init)(PARAMS)
  updates, state = jax.jit(tx.update)(conflicting, state, PARAMS)
  adam = _adam_state(state)
  for n in PARAMS:
    assert updates[n].shape == PARAMS[n].shape
    np.testing.assert_allclose(np.asarray(adam.mu[n]), 0.1 * realigned[n], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(
      np.asarray(adam.nu[n]), 0.001 * realigned[n] ** 2, rtol=1e-4, atol=1e-9
    )

  # Realignment → SGD: the update is −η Σ ĝ_i.
  tx = optax.chain(hz.cross_modal_realignment(), optax.sgd(0.1))
  updates, _ = jax.jit(tx.update)(conflicting, jax.jit(tx.init)(PARAMS), PARAMS)
  for n in PARAMS:
    np.testing.assert_allclose(np.asarray(updates[n]), -0.1 * realigned[n], rtol=RTOL, atol=1e-6)

  # Curriculum → plain sum → Adam: Adam sees g_0 + g_1 on an applied step, zero on a rejected one.
  for gamma, applied in ((-0.9, True), (0.0, False)):
    tx = optax.chain(hz.gradient_curriculum(gamma), hz.sum_losses(), optax.adam(1e-2))
    updates, state = jax.jit(tx.update)(conflicting, jax.jit(tx.init)(PARAMS), PARAMS)
    for n in PARAMS:
      expected = 0.1 * conflicting[n].astype(np.float64).sum(0) if applied else 0.0
      np.testing.assert_allclose(
        np.asarray(_adam_state(state).mu[n]), expected, rtol=RTOL, atol=1e-7
      )
    assert int(_adam_state(state).count) == 1  # without skip_rejected, optax counts the step


def test_skip_rejected_keeps_the_optimizer_state():
  rng = np.random.default_rng(12)
  steps = [_pair(rng, 'aligned'), _pair(rng, 'conflicting'), _pair(rng, 'aligned')]
  chain = lambda: optax.chain(  # noqa: E731
    hz.gradient_curriculum(0.0), hz.cross_modal_realignment(), optax.adam(1e-2)
  )
  tx = hz.skip_rejected(chain())
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  history = []
  for grads in steps:
    before = state
    updates, state = update(grads, state, PARAMS)
    history.append((before, updates, state))

  # Step 1 applied; step 2 rejected: zero update, Adam's moments and count as after step 1.
  (_, _, after1), (before2, updates2, after2), (before3, updates3, after3) = history
  assert [bool(hz.curriculum_states(s)[0].applied) for s in (after1, after2, after3)] == [
    True,
    False,
    True,
  ]
  for n in PARAMS:
    np.testing.assert_array_equal(np.asarray(updates2[n]), 0.0)
  adam1, adam2, adam3 = _adam_state(after1), _adam_state(after2), _adam_state(after3)
  assert int(adam1.count) == 1 and int(adam2.count) == 1 and int(adam3.count) == 2
  for n in PARAMS:
    np.testing.assert_array_equal(np.asarray(adam2.mu[n]), np.asarray(adam1.mu[n]))
    np.testing.assert_array_equal(np.asarray(adam2.nu[n]), np.asarray(adam1.nu[n]))
  curriculum = hz.curriculum_states(after2)[0]
  assert int(curriculum.count) == 2 and int(curriculum.skipped) == 1
  assert int(hz.curriculum_states(after3)[0].count) == 3
  # Step 3 applied: the moments move on from step 1's (aligned: the realignment is the plain sum).
  for n in PARAMS:
    g1, g3 = steps[0][n].astype(np.float64).sum(0), steps[2][n].astype(np.float64).sum(0)
    np.testing.assert_allclose(
      np.asarray(adam3.mu[n]), 0.9 * 0.1 * g1 + 0.1 * g3, rtol=RTOL, atol=1e-7
    )
    assert np.any(np.asarray(updates3[n]) != 0)

  # Without the wrapper the rejected step still moves the parameters (Adam's momentum) and counts.
  tx = chain()
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  _, state = update(steps[0], state, PARAMS)
  updates, state = update(steps[1], state, PARAMS)
  assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates))
  assert int(_adam_state(state).count) == 2


# ----------------------------------------------------------------------------------------------
# 6. sharded parameters
# ----------------------------------------------------------------------------------------------

_SHARDED_SCRIPT = """
  import json
  import jax, numpy as np, optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from vatt_jax.optim import harmonization as hz

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('d',))
  rng = np.random.default_rng(3)
  params = {'w': rng.normal(size=(16, 3)), 'v': rng.normal(size=(5, 8)), 'b': rng.normal(size=3)}
  params = {n: x.astype(np.float32) for n, x in params.items()}
  specs = {'w': P('d', None), 'v': P(None, 'd'), 'b': P()}
  grad_specs = {'w': P(None, 'd', None), 'v': P(None, None, 'd'), 'b': P()}

  def pair(coef, noise):  # cos(g_0, g_1) about coef / sqrt(coef² + noise²)
    g0 = {n: rng.normal(size=x.shape) for n, x in params.items()}
    g1 = {n: coef * g + noise * rng.normal(size=g.shape) for n, g in g0.items()}
    return {n: np.stack([g0[n], g1[n]]).astype(np.float32) for n in params}

  def adam_state(state):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    (adam,) = [x for x in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(x)]
    return adam

  # Conflicting (applied: realigned), aligned, conflicting beyond γ (rejected), conflicting.
  steps = [pair(-0.4, 0.6), pair(0.6, 0.5), pair(-1.0, 0.1), pair(-0.4, 0.6)]
  domains = ('global', 'per_leaf')
  txs = [hz.skip_rejected(optax.chain(hz.gradient_curriculum(-0.9),
                                      hz.cross_modal_realignment(d), optax.adam(1e-1)))
         for d in domains]

  def step(ps, ss, g):  # both domains in one program: one compilation per placement
    out = []
    for tx, p, s in zip(txs, ps, ss):
      u, s = tx.update(g, s, p)
      out.append((optax.apply_updates(p, u), s, u))
    return tuple(zip(*out))

  results = {}
  for sharded in (False, True):
    if sharded:
      put = lambda t, sp: {n: jax.device_put(t[n], NamedSharding(mesh, sp[n])) for n in t}
    else:
      one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      put = lambda t, sp: {n: jax.device_put(t[n], one) for n in t}
    ps = (put(params, specs),) * 2
    ss = jax.jit(lambda ps: tuple(tx.init(p) for tx, p in zip(txs, ps)))(ps)
    run = jax.jit(step)
    applied = []
    for g in steps:
      ps, ss, us = run(ps, ss, put(g, grad_specs))
      applied.append([bool(hz.curriculum_states(s)[0].applied) for s in ss])
    for d, p, s, u in zip(domains, ps, ss, us):
      results.setdefault(d, {})[str(sharded)] = dict(
        params={n: np.asarray(x).tolist() for n, x in p.items()},
        applied=[a[domains.index(d)] for a in applied],
        replicated={n: u[n].sharding.is_fully_replicated for n in u},
        shards={n: len(p[n].sharding.device_set) for n in p},
        mu_replicated={n: x.sharding.is_fully_replicated for n, x in adam_state(s).mu.items()},
      )
  print(json.dumps({'devices': jax.device_count(), **results}))
"""


def test_sharded_parameters_give_the_unsharded_result():
  flags = os.environ.get('XLA_FLAGS', '')
  env = dict(os.environ, XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count=8')
  out = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(_SHARDED_SCRIPT)],
    cwd=ROOT, env=env, capture_output=True, text=True,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-4000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report['devices'] == 8
  for domain in hz.DOMAINS:
    one, eight = report[domain]['False'], report[domain]['True']
    assert one['applied'] == eight['applied'] == [True, True, False, True]
    for n in one['params']:
      np.testing.assert_allclose(eight['params'][n], one['params'][n], rtol=RTOL, atol=1e-6)
    # The sharded leaves stay sharded through the harmonization and Adam.
    assert eight['shards'] == {'w': 8, 'v': 8, 'b': 8}
    assert not eight['replicated']['w'] and not eight['replicated']['v'], eight['replicated']
    assert not eight['mu_replicated']['w'] and not eight['mu_replicated']['v']


# ----------------------------------------------------------------------------------------------
# 7. per-loss gradients from one forward pass
# ----------------------------------------------------------------------------------------------


def _random_variables(abstract, rng: np.random.Generator):
  def value(path, leaf):
    name = path[-1].key if hasattr(path[-1], 'key') else str(path[-1])
    if name == 'scale':
      x = 1.0 + 0.2 * rng.normal(size=leaf.shape)
    elif name == 'var':
      x = rng.uniform(0.5, 1.5, size=leaf.shape)
    elif name == 'kernel':
      x = rng.normal(size=leaf.shape) / math.sqrt(max(leaf.shape[0], 1))
    else:
      x = 0.2 * rng.normal(size=leaf.shape)
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(value, abstract)


@pytest.fixture(scope='module')
def tiny():
  """demo_tiny at runlocal size: config, model, a synthetic batch and random variables."""
  config = load_config(ROOT / 'configs' / 'demo_tiny.py', 'runlocal')
  model = build_model(config.model)
  batch = next(data_pipelines.build(config.data, 'train', batch_size=config.batch_size))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))
  variables = _random_variables(abstract, np.random.default_rng(0))
  return config, model, batch, variables


def test_per_loss_gradients_equal_separate_gradients(tiny):
  config, model, batch, variables = tiny
  loss_fn = build_loss(config.loss)
  per_loss = loss_components(config.loss)
  # rbg keys: threefry's bit generation costs seconds of compile time per random site.
  rngs = {'dropout': jax.random.key(1, impl='rbg'), 'droptoken': jax.random.key(2, impl='rbg')}

  def components(params):
    out, _ = model.module.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      batch, train=True, rngs=rngs, mutable=['batch_stats'],
    )  # fmt: skip
    loss, terms = loss_fn(out, batch)
    return tuple(terms[name] * weight for name, weight in per_loss), loss

  @jax.jit
  def everything(params):
    (losses, total), stacked = hz.value_and_per_loss_grad(components, has_aux=True)(params)
    separate = [jax.grad(lambda p, k=k: components(p)[0][k])(params) for k in range(2)]
    return losses, total, stacked, separate, jax.grad(lambda p: components(p)[1])(params)

  # On the host at once: op-by-op indexing of ~100 device arrays would compile each op.
  losses, total, stacked, separate, full = jax.device_get(everything(variables['params']))
  assert len(losses) == 2
  assert float(losses[0] + losses[1]) == pytest.approx(float(total), rel=1e-6)
  assert jax.tree.structure(stacked) == jax.tree.structure(variables['params'])
  for k in range(2):
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(separate[k]))
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(separate[k]), strict=True):
      np.testing.assert_allclose(a[k], b, rtol=RTOL, atol=1e-6 * scale)
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(full))
  for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(full), strict=True):
    np.testing.assert_allclose(a.sum(0), b, rtol=RTOL, atol=1e-6 * scale)
  # The towers one loss does not use get exactly zero from it: those leaves are not shared.
  uses = {
    name: [bool(any(np.any(x[k]) for x in jax.tree.leaves(tree['encoder']))) for k in range(2)]
    for name, tree in stacked.items()
    if name.endswith('_tower')
  }
  assert uses['video_tower'] == [True, True]
  assert uses['audio_tower'] == [True, False] and uses['text_tower'] == [False, True]


def test_per_loss_gradients_of_a_toy_function():
  def fun(p):
    return (jnp.sum(p['a'] ** 2 * p['b'][0]), jnp.sum(jnp.sin(p['a'])) + p['b'][1] ** 3)

  params = {'a': jnp.array([0.3, -1.2, 2.0]), 'b': jnp.array([0.7, -0.4])}
  losses, stacked = jax.jit(hz.value_and_per_loss_grad(fun))(params)
  a, b = np.asarray(params['a'], np.float64), np.asarray(params['b'], np.float64)
  assert float(losses[0]) == pytest.approx(np.sum(a**2 * b[0]), rel=1e-6)
  np.testing.assert_allclose(np.asarray(stacked['a']), [2 * a * b[0], np.cos(a)], rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(stacked['b']), [[np.sum(a**2), 0.0], [0.0, 3 * b[1] ** 2]], rtol=1e-6
  )
  # A list works like a tuple; anything else, or a non-scalar loss, is refused.
  _, listed = hz.value_and_per_loss_grad(lambda p: list(fun(p)))(params)
  np.testing.assert_allclose(np.asarray(listed['a']), np.asarray(stacked['a']), rtol=1e-6)
  with pytest.raises(ValueError, match='tuple'):
    hz.value_and_per_loss_grad(lambda p: fun(p)[0])(params)
  with pytest.raises(ValueError, match='tuple'):
    hz.value_and_per_loss_grad(lambda p: ())(params)
  with pytest.raises(ValueError, match='shape'):
    hz.value_and_per_loss_grad(lambda p: (p['a'] * 2, fun(p)[1]))(params)


# ----------------------------------------------------------------------------------------------
# 8. the training step
# ----------------------------------------------------------------------------------------------


def _state(variables, tx, seed=3) -> TrainState:
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=jax.jit(tx.init)(params),  # one program, not one per zeros_like
    rng=jax.random.key(seed, impl='rbg'),
    nonfinite_steps=jnp.zeros((), jnp.int32),
    nonfinite_run=jnp.zeros((), jnp.int32),
  )


@pytest.mark.slow  # ~45 s cold; the toy-model step tests cover the same path
def test_monitored_step_is_the_plain_step(tiny):
  config, model, batch, variables = tiny
  opt = copy.deepcopy(config.optimizer)
  opt.name, opt.schedule, opt.learning_rate = 'sgd', 'constant', 0.1  # update = −η · gradient
  objective = model.objective(config.loss)
  plain_tx, schedule = build_optimizer(opt, config.total_steps)
  assert not harmonized(opt)
  opt.harmonization.monitor = True
  monitor_tx, _ = build_optimizer(opt, config.total_steps)
  assert harmonized(opt)
  plain = make_train_step(objective, plain_tx, schedule)
  monitored = make_train_step(
    objective, monitor_tx, schedule, per_loss=loss_components(config.loss)
  )
  # One program for both steps: one compilation (they share nothing else).
  both = jax.jit(lambda a, b, x: (plain(a, x), monitored(b, x)))
  (state_a, metrics_a), (state_b, metrics_b) = both(
    _state(variables, plain_tx), _state(variables, monitor_tx), batch
  )
  for key in ('loss', 'loss_va', 'loss_vt', 'grad_norm', 'learning_rate'):
    assert float(metrics_b[key]) == pytest.approx(float(metrics_a[key]), rel=1e-5), key
  cos = float(metrics_b['grad_cosine'])
  assert -1.0 <= cos <= 1.0 and cos != 0.0
  assert float(metrics_b['grad_conflict']) == float(cos < 0)
  assert 'grad_cosine' not in metrics_a and 'grad_skipped' not in metrics_b
  paths, old = zip(*jax.tree_util.tree_flatten_with_path(variables['params'])[0], strict=True)
  new_a, new_b = jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)
  for a, b, p in zip(new_a, new_b, old, strict=True):
    p = np.asarray(p)
    step_a, step_b = np.asarray(a) - p, np.asarray(b) - p
    # Within 1e-4 of the step, or a few float32 spacings of the parameter (the step's rounding).
    atol = 1e-4 * float(np.max(np.abs(step_a))) + 4 * float(np.max(np.spacing(np.abs(p))))
    np.testing.assert_allclose(step_b, step_a, rtol=1e-4, atol=atol)
  # The step moves every parameter but the attention key biases: a key bias adds q·b to every
  # logit of a query, which the softmax ignores, so its gradient is 0 up to rounding (a step far
  # below the parameters' float32 spacing, which may or may not show).
  moved = [
    bool(np.any(np.asarray(a) != np.asarray(p))) for a, p in zip(new_a, old, strict=True)
  ]  # fmt: skip
  key_bias = ["['key']['bias']" in jax.tree_util.keystr(path) for path in paths]
  assert any(key_bias) and all(m or k for m, k in zip(moved, key_bias, strict=True))


class _Toy(nn.Module):
  """A shared 'video' trunk (with batch norm) and one-loss leaves: the VATT layout in small."""

  @nn.compact
  def __call__(self, batch, train=False):
    video = nn.Dense(6, name='video')(batch['video'])
    video = nn.BatchNorm(use_running_average=not train, momentum=0.9, name='bn')(video)
    return {
      'video_va': nn.Dense(4, name='head_va')(video),
      'audio_va': nn.Dense(4, name='audio')(batch['audio']),
      'video_vt': nn.Dense(4, name='head_vt')(video),
      'text_vt': nn.Dense(4, name='text')(batch['text']),
    }


def _toy_batch(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {
    'video': rng.normal(size=(8, 5)).astype(np.float32),
    'audio': rng.normal(size=(8, 3)).astype(np.float32),
    'text': rng.normal(size=(8, 2, 3)).astype(np.float32),
  }


def _toy_objective(model, loss_fn):
  return forward_objective(model, loss_fn, rng_streams=('dropout', 'droptoken'))


def _toy_init(model, seed):
  return jax.jit(lambda key: model.init({'params': key}, _toy_batch(0)))(jax.random.key(seed))


def _toy_config(args: str, **harmonization):
  config = load_config(ROOT / 'configs' / 'demo_tiny.py', args)
  config.total_steps = 8
  opt = config.optimizer
  opt.schedule, opt.warmup_steps, opt.learning_rate, opt.end_learning_rate = (
    'quarter_cosine',
    0,
    0.05,
    0.01,
  )
  opt.harmonization.update(harmonization)
  return config


def test_curriculum_and_realignment_in_the_training_step():
  config = _toy_config(
    'runlocal,gr,cl', gamma_schedule='linear', gamma_init=-1.0, gamma_end=1.0, gamma_steps=8
  )
  h = config.optimizer.harmonization
  assert h.realign and h.curriculum and not h.monitor
  model, loss_fn = _Toy(), build_loss(config.loss)
  variables = _toy_init(model, 0)
  tx, schedule = build_optimizer(config.optimizer, config.total_steps)
  step = jax.jit(
    make_train_step(
      _toy_objective(model, loss_fn), tx, schedule, per_loss=loss_components(config.loss)
    )
  )
  state = _state(variables, tx)
  skipped = 0
  for t in range(config.total_steps):
    new_state, metrics = step(state, _toy_batch(100 + t))
    cos, gamma = float(metrics['grad_cosine']), -1.0 + 2.0 * t / 8
    assert np.isfinite(float(metrics['loss'])) and -1 <= cos <= 1
    rejected = cos <= gamma
    assert float(metrics['grad_skipped']) == float(rejected), (t, cos, gamma)
    # The learning rate follows the applied steps only (quarter-period cosine 0.05 → 0.01).
    applied = t - skipped
    lr = 0.01 + 0.04 * math.cos(math.pi / 2 * min(applied, 8) / 8)
    assert float(metrics['learning_rate']) == pytest.approx(lr, rel=1e-5)
    skipped += rejected
    assert int(metrics['skipped_steps']) == skipped
    moved = [
      bool(np.any(np.asarray(a) != np.asarray(b)))
      for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params), strict=True)
    ]
    assert (not any(moved)) if rejected else all(moved), (t, moved)
    assert int(_adam_state(new_state.opt_state).count) == t + 1 - skipped
    state = new_state
  assert 0 < skipped < config.total_steps


def test_realigned_step_differs_from_the_plain_sum_exactly_when_they_conflict():
  config = _toy_config('runlocal')
  config.optimizer.name = 'sgd'  # first step: −η · the realigned gradient
  model, loss_fn = _Toy(), build_loss(config.loss)
  variables = _toy_init(model, 1)
  per_loss = loss_components(config.loss)
  config.optimizer.harmonization.monitor = True
  monitor_tx, schedule = build_optimizer(config.optimizer, config.total_steps)
  config.optimizer.harmonization.update(dict(monitor=False, realign=True))
  realign_tx, _ = build_optimizer(config.optimizer, config.total_steps)
  objective = _toy_objective(model, loss_fn)
  monitored = make_train_step(objective, monitor_tx, schedule, per_loss=per_loss)
  realigned = make_train_step(objective, realign_tx, schedule, per_loss=per_loss)

  @jax.jit
  def run(state_m, state_r, batch):
    def components(p):  # the toy uses no random numbers: the steps' keys do not matter
      out, _ = model.apply(
        {'params': p, 'batch_stats': variables['batch_stats']},
        batch, train=True, mutable=['batch_stats'],
      )  # fmt: skip
      _, terms = loss_fn(out, batch)
      return tuple(terms[name] * weight for name, weight in per_loss)

    _, stacked = hz.value_and_per_loss_grad(components)(state_m.params)
    return monitored(state_m, batch), realigned(state_r, batch), stacked

  seen = set()
  for seed in range(40):
    batch = _toy_batch(200 + seed)
    (state_m, metrics_m), (state_r, metrics_r), stacked = run(
      _state(variables, monitor_tx), _state(variables, realign_tx), batch
    )
    conflict = float(metrics_r['grad_conflict'])
    assert conflict == float(metrics_m['grad_conflict'])
    if conflict in seen:
      continue
    seen.add(conflict)
    # Expected: θ − η Σ ĝ_i from the float64 reference on this batch's per-loss gradients.
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(stacked)]
    expected = ref_realigned_sum(_leaves64(stacked))
    lr = 0.05  # schedule(0): no warm-up
    flat = lambda tree: jax.tree.leaves(tree)  # noqa: E731
    for path, p, r, m, e in zip(
      paths, flat(variables['params']), flat(state_r.params), flat(state_m.params), expected,
      strict=True,
    ):  # fmt: skip
      p64 = np.asarray(p, np.float64)
      atol = 1e-6 * lr * float(np.max(np.abs(e))) + 4 * float(np.max(np.spacing(np.abs(p))))
      np.testing.assert_allclose(np.asarray(r) - p64, -lr * e, rtol=1e-4, atol=atol, err_msg=path)
      if not conflict:
        np.testing.assert_allclose(np.asarray(r), np.asarray(m), rtol=1e-6, atol=1e-8)
    if conflict:  # the shared trunk moves differently; one-loss leaves do not
      gap = {
        path: float(np.max(np.abs(np.asarray(r) - np.asarray(m))))
        for path, r, m in zip(paths, flat(state_r.params), flat(state_m.params), strict=True)
      }
      assert gap["['video']['kernel']"] > 1e-6, gap
      assert gap["['audio']['kernel']"] < 1e-7 and gap["['text']['kernel']"] < 1e-7, gap
    if len(seen) == 2:
      break
  assert seen == {0.0, 1.0}


# ----------------------------------------------------------------------------------------------
# 9. configuration errors and switches
# ----------------------------------------------------------------------------------------------


def test_config_switches():
  config = load_config(ROOT / 'configs' / 'demo_tiny.py', 'runlocal,gr,cl,ma')
  h = config.optimizer.harmonization
  assert (h.realign, h.curriculum, h.monitor) == (True, True, False)
  assert config.model.backbone == 'modality_agnostic' and config.model.shared_size == 'tiny'
  assert harmonized(config.optimizer)
  assert isinstance(build_optimizer(config.optimizer, 10)[0], optax.GradientTransformation)
  config = load_config(ROOT / 'configs' / 'demo_tiny.py', 'runlocal,monitor')
  assert config.optimizer.harmonization.monitor and not config.optimizer.harmonization.realign
  config = load_config(ROOT / 'configs' / 'demo_tiny.py', 'runlocal')
  assert not harmonized(config.optimizer)
  assert hz.build(config.optimizer.harmonization, 10, optax.sgd(0.1)) is None
  assert hz.build(None, 10, optax.sgd(0.1)) is None
  assert loss_components(config.loss) == (('loss_va', 0.5), ('loss_vt', 0.5))
  config.loss.weight_va, config.loss.weight_vt = 3.0, 1.0
  assert loss_components(config.loss) == (('loss_va', 0.75), ('loss_vt', 0.25))


def test_config_errors():
  config = load_config(ROOT / 'configs' / 'finetune_demo.py', 'runlocal')
  with pytest.raises(ValueError, match='several terms'):
    loss_components(config.loss)
  config.optimizer.harmonization = common.harmonization_config(monitor=True)
  mesh = sharding.make_mesh(config.mesh)
  example = {'video': np.zeros((2, 4, 32, 32, 3), np.float32), 'label': np.zeros(2, np.int32)}
  with pytest.raises(ValueError, match='several terms'):
    trainer.build_program(config, mesh, example)
  pretrain = load_config(ROOT / 'configs' / 'demo_tiny.py', 'runlocal')
  pretrain.loss.weight_vt = 0.0
  with pytest.raises(ValueError, match='weight_vt'):
    loss_components(pretrain.loss)

  h = common.harmonization_config(curriculum=True)
  for bad in (dict(gamma_init=1.5), dict(gamma_end=-1.01), dict(gamma_schedule='step')):
    cfg = common.harmonization_config(**bad)
    with pytest.raises(ValueError, match='harmonization'):
      hz.gamma_schedule(cfg, 10)
    pretrain.optimizer.harmonization = common.harmonization_config(curriculum=True, **bad)
    with pytest.raises(ValueError, match='harmonization'):
      build_optimizer(pretrain.optimizer, 10)
  with pytest.raises(ValueError, match='gamma_steps'):
    hz.gamma_schedule(common.harmonization_config(gamma_steps=-3), 10)
  assert float(hz.gamma_schedule(h, 10)(10)) == pytest.approx(h.gamma_end)

  with pytest.raises(ValueError, match='domain'):
    hz.cross_modal_realignment(domain='x')
  with pytest.raises(ValueError, match='domain'):
    hz.realigned_sum({'w': jnp.zeros((2, 3))}, domain='x')
  pretrain.optimizer.harmonization = common.harmonization_config(realign=True, domain='x')
  with pytest.raises(ValueError, match='domain'):
    build_optimizer(pretrain.optimizer, 10)
  with pytest.raises(ValueError, match='exactly one gradient_curriculum'):
    hz.skip_rejected(optax.adam(1e-3)).init(PARAMS)

  not_stacked = [
    {'w': jnp.zeros((3, 4)), 'b': jnp.zeros((4,))},  # no common leading axis
    {'w': jnp.zeros((1, 4)), 'b': jnp.zeros((1,))},  # K = 1
    {'w': jnp.zeros((2, 4)), 'b': jnp.zeros(())},  # a scalar leaf
    {},
  ]
  transforms = [
    hz.cross_modal_realignment(),
    hz.cross_modal_realignment('per_leaf'),
    hz.sum_losses(),
    hz.gradient_curriculum(0.0),
  ]
  for grads in not_stacked:
    for tx in transforms:
      with pytest.raises(ValueError, match='harmonization'):
        tx.update(grads, tx.init(None))
    with pytest.raises(ValueError, match='harmonization'):
      hz.alignment(grads)


def test_trainer_builds_a_harmonized_program():
  """The trainer's program (shapes and shardings only, nothing compiled): the optimizer state holds
  one curriculum, replicated, and Adam's moments shaped like the parameters."""
  config = load_config(ROOT / 'configs' / 'demo_tiny.py', 'runlocal,gr,cl')
  example = next(data_pipelines.build(config.data, 'train', batch_size=config.batch_size))
  program = trainer.build_program(config, sharding.make_mesh(config.mesh), example)
  (curriculum,) = hz.curriculum_states(program.abstract.opt_state)
  assert curriculum.count.shape == () and curriculum.applied.dtype == jnp.bool_
  (spec,) = hz.curriculum_states(program.shardings.opt_state)
  assert all(s.spec == jax.sharding.PartitionSpec() for s in spec)
  mu = _adam_state(program.abstract.opt_state).mu
  shapes = lambda tree: [x.shape for x in jax.tree.leaves(tree)]  # noqa: E731
  assert shapes(mu) == shapes(program.abstract.params)


# ----------------------------------------------------------------------------------------------
# 10. logging
# ----------------------------------------------------------------------------------------------


def test_metric_logger_writes_every_step_and_window_fractions(tmp_path):
  logger = MetricLogger(str(tmp_path), total_steps=10, batch_size=4)
  try:
    conflict = [1.0, 0.0, 1.0, 1.0, 0.0]
    cosine = [-0.3, 0.2, -0.1, -0.5, 0.4]
    for step in range(1, 6):
      logger.add_step(
        step,
        {'grad_cosine': cosine[step - 1], 'grad_conflict': conflict[step - 1], 'loss': 9.0},
      )
      logger.step_done()
    record = logger.write(5, {'loss': 1.0, 'learning_rate': 0.1, 'grad_norm': 2.0})
    rows = [json.loads(line) for line in (tmp_path / GRADIENTS_FILENAME).read_text().splitlines()]
    assert [r['step'] for r in rows] == [1, 2, 3, 4, 5]
    assert [r['grad_conflict'] for r in rows] == conflict
    assert all('loss' not in r for r in rows)
    assert record['grad_conflict_fraction'] == pytest.approx(np.mean(conflict))
    assert record['grad_cosine_mean'] == pytest.approx(np.mean(cosine))
    assert 'grad_skipped_fraction' not in record
    # Late values for flushed steps are dropped; the next window holds its own steps only.
    logger.add_step(3, {'grad_conflict': 0.0, 'grad_cosine': 0.9})
    for step in (6, 7):
      logger.add_step(step, {'grad_conflict': 0.0, 'grad_cosine': 0.5, 'grad_skipped': 1.0})
    record = logger.write(
      8, {'loss': 1.0, 'learning_rate': 0.1, 'grad_norm': 2.0, 'grad_conflict': 1.0,
          'grad_cosine': -0.2, 'grad_skipped': 0.0},
    )  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / GRADIENTS_FILENAME).read_text().splitlines()]
    assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert record['grad_conflict_fraction'] == pytest.approx(1 / 3)
    assert record['grad_skipped_fraction'] == pytest.approx(2 / 3)
    assert record['grad_cosine_mean'] == pytest.approx(0.8 / 3)
    logged = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in logged] == [5, 8]
    assert logged[0]['grad_conflict_fraction'] == pytest.approx(0.6)
  finally:
    logger.close()
