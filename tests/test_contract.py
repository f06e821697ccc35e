"""The model contract: every registered model supplies it; a model registered from outside the
package trains, is evaluated and exports through it; retrieval by a joint pair score."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import data_pipelines
from tests.conftest import ROOT, load_config
from tests.test_pipeline import _record, _write, tokenizer_path  # noqa: F401 (a fixture)
from vatt_jax.evaluation import metrics, retrieval
from vatt_jax.models import MODELS, Model, build_model, contract

CONFIGS = {
  'vatt': ('configs/vatt_bbs.py', 'runlocal'),
  'vatt_agnostic': ('configs/vatt_ma_medium.py', 'runlocal'),
  'classifier': ('configs/finetune_kinetics.py', 'runlocal'),
  'norton': ('configs/norton_demo.py', 'runlocal'),
  'svitt': ('configs/svitt_ego_demo.py', 'runlocal'),
  'allinone': ('configs/allinone_demo.py', 'runlocal'),
}


def _config(name):
  if name in CONFIGS:
    return load_config(ROOT / CONFIGS[name][0], CONFIGS[name][1])
  config = load_config(ROOT / 'tests' / 'toy_config.py', 'pairs' if name == 'pair_scorer' else '')
  return config


def test_every_registered_model_is_covered():
  covered = {_config(name).model.name for name in [*CONFIGS, 'bag_of_patches', 'pair_scorer']}
  assert set(MODELS) <= covered, (
    f'registered models without a contract test: {set(MODELS) - covered}'
  )


def _random_batch(model, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  return {m: jnp.asarray(spec.random(rng, batch_size)) for m, spec in model.inputs.items()}


# The fast tier checks VATT's and the toy models'; SViTT-Ego's and All-in-one's (about a minute
# and 13 s on 2 cores: their pair scores compile the fusion encoders) run in the full suite.
_SLOW_CONTRACT = ('svitt', 'allinone')


@pytest.mark.parametrize(
  'name',
  [
    pytest.param(n, marks=pytest.mark.slow if n in _SLOW_CONTRACT else ())
    for n in [*CONFIGS, 'bag_of_patches', 'pair_scorer']
  ],
)
def test_model_supplies_the_contract(name):
  config = _config(name)
  model = build_model(config.model)
  assert isinstance(model, Model) and model.name == config.model.name
  example = model.example_batch(3)
  assert set(example) == set(model.inputs)
  for m, spec in model.inputs.items():
    assert example[m].shape == (3, *spec.shape) and example[m].dtype == jnp.dtype(spec.dtype)
  batch = _random_batch(model, 3)
  variables = model.init(jax.random.key(0), batch)
  assert jax.tree.leaves(variables['params'])
  abstract = contract.abstract_variables(model)
  assert jax.tree.structure(abstract['params']) == jax.tree.structure(variables['params'])
  for m, levels in model.embeddings.items():
    out = jax.jit(model.embed(m))(variables, batch[m])
    assert set(out) == set(levels)
    assert all(v.shape[0] == 3 and v.ndim == 2 and np.isfinite(v).all() for v in out.values())
  for m, levels in model.token_embeddings.items():
    out = model.embed(m, levels)(variables, batch[m])
    for level in levels:
      assert out[level].ndim == 3 and out[f'{level}_mask'].shape == out[level].shape[:2]
  for (a, b), level in model.spaces.items():
    assert level in model.embeddings[a] and level in model.embeddings[b]
  if model.num_classes:
    logits = model.classify()(variables, {m: batch[m] for m in model.inputs})
    assert logits.shape == (3, model.num_classes)
  if model.score is not None:
    v = jax.jit(model.score.video)(variables, batch['video'])
    t = jax.jit(model.score.text)(variables, batch['text'])
    assert jax.jit(model.score.pairs)(variables, v, t).shape == (3,)


@pytest.mark.parametrize('name', ['vatt', 'classifier', 'bag_of_patches'])
def test_objective_runs_on_a_training_batch(name):
  config = _config(name)
  config.data.name = 'synthetic'  # (runlocal's; the toy config names shards)
  model = build_model(config.model)
  source = data_pipelines.build(config.data, 'train', batch_size=4, seed=0)
  batch = {k: jnp.asarray(v) for k, v in next(source).items()}
  variables = model.init(jax.random.key(0), batch)
  loss, (terms, state) = jax.jit(model.objective(config.loss))(variables, batch, jax.random.key(1))
  assert np.isfinite(loss) and all(np.isfinite(v) for v in terms.values())
  assert jax.tree.structure(state.get('batch_stats', {})) == jax.tree.structure(
    variables.get('batch_stats', {})
  )


def test_a_loss_the_model_does_not_train_with_is_named():
  config = _config('classifier')
  with pytest.raises(ValueError, match=r"loss.name 'vatt' does not train model 'classifier'"):
    build_model(config.model).objective(ml_collections.ConfigDict(dict(name='vatt')))


def test_unknown_model_and_register_from_are_named():
  with pytest.raises(ValueError, match="model.name 'nope' is not one of"):
    build_model(ml_collections.ConfigDict(dict(name='nope')))
  cfg = ml_collections.ConfigDict(dict(name='x', register_from='tests.no_such_module'))
  with pytest.raises(ValueError, match='model.register_from'):
    build_model(cfg)


def test_load_by_name_keeps_resizes_and_names_the_problems():
  params = {'a': {'w': np.zeros((2, 3))}, 'head': {'w': np.ones(4)}}
  pretrained = {'a': {'w': np.full((2, 3), 7.0)}, 'other': {'w': np.zeros(1)}}
  loaded, report = contract.load_by_name(params, pretrained, keep_init=('head',))
  np.testing.assert_array_equal(loaded['a']['w'], 7.0)
  np.testing.assert_array_equal(loaded['head']['w'], 1.0)
  assert report['loaded'] == ['a/w'] and report['kept_init'] == ['head/w']
  assert report['unused'] == ['other']
  with pytest.raises(ValueError, match=r'a/w: checkpoint \(2, 2\), this model \(2, 3\)'):
    contract.load_by_name(params, {'a': {'w': np.zeros((2, 2))}}, keep_init=('head',))
  with pytest.raises(ValueError, match='head/w: not in the checkpoint'):
    contract.load_by_name(params, pretrained)
  problems = [f'p{i}' for i in range(11)]
  assert contract.describe_problems(problems).endswith('p7; … 3 more')


def test_check_variables_names_missing_extra_and_shapes():
  want = {
    'a': jax.ShapeDtypeStruct((2,), jnp.float32),
    'b': jax.ShapeDtypeStruct((1,), jnp.float32),
  }
  have = {'a': np.zeros(3, np.float32), 'c': np.zeros(1, np.float32)}
  with pytest.raises(ValueError) as e:
    contract.check_variables(have, want, 'X')
  message = str(e.value)
  assert 'b: missing' in message and 'c: not in this model' in message
  assert 'a: (3,) float32, the model wants (2,) float32' in message
  contract.check_variables({'a': np.zeros(2, np.float64)}, {'a': want['a']}, 'X')  # shapes only
  with pytest.raises(ValueError, match='float64'):
    contract.check_variables({'a': np.zeros(2, np.float64)}, {'a': want['a']}, 'X', dtypes=True)


# ---- retrieval by a pair score -------------------------------------------------------------------


def _reference_rerank(first, pair, candidates):
  """Ranks as positions: candidates by pair score (ties by index), then the rest by first score."""
  out = np.zeros(pair.shape)
  for q in range(pair.shape[0]):
    cand = sorted(np.flatnonzero(candidates[q]), key=lambda j: (-pair[q, j], j))
    rest = sorted(np.flatnonzero(~candidates[q]), key=lambda j: (-first[q, j], j))
    for position, j in enumerate(cand + rest):
      out[q, j] = -position
  return out


def test_rerank_and_top_k_against_a_reference():
  rng = np.random.default_rng(0)
  first, pair = rng.normal(size=(5, 9)), rng.normal(size=(5, 9))
  pair[0, :3] = pair[0, 3]  # ties among candidates go by index
  for k in (0, 1, 3, 9, 12):
    mask = retrieval.top_k_mask(first, k)
    expect = np.ones_like(mask) if k in (0, 9, 12) else None
    if expect is None:
      order = np.argsort(-first, axis=1, kind='stable')[:, :k]
      expect = np.zeros_like(mask)
      np.put_along_axis(expect, order, True, axis=1)
    np.testing.assert_array_equal(mask, expect)
    np.testing.assert_array_equal(
      retrieval.rerank(first, pair, mask), _reference_rerank(first, pair, mask)
    )


@pytest.fixture(scope='module')
def toy_shards(tmp_path_factory, tokenizer_path):  # noqa: F811
  """train / segments_train / segments_test record shards and the tokenizer (64 pieces)."""
  root = tmp_path_factory.mktemp('toy_shards')
  _write(root / 'train' / 'a.tfrecord', [_record(i) for i in range(8)])
  _write(root / 'segments_train' / 'a.tfrecord', [_record(i, static=True) for i in range(8, 17)])
  _write(root / 'segments_test' / 'a.tfrecord', [_record(i, static=True) for i in range(17, 23)])
  os.symlink(tokenizer_path, root / 'tokenizer.model')
  return root


def _f64(variables):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), variables['params'])


def _reference_pair_scores(params, clips, ids, patch):
  """float64 numpy: score[q, v] = mean over v's clips of w·tanh(W[f(clip); g(caption q)]) + b."""
  n, k, t, h, w, c = clips.shape
  x = clips.reshape(n, k, t, h // patch, patch, w // patch, patch, c).transpose(
    0, 1, 2, 3, 5, 4, 6, 7
  )
  x = x.reshape(n, k, -1, patch * patch * c)
  proj = params['video_proj']
  video = (x @ proj['kernel'] + proj['bias']).mean(2)  # [n, k, D]
  words = params['words']['embedding'][ids]  # [Q, W, D]
  mask = (ids > 0)[..., None]
  text = (words * mask).sum(1) / np.maximum(mask.sum(1), 1)  # [Q, D]
  fuse, out = params['fuse'], params['out']
  pairs = np.concatenate(
    [np.broadcast_to(video[None], (len(text), n, k, video.shape[-1])),
     np.broadcast_to(text[:, None, None], (len(text), n, k, text.shape[-1]))], -1,
  )  # fmt: skip
  score = np.tanh(pairs @ fuse['kernel'] + fuse['bias']) @ out['kernel'][:, 0] + out['bias'][0]
  return score.mean(-1), video.mean(1), text  # [Q, n], pooled video [n, D], text [Q, D]


@pytest.mark.parametrize('top_k', [0, 2])
def test_pair_scoring_model_is_ranked_by_its_pair_score(toy_shards, top_k, monkeypatch):
  """Every pair (k = 0, or a model without embeddings; the pairs in chunks of 2), and the top k
  by cosine re-ranked."""
  if not top_k:
    monkeypatch.setattr(retrieval, 'PAIR_CHUNK', 1)  # 1 batch of 4 rows / 2 clips: 2 pairs a chunk
  config = load_config(ROOT / 'tests' / 'toy_config.py', 'pairs')
  config.data.path = str(toy_shards)
  config.model.with_space = bool(top_k)
  model = build_model(config.model)
  eval_cfg = ml_collections.ConfigDict(
    dict(type='retrieval', split='segments_test', num_clips=2, batch_size=4, rerank_top_k=top_k)
  )
  variables = model.init(
    jax.random.key(3), {k: jnp.zeros(v.shape, v.dtype) for k, v in model.example_batch(2).items()}
  )
  evaluator = retrieval.RetrievalEvaluator(eval_cfg, config, model)
  got = evaluator.run(variables)
  e = evaluator.last['embeddings']
  source = data_pipelines.build(evaluator.data, 'segments_test', batch_size=4)
  clips = np.concatenate([b['video'] for b in source]).astype(np.float64)
  source.close()
  ids = evaluator.tokenizer.encode(e['texts'], config.model.text.max_words)
  pair, video, text = _reference_pair_scores(
    _f64(variables), clips, ids, config.model.video.patch_size
  )
  correct = e['correct']
  if top_k:
    cosine = _unit(text) @ _unit(video).T
    t2v = _reference_rerank(cosine, pair, retrieval.top_k_mask(cosine, top_k))
    v2t = _reference_rerank(cosine.T, pair.T, retrieval.top_k_mask(cosine.T, top_k))
    assert 'top 2 re-ranked' in evaluator.last['scoring']
  else:
    t2v, v2t = pair, pair.T
    assert evaluator.last['scoring'] == 'pair score of every pair'
  for name, s, c in (('t2v', t2v, correct), ('v2t', v2t, correct.T)):
    keep = c.any(1)
    want = metrics.retrieval_metrics(s[keep], correct=c[keep])
    for key in ('R1', 'R5', 'R10', 'MedR'):
      assert got[f'{name}/{key}'] == pytest.approx(want[key]), (name, key)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_cosine_retrieval_needs_a_common_space(toy_shards):
  config = load_config(ROOT / 'tests' / 'toy_config.py', 'pairs')
  config.data.path = str(toy_shards)
  eval_cfg = ml_collections.ConfigDict(
    dict(type='retrieval', split='segments_test', score='cosine')
  )
  with pytest.raises(ValueError, match='retrieval by cosine needs video and text embeddings'):
    retrieval.RetrievalEvaluator(eval_cfg, config, build_model(config.model))


def test_retrieval_captions_follow_split_folders(toy_shards):
  """The captions come from the folder the pipeline reads for the split (data.split_folders)."""
  config = load_config(ROOT / 'tests' / 'toy_config.py', 'pairs')
  config.data.path = str(toy_shards)
  model = build_model(config.model)
  direct = retrieval.RetrievalEvaluator(
    ml_collections.ConfigDict(dict(type='retrieval', split='segments_test')), config, model
  )
  config.data.split_folders = {'held_out': 'segments_test'}
  mapped = retrieval.RetrievalEvaluator(
    ml_collections.ConfigDict(dict(type='retrieval', split='held_out')), config, model
  )
  assert mapped.captions == direct.captions and len(direct.captions) == 6


# ---- a model from outside the package, through the unchanged scripts ------------------------------


def _run(*args):
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env)
  assert out.returncode == 0, f'{args[0]} failed:\n{out.stderr[-3000:]}'
  return out.stdout


@pytest.mark.slow
def test_a_registered_test_model_trains_reports_and_exports(toy_shards, tmp_path):
  run, export = tmp_path / 'run', tmp_path / 'export'
  _run('scripts/train.py', '--config=tests/toy_config.py', f'--workdir={run}',
       f'--config.data.path={toy_shards}')  # fmt: skip
  records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'loss_nce' in r] == [1, 2, 3]
  assert 0 <= records[-1]['linear_probe/top1'] <= 100 and records[-1]['retrieval/t2v/MedR'] >= 1
  _run('scripts/report.py', f'--workdir={run}')
  results = json.loads((run / 'results.json').read_text())
  for model in ('pretrained', 'random_init'):
    assert 0 <= results[model]['linear_probe']['top1'] <= 100
    assert results[model]['retrieval']['t2v']['queries'] > 0
  assert (run / 'plots' / 'tsne.png').read_bytes()[:4] == b'\x89PNG'
  # The standalone evaluation scripts, on the model's own level ('joint').
  _run('scripts/linear_probe.py', f'--workdir={run}', f'--data_path={toy_shards}',
       '--train_split=segments_train', '--test_split=segments_test', '--steps=20',
       '--num_clips=2', f'--output={tmp_path}/probe.json')  # fmt: skip
  probe = json.loads((tmp_path / 'probe.json').read_text())
  assert (
    probe['feature_dim'] == 16 and probe['top1'] == results['pretrained']['linear_probe']['top1']
  )
  _run('scripts/retrieval.py', f'--workdir={run}', f'--data_path={toy_shards}',
       '--split=segments_test', '--num_clips=2', '--batch_size=4', f'--output={tmp_path}/r.json')  # fmt: skip
  assert (
    json.loads((tmp_path / 'r.json').read_text())['t2v']
    == results['pretrained']['retrieval']['t2v']
  )
  _run('scripts/export.py', f'--workdir={run}', f'--output_dir={export}', '--platforms=cpu')
  report = json.loads((export / 'export.json').read_text())
  assert report['model'] == 'bag_of_patches' and report['parity']['passed']
  assert set(report['parity']['saved_model']) == {'video/joint', 'text/joint'}
  info = json.loads((export / 'bundle' / 'bundle.json').read_text())
  assert info['outputs'] == {'video': {'joint': 16}, 'text': {'joint': 16}}
