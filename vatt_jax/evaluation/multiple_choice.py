"""Multiple-choice video–language evaluation, both ways round: a text query and C video clips as
choices (EgoMCQ, from EgoVLP), or a video clip as the query and C captions as choices (MSR-VTT
multiple choice, as All-in-one evaluates it); one choice is the answer.

Questions (eval config `questions`, EgoMCQ's released format or video-query questions) and how
their clips are found among the records: vatt_jax.evaluation.mc_questions.

Scoring: each distinct clip (a text query's choices, or a video query; clips repeat across
questions) is decoded once — T frames (the model's) sampled uniformly over [clip_start,
clip_end], frame k in the middle of the k-th of T equal parts as EgoVLP's 'uniform' sampling, from
the stored frames, the central square resized to the model's frame size (data_pipelines.video:
frame_indices, decode_clip, as the evaluation pipeline decodes) — and embedded once at the model's
video–text level (Model.spaces; eval config `level`); each distinct text (a query, or a candidate
caption) is embedded once (the run's tokenizer). A choice's score is the cosine of its clip and
its text; the prediction is the highest-scoring choice, the lowest index among tied maxima. With
`use_score`, the model's pair score (Model.score: a fusion encoder's video–text matching head)
over the same (clip, text) pairs ranks the choices too, giving the `*_score` metrics; its per-clip
video features (token embeddings, for a fusion encoder) are then kept in host memory for every
distinct clip.

Metrics (percent; a type's accuracy NaN when no question is of it), chance = 100 / C (percent).
Text query: accuracy, inter_accuracy, intra_accuracy, inter_count, intra_count, chance; with
use_score also accuracy_score, inter_accuracy_score, intra_accuracy_score. Video query: accuracy,
count, chance and <type>_accuracy, <type>_count for every type present; with use_score also
accuracy_score and <type>_accuracy_score.

Differences from EgoVLP's code: its metric zips torch.unique(types) with a fixed list of group
names, so a set with one type only is named by the first name whatever its type, and its
model/metric.py calls type 1 "Intra-video" while its dataset calls 1 inter; here a type is
always named by its number (1 inter, 2 intra). Its chunked videos read a clip that crosses a 600 s
chunk from both chunks; here a clip lies in one record (convert whole videos, or windows that
overlap by the longest clip).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging

from data_pipelines import schema
from data_pipelines.options import tokenizer_path
from vatt_jax.evaluation import embeddings as emb
from vatt_jax.evaluation.mc_questions import (
  SHOWN,
  TYPES,
  VideoQuestion,
  locate,
  match_videos,
  read_questions,
  read_videos,
)
from vatt_jax.evaluation.retrieval import PairScorer, eval_data_config
from vatt_jax.models import Model
from vatt_jax.models.contract import space


def multiple_choice_accuracy(
  similarity, answer, types, names: Mapping[int, str | None] = TYPES
) -> dict[str, float]:
  """Accuracy of choosing the highest-scoring choice, overall and per question type.

  Args:
    similarity: [Q, C] scores (higher: a better match; NaN is refused).
    answer: [Q] int, the right choice of each question, in 0 … C−1.
    types: [Q] int, each question's type: a key of `names`.
    names: type → the name of its metrics, or None for a type counted in 'accuracy' only (questions
      without a type). Default: EgoMCQ's TYPES, 1 inter-video, 2 intra-video.

  The prediction is the argmax over the C choices, the lowest index among tied maxima. Returns
  'accuracy' in percent, 'chance' = 100 / C and, for every named type of `names` (present or not),
  '<name>_accuracy' (percent, NaN over no question) and '<name>_count' (int).
  """
  scores = np.asarray(similarity, np.float64)
  if scores.ndim != 2 or scores.shape[1] < 1:
    raise ValueError(f'similarity must be [questions, choices], got shape {scores.shape}')
  if np.isnan(scores).any():
    raise ValueError('similarity contains NaN')
  questions, choices = scores.shape
  answer, types = np.asarray(answer), np.asarray(types)
  for name, values in (('answer', answer), ('types', types)):
    if values.shape != (questions,) or not np.issubdtype(values.dtype, np.integer):
      raise ValueError(f'{name} must be [{questions}] integers, got {values.dtype} {values.shape}')
  if ((answer < 0) | (answer >= choices)).any():
    raise ValueError(f'answer must be in [0, {choices}), got {sorted(set(answer.tolist()))}')
  if not np.isin(types, list(names)).all():
    raise ValueError(f'types must be in {sorted(names)}, got {sorted(set(types.tolist()))}')
  named = [name for name in names.values() if name is not None]
  if len(set(named)) < len(named) or not all(isinstance(n, str) and n for n in named):
    raise ValueError(f'names must be distinct non-empty strings (or None), got {dict(names)}')
  correct = np.argmax(scores, axis=1) == answer  # np.argmax: the first of tied maxima
  out = {'accuracy': _percent(correct), 'chance': 100.0 / choices}
  for kind, name in names.items():
    if name is not None:
      out[f'{name}_accuracy'] = _percent(correct[types == kind])
      out[f'{name}_count'] = int((types == kind).sum())
  return out


def _percent(correct: np.ndarray) -> float:
  return 100.0 * float(correct.mean()) if correct.size else math.nan


class MultipleChoiceEvaluator:
  """config.evals entry: dict(type='multiple_choice', questions=PATH (JSON: EgoMCQ's format, or
  video-query questions), split='test' (the shards holding the videos), batch_size=32,
  use_score=False, max_questions=0 (all), level=(the model's video–text space), log_steps=…;
  data=dict(path=…) overrides the run's). run(variables) → EgoMCQ: {'accuracy',
  'inter_accuracy', 'intra_accuracy', 'inter_count', 'intra_count', 'chance'}; video-query:
  {'accuracy', 'count', 'chance', '<type>_accuracy', '<type>_count' per type}; (+ '*accuracy_score'
  with use_score). `last` keeps the similarities [Q, C] and answers of the latest run. See the
  module docstring."""

  def __init__(self, eval_cfg, config, model: Model):
    self.eval_cfg, self.config, self.model = eval_cfg, config, model
    path = eval_cfg.get('questions') or ''
    if not path:
      raise ValueError(
        'config evals questions is empty: multiple_choice needs a questions JSON file (EgoMCQ '
        'format, or video-query questions)'
      )
    self.questions_path = path
    self.data = eval_data_config(config, eval_cfg)
    self.split = eval_cfg.get('split', 'test')
    self.batch_size = int(eval_cfg.get('batch_size', 32))
    max_questions = int(eval_cfg.get('max_questions', 0))
    if self.batch_size < 1 or max_questions < 0:
      raise ValueError(
        f'config evals batch_size must be >= 1 and max_questions >= 0 (0: all), got '
        f'{self.batch_size} and {max_questions}'
      )
    self.level = eval_cfg.get('level') or space(model, 'video', 'text')
    if not self.level or not all(
      self.level in model.embeddings.get(m, ()) for m in ('video', 'text')
    ):
      raise ValueError(
        f'multiple_choice compares video and text embeddings at one level; model {model.name!r} '
        f'has {dict(model.embeddings)} (level {self.level!r})'
      )
    self.use_score = bool(eval_cfg.get('use_score', False))
    if self.use_score and model.score is None:
      raise ValueError(f'config evals use_score=True: model {model.name!r} has no pair score')
    self.num_frames, height, width, _ = model.inputs['video'].shape
    if height != width:
      raise ValueError(
        f'multiple_choice decodes square frames as the evaluation pipeline does; model '
        f'{model.name!r} reads {height}×{width}'
      )
    self.frame_size = height
    self.questions = read_questions(path, max_questions)
    self._resolve()
    from data_pipelines import text as text_ops  # (TensorFlow)

    tokenizer = text_ops.Tokenizer(tokenizer_path(self.data))
    self.text_ids = tokenizer.encode(self.texts, model.inputs['text'].shape[-1])
    self.last = None

  def _resolve(self) -> None:
    """Matches every question's clips to records and indexes clips and texts: `clips` [(media id,
    start, end)] (distinct, in record time) and `texts` (distinct); EgoMCQ: `choice_clip` [Q, C]
    and `query_text` [Q], video-query: `query_clip` [Q] and `choice_text` [Q, C], indices into
    them; `answer`, `types` [Q] and `type_names` (multiple_choice_accuracy's). Raises one
    ValueError for all questions that cannot be answered."""
    from data_pipelines import shards  # (TensorFlow)

    self.video_query = isinstance(self.questions[0], VideoQuestion)
    folder = dict(self.data.get('split_folders', {})).get(self.split, self.split)
    self.files = shards.shard_files(self.data.path, folder, 0, 1)
    self.where = os.path.join(self.data.path, folder)
    videos = read_videos(self.files)
    asked = [(q.clip,) if self.video_query else q.choices for q in self.questions]
    uids = [c.video_uid for question_clips in asked for c in question_clips]
    try:
      records = match_videos(uids, [v.media_id for v in videos])
    except ValueError as e:
      raise ValueError(f'config evals questions={self.questions_path}, {self.where}: {e}') from None
    clips, question_clip = {}, []
    missing, outside, frameless = {}, {}, {}  # question key → what (its first such clip)
    clamped = 0
    for q, question_clips in zip(self.questions, asked, strict=True):
      row = []
      for clip in question_clips:
        if clip.video_uid not in records:
          missing.setdefault(q.key, f'{clip.video_uid!r}')
          row.append(-1)
          continue
        found = locate(clip, records[clip.video_uid], videos)
        if found is None:
          stored = ', '.join(
            f'{videos[i].media_id} {videos[i].duration:g} s' for i in records[clip.video_uid][:2]
          )
          outside.setdefault(q.key, f'{clip.video_uid!r} {clip.start:g}–{clip.end:g} s; {stored}')
          row.append(-1)
          continue
        index, start, end = found
        if not videos[index].has_frames:
          frameless.setdefault(q.key, repr(videos[index].media_id))
        clamped += clip.start < 0
        row.append(clips.setdefault((videos[index].media_id, start, end), len(clips)))
      question_clip.append(row)
    problems = []
    for what, found in (('name a video no record holds', missing),
                        ('have a clip outside its record', outside),
                        ('name a record without frames', frameless)):  # fmt: skip
      if found:
        shown = ', '.join(f'{key} ({detail})' for key, detail in list(found.items())[:SHOWN])
        more = ', …' if len(found) > SHOWN else ''
        problems.append(f'{len(found)} {what} (question {shown}{more})')
    if problems:
      raise ValueError(
        f'config evals questions={self.questions_path}: of {len(self.questions)} questions, '
        + '; '.join(problems)
        + f' (videos: the records of {self.where})'
      )
    if clamped:
      logging.info('multiple_choice: %d clips start before 0 s, read from 0 s', clamped)
    self.clips = list(clips)
    self.answer = np.asarray([q.answer for q in self.questions], np.int64)
    if self.video_query:
      self.query_clip = np.asarray(question_clip, np.int64)[:, 0]
      self.texts = list(dict.fromkeys(t for q in self.questions for t in q.choices))
      index = {t: i for i, t in enumerate(self.texts)}
      self.choice_text = np.asarray(
        [[index[t] for t in q.choices] for q in self.questions], np.int64
      )
      # Types numbered in the order they first appear; −1: a question without one.
      codes = {None: -1}
      for q in self.questions:
        codes.setdefault(q.kind, len(codes) - 1)
      self.type_names = {code: kind for kind, code in codes.items()}
      self.types = np.asarray([codes[q.kind] for q in self.questions], np.int64)
    else:
      self.choice_clip = np.asarray(question_clip, np.int64)
      self.texts = list(dict.fromkeys(q.text for q in self.questions))
      index = {t: i for i, t in enumerate(self.texts)}
      self.query_text = np.asarray([index[q.text] for q in self.questions], np.int64)
      self.type_names = TYPES
      self.types = np.asarray([q.kind for q in self.questions], np.int64)
    logging.info(
      'multiple_choice: %d %s questions, %d distinct clips of %d records, %d distinct texts',
      len(self.questions), 'video-query' if self.video_query else 'text-query', len(self.clips),
      len({c[0] for c in self.clips}), len(self.texts),
    )  # fmt: skip

  def decoded_clips(self):
    """Yields (clip indices [n], clips [n, T, S, S, 3] float32 in [-1, 1]) until every distinct
    clip was decoded once, each record read once."""
    import tensorflow as tf

    from data_pipelines import video as video_ops  # (TensorFlow)

    by_record = {}
    for i, (media_id, start, end) in enumerate(self.clips):
      by_record.setdefault(media_id, []).append((i, start, end))
    media_ids = list(by_record)
    table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
        tf.constant(media_ids), tf.range(len(media_ids), dtype=tf.int64)
      ),
      default_value=-1,
    )
    rows = [by_record[m] for m in media_ids]
    clip_index = tf.ragged.constant([[c[0] for c in r] for r in rows], dtype=tf.int64)
    clip_start = tf.ragged.constant([[c[1] for c in r] for r in rows], dtype=tf.float32)
    clip_end = tf.ragged.constant([[c[2] for c in r] for r in rows], dtype=tf.float32)
    frames, size = int(self.num_frames), int(self.frame_size)
    no_seed = tf.zeros([2], tf.int64)  # evaluation decoding draws nothing

    def slot(record):
      values, _ = tf.io.parse_single_sequence_example(
        record, context_features={schema.MEDIA_ID: tf.io.FixedLenFeature([], tf.string)}
      )
      return record, table.lookup(values[schema.MEDIA_ID])

    def clips_of(record, slot):
      ex = schema.parse(record)
      num_stored = tf.shape(ex['frames'])[0]

      def decode(index, start, end):
        # Frame k at start + (k + ½)·(end − start)/T: the middle of the k-th of T equal parts.
        length = tf.maximum(end - start, 1e-6)
        shown = video_ops.frame_indices(
          start + length / (2 * frames), ex['frame_rate'], num_stored, frames, frames / length
        )
        clip = video_ops.decode_clip(tf.gather(ex['frames'], shown), size, no_seed, train=False)
        return index, clip

      spans = (clip_index[slot], clip_start[slot], clip_end[slot])
      return tf.data.Dataset.from_tensor_slices(spans).map(
        decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
      )

    records = tf.data.Dataset.from_tensor_slices(self.files).interleave(
      tf.data.TFRecordDataset, cycle_length=2, num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )  # fmt: skip
    ds = records.map(slot).filter(lambda record, slot: slot >= 0)
    ds = ds.interleave(clips_of, cycle_length=2, num_parallel_calls=tf.data.AUTOTUNE)
    try:
      yield from ds.batch(self.batch_size).prefetch(2).as_numpy_iterator()
    except tf.errors.OpError as e:  # a damaged shard or frame: one line, naming the split
      raise ValueError(
        f'{self.where}: a record failed to decode ({e.message.strip().splitlines()[0][:200]})'
      ) from None

  def embed(self, variables) -> dict:
    """Every distinct clip's embedding 'video' [N, D] and text's 'text' [U, D] at the level,
    with use_score the pair features 'video/pair' (leading axes [N, 1]) and 'text/pair'."""
    embedder = emb.Embedder(self.model, variables, batch_size=self.batch_size)
    scorer = PairScorer(self.model, variables, self.batch_size) if self.use_score else None
    video, order, pair = None, [], []
    for index, clips in self.decoded_clips():
      out = embedder('video', clips, levels=(self.level,))[self.level]
      if video is None:
        video = np.full((len(self.clips), out.shape[-1]), np.nan, np.float32)
      video[index] = out
      order.append(index)
      if scorer is not None:
        pair.append(scorer.video_features(clips[:, None]))
    order = np.concatenate(order) if order else np.zeros(0, np.int64)
    done = np.zeros(len(self.clips), bool)
    done[order] = True
    if not done.all():
      lost = [self.clips[i][0] for i in np.flatnonzero(~done)[:SHOWN]]
      raise ValueError(
        f'{self.where}: {int((~done).sum())} of {len(self.clips)} clips were not decoded (a '
        f'record changed or failed to decode since the evaluator was built): {lost}'
      )
    out = {
      'video': video,
      'text': embedder('text', self.text_ids, levels=(self.level,))[self.level],
    }
    if scorer is not None:
      position = np.empty(len(self.clips), np.int64)
      position[order] = np.arange(len(self.clips))
      out['video/pair'] = jax.tree.map(lambda *xs: np.concatenate(xs)[position], *pair)
      out['text/pair'] = scorer.text_features(self.text_ids)
      out['scorer'] = scorer
    return out

  def run(self, variables) -> dict[str, float]:
    e = self.embed(variables)
    video, text = emb.l2_normalize(e['video']), emb.l2_normalize(e['text'])
    if self.video_query:
      similarity = np.einsum('qd,qcd->qc', video[self.query_clip], text[self.choice_text])
    else:
      similarity = np.einsum('qd,qcd->qc', text[self.query_text], video[self.choice_clip])
    results = multiple_choice_accuracy(similarity, self.answer, self.types, self.type_names)
    if self.video_query:
      results['count'] = len(self.questions)
    self.last = {'similarity': similarity, 'answer': self.answer, 'types': self.types,
                 'type_names': self.type_names, 'embeddings': e}  # fmt: skip
    if self.use_score:
      questions, choices = similarity.shape
      if self.video_query:  # pairs: (text, clip) indices, question-major
        pairs = np.stack([self.choice_text.reshape(-1), np.repeat(self.query_clip, choices)], 1)
      else:
        pairs = np.stack([np.repeat(self.query_text, choices), self.choice_clip.reshape(-1)], 1)
      pair = e.pop('scorer').scores(e['video/pair'], e['text/pair'], pairs)
      pair = pair.reshape(questions, choices)
      self.last['pair_score'] = pair
      scored = multiple_choice_accuracy(pair, self.answer, self.types, self.type_names)
      results.update({f'{k}_score': v for k, v in scored.items() if k.endswith('accuracy')})
    if self.video_query:
      counts = ', '.join(
        f'{name} {results[f"{name}_count"]}' for name in self.type_names.values() if name
      )
      logging.info(
        'multiple_choice %s: %d video-query questions%s', self.questions_path,
        len(self.questions), f' ({counts})' if counts else '',
      )  # fmt: skip
    else:
      logging.info(
        'multiple_choice %s: %d questions (inter %d, intra %d)',
        self.questions_path, len(self.questions), results['inter_count'], results['intra_count'],
      )  # fmt: skip
    return {k: float(v) for k, v in results.items()}
