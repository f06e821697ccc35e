"""Multiple-choice video–language evaluation, both ways round: a text query and C video clips as
choices (EgoMCQ, from EgoVLP), or a video clip as the query and C captions as choices (MSR-VTT
multiple choice, as All-in-one evaluates it); one choice is the answer.

Questions (eval config `questions`): a JSON file of one kind of question. Text query, EgoMCQ's
released format, read as it is:

  {"<key>": {"query": {"clip_text": …, "video_uid": …, …},
             "choices": {"0": {"video_uid": …, "clip_start": …, "clip_end": …, …}, …, "4": {…}},
             "answer": k, "types": 1 | 2}, …}

types 1 = inter-video (the choices come from different videos), 2 = intra-video (all from one).
Video query:

  {"<key>": {"query": {"video_uid": …, "clip_start": …, "clip_end": …},
             "choices": {"0": {"clip_text": …}, …, "C−1": {…}}, "answer": k, "types": …}, …}

types optional and free: a string or an integer naming the question's group (1 and "1" are one);
each group present gets its own metrics. A question none of whose choices names a video (a
video_uid) is a video-query one, any other a text-query one; a file holding both kinds is a
ValueError naming the first question of the other kind.
Times are seconds from the start of the video; numbers and numeric strings are both accepted (the
released file has strings for some fields) and other keys are ignored. Questions are taken in the
file's order (`max_questions` N > 0: the first N); every one has the same number C ≥ 2 of choices,
keyed "0" … "C−1" (a list is accepted too). A file that is not such JSON, or a question with a
missing or malformed field (a caption missing or empty), is a ValueError naming the file and the
question's key.

Videos: the clips are cut from the records of `{data.path}/{split}/*.tfrecord`. A record's media id
is BASE (a whole file) or BASE#t=A,B (a manifest window: its time 0 is A s into BASE). A video_uid U
names the records whose BASE is U; if there are none, those whose BASE without its file extension
is U (`U.mp4`); if none, those whose BASE's file name without extension is U (`videos/U.mp4`).
Two whole-file records named by the same rule (`a/U.mp4` and `b/U.mp4`), or whole-file and window
records of one video, are ambiguous and refused, naming them; a clip of a video held as windows is
read from the earliest window that holds it. A clip that starts before 0 is read from 0, as
EgoVLP does (EgoClip's windows around narrations at a video's start begin before it; counted in
the log). A clip must otherwise lie in its record: its start before the record's end, its end at
most CLIP_END_TOLERANCE_S past it (container and stream durations differ by a frame or an audio
packet; frames past the end repeat the last one). Questions whose video no record holds, or whose
clip lies outside it, are one ValueError naming the questions file, with their number and the
first few keys: never a silent drop.

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

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from data_pipelines import schema
from data_pipelines.options import tokenizer_path
from vatt_jax.evaluation import embeddings as emb
from vatt_jax.evaluation.retrieval import PairScorer, eval_data_config
from vatt_jax.models import Model
from vatt_jax.models.contract import space

TYPES = {1: 'inter', 2: 'intra'}  # EgoMCQ's `types`
CLIP_END_TOLERANCE_S = 1.0
_SHOWN = 5  # culprits named in one error message


@dataclasses.dataclass(frozen=True)
class Clip:
  """A span of a video, as a question names it (seconds)."""

  video_uid: str
  start: float
  end: float


@dataclasses.dataclass(frozen=True)
class Question:
  """A text-query question (EgoMCQ): a caption, C clips as the choices."""

  key: str  # as in the file
  text: str  # the query's clip_text
  choices: tuple[Clip, ...]
  answer: int  # index into choices
  kind: int  # 1 inter-video, 2 intra-video


@dataclasses.dataclass(frozen=True)
class VideoQuestion:
  """A video-query question (MSR-VTT multiple choice): a clip, C captions as the choices."""

  key: str  # as in the file
  clip: Clip  # the query
  choices: tuple[str, ...]  # the candidate captions
  answer: int  # index into choices
  kind: str | None  # its `types` as text (1 and "1" are one type); None: no type


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


# ---- the questions file -------------------------------------------------------------------------
def _number(value, where: str) -> float:
  if isinstance(value, str):
    try:
      value = float(value)
    except ValueError:
      raise ValueError(f'{where}: {value!r} is not a number') from None
  if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
    raise ValueError(f'{where}: {value!r} is not a finite number')
  return float(value)


def _integer(value, where: str) -> int:
  number = _number(value, where)
  if number != int(number):
    raise ValueError(f'{where}: {value!r} is not an integer')
  return int(number)


def _clip(item, where: str) -> Clip:
  if not isinstance(item, dict):
    raise ValueError(f'{where}: expected an object, got {type(item).__name__}')
  for key in ('video_uid', 'clip_start', 'clip_end'):
    if key not in item:
      raise ValueError(f'{where}: missing field {key!r}')
  uid = item['video_uid']
  if not isinstance(uid, str) or not uid.strip():
    raise ValueError(f'{where}.video_uid: {uid!r} is not a video id')
  start = _number(item['clip_start'], f'{where}.clip_start')
  end = _number(item['clip_end'], f'{where}.clip_end')
  if end < start:
    raise ValueError(f'{where}: clip_end {end:g} is before clip_start {start:g}')
  return Clip(uid.strip(), start, end)


def _choice_items(where: str, choices) -> list[tuple[str, object]]:
  """A question's choices as [("0", item), …, ("C−1", item)] (an object keyed "0" … "C−1", or a
  list), at least 2; raises ValueError naming the question."""
  if isinstance(choices, list):
    choices = {str(i): c for i, c in enumerate(choices)}
  if not isinstance(choices, dict) or len(choices) < 2:
    raise ValueError(f'{where}: choices must be an object of at least 2 choices "0", "1", …')
  names = [str(i) for i in range(len(choices))]
  if sorted(choices, key=str) != sorted(names):
    raise ValueError(f'{where}: choices must be keyed {names}, got {list(choices)}')
  return [(n, choices[n]) for n in names]


def _answer(item: dict, where: str, num_choices: int) -> int:
  answer = _integer(item['answer'], f'{where}: answer')
  if not 0 <= answer < num_choices:
    raise ValueError(f'{where}: answer {answer} is not one of the {num_choices} choices')
  return answer


def _question(where: str, key: str, item) -> Question:
  if not isinstance(item, dict):
    raise ValueError(f'{where}: expected an object, got {type(item).__name__}')
  for field in ('query', 'choices', 'answer', 'types'):
    if field not in item:
      raise ValueError(f'{where}: missing field {field!r}')
  query = item['query']
  if not isinstance(query, dict) or not isinstance(query.get('clip_text'), str):
    raise ValueError(f'{where}: query.clip_text: missing or not a string')
  choices = _choice_items(where, item['choices'])
  clips = tuple(_clip(choice, f'{where}: choices[{n!r}]') for n, choice in choices)
  answer = _answer(item, where, len(clips))
  kind = _integer(item['types'], f'{where}: types')
  if kind not in TYPES:
    raise ValueError(f'{where}: types {kind} is not 1 (inter-video) or 2 (intra-video)')
  return Question(key, query['clip_text'], clips, answer, kind)


def _asks_with_video(item) -> bool:
  """Whether a question is a video-query one: choices none of which names a video."""
  choices = item.get('choices') if isinstance(item, dict) else None
  values = list(choices.values()) if isinstance(choices, dict) else choices
  return (
    isinstance(values, list)
    and bool(values)
    and not any(isinstance(c, dict) and 'video_uid' in c for c in values)
  )


def _video_question(where: str, key: str, item: dict) -> VideoQuestion:
  for field in ('query', 'choices', 'answer'):
    if field not in item:
      raise ValueError(f'{where}: missing field {field!r}')
  clip = _clip(item['query'], f'{where}: query')
  texts = []
  for n, choice in _choice_items(where, item['choices']):
    if not isinstance(choice, dict):
      raise ValueError(f'{where}: choices[{n!r}]: expected an object, got {type(choice).__name__}')
    text = choice.get('clip_text')
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f'{where}: choices[{n!r}].clip_text: missing, empty or not a string')
    texts.append(text)
  answer = _answer(item, where, len(texts))
  kind = item.get('types')
  if kind is not None:
    if isinstance(kind, bool) or not isinstance(kind, int | str) or not str(kind).strip():
      raise ValueError(f'{where}: types {kind!r} is not a name (a non-empty string or an integer)')
    kind = str(kind).strip()
  return VideoQuestion(key, clip, tuple(texts), answer, kind)


def _kind(question: Question | VideoQuestion) -> str:
  if isinstance(question, VideoQuestion):
    return 'a video clip (its choices are captions)'
  return 'a text (its choices are video clips)'


def read_questions(path: str, max_questions: int = 0) -> list[Question] | list[VideoQuestion]:
  """The questions of a JSON file (module docstring), in the file's order, all text-query
  (Question) or all video-query (VideoQuestion); the first `max_questions` when > 0. Raises
  ValueError naming the file (and question key)."""
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except OSError as e:
    raise ValueError(f'questions file {path}: cannot read it ({e.strerror})') from None
  except ValueError as e:  # not JSON, not UTF-8
    raise ValueError(f'questions file {path}: not a JSON file ({e})') from None
  if isinstance(data, list):
    data = {str(i): q for i, q in enumerate(data)}
  if not isinstance(data, dict) or not data:
    raise ValueError(
      f'questions file {path}: expected an object of questions {{"0": {{"query": …}}, …}}'
    )
  questions = []
  for key, item in list(data.items())[: max_questions or None]:
    where = f'questions file {path}: question {key!r}'
    if _asks_with_video(item):
      question = _video_question(where, key, item)
    else:
      question = _question(where, key, item)
    if questions and type(question) is not type(questions[0]):
      raise ValueError(
        f'{where} asks with {_kind(question)}, question {questions[0].key!r} with '
        f'{_kind(questions[0])}: a file holds questions of one kind only'
      )
    questions.append(question)
  first = questions[0]
  for q in questions:
    if len(q.choices) != len(first.choices):
      raise ValueError(
        f'questions file {path}: question {q.key!r} has {len(q.choices)} choices, question '
        f'{first.key!r} {len(first.choices)}: every question needs the same number'
      )
  return questions


# ---- questions' videos ↔ records -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StoredVideo:
  """What a record holds of a video: its media id, duration (s), where it starts in the video
  (a window's A; None for a whole file) and whether it has frames."""

  media_id: str
  duration: float
  offset: float | None = None
  has_frames: bool = True


def split_media_id(media_id: str) -> tuple[str, float | None]:
  """'BASE#t=A,B' → (BASE, A); anything else → (media_id, None)."""
  base, sep, fragment = media_id.partition('#t=')
  if sep:
    try:
      return base, float(fragment.split(',')[0])
    except ValueError:
      pass
  return media_id, None


def _names(base: str) -> list[str]:
  """What a record's BASE answers to, by rule: itself, without extension, its file name."""
  stem, extension = os.path.splitext(base)
  names = [base]
  for name in (stem if extension else None, os.path.basename(stem)):
    if name and name not in names:
      names.append(name)
  return names + [None] * (3 - len(names))


def match_videos(video_uids: Iterable[str], media_ids: Sequence[str]) -> dict[str, list[int]]:
  """{video_uid: indices into media_ids of the records that hold it}, by the rule of the module
  docstring; uids no record holds are left out. Raises ValueError naming the ambiguous ones."""
  by_rule = [{}, {}, {}]  # rule → {name: [record index]}
  for i, media_id in enumerate(media_ids):
    base, _ = split_media_id(media_id)
    for rule, name in enumerate(_names(base)):
      if name is not None:
        by_rule[rule].setdefault(name, []).append(i)
  out, ambiguous = {}, []
  for uid in dict.fromkeys(video_uids):
    found = next((rule[uid] for rule in by_rule if uid in rule), None)
    if found is None:
      continue
    parts = [split_media_id(media_ids[i]) for i in found]
    whole = [offset for _, offset in parts if offset is None]
    windows = [(base, offset) for base, offset in parts if offset is not None]
    # One whole file, or windows of one file at distinct starts.
    if (
      len(whole) > 1
      or (whole and windows)
      or len(set(windows)) < len(windows)
      or len({base for base, _ in windows}) > 1
    ):
      ambiguous.append(f'{uid!r}: {", ".join(repr(media_ids[i]) for i in found[:_SHOWN])}')
    out[uid] = found
  if ambiguous:
    raise ValueError(
      f'{len(ambiguous)} video ids match more than one record (a whole video twice, or a whole '
      f'video and windows of it): {"; ".join(ambiguous[:_SHOWN])}'
    )
  return out


def locate(clip: Clip, records: Sequence[int], videos: Sequence[StoredVideo]):
  """(record index, start, end in the record's time) of the record that holds `clip` (the earliest
  window that does), or None when none does. A start before 0 counts as 0."""
  start = max(clip.start, 0.0)
  for i in sorted(records, key=lambda i: videos[i].offset or 0.0):
    video = videos[i]
    offset = video.offset or 0.0
    begin, end = start - offset, clip.end - offset
    if -1e-6 <= begin < video.duration and end <= video.duration + CLIP_END_TOLERANCE_S:
      return i, max(begin, 0.0), max(end, 0.0)
  return None


def _read_videos(files: Sequence[str]) -> list[StoredVideo]:
  """The media id, duration and frame flag of every record of `files` (context only)."""
  import tensorflow as tf

  features = {
    schema.MEDIA_ID: tf.io.FixedLenFeature([], tf.string),
    schema.DURATION: tf.io.FixedLenFeature([], tf.float32),
    schema.HAS_VIDEO: tf.io.FixedLenFeature([], tf.int64),
  }

  def context(record):
    values, _ = tf.io.parse_single_sequence_example(record, context_features=features)
    return values

  videos = []
  for path in files:
    try:
      for ctx in tf.data.TFRecordDataset(path).map(context).as_numpy_iterator():
        media_id = ctx[schema.MEDIA_ID].decode('utf-8', 'replace')
        _, offset = split_media_id(media_id)
        videos.append(
          StoredVideo(media_id, float(ctx[schema.DURATION]), offset, bool(ctx[schema.HAS_VIDEO]))
        )
    except tf.errors.OpError as e:
      raise ValueError(
        f'{path}: unreadable record after {len(videos)} (not vatt-jax records, or damaged: '
        f'{e.message.strip().splitlines()[0][:200]})'
      ) from None
  return videos


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
    from data_pipelines import pretrain  # (TensorFlow)

    self.video_query = isinstance(self.questions[0], VideoQuestion)
    folder = dict(self.data.get('split_folders', {})).get(self.split, self.split)
    self.files = pretrain.shard_files(self.data.path, folder, 0, 1)
    self.where = os.path.join(self.data.path, folder)
    videos = _read_videos(self.files)
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
        shown = ', '.join(f'{key} ({detail})' for key, detail in list(found.items())[:_SHOWN])
        more = ', …' if len(found) > _SHOWN else ''
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
      lost = [self.clips[i][0] for i in np.flatnonzero(~done)[:_SHOWN]]
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
