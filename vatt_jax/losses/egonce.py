"""EgoNCE (Lin et al., NeurIPS 2022, "Egocentric Video-Language Pretraining"), the dual-encoder
contrastive loss that SViTT-Ego trains with, and InfoNCE as its diagonal-only case.

On M text and M video embeddings (row i of each is sample i) with similarities
s(i, j) = <t_i, v_j> / temperature of L2-normalised vectors, sample j is a *positive* of sample i
when j = i or when the two captions share at least one noun class AND at least one verb class
(noun-only with use_verb=False, verb-only with use_noun=False, the diagonal alone with both off).
Each direction is a softmax over all M columns, and an anchor's loss is minus the log of the
probability mass on its positives:

  loss_t2v = −mean_i log( Σ_{j ∈ P(i)} exp s(i, j) / Σ_j exp s(i, j) )      text i → videos
  loss_v2t = −mean_j log( Σ_{i ∈ P(j)} exp s(i, j) / Σ_i exp s(i, j) )      video j → texts
  loss     = loss_t2v + loss_v2t

(P is symmetric.) The loss takes the *global* batch, like the other contrastive losses here.

**Scene-aware negatives** are a property of the batch, not of the loss: for each sample the data
pipeline appends one other clip of the same video close in time (`scene_negative_index`), so the
loss sees 2M samples, every one an anchor. An appended clip is an ordinary member of the batch: if
its caption shares a noun and a verb with another sample it is that sample's positive, otherwise a
hard negative. A sample without such a neighbour (index −1) gets a placeholder that `valid` removes.

Differences from EgoVLP's code (model/loss.py EgoNCE, trainer/trainer_egoclip.py,
data_loader/EgoClip_EgoMCQ_dataset.py), on purpose:
  * With both switches off this is InfoNCE (the diagonal alone). EgoVLP's `if noun and verb / elif
    noun / else` falls through to the verb-only mask in that case.
  * Each anchor's term is computed as logsumexp(all columns) − logsumexp(positive columns), in
    float32. EgoVLP takes log(Σ softmax · mask), which is log 0 = −inf (an infinite loss and NaN
    gradients) once the positives' probabilities underflow — at temperature 0.05 a cosine gap of
    about 4.4 already underflows float32.
  * "Shares a noun" is an intersection of the multi-hot sets (entries > 0), not EgoVLP's cosine of
    the multi-hot vectors > 0; the two agree on 0/1 vectors, this one also on weighted or negative
    entries. A sample without noun (verb) tags shares none, so it has only the diagonal.
  * `valid` (absent in EgoVLP) drops samples as anchors and as columns of both softmaxes; the loss
    is the mean over valid anchors, 0 with zero (finite) gradients when none is valid.
  * `scene_negative_index` picks, for each clip, one *other* clip of the same video whose time lies
    within ±neg_window seconds of its own. EgoVLP instead cuts each video into fixed buckets
    `narration_time // neg_param` and samples from the sample's own bucket, which can return the
    sample itself and pairs 0.1 s with 59.9 s but never 59.9 s with 60.1 s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vatt_jax.losses.matching import l2_normalize

# Large but finite: a fully masked row stays finite (and NaN-free under differentiation) before it
# is weighted out. |s| ≤ 1 / temperature, far below this for any sensible temperature.
_MASKED = -1e9


def _shares(tags: jax.Array) -> jax.Array:
  """[M, C] multi-hot → [M, M] bool: samples i and j have at least one class in common."""
  hot = (tags > 0).astype(jnp.float32)
  # Exact: integer counts below 2**24.
  return (hot @ hot.T) > 0


def positive_mask(
  noun: jax.Array | None,
  verb: jax.Array | None,
  *,
  use_noun: bool = True,
  use_verb: bool = True,
  num: int | None = None,
) -> jax.Array:
  """EgoNCE's positives: [M, M] bool, True on the diagonal and where samples i and j share at least
  one noun class (if use_noun) and at least one verb class (if use_verb); the diagonal alone when
  both are off. Symmetric.

  Args:
    noun: [M, n_nouns] multi-hot (entries > 0 count as present); may be None when not use_noun.
    verb: [M, n_verbs] multi-hot; may be None when not use_verb.
    num: M, needed only when both switches are off and no tags are given.
  """
  if use_noun and noun is None:
    raise ValueError('positive_mask: use_noun=True needs the noun multi-hots')
  if use_verb and verb is None:
    raise ValueError('positive_mask: use_verb=True needs the verb multi-hots')
  for name, tags in (('noun', noun), ('verb', verb)):
    if tags is not None and tags.ndim != 2:
      raise ValueError(f'positive_mask wants {name} as [M, n_{name}s]; got shape {tags.shape}')
  if num is None:
    given = [t for t in (noun, verb) if t is not None]
    if not given:
      raise ValueError('positive_mask: give num when no tags are given')
    num = given[0].shape[0]
  for name, tags in (('noun', noun), ('verb', verb)):
    if tags is not None and tags.shape[0] != num:
      raise ValueError(f'positive_mask: {name} has {tags.shape[0]} rows, want {num}')
  pos = jnp.eye(num, dtype=bool)
  if use_noun and use_verb:
    pos = pos | (_shares(noun) & _shares(verb))
  elif use_noun:
    pos = pos | _shares(noun)
  elif use_verb:
    pos = pos | _shares(verb)
  return pos


def _direction(logits: jax.Array, pos: jax.Array, valid: jax.Array) -> jax.Array:
  """−mean over valid anchors (rows) of log(softmax mass on the positive columns), softmax over
  the valid columns; 0 when no anchor is valid."""
  columns = valid[None, :]
  denominator = jax.nn.logsumexp(jnp.where(columns, logits, _MASKED), axis=1)
  numerator = jax.nn.logsumexp(jnp.where(columns & pos, logits, _MASKED), axis=1)
  # Every entry is finite, so an invalid row's weight 0 gives it an exactly zero gradient.
  weights = valid.astype(jnp.float32)
  return jnp.sum((denominator - numerator) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def egonce(
  text: jax.Array,
  video: jax.Array,
  noun: jax.Array | None,
  verb: jax.Array | None,
  *,
  temperature: float = 0.05,
  use_noun: bool = True,
  use_verb: bool = True,
  valid: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """EgoNCE over a (global) batch; see the module docstring for the definition and how it differs
  from EgoVLP's code.

  Args:
    text: [M, D] text embeddings (L2-normalised here, in float32).
    video: [M, D] video embeddings, row i paired with text row i.
    noun: [M, n_nouns] multi-hot noun classes of each caption (None when not use_noun).
    verb: [M, n_verbs] multi-hot verb classes (None when not use_verb).
    temperature: softmax temperature τ (> 0).
    use_noun, use_verb: which tag kinds a positive pair must share (Python bools, static).
    valid: [M] 1/True for real samples; an invalid one is neither an anchor nor a column. None
      means all valid.
  Returns:
    (loss_t2v + loss_v2t, {'loss_t2v', 'loss_v2t', 'positives': mean number of positive columns
    of a valid anchor (≥ 1: the diagonal counts), 'anchors': number of valid anchors}) as float32
    scalars. With no valid anchor everything is 0 and the gradients are zero.
  """
  if text.ndim != 2 or video.ndim != 2 or text.shape != video.shape:
    raise ValueError(
      f'egonce wants text and video of the same shape [M, D]; got {text.shape}, {video.shape}'
    )
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f'egonce: temperature must be > 0, got {temperature}')
  num = text.shape[0]
  if valid is None:
    valid = jnp.ones((num,), bool)
  else:
    if valid.shape != (num,):
      raise ValueError(f'egonce: valid must have shape ({num},); got {valid.shape}')
    valid = valid.astype(bool)
  pos = positive_mask(noun, verb, use_noun=use_noun, use_verb=use_verb, num=num)
  text = l2_normalize(text.astype(jnp.float32))
  video = l2_normalize(video.astype(jnp.float32))
  logits = (text @ video.T) / jnp.asarray(temperature, jnp.float32)  # [text i, video j]
  loss_t2v = _direction(logits, pos, valid)
  loss_v2t = _direction(logits.T, pos.T, valid)
  pair_valid = valid[:, None] & valid[None, :]
  anchors = jnp.sum(valid.astype(jnp.float32))
  positives = jnp.sum((pos & pair_valid).astype(jnp.float32)) / jnp.maximum(anchors, 1.0)
  metrics = {
    'loss_t2v': loss_t2v,
    'loss_v2t': loss_v2t,
    'positives': positives,
    'anchors': anchors,
  }
  return loss_t2v + loss_v2t, metrics


def infonce(
  text: jax.Array,
  video: jax.Array,
  temperature: float = 0.05,
  *,
  valid: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE (text→video + video→text cross-entropy with the diagonal as targets): EgoNCE
  with both switches off. Same arguments, returns and masking as `egonce`."""
  return egonce(
    text,
    video,
    None,
    None,
    temperature=temperature,
    use_noun=False,
    use_verb=False,
    valid=valid,
  )


def scene_negative_index(
  video_ids,
  times,
  neg_window: float = 60.0,
  rng: np.random.Generator | int | None = None,
) -> np.ndarray:
  """Scene-aware negatives for the data pipeline (numpy, no JAX): for each clip i, the index of one
  other clip j ≠ i of the same video with |times[j] − times[i]| ≤ neg_window, drawn uniformly among
  all such clips, or −1 when there is none.

  The pipeline appends clip j (its video, text and tags) to the batch as sample M + i, and marks
  the slot invalid (`egonce(valid=…)`) where the index is −1. See the module docstring for how this
  differs from EgoVLP's fixed 60-second buckets.

  Args:
    video_ids: [M] video identifiers (any values numpy can compare: strings, integers).
    times: [M] finite times in seconds (e.g. EgoClip's narration_time).
    neg_window: half-width of the window in seconds (≥ 0; EgoVLP's default is 60).
    rng: a numpy Generator or a seed; the draw depends only on it and the inputs.
  Returns:
    [M] int64 indices into the inputs, −1 where a clip has no neighbour.
  """
  video_ids = np.asarray(video_ids)
  times = np.asarray(times, np.float64)
  if video_ids.ndim != 1 or times.shape != video_ids.shape:
    raise ValueError(
      f'scene_negative_index wants video_ids and times of shape [M]; got {video_ids.shape}, '
      f'{times.shape}'
    )
  if not np.all(np.isfinite(times)):
    raise ValueError('scene_negative_index: times must be finite')
  if not (np.isfinite(neg_window) and neg_window >= 0):
    raise ValueError(f'scene_negative_index: neg_window must be >= 0, got {neg_window}')
  rng = np.random.default_rng(rng)
  num = times.shape[0]
  # One uniform draw per clip, in input order, so the result depends on nothing but the inputs.
  draws = rng.random(num)
  out = np.full(num, -1, np.int64)
  if num == 0:
    return out
  _, group = np.unique(video_ids, return_inverse=True)
  group = group.reshape(-1)
  order = np.lexsort((times, group))  # by video, then time
  group_sorted = group[order]
  bounds = np.flatnonzero(np.diff(group_sorted)) + 1
  for members in np.split(order, bounds):  # the clips of one video, by time
    t = times[members]
    lo = np.searchsorted(t, t - neg_window, side='left')
    hi = np.searchsorted(t, t + neg_window, side='right')
    own = np.arange(members.shape[0])  # each clip's own position, inside [lo, hi)
    count = hi - lo - 1  # candidates other than the clip itself
    has = count > 0
    pick = np.minimum(np.floor(draws[members] * count), np.maximum(count - 1, 0)).astype(np.int64)
    position = lo + pick
    position = position + (position >= own)  # skip the clip itself
    out[members[has]] = members[position[has]]
  return out
