"""Norton post-training: the config, trainable subsets (optimizer.trainable), init_from a VATT run
with its batch-norm statistics, and train steps with the Norton and the MIL-NCE losses."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import traverse_util

import data_pipelines
from tests.conftest import ROOT, load_config
from tests.test_finetune import _pretraining_workdir
from vatt_jax import workdir as workdir_lib
from vatt_jax.models import vatt_pretrained
from vatt_jax.optim import TRAINABLE, build_optimizer, trainable_labels
from vatt_jax.train import init_from, sharding, trainer

NORTON = ROOT / 'configs' / 'norton_demo.py'


def _paths(tree) -> dict[str, object]:
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A demo_tiny pretraining workdir whose batch-norm statistics are not the initial ones."""
  path = tmp_path_factory.mktemp('pretrain') / 'run'

  def edit(state):
    stats = jax.tree.map(lambda x: x + 0.5, state.batch_stats)
    return state.replace(batch_stats=stats)

  _pretraining_workdir(path, 'demo_tiny.py', edit)
  return path


def _program(arg: str, init_from=None, keep=lambda key: True):
  config = load_config(NORTON, arg)
  if init_from is not None:
    config.init_from = str(init_from)
  batch = next(data_pipelines.build(config.data, 'train', batch_size=config.batch_size))
  batch = {k: v for k, v in batch.items() if keep(k)}
  program = trainer.build_program(config, sharding.make_mesh(config.mesh), batch)
  return config, program, batch


def test_layernorm_preset_trains_exactly_the_layer_norms():
  config, program, _ = _program('runlocal')
  labels = _paths(trainable_labels('layernorm')(program.abstract.params))
  trained = sorted(p for p, label in labels.items() if label == 'train')
  assert trained and all(
    re.search(r'/(norm_attention|norm_mlp|final_norm)/(scale|bias)$', p) for p in trained
  )
  norms = [p for p in labels if re.search(r'norm_(attention|mlp)/|final_norm/', p)]
  assert sorted(norms) == trained  # every layer norm, nothing else (not the heads' batch norms)
  assert labels['head/video_vt_bn/scale'] == 'frozen'
  assert trainable_labels('all') is None and TRAINABLE['all'] == ''
  head = _paths(trainable_labels('^head/')(program.abstract.params))
  assert {p for p, label in head.items() if label == 'train'} == {
    p for p in head if p[:5] == 'head/'
  }


def test_trainable_errors():
  config = load_config(NORTON, 'runlocal')
  config.optimizer.trainable = 'no_such_parameter'
  tx, _ = build_optimizer(config.optimizer, config.total_steps)
  with pytest.raises(ValueError, match='trainable=.no_such_parameter. matches no parameter'):
    tx.init({'encoder': {'kernel': np.zeros(3)}})
  config.optimizer.trainable = '(unclosed'
  with pytest.raises(ValueError, match='not a regular expression'):
    build_optimizer(config.optimizer, config.total_steps)


def test_post_training_loads_the_vatt_with_its_statistics_and_trains_only_layer_norms(pretrained):
  config, program, batch = _program('runlocal,layernorm', init_from=pretrained)
  state = init_from.init_from_pretrained(program.init(jax.random.key(0)), program, str(pretrained))
  _, _, stored = workdir_lib.load_model(str(pretrained))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), stored['params'])
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(state.batch_stats), stored['batch_stats']
  )
  before = _paths(jax.device_get(state.params))
  for _ in range(2):  # the first step's learning rate is 0 (warm-up)
    state, metrics = program.step(state, jax.device_put(batch, program.batch))
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics['loss']) and metrics['nonfinite_steps'] == 0
  assert metrics['loss_clip'] > 0 and metrics['loss_paragraph'] > 0
  np.testing.assert_allclose(
    metrics['loss'], metrics['loss_clip'] + 0.1 * metrics['loss_paragraph'], rtol=1e-6
  )
  after = _paths(jax.device_get(state.params))
  labels = _paths(trainable_labels('layernorm')(jax.device_get(state.params)))
  moved = {p for p in before if not np.array_equal(before[p], after[p])}
  assert moved and moved <= {p for p, label in labels.items() if label == 'train'}


def test_milnce_baseline_steps_without_an_audio_term():
  config, program, batch = _program('runlocal,milnce', keep=lambda k: not k.startswith('audio'))
  assert config.loss.name == 'vatt' and config.loss.weight_va == 0
  state = program.init(jax.random.key(0))
  state, metrics = program.step(state, jax.device_put(batch, program.batch))
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics['loss']) and metrics['loss_va'] == 0.0
  np.testing.assert_allclose(metrics['loss'], metrics['loss_vt'], rtol=1e-6)


def test_post_training_on_video_and_text_only_loads_a_vatt_pretrained_with_audio(pretrained):
  # Long-video shards carry no audio (data.modalities video, text): the model is built without the
  # audio head projections, which the pretraining checkpoint has. They are unused, not an error.
  config, program, batch = _program(
    'runlocal', init_from=pretrained, keep=lambda k: not k.startswith('audio')
  )
  assert not any(k.startswith('audio') for k in _paths(program.abstract.params['head']))
  state = init_from.init_from_pretrained(program.init(jax.random.key(0)), program, str(pretrained))
  _, _, stored = workdir_lib.load_model(str(pretrained))
  have, want = _paths(jax.device_get(state.params)), _paths(stored['params'])
  assert have.keys() < want.keys()
  for path, value in have.items():
    np.testing.assert_array_equal(value, want[path])
  # Anything else of the head must still match: a head leaf of another shape is refused.
  params = jax.device_get(program.abstract.params)
  bad = dict(stored['params'], head=dict(stored['params']['head']))
  bad['head']['video_vt_bn'] = {'scale': np.zeros(3), 'bias': np.zeros(3)}
  with pytest.raises(ValueError, match='head/video_vt_bn'):
    program.model.load_pretrained(params, bad)
  assert vatt_pretrained.head_of_built_modalities(stored['params'], {}) is stored['params']
