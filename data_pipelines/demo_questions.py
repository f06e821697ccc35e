"""The demo dataset's question sets (data_pipelines.demo; the formats are in its docstring):
EgoMCQ-format questions (a caption, clips as the choices) and caption multiple choice (a clip,
captions that differ in the direction or the digit as the choices).
"""

from __future__ import annotations

import numpy as np

from data_pipelines.demo_vocab import DIRECTIONS, SPLITS, caption_tags, caption_text

MCQ_CHOICES = 5  # EgoMCQ's
# Caption multiple-choice question sets (mc_{kind}_{split}.json) → candidates per question.
MC_KINDS = {'direction': len(DIRECTIONS), 'appearance': 5}


def _mcq_clip(video: dict, segment: dict, tags: bool) -> dict:
  """A segment as an EgoMCQ clip: EgoClip's fields, tags as its "[i, …]" strings."""
  clip = dict(
    video_uid=video['media'],
    video_dur=video['duration'],
    clip_start=segment['start'],
    clip_end=segment['end'],
    clip_text=segment['caption'],
  )
  if tags:
    classes = caption_tags(segment['digit'], segment['direction'])
    clip.update(tag_noun=str(classes['nouns']), tag_verb=str(classes['verbs']))
  return clip


def egomcq_questions(videos: list[dict], *, seed: int, split: str, tags: bool = True) -> dict:
  """EgoMCQ-format questions (module docstring) about the planned `videos` of `split` (plan()'s
  render specs), drawn from their own stream of (seed, split): {"0": question, …}.

  Raises ValueError naming the flags when the split has too few videos for inter-video questions
  (one per choice).
  """
  rng = np.random.default_rng([seed, SPLITS.index(split), 2000])
  questions = {}

  def ask(kind: int, video: dict, segment: dict, others: list[tuple[dict, dict]]):
    clips = [(video, segment), *others]
    order = rng.permutation(len(clips))  # choice i shows clips[order[i]]
    questions[str(len(questions))] = dict(
      query=_mcq_clip(video, segment, tags),
      choices={str(i): _mcq_clip(*clips[j], tags) for i, j in enumerate(order.tolist())},
      answer=int(np.flatnonzero(order == 0)[0]),
      types=kind,
    )

  for v, video in enumerate(videos):
    for k, segment in enumerate(video['segments']):
      # Inter-video: one segment of each of 4 other videos, none showing what the query says.
      said = (segment['digit'], segment['direction'])
      others = [
        (o, [s for s in videos[o]['segments'] if (s['digit'], s['direction']) != said])
        for o in range(len(videos))
        if o != v
      ]
      others = [(o, candidates) for o, candidates in others if candidates]
      if len(others) < MCQ_CHOICES - 1:
        raise ValueError(
          f'--egomcq_splits={split}: an inter-video question needs {MCQ_CHOICES} videos, and '
          f'{video["id"]} has only {len(others)} others with a segment unlike its segment {k} '
          f'(--num_{split}={len(videos)}, --segments)'
        )
      picked = rng.choice(len(others), MCQ_CHOICES - 1, replace=False)
      distractors = []
      for i in picked.tolist():
        o, candidates = others[i]
        distractors.append((videos[o], candidates[int(rng.integers(len(candidates)))]))
      ask(1, video, segment, distractors)
      # Intra-video: 4 other segments of the same video (its digits are distinct).
      segments = video['segments']
      if len(segments) >= MCQ_CHOICES:
        rest = [j for j in range(len(segments)) if j != k]
        picked = rng.choice(rest, MCQ_CHOICES - 1, replace=False)
        ask(2, video, segment, [(video, segments[j]) for j in picked.tolist()])
  return questions


def caption_mc_questions(videos: list[dict], *, seed: int, split: str, kind: str) -> dict:
  """Video-query multiple-choice questions of `kind` (MC_KINDS; module docstring) about the planned
  `videos` of `split` (plan()'s render specs), one per segment in video and segment order, drawn
  from their own stream of (seed, split, kind): {"0": question, …}.

  The candidates are the segment's clean caption and its wording (caption_form) with another
  direction phrase ('direction': one candidate per direction) or another digit ('appearance': 4
  other digits drawn without replacement), in random order; the answer is the clean caption.
  """
  if kind not in MC_KINDS:
    raise ValueError(f'caption question kind must be one of {list(MC_KINDS)}, got {kind!r}')
  rng = np.random.default_rng([seed, SPLITS.index(split), 3000 + list(MC_KINDS).index(kind)])
  questions = {}
  for video in videos:
    for segment in video['segments']:
      digit, direction, form = segment['digit'], segment['direction'], segment['caption_form']
      if kind == 'direction':
        candidates = [caption_text(digit, d, form) for d in DIRECTIONS]
        right = DIRECTIONS.index(direction)
      else:
        others = rng.choice([d for d in range(10) if d != digit], MC_KINDS[kind] - 1, replace=False)
        candidates = [caption_text(d, direction, form) for d in [digit, *others.tolist()]]
        right = 0
      order = rng.permutation(len(candidates))  # choice i is candidates[order[i]]
      questions[str(len(questions))] = dict(
        query=dict(
          video_uid=video['media'],
          video_dur=video['duration'],
          clip_start=segment['start'],
          clip_end=segment['end'],
        ),
        choices={str(i): dict(clip_text=candidates[j]) for i, j in enumerate(order.tolist())},
        answer=int(np.flatnonzero(order == right)[0]),
        types=kind,
      )
  return questions
