"""SViTT-Ego's model (vatt_jax/models/svitt.py): special tokens, the training samples with scene
negatives, the objective's parts, the contract functions and the temporal expansion on load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_pipelines
from tests.conftest import ROOT, load_config
from vatt_jax import export
from vatt_jax.losses.egonce import positive_mask
from vatt_jax.models import build_model, svitt


def _config(arg='runlocal'):
  return load_config(ROOT / 'configs' / 'svitt_ego_demo.py', arg)


def test_special_tokens_frame_each_caption():
  vocab = 20
  ids = np.array([[5, 6, 7, 0, 0], [1, 0, 0, 0, 0], [3, 4, 5, 6, 9], [0, 0, 0, 0, 0]], np.int32)
  full, mask = svitt.add_special_tokens(jnp.asarray(ids), vocab)
  s = svitt.special_ids(vocab)
  for row, have, m in zip(ids, np.asarray(full), np.asarray(mask), strict=True):
    tokens = row[row > 0].tolist()
    want = [s['cls'], *tokens, s['sep']]
    want += [0] * (len(row) + 2 - len(want))
    assert have.tolist() == want
    assert m.tolist() == [1] * (len(tokens) + 2) + [0] * (len(row) - len(tokens))


def test_training_samples_append_the_scene_negatives():
  b, w = 3, 4
  rng = np.random.default_rng(0)
  batch = {
    'video': rng.normal(size=(b, 2, 4, 4, 3)).astype(np.float32),
    'text': rng.integers(1, 9, (b, 1, w)).astype(np.int32),
    'video_mask': np.array([1, 1, 0], np.float32),
    'text_mask': np.ones(b, np.float32),
    'noun': rng.integers(0, 2, (b, 5)).astype(np.float32),
    'verb': rng.integers(0, 2, (b, 3)).astype(np.float32),
    'neg_video': rng.normal(size=(b, 2, 4, 4, 3)).astype(np.float32),
    'neg_text': rng.integers(1, 9, (b, 1, w)).astype(np.int32),
    'neg_noun': rng.integers(0, 2, (b, 5)).astype(np.float32),
    'neg_verb': rng.integers(0, 2, (b, 3)).astype(np.float32),
    'neg_mask': np.array([1, 0, 1], np.float32),
  }
  samples = svitt.pretraining_samples(jax.tree.map(jnp.asarray, batch), tags=True)
  np.testing.assert_array_equal(
    samples['video'], np.concatenate([batch['video'], batch['neg_video']])
  )
  np.testing.assert_array_equal(
    samples['text'], np.concatenate([batch['text'], batch['neg_text']])[:, 0]
  )
  np.testing.assert_array_equal(samples['noun'], np.concatenate([batch['noun'], batch['neg_noun']]))
  assert samples['valid'].tolist() == [True, True, False, True, False, True]
  del batch['noun']
  with pytest.raises(ValueError, match="'noun'"):
    svitt.pretraining_samples(jax.tree.map(jnp.asarray, batch), tags=True)


def _init(model, seed):
  """The model's variables, initialised under jit (eager init dispatches op by op: slow)."""
  batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), model.example_batch(1))
  return jax.jit(model.init)(jax.random.key(seed), batch)


@pytest.fixture(scope='module')
def tiny():
  config = _config()
  model = build_model(config.model)
  source = data_pipelines.build(config.data, 'train', batch_size=4, seed=0)
  batch = {k: jnp.asarray(v) for k, v in next(source).items()}
  source.close()
  variables = _init(model, 0)
  return config, model, batch, variables


@pytest.mark.slow
def test_the_objective_trains_every_part(tiny):
  config, model, batch, variables = tiny
  assert 'neg_video' in batch and 'noun' in batch
  objective = model.objective(config.loss)
  (loss, (terms, state)), grads = jax.jit(
    jax.value_and_grad(objective, has_aux=True), static_argnums=()
  )(variables, batch, jax.random.key(1))
  assert np.isfinite(loss) and state == {}
  for name in ('loss_t2v', 'loss_v2t', 'loss_vtm', 'loss_mlm', 'vtm_accuracy', 'mlm_tokens'):
    assert np.isfinite(terms[name]), name
  np.testing.assert_allclose(
    loss, terms['loss_contrastive'] + terms['loss_vtm'] + terms['loss_mlm'], rtol=1e-6
  )
  # 2B samples (the anchors and their scene negatives) are the contrastive batch.
  samples = svitt.pretraining_samples(batch, tags=True)
  assert samples['valid'].shape == (8,)
  assert float(terms['anchors']) == float(np.sum(samples['valid'])) > 4
  flat = jax.tree_util.tree_leaves_with_path(grads['params'])
  for head in ('video_proj', 'text_proj', 'vtm_head', 'video_encoder', 'text_encoder'):
    norms = [float(jnp.linalg.norm(g)) for p, g in flat if jax.tree_util.keystr(p).find(head) >= 0]
    assert norms and max(norms) > 0, f'no gradient reaches {head}'


@pytest.mark.slow
def test_infonce_variant_has_no_tags_or_negatives():
  config = _config('runlocal,infonce')
  assert config.loss.name == 'infonce' and config.data.scene_negative_window == 0.0
  model = build_model(config.model)
  source = data_pipelines.build(config.data, 'train', batch_size=4, seed=0)
  batch = {k: jnp.asarray(v) for k, v in next(source).items() if not k.startswith('neg_')}
  source.close()
  batch.pop('noun', None)
  batch.pop('verb', None)
  variables = _init(model, 0)
  loss, _ = jax.jit(model.objective(config.loss))(variables, batch, jax.random.key(1))
  assert np.isfinite(loss)


@pytest.mark.slow
def test_egonce_positives_drive_the_vtm_negatives(tiny):
  """The objective's negatives come from egonce.positive_mask: with every sample sharing a noun
  and a verb there is no negative and the VTM loss sees the positives only."""
  config, model, batch, variables = tiny
  batch = dict(batch)
  batch['noun'] = jnp.ones_like(batch['noun'])
  batch['verb'] = jnp.ones_like(batch['verb'])
  batch['neg_noun'] = jnp.ones_like(batch['neg_noun'])
  batch['neg_verb'] = jnp.ones_like(batch['neg_verb'])
  loss, (terms, _) = jax.jit(model.objective(config.loss))(variables, batch, jax.random.key(2))
  samples = svitt.pretraining_samples(batch, tags=True)
  pos = positive_mask(samples['noun'], samples['verb'], num=samples['valid'].shape[0])
  assert bool(jnp.all(pos))
  assert np.isfinite(loss)


@pytest.mark.slow
def test_contract_embeddings_and_pair_score(tiny):
  _, model, batch, variables = tiny
  video, text = batch['video'][:3], batch['text'][:3, 0]
  embed_video = jax.jit(model.embed('video'))
  v = embed_video(variables, video)
  t = jax.jit(model.embed('text'))(variables, text)
  assert v['vt'].shape == t['vt'].shape == (3, model.config.embed_dim)
  assert v['agg'].shape[0] == t['agg'].shape[0] == 3
  tokens = jax.jit(model.score.video)(variables, video)
  assert tokens.shape[1] == svitt.num_video_tokens(model.config)
  features = jax.jit(model.score.text)(variables, text)
  scores = jax.jit(model.score.pairs)(variables, tokens, features)
  assert scores.shape == (3,) and np.isfinite(scores).all()
  # Evaluation is deterministic (a fixed sparse pattern, no dropout).
  np.testing.assert_array_equal(v['vt'], embed_video(variables, video)['vt'])


@pytest.mark.slow
def test_a_4_frame_checkpoint_loads_into_8_frames(tiny):
  config, model, _, variables = tiny
  config8 = _config()
  config8.model.video.num_frames = 8
  model8 = build_model(config8.model)
  params8 = _init(model8, 3)['params']
  loaded, report = model8.load_pretrained(params8, variables['params'])
  assert report['resized'] and all('offset_table' in p for p in report['resized'])
  for path, (old, new) in report['resized'].items():
    assert old[0] == 2 * 4 - 1 and new[0] == 2 * 8 - 1, path
  assert jax.tree.structure(loaded) == jax.tree.structure(params8)


def test_model_config_errors_are_named():
  config = _config()
  config.model.text.num_narrations = 5
  with pytest.raises(ValueError, match='num_narrations'):
    build_model(config.model)


@pytest.mark.slow
@pytest.mark.parametrize(
  'path,variant,attention,keep,text_keep,loss',
  [
    ('svitt_ego_demo', 'dense', 'dense', 1.0, 1.0, 'egonce'),
    ('svitt_ego_demo', 'edge', 'block_sparse', 1.0, 1.0, 'egonce'),
    ('svitt_ego_demo', 'node', 'dense', 0.7, 0.1, 'egonce'),
    ('svitt_ego_base', 'frames8', 'block_sparse', 0.6, 0.1, 'egonce'),
  ],
)
def test_variants_set_the_sparsity_and_train_a_step(
  path, variant, attention, keep, text_keep, loss
):
  config = load_config(ROOT / 'configs' / f'{path}.py', f'runlocal,{variant}')
  v = config.model.video
  assert (v.attention, v.keep_rate, config.model.text.video_keep_rate, config.loss.name) == (
    attention,
    keep,
    text_keep,
    loss,
  )
  if variant == 'frames8':
    assert v.num_frames == 8
  model = build_model(config.model)
  source = data_pipelines.build(config.data, 'train', batch_size=4, seed=0)
  batch = {k: jnp.asarray(val) for k, val in next(source).items()}
  source.close()
  loss_value, _ = jax.jit(model.objective(config.loss))(_init(model, 0), batch, jax.random.key(1))
  assert np.isfinite(loss_value)


@pytest.mark.slow
def test_export_bundle_and_saved_model_match_the_model(tiny, tmp_path):
  """Through the contract: the bundle and the TF SavedModel of SViTT-Ego (block-sparse attention
  and token pruning inside) give the model's embeddings. (lax.top_k would not survive the
  SavedModel: its StableHLO composite cannot be deserialized by TF.)"""
  config, model, _, variables = tiny
  export.write_bundle(config, variables, str(tmp_path), None, step=1)
  export.export_saved_model(model, variables, str(tmp_path), platforms=('cpu',))
  inputs = export.random_inputs(model, batch_size=3, seed=7)
  want = export.jax_embeddings(model, variables, inputs)
  encoders = export.load_bundle(str(tmp_path / 'bundle'))
  got = {
    'video': jax.tree.map(np.asarray, encoders.video(inputs['video'])),
    'text': jax.tree.map(np.asarray, encoders.text(inputs['text'])),
  }
  errors = export.relative_errors(got, want)
  assert set(errors) == {'video/agg', 'video/vt', 'text/agg', 'text/vt'}
  assert max(errors.values()) <= 1e-6, errors
  saved = export.relative_errors(
    export.saved_model_embeddings(str(tmp_path / 'saved_model'), inputs), want
  )
  assert max(saved.values()) <= 1e-4, saved


@pytest.mark.slow
def test_text_pooling_mean_is_the_masked_mean_of_the_caption_states(tiny):
  """model.text.pooling='mean' (the demo's): the text representation is the mean of the states
  at [CLS], the caption's tokens and [SEP]; padding does not count. 'cls' is row 0."""
  config, model, batch, variables = tiny
  ids = np.array(batch['text'][:3, 0])
  ids[0, 3:] = 0  # a short caption
  hidden, mask = model.module.apply(variables, jnp.asarray(ids), method=svitt.Svitt.encode_text)
  hidden, mask = np.asarray(hidden, np.float64), np.asarray(mask, np.float64)
  want = {
    'cls': hidden[:, 0],
    'mean': (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True),
  }
  for pooling in svitt.TEXT_POOLING:
    cfg = _config()
    cfg.model.text.pooling = pooling
    got = build_model(cfg.model).embed('text', ('agg',))(variables, jnp.asarray(ids))['agg']
    np.testing.assert_allclose(got, want[pooling], rtol=1e-5, atol=1e-6)
  cfg = _config()
  cfg.model.text.pooling = 'max'
  with pytest.raises(ValueError, match='model.text.pooling'):
    build_model(cfg.model)
