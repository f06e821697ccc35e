"""vatt_jax.ot: log-domain Sinkhorn (fixed and tolerance forms, unrolled and implicit gradients) and
Norton's prompt bucket, against float64 numpy references written here and against ott-jax."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from tests.conftest import ROOT
from vatt_jax.ot import SinkhornOutput, bucket_sinkhorn, marginal_error, sinkhorn

# --------------------------------------------------------------------------- float64 references


def reference_potentials(scores, a, b, epsilon, num_iters):
  """Rows-then-columns log-domain Sinkhorn in float64 numpy: (u, v) with plan exp(z + u ⊕ v)."""
  z = np.asarray(scores, np.float64) / epsilon
  log_a = np.broadcast_to(np.log(np.asarray(a, np.float64)), z.shape[:-1])
  log_b = np.broadcast_to(np.log(np.asarray(b, np.float64)), z.shape[:-2] + z.shape[-1:])
  u, v = np.zeros(log_a.shape), np.zeros(log_b.shape)
  for _ in range(num_iters):
    u = log_a - logsumexp(z + v[..., None, :], axis=-1)
    v = log_b - logsumexp(z + u[..., :, None], axis=-2)
  return z, u, v


def reference_plan(scores, a, b, epsilon, num_iters):
  z, u, v = reference_potentials(scores, a, b, epsilon, num_iters)
  return np.exp(z + u[..., :, None] + v[..., None, :])


def reference_bucket(scores, p, epsilon, num_iters, total_mass=None):
  """Norton's log_optimal_transport_prompt in float64: bucket row and column of p, 1/(m+n)
  marginals (n/(m+n), m/(m+n) for the buckets), the log loop on scores/ε, Z − norm, bucket dropped;
  then exp and the rescaling to total_mass."""
  scores = np.asarray(scores, np.float64)
  *batch, m, n = scores.shape
  p = np.broadcast_to(np.asarray(p, np.float64), tuple(batch))[..., None, None]
  aug = np.concatenate([scores, np.broadcast_to(p, (*batch, m, 1))], axis=-1)
  aug = np.concatenate([aug, np.broadcast_to(p, (*batch, 1, n + 1))], axis=-2) / epsilon
  norm = -np.log(m + n)
  log_mu = np.concatenate([np.full(m, norm), [np.log(n) + norm]])
  log_nu = np.concatenate([np.full(n, norm), [np.log(m) + norm]])
  u, v = np.zeros((*batch, m + 1)), np.zeros((*batch, n + 1))
  for _ in range(num_iters):
    u = log_mu - logsumexp(aug + v[..., None, :], axis=-1)
    v = log_nu - logsumexp(aug + u[..., :, None], axis=-2)
  log_plan = aug + u[..., :, None] + v[..., None, :] - norm
  plan = np.exp(log_plan[..., :m, :n])
  if total_mass is not None:
    plan = plan * total_mass / plan.sum(axis=(-2, -1), keepdims=True)
  return plan


def _marginals(rng, shape):
  x = rng.uniform(0.5, 1.5, shape)
  return x / x.sum(-1, keepdims=True)


def _error64(plan, a, b):
  plan = np.asarray(plan, np.float64)
  rows = np.abs(plan.sum(-1) - np.asarray(a, np.float64)).sum(-1)
  return rows + np.abs(plan.sum(-2) - np.asarray(b, np.float64)).sum(-1)


# --------------------------------------------------------------------------- values


def test_fixed_form_equals_reference():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(2, 3, 5, 7))
  a = _marginals(rng, (2, 3, 5))  # per problem
  b = _marginals(rng, (7,))  # broadcast over the batch
  out = sinkhorn(jnp.float32(scores), a, b, epsilon=0.3, num_iters=50)
  assert isinstance(out, SinkhornOutput)
  z, u, v = reference_potentials(scores, a, b, 0.3, 50)
  plan = np.exp(z + u[..., :, None] + v[..., None, :])
  np.testing.assert_allclose(out.plan, plan, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out.f, u * 0.3, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.g, v * 0.3, rtol=1e-5, atol=1e-5)
  assert out.plan.shape == (2, 3, 5, 7) and out.error.shape == out.iterations.shape == (2, 3)
  np.testing.assert_array_equal(out.iterations, 50)
  np.testing.assert_allclose(out.error, _error64(plan, a, np.broadcast_to(b, (2, 3, 7))), atol=1e-6)


def test_defaults_are_uniform_and_zero_iterations_is_exp():
  rng = np.random.default_rng(1)
  scores = rng.uniform(-1, 1, (4, 6))
  out = sinkhorn(jnp.float32(scores), num_iters=20)
  np.testing.assert_allclose(out.plan, reference_plan(scores, 0.25, 1 / 6, 1.0, 20), rtol=1e-5)
  zero = sinkhorn(jnp.float32(scores), epsilon=0.5, num_iters=0)
  np.testing.assert_allclose(zero.plan, np.exp(scores / 0.5), rtol=1e-6)


def test_tolerance_form_converges_and_freezes():
  rng = np.random.default_rng(2)
  # Four problems of very different difficulty in one batch: they converge at different checks.
  scale = np.array([0.01, 0.3, 1.0, 3.0])[:, None, None]
  scores = rng.uniform(-1, 1, (4, 6, 8)) * scale
  a, b = _marginals(rng, (4, 6)), _marginals(rng, (4, 8))
  tol, check = 1e-5, 5
  out = sinkhorn(jnp.float32(scores), a, b, epsilon=0.1, num_iters=1000, tol=tol, check_every=check)
  iters = np.asarray(out.iterations)
  assert out.iterations.dtype == jnp.int32
  assert np.all(iters % check == 0) and np.all(iters < 1000) and len(set(iters)) > 1
  plan = np.asarray(out.plan, np.float64)
  np.testing.assert_allclose(plan.sum(-1), a, atol=2 * tol)
  np.testing.assert_allclose(plan.sum(-2), b, atol=2 * tol)
  error = _error64(plan, a, b)
  np.testing.assert_allclose(out.error, error, atol=1e-6)
  assert np.all(error <= tol + 1e-6)
  # A problem stopped at its own count: exactly the fixed form's plan after that many iterations.
  for i, count in enumerate(iters):
    fixed = reference_plan(scores[i], a[i], b[i], 0.1, int(count))
    np.testing.assert_allclose(plan[i], fixed, rtol=2e-4, atol=1e-7)


def test_scaling_block_falls_back_to_log_domain():
  # With positive marginals the absorbed kernel's rows cannot underflow (each sums to at least
  # a_i·min b), so the fallback is a safety net: exercise it with a kernel row zeroed by hand.
  sk = importlib.import_module('vatt_jax.ot.sinkhorn')
  rng = np.random.default_rng(12)
  scores = rng.uniform(-1, 1, (2, 4, 6))
  a, b = _marginals(rng, (2, 4)), _marginals(rng, (2, 6))
  z, a32, b32 = jnp.float32(scores / 0.1), jnp.float32(a), jnp.float32(b)
  log_a, log_b = jnp.log(a32), jnp.log(b32)
  u, v = sk._log_iteration(z, jnp.zeros((2, 4)), jnp.zeros((2, 6)), log_a, log_b)
  kernel = sk._plan(z, u, v).at[0, 1].set(0.0)  # problem 0: a scaling becomes infinite
  u, v, plan, err = sk._block(z, u, v, kernel, a32, b32, log_a, log_b, jnp.int32(5))
  ref = reference_plan(scores, a, b, 0.1, 6)
  np.testing.assert_allclose(plan, ref, rtol=1e-4, atol=1e-7)  # both problems: 6 iterations
  np.testing.assert_allclose(err, _error64(ref, a, b), atol=1e-6)


def test_tolerance_form_stops_at_num_iters():
  rng = np.random.default_rng(3)
  scores = rng.uniform(-1, 1, (2, 5, 5))
  out = sinkhorn(jnp.float32(scores), epsilon=0.05, num_iters=23, tol=0.0, check_every=10)
  np.testing.assert_array_equal(out.iterations, 23)
  ref = reference_plan(scores, 0.2, 0.2, 0.05, 23)
  np.testing.assert_allclose(out.plan, ref, rtol=1e-4, atol=1e-7)


def test_matches_ott_jax_at_convergence():
  ott_geometry = pytest.importorskip('ott.geometry.geometry')
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn as ott_sinkhorn

  rng = np.random.default_rng(4)
  scores = jnp.float32(rng.uniform(-1, 1, (6, 9)))
  a, b = jnp.float32(_marginals(rng, 6)), jnp.float32(_marginals(rng, 9))

  @jax.jit  # compiles faster than ott-jax's eager call
  def ott_plan(scores, a, b):
    geom = ott_geometry.Geometry(cost_matrix=-scores, epsilon=0.1)
    solver = ott_sinkhorn.Sinkhorn(threshold=1e-7, max_iterations=5000)
    return solver(linear_problem.LinearProblem(geom, a, b)).matrix

  theirs = ott_plan(scores, a, b)
  ours = sinkhorn(scores, a, b, epsilon=0.1, num_iters=5000, tol=1e-7)
  np.testing.assert_allclose(ours.plan, theirs, rtol=1e-4, atol=1e-4 * float(theirs.max()))


# --------------------------------------------------------------------------- bucket


def test_bucket_equals_norton_reference():
  rng = np.random.default_rng(5)
  scores = rng.uniform(-1, 1, (3, 4, 6))
  p = np.array([0.2, -0.3, 0.5])
  out = bucket_sinkhorn(jnp.float32(scores), jnp.float32(p), epsilon=0.1, num_iters=50)
  np.testing.assert_allclose(out, reference_bucket(scores, p, 0.1, 50), rtol=1e-4, atol=1e-6)
  massed = bucket_sinkhorn(jnp.float32(scores), 0.1, epsilon=0.1, num_iters=50, total_mass=2.5)
  np.testing.assert_allclose(massed.sum((-2, -1)), 2.5, rtol=1e-5)
  ref = reference_bucket(scores, 0.1, 0.1, 50, total_mass=2.5)
  np.testing.assert_allclose(massed, ref, rtol=1e-4, atol=1e-6)


def test_bucket_marginals_and_extremes():
  rng = np.random.default_rng(6)
  m, n = 4, 6
  scores = rng.uniform(-1, 1, (m, n))
  # The augmented problem the bucket solves: its plan has the documented marginals at convergence.
  plan = bucket_sinkhorn(jnp.float32(scores), 0.0, epsilon=0.1, num_iters=2000, tol=1e-6)
  aug = np.asarray(plan, np.float64) / (m + n)  # the real block of the augmented plan
  assert np.all(aug.sum(-1) <= 1 / (m + n) + 1e-6) and np.all(aug.sum(-2) <= 1 / (m + n) + 1e-6)
  # Bucket column gets what each real row does not send to real columns; it totals m/(m+n) with
  # the corner, which carries as much as the real block (mass balance of the two bucket marginals).
  bucket_col = 1 / (m + n) - aug.sum(-1)
  bucket_row = 1 / (m + n) - aug.sum(-2)
  corner = m / (m + n) - bucket_col.sum()
  np.testing.assert_allclose(bucket_row.sum() + corner, n / (m + n), atol=1e-5)
  np.testing.assert_allclose(corner, aug.sum(), atol=1e-5)
  # p very low: the bucket takes (almost) nothing from the m clips (m < n): each row sends all.
  low = bucket_sinkhorn(jnp.float32(scores), -5.0, epsilon=0.1, num_iters=500, tol=1e-6)
  np.testing.assert_allclose(np.asarray(low).sum(-1), 1.0, atol=1e-3)
  # p very high: most clip and caption mass goes to the bucket.
  high = bucket_sinkhorn(jnp.float32(scores), 5.0, epsilon=0.1, num_iters=500, tol=1e-6)
  assert float(np.asarray(high).sum()) < 1e-3


def test_bucket_p_per_problem_and_shapes():
  scores = jnp.zeros((2, 3, 4))
  assert bucket_sinkhorn(scores, jnp.zeros(2)).shape == (2, 3, 4)
  # p is learnable (Norton): the gradient reaches it through the bucket row and column.
  weights = jnp.asarray(np.random.default_rng(13).normal(size=(2, 3, 4)), jnp.float32)
  grad = jax.grad(lambda p: jnp.sum(bucket_sinkhorn(scores + weights, p) * weights))(0.1)
  assert np.isfinite(grad) and grad != 0
  with pytest.raises(ValueError, match='p of shape'):
    bucket_sinkhorn(scores, jnp.zeros(3))
  with pytest.raises(ValueError, match='total_mass'):
    bucket_sinkhorn(scores, 0.0, total_mass=jnp.ones(5))


# --------------------------------------------------------------------------- gradients


def _loss(form, weights, **kw):
  def loss(scores):
    return jnp.sum(sinkhorn(scores, **kw, **form).plan * weights)

  return loss


FORMS = {'unrolled': dict(num_iters=100), 'implicit': dict(num_iters=2000, tol=1e-4)}


@pytest.mark.parametrize('form', FORMS)
def test_small_epsilon_values_and_gradients_finite(form):
  rng = np.random.default_rng(7)
  scores = jnp.float32(rng.uniform(-1, 1, (3, 12, 10)))
  weights = jnp.float32(rng.normal(size=(3, 12, 10)))
  a, b = _marginals(rng, (3, 12)), _marginals(rng, (3, 10))
  out = sinkhorn(scores, a, b, epsilon=0.01, **FORMS[form])
  for x in out:
    assert np.all(np.isfinite(np.asarray(x)))
  grad = jax.grad(_loss(FORMS[form], weights, a=a, b=b, epsilon=0.01))(scores)
  assert np.all(np.isfinite(np.asarray(grad)))
  bucket = jax.grad(lambda s: jnp.sum(bucket_sinkhorn(s, 0.0, epsilon=0.01) * weights))(scores)
  assert np.all(np.isfinite(np.asarray(bucket)))


def _directional_fd(fun, x, direction, step):
  return (fun(x + step * direction) - fun(x - step * direction)) / (2 * step)


def test_unrolled_gradient_equals_finite_differences_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(8)
    scores = jnp.asarray(rng.uniform(-1, 1, (2, 4, 5)))
    weights = jnp.asarray(rng.normal(size=(2, 4, 5)))
    a, b = jnp.asarray(_marginals(rng, (2, 4))), jnp.asarray(_marginals(rng, (5,)))
    loss = _loss(dict(num_iters=15), weights, a=a, b=b, epsilon=0.2)
    grad = jax.grad(loss)(scores)
    assert grad.dtype == jnp.float64
    for _ in range(3):
      direction = jnp.asarray(rng.normal(size=scores.shape))
      fd = _directional_fd(loss, scores, direction, 1e-6)
      np.testing.assert_allclose(jnp.vdot(grad, direction), fd, rtol=1e-6)


def test_implicit_gradient_equals_unrolled_at_convergence_float64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(9)
    scores = jnp.asarray(rng.uniform(-1, 1, (2, 5, 3)))
    weights = jnp.asarray(rng.normal(size=(2, 5, 3)))
    a, b = jnp.asarray(_marginals(rng, (2, 5))), jnp.asarray(_marginals(rng, (2, 3)))
    epsilon = jnp.float64(0.2)

    def loss(form):
      def fun(scores, a, b, epsilon):
        out = sinkhorn(scores, a, b, epsilon=epsilon, **form)
        # The plan and the potentials (their gauge-invariant combination f ⊕ g: the dual value).
        dual = jnp.sum(out.f * a) + jnp.sum(out.g * b)
        return jnp.sum(out.plan * weights) + dual

      return fun

    implicit_loss = loss(dict(num_iters=3000, tol=1e-13))
    implicit = jax.grad(implicit_loss, argnums=(0, 1, 2, 3))(scores, a, b, epsilon)
    unrolled = jax.grad(loss(dict(num_iters=600)), argnums=(0, 1, 2, 3))(scores, a, b, epsilon)
    np.testing.assert_allclose(implicit[0], unrolled[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(implicit[3], unrolled[3], rtol=1e-6)
    # In a and b only mass-preserving directions are defined (gauge f + c, g − c).
    da = jnp.asarray(rng.normal(size=a.shape))
    db = jnp.asarray(rng.normal(size=b.shape))
    da, db = da - da.mean(-1, keepdims=True), db - db.mean(-1, keepdims=True)
    np.testing.assert_allclose(
      jnp.vdot(implicit[1], da) + jnp.vdot(implicit[2], db),
      jnp.vdot(unrolled[1], da) + jnp.vdot(unrolled[2], db),
      rtol=1e-6,
    )
    direction = jnp.asarray(rng.normal(size=scores.shape))
    fd = _directional_fd(lambda s: implicit_loss(s, a, b, epsilon), scores, direction, 1e-6)
    np.testing.assert_allclose(jnp.vdot(implicit[0], direction), fd, rtol=1e-5)


# --------------------------------------------------------------------------- transforms, inputs


@pytest.mark.parametrize('form', FORMS)
def test_vmap_and_jit_equal_batched(form):
  rng = np.random.default_rng(10)
  scores = jnp.float32(rng.uniform(-1, 1, (3, 4, 5)))
  a = jnp.float32(_marginals(rng, (3, 4)))
  run = lambda s, a: sinkhorn(s, a, epsilon=0.1, **FORMS[form])  # noqa: E731
  batched = run(scores, a)
  mapped = jax.vmap(run)(scores, a)
  jitted = jax.jit(run)(scores, a)
  for x, y, w in zip(batched, mapped, jitted, strict=True):
    # atol: the error (of order tol) is a sum of float32 differences, rounded differently.
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(x, w, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize('form', FORMS)
def test_forbidden_pairs_and_empty_marginal(form):
  rng = np.random.default_rng(11)
  scores = rng.uniform(-1, 1, (4, 5))
  scores[0, 1] = scores[2, 3] = -np.inf
  a = np.array([0.3, 0.3, 0.4, 0.0])  # the last row carries no mass
  out = sinkhorn(jnp.float32(scores), a, epsilon=0.1, **FORMS[form])
  plan = np.asarray(out.plan)
  assert np.all(np.isfinite(plan)) and plan[0, 1] == plan[2, 3] == 0 and np.all(plan[3] == 0)
  if 'tol' in FORMS[form]:
    assert float(out.error) <= 2e-4
  weights = jnp.float32(rng.normal(size=(4, 5)))
  grad = jax.grad(_loss(FORMS[form], weights, a=a, epsilon=0.1))(jnp.float32(scores))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_bad_inputs_raise():
  scores = jnp.zeros((3, 4))
  with pytest.raises(ValueError, match='a of shape'):
    sinkhorn(scores, jnp.ones(4) / 4)
  with pytest.raises(ValueError, match='b of shape'):
    sinkhorn(scores, None, jnp.ones((2, 4)) / 4)
  with pytest.raises(ValueError, match=r'\[..., m, n\]'):
    sinkhorn(jnp.zeros(5))
  with pytest.raises(ValueError, match='NaN'):
    sinkhorn(scores.at[0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match='epsilon'):
    sinkhorn(scores, epsilon=0.0)
  with pytest.raises(ValueError, match='marginal a'):
    sinkhorn(scores, jnp.array([0.5, 0.7, -0.2]))
  # Traced NaN cannot be checked: it propagates, and the error says so.
  out = jax.jit(lambda s: sinkhorn(s, tol=1e-3, num_iters=30))(scores.at[0, 0].set(jnp.nan))
  assert not np.isfinite(float(out.error)) and int(out.iterations) == 30


def test_marginal_error():
  plan = jnp.array([[0.2, 0.1], [0.3, 0.4]])
  np.testing.assert_allclose(marginal_error(plan, jnp.array([0.5, 0.5]), jnp.array([0.5, 0.5])),
                             0.4 + 0.0, rtol=1e-6)  # fmt: skip


@pytest.mark.slow  # two small ott-jax comparisons and gradient compiles in a subprocess (~40 s)
def test_benchmark_sinkhorn_json():
  args = ['scripts/benchmark.py', '--what=sinkhorn', '--sinkhorn_bucket=64x9',
          '--sinkhorn_dense=96', '--repeats=1', '--json']  # fmt: skip
  out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['what'] == 'sinkhorn'
  assert result['bucket']['shape'] == [64, 10, 10] and result['dense']['shape'] == [96, 96]
  for case in ('bucket', 'dense'):
    r = result[case]
    assert r['ours_seconds'] > 0 and r['ott_seconds'] > 0
    assert r['ratio'] == r['ours_seconds'] / r['ott_seconds']
    assert r['ours_error'] <= r['ott_error'] and r['ours_tol'] <= r['ott_threshold']
    assert set(r['grad_temp_bytes']) == {
      'unrolled_10',
      'unrolled_50',
      'unrolled_200',
      'implicit',
      'ott_implicit',
    }
  assert result['ratio'] == max(result['bucket']['ratio'], result['dense']['ratio'])
