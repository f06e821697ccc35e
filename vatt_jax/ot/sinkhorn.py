"""Entropic optimal transport by Sinkhorn iterations in the log domain (batched, jit/vmap-friendly).

For scores [..., m, n] (the cost is −scores), marginals a [..., m], b [..., n] and ε > 0, the
plan is

    P_ij = exp((scores_ij + f_i + g_j) / ε),   P 1 ≈ a,   Pᵀ 1 ≈ b,

the solution of max_P ⟨P, scores⟩ + ε H(P) over the couplings of a and b. With u = f/ε, v = g/ε,
z = scores/ε, the iteration starts from u = v = 0 and updates rows, then columns:

    u ← log a − LSE_j(z_ij + v_j),   v ← log b − LSE_i(z_ij + u_i).

Two loop forms (see docs/SINKHORN.md):

* `tol=None`: exactly `num_iters` iterations (`lax.fori_loop`), the same numbers as a plain Python
  loop (Norton's `log_sinkhorn_iterations`); reverse-mode gradients unroll through the iterations.
* `tol=τ`: a `lax.while_loop` of at most `num_iters` iterations that checks the marginal error every
  `check_every` iterations and stops once every problem's error ≤ τ; a converged problem is frozen
  and keeps its iteration count. After one exact log-domain iteration, each block works on the
  plan K = exp(z + u ⊕ v) of its starting potentials (exact columns, entries ≤ 1): its iterations
  are scalings (matrix–vector products on K, no exponentials) absorbed back into u, v at the end;
  the block's one exponential pass re-forms K, which gives the exact marginal error and is the next
  block's kernel. A problem whose scalings over- or underflow redoes the block in the log domain.
  Gradients are implicit (a custom VJP through the optimality conditions at the returned point).

`bucket_sinkhorn` is Norton's prompt-bucket transport (an extra row and column of score p that can
absorb the mass of unaligned clips and captions).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SinkhornOutput(NamedTuple):
  """f [..., m], g [..., n]: potentials in score units; plan [..., m, n] = exp((scores + f ⊕ g)/ε);
  error [...]: ‖P1 − a‖₁ + ‖Pᵀ1 − b‖₁ of the returned plan; iterations [...] int32 per problem."""

  f: jax.Array
  g: jax.Array
  plan: jax.Array
  error: jax.Array
  iterations: jax.Array


def marginal_error(plan: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """‖P1 − a‖₁ + ‖Pᵀ1 − b‖₁ per problem: plan [..., m, n], a [..., m], b [..., n] → [...]."""
  rows = jnp.sum(jnp.abs(jnp.sum(plan, axis=-1) - a), axis=-1)
  cols = jnp.sum(jnp.abs(jnp.sum(plan, axis=-2) - b), axis=-1)
  return rows + cols


# --------------------------------------------------------------------------- inputs


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _as_scores(scores, who: str) -> jax.Array:
  """scores as a floating array of at least two dimensions [..., m, n]."""
  scores = jnp.asarray(scores)
  if scores.ndim < 2:
    raise ValueError(f'{who}: scores must be [..., m, n], got shape {scores.shape}')
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    scores = scores.astype(jnp.float32)
  return scores


def _prepare(scores, a, b, epsilon):
  """Checks shapes (and values where they are concrete); → scores, a, b broadcast to the batch."""
  scores = _as_scores(scores, 'sinkhorn')
  *batch, m, n = scores.shape
  batch = tuple(batch)
  if m == 0 or n == 0:
    raise ValueError(f'sinkhorn: scores [..., m, n] must have m, n > 0, got shape {scores.shape}')
  marginals = []
  for name, x, size in (('a', a, m), ('b', b, n)):
    if x is None:
      x = jnp.full((size,), 1.0 / size, scores.dtype)
    x = jnp.asarray(x, scores.dtype)
    want = batch + (size,)
    try:
      if np.broadcast_shapes(x.shape, want) != want:
        raise ValueError
    except ValueError:
      raise ValueError(
        f'sinkhorn: {name} of shape {x.shape} does not broadcast to {want} (scores {scores.shape})'
      ) from None
    marginals.append(jnp.broadcast_to(x, want))
  # Values are checked where they are known (eager calls, constants under jit); on the device, only
  # a flag comes back. Traced values cannot be checked (see `sinkhorn`).
  with jax.ensure_compile_time_eval():
    if _is_concrete(epsilon) and not float(epsilon) > 0:
      raise ValueError(f'sinkhorn: epsilon must be > 0, got {epsilon}')
    if _is_concrete(scores) and bool(jnp.any(jnp.isnan(scores) | (scores == jnp.inf))):
      raise ValueError('sinkhorn: scores contain NaN or +inf (−inf marks a forbidden pair)')
    for name, x in zip('ab', marginals, strict=True):
      if _is_concrete(x) and not bool(jnp.all(jnp.isfinite(x) & (x >= 0))):
        raise ValueError(f'sinkhorn: marginal {name} must be finite and ≥ 0')
  return scores, marginals[0], marginals[1]


def _lse(x: jax.Array, axis: int) -> jax.Array:
  """Stable log-sum-exp over `axis`; a slice of all −inf gives −inf (not NaN)."""
  peak = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  return jnp.log(jnp.sum(jnp.exp(x - peak), axis=axis)) + jnp.squeeze(peak, axis)


def _log(x: jax.Array) -> jax.Array:
  return jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), -jnp.inf)


def _row_update(z, v, log_a):
  return log_a - _lse(z + v[..., None, :], -1)


def _col_update(z, u, log_b):
  return log_b - _lse(z + u[..., :, None], -2)


def _log_iteration(z, u, v, log_a, log_b):
  del u  # the row update does not depend on the previous u
  u = _row_update(z, v, log_a)
  return u, _col_update(z, u, log_b)


# --------------------------------------------------------------------------- fixed iterations


def _fixed_potentials(z, log_a, log_b, num_iters: int):
  u = jnp.zeros(log_a.shape, z.dtype)
  v = jnp.zeros(log_b.shape, z.dtype)
  body = jax.checkpoint(lambda _, uv: _log_iteration(z, *uv, log_a, log_b))
  return jax.lax.fori_loop(0, num_iters, body, (u, v))


# --------------------------------------------------------------------------- tolerance loop


def _matvec(k, x):
  return jnp.einsum('...ij,...j->...i', k, x, precision=jax.lax.Precision.HIGHEST)


def _rmatvec(k, x):
  return jnp.einsum('...ij,...i->...j', k, x, precision=jax.lax.Precision.HIGHEST)


def _bad(x, mass):
  """Per problem: a scaling that left (0, ∞) where the marginal is positive."""
  return jnp.any(((x <= 0) | ~jnp.isfinite(x)) & (mass > 0), axis=-1)


def _plan(z, u, v):
  return jnp.exp(z + u[..., :, None] + v[..., None, :])


def _block(z, u, v, kernel, a, b, log_a, log_b, steps):
  """`steps` iterations from (u, v) whose plan is `kernel` = exp(z + u ⊕ v) (exact columns, so
  entries ≤ 1): scalings a_s = a / K b_s, b_s = b / Kᵀ a_s (matrix–vector products, no
  exponentials), absorbed as u + log a_s, v + log b_s. A problem whose scalings leave (0, ∞) redoes
  the block in the log domain. → (u, v, their plan, its marginal error)."""

  def scale(_, ab):
    _, b_s = ab
    a_s = a / _matvec(kernel, b_s)
    return a_s, b / _rmatvec(kernel, a_s)

  a_s, b_s = jax.lax.fori_loop(0, steps, scale, (jnp.ones_like(a), jnp.ones_like(b)))
  bad = _bad(a_s, a) | _bad(b_s, b)
  u_s, v_s = u + _log(a_s), v + _log(b_s)

  # The fallback as a while loop of 0 or `steps` trips, not a cond: under vmap a cond on a batched
  # predicate would run both branches every block; this loop runs only when some problem needs it.
  def log_step(state):
    i, uu, vv = state
    return (i + 1, *_log_iteration(z, uu, vv, log_a, log_b))

  trips = jnp.where(jnp.any(bad), steps, 0)
  _, u_log, v_log = jax.lax.while_loop(lambda st: st[0] < trips, log_step, (jnp.int32(0), u, v))
  u = jnp.where(bad[..., None], u_log, u_s)
  v = jnp.where(bad[..., None], v_log, v_s)
  plan = _plan(z, u, v)  # also the next block's kernel
  return u, v, plan, marginal_error(plan, a, b)


def _tol_potentials(z, a, b, num_iters: int, tol: float, check_every: int):
  """→ (u, v, iterations [...] int32). One log-domain iteration (from u = v = 0 the kernel could
  overflow), then blocks up to each multiple of check_every (and num_iters), each ending with the
  check of the exact marginal error of the plan it leaves."""
  log_a, log_b = _log(a), _log(b)
  batch = z.shape[:-2]
  u = jnp.zeros(a.shape, z.dtype)
  v = jnp.zeros(b.shape, z.dtype)
  iters = jnp.full(batch, num_iters, jnp.int32)
  if num_iters == 0:
    return u, v, iters
  u, v = _log_iteration(z, u, v, log_a, log_b)

  def cond(state):
    k, *_, done = state
    return (k < num_iters) & ~jnp.all(done)

  def body(state):
    k, u, v, kernel, iters, done = state
    stop = jnp.minimum((k // check_every + 1) * check_every, num_iters)
    u_new, v_new, kernel, err = _block(z, u, v, kernel, a, b, log_a, log_b, stop - k)
    # A converged problem is frozen (its kernel is recomputed from the frozen u, v: unchanged).
    u = jnp.where(done[..., None], u, u_new)
    v = jnp.where(done[..., None], v, v_new)
    now = ~done & (err <= tol)
    iters = jnp.where(now, stop, iters)
    return stop, u, v, kernel, iters, done | now

  state = (jnp.int32(1), u, v, _plan(z, u, v), iters, jnp.zeros(batch, bool))
  _, u, v, _, iters, _ = jax.lax.while_loop(cond, body, state)
  return u, v, iters


def _implicit_duals(plan, u_bar, v_bar):
  """Solves H λ = (ū, v̄), H = [[diag(P1), P], [Pᵀ, diag(Pᵀ1)]] (the Jacobian of the marginals in
  (u, v) at the returned plan), through the Schur complement on the smaller side. H is singular
  along (1, −1) (the gauge u + c, v − c): the cotangent is projected onto its range first, and a
  rank-one term κ11ᵀ picks the solution with 1ᵀλ_v = 0."""
  m, n = plan.shape[-2:]
  if n > m:
    lam_v, lam_u = _implicit_duals(jnp.swapaxes(plan, -1, -2), v_bar, u_bar)
    return lam_u, lam_v
  shift = (jnp.sum(u_bar, -1) - jnp.sum(v_bar, -1)) / (m + n)
  u_bar = u_bar - shift[..., None]
  v_bar = v_bar + shift[..., None]
  rows, cols = jnp.sum(plan, -1), jnp.sum(plan, -2)
  inv_rows = jnp.where(rows > 0, 1.0 / jnp.where(rows > 0, rows, 1.0), 0.0)
  hp = jax.lax.Precision.HIGHEST
  schur = -jnp.einsum('...ij,...i,...ik->...jk', plan, inv_rows, plan, precision=hp)
  scale = jnp.max(cols, -1)[..., None, None]
  eye = jnp.eye(n, dtype=plan.dtype)
  ridge = 16 * jnp.finfo(plan.dtype).eps * scale
  schur = schur + eye * (cols[..., None, :] + ridge) + scale / n  # + κ11ᵀ fixes the gauge
  rhs = v_bar - _rmatvec(plan, u_bar * inv_rows)
  lam_v = jnp.linalg.solve(schur, rhs[..., None])[..., 0]
  lam_u = (u_bar - _matvec(plan, lam_v)) * inv_rows
  return lam_u, lam_v


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _tol_solve(z, a, b, num_iters, tol, check_every):
  """(z = scores/ε, a, b) → (u, v, iterations), differentiated implicitly."""
  return _tol_potentials(z, a, b, num_iters, tol, check_every)


def _tol_solve_fwd(z, a, b, num_iters, tol, check_every):
  u, v, iters = _tol_potentials(z, a, b, num_iters, tol, check_every)
  return (u, v, iters), (_plan(z, u, v),)


def _tol_solve_bwd(num_iters, tol, check_every, res, cotangents):
  """The marginal conditions P1 = a, Pᵀ1 = b with P = exp(z + u ⊕ v), differentiated:
  H (du, dv) = (da − (P∘dz)1, db − (P∘dz)ᵀ1). With λ = H⁻¹(ū, v̄) (H symmetric):
  z̄ = −P∘(λ_u ⊕ λ_v), ā = λ_u, b̄ = λ_v."""
  (plan,) = res
  u_bar, v_bar, _ = cotangents
  lam_u, lam_v = _implicit_duals(plan, u_bar, v_bar)
  z_bar = -plan * (lam_u[..., :, None] + lam_v[..., None, :])
  return z_bar, lam_u, lam_v


_tol_solve.defvjp(_tol_solve_fwd, _tol_solve_bwd)


# --------------------------------------------------------------------------- public API


def sinkhorn(
  scores: jax.Array,
  a: jax.Array | None = None,
  b: jax.Array | None = None,
  *,
  epsilon: float = 1.0,
  num_iters: int = 50,
  tol: float | None = None,
  check_every: int = 10,
) -> SinkhornOutput:
  """Entropic OT plan for scores [..., m, n] (cost −scores) between a [..., m] and b [..., n].

  a, b broadcast to the batch (default uniform 1/m, 1/n; zeros allowed). tol=None: exactly
  `num_iters` rows-then-columns log-domain iterations, differentiated by unrolling (each iteration
  rematerialised in the backward pass: memory O(num_iters·(m + n) + m·n) per problem). tol=τ: up to
  `num_iters` iterations, stopping each problem at the first multiple of `check_every` where its
  error (`marginal_error` of its plan) ≤ τ; differentiated implicitly (through the optimality
  conditions at the returned point, in scores, a, b and ε). Scores may hold −inf (a forbidden
  pair) but not NaN or +inf: concrete inputs are checked, traced ones propagate NaN.
  """
  if num_iters < 0 or check_every < 1:
    raise ValueError(f'sinkhorn: need num_iters ≥ 0, check_every ≥ 1; got {num_iters}, '
                     f'{check_every}')  # fmt: skip
  scores, a, b = _prepare(scores, a, b, epsilon)
  return _solve(scores, a, b, epsilon, num_iters, None if tol is None else float(tol), check_every)


@partial(jax.jit, static_argnums=(4, 5, 6))
def _solve(scores, a, b, epsilon, num_iters, tol, check_every) -> SinkhornOutput:
  z = scores / epsilon
  if tol is None:
    u, v = _fixed_potentials(z, _log(a), _log(b), num_iters)
    iters = jnp.full(scores.shape[:-2], num_iters, jnp.int32)
  else:
    u, v, iters = _tol_solve(z, a, b, num_iters, tol, check_every)
  plan = _plan(z, u, v)  # the same expression as in the loop: the same rounding, the same error
  return SinkhornOutput(u * epsilon, v * epsilon, plan, marginal_error(plan, a, b), iters)


def bucket_sinkhorn(
  scores: jax.Array,
  p: jax.Array | float,
  *,
  epsilon: float = 0.1,
  num_iters: int = 50,
  total_mass: jax.Array | float | None = None,
  tol: float | None = None,
) -> jax.Array:
  """Norton's prompt-bucket transport: plan [..., m, n] for scores [..., m, n].

  Appends one row and one column whose entries are all p (a scalar or [...], one per problem) to
  each score matrix; marginals 1/(m+n) for every real row and column, n/(m+n) for the bucket row,
  m/(m+n) for the bucket column; solves `sinkhorn(..., epsilon, num_iters, tol)`; drops the bucket.
  The plan is then multiplied by m + n (Norton's "probabilities × (M+N)"), or, with total_mass
  (scalar or [...]), rescaled to sum to total_mass (a plan with no mass left stays zero).
  """
  scores = _as_scores(scores, 'bucket_sinkhorn')
  *batch, m, n = scores.shape
  batch = tuple(batch)
  p = jnp.asarray(p, scores.dtype)
  try:
    p = jnp.broadcast_to(p, batch)
  except ValueError:
    raise ValueError(
      f'bucket_sinkhorn: p of shape {p.shape} does not broadcast to {batch}'
    ) from None
  column = jnp.broadcast_to(p[..., None, None], batch + (m, 1))
  row = jnp.broadcast_to(p[..., None, None], batch + (1, n + 1))
  augmented = jnp.concatenate([jnp.concatenate([scores, column], -1), row], -2)
  norm = 1.0 / (m + n)
  a = jnp.full((m + 1,), norm, scores.dtype).at[m].set(n * norm)
  b = jnp.full((n + 1,), norm, scores.dtype).at[n].set(m * norm)
  out = sinkhorn(augmented, a, b, epsilon=epsilon, num_iters=num_iters, tol=tol)
  plan = out.plan[..., :m, :n]
  if total_mass is None:
    return plan * (m + n)
  total_mass = jnp.asarray(total_mass, scores.dtype)
  try:
    total_mass = jnp.broadcast_to(total_mass, batch)
  except ValueError:
    raise ValueError(
      f'bucket_sinkhorn: total_mass of shape {total_mass.shape} does not broadcast to {batch}'
    ) from None
  mass = jnp.sum(plan, axis=(-2, -1))
  factor = jnp.where(mass > 0, total_mass / jnp.where(mass > 0, mass, 1.0), 0.0)
  return plan * factor[..., None, None]
