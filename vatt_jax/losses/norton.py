"""Norton (Lin et al., ICLR 2024, "Multi-granularity Correspondence Learning from Long-term Noisy
Videos"): a clip–caption contrastive loss whose targets are rectified by optimal transport (faulty
negative exploitation), plus a video–paragraph contrastive loss that aligns each sequence of
`length` consecutive clips with its paragraph of captions by optimal transport with an alignable
prompt bucket (noisy clips and captions can drop into the bucket instead of being matched).

Layout: the N = V·C clips of a batch are clip-major per video (video v's C clips are rows v·C … v·C +
C − 1, in temporal order), and the paragraph loss cuts them into S = N / length sequences of
`length` consecutive clips; every video's C must be a multiple of `length` so that no sequence
straddles two videos (only checkable where C is known: pass `clips_per_video`).

Every clip is assumed to have its own caption (the long-video source emits complete groups). Where
the batch holds "video_mask" / "text_mask" [N], a clip is valid when both are set: invalid clips are
dropped as anchors and as negatives of the clip–caption loss (their Sinkhorn marginal is ~0), the
similarity normalisation and the bucket value use valid pairs only, and a clip sequence with any
invalid clip is dropped from the video–paragraph loss. Each loss is 0 when nothing is valid.

Differences from Norton's PyTorch code (mmpt/losses/nce.py), on purpose:
  * Embeddings are L2-normalised and the clip–caption logits divided by `temperature`, as in
    VATT's own losses (Norton takes raw dot products of VideoCLIP features at temperature 1).
  * Masked words and frames take no part in the fine-grained similarity; Norton's code zeroes their
    cosines, so each masked word still adds α·log(#valid frames) to a caption's sum (and each masked
    frame α·log(#valid words)). An empty caption / clip gives 0 here, not NaN.
  * The bucket value is the k-th smallest matching-pair similarity with k = max(1, ⌊ratio·N⌋)
    (Norton's torch.kthvalue fails for k = 0); `prompt_ratio=None` uses a plain Sinkhorn plan with
    uniform marginals, rescaled to mass `length` (Norton's code leaves that case undefined).
  * The paragraph temperature is fixed (Norton's logit_scale is a Parameter of a non-Module loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from vatt_jax.losses.contrastive import _combined_mask, _l2_normalize
from vatt_jax.ot import bucket_sinkhorn, sinkhorn

# Large but finite: a fully masked row stays finite (and NaN-free under differentiation).
_MASKED = -1e9
# Marginal of an invalid clip in the clip–caption Sinkhorn: its plan row/column carries ~no mass.
_TINY_MASS = 1e-30


def _soft_max_mean(scaled, inner_valid, outer_valid, alpha):
  """mean over valid outer items of α·LSE over valid inner items (last axis); 0 if either is empty.

  scaled [A, B, P, Q] (cosines / α); inner_valid broadcasts to it; outer_valid to [A, B, P]."""
  lse = jax.nn.logsumexp(jnp.where(inner_valid, scaled, _MASKED), axis=-1)
  has_inner = jnp.any(inner_valid, axis=-1)
  value = jnp.where(outer_valid & has_inner, alpha * lse, 0.0)
  count = jnp.sum(jnp.broadcast_to(outer_valid, value.shape), axis=-1)
  return jnp.sum(value, axis=-1) / jnp.maximum(count, 1)


def fine_grained_similarity(
  words: jax.Array,
  word_mask: jax.Array,
  frames: jax.Array,
  frame_mask: jax.Array,
  alpha: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """Norton's log-sum-exp (soft maximum) word–frame similarity, eq. (5).

  With c[a, b, t, v] the cosine of word t of caption a and frame v of clip b:
    t2v[a, b] = mean over valid words t of α·logsumexp over valid frames v of c / α,
    v2t[a, b] = mean over valid frames v of α·logsumexp over valid words t of c / α.
  A caption without a valid word or a clip without a valid frame gives t2v = v2t = 0.

  Args:
    words: [A, W, D]; word_mask: [A, W] (1 valid); frames: [B, F, D]; frame_mask: [B, F].
    alpha: α > 0; α → 0 tends to the max, α → ∞ to the mean plus α·log(count).
  Returns:
    (t2v, v2t), each [A, B] float32 (rows captions, columns clips).
  """
  words = _l2_normalize(words.astype(jnp.float32))
  frames = _l2_normalize(frames.astype(jnp.float32))
  word_mask = word_mask.astype(bool)
  frame_mask = frame_mask.astype(bool)
  scaled = jnp.einsum('atd,bvd->abtv', words, frames) / alpha
  t2v = _soft_max_mean(scaled, frame_mask[None, :, None, :], word_mask[:, None, :], alpha)
  v2t = _soft_max_mean(
    jnp.swapaxes(scaled, 2, 3), word_mask[:, None, None, :], frame_mask[None, :, :], alpha
  )
  return t2v, v2t


def min_max(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """(x − min) / (max − min) over the whole array (over entries where `mask`, if given); 0 where
  max == min or nothing is valid."""
  x = x.astype(jnp.float32)
  if mask is None:
    lo, hi = jnp.min(x), jnp.max(x)
  else:
    mask = jnp.broadcast_to(mask.astype(bool), x.shape)
    lo = jnp.min(jnp.where(mask, x, jnp.inf))
    hi = jnp.max(jnp.where(mask, x, -jnp.inf))
  span = hi - lo
  ok = jnp.isfinite(span) & (span > 0)
  return jnp.where(ok, (x - jnp.where(ok, lo, 0.0)) / jnp.where(ok, span, 1.0), 0.0)


def fused_similarity(
  video: jax.Array,
  text: jax.Array,
  frames: jax.Array,
  frame_mask: jax.Array,
  words: jax.Array,
  word_mask: jax.Array,
  *,
  alpha: float = 1.0,
  fusion_weight: float = 0.5,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Caption–clip similarity of the paragraph loss: (w·pooled + fine) / (w + 1), w = fusion_weight,
  with pooled = min_max(cos(text_a, video_b)) and fine = (min_max(t2v) + min_max(v2t)) / 2.

  Args:
    video: [N, D] clips; text: [N, D] captions; frames: [N, F, D]; frame_mask: [N, F];
    words: [N, W, D]; word_mask: [N, W]; mask: [N] valid clips (min–max over valid pairs) or None.
  Returns:
    [N captions, N clips] float32 in [0, 1] (Norton's orientation: text @ video.T).
  """
  pair = None if mask is None else mask.astype(bool)[:, None] & mask.astype(bool)[None, :]
  video = _l2_normalize(video.astype(jnp.float32))
  text = _l2_normalize(text.astype(jnp.float32))
  pooled = min_max(text @ video.T, pair)
  t2v, v2t = fine_grained_similarity(words, word_mask, frames, frame_mask, alpha)
  fine = (min_max(t2v, pair) + min_max(v2t, pair)) / 2
  return (fusion_weight * pooled + fine) / (fusion_weight + 1)


def bucket_value(sim: jax.Array, ratio: float = 0.3, mask: jax.Array | None = None) -> jax.Array:
  """The alignable prompt bucket p: the k-th smallest matching-pair similarity diag(sim),
  k = max(1, ⌊ratio·N⌋) (1-indexed, like torch.kthvalue), N the number of valid clips. A constant
  (no gradient); 0 when no clip is valid.

  Args:
    sim: [N, N] caption–clip similarity; ratio in (0, 1]; mask: [N] valid clips or None.
  """
  n = sim.shape[0]
  diag = jnp.diagonal(sim).astype(jnp.float32)
  if mask is None:
    value = jnp.sort(diag)[max(1, int(ratio * n)) - 1]
  else:
    mask = mask.astype(bool)
    count = jnp.sum(mask)
    # k per possible valid count, in Python arithmetic (as with no mask), looked up under jit.
    ks = jnp.asarray([max(1, int(ratio * c)) for c in range(n + 1)])
    ordered = jnp.sort(jnp.where(mask, diag, jnp.inf))
    value = jnp.where(count > 0, ordered[ks[count] - 1], 0.0)
  return jax.lax.stop_gradient(value)


def _cross_entropy_diagonal(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """mean over valid rows i of −log softmax(logits_i)[i], invalid rows and columns left out."""
  pair = valid[:, None] & valid[None, :]
  logits = jnp.where(pair, logits, _MASKED)
  per_row = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
  weights = valid.astype(jnp.float32)
  return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def video_paragraph_loss(
  sim: jax.Array,
  *,
  length: int = 8,
  epsilon: float = 0.1,
  num_iters: int = 50,
  prompt_ratio: float | None = 0.3,
  temperature: float = 0.07,
  mask: jax.Array | None = None,
  clips_per_video: int | None = None,
) -> jax.Array:
  """Video–paragraph contrastive loss, eqs. (2)–(4) and (6).

  The N clips form S = N / length sequences of `length` consecutive clips (and their captions a
  paragraph). For paragraph a and clip sequence b, the block sim[a·L:(a+1)·L, b·L:(b+1)·L] (captions
  × clips) is re-aligned by a Sinkhorn plan with a prompt bucket of value p = bucket_value(sim,
  prompt_ratio) (`bucket_sinkhorn`, smoothness ε, mass rescaled to `length`; no gradient), and
  logit[a, b] = Σ plan ⊙ block / temperature. Loss = CE(logits, diag) + CE(logitsᵀ, diag).

  Args:
    sim: [N, N] caption–clip similarity (rows captions), e.g. `fused_similarity`.
    mask: [N] valid clips; a sequence with any invalid clip is left out. None: all valid.
    clips_per_video: C, checked to be a multiple of `length` when given.
  Returns:
    scalar float32.
  """
  n = sim.shape[0]
  if sim.ndim != 2 or sim.shape[1] != n:
    raise ValueError(f'video_paragraph_loss wants a square [N, N] similarity; got {sim.shape}')
  if length < 1 or n % length:
    raise ValueError(
      f'config loss.length ({length}) must divide the number of clips in the batch ({n})'
    )
  if clips_per_video is not None and clips_per_video % length:
    raise ValueError(
      f'config loss.length ({length}) must divide the clips per video ({clips_per_video}): a clip '
      'sequence may not straddle two videos'
    )
  s = n // length
  sim = sim.astype(jnp.float32)
  # blocks[a, b] = sim[a·L:(a+1)·L, b·L:(b+1)·L]: captions of paragraph a × clips of sequence b.
  blocks = sim.reshape(s, length, s, length).transpose(0, 2, 1, 3)
  fixed = jax.lax.stop_gradient(blocks)
  if prompt_ratio is None:
    plan = sinkhorn(fixed, epsilon=epsilon, num_iters=num_iters).plan
    plan = plan * (length / jnp.sum(plan, axis=(-2, -1), keepdims=True))
  else:
    p = bucket_value(sim, prompt_ratio, mask)
    plan = bucket_sinkhorn(fixed, p, epsilon=epsilon, num_iters=num_iters, total_mass=length)
  plan = jax.lax.stop_gradient(plan)
  logits = jnp.sum(plan * blocks, axis=(-2, -1)) / temperature  # [S paragraphs, S sequences]
  if mask is None:
    valid = jnp.ones((s,), bool)
  else:
    valid = jnp.all(mask.astype(bool).reshape(s, length), axis=1)
  return _cross_entropy_diagonal(logits, valid) + _cross_entropy_diagonal(logits.T, valid)


def clip_caption_loss(
  video: jax.Array,
  text: jax.Array,
  *,
  temperature: float = 0.07,
  beta: float = 0.3,
  epsilon: float = 1.0,
  num_iters: int | None = 50,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Clip–caption contrastive loss with faulty negative exploitation, eq. (7).

  logits[i, j] = cos(video_i, text_j) / temperature. Q = (m + n)·sinkhorn(logits, a = b = 1/(m + n),
  ε = epsilon) (Norton's log_optimal_transport; no gradient), whose rows sum to 1; the targets
  β·Q + (1 − β)·I (video→text) and β·Qᵀ + (1 − β)·I (text→video) replace the identity:
    loss = −mean_i Σ_j T_v2t[i, j] log softmax(logits)[i, j] − mean_i Σ_j T_t2v[i, j] log
    softmax(logitsᵀ)[i, j].
  beta = 0 or num_iters = 0/None gives the plain symmetric InfoNCE.

  Args:
    video: [N, D]; text: [N, D]; mask: [N] valid pairs (dropped as anchors and negatives) or None.
  Returns:
    scalar float32.
  """
  if video.ndim != 2 or video.shape != text.shape:
    raise ValueError(
      f'clip_caption_loss wants video and text [N, D]; got {video.shape}, {text.shape}'
    )
  n = video.shape[0]
  video = _l2_normalize(video.astype(jnp.float32))
  text = _l2_normalize(text.astype(jnp.float32))
  logits = video @ text.T / temperature  # [N videos, N texts]
  valid = jnp.ones((n,), bool) if mask is None else mask.astype(bool)
  pair = valid[:, None] & valid[None, :]
  eye = jnp.eye(n, dtype=jnp.float32)
  if beta == 0 or not num_iters:
    targets_v2t = targets_t2v = eye
  else:
    total = 2.0 * jnp.sum(valid.astype(jnp.float32))  # m + n over valid clips and captions
    marginal = jnp.where(valid, 1.0 / jnp.maximum(total, 1.0), _TINY_MASS)
    out = sinkhorn(
      jax.lax.stop_gradient(logits), marginal, marginal, epsilon=epsilon, num_iters=num_iters
    )
    q = jnp.where(pair, jax.lax.stop_gradient(out.plan) * total, 0.0)
    targets_v2t = beta * q + (1 - beta) * eye
    targets_t2v = beta * q.T + (1 - beta) * eye
  logits = jnp.where(pair, logits, _MASKED)
  weights = valid.astype(jnp.float32)

  def direction(lg, targets):
    per_row = -jnp.sum(targets * jax.nn.log_softmax(lg, axis=1), axis=1)
    return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  return direction(logits, targets_v2t) + direction(logits.T, targets_t2v)


@dataclasses.dataclass(frozen=True)
class NortonOptions:
  """Norton's hyper-parameters (its paper and code): the one place their defaults live. Config
  loss fields of the same names override them (losses.build_loss, configs/norton_demo.py); the
  long-video evaluator reads the same ones."""

  temperature: float = 0.07  # clip–caption logits: cosine / τ
  beta: float = 0.3  # clip–caption targets (1 − β)·I + β·Q, Q the Sinkhorn plan of the logits
  clip_epsilon: float = 1.0
  sinkhorn_iters: int | None = 50  # both solvers (0/None: no clip–caption plan)
  paragraph_weight: float = 0.1  # total = clip–caption + 0.1 · video–paragraph
  length: int = 8  # clips (and captions) per paragraph
  paragraph_epsilon: float = 0.1
  prompt_ratio: float | None = 0.3  # bucket value: the ⌊0.3·N⌋-th smallest matching similarity
  paragraph_temperature: float = 0.07
  alpha: float = 1.0  # log-sum-exp sharpness of the word–frame similarity
  fusion_weight: float = 0.5  # fused = (0.5·pooled + fine-grained) / 1.5
  paragraph_iters: int | None = None  # the paragraph solver's (None: sinkhorn_iters, or 50)
  clips_per_video: int | None = None  # checked: a paragraph may not straddle two videos

  def __post_init__(self):
    ranged = {
      'temperature': self.temperature > 0,
      'beta': 0 <= self.beta <= 1,
      'clip_epsilon': self.clip_epsilon > 0,
      'paragraph_weight': self.paragraph_weight >= 0,
      'paragraph_epsilon': self.paragraph_epsilon > 0,
      'paragraph_temperature': self.paragraph_temperature > 0,
      'alpha': self.alpha > 0,
      'fusion_weight': self.fusion_weight >= 0,
      'prompt_ratio': self.prompt_ratio is None or 0 < self.prompt_ratio <= 1,
    }
    for name in ('sinkhorn_iters', 'paragraph_iters'):
      value = getattr(self, name)
      ranged[name] = value is None or (isinstance(value, int) and value >= 0)
    for name in ('length', 'clips_per_video'):
      value = getattr(self, name)
      ok = isinstance(value, int) and value >= 1
      ranged[name] = ok or (name == 'clips_per_video' and value is None)
    wants = {'beta': 'in [0, 1]', 'prompt_ratio': 'None or in (0, 1]', 'length': 'an int >= 1',
             'clips_per_video': 'an int >= 1 or None', 'sinkhorn_iters': 'an int >= 0 or None',
             'paragraph_iters': 'an int >= 0 or None', 'paragraph_weight': '>= 0',
             'fusion_weight': '>= 0'}  # fmt: skip
    for name, ok in ranged.items():
      if not ok:
        raise ValueError(
          f'config loss.{name} must be {wants.get(name, "> 0")}, got {getattr(self, name)!r}'
        )
    if self.clips_per_video is not None and self.clips_per_video % self.length:
      raise ValueError(
        f'config loss.length ({self.length}) must divide loss.clips_per_video '
        f'({self.clips_per_video}): a clip sequence may not straddle two videos'
      )

  @property
  def paragraph_iterations(self) -> int:
    """The paragraph solver's iterations: paragraph_iters, else sinkhorn_iters, else 50."""
    if self.paragraph_iters is not None:
      return self.paragraph_iters
    return self.sinkhorn_iters or 50

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> NortonOptions:
    """The options of a config.loss section (its 'name' aside); unknown fields are an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in dict(cfg).items() if k != 'name'}
    unknown = sorted(given.keys() - fields)
    if unknown:
      raise ValueError(
        f'config loss has fields Norton does not know: {unknown} (it has {sorted(fields)})'
      )
    return cls(**given)


def norton_loss(
  embeddings: dict[str, jax.Array], batch: dict[str, jax.Array], **options
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """clip_caption_loss + paragraph_weight · video_paragraph_loss(fused_similarity).

  Embeddings (N clips, clip-major per video): "video_vt" [N, D], "text_vt" [N, K, D] (caption 0 is
  used), "video_frames_vt" [N, F, D], "video_frames_mask" [N, F], "text_words_vt" [N, K, W, D],
  "text_words_mask" [N, K, W]. The per-frame and per-word ones are needed only when
  paragraph_weight > 0. Batch: optional "video_mask", "text_mask" [N] (see the module docstring).

  sinkhorn_iters drives both Sinkhorn solvers, as in Norton (0/None turns the clip–caption one
  off); paragraph_iters, when given, overrides it for the paragraph one (default: sinkhorn_iters,
  or 50 when that is 0/None).

  options: the fields of NortonOptions (its defaults otherwise).

  Returns:
    (total, {"loss_clip", "loss_paragraph"}) as float32 scalars.
  """
  o = NortonOptions(**options)
  text = embeddings['text_vt']
  if text.ndim != 3:
    raise ValueError(f'norton_loss wants text_vt [N, K, D]; got {text.shape}')
  valid = _combined_mask(batch, 'video_mask', 'text_mask')
  video = embeddings['video_vt']
  loss_clip = clip_caption_loss(
    video,
    text[:, 0],
    temperature=o.temperature,
    beta=o.beta,
    epsilon=o.clip_epsilon,
    num_iters=o.sinkhorn_iters,
    mask=valid,
  )
  if o.paragraph_weight:
    sim = fused_similarity(
      video,
      text[:, 0],
      embeddings['video_frames_vt'],
      embeddings['video_frames_mask'],
      embeddings['text_words_vt'][:, 0],
      embeddings['text_words_mask'][:, 0],
      alpha=o.alpha,
      fusion_weight=o.fusion_weight,
      mask=valid,
    )
    loss_paragraph = video_paragraph_loss(
      sim,
      length=o.length,
      epsilon=o.paragraph_epsilon,
      num_iters=o.paragraph_iterations,
      prompt_ratio=o.prompt_ratio,
      temperature=o.paragraph_temperature,
      mask=valid,
      clips_per_video=o.clips_per_video,
    )
  else:
    loss_paragraph = jnp.zeros((), jnp.float32)
  total = loss_clip + o.paragraph_weight * loss_paragraph
  return total, {'loss_clip': loss_clip, 'loss_paragraph': loss_paragraph}
