"""The questions of a multiple-choice evaluation (vatt_jax.evaluation.multiple_choice) and the
records that hold their videos.

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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence

from data_pipelines import schema

TYPES = {1: 'inter', 2: 'intra'}  # EgoMCQ's `types`
CLIP_END_TOLERANCE_S = 1.0
SHOWN = 5  # culprits named in one error message


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
      ambiguous.append(f'{uid!r}: {", ".join(repr(media_ids[i]) for i in found[:SHOWN])}')
    out[uid] = found
  if ambiguous:
    raise ValueError(
      f'{len(ambiguous)} video ids match more than one record (a whole video twice, or a whole '
      f'video and windows of it): {"; ".join(ambiguous[:SHOWN])}'
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


def read_videos(files: Sequence[str]) -> list[StoredVideo]:
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
