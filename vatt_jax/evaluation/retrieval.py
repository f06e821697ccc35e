"""Zero-shot text↔video retrieval in the video–text common space (VATT §4.2: YouCook2, MSR-VTT).

The gallery is an evaluation split of record shards: one record per video clip, e.g. YouCook2
segments (a manifest of windows: media, start, end, one caption) or MSR-VTT clips (one record per
video with its ~20 captions). Each video's embedding is the mean of its k uniformly spaced clips
(data.eval_clips, 4 by default) in the vt space; the queries are the records' captions.

Duplicate captions: captions are compared after normalising whitespace and case; identical ones
become one query, and every video that has it counts as correct for it (text→video), while for
video→text a video's correct targets are its distinct captions. Ties are broken by target index
(vatt_jax.evaluation.metrics), so results are deterministic.

Scores (eval config `score`): 'cosine' compares the model's video and text embeddings at the level
where both live (Model.spaces; `level` overrides it); 'pairs' ranks by the model's joint pair
score (Model.score: a fusion encoder, a one-stream transformer), a video's score with a caption
being the mean over its clips. With `rerank_top_k` k > 0 and a model that has the embeddings too,
only each query's top k by cosine are scored as pairs and ranked first, by pair score (the rest
keep their cosine order below them); with k = 0, a gallery of at most k targets, or no embeddings,
every pair is scored. 'auto' (the default) is 'pairs' for a model with a pair score, else
'cosine'.
"""

from __future__ import annotations

import collections
import math

import jax
import ml_collections
import numpy as np
from absl import logging

import data_pipelines
from data_pipelines import schema
from data_pipelines.options import tokenizer_path
from vatt_jax.evaluation import embeddings as emb
from vatt_jax.evaluation import metrics
from vatt_jax.models import Model
from vatt_jax.models.contract import space

SCORES = ('auto', 'cosine', 'pairs')
PAIR_CHUNK = 64  # pair-score batches gathered at a time


def normalize_caption(text: str) -> str:
  return ' '.join(text.split()).lower()


def read_captions(path: str, split: str) -> dict[str, list[str]]:
  """{media_id: [captions]} of the records under {path}/{split}/*.tfrecord (empty ones dropped)."""
  import tensorflow as tf

  from data_pipelines import shards  # (TensorFlow)

  out = {}
  for shard in shards.shard_files(path, split, 0, 1):
    for record in tf.data.TFRecordDataset(shard):
      ex = schema.parse(record)
      texts = [t.decode('utf-8', 'replace') for t in ex['captions'].numpy()]
      out[ex['media_id'].numpy().decode('utf-8', 'replace')] = [t for t in texts if t.strip()]
  return out


def caption_queries(
  video_ids: list[str], captions: dict[str, list[str]]
) -> tuple[list[str], np.ndarray]:
  """Distinct captions of the gallery videos and which videos each one describes.

  Returns (texts [Q] in first-seen order, correct [Q, V] bool). Videos without a caption are
  gallery distractors only.
  """
  index = collections.OrderedDict()
  owners = collections.defaultdict(set)
  for v, media_id in enumerate(video_ids):
    for text in captions.get(media_id, []):
      key = normalize_caption(text)
      index.setdefault(key, text)
      owners[key].add(v)
  correct = np.zeros((len(index), len(video_ids)), bool)
  for q, key in enumerate(index):
    correct[q, sorted(owners[key])] = True
  return list(index.values()), correct


def zero_shot(video: np.ndarray, text: np.ndarray, correct: np.ndarray, ks=(1, 5, 10)) -> dict:
  """video [V, D], text [Q, D] embeddings; correct [Q, V] → {'t2v': …, 'v2t': …} (R@k %, MedR,
  MeanR; 'ranks' dropped). Cosine similarity."""
  return rank_both_ways(emb.l2_normalize(text) @ emb.l2_normalize(video).T, correct, ks)


def rank_both_ways(sim: np.ndarray, correct: np.ndarray, ks=(1, 5, 10), sim_v2t=None) -> dict:
  """Text→video metrics of sim [Q, V] and video→text ones of sim_v2t [V, Q] (default sim.T)."""
  out = {}
  v2t = sim.T if sim_v2t is None else sim_v2t
  for name, s, c in (('t2v', sim, correct), ('v2t', v2t, correct.T)):
    keep = c.any(axis=1)  # v2t: videos without a caption have no correct target
    result = metrics.retrieval_metrics(s[keep], correct=c[keep], ks=ks)
    result.pop('ranks')
    out[name] = {**result, 'queries': int(keep.sum())}
  return out


def rerank(first: np.ndarray | None, pair: np.ndarray, candidates: np.ndarray) -> np.ndarray:
  """Ordinal scores [Q, T] for metrics.retrieval_metrics: each row's candidates by pair score
  first, then the others by the first-stage score (ties by index). first: [Q, T] or None (then
  every entry must be a candidate); pair [Q, T] (read at candidates only); candidates [Q, T] bool."""
  rows, targets = pair.shape
  key_pair = np.where(candidates, pair, -np.inf)
  key_first = np.zeros_like(pair) if first is None else np.where(candidates, 0.0, first)
  out = np.empty((rows, targets))
  index = np.arange(targets)
  for q in range(rows):
    # lexsort: the last key is the primary one (candidates first, then score, then index).
    order = np.lexsort((index, -key_first[q], -key_pair[q], ~candidates[q]))
    out[q, order] = -np.arange(targets, dtype=np.float64)
  return out


def top_k_mask(sim: np.ndarray, k: int) -> np.ndarray:
  """[Q, T] bool: each row's k highest entries (ties by index)."""
  if k <= 0 or k >= sim.shape[1]:
    return np.ones(sim.shape, bool)
  order = np.argsort(-sim, axis=1, kind='stable')[:, :k]
  mask = np.zeros(sim.shape, bool)
  np.put_along_axis(mask, order, True, axis=1)
  return mask


class PairScorer:
  """A model's pair score over a gallery: per-clip video features and per-caption text features
  computed once (Model.score.video / .text), then `pairs` in fixed-size jitted batches, a video's
  score being the mean over its clips."""

  def __init__(self, model: Model, variables: dict, batch_size: int):
    self.score, self.batch_size = model.score, batch_size
    self.variables = {
      'params': variables['params'],
      'batch_stats': variables.get('batch_stats', {}),
    }
    self._video = jax.jit(self.score.video)
    self._text = jax.jit(self.score.text)
    self._pairs = jax.jit(self.score.pairs)

  def video_features(self, clips: np.ndarray):
    """clips [n, k, …] → features (a pytree) with leading axes [n, k]."""
    n, k = clips.shape[:2]
    out = emb.batched_apply(
      self._video, self.variables, (clips.reshape(n * k, *clips.shape[2:]),), self.batch_size
    )
    return jax.tree.map(lambda x: x.reshape(n, k, *x.shape[1:]), out)

  def text_features(self, ids: np.ndarray):
    return emb.batched_apply(self._text, self.variables, (ids,), self.batch_size)

  def scores(self, video, text, pairs: np.ndarray) -> np.ndarray:
    """pairs [P, 2] of (query, video) indices → [P] scores, the mean over each video's clips.
    The pairs' features are gathered PAIR_CHUNK batches at a time (bounded host memory)."""
    k = jax.tree.leaves(video)[0].shape[1]
    per_chunk = max(1, PAIR_CHUNK * self.batch_size // k)
    out = []
    for lo in range(0, len(pairs), per_chunk):
      chunk = pairs[lo : lo + per_chunk]
      q, v = np.repeat(chunk[:, 0], k), np.repeat(chunk[:, 1], k)
      c = np.tile(np.arange(k), len(chunk))
      vf = jax.tree.map(lambda x, v=v, c=c: x[v, c], video)
      tf = jax.tree.map(lambda x, q=q: x[q], text)
      scores = emb.batched_apply(self._pairs, self.variables, (vf, tf), self.batch_size)
      out.append(np.asarray(scores, np.float64).reshape(-1, k).mean(1))
    return np.concatenate(out) if out else np.zeros(0)


def chance_recall(correct: np.ndarray, k: int) -> float:
  """Expected R@k (%) of a uniformly random ranking: the mean over queries of
  1 − C(T − c, k) / C(T, k), with c correct among T targets."""
  total = correct.shape[1]
  hits = [1 - math.comb(total - int(c), k) / math.comb(total, k) for c in correct.sum(1)]
  return 100.0 * sum(hits) / len(hits)


def eval_data_config(config: ml_collections.ConfigDict, eval_cfg: ml_collections.ConfigDict):
  """The run's data config with the evaluation's overrides (eval_cfg.data, eval_cfg.num_clips)."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.update(eval_cfg.get('data', {}))
  if eval_cfg.get('num_clips'):
    data.eval_clips = eval_cfg.num_clips
  if data.eval_clips < 1:
    raise ValueError(f'evaluation clips per video must be >= 1, got {data.eval_clips}')
  data.deterministic = True
  return data


class RetrievalEvaluator:
  """config.evals entry: dict(type='retrieval', split=…, data=dict(path=…), num_clips=4,
  batch_size=32, score='auto' | 'cosine' | 'pairs', level=(the model's video–text space),
  rerank_top_k=16, log_steps=…). run(variables) → {'t2v/R1', …, 'v2t/MedR'}; `last` keeps the
  embeddings, scores and results of the latest run (for plots)."""

  def __init__(self, eval_cfg, config, model: Model):
    self.eval_cfg, self.config, self.model = eval_cfg, config, model
    self.data = eval_data_config(config, eval_cfg)
    if self.data.name != 'shards':
      raise ValueError(
        f"retrieval reads captioned record shards (data.name='shards'), got {self.data.name!r}"
      )
    self.split = eval_cfg.get('split', 'test')
    self.batch_size = eval_cfg.get('batch_size', 32)
    self.level = eval_cfg.get('level') or space(model, 'video', 'text')
    self.scoring = eval_cfg.get('score', 'auto')
    if self.scoring not in SCORES:
      raise ValueError(f'config evals score must be one of {SCORES}, got {self.scoring!r}')
    if self.scoring == 'auto':
      self.scoring = 'pairs' if model.score is not None else 'cosine'
    if self.scoring == 'pairs' and model.score is None:
      raise ValueError(f"retrieval score='pairs': model {model.name!r} has no pair score")
    has_level = self.level and all(
      self.level in model.embeddings.get(m, ()) for m in ('video', 'text')
    )
    if self.scoring == 'cosine' and not has_level:
      raise ValueError(
        f'retrieval by cosine needs video and text embeddings at one level; model '
        f'{model.name!r} has {dict(model.embeddings)} (level {self.level!r})'
      )
    self.top_k = int(eval_cfg.get('rerank_top_k', 16)) if has_level else 0
    # The folder the pipeline reads for this split (data.split_folders), not the split's name.
    folder = dict(self.data.get('split_folders', {})).get(self.split, self.split)
    self.captions = read_captions(self.data.path, folder)
    from data_pipelines import text as text_ops  # (TensorFlow)

    self.tokenizer = text_ops.Tokenizer(tokenizer_path(self.data))
    self.last = None

  def embed(self, variables, *, with_audio: bool = False) -> dict:
    """The split's video (and audio) embeddings at every pooled level the model has, the text
    embeddings of its distinct captions, and with pair scoring the per-clip / per-caption pair
    features ('video/pair', 'text/pair': pytrees)."""
    modalities = (
      ['video', 'audio'] if with_audio and 'audio' in self.model.embeddings else ['video']
    )
    source = data_pipelines.build(self.data, self.split, batch_size=self.batch_size)
    embedder = emb.Embedder(self.model, variables, batch_size=self.batch_size)
    scorer = None
    if self.scoring == 'pairs':
      scorer = PairScorer(self.model, variables, self.batch_size)
    try:
      videos = emb.embed_source(
        source, embedder, modalities,
        pair_features=None if scorer is None else {'video': scorer.video_features},
      )  # fmt: skip
    finally:
      source.close()
    if source.counts.get('skipped_records'):
      logging.warning('retrieval: %d records skipped', source.counts['skipped_records'])
    texts, correct = caption_queries(list(videos['media_id']), self.captions)
    if not texts:
      raise ValueError(f'no captions in {self.data.path}/{self.split}: nothing to retrieve')
    ids = self.tokenizer.encode(texts, self.data.max_words)
    out = {**videos, 'texts': texts, 'correct': correct}
    if embedder.levels('text'):
      out.update({f'text/{k}': v for k, v in embedder('text', ids).items()})
    if scorer is not None:
      out['text/pair'] = scorer.text_features(ids)
      out['scorer'] = scorer
    return out

  def scores(self, embedded: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """(t2v scores [Q, V], v2t scores [V, Q], how they were made)."""
    correct = embedded['correct']
    first = None
    if self.level:
      key = f'{{}}/{self.level}'
      if key.format('video') in embedded and key.format('text') in embedded:
        first = (
          emb.l2_normalize(embedded[key.format('text')])
          @ emb.l2_normalize(embedded[key.format('video')]).T
        )
    if self.scoring == 'cosine':
      return first, first.T, f'cosine at {self.level!r}'
    t2v = top_k_mask(first, self.top_k) if first is not None else np.ones(correct.shape, bool)
    v2t = top_k_mask(first.T, self.top_k) if first is not None else np.ones(correct.T.shape, bool)
    needed = t2v | v2t.T
    pairs = np.argwhere(needed)
    pair = np.full(correct.shape, -np.inf)
    scores = embedded['scorer'].scores(embedded['video/pair'], embedded['text/pair'], pairs)
    pair[pairs[:, 0], pairs[:, 1]] = scores
    how = (
      'pair score of every pair' if needed.all() else f'top {self.top_k} re-ranked by pair score'
    )
    return rerank(first, pair, t2v), rerank(None if first is None else first.T, pair.T, v2t), how

  def run(self, variables, *, with_audio: bool = False) -> dict[str, float]:
    """with_audio: also embed the clips' audio (kept in `last`, for the video–audio plots)."""
    embedded = self.embed(variables, with_audio=with_audio)
    t2v, v2t, how = self.scores(embedded)
    embedded.pop('scorer', None)
    results = rank_both_ways(t2v, embedded['correct'], sim_v2t=v2t)
    logging.info('retrieval %s/%s: %s', self.data.path, self.split, how)
    self.last = {'embeddings': embedded, 'results': results, 'scoring': how}
    return {
      f'{direction}/{k}': float(v)
      for direction, r in results.items()
      for k, v in r.items()
      if k != 'queries'
    }
