"""The training step and loop: schedule, optimizer, loss falls, non-finite guard, global negatives."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_pipelines
from tests.conftest import ROOT, load_config
from vatt_jax.models import build_model
from vatt_jax.optim import build_optimizer, build_schedule
from vatt_jax.train import trainer
from vatt_jax.train.state import init_train_state
from vatt_jax.train.step import make_train_step


def test_quarter_period_cosine_schedule():
  config = load_config(ROOT / 'configs' / 'vatt_bbs.py').optimizer
  schedule = build_schedule(config, 500_000)
  peak, end, warmup, total = 1e-4, 5e-5, 10_000, 500_000
  for step in (0, 1, 5000, 9999, 10_000, 100_000, 255_000, 499_999, 500_000, 600_000):
    if step < warmup:
      expected = peak * step / warmup
    else:
      p = min(step - warmup, total - warmup) / (total - warmup)
      expected = end + (peak - end) * math.cos(math.pi / 2 * p)  # a quarter period of cosine
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-10), step


def test_linear_schedule_all_in_one():
  """ViLT / All-in-one: linear warm-up over 10 % of the run, then linear decay to 0."""
  config = load_config(ROOT / 'configs' / 'allinone_base.py').optimizer
  peak, warmup, total = 1e-4, 40_000, 400_000
  assert (config.schedule, config.learning_rate, config.end_learning_rate) == ('linear', peak, 0.0)
  schedule = build_schedule(config, total)
  for step in (0, 1, 20_000, 39_999, 40_000, 40_001, 220_000, 399_999, 400_000, 500_000):
    if step < warmup:
      expected = peak * step / warmup
    else:
      expected = peak * (1 - min(step - warmup, total - warmup) / (total - warmup))
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-10), step


def test_adam_uses_the_configured_epsilon():
  config = load_config(ROOT / 'configs' / 'vatt_bbs.py').optimizer
  config.schedule = 'constant'
  tx, _ = build_optimizer(config, 10)
  params = {'w': jnp.zeros(3)}
  grads = {'w': jnp.array([1e-7, -3e-7, 1e-3])}
  updates, _ = tx.update(grads, tx.init(params), params)
  g = np.asarray(grads['w'], np.float64)
  m_hat, v_hat = g, g * g  # first step: bias-corrected moments are g and g²
  expected = -1e-4 * m_hat / (np.sqrt(v_hat) + 1e-7)
  np.testing.assert_allclose(np.asarray(updates['w']), expected, rtol=1e-4)


@pytest.mark.slow  # trains 80 steps, or runs subprocesses
def test_demo_loss_falls(tmp_path):
  config = load_config(ROOT / 'configs' / 'demo_tiny.py')
  config.data.name = 'synthetic'  # the shard path is tested end to end in test_pipeline.py
  config.evals = {}  # demo_tiny's evals read the demo's segment shards
  config.total_steps, config.log_steps, config.optimizer.warmup_steps = 80, 10, 10
  history = trainer.train(config, str(tmp_path))
  losses = [h['loss'] for h in history]
  assert all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < losses[0] - 0.5, losses
  assert history[-1]['learning_rate'] < history[1]['learning_rate']  # decayed after warm-up
  logged = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in logged] == [h['step'] for h in history]


def _tiny_setup():
  config = load_config(ROOT / 'configs' / 'vatt_bbs.py', 'runlocal')
  model = build_model(config.model)
  tx, schedule = build_optimizer(config.optimizer, config.total_steps)
  batch = next(data_pipelines.build(config.data, 'train', batch_size=config.batch_size))
  state = init_train_state(model, tx, batch, jax.random.key(0))
  step = jax.jit(make_train_step(model.objective(config.loss), tx, schedule))
  return state, step, batch


@pytest.mark.slow
def test_nonfinite_step_is_rejected_and_counted():
  state, step, batch = _tiny_setup()
  bad = dict(batch, video=np.full_like(batch['video'], np.nan))
  new_state, metrics = step(state, bad)
  assert not np.isfinite(float(metrics['loss']))
  assert int(new_state.nonfinite_steps) == 1 and int(new_state.step) == 1
  for old, new in zip(
    jax.tree.leaves(state.params), jax.tree.leaves(new_state.params), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
  # The schedule follows applied updates: the first good step runs at schedule(0) (= 0 here).
  good_state, metrics = step(new_state, batch)
  assert np.isfinite(float(metrics['loss'])) and int(good_state.nonfinite_steps) == 1
  assert float(metrics['learning_rate']) == 0.0
  good_state, metrics = step(good_state, batch)
  assert float(metrics['learning_rate']) > 0.0
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state.params, good_state.params)
  assert all(jax.tree.leaves(changed)), 'every parameter moves once the learning rate is positive'


_SHARDED_SCRIPT = textwrap.dedent(
  """
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, '.')
    import data_pipelines
    from tests.conftest import load_config
    from vatt_jax.models import build_model
    from vatt_jax.optim import build_optimizer
    from vatt_jax.train import sharding
    from vatt_jax.train.state import init_train_state
    from vatt_jax.train.step import make_train_step

    config = load_config('configs/vatt_bbs.py', 'runlocal')
    config.model.dropout_rate = config.model.attention_dropout_rate = 0.0
    model = build_model(config.model)
    tx, schedule = build_optimizer(config.optimizer, config.total_steps)
    batch = next(data_pipelines.build(config.data, 'train', batch_size=8))
    results = {}
    for devices in (1, 8):
      config.mesh.data = devices
      mesh = sharding.make_mesh(config.mesh)
      state = jax.jit(lambda r: init_train_state(model, tx, batch, r),
                      out_shardings=sharding.replicated(mesh))(jax.random.key(0))
      step = jax.jit(make_train_step(model.objective(config.loss), tx, schedule),
                     in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)))
      global_batch = sharding.put_batch(batch, mesh)
      assert len(global_batch['video'].sharding.device_set) == devices
      state, metrics = step(state, global_batch)
      leaves = jax.tree.leaves(state.params)
      results[devices] = {'loss': float(metrics['loss']), 'loss_va': float(metrics['loss_va']),
                          'param_sum': float(sum(np.abs(np.asarray(x)).sum() for x in leaves))}
    print(json.dumps({'devices': jax.device_count(), 'results': results}))
    """
)


@pytest.mark.slow  # trains 80 steps, or runs subprocesses
def test_negatives_span_the_global_batch_under_data_parallelism():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run(
    [sys.executable, '-c', _SHARDED_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report['devices'] == 8
  one, eight = report['results']['1'], report['results']['8']
  # One sample per device: per-device negatives would give NCE = log 2; global ones do not.
  assert one['loss_va'] > 1.5 * math.log(2)
  for key in one:
    assert eight[key] == pytest.approx(one[key], rel=1e-4), key


@pytest.mark.slow  # trains 80 steps, or runs subprocesses
def test_train_script_writes_config_and_metrics(tmp_path):
  out = subprocess.run(
      [sys.executable, 'scripts/train.py', '--config=configs/vatt_bbs.py:runlocal',
       f'--workdir={tmp_path}', '--config.total_steps=2', '--config.seed=7'],
      cwd=ROOT, capture_output=True, text=True,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['seed'] == 7 and saved['total_steps'] == 2
  assert len((tmp_path / 'metrics.jsonl').read_text().splitlines()) == 2
