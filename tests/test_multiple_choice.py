"""Multiple-choice evaluation (EgoMCQ): accuracy and its tie rule, the released question format,
question videos ↔ records, and the evaluator end to end on a toy model against an oracle."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from configs import common
from data_pipelines import demo, schema
from data_pipelines import text as text_ops
from tests import toy_models
from tests.conftest import ROOT
from tests.test_pipeline import WORDS, _write, tokenizer_path  # noqa: F401 (a fixture)
from vatt_jax.evaluation import build_evaluator
from vatt_jax.evaluation import mc_questions as mcq
from vatt_jax.evaluation import multiple_choice as mc
from vatt_jax.models import build_model


# ---- accuracy --------------------------------------------------------------------------------------
def _reference_accuracy(similarity, answer, types) -> dict:
  """Float64 loops: the chosen choice is the first (lowest index) of the row's maxima."""
  hits = {1: [], 2: []}
  for row, right, kind in zip(similarity.tolist(), answer.tolist(), types.tolist(), strict=True):
    best = max(row)
    chosen = min(j for j, s in enumerate(row) if s == best)
    hits[kind].append(chosen == right)
  every = hits[1] + hits[2]
  out = {'accuracy': 100 * sum(every) / len(every), 'chance': 100 / similarity.shape[1]}
  for kind, name in ((1, 'inter'), (2, 'intra')):
    out[f'{name}_count'] = len(hits[kind])
    out[f'{name}_accuracy'] = 100 * sum(hits[kind]) / len(hits[kind]) if hits[kind] else np.nan
  return out


def test_accuracy_matches_a_float64_reference_with_ties():
  rng = np.random.default_rng(0)
  for questions, choices in ((40, 5), (7, 2), (25, 4)):
    # Scores on a coarse grid: many rows have tied maxima, some of them at the answer.
    similarity = rng.integers(-2, 3, (questions, choices)).astype(np.float64) / 2
    answer = rng.integers(0, choices, questions)
    types = rng.integers(1, 3, questions)
    got = mc.multiple_choice_accuracy(similarity, answer, types)
    want = _reference_accuracy(similarity, answer, types)
    assert got.keys() == want.keys()
    for key, value in want.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)
  # The tie rule on its own: a row of equal scores picks choice 0.
  tied = mc.multiple_choice_accuracy(np.ones((2, 5)), np.array([0, 4]), np.array([1, 2]))
  assert (tied['inter_accuracy'], tied['intra_accuracy'], tied['accuracy']) == (100, 0, 50)
  assert tied['chance'] == 20


def test_accuracy_of_one_type_only_and_bad_inputs():
  only_inter = mc.multiple_choice_accuracy(np.eye(3), np.array([0, 1, 0]), np.array([1, 1, 1]))
  assert only_inter['inter_accuracy'] == pytest.approx(200 / 3)
  assert only_inter['intra_count'] == 0 and np.isnan(only_inter['intra_accuracy'])
  with pytest.raises(ValueError, match='NaN'):
    mc.multiple_choice_accuracy(np.array([[np.nan, 1.0]]), np.array([0]), np.array([1]))
  with pytest.raises(ValueError, match='answer must be in'):
    mc.multiple_choice_accuracy(np.zeros((1, 5)), np.array([5]), np.array([1]))
  with pytest.raises(ValueError, match='types must be in'):
    mc.multiple_choice_accuracy(np.zeros((1, 5)), np.array([0]), np.array([0]))
  with pytest.raises(ValueError, match=r'answer must be \[2\] integers'):
    mc.multiple_choice_accuracy(np.zeros((2, 5)), np.array([0]), np.array([1, 1]))


# ---- the released format -------------------------------------------------------------------------
def _choice(uid, start, end, **extra):
  return {'video_uid': uid, 'clip_start': start, 'clip_end': end, 'clip_text': '#C C x', **extra}


def _egomcq_item(text, clips, answer, types, **extra):
  return {
    'query': {'video_uid': 'q', 'clip_start': '0', 'clip_end': '1', 'clip_text': text,
              'tag_noun': '[3]', 'narration_source': 'narration_pass_1'},
    'choices': {str(i): _choice(*c) for i, c in enumerate(clips)},
    'answer': answer,
    'types': types,
    **extra,
  }  # fmt: skip


def _dump(path, questions) -> str:
  path.write_text(json.dumps(questions))
  return str(path)


def test_released_format_loads_strings_numbers_and_extra_keys(tmp_path):
  clips = [('a', '1.5', '2.25'), ('b', 3, 4.5), ('c', '0', 1), ('d', 2, '2'), ('e', '-0.5', 1)]
  path = _dump(
    tmp_path / 'egomcq.json',
    {
      '0': _egomcq_item('#C C opens the door', clips, '3', '1', video_dur='480.0'),
      '1': _egomcq_item('#C C closes it', clips, 0, 2),
    },
  )
  questions = mcq.read_questions(path)
  assert [q.key for q in questions] == ['0', '1']
  first = questions[0]
  assert first.text == '#C C opens the door' and (first.answer, first.kind) == (3, 1)
  assert first.choices[0] == mcq.Clip('a', 1.5, 2.25) and first.choices[4] == mcq.Clip('e', -0.5, 1)
  assert (questions[1].answer, questions[1].kind) == (0, 2)
  assert [q.key for q in mcq.read_questions(path, max_questions=1)] == ['0']
  # Choices as a list, and keys out of order, are the same choices.
  item = _egomcq_item('x', clips, 1, 1)
  item['choices'] = dict(reversed(list(item['choices'].items())))
  assert mcq.read_questions(_dump(tmp_path / 'r.json', {'k': item}))[0].choices == first.choices
  item['choices'] = [_choice(*c) for c in clips]
  assert mcq.read_questions(_dump(tmp_path / 'l.json', {'k': item}))[0].choices == first.choices


def _broken(item, mutate):
  item = json.loads(json.dumps(item))
  mutate(item)
  return item


@pytest.mark.parametrize(
  'mutate, message',
  [
    (lambda q: q.pop('answer'), "question 'q7': missing field 'answer'"),
    (lambda q: q.update(answer=5), "question 'q7': answer 5 is not one of the 5 choices"),
    (lambda q: q.update(answer='two'), "question 'q7': answer: 'two' is not a number"),
    (lambda q: q.update(types=3), "question 'q7': types 3 is not 1"),
    (lambda q: q['query'].pop('clip_text'), "question 'q7': query.clip_text"),
    (lambda q: q['choices']['2'].pop('video_uid'), r"question 'q7': choices\['2'\]: missing field"),
    (lambda q: q['choices']['1'].update(clip_start='1.x'), r"choices\['1'\].clip_start: '1.x'"),
    (lambda q: q['choices']['0'].update(clip_end=0.5), r"choices\['0'\]: clip_end 0.5 is before"),
    (lambda q: q['choices'].pop('2'), "question 'q7': choices must be keyed"),
    (lambda q: q.update(choices={'0': q['choices']['0']}), 'at least 2 choices'),
  ],
)
def test_malformed_questions_name_the_file_and_question(tmp_path, mutate, message):
  clips = [('a', 1, 2)] * 5
  good = _egomcq_item('text', clips, 0, 1)
  path = _dump(tmp_path / 'bad.json', {'q1': good, 'q7': _broken(good, mutate)})
  with pytest.raises(ValueError, match=message) as error:
    mcq.read_questions(path)
  assert f'questions file {path}' in str(error.value) and '\n' not in str(error.value)


def test_unreadable_files_and_unequal_choice_counts(tmp_path):
  (tmp_path / 'not.json').write_text('{"0": {"query": ')
  with pytest.raises(ValueError, match='not.json: not a JSON file'):
    mcq.read_questions(str(tmp_path / 'not.json'))
  with pytest.raises(ValueError, match='missing.json: cannot read it'):
    mcq.read_questions(str(tmp_path / 'missing.json'))
  with pytest.raises(ValueError, match='expected an object of questions'):
    mcq.read_questions(_dump(tmp_path / 'empty.json', {}))
  mixed = {
    '0': _egomcq_item('t', [('a', 1, 2)] * 5, 0, 1),
    '1': _egomcq_item('t', [('a', 1, 2)] * 4, 0, 1),
  }
  with pytest.raises(ValueError, match="question '1' has 4 choices, question '0' 5"):
    mcq.read_questions(_dump(tmp_path / 'mixed.json', mixed))


# ---- question videos ↔ records ---------------------------------------------------------------------
def test_video_ids_match_records_by_the_documented_rule():
  ids = ['media/x.mp4', 'videos/y.mp4', 'z.mkv', 'w.mp4#t=600,1200', 'w.mp4#t=0,600', 'u']
  got = mcq.match_videos(['media/x.mp4', 'media/x', 'x', 'y', 'z', 'w', 'u', 'absent'], ids)
  assert got == {'media/x.mp4': [0], 'media/x': [0], 'x': [0], 'y': [1], 'z': [2], 'w': [3, 4],
                 'u': [5]}  # fmt: skip
  # The first rule that names a record wins: 'x' is a whole media path of its own here.
  assert mcq.match_videos(['x'], ['x', 'x.mp4', 'a/x.mp4']) == {'x': [0]}
  assert mcq.match_videos(['x'], ['x.mp4', 'a/x.mp4']) == {'x': [0]}
  for records in (
    ['a/x.mp4', 'b/x.mp4'],  # two files called x
    ['x.mp4', 'x.mkv'],
    ['x.mp4', 'x.mp4#t=0,600'],  # the whole video and a window of it
    ['x.mp4#t=0,600', 'x.mp4#t=0,600'],  # one window twice
    ['a/x.mp4#t=0,600', 'b/x.mp4#t=600,1200'],  # windows of two files
  ):
    with pytest.raises(ValueError, match="1 video ids match more than one record .*'x'"):
      mcq.match_videos(['x', 'other'], records)


def test_clips_are_located_in_their_record():
  videos = [
    mcq.StoredVideo('w.mp4#t=0,600', 600.0, 0.0),
    mcq.StoredVideo('w.mp4#t=590,1200', 610.0, 590.0),
    mcq.StoredVideo('v.mp4', 10.0),
  ]
  assert mcq.locate(mcq.Clip('w', 595, 598), [1, 0], videos) == (0, 595, 598)  # earliest window
  assert mcq.locate(mcq.Clip('w', 599, 603), [0, 1], videos) == (1, 9, 13)  # crosses 600: later one
  assert mcq.locate(mcq.Clip('v', -0.5, 2), [2], videos) == (2, 0, 2)  # read from 0, as EgoVLP
  assert mcq.locate(mcq.Clip('v', 9, 10 + mcq.CLIP_END_TOLERANCE_S), [2], videos) is not None
  assert mcq.locate(mcq.Clip('v', 9, 10.01 + mcq.CLIP_END_TOLERANCE_S), [2], videos) is None
  assert mcq.locate(mcq.Clip('v', 10, 10.5), [2], videos) is None  # starts at the end
  assert mcq.locate(mcq.Clip('w', 1300, 1301), [0, 1], videos) is None


# ---- the evaluator end to end ----------------------------------------------------------------------
FPS, FRAMES, DURATION = 5.0, 20, 4.0  # stored videos: 4 s at 5 fps
VIDEOS = {  # media id → stored frame k is uniform grey base + 2k (never the same across videos)
  'media/test/v0.mp4': 10,
  'media/test/v1.mp4': 50,
  'media/test/v2.mp4': 90,
  'media/test/v3.mp4': 130,
  'media/test/v4.mp4': 170,
  'media/test/w.mp4#t=100,104': 210,  # a manifest window: time 0 is 100 s into w.mp4
}
WINDOW_START = 100.0


def _video_record(media_id: str, base: int) -> schema.Record:
  images = [np.full((24, 32, 3), base + 2 * k, np.uint8) for k in range(FRAMES)]
  return schema.Record(
    media_id=media_id, duration=DURATION, frame_rate=FPS, height=24, width=32,
    frames=[tf.io.encode_jpeg(image, quality=100).numpy() for image in images],
  )  # fmt: skip


# (query word, choices as (video_uid, start, end), answer, types). video_uid spellings: the media
# id itself, the id without extension, the file name without extension (module docstring).
QUESTIONS = {
  'a': (WORDS[0], [('v0', 0.5, 1.5), ('media/test/v1.mp4', 1.1, 2.1), ('v2', 2.0, 3.0),
                   ('media/test/v3', 0.3, 0.9), ('w', 101.0, 102.5)], 2, 1),
  'b': (WORDS[1], [('v4', '0.4', '1.3'), ('v4', 1.55, 2.3), ('v4', 2.5, 3.4),
                   ('v4', 3.45, 4.3), ('v4', '0', '0.7')], '3', '2'),  # 4.3: past the end
  'c': (WORDS[2], [('v1', -0.5, 0.5), ('v1', 1.1, 2.1), ('v1', 2.6, 3.1), ('v1', 3.2, 3.9),
                   ('v1', 0.1, 3.7)], 0, 2),  # -0.5: read from 0
  'd': (WORDS[3], [('v0', 0.5, 1.5)] * 5, 4, 1),  # one clip five times: a tie, choice 0 chosen
}  # fmt: skip


def _questions_json(path, questions=QUESTIONS) -> str:
  return _dump(
    path,
    {
      key: _egomcq_item(text, clips, answer, types, video_dur='4.0')
      for key, (text, clips, answer, types) in questions.items()
    },
  )


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp('mcq')
  records = [_video_record(m, base) for m, base in VIDEOS.items()]
  _write(root / 'test' / 'a.tfrecord', records[0::2])
  _write(root / 'test' / 'b.tfrecord', records[1::2])
  return root


def _media_id(uid: str) -> str:
  for media_id in VIDEOS:
    base = media_id.split('#')[0]
    stem = base.rsplit('.', 1)[0]
    if uid in (base, stem, stem.rsplit('/', 1)[-1]):
      return media_id
  raise KeyError(uid)


def _expected_clip(uid: str, start: float, end: float, size: int, frames: int) -> np.ndarray:
  """The clip an independent reading of the records gives: record, frames at the middles of T
  equal parts of [start, end] (start clamped to 0), uniform grey, in [-1, 1]."""
  media_id = _media_id(uid)
  offset = WINDOW_START if '#t=' in media_id else 0.0
  start, end = max(float(start), 0.0) - offset, float(end) - offset
  times = start + (np.arange(frames) + 0.5) * (end - start) / frames
  position = times * FPS
  assert np.abs(position - np.round(position)).min() > 0.01  # no frame boundary in doubt
  index = np.clip(np.floor(position), 0, FRAMES - 1)
  grey = (VIDEOS[media_id] + 2 * index) / 255.0 * 2 - 1
  return np.broadcast_to(grey[:, None, None, None], (frames, size, size, 3)).astype(np.float32)


def _toy(shards, tokenizer):
  config = common.pretraining_config(toy_models.model_config('pair_scorer', with_space=True))
  config.data.path, config.data.tokenizer = str(shards), tokenizer
  return config, build_model(config.model)


def _eval_cfg(questions, **overrides):
  return ml_collections.ConfigDict(
    {
      'type': 'multiple_choice',
      'questions': questions,
      'split': 'test',
      'batch_size': 4,
      **overrides,
    }
  )


@pytest.mark.slow
def test_evaluator_scores_the_right_clips_of_every_question(shards, tokenizer_path, tmp_path):  # noqa: F811
  config, model = _toy(shards, tokenizer_path)
  evaluator = build_evaluator(
    _eval_cfg(_questions_json(tmp_path / 'egomcq.json'), use_score=True), config, model
  )
  frames, size, _, _ = model.inputs['video'].shape
  # 4 questions of 5 choices name 14 distinct clips: 'c' shares one with 'a', 'd' is a's first.
  assert evaluator.choice_clip.shape == (4, 5) and len(evaluator.clips) == 14
  assert evaluator.choice_clip[2, 1] == evaluator.choice_clip[0, 1]

  # A model whose text embedding of each query word is its answer clip's video embedding: cosine
  # 1 with the answer, less with any other clip (the video bias makes the clips' directions
  # differ), so every question but the tie is answered right — on the right clips only.
  batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in model.example_batch(2).items()}
  variables = model.init(jax.random.key(0), batch)
  params = jax.tree.map(np.array, variables['params'])  # writable copies
  params['video_proj']['bias'] = np.random.default_rng(1).normal(size=16).astype(np.float32)
  variables = {'params': params, 'batch_stats': {}}
  expected = {
    key: np.stack([_expected_clip(*c, size, frames) for c in clips])
    for key, (_, clips, _, _) in QUESTIONS.items()
  }
  embed_video = jax.jit(model.embed('video', ('joint',)))
  oracle_video = {k: np.asarray(embed_video(variables, v)['joint']) for k, v in expected.items()}
  ids = text_ops.Tokenizer(tokenizer_path).encode([q[0] for q in QUESTIONS.values()], 8)
  assert (ids[:, 0] > 0).all() and (ids[:, 1:] == 0).all() and len(set(ids[:, 0])) == 4
  for (key, (_, _, answer, _)), word in zip(QUESTIONS.items(), ids[:, 0], strict=True):
    params['words']['embedding'][word] = oracle_video[key][int(answer)]

  result = evaluator.run(variables)
  last = evaluator.last
  # The evaluator's clip of every choice is the independently decoded one.
  got_video = last['embeddings']['video'][evaluator.choice_clip]
  for q, key in enumerate(QUESTIONS):
    np.testing.assert_allclose(got_video[q], oracle_video[key], rtol=1e-5, atol=1e-5)
  cosine = np.stack([
    _unit(oracle_video[k]) @ _unit(oracle_video[k][int(a)]) for k, (_, _, a, _) in QUESTIONS.items()
  ])  # fmt: skip
  np.testing.assert_allclose(last['similarity'], cosine, atol=1e-6)
  assert result['accuracy'] == 75.0  # a, b, c right; d's tie picks choice 0, its answer is 4
  assert (result['inter_accuracy'], result['intra_accuracy']) == (50.0, 100.0)
  assert (result['inter_count'], result['intra_count'], result['chance']) == (2.0, 2.0, 20.0)

  # Pair score: the model's own pair head on the same clips and query ids.
  video_features = model.score.video(
    variables, jnp.asarray(np.concatenate(list(expected.values())))
  )
  text_features = model.score.text(variables, jnp.asarray(ids))
  pair = model.score.pairs(variables, video_features, jnp.repeat(text_features, 5, axis=0)).reshape(
    4, 5
  )
  np.testing.assert_allclose(last['pair_score'], pair, rtol=1e-5, atol=1e-6)
  answers = np.array([int(q[2]) for q in QUESTIONS.values()])
  types = np.array([int(q[3]) for q in QUESTIONS.values()])
  scored = _reference_accuracy(np.asarray(pair, np.float64), answers, types)
  for key in ('accuracy', 'inter_accuracy', 'intra_accuracy'):
    assert result[f'{key}_score'] == pytest.approx(scored[key])
  assert np.all(last['pair_score'][3] == last['pair_score'][3, 0])  # the tie, scored as a tie


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_unanswerable_questions_are_one_error_naming_the_file(shards, tokenizer_path, tmp_path):  # noqa: F811
  config, model = _toy(shards, tokenizer_path)
  questions = dict(QUESTIONS)
  # 'e' has two choices no record holds: one question, named once.
  questions['e'] = (WORDS[4], [('absent', 0, 1), ('gone', 0, 1)] + QUESTIONS['a'][1][2:], 0, 1)
  questions['f'] = (WORDS[5], QUESTIONS['a'][1][:4] + [('v3', 3.5, 5.5)], 0, 1)  # past the end
  questions['g'] = (
    WORDS[6],
    QUESTIONS['a'][1][:4] + [('w', 98.0, 99.0)],
    0,
    1,
  )  # before the window
  path = _questions_json(tmp_path / 'unanswerable.json', questions)
  with pytest.raises(ValueError) as error:
    build_evaluator(_eval_cfg(path), config, model)
  message = str(error.value)
  assert message.startswith(f'config evals questions={path}: of 7 questions, ')
  assert "1 name a video no record holds (question e ('absent'))" in message
  assert '2 have a clip outside its record (question f (' in message and ', g (' in message
  assert '\n' not in message
  # The same questions, one file too many with the same name: ambiguous, naming both.
  _write(shards / 'dup' / 'a.tfrecord', [_video_record(m, 10) for m in ('a/v0.mp4', 'b/v0.mp4')])
  with pytest.raises(ValueError, match="match more than one record .*'v0': 'a/v0.mp4', 'b/v0.mp4'"):
    build_evaluator(_eval_cfg(path, split='dup'), config, model)


def test_bad_eval_configs_are_refused(shards, tokenizer_path, tmp_path):  # noqa: F811
  config, model = _toy(shards, tokenizer_path)
  path = _questions_json(tmp_path / 'egomcq.json')
  with pytest.raises(ValueError, match='questions is empty'):
    build_evaluator(_eval_cfg(''), config, model)
  with pytest.raises(ValueError, match='max_questions >= 0'):
    build_evaluator(_eval_cfg(path, max_questions=-1), config, model)
  scorer_only = build_model(toy_models.model_config('pair_scorer'))
  with pytest.raises(ValueError, match='compares video and text embeddings at one level'):
    build_evaluator(_eval_cfg(path), config, scorer_only)
  dual = build_model(toy_models.model_config('bag_of_patches'))
  with pytest.raises(ValueError, match="use_score=True: model 'bag_of_patches' has no pair score"):
    build_evaluator(_eval_cfg(path, use_score=True), config, dual)
  evaluator = build_evaluator(_eval_cfg(path, max_questions=2), config, dual)
  assert evaluator.choice_clip.shape == (2, 5) and evaluator.texts == [WORDS[0], WORDS[1]]


@pytest.mark.slow  # the demo's media, converted by scripts/prepare_data.py (~15 s)
def test_the_demo_questions_are_answered_from_the_demo_shards(tmp_path, tokenizer_path):  # noqa: F811
  media, shards = tmp_path / 'media', tmp_path / 'shards'
  demo.generate(media, num_videos={'test': 5}, num_segments=(5, 5), size=32, workers=1,
                egomcq_splits=['test'])  # fmt: skip
  subprocess.run(
    [sys.executable, 'scripts/prepare_data.py', f'--manifest={media}/test.jsonl',
     f'--output_dir={shards}/test', '--num_shards=2', '--short_side=32', '--sample_rate=8000',
     '--workers=1'],
    cwd=ROOT, check=True, capture_output=True,
  )  # fmt: skip
  config = common.pretraining_config(toy_models.model_config())
  config.data.path, config.data.tokenizer = str(shards), tokenizer_path
  model = build_model(config.model)
  evaluator = build_evaluator(_eval_cfg(str(media / 'egomcq_test.json')), config, model)
  # Every segment is one inter- and one intra-video question's answer: 25 clips, each once.
  assert len(evaluator.clips) == 25 and evaluator.choice_clip.shape == (50, 5)
  batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in model.example_batch(2).items()}
  result = evaluator.run(model.init(jax.random.key(0), batch))
  assert (result['inter_count'], result['intra_count'], result['chance']) == (25, 25, 20)
  assert 0 <= result['inter_accuracy'] <= 100 and 0 <= result['intra_accuracy'] <= 100
  assert np.isfinite(evaluator.last['similarity']).all()


# ---- video-query questions (MSR-VTT style: a clip, C captions) -------------------------------------
def _reference_typed_accuracy(similarity, answer, types) -> dict:
  """Float64 loops over questions whose type is any hashable, None for none: overall accuracy,
  count, and per type present its accuracy and count."""
  hits = {}
  every = []
  for row, right, kind in zip(similarity.tolist(), answer.tolist(), types, strict=True):
    best = max(row)
    hit = min(j for j, s in enumerate(row) if s == best) == right
    every.append(hit)
    if kind is not None:
      hits.setdefault(kind, []).append(hit)
  out = {'accuracy': 100 * sum(every) / len(every), 'chance': 100 / similarity.shape[1]}
  for kind, kind_hits in hits.items():
    out[f'{kind}_accuracy'] = 100 * sum(kind_hits) / len(kind_hits)
    out[f'{kind}_count'] = len(kind_hits)
  return out


def test_accuracy_per_named_type_matches_a_float64_reference():
  rng = np.random.default_rng(3)
  kinds = ['direction', 'appearance', '7', None]
  for questions, choices in ((60, 4), (9, 5), (30, 2)):
    similarity = rng.integers(-2, 3, (questions, choices)).astype(np.float64) / 2  # many ties
    answer = rng.integers(0, choices, questions)
    types = [kinds[i] for i in rng.integers(0, 4, questions)]
    codes = {'direction': 0, 'appearance': 1, '7': 2, None: -1}
    names = {-1: None, 0: 'direction', 1: 'appearance', 2: '7'}
    got = mc.multiple_choice_accuracy(
      similarity, answer, np.array([codes[t] for t in types]), names
    )
    want = _reference_typed_accuracy(similarity, answer, types)
    assert got.keys() == want.keys()
    for key, value in want.items():
      np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)
    assert sum(got[f'{k}_count'] for k in kinds if k) == sum(t is not None for t in types)
  # A named type no question has: NaN accuracy, count 0 (as EgoMCQ's).
  absent = mc.multiple_choice_accuracy(
    np.eye(2), np.array([0, 0]), np.array([0, 0]), {0: 'a', 1: 'b'}
  )
  assert (absent['a_accuracy'], absent['b_count']) == (50.0, 0) and np.isnan(absent['b_accuracy'])
  with pytest.raises(ValueError, match=r'types must be in \[-1, 0\]'):
    mc.multiple_choice_accuracy(np.eye(2), np.array([0, 0]), np.array([0, 1]), {-1: None, 0: 'a'})
  with pytest.raises(ValueError, match='names must be distinct non-empty strings'):
    mc.multiple_choice_accuracy(np.eye(2), np.array([0, 0]), np.array([0, 1]), {0: 'a', 1: 'a'})


def _video_item(clip, captions, answer, types=None, **extra):
  uid, start, end = clip
  item = {
    'query': {'video_uid': uid, 'clip_start': start, 'clip_end': end},
    'choices': {str(i): {'clip_text': text} for i, text in enumerate(captions)},
    'answer': answer,
    **extra,
  }
  if types is not None:
    item['types'] = types
  return item


def test_video_query_format_loads_free_and_missing_types(tmp_path):
  path = _dump(
    tmp_path / 'mc.json',
    {
      'a': _video_item(('v0', '0.5', 1.5), ['red x', 'green', 'blue', 'cyan'], '2', 'direction'),
      'b': _video_item(('v1', 1, 2), ['red x', 'pink', 'gold', 'gray'], 0, 7, video_dur=4),
      'c': _video_item(('v1', 1, 2), ['red x', 'pink', 'gold', 'gray'], 1, ' 7 '),
      'd': _video_item(('v2', 0, 1), ['a', 'b', 'c', 'd'], 3),
    },
  )
  questions = mcq.read_questions(path)
  assert all(isinstance(q, mcq.VideoQuestion) for q in questions)
  a, b, c, d = questions
  assert a.clip == mcq.Clip('v0', 0.5, 1.5) and a.choices == ('red x', 'green', 'blue', 'cyan')
  assert (a.answer, a.kind) == (2, 'direction')
  assert b.kind == c.kind == '7' and d.kind is None  # 7 and " 7 " are one type; d has none
  # Choices as a list are the same choices.
  item = _video_item(('v0', 0.5, 1.5), ['red x', 'green', 'blue', 'cyan'], 2, 'direction')
  item['choices'] = list(item['choices'].values())
  assert mcq.read_questions(_dump(tmp_path / 'l.json', [item]))[0].choices == a.choices


def test_a_file_of_both_kinds_is_refused_naming_the_first_of_the_other(tmp_path):
  text_query = _egomcq_item('text', [('a', 1, 2)] * 4, 0, 1)
  video_query = _video_item(('a', 1, 2), ['w', 'x', 'y', 'z'], 0)
  path = _dump(tmp_path / 'mixed.json', {'t0': text_query, 't1': text_query, 'v7': video_query})
  with pytest.raises(ValueError) as error:
    mcq.read_questions(path)
  assert str(error.value) == (
    f"questions file {path}: question 'v7' asks with a video clip (its choices are captions), "
    "question 't0' with a text (its choices are video clips): a file holds questions of one kind "
    'only'
  )
  path = _dump(tmp_path / 'mixed2.json', {'v0': video_query, 't3': text_query, 't4': text_query})
  with pytest.raises(ValueError, match="question 't3' asks with a text .*question 'v0' with a vid"):
    mcq.read_questions(path)
  # max_questions reads only the first ones: one kind.
  assert len(mcq.read_questions(path, max_questions=1)) == 1


@pytest.mark.parametrize(
  'mutate, message',
  [
    (lambda q: q.pop('answer'), "question 'q7': missing field 'answer'"),
    (lambda q: q.pop('query'), "question 'q7': missing field 'query'"),
    (lambda q: q['query'].pop('clip_end'), "question 'q7': query: missing field 'clip_end'"),
    (lambda q: q['query'].update(clip_start='x'), r"question 'q7': query.clip_start: 'x' is not"),
    (
      lambda q: q['query'].update(video_uid=' '),
      "question 'q7': query.video_uid: ' ' is not a vid",
    ),
    (lambda q: q.update(answer=4), "question 'q7': answer 4 is not one of the 4 choices"),
    (lambda q: q['choices']['1'].update(clip_text='  '), r"choices\['1'\].clip_text: missing, em"),
    (lambda q: q['choices']['2'].update(clip_text=3), r"choices\['2'\].clip_text: missing, empty"),
    (lambda q: q['choices'].update({'1': 'x'}), r"choices\['1'\]: expected an object, got str"),
    (lambda q: q['choices'].update({'4': q['choices'].pop('3')}), 'choices must be keyed'),
    (lambda q: q.update(types=1.5), "question 'q7': types 1.5 is not a name"),
    (lambda q: q.update(types=True), "question 'q7': types True is not a name"),
    (lambda q: q.update(types=''), "question 'q7': types '' is not a name"),
  ],
)
def test_malformed_video_query_questions_name_the_file_and_question(tmp_path, mutate, message):
  good = _video_item(('a', 1, 2), ['w', 'x', 'y', 'z'], 0, 'direction')
  path = _dump(tmp_path / 'bad.json', {'q1': good, 'q7': _broken(good, mutate)})
  with pytest.raises(ValueError, match=message) as error:
    mcq.read_questions(path)
  assert f'questions file {path}' in str(error.value) and '\n' not in str(error.value)


# (query clip as (video_uid, start, end), captions, answer, types): each caption one word, so a
# caption's embedding is its word's.
VIDEO_QUESTIONS = {
  'p': (('v0', 0.5, 1.5), [WORDS[0], WORDS[1], WORDS[2], WORDS[3]], 1, 'direction'),
  'q': (('media/test/v2.mp4', 2.0, 3.0), [WORDS[2], WORDS[1], WORDS[4], WORDS[0]], 0, 'appearance'),
  'r': (('w', 101.0, 102.5), [WORDS[3], WORDS[5], WORDS[1], WORDS[2]], 1, 7),
  's': (('v0', 0.5, 1.5), [WORDS[0], WORDS[1], WORDS[6], WORDS[7]], 0, None),  # p's clip
  't': (('v4', '0.4', '1.3'), [WORDS[2], WORDS[6], WORDS[7], WORDS[3]], '2', 'direction'),
}  # fmt: skip
RIGHT_WORD = {'p': 1, 'q': 2, 'r': 5, 't': 7}  # WORDS index whose embedding is the clip's


@pytest.mark.slow
def test_video_query_evaluator_scores_the_clip_against_every_caption(
  shards,
  tokenizer_path,  # noqa: F811
  tmp_path,
):
  config, model = _toy(shards, tokenizer_path)
  path = _dump(
    tmp_path / 'mc.json',
    {key: _video_item(*question) for key, question in VIDEO_QUESTIONS.items()},
  )
  evaluator = build_evaluator(_eval_cfg(path, use_score=True), config, model)
  assert evaluator.video_query and len(evaluator.clips) == 4  # s asks about p's clip
  assert evaluator.query_clip[3] == evaluator.query_clip[0] and len(evaluator.texts) == 8
  frames, size, _, _ = model.inputs['video'].shape

  # Each question's right word embeds as its clip (cosine 1; s's right caption is not p's).
  batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in model.example_batch(2).items()}
  variables = model.init(jax.random.key(0), batch)
  params = jax.tree.map(np.array, variables['params'])
  params['video_proj']['bias'] = np.random.default_rng(1).normal(size=16).astype(np.float32)
  variables = {'params': params, 'batch_stats': {}}
  clips = np.stack([_expected_clip(*q[0], size, frames) for q in VIDEO_QUESTIONS.values()])
  oracle_video = np.asarray(jax.jit(model.embed('video', ('joint',)))(variables, clips)['joint'])
  tokenizer = text_ops.Tokenizer(tokenizer_path)
  word_ids = tokenizer.encode(WORDS, 8)
  assert (word_ids[:, 1:] == 0).all() and len(set(word_ids[:, 0])) == len(WORDS)
  for q, key in enumerate(VIDEO_QUESTIONS):
    if key in RIGHT_WORD:
      params['words']['embedding'][word_ids[RIGHT_WORD[key], 0]] = oracle_video[q]

  result = evaluator.run(variables)
  last = evaluator.last
  np.testing.assert_allclose(
    last['embeddings']['video'][evaluator.query_clip], oracle_video, rtol=1e-5, atol=1e-5
  )
  caption_ids = np.stack([tokenizer.encode(q[1], 8) for q in VIDEO_QUESTIONS.values()])  # [Q, C, W]
  caption_embedding = np.asarray(
    jax.jit(model.embed('text', ('joint',)))(variables, caption_ids.reshape(-1, 8))['joint']
  ).reshape(5, 4, -1)
  cosine = np.einsum('qd,qcd->qc', _unit(oracle_video), _unit(caption_embedding))
  np.testing.assert_allclose(last['similarity'], cosine, atol=1e-6)
  answers = np.array([int(q[2]) for q in VIDEO_QUESTIONS.values()])
  types = [None if q[3] is None else str(q[3]) for q in VIDEO_QUESTIONS.values()]
  want = _reference_typed_accuracy(cosine, answers, types)
  assert result.keys() == {*want, 'count', 'accuracy_score', 'direction_accuracy_score',
                           'appearance_accuracy_score', '7_accuracy_score'}  # fmt: skip
  for key, value in want.items():
    assert result[key] == pytest.approx(value), key
  # p, q, r, t right (their right caption embeds as their clip); s picks p's caption.
  assert (result['accuracy'], result['count'], result['chance']) == (80.0, 5, 25.0)
  assert (result['direction_count'], result['appearance_count'], result['7_count']) == (2, 1, 1)

  # Pair score: the model's pair head on the query clip and every caption.
  video_features = model.score.video(variables, jnp.asarray(clips))
  text_features = model.score.text(variables, jnp.asarray(caption_ids.reshape(-1, 8)))
  pair = model.score.pairs(variables, jnp.repeat(video_features, 4, axis=0), text_features)
  np.testing.assert_allclose(last['pair_score'], np.reshape(pair, (5, 4)), rtol=1e-5, atol=1e-6)
  scored = _reference_typed_accuracy(np.asarray(last['pair_score'], np.float64), answers, types)
  for key in ('accuracy', 'direction_accuracy', 'appearance_accuracy', '7_accuracy'):
    assert result[f'{key}_score'] == pytest.approx(scored[key])


def test_unanswerable_video_queries_are_one_error(shards, tokenizer_path, tmp_path):  # noqa: F811
  config, model = _toy(shards, tokenizer_path)
  questions = {key: _video_item(*question) for key, question in VIDEO_QUESTIONS.items()}
  questions['x'] = _video_item(('absent', 0, 1), WORDS[:4], 0)
  questions['y'] = _video_item(('v3', 3.5, 5.5), WORDS[:4], 0)  # past the end
  path = _dump(tmp_path / 'unanswerable.json', questions)
  with pytest.raises(ValueError) as error:
    build_evaluator(_eval_cfg(path), config, model)
  message = str(error.value)
  assert message.startswith(f'config evals questions={path}: of 7 questions, ')
  assert "1 name a video no record holds (question x ('absent'))" in message
  assert "1 have a clip outside its record (question y ('v3' 3.5–5.5 s; " in message
