"""All-in-one's pretraining objective (Wang et al., CVPR 2023; showlab/all-in-one
AllInOne/modules/objectives.py): video–text matching (VTM) on the pooled joint output, masked
language modelling (MLM) on the joint output's text positions, and the unimodal contrastive loss
(the reference's `ind_itc`) between the text-only and video-only embeddings:

  loss = vtm_weight · VTM + mlm_weight · MLM + itc_weight · ITC

VTM negatives, two ways (config loss.negatives):
  'reference'  the reference's compute_itm_wpa: of the B pairs, exactly ⌊B/2⌋ (chosen at random)
               keep their own video (label 1); the others get another video (label 0). The
               reference draws that video from the whole dataset (`false_image_0`); here it is a
               uniformly random OTHER valid sample of the global batch (never the pair's own).
  'hard'       SViTT-Ego's sampler (losses/matching.py): for every text one negative video and
               for every video one negative text, drawn ∝ softmax of the unimodal contrastive
               similarities; 3B pairs [positives; text–negative video; negative text–video].
The loss is the mean cross-entropy over the counted pairs (a pair of an invalid sample, or a
negative without a candidate, does not count).

ITC is the reference's compute_ind_itc: symmetric InfoNCE at a fixed temperature 0.05 on the
L2-normalised projections, summed over the two directions (−mean log p(t→v) − mean log p(v→t));
losses/egonce.infonce computes exactly that sum.

MLM: BERT's 80/10/10 corruption with probability 0.15 (matching.mask_tokens), cross-entropy at the
chosen positions (matching.mlm_loss).

Left out on purpose: the reference's word–patch alignment term (`itm_wpa_loss`, 0.1 × an IPOT
optimal-transport distance) is not part of the issue's objective and not used by the paper's
ablations; it is not implemented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vatt_jax.losses.egonce import infonce
from vatt_jax.losses.matching import matching_loss, mlm_loss

NEGATIVES = ('reference', 'hard')


def reference_negatives(rng: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The reference's VTM draw on a batch of M samples.

  Args:
    rng: key.
    valid: [M] bool, samples with a clip and a caption.
  Returns:
    (video index [M] int32: the video paired with text i, labels [M] int32: 1 where that is i's own
    video, weights [M] float32: 1 for counted pairs). Exactly ⌊M/2⌋ rows are labelled 1 (a random
    choice); a row labelled 0 pairs text i with a uniformly random valid video j ≠ i and is not
    counted when it has none; invalid rows are never counted and never drawn.
  """
  num = valid.shape[0]
  valid = valid.astype(bool)
  order_rng, draw_rng = jax.random.split(rng)
  labels = (jax.random.permutation(order_rng, num) < num // 2).astype(jnp.int32)
  eye = jnp.eye(num, dtype=bool)
  candidate = valid[None, :] & ~eye
  has = jnp.any(candidate, axis=1)
  logits = jnp.where(candidate, 0.0, -jnp.inf)
  logits = jnp.where(has[:, None], logits, 0.0)
  other = jax.random.categorical(draw_rng, logits, axis=1).astype(jnp.int32)
  index = jnp.where(labels == 1, jnp.arange(num, dtype=jnp.int32), other)
  counted = valid & ((labels == 1) | has)
  return index, labels, counted.astype(jnp.float32)


def allinone_loss(
  out: dict,
  batch: dict,
  *,
  temperature: float = 0.05,
  vtm_weight: float = 1.0,
  mlm_weight: float = 1.0,
  itc_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The objective (module docstring) from the model's outputs.

  Args:
    out: 'vtm_logits' [P, 2], 'vtm_labels' [P], 'vtm_weights' [P], 'mlm_logits' [M, W, V],
      'mlm_labels' [M, W] (matching.IGNORE where nothing is predicted), 'text_vt' / 'video_vt'
      [M, E] (needed when itc_weight > 0).
    batch: 'valid' [M] bool (samples with a clip and a caption).
    temperature: of the contrastive loss (the reference's 0.05).
  Returns:
    (loss, terms: loss_vtm, loss_mlm, loss_itc (the weighted parts before weighting), and
    vtm_accuracy, vtm_pairs, mlm_accuracy, mlm_tokens, loss_t2v, loss_v2t when computed).
  """
  loss_vtm, terms = matching_loss(out['vtm_logits'], out['vtm_labels'], out['vtm_weights'])
  loss_mlm, mlm_terms = mlm_loss(out['mlm_logits'], out['mlm_labels'])
  terms = {**terms, **mlm_terms, 'loss_vtm': loss_vtm, 'loss_mlm': loss_mlm}
  loss = vtm_weight * loss_vtm + mlm_weight * loss_mlm
  if itc_weight > 0:
    loss_itc, itc_terms = infonce(
      out['text_vt'], out['video_vt'], temperature, valid=batch.get('valid')
    )
    terms.update(loss_itc=loss_itc, loss_t2v=itc_terms['loss_t2v'],
                 loss_v2t=itc_terms['loss_v2t'])  # fmt: skip
    loss = loss + itc_weight * loss_itc
  return loss, terms
