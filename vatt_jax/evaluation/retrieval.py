"""Zero-shot text↔video retrieval in the video–text common space (VATT §4.2: YouCook2, MSR-VTT).

The gallery is an evaluation split of record shards: one record per video clip, e.g. YouCook2
segments (a manifest of windows: media, start, end, one caption) or MSR-VTT clips (one record per
video with its ~20 captions). Each video's embedding is the mean of its k uniformly spaced clips
(data.eval_clips, 4 by default) in the vt space; the queries are the records' captions.

Duplicate captions: captions are compared after normalising whitespace and case; identical ones
become one query, and every video that has it counts as correct for it (text→video), while for
video→text a video's correct targets are its distinct captions. Similarities are cosines; ties are
broken by target index (vatt_jax.evaluation.metrics), so results are deterministic.
"""

from __future__ import annotations

import collections
import math
import os

import ml_collections
import numpy as np
from absl import logging

from vatt_jax.evaluation import embeddings as emb
from vatt_jax.evaluation import metrics


def normalize_caption(text: str) -> str:
  return ' '.join(text.split()).lower()


def read_captions(path: str, split: str) -> dict[str, list[str]]:
  """{media_id: [captions]} of the records under {path}/{split}/*.tfrecord (empty ones dropped)."""
  import tensorflow as tf

  from data_pipelines import pretrain, schema

  out = {}
  for shard in pretrain.shard_files(path, split, 0, 1):
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
  sim = emb.l2_normalize(text) @ emb.l2_normalize(video).T
  out = {}
  for name, s, c in (('t2v', sim, correct), ('v2t', sim.T, correct.T)):
    keep = c.any(axis=1)  # v2t: videos without a caption have no correct target
    result = metrics.retrieval_metrics(s[keep], correct=c[keep], ks=ks)
    result.pop('ranks')
    out[name] = {**result, 'queries': int(keep.sum())}
  return out


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
  batch_size=32, log_steps=…). run(variables) → {'t2v/R1', …, 'v2t/MedR'}; `last` keeps the
  embeddings and results of the latest run (for plots)."""

  def __init__(self, eval_cfg, config, model):
    self.eval_cfg, self.config, self.model = eval_cfg, config, model
    self.data = eval_data_config(config, eval_cfg)
    if self.data.name != 'shards':
      raise ValueError(
        f"retrieval reads captioned record shards (data.name='shards'), got {self.data.name!r}"
      )
    self.split = eval_cfg.get('split', 'test')
    self.batch_size = eval_cfg.get('batch_size', 32)
    self.captions = read_captions(self.data.path, self.split)
    from data_pipelines import text as text_ops

    self.tokenizer = text_ops.Tokenizer(
      self.data.tokenizer or os.path.join(self.data.path, 'tokenizer.model')
    )
    self.last = None

  def embed(self, variables, *, with_audio: bool = False) -> dict:
    """Video (and audio) embeddings of the split and text embeddings of its distinct captions."""
    import data_pipelines

    source = data_pipelines.build(self.data, self.split, batch_size=self.batch_size)
    embedder = emb.Embedder(self.model, variables, batch_size=self.batch_size)
    try:
      videos = emb.embed_source(source, embedder, ['video', 'audio'] if with_audio else ['video'])
    finally:
      source.close()
    if source.counts.get('skipped_records'):
      logging.warning('retrieval: %d records skipped', source.counts['skipped_records'])
    texts, correct = caption_queries(list(videos['media_id']), self.captions)
    if not texts:
      raise ValueError(f'no captions in {self.data.path}/{self.split}: nothing to retrieve')
    ids = self.tokenizer.encode(texts, self.data.max_words)
    return {**videos, **{f'text/{k}': v for k, v in embedder('text', ids).items()},
            'texts': texts, 'correct': correct}  # fmt: skip

  def run(self, variables, *, with_audio: bool = False) -> dict[str, float]:
    """with_audio: also embed the clips' audio (kept in `last`, for the video–audio plots)."""
    embedded = self.embed(variables, with_audio=with_audio)
    results = zero_shot(embedded['video/vt'], embedded['text/vt'], embedded['correct'])
    self.last = {'embeddings': embedded, 'results': results}
    return {
      f'{direction}/{k}': float(v)
      for direction, r in results.items()
      for k, v in r.items()
      if k != 'queries'
    }
