"""A converted official checkpoint is a workdir every script takes (issue 16).

One tiny official-format VATT-BBS checkpoint (tests/official_vatt.py; square 32 × 32 frames) is
converted with scripts/convert_official.py into a workdir whose config reads toy record shards, with
a DMVR word vocabulary as its tokenizer (a sentencepiece model lies beside the shards, as a trap:
text must still be read with the run's words). The workdir then goes through the scripts as a user
would run them: retrieval.py, linear_probe.py, extract_embeddings.py, export.py, fine-tuning with
`init_from` (train.py) and resumed pretraining (train.py on a copy of the workdir).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest

from data_pipelines import text as text_ops
from tests import official_vatt as ov
from tests.test_ingest import RED, _write_video
from tests.test_official import ROOT, _cli_config_flags, official_config, write_official
from tests.test_pipeline import SAMPLE_RATE, WORDS, _record, _write
from vatt_jax import official_workdir
from vatt_jax import workdir as workdir_lib
from vatt_jax.models import build_model
from vatt_jax.optim import build_schedule

pytestmark = pytest.mark.slow

STEP = 500_000  # the official checkpoints' optimizer step (the converted workdir's step)
CAPTIONS = ['Red, GREEN!', 'navy gold blue', 'pink and gray']  # 'and' is not in the vocabulary


def _script(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
  """scripts/<name>.py as a user runs it (from the repository root); with `check`, fails the test
  on an error."""
  done = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'scripts', f'{name}.py'), *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, 'PYTHONPATH': ROOT},
  )
  if check:
    assert done.returncode == 0, f'{name}.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-5000:]}'
  return done


def _model_flags(ocfg) -> list[str]:
  """The tiny sizes, without the --config= line (_cli_config_flags)."""
  return [f for f in _cli_config_flags(ocfg) if not f.startswith('--config=')]


# A clip's audio lasts as long as its frames: the model's 2048 samples at the shards' 8 kHz are
# 0.256 s, the length of its 4 frames at 15.625 fps.
FPS = ov.TinyOfficial.frames / (ov.TinyOfficial.audio_samples / SAMPLE_RATE)


def _data_flags(shards) -> list[str]:
  """The toy shards: 8 kHz audio (what they store), clips as long as the model's audio, small
  buffers."""
  return [
    '--config.data.name=shards',
    f'--config.data.path={shards}',
    f'--config.data.sample_rate={SAMPLE_RATE}',
    f'--config.data.fps={FPS}',
    '--config.data.shuffle_buffer=8',
    '--config.data.cycle_length=2',
  ]


def _write_word_vocabulary(path, size: int) -> str:
  """A DMVR word vocabulary of `size` ids whose words cover the shards' captions (WORDS)."""
  words = ['<pad>', '<unk>', '<bos>', '<eos>', *WORDS]
  words += [f'w{i}' for i in range(size - len(words))]
  path.write_text('\n'.join(words) + '\n', encoding='utf-8')
  return str(path)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp('official_workdir')
  ocfg = official_config('bbs', height=32, width=32)
  weights, checkpoint = write_official(root / 'ckpt', 'bbs', ocfg, 21)
  shards = root / 'shards'
  _write(shards / 'train' / 'a.tfrecord', [_record(i) for i in range(8)])
  _write(shards / 'segments_train' / 'a.tfrecord', [_record(i, static=True) for i in range(8, 14)])
  _write(shards / 'segments_test' / 'a.tfrecord', [_record(i, static=True) for i in range(14, 20)])
  # A sentencepiece model beside the shards (where a run without a tokenizer would look): the
  # converted run's text is read with its word vocabulary all the same.
  corpus = [f'{a} {b}' for a in WORDS for b in WORDS] * 3
  made = text_ops.train_tokenizer(corpus, str(root / 'spm'), 40)
  shutil.copyfile(made, shards / 'tokenizer.model')
  vocab = _write_word_vocabulary(root / 'howto100m_en.txt', ocfg.vocab_size)
  workdir = root / 'run'
  done = subprocess.run(
    [sys.executable, os.path.join(ROOT, 'scripts', 'convert_official.py'),
     f'--checkpoint={checkpoint}', *_cli_config_flags(ocfg), *_data_flags(shards),
     f'--vocab={vocab}', f'--output_dir={workdir}'],
    cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': ROOT},
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  config, model, variables = workdir_lib.load_model(str(workdir))
  return types.SimpleNamespace(
    root=root, ocfg=ocfg, weights=weights, shards=shards, vocab=vocab, workdir=workdir,
    config=config, model=model, variables=jax.device_get(variables),
  )  # fmt: skip


def _text_ids(converted, captions) -> np.ndarray:
  """The captions as the official text path reads them: DMVR word ids of the vocabulary."""
  return text_ops.Tokenizer(converted.vocab).encode(captions, converted.ocfg.num_words)


def _official_text(converted, captions) -> dict[str, np.ndarray]:
  return official_workdir.embed(
    converted.model, converted.variables, {'text': _text_ids(converted, captions)}
  )


def test_the_workdir_reads_the_shards_with_the_word_vocabulary(converted):
  stored = json.loads((converted.workdir / 'config.json').read_text())
  assert stored['data']['name'] == 'shards' and stored['data']['path'] == str(converted.shards)
  assert stored['data']['sample_rate'] == SAMPLE_RATE
  assert converted.config.data.tokenizer == str(converted.workdir / 'tokenizer.model')
  tokenizer = text_ops.Tokenizer(converted.config.data.tokenizer)
  assert tokenizer.kind == text_ops.WORDS
  ids = _text_ids(converted, CAPTIONS)
  assert ids[0].tolist() == [4, 5, 0, 0, 0, 0, 0, 0]  # 'red green': punctuation and case dropped
  assert ids[2].tolist()[:3] == [8, 1, 10]  # 'pink <unk> gray'


def test_retrieval(converted, tmp_path):
  output = tmp_path / 'retrieval.json'
  done = _script(
    'retrieval', f'--workdir={converted.workdir}', f'--data_path={converted.shards}',
    '--split=segments_test', '--num_clips=2', '--batch_size=4', f'--output={output}',
  )  # fmt: skip
  report = json.loads(output.read_text())
  assert report['videos'] == 6 and report['model'] == f'{converted.workdir} step {STEP}'
  for direction in ('t2v', 'v2t'):
    for metric in ('R1', 'R5', 'R10', 'MedR', 'MeanR'):
      assert np.isfinite(report[direction][metric]), (direction, metric)
  assert 'R@1' in done.stdout

  # The evaluator as the script builds it reads the captions with the run's word vocabulary (not
  # the sentencepiece model beside the shards).
  from vatt_jax.evaluation.retrieval import RetrievalEvaluator, caption_queries, read_captions

  config = workdir_lib.run_config(str(converted.workdir))
  eval_cfg = ml_collections.ConfigDict(
    dict(type='retrieval', split='segments_test', num_clips=2, batch_size=4,
         data=dict(name='shards', path=str(converted.shards)))
  )  # fmt: skip
  evaluator = RetrievalEvaluator(eval_cfg, config, converted.model)
  assert evaluator.tokenizer.kind == text_ops.WORDS
  assert evaluator.tokenizer.model_path == str(converted.workdir / 'tokenizer.model')
  captions = read_captions(str(converted.shards), 'segments_test')
  texts, _ = caption_queries(sorted(captions), captions)
  ids = evaluator.tokenizer.encode(texts, evaluator.data.max_words)
  np.testing.assert_array_equal(ids, _text_ids(converted, texts))
  assert (ids[:, :2] >= 4).all() and (ids[:, 2:] == 0).all()  # two known words each, no <unk>


def test_linear_probe(converted, tmp_path):
  output = tmp_path / 'probe.json'
  done = _script(
    'linear_probe', f'--workdir={converted.workdir}', f'--data_path={converted.shards}',
    '--train_split=segments_train', '--test_split=segments_test', '--modality=video',
    '--steps=20', '--num_clips=1', '--batch_size=4', f'--cache_dir={tmp_path / "features"}',
    f'--output={output}',
  )  # fmt: skip
  report = json.loads(output.read_text())
  assert report['feature_dim'] == 64 and report['num_classes'] == 3  # the video tower's AGG
  assert report['train_examples'] == 6 and report['test_examples'] == 6
  assert 0.0 <= report['top1'] <= 100.0
  assert 'top-1' in done.stdout


def test_extract_embeddings(converted, tmp_path):
  _write_video(tmp_path / 'clip.mp4', 1, 10, 48, 64, [RED], audio_rate=16000, tone=440.0)
  (tmp_path / 'media.txt').write_text('clip.mp4\n')
  (tmp_path / 'captions.txt').write_text('\n'.join(CAPTIONS) + '\n')
  out = tmp_path / 'embeddings'
  _script(
    'extract_embeddings', f'--workdir={converted.workdir}', f'--media={tmp_path / "media.txt"}',
    f'--text={tmp_path / "captions.txt"}', f'--output_dir={out}', '--num_clips=2',
    '--short_side=32',
  )  # fmt: skip
  arrays = {p[: -len('.npy')]: np.load(out / p) for p in os.listdir(out) if p.endswith('.npy')}
  # The official model's seven outputs, named as the converter's --embed_outputs writes them
  # (and each tower's input embedding).
  assert sorted(arrays) == sorted([*ov.OUTPUTS, 'video_input', 'audio_input', 'text_input'])
  want = _official_text(converted, CAPTIONS)
  for name in ('text_agg', 'text_vt'):
    np.testing.assert_allclose(arrays[name], want[name], rtol=1e-5, atol=1e-6)
  dims = {'agg': 64, 'va': converted.ocfg.d_va, 'vt': converted.ocfg.d_vt}
  for name in ov.OUTPUTS:
    rows = len(CAPTIONS) if name.startswith('text') else 1  # the clip's video and audio
    assert arrays[name].shape == (rows, dims[name.split('_')[1]]), name
    assert np.isfinite(arrays[name]).all(), name


def test_export(converted, tmp_path):
  output = tmp_path / 'export'
  _script('export', f'--workdir={converted.workdir}', f'--output_dir={output}')
  report = json.loads((output / 'export.json').read_text())
  assert report['step'] == STEP and report['parity']['passed'], report.get('parity')
  bundle_info = json.loads((output / 'bundle' / 'bundle.json').read_text())
  assert bundle_info['preprocessing']['tokenizer'] == text_ops.WORDS
  assert (output / 'bundle' / 'tokenizer.model').read_bytes() == (
    converted.root / 'howto100m_en.txt'
  ).read_bytes()
  from vatt_jax import export

  bundle = export.load_bundle(str(output / 'bundle'))
  np.testing.assert_array_equal(bundle.tokenize(CAPTIONS), _text_ids(converted, CAPTIONS))
  got = bundle.text(CAPTIONS)
  want = _official_text(converted, CAPTIONS)
  np.testing.assert_allclose(np.asarray(got['vt']), want['text_vt'], rtol=1e-5, atol=1e-6)


def test_fine_tuning_from_the_workdir(converted, tmp_path):
  """configs/finetune_kinetics.py with the official tower (its position LayerNorm) fine-tunes the
  converted video tower; every tower parameter is loaded from the workdir."""
  workdir = tmp_path / 'finetune'
  done = _script(
    'train', '--config=configs/finetune_kinetics.py:runlocal', f'--workdir={workdir}',
    f'--config.init_from={converted.workdir}', '--config.model.position_layernorm=True',
    '--config.total_steps=2', '--config.checkpoint_steps=2',
  )  # fmt: skip
  loaded = re.search(
    rf'init_from {re.escape(str(converted.workdir))} step {STEP}: loaded (\d+) parameters '
    r'\(video_tower\); position tables resized: none; kept their initialisation: '
    r'classifier/bias, classifier/kernel; not used from the checkpoint: audio_tower, head, '
    r'text_tower',
    done.stderr,
  )
  assert loaded, done.stderr[-5000:]
  tower = converted.variables['params']['video_tower']
  assert int(loaded.group(1)) == len(jax.tree.leaves(tower))
  history = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  steps = [h for h in history if 'loss' in h]
  assert [h['step'] for h in steps] == [1, 2] and all(np.isfinite(h['loss']) for h in steps)

  # What init_from loads into that classifier: the converted tower, value for value (the
  # official position LayerNorm included).
  config = workdir_lib.read_config(str(workdir))
  model = build_model(config.model)
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), {'video': np.zeros((1, 4, 32, 32, 3), np.float32)})
  )
  params, report = model.load_pretrained(abstract['params'], converted.variables['params'])
  assert not report['resized'] and sorted(report['unused']) == ['audio_tower', 'head', 'text_tower']
  jax.tree.map(np.testing.assert_array_equal, params['video_tower'], tower)
  np.testing.assert_array_equal(
    params['video_tower']['tokenizer']['position_norm']['scale'],
    converted.weights['video']['pos_embedding_lookup/layernorm/gamma'],
  )


def test_fine_tuning_without_the_official_tower_options_is_refused(converted, config_loader):
  """A classifier without model.position_layernorm (configs/finetune_kinetics.py as it is) would
  silently drop the official tower's position LayerNorm: init_from refuses, naming it."""
  config = config_loader(os.path.join(ROOT, 'configs', 'finetune_kinetics.py'), 'runlocal')
  model = build_model(config.model)  # position_layernorm=False: not the official tower
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), {'video': np.zeros((1, 4, 32, 32, 3), np.float32)})
  )
  with pytest.raises(ValueError, match=r'video_tower/tokenizer/position_norm/bias: in the '
                     r'checkpoint, not in this model'):  # fmt: skip
    model.load_pretrained(abstract['params'], converted.variables['params'])


def _pretraining_flags(converted, workdir) -> list[str]:
  return [
    '--config=configs/vatt_bbs.py:runlocal,official',
    f'--workdir={workdir}',
    *_model_flags(converted.ocfg),
    *_data_flags(converted.shards),
    f'--config.data.tokenizer={workdir / "tokenizer.model"}',  # the run's copy (provenance)
    '--config.batch_size=4',
  ]


def test_resumed_pretraining(converted, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(converted.workdir, workdir)
  done = _script(
    'train', *_pretraining_flags(converted, workdir), f'--config.total_steps={STEP + 2}'
  )
  assert f'resumed from {workdir / "checkpoints"}/{STEP}' in done.stderr
  history = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  steps = [h for h in history if 'loss' in h]
  assert [h['step'] for h in steps] == [STEP + 1, STEP + 2]
  assert all(np.isfinite(h['loss']) for h in steps)
  assert workdir_lib.latest_step(str(workdir)) == STEP + 2
  # The schedule continues at the stored step (not from its warm-up at 0).
  config = workdir_lib.read_config(str(workdir))
  schedule = build_schedule(config.optimizer, STEP + 2)
  for h in steps:
    np.testing.assert_allclose(h['learning_rate'], float(schedule(h['step'] - 1)), rtol=1e-6)
  # The tower trained on from the converted values.
  _, _, variables = workdir_lib.load_model(str(workdir))
  before = converted.variables['params']['video_tower']['agg']
  after = np.asarray(variables['params']['video_tower']['agg'])
  assert after.shape == before.shape and not np.array_equal(after, before)

  # Without the run's tokenizer named, the shards' own (a sentencepiece model) would be read: the
  # resume is refused before anything is written.
  fresh = tmp_path / 'again'
  shutil.copytree(converted.workdir, fresh)
  flags = _pretraining_flags(converted, fresh)
  refused = _script('train', *[f for f in flags if 'data.tokenizer' not in f], check=False)
  assert refused.returncode == 1, refused.stderr[-3000:]
  assert 'is not the one this run started with' in refused.stderr.strip().splitlines()[-1]
  assert sorted(os.listdir(fresh)) == sorted(os.listdir(converted.workdir))

  # With the preset's total_steps (3, below the stored step) there is nothing to do.
  _script('train', *flags)
  assert workdir_lib.latest_step(str(fresh)) == STEP
  metrics = fresh / 'metrics.jsonl'
  assert not metrics.exists() or '"loss"' not in metrics.read_text()
