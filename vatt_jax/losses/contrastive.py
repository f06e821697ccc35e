"""NCE and MIL-NCE in the official VATT form, and the VATT pretraining objective.

Both losses take the *global* batch: under jit on globally sharded arrays the similarity matrix spans
every device's samples, so each anchor's negatives are the whole batch and gradients flow to them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Large but finite, so a fully masked row stays finite (and its gradient NaN-free) before it is
# weighted out.
_MASKED = -1e9


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def mil_nce(
  video: jax.Array,
  text: jax.Array,
  text_mask: jax.Array | None = None,
  temperature: float = 0.07,
) -> jax.Array:
  """MIL-NCE between clips and their L positive narrations (official VATT form).

  For sample b, with s(i, j, l) = <v_i, t_{j,l}> / temperature on L2-normalised vectors:
    loss_b = logsumexp( {s(b, j, l)}_{j,l} ∪ {s(j, b, l)}_{j,l} ) − logsumexp( {s(b, b, l)}_l )
  i.e. video b against all B·L texts, and the L texts of b against all B videos; the positive pairs
  appear in both halves of the denominator. A sample with text_mask 0 is dropped as a negative (from
  both halves of every other sample's denominator) and as an anchor; the loss is the mean over valid
  anchors, and 0 (not NaN) when none is valid.

  Args:
    video: [B, D] video embeddings in the video–text space.
    text: [B, L, D] embeddings of each clip's L candidate narrations (its own and its neighbours).
    text_mask: [B] 1/True for samples whose text is valid; None means all valid.
    temperature: softmax temperature τ.
  Returns:
    scalar float32 loss.
  """
  if video.ndim != 2 or text.ndim != 3 or text.shape[0] != video.shape[0]:
    raise ValueError(
      f'mil_nce wants video [B, D] and text [B, L, D]; got {video.shape}, {text.shape}'
    )
  batch = video.shape[0]
  video = _l2_normalize(video.astype(jnp.float32))
  text = _l2_normalize(text.astype(jnp.float32))
  # sim[i, j, l] = <video_i, text_{j, l}> / τ
  sim = jnp.einsum('id,jld->ijl', video, text) / temperature
  valid = jnp.ones((batch,), bool) if text_mask is None else text_mask.astype(bool)
  pair_valid = valid[:, None] & valid[None, :]  # [B, B]: both ends of the pair valid
  sim = jnp.where(pair_valid[..., None], sim, _MASKED)

  video_to_texts = sim.reshape(batch, -1)  # row b: video b vs every text
  texts_to_videos = jnp.transpose(sim, (1, 0, 2)).reshape(batch, -1)  # row b: texts of b vs videos
  denominator = jax.nn.logsumexp(jnp.concatenate([video_to_texts, texts_to_videos], axis=1), axis=1)
  numerator = jax.nn.logsumexp(
    sim[jnp.arange(batch), jnp.arange(batch)], axis=1
  )  # [B, L] positives
  per_sample = denominator - numerator
  weights = valid.astype(jnp.float32)
  return jnp.sum(per_sample * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def nce(
  video: jax.Array,
  audio: jax.Array,
  mask: jax.Array | None = None,
  temperature: float = 0.07,
) -> jax.Array:
  """Symmetric-denominator NCE between clips and their audio: MIL-NCE with L = 1.

  With B = 1 the loss is exactly log 2 (the positive appears once in each half of the denominator).

  Args:
    video: [B, D]; audio: [B, D]; mask: [B] valid pairs or None.
  Returns:
    scalar float32 loss.
  """
  if audio.ndim != 2:
    raise ValueError(f'nce wants audio [B, D]; got {audio.shape}')
  return mil_nce(video, audio[:, None, :], mask, temperature)


def _combined_mask(batch: dict, *names: str) -> jax.Array | None:
  masks = [batch[n].astype(bool) for n in names if n in batch]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = out & m
  return out


def vatt_pretraining_loss(
  embeddings: dict[str, jax.Array],
  batch: dict[str, jax.Array],
  *,
  temperature: float = 0.07,
  weight_va: float = 1.0,
  weight_vt: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(w_va · NCE(video_va, audio_va) + w_vt · MIL-NCE(video_vt, text_vt)) / (w_va + w_vt).

  Masks: the video–audio term uses video_mask & audio_mask, the video–text term video_mask &
  text_mask (a clip without text, e.g. from AudioSet, takes part only in the video–audio term).
  A term whose weight is 0 is skipped and reported as 0.0: with weight_va = 0 no audio is needed.

  Returns:
    (total loss, {"loss_va", "loss_vt"}) as float32 scalars.
  """
  if weight_va < 0 or weight_vt < 0 or weight_va + weight_vt <= 0:
    raise ValueError(f'loss weights must be >= 0 with a positive sum; got {weight_va}, {weight_vt}')
  # A term of weight 0 is not computed (reported as 0), so its embeddings may be absent: e.g.
  # post-training on video and text only, without audio.
  loss_va = loss_vt = jnp.zeros((), jnp.float32)
  if weight_va:
    loss_va = nce(
      embeddings['video_va'],
      embeddings['audio_va'],
      _combined_mask(batch, 'video_mask', 'audio_mask'),
      temperature,
    )
  if weight_vt:
    loss_vt = mil_nce(
      embeddings['video_vt'],
      embeddings['text_vt'],
      _combined_mask(batch, 'video_mask', 'text_mask'),
      temperature,
    )
  total = (weight_va * loss_va + weight_vt * loss_vt) / (weight_va + weight_vt)
  return total, {'loss_va': loss_va, 'loss_vt': loss_vt}
