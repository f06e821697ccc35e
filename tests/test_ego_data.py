"""SViTT-Ego data: noun / verb tags in records and manifests, taxonomies, EgoClip manifests,
caption-anchored clips, scene negatives, and the synthetic source's EgoNCE fields."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

import data_pipelines
from data_pipelines import ingest, schema, taxonomy
from data_pipelines import text as text_ops
from data_pipelines.manifest import read_manifest
from data_pipelines.pretrain import ShardSource
from tests.conftest import ROOT, load_config
from tests.test_pipeline import WORDS, _write, tokenizer_path  # noqa: F401 (a fixture)
from vatt_jax.cli import UserError

FPS, DURATION = 4.0, 20.0  # stored: 80 frames
T = 4  # frames per clip
# Three captions far apart (frames 4–11, 36–43, 68–75): a clip's frames name their caption even
# under the ±32 brightness jitter (±16 frames); times 2, 10, 18 s.
SPANS = [(1.0, 3.0), (9.0, 11.0), (17.0, 19.0)]
WINDOW = 10.0  # scene negatives: caption 0 ↔ 1 ↔ 2, never 0 ↔ 2
NUM_NOUNS, NUM_VERBS = 8, 4


def _grey(index):
  return 36 + 2 * np.asarray(index)  # stored frame k is uniform grey 36 + 2k: its time, readable


def _nouns(j: int, r: int) -> tuple[int, ...]:
  return (j, 3 + r % 5)


def _record(r: int, which=(0, 1, 2), spans=SPANS, noun=None, verb=None) -> schema.Record:
  """Captions j in `which`, over spans[j]: text 'WORDS[j] WORDS[3 + r % 5]', nouns (j, 3 + r % 5),
  verbs (j,); stored out of time order, with an empty caption. `noun` / `verb` replace the first
  caption's tags."""
  frames = [
    tf.io.encode_jpeg(np.full((24, 32, 3), _grey(k), np.uint8), quality=100).numpy()
    for k in range(int(DURATION * FPS))
  ]
  captions = [
    schema.Caption(*spans[j], f'{WORDS[j]} {WORDS[3 + r % 5]}', _nouns(j, r), (j,)) for j in which
  ]
  if noun is not None:
    captions[0].nouns = noun
  if verb is not None:
    captions[0].verbs = verb
  captions = captions[::-1] + [schema.Caption(0.0, DURATION, '  ')]
  return schema.Record(
      media_id=f'v{r}.mp4', duration=DURATION, frame_rate=FPS, height=24, width=32, frames=frames,
      captions=captions,
  )  # fmt: skip


def _config(path, tokenizer, **overrides):
  cfg = dict(
      name='shards', path=str(path), tokenizer=tokenizer, fps=FPS, num_frames=T, frame_size=16,
      sample_rate=8000, num_samples=8000, max_words=4, num_narrations=2, vocab_size=128,
      shuffle_buffer=8, cycle_length=2, deterministic=True, on_bad_input='skip', eval_clips=2,
      crop_area_range=(0.08, 1.0), crop_aspect_range=(0.5, 2.0), modalities=('video', 'text'),
      num_nouns=NUM_NOUNS, num_verbs=NUM_VERBS, caption_clips=True, scene_negative_window=WINDOW,
  )  # fmt: skip
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp('ego')
  train = [_record(r) for r in range(6)]
  train += [_record(6, which=(1,))]  # one caption: no scene negative
  train += [_record(7, noun=(NUM_NOUNS,))]  # a noun class past the config: skipped, counted
  _write(root / 'train' / 'a.tfrecord', train[0::2])
  _write(root / 'train' / 'b.tfrecord', train[1::2])
  val = [
    _record(0),
    _record(1, noun=(NUM_NOUNS + 1,)),  # past num_nouns
    _record(2, verb=(NUM_VERBS,)),  # past num_verbs
    _record(3, which=()),  # only the empty caption: nothing to anchor a clip on
    _record(4, which=(0,), spans=[(2.0, 2.5)]),
  ]
  _write(root / 'val' / 'a.tfrecord', val)
  return root


def _value(video):
  """[-1, 1] frames → mean 0–255 grey per frame."""
  return ((video + 1) / 2 * 255).mean(axis=(-3, -2, -1))


def _hot(indices, size):
  hot = np.zeros(size, np.float32)
  hot[list(indices)] = 1
  return hot


def _caption_of(text: str) -> tuple[int, int]:
  """'green navy' → (caption 1, record r with 3 + r % 5 = 7)."""
  first, second = text.split()
  return WORDS.index(first), WORDS.index(second)


def _segments_fit(values, start, end, tol=1.0):
  """Whether uniform-grey frames `values` [T] are stored frames of [start, end), frame k in the
  k-th of T equal segments, all shifted by one brightness jitter |δ| ≤ 32 (float64 reference)."""
  lo, hi = -32.0 - tol, 32.0 + tol
  for k, value in enumerate(values):
    seg_start = start + k * (end - start) / T
    seg_end = start + (k + 1) * (end - start) / T
    first = np.floor(seg_start * FPS)
    last = np.ceil(seg_end * FPS) - 1  # the last frame shown before the segment ends
    lo = max(lo, value - _grey(last) - tol)
    hi = min(hi, value - _grey(first) + tol)
  return lo <= hi


# ---- the record format -------------------------------------------------------------------------
def test_tags_round_trip_and_untagged_records_parse():
  record = schema.Record(
    media_id='m', duration=3.0,
    captions=[schema.Caption(0, 1, 'a', (4, 2, 9), (1,)), schema.Caption(1, 2, 'b'),
              schema.Caption(2, 3, 'c', (), (0, 3))],
  )  # fmt: skip
  ex = schema.parse(schema.encode(record))
  np.testing.assert_array_equal(ex['caption_noun'], [[4, 2, 9], [-1, -1, -1], [-1, -1, -1]])
  np.testing.assert_array_equal(ex['caption_verb'], [[1, -1], [-1, -1], [0, 3]])
  # Untagged: no tag lists written (the bytes of before), read as [C, 0].
  plain = schema.Record(media_id='m', duration=2.0, captions=[schema.Caption(0, 1, 'a')] * 2)
  serialized = schema.encode(plain)
  lists = tf.train.SequenceExample.FromString(serialized).feature_lists.feature_list
  assert schema.CAPTION_NOUN not in lists and schema.CAPTION_VERB not in lists
  ex = schema.parse(serialized)
  assert ex['caption_noun'].shape == (2, 0) and ex['caption_verb'].shape == (2, 0)
  assert int(ex['version']) == schema.SCHEMA_VERSION == 2
  assert schema.parse(schema.encode(schema.Record('m', 1.0)))['caption_noun'].shape == (0, 0)
  with pytest.raises(ValueError, match='caption 0 has a negative noun'):
    schema.encode(schema.Record('m', 1.0, captions=[schema.Caption(0, 1, 'a', (-1,))]))


def test_tag_lists_of_another_length_fail_to_parse():
  example = tf.train.SequenceExample.FromString(
    schema.encode(schema.Record('m', 2.0, captions=[schema.Caption(0, 1, 'a', (1,))] * 2))
  )
  del example.feature_lists.feature_list[schema.CAPTION_NOUN].feature[1]
  with pytest.raises(tf.errors.InvalidArgumentError, match='caption/noun'):
    schema.parse(example.SerializeToString())


# ---- taxonomies --------------------------------------------------------------------------------
def _taxonomy(tmp_path, data, name='taxonomy.json'):
  path = tmp_path / name
  path.write_text(data if isinstance(data, str) else json.dumps(data))
  return str(path)


TAXONOMY = {
  'nouns': {
    'pan': ['frying pan', 'skillet'],
    'cutting board': ['chopping board'],
    'knife': [],
  },
  'verbs': {'cut': ['slice', 'chop'], 'pick up': ['grab'], 'put': []},
}


def test_taxonomy_tags_whole_words_and_phrases(tmp_path):
  tax = taxonomy.read_taxonomy(_taxonomy(tmp_path, TAXONOMY))
  assert (tax.num_nouns, tax.num_verbs) == (3, 3)
  assert tax.tag('#C C picks up a KNIFE') == ((2,), ())  # 'pick up' is not 'picks up'
  assert tax.tag('#C C Pick up the Frying-Pan.') == ((0,), (1,))  # case, punctuation
  assert tax.tag('slices bread on the cutting board') == ((1,), ())  # whole words only
  assert tax.tag('chop it on the chopping board with a knife, then cut') == ((1, 2), (0,))
  assert tax.tag('a pancake on a board') == ((), ())  # no partial words, no half phrases
  assert tax.tag('put the skillet down, grab it') == ((0,), (1, 2))
  assert tax.tag('') == ((), ())
  tagged = tax.tag_captions(
    [schema.Caption(0, 1, 'cut the pan'), schema.Caption(1, 2, 'cut the pan', (7,), ())]
  )
  assert (tagged[0].nouns, tagged[0].verbs) == ((0,), (0,))
  assert (tagged[1].nouns, tagged[1].verbs) == ((7,), ())  # already tagged: kept as given
  again = taxonomy.read_taxonomy(_taxonomy(tmp_path, tax.to_json(), 'copy.json'))
  assert again.nouns == tax.nouns and again.verbs == tax.verbs


@pytest.mark.parametrize(
  'data, match',
  [
    ('{"nouns": {', 'not a valid taxonomy'),
    ('[1, 2]', 'expected a JSON object'),
    ({'nouns': {}}, "missing 'verbs'"),
    ({'nouns': ['pan'], 'verbs': {}}, "'nouns' must map"),
    ({'nouns': {'pan': 'skillet'}, 'verbs': {}}, r"nouns\['pan'\]: expected a list"),
    ({'nouns': {'pan': ['--']}, 'verbs': {}}, "synonym '--' has no letter"),
    ({'nouns': {'': []}, 'verbs': {}}, 'class name has no letter'),
    ('{"nouns": {"pan": [], "pan": []}, "verbs": {}}', "class 'pan' appears twice"),
  ],
)
def test_malformed_taxonomy_is_refused_naming_the_file(tmp_path, data, match):
  path = _taxonomy(tmp_path, data)
  with pytest.raises(UserError, match=match) as error:
    taxonomy.read_taxonomy(path)
  assert path in str(error.value) and '\n' not in str(error.value)


# ---- manifests ---------------------------------------------------------------------------------
def test_jsonl_captions_carry_tags(tmp_path):
  rows = [
    {'media': 'a.mp4',
     'captions': [{'start': 0, 'end': 1, 'text': 'x', 'nouns': [3, 1], 'verbs': []}]},
    {'media': 'b.mp4', 'captions': [{'start': 0, 'end': 1, 'text': 'x', 'nouns': [-2]}]},
    {'media': 'c.mp4', 'captions': [{'start': 0, 'end': 1, 'text': 'x', 'verbs': 'cut'}]},
    {'media': 'd.mp4', 'captions': [{'start': 0, 'end': 1, 'text': 'x'}]},
  ]  # fmt: skip
  (tmp_path / 'm.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
  a, b, c, d = read_manifest(str(tmp_path / 'm.jsonl'))
  assert a.error is None and (a.captions[0].nouns, a.captions[0].verbs) == ((3, 1), ())
  assert 'captions[0].nouns: -2 is not a non-negative' in b.error
  assert 'captions[0].verbs: expected a list' in c.error
  assert (d.captions[0].nouns, d.captions[0].verbs) == ((), ())


EGOCLIP_HEADER = (
  'video_uid\tvideo_dur\tnarration_source\tnarration_ind\tnarration_time\tclip_start\tclip_end'
  '\tclip_text\ttag_verb\ttag_noun'
)


def _egoclip_line(uid, start, end, text, verbs='[]', nouns='[]', *, cells=None):
  # narration_time: ignored (the pipeline takes a caption's midpoint); any text will do here.
  cells = cells or [uid, '1000.0', 'narration_pass_1', '0', f'{end}', f'{start}', f'{end}', text,
                    verbs, nouns]  # fmt: skip
  return '\t'.join(cells)


def _egoclip(tmp_path, lines):
  path = tmp_path / 'egoclip.csv'
  path.write_text('\n'.join([EGOCLIP_HEADER, *lines]) + '\n')
  return str(path)


def test_egoclip_metadata_becomes_chunk_windows(tmp_path):
  media_root = tmp_path / 'videos'
  path = _egoclip(tmp_path, [
    _egoclip_line('A', 3.0, 4.0, '#C C cuts the onion', '[5]', '[192, 115]'),  # line 2
    _egoclip_line('A', 12.0, 13.5, '#C C puts the knife', '[1]', '[7]'),  # line 3: chunk 1
    _egoclip_line('B', 25.0, 26.0, '#O a man walks', '[2]', '[]'),  # line 4: chunk 2
    _egoclip_line('A', -0.3, 0.7, '#C C opens the tap', '[3]', '[4]'),  # line 5: starts at 0
    _egoclip_line('A', 'x', 4.0, 'bad start'),  # line 6
    _egoclip_line('A', 9.5, 10.8, '#C C holds the pan', '[0]', '[11, 12]'),  # line 7: chunk 0
    _egoclip_line('B', 2.0, 3.0, 'bad tags', '[1, x]'),  # line 8
    _egoclip_line('B', 5.0, 4.0, 'ends first'),  # line 9
    _egoclip_line('B', 0, 0, '', cells=['B', '1.0', 'x']),  # line 10: too few cells
    _egoclip_line('B', 30.0, 31.0, 'negative noun', '[1]', '[-4]'),  # line 11
  ])  # fmt: skip
  rows = read_manifest(path, media_root=str(media_root), egoclip_chunk_seconds=10)
  assert [r.index for r in rows] == list(range(len(rows)))
  good = [r for r in rows if r.error is None]
  assert [(r.media_id, r.line) for r in good] == [
    ('A.mp4#t=0,10.8', 2), ('A.mp4#t=10,13.5', 3), ('B.mp4#t=20,26', 4),
  ]  # fmt: skip
  assert good[0].path == str(media_root / 'A.mp4')
  # The converter moves captions to the window's clock; here they are still in the video's.
  first = good[0].captions
  assert [(c.start, c.end, c.text) for c in first] == [
    (0.0, 0.7, '#C C opens the tap'), (3.0, 4.0, '#C C cuts the onion'),
    (9.5, 10.8, '#C C holds the pan'),
  ]  # fmt: skip
  assert [(c.nouns, c.verbs) for c in first] == [((4,), (3,)), ((192, 115), (5,)), ((11, 12), (0,))]
  assert [(c.nouns, c.verbs) for c in good[2].captions] == [((), (2,))]
  errors = {r.line: r.error for r in rows if r.error}
  assert sorted(errors) == [6, 8, 9, 10, 11]
  assert "clip_start: 'x' is not a number" in errors[6]
  assert 'tag_verb' in errors[8] and 'clip_end 4 < clip_start 5' in errors[9]
  assert 'TAB-separated cells' in errors[10] and 'tag_noun: -4' in errors[11]
  assert all(e.startswith(f'{path} line ') for e in errors.values())
  # The other CSV format is not taken for EgoClip.
  (tmp_path / 'plain.csv').write_text('media,label\nx.mp4,1\n')
  assert read_manifest(str(tmp_path / 'plain.csv'))[0].media == 'x.mp4'


def test_egoclip_rows_that_fail_are_reported_and_taxonomy_copied(tmp_path):
  path = _egoclip(tmp_path, [
    _egoclip_line('A', 1.0, 2.0, '#C C cuts the pan'),
    _egoclip_line('A', 'x', 4.0, 'bad start'),
  ])  # fmt: skip
  tax = taxonomy.read_taxonomy(_taxonomy(tmp_path, TAXONOMY))
  out = tmp_path / 'out'
  summary = ingest.convert(
    path, str(out), 1, workers=1, progress=False, media_root=str(tmp_path), taxonomy=tax
  )
  assert (summary['rows'], summary['written'], summary['skipped']) == (2, 0, 2)
  report = [json.loads(line) for line in (out / 'report.jsonl').read_text().splitlines()]
  assert [r['line'] for r in report] == [2, 3]
  assert 'no such file' in report[0]['error'] and 'clip_start' in report[1]['error']
  assert taxonomy.stored_taxonomy(str(out)).nouns == tax.nouns
  assert summary['taxonomy']['nouns'] == 3
  # A resume with another chunk length or taxonomy would mix records read another way.
  with pytest.raises(ValueError, match='egoclip_chunk_seconds'):
    ingest.convert(path, str(out), 1, workers=1, progress=False, egoclip_chunk_seconds=60)
  with pytest.raises(ValueError, match='taxonomy_sha256'):
    ingest.convert(path, str(out), 1, workers=1, progress=False)


@pytest.mark.slow
def test_egoclip_to_records_end_to_end(tmp_path):
  """prepare_data.py on EgoClip metadata over a real 25 s video, with a taxonomy."""
  from tests.test_ingest import _write_video

  videos = tmp_path / 'videos'
  videos.mkdir()
  _write_video(videos / 'A.mp4', 25, 4, 16, 16, [(10 * s, 0, 0) for s in range(25)])
  path = _egoclip(tmp_path, [
    _egoclip_line('A', 2.0, 3.0, '#C C cut the pan', '[]', '[]'),  # tagged by the taxonomy
    _egoclip_line('A', 12.0, 14.0, '#C C slices bread', '[9]', '[]'),  # tagged: kept
    _egoclip_line('A', 21.0, 22.5, '#C C walks away'),  # no tags, no match: none
    _egoclip_line('A', 'x', 4.0, 'bad'),
  ])  # fmt: skip
  out = tmp_path / 'shards'
  result = subprocess.run(
    [sys.executable, str(ROOT / 'scripts' / 'prepare_data.py'), f'--manifest={path}',
     f'--output_dir={out}', '--num_shards=1', '--workers=1', '--fps=4', '--short_side=16',
     f'--media_root={videos}', f'--taxonomy={_taxonomy(tmp_path, TAXONOMY)}',
     '--egoclip_chunk_seconds=10'],
    capture_output=True, text=True,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  assert 'taxonomy: 3 noun and 3 verb classes' in result.stdout
  records = {}
  for serialized in tf.data.TFRecordDataset(str(out / 'shard-00000-of-00001.tfrecord')):
    ex = schema.parse(serialized)
    records[ex['media_id'].numpy().decode()] = ex
  assert sorted(records) == ['A.mp4#t=0,3', 'A.mp4#t=10,14', 'A.mp4#t=20,22.5']
  expected = {  # (start, end) on the window's clock, nouns, verbs
    'A.mp4#t=0,3': ((2.0, 3.0), [0], [0]),
    'A.mp4#t=10,14': ((2.0, 4.0), [], [9]),
    'A.mp4#t=20,22.5': ((1.0, 2.5), [], []),
  }
  for media_id, ((start, end), nouns, verbs) in expected.items():
    ex = records[media_id]
    np.testing.assert_allclose([ex['caption_start'][0], ex['caption_end'][0]], [start, end])
    assert [v for v in ex['caption_noun'].numpy()[0] if v >= 0] == nouns
    assert [v for v in ex['caption_verb'].numpy()[0] if v >= 0] == verbs
  report = (out / 'report.jsonl').read_text().splitlines()
  assert len(report) == 1 and '"line": 5' in report[0]
  bad = subprocess.run(
    [sys.executable, str(ROOT / 'scripts' / 'prepare_data.py'), f'--manifest={path}',
     f'--output_dir={tmp_path / "other"}', '--num_shards=1',
     f'--taxonomy={_taxonomy(tmp_path, {"nouns": {}}, "bad.json")}'],
    capture_output=True, text=True,
  )  # fmt: skip
  assert bad.returncode != 0 and "missing 'verbs'" in bad.stderr
  assert not (tmp_path / 'other').exists()  # refused before anything was written


# ---- the shard pipeline ------------------------------------------------------------------------
@pytest.mark.slow
def test_caption_clips_tags_and_scene_negatives(shards, tokenizer_path):  # noqa: F811
  tokenizer = text_ops.Tokenizer(tokenizer_path)
  source = data_pipelines.build(_config(shards, tokenizer_path), 'train', batch_size=4, seed=1)
  pairs, lonely = set(), 0
  for _ in range(4):  # two epochs of 7 usable records
    batch = next(source)
    assert batch['video'].shape == batch['neg_video'].shape == (4, T, 16, 16, 3)
    assert batch['text'].shape == batch['neg_text'].shape == (4, 2, 4)
    assert batch['noun'].shape == batch['neg_noun'].shape == (4, NUM_NOUNS)
    assert batch['verb'].shape == batch['neg_verb'].shape == (4, NUM_VERBS)
    for b in range(4):
      texts = tokenizer.decode(batch['text'][b])
      j, word = _caption_of(texts[0])
      r = word - 3  # the record's word is 3 + r % 5, and so are its tags
      np.testing.assert_array_equal(batch['noun'][b], _hot(_nouns(j, r), NUM_NOUNS))
      np.testing.assert_array_equal(batch['verb'][b], _hot([j], NUM_VERBS))
      values = _value(batch['video'][b])
      assert _segments_fit(values, *SPANS[j]), (j, values)
      if batch['neg_mask'][b] == 0:  # only the one-caption record has no caption within 10 s
        lonely += 1
        assert j == 1 and texts[1] == texts[0]  # its only caption, repeated for K = 2
        assert not batch['neg_video'][b].any() and not batch['neg_text'][b].any()
        assert not batch['neg_noun'][b].any() and not batch['neg_verb'][b].any()
        continue
      neg_texts = tokenizer.decode(batch['neg_text'][b])
      k, neg_word = _caption_of(neg_texts[0])
      assert neg_word == word and abs(k - j) == 1  # the same record, within ±10 s, not itself
      pairs.add((j, k))
      np.testing.assert_array_equal(batch['neg_noun'][b], _hot(_nouns(k, r), NUM_NOUNS))
      np.testing.assert_array_equal(batch['neg_verb'][b], _hot([k], NUM_VERBS))
      assert _segments_fit(_value(batch['neg_video'][b]), *SPANS[k])
      # K = 2: the caption, then the one nearest it in time order (the earlier on a tie).
      assert _caption_of(texts[1])[0] == {0: 1, 1: 0, 2: 1}[j]
      assert _caption_of(neg_texts[1])[0] == {0: 1, 1: 0, 2: 1}[k]
  assert lonely and pairs == {(0, 1), (1, 0), (1, 2), (2, 1)}  # every caption, every neighbour
  assert source.counts['noun_out_of_range'] >= 1  # record 7, once per epoch read
  assert source.counts['skipped_records'] == 0
  assert source.counts['empty_captions'] == 16  # one per emitted record


@pytest.mark.slow
def test_caption_clips_eval_takes_segment_centres_and_counts(shards, tokenizer_path):  # noqa: F811
  tokenizer = text_ops.Tokenizer(tokenizer_path)
  cfg = _config(shards, tokenizer_path, eval_crops=3, num_narrations=1)
  source = data_pipelines.build(cfg, 'val', batch_size=4, seed=0)
  (batch,) = list(source)
  assert [m.decode() for m in batch['media_id']] == ['v0.mp4', 'v4.mp4']
  assert batch['video'].shape == (2, 3, T, 16, 16, 3) and 'neg_video' not in batch
  for b, r in enumerate((0, 4)):
    j, _ = _caption_of(tokenizer.decode(batch['text'][b])[0])
    start, end = SPANS[j] if r == 0 else (2.0, 2.5)
    centres = start + (np.arange(T) + 0.5) * (end - start) / T
    expected = _grey(np.floor(centres * FPS))
    for crop in range(3):  # no jitter in evaluation: exactly the stored greys
      np.testing.assert_allclose(_value(batch['video'][b, crop]), expected, atol=1.5)
    nouns = _nouns(j, r) if r == 0 else _nouns(0, r)
    np.testing.assert_array_equal(batch['noun'][b], _hot(nouns, NUM_NOUNS))
  counts = source.counts
  reasons = ('noun_out_of_range', 'verb_out_of_range', 'no_captions')
  assert [counts[reason] for reason in reasons] == [1, 1, 1]
  assert counts['skipped_records'] == 0 and source.get_state()['position'] == 5
  fatal = _config(shards, tokenizer_path, on_bad_input='fatal')
  with pytest.raises(UserError, match=r'record v1\.mp4 has noun class 9, config data\.num_nouns=8'):
    list(data_pipelines.build(fatal, 'val', batch_size=4))


@pytest.mark.slow
def test_tags_of_the_first_narration_without_caption_clips(shards, tokenizer_path):  # noqa: F811
  tokenizer = text_ops.Tokenizer(tokenizer_path)
  cfg = _config(
    shards, tokenizer_path, caption_clips=False, scene_negative_window=0.0, num_narrations=2
  )
  source = data_pipelines.build(cfg, 'train', batch_size=8, seed=2)
  batch = next(source)
  assert set(batch) == {'video', 'video_mask', 'text', 'text_mask', 'label', 'noun', 'verb'}
  for b in range(8):
    j, word = _caption_of(tokenizer.decode(batch['text'][b])[0])
    np.testing.assert_array_equal(batch['noun'][b], _hot(_nouns(j, word - 3), NUM_NOUNS))
    np.testing.assert_array_equal(batch['verb'][b], _hot([j], NUM_VERBS))


@pytest.mark.slow
def test_deterministic_and_resumable(shards, tokenizer_path):  # noqa: F811
  cfg = _config(shards, tokenizer_path)
  a = data_pipelines.build(cfg, 'train', batch_size=4, seed=5)
  b = data_pipelines.build(cfg, 'train', batch_size=4, seed=5)
  for _ in range(3):  # crosses an epoch and the skipped record
    x, y = next(a), next(b)
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  state, expected = a.get_state(), next(a)
  c = data_pipelines.build(cfg, 'train', batch_size=4, seed=5)
  c.set_state(state)
  got = next(c)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])
  assert c.get_state() == a.get_state()
  other = next(data_pipelines.build(cfg, 'train', batch_size=4, seed=6))
  assert not np.array_equal(other['video'], expected['video'])


def test_config_and_taxonomy_checks(shards, tokenizer_path, tmp_path):  # noqa: F811
  def build(path=shards, **overrides):
    return ShardSource(_config(path, tokenizer_path, **overrides), 'train', batch_size=4)

  with pytest.raises(ValueError, match='scene_negative_window=10.0 needs data.caption_clips'):
    build(caption_clips=False)
  with pytest.raises(ValueError, match="caption_clips=True cuts no audio.*drop 'audio'"):
    build(modalities=('video', 'audio', 'text'))
  with pytest.raises(ValueError, match='data.num_nouns must be an integer >= 0'):
    build(num_nouns=-1)
  with pytest.raises(ValueError, match='data.scene_negative_window must be >= 0'):
    build(scene_negative_window=-1.0)
  # The converter's taxonomy copy beside the shards fixes the sizes.
  _write(tmp_path / 'train' / 'a.tfrecord', [_record(0)])
  (tmp_path / 'train' / 'taxonomy.json').write_text(json.dumps(TAXONOMY))
  with pytest.raises(UserError, match=r'has 3 nouns, config data\.num_nouns=8') as error:
    build(tmp_path)
  assert 'taxonomy.json' in str(error.value)
  with pytest.raises(UserError, match=r'has 3 verbs, config data\.num_verbs=4'):
    build(tmp_path, num_nouns=3)
  build(tmp_path, num_nouns=3, num_verbs=3)
  build(tmp_path, num_nouns=0, num_verbs=0, caption_clips=False, scene_negative_window=0.0)


def test_pretraining_config_defaults():
  data = load_config(ROOT / 'configs' / 'vatt_bbs.py').data
  defaults = (data.num_nouns, data.num_verbs, data.caption_clips, data.scene_negative_window)
  assert defaults == (0, 0, False, 0.0)


# ---- the synthetic source ----------------------------------------------------------------------
def _synthetic(batch_size=32, seed=0, **data):
  config = load_config(ROOT / 'configs' / 'demo_tiny.py')
  config.data.name = 'synthetic'
  config.data.update(data)
  return data_pipelines.build(config.data, 'train', batch_size=batch_size, seed=seed)


def test_synthetic_tags_follow_the_concept_and_negatives():
  options = dict(num_nouns=24, num_verbs=20, scene_negative_window=60.0)
  batch = next(_synthetic(**options))
  plain = next(_synthetic())
  for key in plain:  # the other fields do not depend on the new options
    np.testing.assert_array_equal(batch[key], plain[key])
  assert batch['noun'].shape == (32, 24) and batch['verb'].shape == (32, 20)
  assert batch['neg_video'].shape == batch['video'].shape
  assert batch['neg_text'].shape == batch['text'].shape and batch['neg_noun'].shape == (32, 24)
  assert set(np.unique(batch['noun'])) == {0.0, 1.0} and (batch['noun'].sum(1) >= 1).all()
  labels = batch['label']
  shares = (batch['noun'] @ batch['noun'].T > 0) & (batch['verb'] @ batch['verb'].T > 0)
  same = labels[:, None] == labels[None, :]
  assert shares[same].all()  # the same concept: a noun and a verb in common
  assert shares[~same].mean() < 0.2  # others mostly not
  assert (batch['noun'].sum(1) > 1).any()  # some extra tags
  mask = batch['neg_mask']
  assert set(np.unique(mask)) == {0.0, 1.0} and mask.mean() > 0.7
  for key in ('neg_video', 'neg_text', 'neg_noun', 'neg_verb'):
    assert not batch[key][mask == 0].any()
    assert batch[key][mask == 1].any()
  assert not np.array_equal(batch['neg_video'][mask == 1], batch['video'][mask == 1])
  again = _synthetic(**options)
  again.set_state({'step': 0})
  repeat = next(again)
  for key in batch:
    np.testing.assert_array_equal(repeat[key], batch[key])
  assert not np.array_equal(next(again)['noun'], batch['noun'])
