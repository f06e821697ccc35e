"""Cross-modality gradient harmonization (Wu et al., NeurIPS 2022) as optax transforms.

The losses of a multi-task objective (VATT: video–audio NCE, video–text MIL-NCE) are differentiated
separately, in one forward pass: `value_and_per_loss_grad` gives a pytree whose leaves have a leading
axis of size K, slice k being the gradient of loss k. On such K-stacked gradients:

* `cross_modal_realignment(domain)` (the paper's Algorithm 1, gradient surgery between modalities):
  for every ordered pair (i, j) whose gradients conflict (⟨ĝ_i, g_j⟩ < 0), ĝ_i is projected onto the
  normal plane of g_j's *original* gradient, ĝ_i ← ĝ_i − ⟨ĝ_i, g_j⟩ / ‖g_j‖² · g_j; the results are
  summed into one update without the K axis. Without conflict the update is the plain sum.
* `gradient_curriculum(gamma)` (Algorithm 2): the step goes through only when cos(g_0, g_1) > γ(t),
  γ an optax schedule of the steps seen; otherwise the (still K-stacked) gradient becomes zero and
  the step is counted as skipped.
* `sum_losses()`: the plain sum, for a chain that needs no realignment.
* `skip_rejected(tx)`: wraps a whole chain so that a step the curriculum rejects is skipped exactly:
  no update and the optimizer state unchanged (Adam's moments do not decay on a zero gradient).

`optax.chain(gradient_curriculum(γ), cross_modal_realignment(), optax.adam(η))` is valid, and so are
`optax.chain(cross_modal_realignment(), optax.adam(η))` and
`optax.chain(gradient_curriculum(γ), sum_losses(), optax.adam(η))`.

Shared parameters. Inner products, norms and cosines are taken over the parameters the two losses
share: the leaves on which both gradients are nonzero in this step (VATT: the video tower, or the
whole backbone when it is modality-agnostic). A leaf only one loss uses passes through unchanged:
there the update is that loss's gradient, whatever happens on the shared leaves.

Order for K > 2 (fixed): for i = 0 … K−1, ĝ_i starts as g_i and is projected against g_j for
j = 0 … K−1 (j ≠ i) in ascending order, each time if ⟨ĝ_i, g_j⟩ < 0 with the current ĝ_i (PCGrad's
rule in a fixed instead of a random order); K = 2 is exactly Algorithm 1. The curriculum then uses
the smallest pairwise cosine. Zero gradients give no NaN: a zero g_j is never projected against, and
its cosine with anything is 0.

Everything is computed from per-leaf Gram matrices (one pass over the gradients) and one weighted sum
per leaf; reductions are plain sums over all axes, so sharded parameters stay sharded (the sums
become all-reduces).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

DOMAINS = ('global', 'per_leaf')


# --------------------------------------------------------------------------- per-loss gradients


def value_and_per_loss_grad(fun: Callable, *, has_aux: bool = False) -> Callable:
  """Like `jax.value_and_grad` for fun(params) → a tuple of K scalar losses (and aux).

  Returns a function params → ((losses, aux) or losses, grads), grads with leaves [K, *leaf.shape].
  One forward pass (`jax.linearize`) and one transpose of the linearised function per loss: each
  transpose only walks the part of the graph its loss depends on (the text tower is never
  back-propagated for the video–audio loss), so the cost over a plain step is one extra backward pass
  through the parameters the losses share, not a second forward and two full backward passes.
  """

  def wrapped(params):
    if has_aux:
      losses, f_jvp, aux = jax.linearize(fun, params, has_aux=True)
    else:
      losses, f_jvp = jax.linearize(fun, params)
    if not isinstance(losses, tuple | list) or not losses:
      raise ValueError(
        'value_and_per_loss_grad: fun must return a non-empty tuple of scalar losses'
      )
    grads = []
    for k, loss in enumerate(losses):
      if jnp.shape(loss) != ():
        raise ValueError(f'value_and_per_loss_grad: loss {k} has shape {jnp.shape(loss)}, not ()')
      transpose = jax.linear_transpose(lambda t, k=k: f_jvp(t)[k], params)
      (grad,) = transpose(jnp.ones_like(loss))
      grads.append(grad)
    stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads)
    return ((tuple(losses), aux) if has_aux else tuple(losses)), stacked

  return wrapped


# --------------------------------------------------------------------------- measurements


def _num_losses(stacked) -> int:
  leaves = jax.tree.leaves(stacked)
  if not leaves:
    raise ValueError('harmonization: empty gradient pytree')
  k = leaves[0].shape[0] if leaves[0].ndim else 0
  if k < 2 or any(x.ndim == 0 or x.shape[0] != k for x in leaves):
    raise ValueError(
      'harmonization transforms take per-loss gradients: every leaf [K, ...] with the same K >= 2 '
      '(vatt_jax.optim.harmonization.value_and_per_loss_grad); got leaf shapes '
      f'{sorted({tuple(x.shape) for x in leaves})[:4]}'
    )
  return k


def _gram(leaf: jax.Array) -> jax.Array:
  """[K, ...] → [K, K] float32 inner products over all other axes (no reshape: shard-friendly)."""
  g = leaf.astype(jnp.float32)
  axes = tuple(range(1, g.ndim))
  return jax.lax.dot_general(
    g, g, ((axes, axes), ((), ())), precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )  # fmt: skip


def leaf_grams(stacked) -> tuple[jax.Array, jax.Array]:
  """([L, K, K], [L, K]): the Gram matrix of the K gradients on each of the L leaves (pytree
  order), and whether gradient k is nonzero anywhere on leaf l (exact, even where squares
  underflow)."""
  _num_losses(stacked)
  leaves = jax.tree.leaves(stacked)
  used = [jnp.any(x != 0, axis=tuple(range(1, x.ndim))) for x in leaves]
  return jnp.stack([_gram(x) for x in leaves]), jnp.stack(used)


def _shared(used: jax.Array) -> jax.Array:
  """[L, K] → [L, K, K] bool: leaf l is shared by losses i and j (both gradients nonzero on it)."""
  return used[:, :, None] & used[:, None, :]


def _safe_div(num, den):
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def cosines(grams: jax.Array, used: jax.Array) -> jax.Array:
  """[K, K] cosines of the K gradients over the parameters each pair shares (0 where undefined),
  from `leaf_grams`."""
  shared = _shared(used).astype(grams.dtype)
  dot = jnp.sum(shared * grams, axis=0)
  sq = jnp.diagonal(grams, axis1=1, axis2=2)  # [L, K]
  norm_i = jnp.einsum('lij,li->ij', shared, sq)  # ‖g_i‖² over the leaves i shares with j
  norm_j = jnp.einsum('lij,lj->ij', shared, sq)
  return _safe_div(dot, jnp.sqrt(norm_i) * jnp.sqrt(norm_j))  # no overflow of the product


def alignment(stacked) -> dict[str, jax.Array]:
  """What the trainer logs each step: the cosine of losses 0 and 1 (VATT: video–audio and video–text)
  over their shared parameters, and whether they conflict (cosine < 0)."""
  cos = cosines(*leaf_grams(stacked))[0, 1]
  return {'grad_cosine': cos, 'grad_conflict': (cos < 0).astype(jnp.float32)}


# --------------------------------------------------------------------------- realignment


def _projection_coefficients(
  grams: jax.Array, used: jax.Array, domain: str
) -> tuple[jax.Array, jax.Array]:
  """c [D, K, K] (c[d, i, j]: how much of g_j is taken out of ĝ_i) and the shared masks [L, K, K].

  D = 1 domain (global) or L domains (per leaf). Everything is linear in the gradients, so the inner
  products of the partly projected ĝ_i follow from the Gram matrices:
  ⟨ĝ_i, g_j⟩_S(i,j) = Σ_l S_ij(l) (G_l[i, j] − Σ_j' c[i, j'] S_ij'(l) G_l[j', j]).
  """
  k = grams.shape[-1]
  shared = _shared(used).astype(grams.dtype)  # [L, K, K]
  if domain == 'per_leaf':
    reduce = lambda x: x  # noqa: E731  every leaf its own domain: [L]
  else:
    reduce = lambda x: jnp.sum(x, axis=0, keepdims=True)  # noqa: E731  [1]
  sq = jnp.diagonal(grams, axis1=1, axis2=2)  # [L, K]
  rows = []
  for i in range(k):
    c_i = jnp.zeros(reduce(sq[:, 0]).shape + (k,), grams.dtype)  # [D, K]
    for j in range(k):
      if j == i:
        continue
      s_ij = shared[:, i, j]  # [L]
      # Σ_j' c_i[j'] S_ij'(l) G_l[j', j], with c_i broadcast from its domain to the leaves.
      c_leaf = jnp.broadcast_to(c_i, (grams.shape[0], k)) if domain == 'per_leaf' else c_i[0]
      taken = jnp.sum(c_leaf * shared[:, i, :] * grams[:, :, j], axis=-1)  # [L]
      dot = reduce(s_ij * (grams[:, i, j] - taken))
      norm = reduce(s_ij * sq[:, j])
      coef = jnp.where((dot < 0) & (norm > 0), _safe_div(dot, norm), 0.0)
      c_i = c_i.at[:, j].set(coef)
    rows.append(c_i)
  return jnp.stack(rows, axis=1), shared  # [D, K(i), K(j)]


def realigned_sum(stacked, domain: str = 'global'):
  """Σ_i ĝ_i (see the module docstring) as a pytree without the K axis."""
  if domain not in DOMAINS:
    raise ValueError(f'cross_modal_realignment: domain must be one of {DOMAINS}, got {domain!r}')
  k = _num_losses(stacked)
  leaves, treedef = jax.tree.flatten(stacked)
  grams, used = leaf_grams(stacked)
  coef, shared = _projection_coefficients(grams, used, domain)
  # update_l = Σ_j w_l[j] g_j[l] with w_l[j] = 1 − Σ_i c[i, j] S_ij(l).
  weights = 1.0 - jnp.sum(coef * shared, axis=1)  # [L, K] (coef broadcasts over leaves if global)
  out = []
  for index, leaf in enumerate(leaves):
    w = weights[index].astype(jnp.float32)
    total = sum(w[j] * leaf[j].astype(jnp.float32) for j in range(k))
    out.append(total.astype(leaf.dtype))
  return jax.tree.unflatten(treedef, out)


def cross_modal_realignment(domain: str = 'global') -> optax.GradientTransformation:
  """K-stacked per-loss gradients → one update: conflicting gradients projected onto each other's
  normal planes, then summed (Algorithm 1). domain: 'global' measures conflicts over all shared
  parameters at once (the paper); 'per_leaf' per parameter array."""
  if domain not in DOMAINS:
    raise ValueError(f'cross_modal_realignment: domain must be one of {DOMAINS}, got {domain!r}')

  def update(updates, state, params=None):
    del params
    return realigned_sum(updates, domain), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def sum_losses() -> optax.GradientTransformation:
  """K-stacked per-loss gradients → their plain sum (what one gradient of the total loss gives)."""

  def update(updates, state, params=None):
    del params
    _num_losses(updates)
    return jax.tree.map(lambda g: jnp.sum(g, axis=0), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# --------------------------------------------------------------------------- curriculum


class CurriculumState(NamedTuple):
  count: jax.Array  # int32: steps seen (γ's clock)
  skipped: jax.Array  # int32: steps rejected so far
  applied: jax.Array  # bool: whether the latest step went through
  cosine: jax.Array  # float32: the latest step's cosine (the smallest pairwise one for K > 2)
  threshold: jax.Array  # float32: γ at the latest step


def gradient_curriculum(
  gamma: float | Callable[[jax.Array], jax.Array],
) -> optax.GradientTransformation:
  """Applies a step only when the per-loss gradients agree: cos > γ(t), t = steps seen (Algorithm 2).

  gamma: a constant or an optax schedule (optax.linear_schedule, optax.cosine_decay_schedule, …) of
  the steps seen, rejected ones included, so a rising γ drops more misaligned batches as training
  goes on. A rejected step's gradients become zero (the output keeps the K axis, for a realignment
  or `sum_losses` after it). Alone in front of a stateful optimizer a zero gradient still moves the
  parameters (Adam's momentum); wrap the chain in `skip_rejected` to skip such steps exactly.
  """
  schedule = gamma if callable(gamma) else optax.constant_schedule(gamma)

  def init(params):
    del params
    return CurriculumState(
      count=jnp.zeros((), jnp.int32),
      skipped=jnp.zeros((), jnp.int32),
      applied=jnp.ones((), bool),
      cosine=jnp.zeros((), jnp.float32),
      threshold=jnp.asarray(schedule(0), jnp.float32),
    )

  def update(updates, state, params=None):
    del params
    k = _num_losses(updates)
    cos = cosines(*leaf_grams(updates))
    off_diagonal = ~jnp.eye(k, dtype=bool)
    worst = jnp.min(jnp.where(off_diagonal, cos, jnp.inf))
    threshold = jnp.asarray(schedule(state.count), jnp.float32)
    applied = worst > threshold
    updates = jax.tree.map(lambda g: jnp.where(applied, g, jnp.zeros_like(g)), updates)
    return updates, CurriculumState(
      count=state.count + 1,
      skipped=state.skipped + (~applied).astype(jnp.int32),
      applied=applied,
      cosine=worst,
      threshold=threshold,
    )

  return optax.GradientTransformation(init, update)


def _is_curriculum(x) -> bool:
  return isinstance(x, CurriculumState)


def curriculum_states(opt_state) -> list[CurriculumState]:
  """Every CurriculumState inside an optimizer state (a chain's, a wrapper's, …)."""
  return [s for s in jax.tree.leaves(opt_state, is_leaf=_is_curriculum) if _is_curriculum(s)]


def skip_rejected(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps a chain holding a `gradient_curriculum`: a step it rejects returns a zero update and keeps
  the whole optimizer state as it was (moments, counts, schedules), except the curriculum's own
  counters. So a rejected step is not taken at all, as in Algorithm 2, whatever optimizer follows."""

  def init(params):
    state = inner.init(params)
    if len(curriculum_states(state)) != 1:
      raise ValueError(
        'skip_rejected wraps a chain with exactly one gradient_curriculum; found '
        f'{len(curriculum_states(state))}'
      )
    return state

  def update(updates, state, params=None):
    new_updates, new_state = inner.update(updates, state, params)
    (curriculum,) = curriculum_states(new_state)
    applied = curriculum.applied

    def keep(new, old):
      if _is_curriculum(new):
        return new
      return jax.tree.map(lambda n, o: jnp.where(applied, n, o), new, old)

    kept = jax.tree.map(keep, new_state, state, is_leaf=_is_curriculum)
    new_updates = jax.tree.map(lambda u: jnp.where(applied, u, jnp.zeros_like(u)), new_updates)
    return new_updates, kept

  return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- from a config


def gamma_schedule(cfg, total_steps: int) -> Callable:
  """γ(t) from config.optimizer.harmonization: gamma_schedule 'constant' (gamma_init), 'linear' or
  'cosine' (gamma_init → gamma_end over gamma_steps, 0 meaning total_steps)."""
  kind = cfg.get('gamma_schedule', 'constant')
  init, end = float(cfg.get('gamma_init', 0.0)), float(cfg.get('gamma_end', 0.0))
  for name, value in (('gamma_init', init), ('gamma_end', end)):
    if not -1.0 <= value <= 1.0:
      raise ValueError(
        f'config optimizer.harmonization.{name} must be a cosine in [-1, 1], got {value}'
      )
  steps = int(cfg.get('gamma_steps', 0)) or total_steps
  if steps <= 0:
    raise ValueError(
      'config optimizer.harmonization: γ needs a positive number of steps (gamma_steps, or '
      f'total_steps when it is 0); got gamma_steps={cfg.get("gamma_steps", 0)}, '
      f'total_steps={total_steps}'
    )
  if kind == 'constant':
    return optax.constant_schedule(init)
  if kind == 'linear':
    return optax.linear_schedule(init, end, steps)
  if kind == 'cosine':
    unit = optax.cosine_decay_schedule(1.0, steps)  # 1 → 0 along half a cosine
    return lambda t: end + (init - end) * unit(t)
  raise ValueError(
    f"config optimizer.harmonization.gamma_schedule must be 'constant', 'linear' or 'cosine', "
    f'got {kind!r}'
  )


def build(cfg, total_steps: int, optimizer: optax.GradientTransformation):
  """config.optimizer.harmonization → (transform over K-stacked gradients, or None when off).

  cfg.realign / cfg.curriculum switch the two methods; cfg.monitor alone computes per-loss gradients
  only to log their cosine (the update is the plain sum).
  """
  if cfg is None or not (cfg.get('realign') or cfg.get('curriculum') or cfg.get('monitor')):
    return None
  parts: list[optax.GradientTransformation] = []
  if cfg.get('curriculum'):
    parts.append(gradient_curriculum(gamma_schedule(cfg, total_steps)))
  if cfg.get('realign'):
    parts.append(cross_modal_realignment(cfg.get('domain', 'global')))
  else:
    parts.append(sum_losses())
  tx = optax.chain(*parts, optimizer)
  return skip_rejected(tx) if cfg.get('curriculum') else tx
