"""NCE and MIL-NCE as in the official VATT code (objectives.py AsymmetricNCE), and the VATT
pretraining objective.

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
  video_mask: jax.Array | None = None,
) -> jax.Array:
  """MIL-NCE between clips and their L positive narrations, as in the official VATT code.

  Source: official VATT code, objectives.py AsymmetricNCE (`_calculate_nce` with embed_1 = video,
  embed_2 = text and embed_2_mask = text_mask). With s(i, j, l) = <v_i, t_{j,l}> / temperature on
  L2-normalised vectors, the loss of anchor b is

    loss_b = logsumexp( H1(b) ∪ H2(b) ) − logsumexp( {s(b, b, l)}_l ),
    H1(b) = {s(b, j, l) : text_mask_j, all l}    video b against the texts of every sample,
    H2(b) = {s(i, b, l) : video_mask_i, all l}   the L texts of b against the video of every sample,

  so the positive pairs appear in both halves of the denominator. The masks act asymmetrically,
  each one only on its own modality:

  * text_mask_j = 0: sample j's *texts* are removed as negatives (from H1 of every anchor) and j is
    no anchor; its *video* stays a negative in H2 of the other anchors (official behaviour).
  * video_mask_i = 0 (a vatt-jax extension, not in the official code): the mirror image; sample
    i's *video* is removed as a negative (from H2 of every anchor) and i is no anchor; its *texts*
    stay negatives in H1 of the other anchors. With video_mask=None the loss is the official one.

  The loss is the mean of loss_b over the anchors valid in both masks, and exactly 0 (with zero,
  finite gradients, never NaN) when there is none. The gradient reaching a removed text (or
  removed video) is exactly zero; a text-less sample's video generally gets a gradient as a
  negative.

  Args:
    video: [B, D] video embeddings in the video–text space.
    text: [B, L, D] embeddings of each clip's L candidate narrations (its own and its neighbours).
    text_mask: [B] 1/True for samples whose text is valid; None means all valid.
    temperature: softmax temperature τ.
    video_mask: [B] 1/True for samples whose video is valid; None means all valid.
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
  all_valid = jnp.ones((batch,), bool)
  text_valid = all_valid if text_mask is None else text_mask.astype(bool)
  video_valid = all_valid if video_mask is None else video_mask.astype(bool)

  # Row b of H1: video b vs the texts of every sample j; columns of invalid texts removed.
  video_to_texts = jnp.where(text_valid[None, :, None], sim, _MASKED).reshape(batch, -1)
  # Row b of H2: the texts of b vs the video of every sample i; columns of invalid videos removed.
  texts_to_videos = jnp.where(video_valid[:, None, None], sim, _MASKED)
  texts_to_videos = jnp.transpose(texts_to_videos, (1, 0, 2)).reshape(batch, -1)
  denominator = jax.nn.logsumexp(jnp.concatenate([video_to_texts, texts_to_videos], axis=1), axis=1)
  numerator = jax.nn.logsumexp(
    sim[jnp.arange(batch), jnp.arange(batch)], axis=1
  )  # [B, L] positives
  # Every entry is finite (a removed one is −1e9), so per_sample is finite and an invalid anchor's
  # weight 0 gives its row an exactly zero gradient.
  per_sample = denominator - numerator
  weights = (text_valid & video_valid).astype(jnp.float32)
  return jnp.sum(per_sample * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def nce(
  video: jax.Array,
  audio: jax.Array,
  mask: jax.Array | None = None,
  temperature: float = 0.07,
  video_mask: jax.Array | None = None,
) -> jax.Array:
  """NCE between clips and their audio: MIL-NCE with L = 1 (official VATT code, objectives.py
  AsymmetricNCE, with embed_2 = audio and embed_2_mask = audio_mask).

  `mask` is the audio mask: a sample with invalid audio loses its audio as a negative and its place
  as an anchor, while its video stays a negative for the other samples' audio. `video_mask` is the
  mirror image (see mil_nce). With B = 1 the loss is exactly log 2 (the positive appears once in
  each half of the denominator).

  Args:
    video: [B, D]; audio: [B, D]; mask: [B] valid audio or None; video_mask: [B] valid video or
      None.
  Returns:
    scalar float32 loss.
  """
  if audio.ndim != 2:
    raise ValueError(f'nce wants audio [B, D]; got {audio.shape}')
  return mil_nce(video, audio[:, None, :], mask, temperature, video_mask)


def _mask(batch: dict, name: str) -> jax.Array | None:
  return batch[name].astype(bool) if name in batch else None


def _combined_mask(batch: dict, *names: str) -> jax.Array | None:
  """AND of the named masks present in batch, or None (used by the Norton loss)."""
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

  Masks, as in the official VATT code (objectives.py AsymmetricNCE): audio_mask is the NCE term's
  second-modality mask and text_mask the MIL-NCE term's, so a clip without text (e.g. from
  AudioSet) is no anchor of the video–text term and its text is no negative there, but its video
  stays a negative for the other clips' texts (and likewise for audio). video_mask, which the
  official AsymmetricNCE ignores, is passed to both terms as `video_mask` (the mirror image; see
  mil_nce).
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
      _mask(batch, 'audio_mask'),
      temperature,
      video_mask=_mask(batch, 'video_mask'),
    )
  if weight_vt:
    loss_vt = mil_nce(
      embeddings['video_vt'],
      embeddings['text_vt'],
      _mask(batch, 'text_mask'),
      temperature,
      video_mask=_mask(batch, 'video_mask'),
    )
  total = (weight_va * loss_va + weight_vt * loss_vt) / (weight_va + weight_vt)
  return total, {'loss_va': loss_va, 'loss_vt': loss_vt}
