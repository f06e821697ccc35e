"""Self-tests of tests/official_vatt.py, the independent numpy model of the official VATT networks
and its checkpoint writer. Nothing here imports vatt_jax."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests import official_vatt as ov

SUFFIX = ov.VARIABLE_SUFFIX


@pytest.fixture(scope='module', params=['bbs', 'ma'])
def model(request):
  kind = request.param
  cfg = ov.default_config(kind)
  weights = ov.random_weights(kind, cfg, 0)
  inputs = ov.random_inputs(cfg)
  return kind, cfg, weights, inputs


def _run(kind, cfg, weights, inputs, **kw):
  video, audio, text = inputs
  return ov.forward(kind, weights, cfg, video, audio, text, **kw)


def _close(a, b, tol=1e-12):
  return all(np.abs(a[k] - b[k]).max() <= tol for k in a)


# ----------------------------------------------------------------------------- key layout


def test_bbs_keys_and_shapes():
  cfg = ov.TinyOfficial()
  w = ov.random_weights('bbs', cfg, 0)
  assert list(w) == ['video', 'audio', 'text', 'head']
  v, a, t, h = w['video'], w['audio'], w['text'], w['head']
  assert v['voxel_to_patch/kernel'].shape == (2, 16, 16, 3, 64)
  assert v['pos_embedding_lookup/temporal_position_embeddings/embeddings'].shape == (2, 64)
  assert v['pos_embedding_lookup/vertical_position_embeddings/embeddings'].shape == (
    2,
    64,
  )  # H grid
  assert v['pos_embedding_lookup/horizontal_position_embeddings/embeddings'].shape == (
    3,
    64,
  )  # W grid
  assert v['agg_embedding'].shape == (64,)
  assert a['wave_to_patch/kernel'].shape == (128, 1, 64)
  assert a['pos_embedding_lookup/temporal_position_embeddings/embeddings'].shape == (16, 64)
  for tower in (v, a):
    assert tower['tx/layers/1/mha/q/kernel'].shape == (64, 64)
    assert tower['tx/layers/1/feed_forward/mlp/wi/bias'].shape == (128,)
    assert 'tx/final_layer_norm/gamma' in tower and 'tx/layers/2/layer_norm/gamma' not in tower
    assert 'pos_embedding_lookup/layernorm/gamma' in tower
  assert t['embedding/embeddings'].shape == (50, 300)
  assert t['agg_embedding'].shape == (300,)
  assert t['pre_proj/kernel'].shape == (300, 64) and 'pre_proj/bias' not in t
  rel = 'self_attention/attention/relative_attention_bias/embeddings'
  assert t['base_lm/layers/0/' + rel].shape == (32, 4)
  assert 'base_lm/layers/1/' + rel not in t  # only layer 0 has the table
  assert not any(k.endswith('/bias') for k in t)  # T5: no biases anywhere
  assert 'base_lm/layers/1/feed_forward/layer_norm/beta' in t  # a real LayerNorm in the FF block
  assert t['base_lm/layers/1/self_attention/layer_norm/weight'].shape == (64,)
  assert t['base_lm/final_layer_norm/weight'].shape == (64,)
  assert h['vid_to_hid/kernel'].shape == (64, 32) and 'vid_to_hid/bias' not in h
  assert h['hid_to_va/pre_bn/moving_variance'].shape == (32,)
  assert h['va_to_vat/dense/kernel'].shape == (32, 16) and 'va_to_vat/pre_bn/gamma' not in h
  assert h['aud_to_va/bias'].shape == (32,) and h['txt_to_vat/kernel'].shape == (64, 16)
  assert sum(map(len, w.values())) == 124


def test_ma_keys_and_shapes():
  cfg = ov.TinyOfficialMA()
  w = ov.random_weights('ma', cfg, 0)
  assert list(w) == ['unified', 'head']
  u = w['unified']
  assert u['raw_to_embeddings/video/kernel'].shape == (2, 16, 16, 3, 64)
  assert u['raw_to_embeddings/audio/kernel'].shape == (128, 1, 64)
  assert u['raw_to_embeddings/text/embeddings'].shape == (50, 300)
  assert u['pre_proj/text/kernel'].shape == (300, 64) and u['pre_proj/text/bias'].shape == (64,)
  pe = 'pos_embedding_lookup/'
  assert u[pe + 'video/vertical_position_embeddings/embeddings'].shape == (2, 64)
  assert u[pe + 'video/horizontal_position_embeddings/embeddings'].shape == (2, 64)
  assert u[pe + 'text/temporal_position_embeddings/embeddings'].shape == (8, 64)
  assert u[pe + 'audio/temporal_position_embeddings/embeddings'].shape == (16, 64)
  for m in ('video', 'audio', 'text'):
    assert u[f'post_proj/{m}/kernel'].shape == (64, 48)
    assert f'{pe}{m}/layernorm/gamma' in u
  for name in ('vid_agg_embedding', 'aud_agg_embedding', 'txt_agg_embedding'):
    assert u[name].shape == (64,)
  assert w['head']['vid_to_hid/kernel'].shape == (48, 32)
  assert w['head']['txt_to_vat/kernel'].shape == (48, 16)
  assert sum(map(len, w.values())) == 84
  with pytest.raises(ValueError, match='square'):
    ov.random_weights('ma', ov.TinyOfficialMA(width=48), 0)


def test_weights_are_float32_finite_and_seeded(model):
  kind, cfg, weights, _ = model
  for ws in weights.values():
    for k, v in ws.items():
      assert v.dtype == np.float32 and np.isfinite(v).all(), k
  again = ov.random_weights(kind, cfg, 0)
  assert all(np.array_equal(weights[g][k], again[g][k]) for g in weights for k in weights[g])
  other = ov.random_weights(kind, cfg, 1)
  assert not np.array_equal(
    weights['head']['txt_to_vat/kernel'], other['head']['txt_to_vat/kernel']
  )
  bn = weights['head']['hid_to_va/bn/moving_variance']
  assert (bn >= 0.5).all() and (bn <= 1.5).all()


def test_official_keys_prefixes_and_inverse(model):
  kind, _, weights, _ = model
  flat = ov.official_keys(weights)
  anchor = 'unified_backbone/unified_transformer/' if kind == 'ma' else 'vid_backbone/_base/'
  assert ov.BACKBONE_PREFIX + anchor + 'tx/layers/0/mha/q/kernel' in flat
  assert ov.HEAD_PREFIX + 'hid_to_va/pre_bn/gamma' in flat
  assert all(k.startswith('model/layer_with_weights-0/') for k in flat)
  custom = ov.official_keys(weights, backbone_prefix='a/', head_prefix='b/')
  assert 'b/vid_to_hid/kernel' in custom
  back = ov.group_official_keys({k + SUFFIX: v for k, v in custom.items()}, kind, 'a/', 'b/')
  assert {g: sorted(ws) for g, ws in back.items()} == {g: sorted(ws) for g, ws in weights.items()}


# ----------------------------------------------------------------------------- checkpoint


def test_write_checkpoint_round_trip(tmp_path):
  import tensorflow as tf

  kind, cfg = 'bbs', ov.TinyOfficial()
  weights = ov.random_weights(kind, cfg, 0)
  flat = ov.official_keys(weights)
  path = ov.write_checkpoint(flat, tmp_path, step=500000)
  assert path == str(tmp_path / 'ckpt-500000')
  assert (tmp_path / 'ckpt-500000.index').exists()
  assert list(tmp_path.glob('ckpt-500000.data-*'))
  assert tf.train.latest_checkpoint(str(tmp_path)) == path

  listed = dict(tf.train.list_variables(path))
  reader = tf.train.load_checkpoint(path)
  for key, value in flat.items():
    got = reader.get_tensor(key + SUFFIX)
    assert got.dtype == np.float32 and got.shape == value.shape, key
    assert np.array_equal(got, value), key  # bit-exact
  assert reader.get_tensor('optimizer/iter' + SUFFIX) == 500000
  assert reader.get_variable_to_dtype_map()['optimizer/iter' + SUFFIX] == tf.int64

  slot_keys = {k for k in listed if '.OPTIMIZER_SLOT' in k}
  for key in flat:
    m = key + '/.OPTIMIZER_SLOT/optimizer/m' + SUFFIX
    v = key + '/.OPTIMIZER_SLOT/optimizer/v' + SUFFIX
    if ov.is_trainable(key):
      assert m in slot_keys and v in slot_keys, key
      assert np.array_equal(reader.get_tensor(m), -flat[key])  # distinct from the value
    else:
      assert m not in slot_keys, key
  assert not ov.is_trainable(ov.BACKBONE_PREFIX + 'txt_backbone/embedding/embeddings')
  assert not ov.is_trainable(ov.HEAD_PREFIX + 'hid_to_va/bn/moving_mean')
  # Nothing else but optimizer state and the object graph.
  model_keys = {k + SUFFIX for k in flat}
  rest = set(listed) - model_keys - slot_keys
  assert rest == {
    '_CHECKPOINTABLE_OBJECT_GRAPH',
    'save_counter' + SUFFIX,
    'optimizer/iter' + SUFFIX,
    'optimizer/beta1_power' + SUFFIX,
    'optimizer/beta2_power' + SUFFIX,
  }

  # Slots and optimizer state are ignorable: what read_checkpoint keeps runs the same model.
  read = ov.read_checkpoint(path)
  assert set(read) == set(flat)
  regrouped = ov.group_official_keys(read, kind)
  inputs = ov.random_inputs(cfg)
  assert _close(_run(kind, cfg, weights, inputs), _run(kind, cfg, regrouped, inputs), tol=0.0)


def test_write_checkpoint_without_slots_and_errors(tmp_path):
  import tensorflow as tf

  flat = {
    'model/a/layers/0/kernel' + SUFFIX: np.arange(6, dtype=np.float64).reshape(2, 3),
    'model/a/b': np.ones(2, np.float32),
  }
  path = ov.write_checkpoint(flat, tmp_path, step=7, slots=False)
  assert path.endswith('ckpt-7')
  keys = {k for k, _ in tf.train.list_variables(path)}
  assert keys == {
    '_CHECKPOINTABLE_OBJECT_GRAPH',
    'save_counter' + SUFFIX,
    'optimizer/iter' + SUFFIX,
    'model/a/layers/0/kernel' + SUFFIX,
    'model/a/b' + SUFFIX,
  }
  assert (
    tf.train.load_checkpoint(path).get_tensor('model/a/layers/0/kernel' + SUFFIX).dtype
    == np.float32
  )
  with pytest.raises(ValueError):
    ov.write_checkpoint({'model/a': np.ones(1), 'model/a/b': np.ones(1)}, tmp_path / 'x')
  with pytest.raises(ValueError):
    ov.write_checkpoint({'optimizer/x': np.ones(1)}, tmp_path / 'y')


# ----------------------------------------------------------------------------- forward


def test_forward_shapes_and_scale(model):
  kind, cfg, weights, inputs = model
  out = _run(kind, cfg, weights, inputs, return_features=True)
  d = {'bbs': (64, 64, 64), 'ma': (48, 48, 48)}[kind]
  tokens = 12 if kind == 'bbs' else 8
  assert out['video_agg'].shape == (2, d[0])
  assert out['audio_agg'].shape == (2, d[1])
  assert out['text_agg'].shape == (2, d[2])
  assert out['video_va'].shape == (2, 32) and out['audio_va'].shape == (2, 32)
  assert out['video_vt'].shape == (2, 16) and out['text_vt'].shape == (2, 16)
  assert out['video_features'].shape == (2, tokens, d[0])
  assert out['audio_features'].shape == (2, 16, d[1])
  assert out['text_features'].shape == (2, 8, d[2])
  assert list(_run(kind, cfg, weights, inputs)) == list(ov.OUTPUTS)
  for k, v in out.items():
    assert v.dtype == np.float64 and np.isfinite(v).all(), k
    assert 0.05 < v.std() and np.abs(v).max() < 20, k  # O(1) activations
  # Rows are independent: running one example alone gives the same outputs.
  one = ov.forward(kind, weights, cfg, *(x[1:] for x in inputs))
  assert all(np.abs(one[k][0] - out[k][1]).max() < 1e-12 for k in one)


def test_refuses_grids_that_need_interpolation(model):
  kind, cfg, weights, (video, audio, text) = model
  with pytest.raises(NotImplementedError, match='interpolate'):
    ov.forward(kind, weights, cfg, video[:, :, :, :16], audio, text)  # one W bucket
  with pytest.raises(NotImplementedError, match='interpolate'):
    ov.forward(kind, weights, cfg, video, audio[:, :1024], text)
  if kind == 'ma':  # text positions are a table in the unified model only
    with pytest.raises(NotImplementedError, match='interpolate'):
      ov.forward(kind, weights, cfg, video, audio, np.pad(text, ((0, 0), (0, 1))))


def test_bbs_text_padding_invariance():
  cfg = ov.TinyOfficial()
  weights = ov.random_weights('bbs', cfg, 0)
  video, audio, text = ov.random_inputs(cfg)
  assert (text[1, -3:] == 0).all() and (text[0] != 0).all()
  base = ov.forward('bbs', weights, cfg, video, audio, text)
  padded = ov.forward('bbs', weights, cfg, video, audio, np.pad(text, ((0, 0), (0, 5))))
  for k in ('text_agg', 'text_vt'):
    assert np.abs(base[k] - padded[k]).max() < 1e-12
  changed = text.copy()
  changed[1, 0] = 1 + changed[1, 0] % (cfg.vocab_size - 1)
  other = ov.forward('bbs', weights, cfg, video, audio, changed)
  assert np.abs(other['text_agg'][1] - base['text_agg'][1]).max() > 1e-3
  assert np.abs(other['text_agg'][0] - base['text_agg'][0]).max() == 0


def test_padding_embedding_row_is_masked(model):
  """The padding id's embedding row only reaches masked keys: the AGG output cannot see it."""
  kind, cfg, weights, inputs = model
  group, key = (
    ('text', 'embedding/embeddings')
    if kind == 'bbs'
    else ('unified', 'raw_to_embeddings/text/embeddings')
  )
  base = _run(kind, cfg, weights, inputs)
  table = weights[group][key].copy()
  table[0] += 3.0
  moved = {**weights, group: {**weights[group], key: table}}
  out = _run(kind, cfg, moved, inputs)
  assert np.abs(out['text_agg'] - base['text_agg']).max() < 1e-12
  # Also for a row that had no padding until its last word was made padding.
  video, audio, text = inputs
  text = text.copy()
  text[0, -1] = 0
  a = ov.forward(kind, weights, cfg, video, audio, text)
  b = ov.forward(kind, moved, cfg, video, audio, text)
  assert np.abs(a['text_agg'][0] - b['text_agg'][0]).max() < 1e-12
  # ...whereas a real word's row does matter.
  table2 = weights[group][key].copy()
  table2[text[0, 0]] += 3.0
  c = ov.forward(kind, {**weights, group: {**weights[group], key: table2}}, cfg, video, audio, text)
  assert np.abs(a['text_agg'][0] - c['text_agg'][0]).max() > 1e-3


def _permute_blocks(video, axis, block, perm):
  shape = video.shape
  n = len(perm)
  moved = np.moveaxis(video, axis, 1)
  rest = moved.shape[2:]
  blocks = moved.reshape(shape[0], n, block, *rest)[:, perm]
  return np.moveaxis(blocks.reshape(shape[0], n * block, *rest), 1, axis)


@pytest.mark.parametrize('axis,table', [(1, 'temporal'), (2, 'vertical'), (3, 'horizontal')])
def test_position_tables_index_their_axis(model, axis, table):
  """Permuting the patch blocks along one axis together with the rows of that axis's table leaves
  every pooled output unchanged (attention is permutation-equivariant and the AGG sees a set);
  permuting the blocks alone, or with another axis's table, does not."""
  kind, cfg, weights, (video, audio, text) = model
  grid = cfg.video_grid[axis - 1]
  assert grid >= 2
  perm = np.roll(np.arange(grid), 1)
  block = (cfg.temporal_patch, cfg.spatial_patch, cfg.spatial_patch)[axis - 1]
  moved_video = _permute_blocks(video, axis, block, perm)
  group = 'video' if kind == 'bbs' else 'unified'
  pe = 'pos_embedding_lookup/' if kind == 'bbs' else 'pos_embedding_lookup/video/'
  key = f'{pe}{table}_position_embeddings/embeddings'

  def with_table(name):
    k = f'{pe}{name}_position_embeddings/embeddings'
    return {**weights, group: {**weights[group], k: weights[group][k][perm]}}

  base = ov.forward(kind, weights, cfg, video, audio, text)
  same = ov.forward(kind, with_table(table), cfg, moved_video, audio, text)
  assert np.abs(same['video_agg'] - base['video_agg']).max() < 1e-10
  assert np.abs(same['video_vt'] - base['video_vt']).max() < 1e-10
  alone = ov.forward(kind, weights, cfg, moved_video, audio, text)
  assert np.abs(alone['video_agg'] - base['video_agg']).max() > 1e-3
  for other in ('temporal', 'vertical', 'horizontal'):
    if (
      other != table
      and weights[group][f'{pe}{other}_position_embeddings/embeddings'].shape[0] == grid
    ):
      wrong = ov.forward(kind, with_table(other), cfg, moved_video, audio, text)
      assert np.abs(wrong['video_agg'] - base['video_agg']).max() > 1e-3, other
  assert weights[group][key].shape[0] == grid


def test_bbs_vertical_table_is_h_and_horizontal_is_w():
  cfg = ov.TinyOfficial()
  assert cfg.video_grid == (2, 2, 3)
  w = ov.random_weights('bbs', cfg, 0)['video']
  assert (
    w['pos_embedding_lookup/vertical_position_embeddings/embeddings'].shape[0] == cfg.height // 16
  )
  assert (
    w['pos_embedding_lookup/horizontal_position_embeddings/embeddings'].shape[0] == cfg.width // 16
  )


def test_towers_are_configurable():
  cfg = ov.TinyOfficial(
    video=ov.Tower(d_model=32, d_kv=8, num_heads=2, d_ff=64, num_layers=1),
    text=ov.Tower(num_layers=3, num_heads=2, d_kv=32),
  )
  w = ov.random_weights('bbs', cfg, 0)
  assert w['video']['tx/layers/0/mha/q/kernel'].shape == (32, 16)
  assert 'tx/layers/1/mha/q/kernel' not in w['video']
  assert 'base_lm/layers/2/self_attention/attention/q/kernel' in w['text']
  assert w['text'][
    'base_lm/layers/0/self_attention/attention/relative_attention_bias/embeddings'
  ].shape == (32, 2)
  out = ov.forward('bbs', w, cfg, *ov.random_inputs(cfg))
  assert out['video_agg'].shape == (2, 32) and out['text_agg'].shape == (2, 64)
  assert out['video_va'].shape == (2, 32)


# ----------------------------------------------------------------------------- formulas


def test_t5_relative_position_bucket_hand_values():
  # bidirectional, 32 buckets, max distance 64: n = context - memory; n < 0 (memory ahead) adds
  # 16; |n| < 8 is exact; otherwise 8 + floor(log(|n| / 8) / log(64 / 8) * 8), capped at 15.
  def by_hand(rp):
    n = -rp
    ret = 16 if n < 0 else 0
    n = abs(n)
    return ret + (n if n < 8 else min(8 + int(math.log(n / 8) / math.log(8) * 8), 15))

  expected = {
    0: 0,
    -1: 1,
    1: 17,
    -7: 7,
    7: 23,
    -8: 8,
    -9: 8,
    -12: 9,
    -16: 10,
    -32: 13,
    -63: 15,
    -64: 15,
    -1000: 15,
    8: 24,
    16: 26,
    100: 31,
  }
  for rp, bucket in expected.items():
    assert by_hand(rp) == bucket, rp
  rps = np.array(list(expected))
  assert ov.relative_position_bucket(rps, 32, 64).tolist() == list(expected.values())
  assert ov.relative_position_bucket(np.arange(-200, 201)).tolist() == [
    by_hand(r) for r in range(-200, 201)
  ]
  # [q, k] matrix as the encoder builds it: memory - context.
  rel = np.arange(3)[None, :] - np.arange(3)[:, None]
  assert ov.relative_position_bucket(rel).tolist() == [[0, 17, 18], [1, 0, 17], [2, 1, 0]]


def test_layer_norms_batch_norm_gelu_hand_values():
  x = np.array([[1.0, 2.0, 3.0]])
  s = math.sqrt(1.5)  # biased variance 2/3, plus eps 5/6
  ln = ov.layer_norm(x, np.array([1.0, 2.0, 1.0]), np.array([0.0, 0.0, 0.5]), 5 / 6)
  assert np.allclose(ln, [[-1 / s, 0.0, 1 / s + 0.5]], atol=1e-15, rtol=0)
  assert np.allclose(
    ov.layer_norm(x, 1.0, 0.0, 0.0), [[-math.sqrt(1.5), 0, math.sqrt(1.5)]], atol=1e-15, rtol=0
  )
  rms = ov.t5_layer_norm(np.array([3.0, 4.0]), np.array([1.0, 2.0]), 0.0)
  assert np.allclose(rms, [3 / math.sqrt(12.5), 8 / math.sqrt(12.5)], atol=1e-15, rtol=0)
  assert np.allclose(
    ov.t5_layer_norm(np.array([1.0, 1.0]), 1.0, 3.0), [0.5, 0.5], atol=1e-15, rtol=0
  )
  bn = ov.batch_norm(
    np.array([2.0, 0.0]),
    np.array([2.0, 1.0]),
    np.array([0.5, 0.0]),
    np.array([1.0, 1.0]),
    np.array([3.0, 0.0]),
    1.0,
  )
  assert np.allclose(bn, [1.5, -1.0], atol=1e-15, rtol=0)
  assert abs(ov.gelu(1.0) - 0.8413447460685429) < 1e-15
  assert abs(ov.gelu(-1.0) + 0.15865525393145707) < 1e-15
  assert ov.gelu(0.0) == 0.0


def test_t5_attention_is_unscaled_and_vit_attention_scaled():
  """A one-head, two-token attention with identity projections, worked by hand."""
  x = np.array([[[1.0, 0.0], [0.0, 2.0]]])
  eye = np.eye(2)
  w = {f'{n}/kernel': eye for n in 'qkvo'}
  w.update({f'{n}/bias': np.zeros(2) for n in 'qkvo'})
  scores = np.array([[1.0, 0.0], [0.0, 4.0]])
  for scale, s in ((False, scores), (True, scores / math.sqrt(2))):
    p = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    got = ov._attention(x, w, '', 1, None, scale=scale, use_bias=False)  # pylint: disable=protected-access
    assert np.allclose(got[0], p @ x[0], atol=1e-15, rtol=0)
  # A -1e9 additive mask removes a key entirely.
  masked = ov._attention(x, w, '', 1, np.array([0.0, -1e9]), scale=True, use_bias=True)  # pylint: disable=protected-access
  assert np.allclose(masked[0], np.repeat(x[0, :1], 2, axis=0), atol=1e-15, rtol=0)
