"""The demo's caption multiple-choice questions (mc_direction / mc_appearance): one per segment,
candidates that differ only in the tested words, one right answer, deterministic; --mc_splits."""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import common
from data_pipelines import demo, demo_questions, demo_vocab
from tests import toy_models
from tests.conftest import ROOT
from tests.test_pipeline import tokenizer_path  # noqa: F401 (a fixture)
from vatt_jax.evaluation import build_evaluator
from vatt_jax.evaluation import mc_questions as mcq
from vatt_jax.models import build_model

# What each direction and digit may be called: the captions' vocabulary, written out here.
DIRECTION_PHRASES = {
  'to the left': 'left', 'left': 'left', 'leftwards': 'left',
  'to the right': 'right', 'right': 'right', 'rightwards': 'right',
  'up': 'up', 'upwards': 'up', 'towards the top': 'up',
  'down': 'down', 'downwards': 'down', 'towards the bottom': 'down',
}  # fmt: skip
DIGITS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')


def _differing_parts(captions: list[str]) -> list[str]:
  """What is left of each caption once the words all of them begin and end with are cut off."""
  words = [c.split(' ') for c in captions]
  prefix = 0
  while all(len(w) > prefix for w in words) and len({w[prefix] for w in words}) == 1:
    prefix += 1
  suffix = 0
  while all(len(w) > prefix + suffix for w in words) and len({w[-1 - suffix] for w in words}) == 1:
    suffix += 1
  return [' '.join(w[prefix : len(w) - suffix]) for w in words]


def _digit(part: str) -> int:
  """The digit a differing part names: its word or numeral, after "a" / "an" chosen by grammar."""
  match = re.fullmatch(r'(?:(a|an) )?(\w+)', part)
  assert match, part
  article, name = match.groups()
  digit = int(name) if name.isdigit() else DIGITS.index(name)
  assert article in (None, 'an' if digit == 8 else 'a'), part
  return digit


@pytest.fixture(scope='module')
def videos():
  return demo.plan({'test': 9}, seed=5, num_segments=(2, 6))['test'][0]


def _segments(videos):
  return [(v, s) for v in videos for s in v['segments']]


@pytest.mark.parametrize('kind', ['direction', 'appearance'])
def test_one_question_per_segment_with_one_right_caption(videos, kind):
  questions = demo_questions.caption_mc_questions(videos, seed=5, split='test', kind=kind)
  segments = _segments(videos)
  assert list(questions) == [str(i) for i in range(len(segments))]
  choices = {'direction': 4, 'appearance': 5}[kind]
  for question, (video, segment) in zip(questions.values(), segments, strict=True):
    assert question['query'] == dict(
      video_uid=video['media'], video_dur=video['duration'],
      clip_start=segment['start'], clip_end=segment['end'],
    )  # fmt: skip
    assert question['types'] == kind
    assert list(question['choices']) == [str(i) for i in range(choices)]
    captions = [c['clip_text'] for c in question['choices'].values()]
    assert captions[question['answer']] == segment['caption']  # the segment's own caption
    parts = _differing_parts(captions)
    if kind == 'direction':
      said = [DIRECTION_PHRASES[p] for p in parts]
      assert sorted(said) == sorted(demo_vocab.DIRECTIONS)  # one candidate per direction
      assert said[question['answer']] == segment['direction']
    else:
      said = [_digit(p) for p in parts]
      assert len(set(said)) == 5 and said[question['answer']] == segment['digit']
    # Cut out the differing parts: the candidates are the same sentence.
    assert len({c.replace(p, '<>', 1) for c, p in zip(captions, parts, strict=True)}) == 1


def test_answers_and_candidates_are_spread_and_deterministic(videos):
  direction = demo_questions.caption_mc_questions(videos, seed=5, split='test', kind='direction')
  appearance = demo_questions.caption_mc_questions(videos, seed=5, split='test', kind='appearance')
  n = len(_segments(videos))
  assert n >= 30
  for questions, choices in ((direction, 4), (appearance, 5)):
    answers = collections.Counter(q['answer'] for q in questions.values())
    assert set(answers) == set(range(choices)) and max(answers.values()) < n / 2
  distractors = collections.Counter(
    _digit(part)
    for q in appearance.values()
    for i, part in enumerate(_differing_parts([c['clip_text'] for c in q['choices'].values()]))
    if i != q['answer']
  )
  assert set(distractors) == set(range(10))
  # Wording varies across questions (templates, verbs, phrases).
  assert len({q['choices']['0']['clip_text'].split(' ')[0] for q in direction.values()}) >= 3
  again = demo_questions.caption_mc_questions(videos, seed=5, split='test', kind='direction')
  assert json.dumps(again) == json.dumps(direction)
  assert (
    demo_questions.caption_mc_questions(videos, seed=6, split='test', kind='direction') != direction
  )
  with pytest.raises(ValueError, match="kind must be one of \\['direction', 'appearance'\\]"):
    demo_questions.caption_mc_questions(videos, seed=5, split='test', kind='colour')


def test_the_evaluator_reads_them_as_video_queries(videos, tmp_path):
  for kind in demo_questions.MC_KINDS:
    questions = demo_questions.caption_mc_questions(videos, seed=5, split='test', kind=kind)
    path = tmp_path / f'{kind}.json'
    path.write_text(json.dumps(questions))
    loaded = mcq.read_questions(str(path))
    assert all(isinstance(q, mcq.VideoQuestion) and q.kind == kind for q in loaded)
    assert [(q.clip.video_uid, q.clip.start, q.answer) for q in loaded] == [
      (q['query']['video_uid'], q['query']['clip_start'], q['answer']) for q in questions.values()
    ]


def test_script_writes_the_question_sets_only_when_asked(tmp_path):
  script = [sys.executable, str(ROOT / 'scripts' / 'make_demo_data.py')]
  args = ['--num_train=0', '--num_val=0', '--num_test=2', '--size=32', '--workers=1']
  done = subprocess.run(
    [*script, f'--output_dir={tmp_path / "mc"}', *args, '--mc_splits=test'],
    capture_output=True, text=True, check=True,
  )  # fmt: skip
  videos = demo.plan({'test': 2})['test'][0]
  n = len(_segments(videos))
  for kind in demo_questions.MC_KINDS:
    written = (tmp_path / 'mc' / f'mc_{kind}_test.json').read_text()
    assert (
      written
      == json.dumps(demo_questions.caption_mc_questions(videos, seed=0, split='test', kind=kind))
      + '\n'
    )
  assert (
    f'mc_direction_test.json: {n} direction questions, mc_appearance_test.json: {n} appearance '
    'questions' in done.stdout
  )
  info = json.loads((tmp_path / 'mc' / 'dataset_info.json').read_text())
  assert info['mc'] == {'test': {'direction': n, 'appearance': n}}
  readme = (tmp_path / 'mc' / 'README.txt').read_text()
  assert f'mc_direction_test.json, mc_appearance_test.json: {n} and {n} questions' in readme
  # Without the flag: no question files, and the other files are the same bytes as with it.
  subprocess.run([*script, f'--output_dir={tmp_path / "plain"}', *args], check=True,
                 capture_output=True)  # fmt: skip
  plain = sorted(p.name for p in (tmp_path / 'plain').iterdir())
  assert not [name for name in plain if name.startswith('mc_')]
  assert 'mc' not in json.loads((tmp_path / 'plain' / 'dataset_info.json').read_text())
  for name in ('test.jsonl', 'retrieval_test.jsonl', 'taxonomy.json'):
    assert (tmp_path / 'plain' / name).read_bytes() == (tmp_path / 'mc' / name).read_bytes()
  bad = subprocess.run(
    [*script, f'--output_dir={tmp_path / "bad"}', *args, '--mc_splits=dev'],
    capture_output=True, text=True,
  )  # fmt: skip
  assert bad.returncode != 0 and '--mc_splits must be among' in bad.stderr
  assert not (tmp_path / 'bad').exists()


@pytest.mark.slow  # the demo's media, converted by scripts/prepare_data.py (~10 s)
def test_the_demo_sets_are_answered_from_the_demo_shards(tmp_path, tokenizer_path):  # noqa: F811
  media, shards = tmp_path / 'media', tmp_path / 'shards'
  demo.generate(media, num_videos={'test': 2}, size=32, workers=1, mc_splits=['test'])
  subprocess.run(
    [sys.executable, 'scripts/prepare_data.py', f'--manifest={media}/test.jsonl',
     f'--output_dir={shards}/test', '--num_shards=1', '--short_side=32', '--sample_rate=8000',
     '--workers=1'],
    cwd=ROOT, check=True, capture_output=True,
  )  # fmt: skip
  config = common.pretraining_config(toy_models.model_config())
  config.data.path, config.data.tokenizer = str(shards), tokenizer_path
  model = build_model(config.model)
  batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in model.example_batch(2).items()}
  variables = model.init(jax.random.key(0), batch)
  segments = sum(len(v['segments']) for v in demo.plan({'test': 2})['test'][0])
  for kind, choices in demo_questions.MC_KINDS.items():
    eval_cfg = dict(type='multiple_choice', questions=str(media / f'mc_{kind}_test.json'),
                    split='test', batch_size=4)  # fmt: skip
    evaluator = build_evaluator(ml_collections.ConfigDict(eval_cfg), config, model)
    # One clip per segment, each once; the candidate captions of all questions, each once.
    assert len(evaluator.clips) == segments and evaluator.choice_text.shape == (segments, choices)
    result = evaluator.run(variables)
    assert result['count'] == result[f'{kind}_count'] == segments
    assert result['chance'] == 100 / choices and 0 <= result['accuracy'] <= 100
