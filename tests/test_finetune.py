"""Fine-tuning: classification losses and mixup against float64 references, multi-view averaging,
evaluation crops, multi-label and image inputs, init_from a pretraining checkpoint, a short run."""

from __future__ import annotations

import functools
import importlib.util
import json
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import data_pipelines
from data_pipelines import schema
from data_pipelines import video as video_ops
from tests.conftest import ROOT, load_config
from vatt_jax import workdir as workdir_lib
from vatt_jax.evaluation import build_evaluator
from vatt_jax.evaluation.finetune import average_views
from vatt_jax.losses import build_loss
from vatt_jax.losses.classification import inverse_frequency_weights
from vatt_jax.models import build_model
from vatt_jax.models.vatt_pretrained import resize_positions
from vatt_jax.optim import build_optimizer
from vatt_jax.train import checkpoint as ckpt
from vatt_jax.train import init_from, sharding, trainer
from vatt_jax.train.augment import mixup, mixup_draw
from vatt_jax.train.state import init_train_state

# ---- losses and mixup ----------------------------------------------------------------------------


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize('seed', [0, 1])
def test_label_smoothed_cross_entropy_matches_reference(seed):
  rng = np.random.default_rng(seed)
  batch, classes, alpha = 12, 7, 0.1
  logits = rng.normal(0, 3, (batch, classes))
  label = rng.integers(0, classes, batch).astype(np.int32)
  label[[2, 5]] = -1  # no label: left out of the mean
  loss_fn = build_loss(ml_collections.ConfigDict(dict(name='softmax_xent', label_smoothing=alpha)))
  loss, terms = loss_fn({'logits': jnp.asarray(logits, jnp.float32)}, {'label': label})
  per_example = []
  for b in range(batch):
    if label[b] < 0:
      continue
    target = np.full(classes, alpha / classes)
    target[label[b]] += 1 - alpha
    per_example.append(-(target * _log_softmax(logits[b])).sum())
  np.testing.assert_allclose(float(loss), np.mean(per_example), rtol=1e-5)
  hits = [np.argmax(logits[b]) == label[b] for b in range(batch) if label[b] >= 0]
  np.testing.assert_allclose(float(terms['accuracy']), np.mean(hits), rtol=1e-6)
  # Soft (mixed) targets: -Σ s log p with s = (1 − α) y + α m / C, over the total mass.
  soft = rng.dirichlet(np.ones(classes), batch)
  loss, _ = loss_fn({'logits': jnp.asarray(logits, jnp.float32)}, {'label': soft})
  smoothed = (1 - alpha) * soft + alpha / classes
  expected = -(smoothed * _log_softmax(logits)).sum(-1).mean()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize('balance', ['none', 'inverse_frequency'])
def test_sigmoid_cross_entropy_matches_reference(balance):
  rng = np.random.default_rng(3)
  batch, classes = 10, 6
  logits = rng.normal(0, 2, (batch, classes))
  targets = (rng.random((batch, classes)) < 0.3).astype(np.float64)
  targets[4] = 0  # an example without labels
  loss_fn = build_loss(ml_collections.ConfigDict(dict(name='sigmoid_xent', balance=balance)))
  loss, _ = loss_fn({'logits': jnp.asarray(logits, jnp.float32)}, {'label': targets})
  p = 1 / (1 + np.exp(-logits))
  bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).sum(-1)
  if balance == 'inverse_frequency':
    weights = np.zeros(batch)
    for b in range(batch):
      labels = np.flatnonzero(targets[b])
      if labels.size:  # the mean over b's labels of 1 / (examples carrying that label)
        weights[b] = np.mean([1 / targets[:, c].sum() for c in labels])
    np.testing.assert_allclose(np.asarray(inverse_frequency_weights(targets)), weights, rtol=1e-6)
    bce = bce * weights
  np.testing.assert_allclose(float(loss), bce.mean(), rtol=1e-5)


def test_mixup_is_the_convex_combination_of_inputs_and_targets():
  rng = np.random.default_rng(0)
  batch = {
    'audio': rng.normal(size=(8, 50)).astype(np.float32),
    'label': rng.integers(0, 5, 8).astype(np.int32),
    'audio_mask': np.ones(8, np.float32),
  }
  key = jax.random.key(7)
  mix = jax.jit(functools.partial(mixup, alpha=5.0, keys=('audio',), num_classes=5))
  out = mix(batch, key)
  lam, partner = (np.asarray(x) for x in mixup_draw(key, 8, 5.0))
  assert sorted(partner) == list(range(8)) and ((0 < lam) & (lam < 1)).all()
  x = batch['audio'].astype(np.float64)
  expected = lam[:, None] * x + (1 - lam[:, None]) * x[partner]
  np.testing.assert_allclose(np.asarray(out['audio']), expected, rtol=1e-5, atol=1e-6)
  y = np.eye(5)[batch['label']]
  expected_y = lam[:, None] * y + (1 - lam[:, None]) * y[partner]
  np.testing.assert_allclose(np.asarray(out['label']), expected_y, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(out['audio_mask']), batch['audio_mask'])
  # Multi-hot targets are mixed the same way.
  hot = (rng.random((8, 5)) < 0.4).astype(np.float32)
  out = mix(dict(batch, label=hot), key)
  expected_y = lam[:, None] * hot + (1 - lam[:, None]) * hot[partner]
  np.testing.assert_allclose(np.asarray(out['label']), expected_y, rtol=1e-5, atol=1e-7)


def test_mixup_lambda_follows_beta_5_5():
  lam = np.asarray(mixup_draw(jax.random.key(0), 20_000, 5.0)[0], np.float64)
  # Beta(5, 5): mean 1/2, variance 1 / (4 (2α + 1)) = 1/44.
  assert abs(lam.mean() - 0.5) < 0.005
  assert abs(lam.var() - 1 / 44) < 0.001
  assert stats.kstest(lam, stats.beta(5, 5).cdf).pvalue > 1e-3


# ---- multi-view evaluation and crops -------------------------------------------------------------


def test_average_views_is_the_mean_over_views():
  logits = np.random.default_rng(1).normal(size=(3, 12, 5))
  np.testing.assert_allclose(np.asarray(average_views(jnp.asarray(logits))), logits.mean(1), 1e-6)
  with pytest.raises(ValueError, match='B, V, C'):
    average_views(jnp.zeros((3, 5)))


def test_eval_windows_spread_over_the_long_side():
  def windows(h, w, n):
    return np.asarray(video_ops.eval_windows(tf.constant([h, w, 3]), n)).tolist()

  assert windows(48, 64, 3) == [[0, 0, 48, 48], [0, 8, 48, 48], [0, 16, 48, 48]]
  assert windows(64, 48, 3) == [[0, 0, 48, 48], [8, 0, 48, 48], [16, 0, 48, 48]]
  assert windows(48, 65, 1) == [[0, 8, 48, 48]]  # the central square, as before
  assert windows(32, 32, 2) == [[0, 0, 32, 32], [0, 0, 32, 32]]
  with pytest.raises(ValueError, match='eval_crops'):
    windows(48, 64, 0)


FPS, DURATION, HEIGHT, WIDTH = 5.0, 2.0, 48, 64


def _ramp_record(i: int, labels=(1,)) -> schema.Record:
  """Frames whose grey level is 2·x + 12·k at column x of stored frame k: position readable."""
  frames = []
  for k in range(int(DURATION * FPS)):
    row = 2 * np.arange(WIDTH) + 12 * k
    image = np.broadcast_to(row[None, :, None], (HEIGHT, WIDTH, 3)).astype(np.uint8)
    frames.append(tf.io.encode_jpeg(image, quality=100).numpy())
  return schema.Record(
      media_id=f'r{i}', duration=DURATION, frame_rate=FPS, frames=frames, height=HEIGHT,
      width=WIDTH, labels=list(labels),
  )  # fmt: skip


@pytest.fixture(scope='module')
def ramp_shards(tmp_path_factory):
  root = tmp_path_factory.mktemp('ramps')
  for split, labels in (('train', [(1,), (2, 4), ()]), ('test', [(3,), (0, 2), ()])):
    (root / split).mkdir()
    with tf.io.TFRecordWriter(str(root / split / 'a.tfrecord')) as writer:
      for i, label in enumerate(labels):
        writer.write(schema.encode(_ramp_record(i, label)))
  return root


def _shard_config(path, **overrides):
  cfg = dict(
      name='shards', path=str(path), tokenizer='', fps=10.0, num_frames=8, frame_size=HEIGHT,
      sample_rate=8000, num_samples=6400, max_words=4, num_narrations=1, vocab_size=64,
      shuffle_buffer=4, cycle_length=1, deterministic=True, on_bad_input='fatal', eval_clips=2,
      eval_crops=3, crop_area_range=(0.5, 1.0), crop_aspect_range=(0.8, 1.25),
      modalities=('video',),
  )  # fmt: skip
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def test_eval_views_are_clips_times_crops_clip_major(ramp_shards):
  batch = next(data_pipelines.build(_shard_config(ramp_shards), 'test', batch_size=3))
  assert set(batch) == {'video', 'video_mask', 'label', 'media_id'}  # no audio, text, tokenizer
  assert batch['video'].shape == (3, 6, 8, HEIGHT, HEIGHT, 3)
  starts = np.linspace(0, DURATION - 0.8, 2)
  for view in range(6):
    clip, crop = divmod(view, 3)  # clip-major: the 3 crops of clip 0, then those of clip 1
    for k in (0, 7):
      stored = np.floor((starts[clip] + k / 10) * FPS + 1e-3)
      columns = (batch['video'][0, view, k] + 1) / 2 * 255  # [S, S, 3]
      expected = 2 * (8 * crop + np.arange(HEIGHT)) + 12 * stored  # crops start at x = 0, 8, 16
      np.testing.assert_allclose(columns.mean(axis=(0, 2)), expected, atol=3.0)


def test_multi_label_records_give_multi_hot_targets(ramp_shards):
  cfg = _shard_config(ramp_shards, multi_label=True, num_classes=5, eval_crops=1)
  batch = next(data_pipelines.build(cfg, 'test', batch_size=3))
  np.testing.assert_array_equal(batch['label'], [[0, 0, 0, 1, 0], [1, 0, 1, 0, 0], [0] * 5])
  single = next(data_pipelines.build(_shard_config(ramp_shards), 'test', batch_size=3))
  np.testing.assert_array_equal(single['label'], [3, 0, -1])  # the first label, or -1
  with pytest.raises(ValueError, match='num_classes'):
    data_pipelines.build(_shard_config(ramp_shards, multi_label=True), 'test', batch_size=3)
  with pytest.raises(ValueError, match='eval_crops'):
    data_pipelines.build(_shard_config(ramp_shards, eval_crops=0), 'test', batch_size=3)


def test_images_become_clips_of_one_repeated_frame():
  import tensorflow_datasets as tfds

  cfg = ml_collections.ConfigDict(dict(
      name='tfds', tfds_name='imagenet2012', modality='image', image_key='image',
      label_key='label', num_frames=4, frame_size=32, shuffle_buffer=4, deterministic=True,
      eval_clips=1, eval_crops=3,
  ))  # fmt: skip
  with tfds.testing.mock_data(num_examples=4):
    train = next(data_pipelines.build(cfg, 'train', batch_size=2, seed=0))
    test = next(data_pipelines.build(cfg, 'validation', batch_size=2, seed=0))
  assert train['video'].shape == (2, 4, 32, 32, 3) and test['video'].shape == (2, 3, 4, 32, 32, 3)
  np.testing.assert_array_equal(train['video'], np.repeat(train['video'][:, :1], 4, axis=1))
  np.testing.assert_array_equal(test['video'], np.repeat(test['video'][:, :, :1], 4, axis=2))
  assert -1 <= train['video'].min() and train['video'].max() <= 1


# ---- the classifier, init_from and a run ---------------------------------------------------------


def _pretraining_workdir(
  path, config_file: str = 'vatt_bbs.py', edit=None
) -> ml_collections.ConfigDict:
  """A pretraining run's workdir (config.json + one checkpoint) without training: init, save.
  `edit(state) -> state` changes the state before it is saved."""
  config = load_config(ROOT / 'configs' / config_file, 'runlocal')
  model = build_model(config.model)
  tx, _ = build_optimizer(config.optimizer, config.total_steps)
  batch = next(data_pipelines.build(config.data, 'train', batch_size=2))
  state = jax.jit(lambda key: init_train_state(model, tx, batch, key))(jax.random.key(11))
  if edit is not None:
    state = edit(state)
  path.mkdir(parents=True, exist_ok=True)
  workdir_lib.save_config(config, str(path))
  saver = ckpt.Checkpointer(str(path), save_steps=1, keep=1)
  saver.save(7, state, {}, force=True)
  saver.close()
  return config


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  path = tmp_path_factory.mktemp('pretrain') / 'run'
  _pretraining_workdir(path)
  return path


def _finetune_config(pretrained_path):
  config = load_config(ROOT / 'configs' / 'finetune_demo.py', 'runlocal')
  config.init_from = str(pretrained_path)
  config.model.video.frame_size = 48  # 3 × 3 patches of 16 instead of pretraining's 2 × 2
  return config


def test_init_from_loads_the_tower_resizes_positions_and_keeps_the_head(pretrained):
  config = _finetune_config(pretrained)
  mesh = sharding.make_mesh(config.mesh)
  batch = next(data_pipelines.build(config.data, 'train', batch_size=config.batch_size))
  program = trainer.build_program(config, mesh, batch)
  fresh = program.init(jax.random.key(0))
  state = init_from.init_from_pretrained(fresh, program, str(pretrained))
  _, _, stored = workdir_lib.load_model(str(pretrained))
  source = jax.device_get(stored['params'])
  params = jax.device_get(state.params)
  assert set(params) == {'video_tower', 'classifier'}
  assert set(params['video_tower']) == {'tokenizer', 'agg', 'encoder'}
  tokenizer, pretrained_tower = params['video_tower']['tokenizer'], source['video_tower']
  resized = resize_positions(source, video_grid=(2, 3, 3))['video_tower']['tokenizer']
  for name in ('temporal_position', 'horizontal_position', 'vertical_position'):
    np.testing.assert_allclose(tokenizer[name], resized[name], rtol=1e-6)
  assert tokenizer['horizontal_position'].shape == (3, 64)
  np.testing.assert_array_equal(tokenizer['patch']['kernel'],
                                pretrained_tower['tokenizer']['patch']['kernel'])  # fmt: skip
  jax.tree.map(
    np.testing.assert_array_equal, params['video_tower']['encoder'], pretrained_tower['encoder']
  )
  np.testing.assert_array_equal(params['video_tower']['agg'], pretrained_tower['agg'])
  np.testing.assert_array_equal(
    params['classifier']['kernel'], fresh.params['classifier']['kernel']
  )
  np.testing.assert_array_equal(params['classifier']['bias'], fresh.params['classifier']['bias'])
  # At the pretraining grid the classifier's tower is the pretrained model's: same AGG output.
  config.model.video.frame_size = 32
  model = build_model(config.model)
  video = jnp.asarray(batch['video'][:2, :, :32, :32])
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), {'video': video}))
  tower, report = model.load_pretrained(abstract['params'], source)
  assert not report['resized'] and report['kept_init'] == ['classifier/bias', 'classifier/kernel']
  tower.pop('classifier')  # the tower's AGG output does not read the head
  ours = model.embed('video', ['agg'])({'params': tower}, video)['agg']
  pre_model = build_model(load_config(ROOT / 'configs' / 'vatt_bbs.py', 'runlocal').model)
  theirs = pre_model.module.apply({'params': source}, video, method='encode_video')
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)


def test_init_from_errors_name_the_problem(pretrained, tmp_path):
  with pytest.raises(ValueError, match='not a training workdir'):
    init_from.init_from_pretrained(None, None, str(tmp_path / 'nowhere'))
  config = _finetune_config(pretrained)
  config.model.video.size = 'small'  # another tower width than the checkpoint's
  model = build_model(config.model)
  video = jnp.zeros((1, 4, 48, 48, 3))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), {'video': video}))
  fresh = types.SimpleNamespace(params=abstract['params'])  # only its shapes are read
  program = types.SimpleNamespace(model=model)  # only its model is read before the error
  with pytest.raises(
    ValueError, match=r'init_from=.*video_tower/agg: checkpoint \(64,\), this model'
  ):
    init_from.init_from_pretrained(fresh, program, str(pretrained))


def test_classification_evaluator_averages_the_views_of_each_example(ramp_shards):
  config = load_config(ROOT / 'configs' / 'finetune_demo.py', 'runlocal')
  config.model.video.num_frames, config.model.video.frame_size = 8, HEIGHT
  config.model.num_classes = 5
  config.data = _shard_config(ramp_shards)
  model = build_model(config.model)
  variables = jax.jit(lambda key: model.init(key, {'video': jnp.zeros((1, 8, 48, 48, 3))}))(
    jax.random.key(0)
  )
  eval_cfg = ml_collections.ConfigDict(dict(type='classification', split='test', batch_size=2))
  evaluator = build_evaluator(eval_cfg, config, model)
  predictions = evaluator.predict(variables)
  assert predictions['view_logits'].shape == (3, 6, 5)  # 3 records (last batch padded), 2 × 3 views
  np.testing.assert_allclose(predictions['logits'], predictions['view_logits'].mean(1), rtol=1e-5)
  batch = next(data_pipelines.build(config.data, 'test', batch_size=3))
  classify = model.classify()
  apply = jax.jit(lambda video: classify(variables, {'video': video}))
  for view in (0, 4):
    alone = apply(jnp.asarray(batch['video'][:, view]))
    np.testing.assert_allclose(predictions['view_logits'][:, view], alone, rtol=1e-4, atol=1e-5)
  result = evaluator.score(predictions)
  assert result['num_examples'] == 2 and result['num_views'] == 6  # the unlabelled one is left out
  expected = np.mean(np.argmax(predictions['logits'][:2], -1) == [3, 0]) * 100
  assert result['top1'] == pytest.approx(expected)
  # Multi-hot labels are scored with mAP / AUC / d′ of the averaged logits.
  hot = np.array([[1, 0, 0, 1, 0], [0, 1, 0, 0, 1], [1, 1, 0, 0, 0]])
  scores = np.random.default_rng(0).normal(size=(3, 5))
  multi = evaluator.score({'logits': scores, 'label': hot, 'view_logits': scores[:, None]})
  from vatt_jax.evaluation import metrics

  reference = metrics.multilabel_metrics(scores, hot)
  assert multi['mAP'] == pytest.approx(reference['mAP']) and multi['AUC'] == reference['AUC']
  with pytest.raises(ValueError, match='eval_crops'):
    bad = ml_collections.ConfigDict(dict(eval_cfg, data=dict(eval_crops=0)))
    build_evaluator(bad, config, model)


def test_runlocal_finetune_from_a_pretraining_run_and_standalone_evaluation(pretrained, tmp_path):
  config = _finetune_config(pretrained)
  config.total_steps = 3
  config.evals.test.log_steps = 2
  history = trainer.train(config, str(tmp_path))
  assert [h['step'] for h in history] == [1, 2, 3]
  assert all(np.isfinite(h['loss']) for h in history)
  assert 'test/top1' in history[1] and 'test/top1' in history[2] and 'test/top1' not in history[0]
  assert history[2]['test/num_examples'] == 16
  logged = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert logged[-1]['test/top5'] == history[-1]['test/top5']
  spec = importlib.util.spec_from_file_location('evaluate_script', ROOT / 'scripts' / 'evaluate.py')
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  report = script.evaluate(str(tmp_path), output=str(tmp_path / 'eval.json'))
  assert report['step'] == 3
  assert report['results']['test']['top1'] == pytest.approx(history[-1]['test/top1'])
  assert json.loads((tmp_path / 'eval.json').read_text())['results'] == report['results']
  # A resumed run ignores init_from (it continues its own checkpoint).
  config.init_from = str(tmp_path / 'nowhere')
  config.total_steps = 4
  assert trainer.train(config, str(tmp_path))[-1]['step'] == 4


def test_bad_fine_tuning_configs_name_the_field(tmp_path):
  config = load_config(ROOT / 'configs' / 'finetune_demo.py', 'runlocal')
  config.init_from = str(tmp_path / 'missing')
  with pytest.raises(ValueError, match='init_from'):
    trainer.train(config, str(tmp_path / 'a'))
  config = load_config(ROOT / 'configs' / 'finetune_demo.py', 'runlocal')
  config.model.num_classes = 2  # the synthetic source has 4 classes
  with pytest.raises(ValueError, match='num_classes'):
    trainer.train(config, str(tmp_path / 'b'))
  config = load_config(ROOT / 'configs' / 'finetune_audioset.py', 'runlocal')
  config.mixup.alpha = -1.0
  with pytest.raises(ValueError, match='mixup.alpha'):
    trainer.train(config, str(tmp_path / 'c'))
  config = load_config(ROOT / 'configs' / 'finetune_demo.py', 'runlocal')
  config.model.classifier.kernel_init = 'orthogonal'
  with pytest.raises(ValueError, match='kernel_init'):
    build_model(config.model)
  config.model.classifier.kernel_init = 'zeros'
  config.model.modality = 'text'
  with pytest.raises(ValueError, match='model.modality'):
    build_model(config.model)
