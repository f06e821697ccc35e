"""Long-video retrieval (Norton, Lin et al., ICLR 2024): paragraph→video by optimal transport, and
caption→clip retrieval, over the clips and captions of whole evaluation videos.

The gallery is an evaluation split of record shards read by the long-video source
(data_pipelines.long_video, config data.long_video): each record is one video with all its captions,
each caption anchoring one clip (centred on its time span). Every clip and caption is encoded once
through the model's embed functions — the pooled embedding at the video–text level (Model.spaces;
eval config `level`) and the per-frame / per-word ones (Model.token_embeddings; `frame_level`,
`word_level`; VATT's 'frames_vt' and 'words_vt') — then:

  * caption–clip similarity: Norton's fused similarity over the whole gallery (rows captions,
    columns clips; vatt_jax.losses.norton.fused_similarity: min–max normalised over all pairs);
  * paragraph→video, OT: for paragraph i (the m_i captions of video i) and video j (its n_j clips),
    the bucket Sinkhorn plan of their block of similarities (bucket value p = the k-th smallest
    similarity of the nominal caption–clip pairs over the gallery, Norton's rule; ε and iterations
    of config.loss when it is Norton's, else NortonOptions' defaults), rescaled to mass m_i; the
    score is
    Σ plan ⊙ block. `p2v_mean` is the same ranking with the block's mean instead of the plan
    (the no-alignment baseline);
  * caption→clip (`t2c`): cosine of the pooled vt embeddings; every clip whose caption has the same
    tokens counts as correct (the demo has repeated captions across videos).

Metrics: R@1/5/10 (%), MedR, MeanR per direction, as `p2v_ot/R1`, `p2v_mean/R5`, `t2c/MedR`, ….
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import data_pipelines
from vatt_jax.evaluation import embeddings as emb
from vatt_jax.evaluation import metrics
from vatt_jax.evaluation.retrieval import eval_data_config
from vatt_jax.losses import norton
from vatt_jax.models import Model
from vatt_jax.models.contract import space
from vatt_jax.ot import bucket_sinkhorn


def paragraph_scores(
  sim: np.ndarray,
  caption_video: np.ndarray,
  clip_video: np.ndarray,
  p: float,
  *,
  epsilon: float,
  num_iters: int,
) -> tuple[np.ndarray, np.ndarray]:
  """(OT scores, mean scores) [P, V] of every paragraph against every video.

  Args:
    sim: [Nc, Nk] caption–clip similarity; caption_video [Nc] / clip_video [Nk]: the video of each
      caption / clip (ints 0..V−1; a paragraph is one video's captions, in order).
    p: the prompt bucket's value; epsilon, num_iters: the bucket Sinkhorn's.
  """
  videos = int(max(caption_video.max(), clip_video.max())) + 1
  captions = [np.flatnonzero(caption_video == v) for v in range(videos)]
  clips = [np.flatnonzero(clip_video == v) for v in range(videos)]
  ot, mean = np.full((videos, videos), -np.inf), np.full((videos, videos), -np.inf)
  groups = collections.defaultdict(list)  # one batched solve per block shape
  for i in range(videos):
    for j in range(videos):
      if len(captions[i]) and len(clips[j]):
        groups[len(captions[i]), len(clips[j])].append((i, j))
  solve = jax.jit(
    lambda blocks, mass: bucket_sinkhorn(
      blocks, p, epsilon=epsilon, num_iters=num_iters, total_mass=mass
    ),
    static_argnums=1,
  )
  for (m, _), pairs in groups.items():
    blocks = np.stack([sim[np.ix_(captions[i], clips[j])] for i, j in pairs]).astype(np.float32)
    plans = np.asarray(solve(jnp.asarray(blocks), float(m)), np.float64)
    scores = (plans * blocks).sum(axis=(1, 2))
    for (i, j), score, block in zip(pairs, scores, blocks, strict=True):
      ot[i, j], mean[i, j] = score, block.mean()
  return ot, mean


class LongVideoRetrievalEvaluator:
  """config.evals entry: dict(type='long_video_retrieval', split='test', data=dict(path=…,
  long_video=dict(max_clips=…)), batch_size=8, log_steps=…; level, frame_level, word_level: the
  model's by default). The run's data config must read long videos (data.long_video).
  run(variables) → {'p2v_ot/R1', 'p2v_mean/R1', 't2c/R1', …}."""

  def __init__(self, eval_cfg, config, model: Model):
    self.eval_cfg, self.config, self.model = eval_cfg, config, model
    self.data = eval_data_config(config, eval_cfg)
    if self.data.name != 'shards' or not self.data.get('long_video'):
      raise ValueError(
        "long_video_retrieval reads whole videos: it needs config data.name='shards' and "
        'data.long_video (clips, max_clips)'
      )
    tokens = model.token_embeddings
    self.levels = {
      'video': (
        eval_cfg.get('level') or space(model, 'video', 'text'),
        eval_cfg.get('frame_level') or (tuple(tokens.get('video', ())) or (None,))[0],
      ),
      'text': (
        eval_cfg.get('level') or space(model, 'video', 'text'),
        eval_cfg.get('word_level') or (tuple(tokens.get('text', ())) or (None,))[0],
      ),
    }
    if not all(all(levels) for levels in self.levels.values()):
      raise ValueError(
        f'long_video_retrieval needs pooled and per-frame / per-word video–text embeddings; model '
        f'{model.name!r} has {dict(model.embeddings)} and per token {dict(tokens)}'
      )
    self.options = (
      norton.NortonOptions.from_config(config.loss)
      if config.loss.name == 'norton'
      else norton.NortonOptions()
    )
    self.split = eval_cfg.get('split', 'test')
    self.batch_size = eval_cfg.get('batch_size', 8)
    self.last = None

  def embed(self, variables) -> dict[str, np.ndarray]:
    """Every valid clip's and caption's embeddings, with the video each belongs to: 'video' /
    'text' [N, D], 'frames' [N, F, D] and 'frames_mask' [N, F], 'words' [N, W, D] and
    'words_mask' [N, W], 'text_ids' [N, W], 'video_index' [N]."""
    source = data_pipelines.build(self.data, self.split, batch_size=self.batch_size)
    embedder = None
    parts, videos = collections.defaultdict(list), 0
    try:
      for batch in source:
        n, m = batch['clip_mask'].shape
        if embedder is None:  # one compilation: batch_size × max_clips rows per call
          embedder = emb.Embedder(self.model, variables, batch_size=self.batch_size * m)
        valid = batch['clip_mask'].reshape(-1) > 0
        video = batch['video'].reshape(n * m, *batch['video'].shape[2:])[valid]
        text = batch['text'].reshape(n * m, -1)[valid]
        for modality, x, names in (('video', video, ('video', 'frames')),
                                   ('text', text, ('text', 'words'))):  # fmt: skip
          pooled, token = self.levels[modality]
          out = embedder(modality, x, levels=(pooled, token))
          parts[names[0]].append(out[pooled])
          parts[names[1]].append(out[token])
          parts[f'{names[1]}_mask'].append(out[f'{token}_mask'])
        parts['text_ids'].append(text)
        parts['video_index'].append(np.repeat(np.arange(videos, videos + n), m)[valid])
        videos += n
    finally:
      source.close()
    if not videos:
      raise ValueError(f'{self.data.path}/{self.split}: the evaluation source gave no video')
    for reason in ('skipped_records', 'clips_truncated', 'too_few_captions'):
      if source.counts.get(reason):
        logging.warning('long_video_retrieval: %s: %d', reason, source.counts[reason])
    logging.info('long_video_retrieval: %d videos, %d clips', videos, sum(map(len, parts['video'])))
    return {k: np.concatenate(v) for k, v in parts.items()}

  def run(self, variables) -> dict[str, float]:
    e = self.embed(variables)
    o = self.options
    sim = np.asarray(
      norton.fused_similarity(
        jnp.asarray(e['video']), jnp.asarray(e['text']),
        jnp.asarray(e['frames']), jnp.asarray(e['frames_mask']),
        jnp.asarray(e['words']), jnp.asarray(e['words_mask']),
        alpha=o.alpha, fusion_weight=o.fusion_weight,
      ), np.float64,
    )  # fmt: skip
    p = float(
      norton.bucket_value(jnp.asarray(sim), o.prompt_ratio or norton.NortonOptions.prompt_ratio)
    )
    ot, mean = paragraph_scores(
      sim, e['video_index'], e['video_index'], p,
      epsilon=o.paragraph_epsilon, num_iters=o.paragraph_iterations,
    )  # fmt: skip
    ids = e['text_ids']
    same_caption = (ids[:, None, :] == ids[None, :, :]).all(-1)  # [captions, clips]
    cosine = emb.l2_normalize(e['text']) @ emb.l2_normalize(e['video']).T
    results = {
      'p2v_ot': metrics.retrieval_metrics(ot),
      'p2v_mean': metrics.retrieval_metrics(mean),
      't2c': metrics.retrieval_metrics(cosine, correct=same_caption),
    }
    self.last = {'embeddings': e, 'similarity': sim, 'bucket': p, 'results': results}
    return {
      f'{name}/{k}': float(v) for name, r in results.items() for k, v in r.items() if k != 'ranks'
    }
