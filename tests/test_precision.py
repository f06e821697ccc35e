"""Sharding annotations, rematerialisation and bf16 compute of the VATT models.

logical axes  every parameter (and batch statistic) carries one logical name per dimension, from
              the fixed vocabulary the trainer's rules map to mesh axes; init works under a mesh.
remat         'none' / 'dots' / 'full' change what the backward pass stores, never the parameters,
              the loss or the gradients.
bf16          parameters stay float32, outputs are float32, matmuls run in bfloat16 while norms
              and softmax run in float32; results stay close to the float32 model.
"""

from __future__ import annotations

import contextlib
import functools
import io

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec

from tests.conftest import ROOT, load_config
from tests.test_models import random_like
from vatt_jax.losses import build_loss
from vatt_jax.models import PARAM_AXES, build_model, logical_specs
from vatt_jax.models.attention import MultiHeadSelfAttention
from vatt_jax.models.transformer import Encoder, EncoderSize

# Logical names the trainer's rules know (None: this dimension is never sharded).
ALLOWED = set(PARAM_AXES) | {None}
BATCH = 2


def runlocal(name: str):
  return load_config(ROOT / 'configs' / f'{name}.py', 'runlocal')


def make_batch(model_cfg, batch_size=BATCH, seed=0):
  rng = np.random.default_rng(seed)
  v, a, t = model_cfg.video, model_cfg.audio, model_cfg.text
  ids = rng.integers(1, t.vocab_size, size=(batch_size, t.num_narrations, t.max_words))
  ids[:, :, t.max_words // 2 :] *= rng.integers(0, 2, size=(batch_size, t.num_narrations, 1))
  return {
    'video': rng.uniform(-1, 1, (batch_size, v.num_frames, v.frame_size, v.frame_size, 3)).astype(
      np.float32
    ),
    'audio': rng.uniform(-1, 1, (batch_size, a.num_samples)).astype(np.float32),
    'text': ids.astype(np.int32),
  }


def abstract_variables(model, batch):
  """{'params', 'batch_stats'} of a contract model as ShapeDtypeStructs (model.init traced)."""
  return jax.eval_shape(lambda b: model.init(jax.random.key(0), b), batch)


def random_variables(model, batch, seed=0):
  """Random float32 variables shaped like the model's (initialising for real costs a compile)."""
  return random_like(abstract_variables(model, batch), seed)


def unboxed_init(module, *args, **kwargs):
  """A flax module's variables without the logical-partitioning boxes."""
  return nn.meta.unbox(module.init(jax.random.key(0), *args, **kwargs))


def flat_paths(tree):
  return {'/'.join(p): leaf for p, leaf in traverse_util.flatten_dict(tree).items()}


# ----------------------------------------------------------------------------------------------
# Logical axes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['vatt_bbs', 'vatt_ma_medium'])
def test_every_variable_has_logical_axes_from_the_vocabulary(name):
  cfg = runlocal(name).model
  model = build_model(cfg)
  batch = make_batch(cfg)
  specs = logical_specs(model, batch)
  abstract = abstract_variables(model, batch)
  assert set(specs) == {'params', 'batch_stats'}
  used = set()
  for collection in ('params', 'batch_stats'):
    leaves = flat_paths(abstract[collection])
    spec_leaves = flat_paths(specs[collection])
    assert spec_leaves.keys() == leaves.keys(), collection
    for path, leaf in leaves.items():
      spec = spec_leaves[path]
      assert isinstance(spec, PartitionSpec), path
      assert len(spec) == leaf.ndim, (path, spec, leaf.shape)
      assert set(spec) <= ALLOWED, (path, spec)
      named = [n for n in spec if n is not None]
      assert len(named) == len(set(named)), (path, spec)  # flax refuses a name twice
      assert named, (path, spec)  # every variable can be sharded along some axis
      used |= set(named)
  assert used == set(PARAM_AXES)
  for path, spec in flat_paths(specs['batch_stats']).items():
    assert spec == PartitionSpec('common'), path


def test_logical_axes_per_parameter_kind():
  specs = flat_paths(logical_specs(build_model(runlocal('vatt_bbs').model), make_batch(
    runlocal('vatt_bbs').model))['params'])  # fmt: skip
  block = 'video_tower/encoder/block_00'
  want = {
    f'{block}/attention/query/kernel': ('embed', 'heads', 'kv'),
    f'{block}/attention/key/bias': ('heads', 'kv'),
    f'{block}/attention/out/kernel': ('heads', 'kv', 'embed'),
    f'{block}/attention/out/bias': ('embed',),
    f'{block}/mlp/fc1/kernel': ('embed', 'mlp'),
    f'{block}/mlp/fc1/bias': ('mlp',),
    f'{block}/mlp/fc2/kernel': ('mlp', 'embed'),
    f'{block}/mlp/fc2/bias': ('embed',),
    f'{block}/norm_attention/scale': ('embed',),
    'video_tower/encoder/final_norm/bias': ('embed',),
    'video_tower/tokenizer/patch/kernel': ('patch', 'embed'),
    'video_tower/tokenizer/temporal_position': ('positions', 'embed'),
    'audio_tower/tokenizer/position': ('positions', 'embed'),
    'text_tower/tokenizer/vocabulary/embedding': ('vocab', 'embed'),
    'text_tower/relative_bias/rel_embedding': ('positions', 'heads'),
    'video_tower/agg': ('embed',),
    'audio_tower/agg': ('embed',),
    'head/video_va_1_dense/kernel': ('embed', 'common'),
    'head/video_va_2_dense/kernel': (None, 'common'),
    'head/text_vt_bn/scale': ('common',),
  }
  for path, names in want.items():
    assert tuple(specs[path]) == names, path


def test_init_and_forward_under_a_mesh_with_rules():
  # nn.DenseGeneral initialises its multi-dimensional kernels flat and unboxes them before the
  # reshape: with a mesh set, a plain logical box would constrain the flat kernel and fail.
  cfg = runlocal('vatt_bbs').model
  model = build_model(cfg)
  batch = make_batch(cfg)
  mesh = jax.make_mesh(
    (1, 1, 1), ('data', 'fsdp', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  rules = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('vocab', 'model'),
  )
  variables = random_variables(model, batch)
  forward = jax.jit(functools.partial(model.module.apply, train=False))
  attention = MultiHeadSelfAttention(num_heads=2)
  x = np.ones((2, 3, 8), np.float32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = abstract_variables(model, batch)
    assert jax.tree.structure(abstract) == jax.tree.structure(variables)
    lowered = forward.lower(variables, batch).as_text()
    boxed = jax.eval_shape(lambda x: attention.init(jax.random.key(0), x), x)
    specs = nn.get_partition_spec(boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    init = jax.jit(lambda x: attention.init(jax.random.key(0), x), out_shardings=shardings)
    kernel = nn.meta.unbox(init(x))['params']['query']['kernel']
  assert kernel.sharding.spec == PartitionSpec('fsdp', 'model', None)
  assert 'sharding_constraint' in lowered  # the residual-stream constraints are active here
  # Without rules the constraints are no-ops.
  assert 'sharding_constraint' not in forward.lower(variables, batch).as_text()


# ----------------------------------------------------------------------------------------------
# Rematerialisation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['vatt_bbs', 'vatt_ma_medium'])
def test_remat_keeps_the_parameter_tree(name):
  config = runlocal(name)
  batch = make_batch(config.model)
  trees = {}
  for remat in ('none', 'dots', 'full'):
    config.model.remat = remat
    model = build_model(config.model)
    abstract = abstract_variables(model, batch)
    trees[remat] = (
      jax.tree.map(lambda a: (a.shape, a.dtype), abstract),
      logical_specs(model, batch),
    )
  assert trees['dots'] == trees['none']
  assert trees['full'] == trees['none']


@pytest.mark.parametrize('deterministic', [True, False])
def test_remat_policies_keep_loss_and_gradients(deterministic):
  # A tiny encoder with every input a block takes: key mask, attention bias on all layers, and in
  # training mode dropout on activations and attention probabilities (remat must replay the draws).
  size = EncoderSize(num_layers=2, width=16, mlp_dim=32, num_heads=2)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 16)).astype(np.float32)
  mask = np.ones((2, 5), bool)
  mask[1, 3:] = False
  bias = rng.normal(size=(1, 2, 5, 5)).astype(np.float32)
  make = functools.partial(
    Encoder, size=size, dropout_rate=0.1, attention_dropout_rate=0.1, bias_all_layers=True
  )
  params = jax.jit(lambda x: unboxed_init(make(), x, mask=mask))(x)['params']
  results, residuals = {}, {}
  for remat in ('none', 'dots', 'full'):
    encoder = make(remat=remat)
    abstract = jax.eval_shape(lambda x, e=encoder: unboxed_init(e, x), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract['params']) == jax.tree.map(
      lambda a: (a.shape, a.dtype), params
    )

    def loss(params, bias, encoder=encoder):
      y = encoder.apply(
        {'params': params},
        x,
        mask=mask,
        bias=bias,
        deterministic=deterministic,
        rngs={'dropout': jax.random.key(1)},
      )
      return jnp.sum(jnp.sin(y))

    results[remat] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, bias)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      jax.ad_checkpoint.print_saved_residuals(loss, params, bias)
    residuals[remat] = len(printed.getvalue().splitlines())

  value, grads = results['none']
  # Some gradients are zero up to round-off (a key bias shifts a softmax row by a constant).
  atol = 1e-6 * max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
  for remat in ('dots', 'full'):
    other_value, other_grads = results[remat]
    np.testing.assert_allclose(other_value, value, rtol=1e-5)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads), strict=True):
      np.testing.assert_allclose(h, g, rtol=1e-5, atol=atol)
  # What the backward pass keeps shrinks with the policy.
  assert residuals['none'] > residuals['dots'] > residuals['full'], residuals


def test_bad_remat_names_the_field():
  cfg = runlocal('vatt_bbs').model
  cfg.remat = 'everything'
  with pytest.raises(ValueError, match='config model.remat'):
    build_model(cfg)


# ----------------------------------------------------------------------------------------------
# bf16 compute
# ----------------------------------------------------------------------------------------------


def _equations(jaxpr):
  """All equations of a jaxpr, sub-jaxprs (jit, custom_jvp, checkpoint, ...) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _equations(sub)


def _relative_error(got, want):
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.slow  # ~10 s; the fast tier keeps the remat checks
def test_bfloat16_compute_with_float32_parameters_and_outputs():
  config = runlocal('vatt_bbs')
  batch = make_batch(config.model)
  fp32 = build_model(config.model)
  variables = random_variables(fp32, batch)
  config.model.dtype = 'bfloat16'
  bf16 = build_model(config.model)

  abstract = abstract_variables(bf16, batch)
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}

  loss_fn = build_loss(config.loss)

  def loss(model, params):
    out = model.module.apply({**variables, 'params': params}, batch, train=False)
    return loss_fn(out, batch)[0], out

  grad = lambda model: jax.jit(jax.grad(functools.partial(loss, model), has_aux=True))  # noqa: E731
  reference, want = grad(fp32)(variables['params'])
  grads, got = grad(bf16)(variables['params'])
  assert got.keys() == want.keys()
  for key in got:
    assert got[key].dtype == jnp.float32, key
    assert _relative_error(np.asarray(got[key]), np.asarray(want[key])) < 5e-2, key
  flat, flat_ref = (
    np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)]) for t in (grads, reference)
  )
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert np.all(np.isfinite(flat))
  cosine = flat @ flat_ref / (np.linalg.norm(flat) * np.linalg.norm(flat_ref))
  assert cosine > 0.98, cosine

  # Matmuls of the encoders in bf16; softmax (exp) and norms (rsqrt) in float32.
  jaxpr = jax.make_jaxpr(functools.partial(bf16.module.apply, train=False))(variables, batch)
  eqns = list(_equations(jaxpr.jaxpr))
  dot_inputs = [
    tuple(v.aval.dtype for v in e.invars) for e in eqns if e.primitive.name == 'dot_general'
  ]
  assert sum(d == (jnp.bfloat16, jnp.bfloat16) for d in dot_inputs) >= 6 * 2 * 3  # 6 per block
  for name in ('exp', 'rsqrt'):
    dtypes = {e.invars[0].aval.dtype for e in eqns if e.primitive.name == name}
    assert dtypes == {jnp.dtype(jnp.float32)}, (name, dtypes)
