"""The demo dataset generator: real mp4s whose pictures, sounds and captions agree, and its noise."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import av
import numpy as np
import pytest

from data_pipelines import demo, demo_media, demo_noise, demo_questions, demo_vocab
from data_pipelines.manifest import read_manifest
from tests.conftest import ROOT

TINY = {'train': 3, 'val': 3, 'test': 3}
FPS, SIZE, SR = 10, 64, 48_000


def _rows(root: pathlib.Path, name: str) -> list[dict]:
  return [json.loads(line) for line in (root / name).read_text().splitlines()]


def _decode(path: pathlib.Path) -> dict:
  """frames [T, H, W, 3] uint8, audio [S] float32 mono, plus the streams' metadata."""
  with av.open(str(path)) as container:
    video, audio = container.streams.video[0], container.streams.audio[0]
    info = dict(
      video_codec=video.codec_context.name,
      pix_fmt=video.codec_context.pix_fmt,
      fps=float(video.average_rate),
      width=video.codec_context.width,
      height=video.codec_context.height,
      video_seconds=float(video.duration * video.time_base),
      audio_codec=audio.codec_context.name,
      sample_rate=audio.codec_context.sample_rate,
      channels=audio.codec_context.channels,
    )
    frames = np.stack([f.to_ndarray(format='rgb24') for f in container.decode(video=0)])
  with av.open(str(path)) as container:
    chunks = [f.to_ndarray() for f in container.decode(audio=0)]
  return dict(info, frames=frames, audio=np.concatenate(chunks, axis=1)[0])


def _words(text: str) -> set[str]:
  return set(re.findall(r'[a-z0-9]+', text.lower()))


def _spectrum(audio: np.ndarray, start: float, end: float) -> np.ndarray:
  """|FFT| at 1 Hz bins of the segment's middle (fades and AAC edges trimmed off)."""
  chunk = audio[int((start + 0.2) * SR) : int((end - 0.2) * SR)]
  return np.abs(np.fft.rfft(chunk * np.hanning(len(chunk)), n=SR))


def _assert_chord(spectrum: np.ndarray, digit: int) -> None:
  """The digit's three tones stand out, and beat every other digit's."""

  def level(f):
    return spectrum[f - 3 : f + 4].max()

  floor = np.median(spectrum[100:4000])
  for f in demo_media.DIGIT_TONES[digit]:
    assert level(f) > 30 * floor, (digit, f)
  scores = [sum(level(f) for f in tones) for tones in demo_media.DIGIT_TONES]
  assert int(np.argmax(scores)) == digit
  peak = 100 + int(np.argmax(spectrum[100:4000]))
  assert min(abs(peak - f) for f in demo_media.DIGIT_TONES[digit]) <= 3


@pytest.fixture(scope='module')
def clean(tmp_path_factory):
  root = tmp_path_factory.mktemp('clean')
  summary = demo.generate(root, num_videos=TINY, seed=0, workers=1)
  return root, summary


def test_media_are_h264_aac_mp4s(clean):
  root, _ = clean
  for split in demo_vocab.SPLITS:
    for row in _rows(root, f'{split}.jsonl'):
      media = _decode(root / row['media'])
      assert media['video_codec'] == 'h264' and media['pix_fmt'] == 'yuv420p'
      assert media['audio_codec'] == 'aac'
      assert media['fps'] == pytest.approx(FPS)
      assert media['frames'].shape == (round(row['duration'] * FPS), SIZE, SIZE, 3)
      assert media['width'] == media['height'] == SIZE
      assert media['video_seconds'] == pytest.approx(row['duration'], abs=0.11)
      assert media['sample_rate'] == SR and media['channels'] == 1
      # AAC pads the last frame of 1024 samples.
      assert 0 <= len(media['audio']) - row['duration'] * SR < 2048
      assert 5.4 <= row['duration'] <= 8.8  # 3–4 segments of 1.8–2.2 s


def test_manifests_and_captions(clean):
  root, summary = clean
  for split in demo_vocab.SPLITS:
    rows, pairs = _rows(root, f'{split}.jsonl'), _rows(root, f'retrieval_{split}.jsonl')
    assert len(rows) == TINY[split] == summary['splits'][split]['videos']
    assert len(pairs) == sum(len(r['segments']) for r in rows)
    for row in rows:
      assert row['media'] == f'media/{split}/{row["id"]}.mp4' and row['noise'] == {}
      segments, captions = row['segments'], row['captions']
      assert row['label'] == segments[0]['digit']
      assert 3 <= len(segments) == len(captions) <= 4
      # Segments tile the video; each caption spans its segment and names its digit and motion.
      assert segments[0]['start'] == 0 and segments[-1]['end'] == row['duration']
      for before, after in zip(segments, segments[1:], strict=False):
        assert before['end'] == after['start']
      for seg, cap in zip(segments, captions, strict=True):
        assert 0 <= cap['start'] < cap['end'] <= row['duration']
        assert (cap['start'], cap['end']) == (seg['start'], seg['end'])
        assert 1.7 < seg['end'] - seg['start'] < 2.3
        words = _words(cap['text'])
        assert {demo_vocab.DIGIT_WORDS[seg['digit']], str(seg['digit'])} & words, cap['text']
        others = {demo_vocab.DIGIT_WORDS[d] for d in range(10) if d != seg['digit']}
        assert not others & words
        direction = {'left': {'left', 'leftwards'}, 'right': {'right', 'rightwards'}}
        direction |= {'up': {'up', 'upwards', 'top'}, 'down': {'down', 'downwards', 'bottom'}}
        assert direction[seg['direction']] & words, cap['text']
    texts = [c['text'] for r in rows for c in r['captions']]
    assert [p['caption'] for p in pairs] == texts
    # The retrieval file is a manifest of windows: each row converts to one labelled segment.
    windows = read_manifest(str(root / f'retrieval_{split}.jsonl'))
    segments = [s for r in rows for s in r['segments']]
    assert [(w.start, w.end, w.labels) for w in windows] == [
      (s['start'], s['end'], (s['digit'],)) for s in segments
    ]
    assert [w.captions[0].text for w in windows] == texts and not any(w.error for w in windows)
  info = json.loads((root / 'dataset_info.json').read_text())
  assert info['seed'] == 0 and info['noise']['audio_swap'] == 0
  assert (root / 'README.txt').exists()


def test_audio_carries_the_digit_chord(clean):
  root, _ = clean
  for split in ('train', 'val'):
    for row in _rows(root, f'{split}.jsonl'):
      audio = _decode(root / row['media'])['audio']
      for seg in row['segments']:
        _assert_chord(_spectrum(audio, seg['start'], seg['end']), seg['digit'])


def test_digit_is_visible_and_moves_as_captioned(clean):
  root, _ = clean
  for split in ('train', 'test'):
    for row in _rows(root, f'{split}.jsonl'):
      frames = _decode(root / row['media'])['frames'].astype(np.float32)
      background = np.median(frames, axis=0)
      # The blob: pixels far from the video's median background that are also bright (the digit
      # is drawn near-white over a darker texture), which rules out ghosts left in the median.
      blob = (np.abs(frames - background).sum(-1) > 90) & (frames.mean(-1) > 160)
      for seg in row['segments']:
        first, last = round(seg['start'] * FPS), round(seg['end'] * FPS) - 1
        assert blob[first : last + 1].sum(axis=(1, 2)).min() > 40  # visible in every frame
        (y0, x0), (y1, x1) = (np.argwhere(blob[t]).mean(0) for t in (first, last))
        moved = {'left': x0 - x1, 'right': x1 - x0, 'up': y0 - y1, 'down': y1 - y0}
        across = abs(y1 - y0) if seg['direction'] in ('left', 'right') else abs(x1 - x0)
        assert moved[seg['direction']] > 15 and across < 4, (row['id'], seg)


def test_irrelevant_captions_and_audio_swap(tmp_path):
  noise = demo_noise.NoiseConfig(caption_irrelevant=1.0, audio_swap=1.0)
  summary = demo.generate(tmp_path, num_videos={'train': 3}, noise=noise, workers=1)
  rows = _rows(tmp_path, 'train.jsonl')
  by_media = {r['media']: r for r in rows}
  names = set(demo_vocab.DIGIT_WORDS) | {str(d) for d in range(10)} | {'digit', 'number'}
  for row in rows:
    assert row['noise']['caption_irrelevant'] == list(range(len(row['captions'])))
    for caption in row['captions']:
      assert not names & _words(caption['text']), caption['text']
    source = by_media[row['noise']['audio_swap']]
    assert source is not row
    # The track is the source's: its first chord is the source's first digit.
    audio = _decode(tmp_path / row['media'])['audio']
    first = source['segments'][0]
    _assert_chord(_spectrum(audio, first['start'], first['end']), first['digit'])
  applied = summary['splits']['train']['noise_applied']
  assert applied['audio_swap'] == 3
  assert applied['caption_irrelevant'] == sum(len(r['captions']) for r in rows)
  # Retrieval pairs keep the clean captions.
  assert all(names & _words(p['caption']) for p in _rows(tmp_path, 'retrieval_train.jsonl'))


def test_caption_shift_swap_and_exact_fractions():
  clean_rows = demo.plan({'train': 20}, seed=3)['train'][1]
  noise = demo_noise.NoiseConfig(caption_shift=1.0, caption_swap=1.0, caption_irrelevant=0.25)
  _, rows = demo.plan({'train': 20}, seed=3, noise=noise)['train']
  assert [r['segments'] for r in rows] == [r['segments'] for r in clean_rows]
  num_captions = sum(len(r['captions']) for r in rows)
  irrelevant = sum(len(r['noise'].get('caption_irrelevant', [])) for r in rows)
  assert irrelevant == round(0.25 * num_captions)
  for row, clean_row in zip(rows, clean_rows, strict=True):
    perm = row['noise']['caption_swap']
    assert sorted(perm) == list(range(len(perm))) and all(i != p for i, p in enumerate(perm))
    shifts = {s['index']: s['by'] for s in row['noise']['caption_shift']}
    assert sorted(shifts) == list(range(len(row['captions'])))
    for i, (cap, seg) in enumerate(zip(row['captions'], row['segments'], strict=True)):
      assert abs(shifts[i]) == pytest.approx(seg['end'] - seg['start'])
      assert cap['start'] == pytest.approx(seg['start'] + shifts[i])
      assert 0 <= cap['start'] < cap['end'] <= row['duration']
      if i not in row['noise'].get('caption_irrelevant', []):
        assert cap['text'] == clean_row['captions'][perm[i]]['text']


def test_same_seed_same_data_and_other_seed_differs(clean, tmp_path):
  root, _ = clean
  again = tmp_path / 'again'
  demo.generate(again, num_videos=TINY, seed=0, workers=2)  # also: workers don't matter
  for name in [f'{s}.jsonl' for s in demo_vocab.SPLITS] + [
    'retrieval_val.jsonl',
    'dataset_info.json',
  ]:
    assert (root / name).read_bytes() == (again / name).read_bytes(), name
  for row in _rows(root, 'val.jsonl'):
    a, b = _decode(root / row['media']), _decode(again / row['media'])
    np.testing.assert_array_equal(a['frames'], b['frames'])
    np.testing.assert_array_equal(a['audio'], b['audio'])
  other = tmp_path / 'other'
  demo.generate(other, num_videos={'train': 1}, seed=1, workers=1)
  assert _rows(other, 'train.jsonl')[0] != _rows(root, 'train.jsonl')[0]
  a, b = (_decode(r / 'media/train/train_00000.mp4') for r in (root, other))
  n = min(len(a['frames']), len(b['frames']))
  assert np.abs(a['frames'][:n].astype(int) - b['frames'][:n]).mean() > 5


@pytest.mark.parametrize(
  'kwargs, flag',
  [
    (dict(num_videos={'train': -1}), '--num_train'),
    (dict(num_videos={'val': 2.5}), '--num_val'),
    (dict(size=30), '--size'),
    (dict(workers=0), '--workers'),
    (dict(seed=-1), '--seed'),
  ],
)
def test_bad_arguments_name_the_flag(tmp_path, kwargs, flag):
  with pytest.raises(ValueError, match=flag):
    demo.generate(tmp_path, **kwargs)
  assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize('name', [f.name for f in dataclasses.fields(demo_noise.NoiseConfig)])
def test_noise_fractions_are_checked(name):
  with pytest.raises(ValueError, match=f'--{name}'):
    demo_noise.NoiseConfig(**{name: 1.5})
  with pytest.raises(ValueError, match=f'--{name}'):
    demo_noise.NoiseConfig(**{name: -0.1})


def test_script(tmp_path):
  script = [sys.executable, str(ROOT / 'scripts' / 'make_demo_data.py')]
  tiny = ['--num_train=2', '--num_val=0', '--num_test=0', '--workers=1']
  done = subprocess.run(
    [*script, f'--output_dir={tmp_path}', '--caption_swap=0.5', *tiny],
    capture_output=True,
    text=True,
    check=True,
  )
  assert 'train:    2 videos' in done.stdout and 'caption_swap' in done.stdout
  assert len(_rows(tmp_path, 'train.jsonl')) == 2 and _rows(tmp_path, 'val.jsonl') == []
  bad = subprocess.run(
    [*script, f'--output_dir={tmp_path}', '--audio_swap=2', *tiny], capture_output=True, text=True
  )
  assert bad.returncode != 0 and '--audio_swap' in bad.stderr


# ---- taxonomy, caption tags, EgoMCQ questions ------------------------------------------------------
def _tag(taxonomy: dict, text: str) -> tuple[list[int], list[int]]:
  """A tiny tagger: the classes one of whose names or synonyms is a whole phrase of the lower-case
  text."""
  padded = f' {" ".join(re.findall(r"[a-z0-9]+", text.lower()))} '
  return tuple(
    sorted(
      c
      for c, (name, synonyms) in enumerate(taxonomy[kind].items())
      if any(f' {phrase} ' in padded for phrase in (name, *synonyms))
    )
    for kind in ('nouns', 'verbs')
  )


def _project_tagger(taxonomy: dict, tmp_path: pathlib.Path):
  """data_pipelines.taxonomy's tagger on the written taxonomy, when that module exists."""
  try:
    from data_pipelines import taxonomy as taxonomy_module
  except ImportError:
    return None
  path = tmp_path / 'taxonomy.json'
  path.write_text(json.dumps(taxonomy))
  tagger = taxonomy_module.read_taxonomy(str(path))
  return lambda text: tuple(list(classes) for classes in tagger.tag(text))


def test_taxonomy_tags_every_clean_caption_with_its_digit_and_direction(tmp_path):
  taxonomy = demo_vocab.taxonomy()
  assert list(taxonomy['nouns']) == list(demo_vocab.DIGIT_WORDS)
  assert list(taxonomy['verbs']) == [f'move {d}' for d in demo_vocab.DIRECTIONS]
  taggers = [lambda text: _tag(taxonomy, text)]
  project = _project_tagger(taxonomy, tmp_path)
  taggers += [project] if project else []
  checked = 0
  for digit, word in enumerate(demo_vocab.DIGIT_WORDS):
    for d, direction in enumerate(demo_vocab.DIRECTIONS):
      for template in demo_vocab.TEMPLATES:  # every caption _caption can write
        for phrase in demo_vocab.DIRECTION_PHRASES[direction]:
          for verb, verbing in demo_vocab.VERBS:
            text = template.format(a='an' if digit == 8 else 'a', word=word, num=digit,
                                   verb=verb, verbing=verbing, dir=phrase)  # fmt: skip
            for tagger in taggers:
              assert tagger(text) == ([digit], [d]), text
            checked += 1
  assert checked == 10 * 4 * 6 * 3 * 4
  for text in demo_vocab.IRRELEVANT:
    assert all(tagger(text) == ([], []) for tagger in taggers), text


def test_caption_tags_are_the_classes_the_text_names():
  noise = demo_noise.NoiseConfig(caption_swap=1.0, caption_irrelevant=0.3, caption_shift=0.5)
  taxonomy = demo_vocab.taxonomy()
  clean_rows = demo.plan({'train': 12}, seed=4)['train'][1]
  for row in clean_rows:
    for caption, segment in zip(row['captions'], row['segments'], strict=True):
      assert caption['nouns'] == [segment['digit']]
      assert caption['verbs'] == [demo_vocab.DIRECTIONS.index(segment['direction'])]
  # Under noise the tags travel with the text (swapped) or vanish with it (irrelevant).
  rows = demo.plan({'train': 12}, seed=4, noise=noise)['train'][1]
  tags = [(c['nouns'], c['verbs']) for r in rows for c in r['captions']]
  assert tags == [_tag(taxonomy, c['text']) for r in rows for c in r['captions']]
  assert ([], []) in tags and any(r['noise']['caption_swap'] for r in rows)
  # Without tags: the same rows, without the two fields.
  bare = demo.plan({'train': 12}, seed=4, noise=noise, tags=False)['train'][1]
  for row in rows:
    for caption in row['captions']:
      del caption['nouns'], caption['verbs']
  assert bare == rows


def test_written_taxonomy_and_tags(clean):
  root, summary = clean
  assert json.loads((root / 'taxonomy.json').read_text()) == demo_vocab.taxonomy()
  assert summary['taxonomy'] == dict(file='taxonomy.json', nouns=10, verbs=4)
  assert 'taxonomy.json' in (root / 'README.txt').read_text()
  for split in demo_vocab.SPLITS:
    for pair in _rows(root, f'retrieval_{split}.jsonl'):
      (caption,) = pair['captions']
      assert (caption['nouns'], caption['verbs']) == (
        [pair['digit']],
        [demo_vocab.DIRECTIONS.index(pair['direction'])],
      )
    for row in _rows(root, f'{split}.jsonl'):
      assert all('nouns' in c and 'verbs' in c for c in row['captions'])
  assert not list(root.glob('egomcq_*.json'))  # only when asked for


def _check_egomcq(questions: dict, videos: list[dict]) -> None:
  """EgoMCQ's structure, and every clip is a segment of the video it names."""
  by_media = {v['media']: v for v in videos}
  segments = {(v['media'], s['start'], s['end']): s for v in videos for s in v['segments']}
  assert list(questions) == [str(i) for i in range(len(questions))]
  for q in questions.values():
    assert list(q['choices']) == ['0', '1', '2', '3', '4'] and 0 <= q['answer'] < 5
    clips = list(q['choices'].values())
    assert clips[q['answer']] == q['query']
    uids = {c['video_uid'] for c in clips}
    assert len(uids) == (5 if q['types'] == 1 else 1)
    if q['types'] == 2:
      assert uids == {q['query']['video_uid']}
      assert len({(c['clip_start'], c['clip_end']) for c in clips}) == 5
    said = (q['query']['tag_noun'], q['query']['tag_verb'])
    for i, clip in enumerate(clips):
      segment = segments[clip['video_uid'], clip['clip_start'], clip['clip_end']]
      assert clip['clip_text'] == segment['caption']
      assert clip['video_dur'] == by_media[clip['video_uid']]['duration']
      assert clip['tag_noun'] == f'[{segment["digit"]}]'
      assert clip['tag_verb'] == f'[{demo_vocab.DIRECTIONS.index(segment["direction"])}]'
      if i != q['answer']:  # one right answer: the others show something else
        assert (clip['tag_noun'], clip['tag_verb']) != said


def test_egomcq_questions_ask_about_every_segment(tmp_path):
  from vatt_jax.evaluation.mc_questions import read_questions

  videos = demo.plan({'test': 7}, seed=1, num_segments=(4, 6))['test'][0]
  questions = demo_questions.egomcq_questions(videos, seed=1, split='test')
  _check_egomcq(questions, videos)
  kinds = [q['types'] for q in questions.values()]
  assert kinds.count(1) == sum(len(v['segments']) for v in videos)
  assert kinds.count(2) == sum(len(v['segments']) for v in videos if len(v['segments']) >= 5)
  assert 0 < kinds.count(2) < kinds.count(1)  # the 4-segment videos ask no intra question
  assert len({q['answer'] for q in questions.values()}) == 5  # answers at every position
  assert demo_questions.egomcq_questions(videos, seed=1, split='test') == questions
  assert demo_questions.egomcq_questions(videos, seed=2, split='test') != questions
  # The evaluator reads the file as EgoMCQ's own.
  (tmp_path / 'egomcq.json').write_text(json.dumps(questions))
  loaded = read_questions(str(tmp_path / 'egomcq.json'))
  assert [(q.answer, q.kind, q.text) for q in loaded] == [
    (q['answer'], q['types'], q['query']['clip_text']) for q in questions.values()
  ]
  with pytest.raises(ValueError, match='--egomcq_splits=test: an inter-video question needs 5'):
    demo_questions.egomcq_questions(videos[:4], seed=1, split='test')


def test_script_writes_egomcq_questions_and_no_tags(tmp_path):
  script = [sys.executable, str(ROOT / 'scripts' / 'make_demo_data.py')]
  args = ['--num_train=0', '--num_val=0', '--num_test=5', '--segments=4,5', '--size=32',
          '--workers=1', '--egomcq_splits=test', '--notags']  # fmt: skip
  done = subprocess.run(
    [*script, f'--output_dir={tmp_path}', *args], capture_output=True, text=True, check=True
  )
  videos = demo.plan({'test': 5}, num_segments=(4, 5), tags=False)['test'][0]
  questions = json.loads((tmp_path / 'egomcq_test.json').read_text())
  assert questions == demo_questions.egomcq_questions(videos, seed=0, split='test', tags=False)
  inter = sum(len(v['segments']) for v in videos)
  intra = sum(len(v['segments']) for v in videos if len(v['segments']) >= 5)
  assert f'egomcq_test.json: {inter} inter-video, {intra} intra-video questions' in done.stdout
  info = json.loads((tmp_path / 'dataset_info.json').read_text())
  assert info['egomcq'] == {'test': {'inter': inter, 'intra': intra}} and 'taxonomy' not in info
  short = sum(len(v['segments']) < 5 for v in videos)
  readme = (tmp_path / 'README.txt').read_text()
  assert f'egomcq_test.json: {inter} inter-video and {intra} intra-video questions' in readme
  assert (f'{short} of its 5 videos have fewer than 5 segments' in readme) == (short > 0)
  # --notags: no taxonomy, no tag fields (the manifests as before tags existed).
  assert not (tmp_path / 'taxonomy.json').exists()
  assert all(set(c) == {'start', 'end', 'text'} for r in _rows(tmp_path, 'test.jsonl')
             for c in r['captions'])  # fmt: skip
  assert all('tag_noun' not in q['query'] for q in questions.values())
