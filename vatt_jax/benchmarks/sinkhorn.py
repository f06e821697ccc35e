"""vatt_jax.ot.sinkhorn (tolerance form) against ott-jax's Sinkhorn at equal marginal error.

ott-jax: lse_mode, its defaults, vmapped over the batch; both jitted. Problems: (i) bucket: a batch
of 4096 prompt-bucket problems of 9×9 scores uniform in [−1, 1] (10×10 with the bucket row and
column of p = 0 and the bucket marginals; ε = 0.1, Norton's), and (ii) dense: one 1024×1024
problem, the cosine similarities of noisy matched unit embeddings (d = 16), uniform marginals,
ε = 0.01. ott-jax runs with threshold τ (`tol`); its achieved error e (the largest
`marginal_error` ‖P1 − a‖₁ + ‖Pᵀ1 − b‖₁ of its plans) sets ours: tol = min(τ, e), so that our
error, by the same function, is ≤ ott-jax's. Timings: the fastest of `repeats` (default 5) calls
each, interleaved. ratio = the larger of the two time ratios ours ÷ ott-jax (goal ≤ 0.5). Also the
temporary memory (XLA's memory analysis) of the gradient of Σ w∘plan: unrolled (the fixed form,
10/50/200 iterations), implicit (the tolerance form) and ott-jax's (implicit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vatt_jax.benchmarks import timing
from vatt_jax.ot import marginal_error, sinkhorn

MAX_ITERS = 5000


def problems(bucket: str, dense: int, rng: np.random.Generator) -> dict:
  """{case: (scores [..., m, n] float32, a, b, ε)} as the module docstring describes; bucket is
  'BATCHxSIZE' (SIZE×SIZE scores before the bucket row and column), dense the dense side."""
  batch, side = (int(x) for x in bucket.lower().split('x'))
  aug = np.zeros((batch, side + 1, side + 1), np.float32)  # p = 0 in the bucket row and column
  aug[:, :side, :side] = rng.uniform(-1, 1, (batch, side, side))
  mass = np.full(side + 1, 1 / (2 * side), np.float32)
  mass[side] = side / (2 * side)  # n/(m+n), m/(m+n) with m = n
  x = rng.normal(size=(dense, 16))
  y = x + rng.normal(size=(dense, 16))
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  y /= np.linalg.norm(y, axis=-1, keepdims=True)
  uniform = np.full(dense, 1 / dense, np.float32)
  return {
    'bucket': (aug, mass, mass, 0.1),
    'dense': ((x @ y.T).astype(np.float32), uniform, uniform, 0.01),
  }


def _ott_solver(a, b, epsilon, threshold, batched: bool):
  """scores → (plan, iterations) by ott-jax (cost −scores), vmapped over a leading batch axis."""
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn as ott_sinkhorn

  solver = ott_sinkhorn.Sinkhorn(threshold=threshold, max_iterations=MAX_ITERS)

  def solve(scores):
    geom = geometry.Geometry(cost_matrix=-scores, epsilon=epsilon)
    out = solver(linear_problem.LinearProblem(geom, a, b))
    return out.matrix, out.n_iters

  return jax.vmap(solve) if batched else solve


def _grad_temp_bytes(loss, scores) -> int:
  return timing.temp_bytes(jax.jit(jax.grad(loss)).lower(scores).compile())


def _grad_memory(scores, a, b, epsilon, weights, ours, ott) -> dict:
  """Temporary bytes of the gradient of Σ w∘plan: the fixed form unrolled through 10/50/200
  iterations, our tolerance form (implicit) and ott-jax's (implicit)."""

  def unrolled(iters):
    return lambda s: jnp.sum(sinkhorn(s, a, b, epsilon=epsilon, num_iters=iters).plan * weights)

  memory = {f'unrolled_{k}': _grad_temp_bytes(unrolled(k), scores) for k in (10, 50, 200)}
  memory['implicit'] = _grad_temp_bytes(lambda s: jnp.sum(ours(s)[0] * weights), scores)
  memory['ott_implicit'] = _grad_temp_bytes(lambda s: jnp.sum(ott(s)[0] * weights), scores)
  return memory


def _case(scores, a, b, epsilon, tau: float, repeats: int, rng) -> dict:

  scores, a, b = jnp.asarray(scores), jnp.asarray(a), jnp.asarray(b)
  ott = jax.jit(_ott_solver(a, b, epsilon, tau, batched=scores.ndim == 3))
  ott_plan, ott_iters = jax.block_until_ready(ott(scores))
  ott_error = marginal_error(ott_plan, a, b)
  tol = min(tau, float(jnp.max(ott_error)))

  def ours_fn(scores):
    out = sinkhorn(scores, a, b, epsilon=epsilon, num_iters=MAX_ITERS, tol=tol)
    return out.plan, out.iterations

  ours = jax.jit(ours_fn)
  our_plan, our_iters = jax.block_until_ready(ours(scores))
  our_error = marginal_error(our_plan, a, b)
  seconds = timing.interleaved_best(
    {
      'ott': lambda: jax.block_until_ready(ott(scores)),
      'ours': lambda: jax.block_until_ready(ours(scores)),
    },
    repeats,
  )
  weights = jnp.asarray(rng.normal(size=scores.shape), jnp.float32)
  return {
    'shape': list(scores.shape),
    'epsilon': epsilon,
    'ott_threshold': tau,
    'ours_tol': tol,
    'ott_seconds': seconds['ott'],
    'ours_seconds': seconds['ours'],
    'ratio': seconds['ours'] / seconds['ott'],
    'ott_error': float(jnp.max(ott_error)),
    'ours_error': float(jnp.max(our_error)),
    'ott_error_mean': float(jnp.mean(ott_error)),
    'ours_error_mean': float(jnp.mean(our_error)),
    'ott_iterations': int(jnp.max(ott_iters)),
    'ours_iterations': int(jnp.max(our_iters)),
    'grad_temp_bytes': _grad_memory(scores, a, b, epsilon, weights, ours_fn, ott),
  }


def run(
  *, bucket: str = '4096x9', dense: int = 1024, tol: float = 1e-3, repeats: int | None = None
) -> dict:
  """The sinkhorn benchmark (module docstring): `bucket` 'BATCHxSIZE' problems, a `dense`-sided
  problem, ott-jax's threshold `tol`, the fastest of `repeats` (None: 5) calls."""
  repeats = repeats or 5
  rng = np.random.default_rng(0)
  results = {
    case: _case(*problem, tol, repeats, rng)
    for case, problem in problems(bucket, dense, rng).items()
  }
  return {
    'what': 'sinkhorn',
    'device': jax.devices()[0].device_kind,
    'repeats': repeats,
    **results,
    'ratio': max(r['ratio'] for r in results.values()),
    'goal': '<= 0.5',
  }


def table(r: dict) -> str:
  lines = [
    f'sinkhorn vs ott-jax at equal marginal error, on {r["device"]} (best of {r["repeats"]})',
    f'{"case":<8}{"shape":>16}{"eps":>6}{"ott ms":>9}{"ours ms":>9}{"ratio":>7}'
    f'{"ott err":>10}{"our err":>10}{"ott it":>7}{"our it":>7}',
  ]
  for case in ('bucket', 'dense'):
    c = r[case]
    shape = '×'.join(map(str, c['shape']))
    lines.append(
      f'{case:<8}{shape:>16}{c["epsilon"]:>6}{c["ott_seconds"] * 1e3:>9.1f}'
      f'{c["ours_seconds"] * 1e3:>9.1f}{c["ratio"]:>7.3f}{c["ott_error"]:>10.2e}'
      f'{c["ours_error"]:>10.2e}{c["ott_iterations"]:>7}{c["ours_iterations"]:>7}'
    )
  lines.append('gradient temporary memory (MB):')
  for case in ('bucket', 'dense'):
    mem = ', '.join(f'{k} {v / 1e6:.1f}' for k, v in r[case]['grad_temp_bytes'].items())
    lines.append(f'  {case}: {mem}')
  lines.append(f'ratio (ours / ott-jax time, worse case): {r["ratio"]:.3f}  (goal {r["goal"]})')
  return '\n'.join(lines)
