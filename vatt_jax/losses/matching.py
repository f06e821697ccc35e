"""The multimodal encoder's objectives (SViTT / ALBEF / Singularity): video–text matching (VTM)
with hard negatives mined from the contrastive similarities, and masked language modelling (MLM).

VTM. For every text i one negative video is drawn with probability ∝ softmax_j(s(i, j)) over the
videos j that are not positives of i, and for every video j one negative text likewise; the
multimodal encoder then sees M positive pairs, M (text, negative video) and M (negative text,
video) pairs, and a 2-way head is trained with cross-entropy (label 1 for the positives). "Not a
positive" is the contrastive loss's own positive set (EgoNCE: the diagonal and every pair that
shares a noun and a verb), so a mined negative is never a pair the contrastive loss pulls together.

MLM. BERT's recipe on the text ids before the special tokens are added: each real token (not
padding) is chosen with probability `probability`; a chosen token becomes [MASK] with probability
0.8, a uniformly random real token id with 0.1, and stays itself with 0.1; the loss is the
cross-entropy of the original id at the chosen positions, from the multimodal encoder's outputs.

Differences from the reference code (JerryYLi/svitt models/model_retrieval_base.py, after ALBEF),
on purpose:
  * A row whose every column is a positive (possible with EgoNCE's tag positives, impossible with
    the diagonal alone) has no negative: its two negative pairs are dropped from the VTM loss
    (`valid`), where torch.multinomial on an all-zero row raises or returns garbage.
  * The weights are softmax(s) with the positives removed, drawn with jax.random.categorical
    (Gumbel-max) on the logits with positives at −inf: the same distribution as SViTT's
    multinomial(softmax(s + 1e-4) · (1 − mask)) — the 1e-4 shift changes nothing — drawn
    independently per row.
  * SViTT's pretraining config masks with probability 0.5 (configs/pretrain_webvid.yaml
    mlm_prob: 0.5); the issue's and BERT's 0.15 is the default here, `probability` sets either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -1  # label of a position without an MLM target


def l2_normalize(x: jax.Array) -> jax.Array:
  """Rows of x scaled to unit L2 norm (a zero row stays zero)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def cosine_logits(text: jax.Array, video: jax.Array, temperature: float) -> jax.Array:
  """[M, D] text and video embeddings → [M, M] cosine similarities / τ, [text i, video j]: the
  logits the hard negatives are drawn from."""
  return l2_normalize(text) @ l2_normalize(video).T / temperature


def sample_negatives(
  rng: jax.Array, similarity: jax.Array, positives: jax.Array, valid: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """One negative column per row, drawn ∝ softmax over the row's non-positive valid columns.

  Args:
    rng: key of the draw.
    similarity: [M, M] logits (e.g. text i · video j / τ); not differentiated through.
    positives: [M, M] bool, True where column j is a positive of row i (the diagonal included).
    valid: [M] bool, real samples (an invalid column is never drawn; an invalid row's draw is
      marked invalid). None: all valid.
  Returns:
    (index [M] int32, has_negative [M] bool): the drawn column, and whether the row is valid and
    had any candidate (False rows carry index 0, to be masked out).
  """
  num = similarity.shape[0]
  if similarity.shape != (num, num) or positives.shape != (num, num):
    raise ValueError(
      f'sample_negatives wants [M, M] similarity and positives; got {similarity.shape}, '
      f'{positives.shape}'
    )
  valid = jnp.ones((num,), bool) if valid is None else valid.astype(bool)
  candidate = ~positives.astype(bool) & valid[None, :]
  logits = jnp.where(candidate, jax.lax.stop_gradient(similarity).astype(jnp.float32), -jnp.inf)
  has = valid & jnp.any(candidate, axis=1)
  # A row without a candidate draws from zeros (any column); its result is masked by `has`.
  logits = jnp.where(has[:, None], logits, 0.0)
  index = jax.random.categorical(rng, logits, axis=1).astype(jnp.int32)
  return jnp.where(has, index, 0), has


def matching_loss(
  logits: jax.Array, labels: jax.Array, weights: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted 2-way cross-entropy of pair logits.

  Args:
    logits: [P, 2] (column 1 = "matches"); labels: [P] int 0/1; weights: [P] 0/1.
  Returns:
    (mean cross-entropy over counted pairs (0 when none), {'vtm_accuracy', 'vtm_pairs'}).
  """
  if logits.ndim != 2 or logits.shape[1] != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f'matching_loss wants logits [P, 2] and labels [P]; got {logits.shape}, '
                     f'{labels.shape}')  # fmt: skip
  loss, accuracy, pairs = _weighted_cross_entropy(logits, labels.astype(jnp.int32), weights)
  return loss, {'vtm_accuracy': accuracy, 'vtm_pairs': pairs}


def vtm_loss(logits: jax.Array, weights: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Video–text matching cross-entropy over the 3M pairs [positives; text–negative video;
  negative text–video].

  Args:
    logits: [3M, 2] float (column 1 = "matches").
    weights: [3M] 0/1, which pairs count (invalid samples, rows without a negative).
  Returns:
    (mean cross-entropy over the counted pairs (0 when none), {'vtm_accuracy': fraction of
    counted pairs classified right}).
  """
  three_m = logits.shape[0]
  if logits.shape != (three_m, 2) or three_m % 3:
    raise ValueError(f'vtm_loss wants logits [3M, 2]; got {logits.shape}')
  m = three_m // 3
  labels = jnp.concatenate([jnp.ones((m,), jnp.int32), jnp.zeros((2 * m,), jnp.int32)])
  loss, terms = matching_loss(logits, labels, weights)
  return loss, {'vtm_accuracy': terms['vtm_accuracy']}


def mask_tokens(
  rng: jax.Array,
  ids: jax.Array,
  *,
  mask_id: int,
  vocab_size: int,
  probability: float = 0.15,
  valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """BERT's MLM corruption of token ids (module docstring).

  Args:
    ids: [B, W] int32 text ids, 0 = padding (never chosen); ids of real tokens in [1, vocab_size).
    mask_id: the [MASK] id.
    vocab_size: random replacements are uniform over [1, vocab_size) (real tokens only).
    probability: chance that a real token is chosen.
    valid: [B] rows that may be chosen at all (None: all).
  Returns:
    (corrupted ids [B, W] int32, labels [B, W] int32: the original id where chosen, IGNORE
    elsewhere).
  """
  if not 0.0 < probability < 1.0:
    raise ValueError(f'mask_tokens: probability must be in (0, 1), got {probability}')
  choose_rng, kind_rng, word_rng = jax.random.split(rng, 3)
  real = ids > 0
  if valid is not None:
    real &= valid.astype(bool)[:, None]
  chosen = real & jax.random.bernoulli(choose_rng, probability, ids.shape)
  kind = jax.random.uniform(kind_rng, ids.shape)
  random_ids = jax.random.randint(word_rng, ids.shape, 1, vocab_size, dtype=ids.dtype)
  corrupted = jnp.where(chosen & (kind < 0.8), mask_id, ids)
  corrupted = jnp.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids, corrupted)
  labels = jnp.where(chosen, ids, IGNORE)
  return corrupted.astype(ids.dtype), labels.astype(jnp.int32)


def mlm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of the original ids at the chosen positions.

  Args:
    logits: [B, W, V] float; labels: [B, W] int32, IGNORE where nothing is predicted.
  Returns:
    (mean over chosen positions (0 when none), {'mlm_accuracy', 'mlm_tokens'}).
  """
  if logits.shape[:2] != labels.shape:
    raise ValueError(f'mlm_loss: logits {logits.shape} and labels {labels.shape} disagree')
  chosen = labels != IGNORE
  loss, accuracy, tokens = _weighted_cross_entropy(logits, jnp.where(chosen, labels, 0), chosen)
  return loss, {'mlm_accuracy': accuracy, 'mlm_tokens': tokens}


def _weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """(mean cross-entropy, argmax accuracy, Σ weights) over the rows of logits [..., C] with integer
  targets [...], each row weighted (0: ignored); the means divide by max(Σ weights, 1)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  total = jnp.sum(weights)
  count = jnp.maximum(total, 1.0)
  right = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(nll * weights) / count, jnp.sum(right * weights) / count, total
