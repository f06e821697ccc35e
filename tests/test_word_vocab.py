"""Word-level vocabularies (DMVR's WordTokenizer, the official VATT text path) as a run's tokenizer:
the file format and its refusals, encoding against DMVR's rules, detection by content, tf.data,
and an export bundle whose tokenizer is a vocabulary."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines.text import SENTENCEPIECE, WORDS, Tokenizer, tokenizer_kind, train_tokenizer
from tests.conftest import ROOT, load_config
from vatt_jax import export
from vatt_jax.models import build_model

BASIC = ['<pad>', '<bos>', '<eos>', '<unk>']
WORD_LIST = ['a', 'cat', 'sat', 'on', 'the', 'mat', 'dont', 'café', 'naïve', 'x1', '42']

# Written here from DMVR's rules, independently of data_pipelines.text: RE2's [[:punct:]] (ASCII
# punctuation), tf.strings.lower (ASCII letters only), Unicode White_Space (ICU, as
# tensorflow_text.WhitespaceTokenizer splits).
ASCII_PUNCTUATION = set('!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~')
WHITE_SPACE = {chr(c) for c in [*range(0x9, 0xE), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                                0x2028, 0x2029, 0x202F, 0x205F, 0x3000]}  # fmt: skip


def expected(vocab: dict[str, int], text: str, length: int) -> list[int]:
  kept = ''.join(c for c in text if c not in ASCII_PUNCTUATION)
  lowered = ''.join(chr(ord(c) + 32) if 'A' <= c <= 'Z' else c for c in kept)
  words, word = [], ''
  for c in lowered + ' ':
    if c in WHITE_SPACE:
      if word:
        words.append(word)
      word = ''
    else:
      word += c
  ids = [vocab.get(w, vocab['<unk>']) for w in words][:length]
  return ids + [vocab['<pad>']] * (length - len(ids))


def write(path, lines: list[str]) -> str:
  path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
  return str(path)


@pytest.fixture
def plain(tmp_path):
  """'word' lines: ids are line indices."""
  words = BASIC + WORD_LIST
  return write(tmp_path / 'vocab.txt', words), {w: i for i, w in enumerate(words)}


@pytest.fixture
def indexed(tmp_path):
  """'id word' lines, ids out of order and with a gap (vocab_size = largest id + 1)."""
  ids = {'<pad>': 0, '<unk>': 1, '<bos>': 7, '<eos>': 8, 'cat': 3, 'the': 2, 'mat': 20, 'a': 5}
  return write(tmp_path / 'indexed.txt', [f'{i} {w}' for w, i in ids.items()]), ids


TEXTS = [
  'The cat sat on the mat.',
  "DON'T, the CAT!!",  # punctuation inside a word joins it; upper case folds
  'Café NAÏVE café naïve',  # only ASCII letters fold: 'CAFÉ' would stay unknown, 'NAÏVE' → 'naÏve'
  'a-cat_sat/on(the)mat',  # punctuation removed, not a separator: one unknown word
  '  \t\n a\u3000cat\u00a0sat\u2009on\u2028the\u0085mat\x0bx1  ',  # Unicode White_Space separates
  'a\u200bcat',  # a zero-width space is not White_Space: one word
  'x1 42 43 the',
  '',
  '   ',
  '!!!',
  'a a a a a a a a a a a a a a a a a a a a a cat',  # truncated
  'unknown words here',
  '<pad> <unk> <bos>',  # the basic tokens lose their brackets: unknown words
  'résumé — dash',  # '—' is not ASCII punctuation: a word of its own
]


@pytest.mark.parametrize('vocab_fixture', ['plain', 'indexed'])
@pytest.mark.parametrize('length', [1, 4, 16])
def test_encode_follows_dmvr(vocab_fixture, length, request):
  path, vocab = request.getfixturevalue(vocab_fixture)
  tokenizer = Tokenizer(path)
  assert tokenizer.kind == WORDS
  assert tokenizer.vocab_size == max(vocab.values()) + 1
  ids = tokenizer.encode(TEXTS, length)
  assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), length)
  for text, row in zip(TEXTS, ids, strict=True):
    assert row.tolist() == expected(vocab, text, length), text
  # bytes read as UTF-8, as the pipeline hands them over
  np.testing.assert_array_equal(tokenizer.encode([t.encode() for t in TEXTS], length), ids)


def test_encode_examples(plain):
  path, vocab = plain
  tokenizer = Tokenizer(path)
  ids = tokenizer.encode(['The CAT, sat!', "don't", 'CAFÉ', ''], 5)
  v = vocab
  assert ids.tolist() == [
    [v['the'], v['cat'], v['sat'], 0, 0],
    [v['dont'], 0, 0, 0, 0],
    [v['<unk>'], 0, 0, 0, 0],  # 'cafÉ' ≠ 'café': tf.strings.lower folds ASCII only
    [0, 0, 0, 0, 0],
  ]
  assert tokenizer.decode(ids) == ['the cat sat', 'dont', '<unk>', '']
  eos = v['<eos>']
  assert tokenizer.decode(np.array([v['a'], eos, v['cat'], 0])) == ['a']  # cut at <eos>, as DMVR


def test_blank_lines_are_skipped_but_keep_their_index(tmp_path):
  path = write(tmp_path / 'v.txt', BASIC + ['', 'cat', '  ', 'mat'])
  tokenizer = Tokenizer(path)
  assert tokenizer.encode(['cat mat'], 2).tolist() == [[5, 7]]
  assert tokenizer.vocab_size == 8


def test_crlf_and_byte_order_mark(tmp_path):
  path = tmp_path / 'v.txt'
  path.write_bytes('\ufeff'.encode() + '\r\n'.join(BASIC + ['cat']).encode())
  assert Tokenizer(str(path)).encode(['cat'], 1).tolist() == [[4]]


@pytest.mark.parametrize(
  'lines, message',
  [
    (BASIC + ['two words here'], r"line 5: .* neither 'word' nor 'id word'"),
    (BASIC + ['7\tcat'], r"line 5: .* neither 'word' nor 'id word'"),
    (BASIC + ['7  cat'], r"line 5: .* neither 'word' nor 'id word'"),
    (BASIC + ['x cat'], r"line 5: id 'x' is not a non-negative integer"),
    (BASIC + ['-3 cat'], r"line 5: id '-3' is not a non-negative integer"),
    (BASIC + ['Cat'], r"line 5: word 'Cat' is not lower case"),
    (BASIC + ['ÉTÉ'], r"line 5: word 'ÉTÉ' is not lower case"),
    (BASIC + ['cat', 'cat'], r"line 6: word 'cat' is already on line 5"),
    (BASIC + ['2 cat'], r'line 5: id 2 is already the id of line 3'),
    (['0 <pad>', '1 <bos>', '2 <eos>', '3 <unk>', 'cat', '4 mat'], r'line 6: id 4 is already'),
    (['<pad>', '<bos>', 'cat'], r'lacks the basic tokens <eos>, <unk>'),
    ([], r'lacks the basic tokens <pad>, <bos>, <eos>, <unk>'),
    (['<unk>', '<pad>', '<bos>', '<eos>'], r"line 2: '<pad>' has id 1, the models expect 0"),
  ],
)
def test_malformed_vocabularies(tmp_path, lines, message):
  path = write(tmp_path / 'bad.txt', lines)
  with pytest.raises(ValueError, match=message) as error:
    Tokenizer(path)
  assert str(error.value).startswith(path)
  assert '\n' not in str(error.value)


def test_not_utf8_names_the_line(tmp_path):
  path = tmp_path / 'latin1.txt'
  path.write_bytes('\n'.join(BASIC + ['cat', 'café']).encode('latin-1') + b'\n')
  assert tokenizer_kind(str(path)) == WORDS  # text, though not UTF-8: refused as a vocabulary
  with pytest.raises(ValueError, match=r'latin1.txt, line 6: not UTF-8'):
    Tokenizer(str(path))


def test_detection_by_content(tmp_path, plain):
  path, vocab = plain
  model = train_tokenizer(
    ['the cat sat on the mat', 'a dog ran in the park', 'seven drifts to the left'] * 3,
    str(tmp_path / 'spm'),
    vocab_size=32,
  )
  sp = Tokenizer(model)
  assert tokenizer_kind(model) == SENTENCEPIECE and sp.kind == SENTENCEPIECE
  assert sp.encode(['the cat'], 8).shape == (1, 8)
  # The workdir's and the bundle's copy is named tokenizer.model, whatever the kind.
  copy = tmp_path / 'run' / 'tokenizer.model'
  copy.parent.mkdir()
  shutil.copyfile(path, copy)
  words = Tokenizer(str(copy))
  assert words.kind == WORDS
  np.testing.assert_array_equal(words.encode(TEXTS, 6), Tokenizer(path).encode(TEXTS, 6))
  # ... and a sentencepiece model named like a vocabulary is still sentencepiece.
  renamed = tmp_path / 'vocab.txt'
  shutil.copyfile(model, renamed)
  assert Tokenizer(str(renamed)).kind == SENTENCEPIECE


def test_tf_encode_in_a_tf_data_map_equals_encode(plain):
  tokenizer = Tokenizer(plain[0])
  dataset = tf.data.Dataset.from_tensor_slices(TEXTS).batch(4)
  dataset = dataset.map(lambda t: tokenizer.tf_encode(t, 6), num_parallel_calls=2)
  got = np.concatenate([b.numpy() for b in dataset])
  np.testing.assert_array_equal(got, tokenizer.encode(TEXTS, 6))


@pytest.mark.slow
def test_export_bundle_round_trip_with_a_word_vocabulary(tmp_path, plain):
  path, vocab = plain
  config = load_config(ROOT / 'configs' / 'demo_tiny.py', 'runlocal')
  config.data.tokenizer = path
  model = build_model(config.model)
  example = {k: np.zeros(s.shape, s.dtype) for k, s in model.example_batch(1).items()}
  variables = jax.jit(lambda key: model.init(key, example))(jax.random.key(0))
  assert export.run_tokenizer_path(config) == path
  bundle = export.write_bundle(config, variables, str(tmp_path / 'out'), path)
  encoders = export.load_bundle(bundle)
  assert encoders.info['preprocessing']['tokenizer'] == WORDS
  assert 'word ids' in encoders.info['preprocessing']['text']
  max_words = model.inputs['text'].shape[0]
  want = np.array([expected(vocab, t, max_words) for t in TEXTS], np.int32)
  np.testing.assert_array_equal(encoders.tokenize(TEXTS), want)
  np.testing.assert_allclose(
    np.asarray(encoders.text(TEXTS)['vt']), np.asarray(encoders.text(want)['vt']), rtol=0, atol=0
  )


@pytest.mark.slow
def test_export_refuses_a_vocabulary_larger_than_the_model(tmp_path):
  path = write(tmp_path / 'big.txt', BASIC + ['5000 cat'])
  config = load_config(ROOT / 'configs' / 'demo_tiny.py', 'runlocal')
  model = build_model(config.model)
  example = {k: np.zeros(s.shape, s.dtype) for k, s in model.example_batch(1).items()}
  variables = jax.jit(lambda key: model.init(key, example))(jax.random.key(0))
  with pytest.raises(ValueError, match='has 5001 ids, more than the'):
    export.write_bundle(config, variables, str(tmp_path / 'out'), path)
