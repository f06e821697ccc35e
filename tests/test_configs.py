"""No config rots: every file in configs/ builds at `runlocal` size and trains a step."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tests.conftest import CONFIG_FILES, load_config
from vatt_jax import cli
from vatt_jax.train import trainer

REQUIRED_FIELDS = (
    'seed', 'total_steps', 'batch_size', 'log_steps', 'checkpoint_steps', 'keep_checkpoints',
    'model', 'data', 'loss', 'optimizer', 'mesh',
)  # fmt: skip


def test_every_experiment_config_is_found():
  names = {p.stem for p in CONFIG_FILES}
  assert {'vatt_bbs', 'vatt_mbs', 'vatt_lbs', 'vatt_ma_medium', 'demo_tiny'} <= names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.stem)
def test_config_has_recipe_and_fields(path):
  config = load_config(path)
  for field in REQUIRED_FIELDS:
    assert field in config, f'{path.name} lacks top-level field {field!r}'
  text = path.read_text()
  assert 'python scripts/train.py' in text or 'make demo' in text, 'docstring gives no command'


# The fast tier trains VATT's and the classifier's demo configs (Norton's post-training steps are
# in the fast tier's test_norton_training); the full suite trains every one.
FAST = ('demo_tiny', 'finetune_demo')


@pytest.mark.parametrize(
  'path',
  [pytest.param(p, marks=() if p.stem in FAST else pytest.mark.slow) for p in CONFIG_FILES],
  ids=lambda p: p.stem,
)
def test_config_trains_one_step_at_runlocal(path, tmp_path):
  config = load_config(path, 'runlocal')
  config.total_steps = 2
  history = trainer.train(config, str(tmp_path))
  assert [h['step'] for h in history] == [1, 2]
  assert all(np.isfinite(h['loss']) and h['nonfinite_steps'] == 0 for h in history)
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['model']['name'] == config.model.name
  assert saved['data']['num_frames'] == config.model.video.num_frames  # references resolved
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert json.loads(lines[-1])['step'] == 2


@pytest.mark.parametrize('name', ['vatt_bbs', 'vatt_mbs', 'vatt_lbs', 'vatt_ma_medium'])
def test_paper_configs_hold_the_papers_recipe(name):
  config = load_config(f'configs/{name}.py')
  m, opt = config.model, config.optimizer
  assert (m.video.num_frames, m.video.frame_size, tuple(m.video.patch_size)) == (
    32,
    224,
    (4, 16, 16),
  )
  assert (m.audio.num_samples, m.audio.patch_size) == (153_600, 128)  # 3.2 s at 48 kHz
  assert (m.text.max_words, m.text.vocab_size, m.text.num_narrations) == (16, 2**16, 5)
  assert m.video.drop_token_rate == m.audio.drop_token_rate == 0.5
  assert (m.head.va_dim, m.head.vt_dim) == (512, 256)
  assert (opt.name, opt.learning_rate, opt.end_learning_rate) == ('adam', 1e-4, 5e-5)
  assert (opt.warmup_steps, opt.schedule, opt.eps) == (10_000, 'quarter_cosine', 1e-7)
  assert (config.total_steps, config.batch_size) == (500_000, 2048)
  assert (config.loss.temperature, config.loss.weight_va, config.loss.weight_vt) == (0.07, 1, 1)
  expected = {'vatt_bbs': 'base', 'vatt_mbs': 'medium', 'vatt_lbs': 'large'}
  if name in expected:
    assert (m.video.size, m.audio.size, m.text.size) == (expected[name], 'base', 'small')
  else:
    assert (m.backbone, m.shared_size) == ('modality_agnostic', 'medium')


def test_data_shapes_follow_model_overrides():
  config = load_config('configs/demo_tiny.py')
  config.model.video.num_frames = 4
  assert config.data.num_frames == 4


def test_bad_config_values_name_the_field(tmp_path):
  config = load_config('configs/demo_tiny.py', 'runlocal')
  config.batch_size = 3
  config.mesh.data = 2
  with pytest.raises(ValueError, match='mesh.data'):
    trainer.train(config, str(tmp_path))
  config = load_config('configs/demo_tiny.py', 'runlocal')
  config.optimizer.name = 'adagrad'
  with pytest.raises(ValueError, match='optimizer.name'):
    trainer.train(config, str(tmp_path))
  config = load_config('configs/demo_tiny.py', 'runlocal')
  config.loss.name = 'triplet'
  with pytest.raises(ValueError, match='loss.name'):
    trainer.train(config, str(tmp_path))


def _variants(path) -> tuple[str, ...]:
  spec = importlib.util.spec_from_file_location(f'_variants_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.VARIANTS


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.stem)
def test_unknown_variant_is_refused_naming_the_known_ones(path):
  known = _variants(path)
  assert 'runlocal' in known  # every config shrinks to a laptop run
  for arg in ('runloacl', 'runlocal,bogus'):
    with pytest.raises(cli.UserError) as error:
      load_config(path, arg)
    message = str(error.value)
    bad = 'runloacl' if arg == 'runloacl' else 'bogus'
    assert message.startswith(f"--config=configs/{path.name}:{arg}: unknown variant '{bad}';")
    assert message.endswith(f'configs/{path.name} knows {", ".join(sorted(known))}')
  for variant in known:  # every declared variant is accepted
    load_config(path, variant)
