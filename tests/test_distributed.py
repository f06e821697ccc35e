"""Training at scale: meshes, several processes, checkpoints, resume, preemption, guards.

Tests that need 8 devices run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
(the device count is fixed when JAX starts). Runs of scripts/train.py use the runlocal synthetic
config: its global batches do not depend on the number of processes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.conftest import ROOT

TRAIN = [
  sys.executable,
  str(ROOT / 'scripts' / 'train.py'),
  '--config=configs/vatt_bbs.py:runlocal',
]


def _env(devices: int = 1) -> dict:
  flags = os.environ.get('XLA_FLAGS', '')
  return dict(os.environ, XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={devices}')


def _run_python(code: str, devices: int = 8) -> dict:
  out = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)],
    cwd=ROOT, env=_env(devices), capture_output=True, text=True,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _params(workdir, step=None) -> dict:
  """Final parameters of a run (restored onto this process's one device) as numpy arrays."""
  code = f"""
    import json, numpy as np, jax
    from vatt_jax import workdir as workdir_lib
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager('{workdir}/checkpoints', item_handlers=workdir_lib.item_handlers())
    step = {step!r} if {step!r} is not None else manager.latest_step()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    stored = manager.item_metadata(step)['params'].tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), stored)
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
    flat = {{jax.tree_util.keystr(p): np.asarray(v).tolist()
             for p, v in jax.tree_util.tree_leaves_with_path(restored['params'])}}
    print(json.dumps({{'step': step, 'params': flat}}))
  """
  return _run_python(code, devices=1)


def _metrics(workdir) -> list[dict]:
  path = workdir / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


_MESHES = """
  import json, jax, numpy as np
  from tests.conftest import ROOT, load_config
  import data_pipelines
  from vatt_jax.train import sharding, trainer

  config = load_config(ROOT / 'configs' / 'vatt_bbs.py', 'runlocal')
  config.model.dropout_rate = config.model.attention_dropout_rate = 0.0
  batch = next(data_pipelines.build(config.data, 'train', batch_size=8))
  results = {}
  for shape in [(1, 1, 1), (8, 1, 1), (4, 2, 1), (4, 1, 2), (2, 2, 2)]:
    config.mesh.data, config.mesh.fsdp, config.mesh.model = shape
    mesh = sharding.make_mesh(config.mesh)
    program = trainer.build_program(config, mesh, batch)
    state = program.init(jax.random.key(0))
    specs = {str(s.spec) for s in jax.tree.leaves(program.shardings.params)}
    with jax.set_mesh(mesh):
      state, metrics = program.step(state, sharding.put_batch(batch, mesh))
    results['x'.join(map(str, shape))] = {
      'loss': float(metrics['loss']), 'loss_va': float(metrics['loss_va']),
      'params': [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)],
      'specs': sorted(specs),
    }
  print(json.dumps(results))
"""


@pytest.mark.slow  # subprocesses / 8 host devices, each compiling the step
def test_meshes_give_the_single_device_step():
  results = _run_python(_MESHES)
  one = results.pop('1x1x1')
  for shape, got in results.items():
    assert got['loss'] == pytest.approx(one['loss'], rel=1e-5), shape
    assert got['loss_va'] == pytest.approx(one['loss_va'], rel=1e-5), shape
    for a, b in zip(got['params'], one['params'], strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=shape)
  # The layouts differ: FSDP splits the width, the model axis the heads / MLP units.
  assert any('fsdp' in s for s in results['4x2x1']['specs'])
  assert any('model' in s for s in results['4x1x2']['specs'])
  assert any('fsdp' in s for s in results['2x2x2']['specs'])
  assert any('model' in s for s in results['2x2x2']['specs'])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow  # two subprocesses that each compile the step (~80 s): outside the CI budget
def test_two_processes_match_one(tmp_path):
  steps = ['--config.total_steps=3', '--config.checkpoint_steps=3', '--config.seed=3']
  one = subprocess.run(
    [*TRAIN, f'--workdir={tmp_path / "one"}', *steps, '--config.mesh.data=2'],
    cwd=ROOT, env=_env(2), capture_output=True, text=True,
  )  # fmt: skip
  assert one.returncode == 0, one.stderr[-3000:]
  port = _free_port()
  procs = [
    subprocess.Popen(
      [
        *TRAIN,
        f'--workdir={tmp_path / "two"}',
        *steps,
        f'--coordinator_address=localhost:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ],
      cwd=ROOT,
      env=_env(1),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )  # fmt: skip
    for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate()
    assert p.returncode == 0, err[-3000:]
  a, b = _metrics(tmp_path / 'one'), _metrics(tmp_path / 'two')
  assert [r['step'] for r in a] == [r['step'] for r in b] == [1, 2, 3]
  for x, y in zip(a, b, strict=True):
    assert y['loss'] == pytest.approx(x['loss'], rel=1e-5)
  pa, pb = _params(tmp_path / 'one'), _params(tmp_path / 'two')
  assert pa['step'] == pb['step'] == 3
  for key in pa['params']:
    np.testing.assert_allclose(pb['params'][key], pa['params'][key], rtol=1e-5, atol=1e-7)


def _wait_for_step(workdir, step: int, proc) -> int:
  """Waits (without a clock: CI's own limit is the only one) until the run logged `step`."""
  while True:
    done = _metrics(workdir)
    if done and done[-1]['step'] >= step:
      return done[-1]['step']
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.05)


@pytest.fixture(scope='module')
def demo_shards(tmp_path_factory):
  """Record shards and a tokenizer in demo_tiny's layout (12 clips, {path}/train, tokenizer.model),
  written by tests/test_pipeline.py's helpers."""
  from data_pipelines import text as text_ops
  from tests.test_pipeline import WORDS, _record, _write

  root = tmp_path_factory.mktemp('demo_shards')
  _write(root / 'train' / 'a.tfrecord', [_record(i) for i in range(6)])
  _write(root / 'train' / 'b.tfrecord', [_record(i) for i in range(6, 12)])
  corpus = [f'{a} {b}' for a in WORDS for b in WORDS] * 3
  text_ops.train_tokenizer(corpus, str(root / 'tokenizer'), 64)
  return root


# The default demo config (configs/demo_tiny.py as it comes: real shards through the tf.data
# pipeline with the default data.deterministic), only shorter, smaller and without its evaluations.
_DEMO_RUN = """
  import sys
  from absl import logging
  from tests.conftest import ROOT, load_config
  from vatt_jax.train import trainer

  logging.set_verbosity(logging.INFO)
  config = load_config(ROOT / 'configs' / 'demo_tiny.py')
  assert config.data.deterministic  # the default
  config.data.path, config.evals = sys.argv[2], {}
  config.batch_size, config.data.shuffle_buffer = 4, 8
  config.total_steps, config.checkpoint_steps, config.log_steps = int(sys.argv[3]), 10, 1
  config.keep_checkpoints = 2
  trainer.train(config, sys.argv[1])
"""


def _demo_run(workdir, shards, total: int, **kwargs):
  command = [
    sys.executable,
    '-c',
    textwrap.dedent(_DEMO_RUN),
    str(workdir),
    str(shards),
    str(total),
  ]
  return subprocess.Popen(command, cwd=ROOT, env=_env(), text=True, **kwargs)


@pytest.mark.slow  # subprocesses: two runs of the demo config and a resumption
def test_same_seed_same_losses_and_kill_9_resumes_bit_for_bit(tmp_path, demo_shards):
  total = 40  # long enough that the kill lands mid-run
  straight = _demo_run(tmp_path / 'straight', demo_shards, total, stderr=subprocess.PIPE)
  assert straight.wait() == 0, straight.communicate()[1][-3000:]
  killed = tmp_path / 'killed'
  proc = _demo_run(killed, demo_shards, total, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  reached = _wait_for_step(killed, random.Random().randint(12, 30), proc)
  while not any(p.name.isdigit() for p in (killed / 'checkpoints').iterdir()):
    time.sleep(0.01)  # a finished checkpoint to resume from
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  before_kill = _metrics(killed)
  resumed = _demo_run(killed, demo_shards, total, stderr=subprocess.PIPE)
  _, err = resumed.communicate()
  assert resumed.returncode == 0, err[-3000:]
  assert 'resumed from' in err
  want = {r['step']: r['loss'] for r in _metrics(tmp_path / 'straight')}
  assert sorted(want) == list(range(1, total + 1))
  # Two runs with the same seed: the same losses, bit for bit (up to the kill) ...
  assert len(before_kill) >= reached and all(r['loss'] == want[r['step']] for r in before_kill)
  # ... and the resumed run continues them: every step it logged again and the ones after.
  after = _metrics(killed)[len(before_kill) :]
  assert after and after[-1]['step'] == total
  assert after[0]['step'] <= before_kill[-1]['step'] + 1  # from the last checkpoint before the kill
  assert all(r['loss'] == want[r['step']] for r in after), after
  a, b = _params(tmp_path / 'straight'), _params(killed)
  assert a['step'] == b['step'] == total
  for key in a['params']:
    np.testing.assert_array_equal(np.asarray(b['params'][key]), np.asarray(a['params'][key]))


@pytest.mark.slow  # subprocesses / 8 host devices, each compiling the step
def test_sigterm_checkpoints_the_step_it_arrived_at(tmp_path):
  proc = subprocess.Popen(
    [*TRAIN, f'--workdir={tmp_path}', '--config.total_steps=100000', '--config.log_steps=1',
     '--config.checkpoint_steps=100000'],
    cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  seen = _wait_for_step(tmp_path, 3, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate()
  assert proc.returncode == 0, err[-3000:]
  stopped = int(err.split('stopped by signal at step ')[1].split(';')[0])
  assert seen <= stopped <= seen + 5  # the step in flight when the signal came, or the next
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == [str(stopped)]
  assert _params(tmp_path)['step'] == stopped


_RESHARD = """
  import json, jax, numpy as np
  from tests.conftest import ROOT, load_config
  import data_pipelines
  from vatt_jax import workdir as workdir_lib
  from vatt_jax.train import checkpoint as ckpt, sharding, trainer

  config = load_config(ROOT / 'configs' / 'vatt_bbs.py', 'runlocal')
  batch = next(data_pipelines.build(config.data, 'train', batch_size=8))
  def program(shape, devices):
    config.mesh.data, config.mesh.fsdp, config.mesh.model = shape
    mesh = sharding.make_mesh(config.mesh, devices)
    return mesh, trainer.build_program(config, mesh, batch)
  report = {}
  for name, src, dst in [('8to1', ((2, 2, 2), jax.devices()), ((1, 1, 1), jax.devices()[:1])),
                         ('1to8', ((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), jax.devices()))]:
    mesh, p = program(*src)
    state = p.init(jax.random.key(1))
    with jax.set_mesh(mesh):
      state, _ = p.step(state, sharding.put_batch(batch, mesh))
    saver = ckpt.Checkpointer(f'{WORKDIR}/{name}', save_steps=1, keep=1)
    saver.save(1, state, {'step': 1}, force=True)
    saver.close()
    mesh2, p2 = program(*dst)
    restorer = ckpt.Checkpointer(f'{WORKDIR}/{name}', save_steps=1, keep=1)
    restored, position = restorer.restore(1, p2.abstract)
    restorer.close()
    leaves = lambda s: jax.tree.leaves(s.replace(rng=jax.random.key_data(s.rng)))
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(leaves(state), leaves(restored), strict=True))
    devices = {len(x.sharding.device_set) for x in jax.tree.leaves(restored.params)}
    params = workdir_lib.restore_params(f'{WORKDIR}/{name}', {'params': p2.abstract.params,
                                                             'batch_stats': p2.abstract.batch_stats})
    same_params = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                      zip(jax.tree.leaves(state.params), jax.tree.leaves(params['params'])))
    report[name] = {'same': same, 'devices': sorted(devices), 'position': position,
                    'same_params': same_params}
  print(json.dumps(report))
"""


@pytest.mark.slow  # subprocesses / 8 host devices, each compiling the step
def test_checkpoint_restores_onto_another_device_count(tmp_path):
  report = _run_python(_RESHARD.replace('{WORKDIR}', str(tmp_path)))
  assert report['8to1'] == {
    'same': True,
    'devices': [1],
    'position': {'step': 1},
    'same_params': True,
  }
  assert report['1to8']['same'] and report['1to8']['same_params']
  assert max(report['1to8']['devices']) > 1  # spread over the 8 devices again


@pytest.mark.slow  # subprocesses / 8 host devices, each compiling the step
def test_resume_with_another_model_is_refused(tmp_path):
  first = subprocess.run(
    [*TRAIN, f'--workdir={tmp_path}', '--config.total_steps=2', '--config.checkpoint_steps=2',
     '--profile_steps=1:2'],
    cwd=ROOT, env=_env(), capture_output=True, text=True,
  )  # fmt: skip
  assert first.returncode == 0, first.stderr[-3000:]
  assert list((tmp_path / 'profile').rglob('*.xplane.pb'))  # the jax.profiler trace of steps 1–2
  assert list(tmp_path.glob('events.out.tfevents.*'))  # TensorBoard scalars
  stored = (tmp_path / 'config.json').read_bytes()
  other = subprocess.run(
    [*TRAIN, f'--workdir={tmp_path}', '--config.total_steps=4', '--config.model.head.va_dim=48'],
    cwd=ROOT, env=_env(), capture_output=True, text=True,
  )  # fmt: skip
  assert other.returncode != 0
  assert 'model.head.va_dim: 32 in the stored run, 48 now' in other.stderr
  assert 'train step compiled' not in other.stderr  # refused before building or compiling
  assert (tmp_path / 'config.json').read_bytes() == stored  # the refused run wrote nothing
  # Longer training of the same model resumes.
  more = subprocess.run(
    [*TRAIN, f'--workdir={tmp_path}', '--config.total_steps=3', '--config.checkpoint_steps=3'],
    cwd=ROOT, env=_env(), capture_output=True, text=True,
  )  # fmt: skip
  assert more.returncode == 0, more.stderr[-3000:]
  assert [r['step'] for r in _metrics(tmp_path)] == [1, 2, 3]


@pytest.mark.slow  # subprocesses / 8 host devices, each compiling the step
def test_restore_params_refuses_another_model(tmp_path):
  code = f"""
    import json, jax
    from tests.conftest import ROOT, load_config
    import data_pipelines
    from vatt_jax import workdir as workdir_lib
    from vatt_jax.train import checkpoint as ckpt, sharding, trainer
    config = load_config(ROOT / 'configs' / 'vatt_bbs.py', 'runlocal')
    batch = next(data_pipelines.build(config.data, 'train', batch_size=8))
    mesh = sharding.make_mesh(config.mesh)
    p = trainer.build_program(config, mesh, batch)
    saver = ckpt.Checkpointer('{tmp_path}', save_steps=1, keep=1)
    saver.save(1, p.init(jax.random.key(0)), {{}}, force=True)
    saver.close()
    config.model.head.vt_dim = 24
    q = trainer.build_program(config, mesh, batch)
    try:
      workdir_lib.restore_params('{tmp_path}', {{'params': q.abstract.params,
                                                 'batch_stats': q.abstract.batch_stats}})
      print(json.dumps({{'error': None}}))
    except ValueError as e:
      print(json.dumps({{'error': str(e)}}))
  """
  error = _run_python(code, devices=1)['error']
  assert error and 'another model' in error and '(16,)' in error and '(24,)' in error


@pytest.mark.slow  # subprocesses / 8 host devices, each compiling the step
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
  import data_pipelines
  from tests.conftest import load_config
  from vatt_jax.train import trainer

  class Poisoned(data_pipelines.synthetic.SyntheticSource):
    """Synthetic batches, with NaN frames in the batches of the steps listed in `poison`."""

    poison = set()

    def __next__(self):
      batch = super().__next__()
      if self._step in self.poison:  # _step counts the batches given so far: the step's number
        batch['video'] = np.full_like(batch['video'], np.nan)
      return batch

  monkeypatch.setitem(data_pipelines.SOURCES, 'poisoned', Poisoned)
  config = load_config(ROOT / 'configs' / 'vatt_bbs.py', 'runlocal')
  config.data.name = 'poisoned'
  config.total_steps, config.checkpoint_steps, config.max_nonfinite_steps = 6, 2, 3
  Poisoned.poison = {2, 5}
  history = trainer.train(config, str(tmp_path / 'skip'))
  by_step = {r['step']: r for r in history}
  assert not np.isfinite(by_step[2]['loss']) and np.isfinite(by_step[3]['loss'])
  assert by_step[6]['nonfinite_steps'] == 2 and by_step[6]['nonfinite_run'] == 0

  Poisoned.poison = {3, 4, 5, 6}
  with pytest.raises(trainer.NonFiniteError, match='3 consecutive steps up to 5'):
    trainer.train(config, str(tmp_path / 'stop'))
  good = _params(tmp_path / 'stop', step=2)  # the last checkpoint before the run went bad
  assert all(np.isfinite(np.asarray(v)).all() for v in good['params'].values())


def test_print_topology_shows_the_mesh():
  out = subprocess.run(
    [sys.executable, 'scripts/print_topology.py', '--config=configs/vatt_bbs.py',
     '--config.mesh.fsdp=2', '--config.mesh.model=2'],
    cwd=ROOT, env=_env(8), capture_output=True, text=True,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 2, 'model': 2} over 8 devices" in out.stdout
  assert 'global batch 2048: 512 per data-parallel device' in out.stdout
  bad = subprocess.run(
    [sys.executable, 'scripts/print_topology.py', '--config.mesh.data=16'],
    cwd=ROOT, env=_env(8), capture_output=True, text=True,
  )  # fmt: skip
  assert bad.returncode != 0 and 'mesh.data=16' in bad.stderr


def test_checkpoints_kept_last_k_and_every_mth(tmp_path):
  import jax
  import jax.numpy as jnp

  from vatt_jax.train import checkpoint as ckpt
  from vatt_jax.train.state import TrainState

  def state(step):
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
      step=jnp.asarray(step, jnp.int32), params={'w': jnp.full((3,), float(step))},
      batch_stats={}, opt_state={'mu': jnp.zeros(3)}, rng=jax.random.key(step),
      nonfinite_steps=zero, nonfinite_run=zero,
    )  # fmt: skip

  saver = ckpt.Checkpointer(str(tmp_path), save_steps=2, keep=2, keep_period=4)
  saved = [s for s in range(1, 12) if saver.save(s, state(s), {'step': s}, force=s == 11)]
  saver.close()
  assert saved == [2, 4, 6, 8, 10, 11]
  assert ckpt.Checkpointer(str(tmp_path), save_steps=2, keep=2).all_steps() == [4, 8, 10, 11]
  restorer = ckpt.Checkpointer(str(tmp_path), save_steps=2, keep=2)
  abstract = jax.eval_shape(lambda: state(0))
  restored, position = restorer.restore(8, abstract)
  restorer.close()
  assert position == {'step': 8} and float(restored.params['w'][0]) == 8.0
  assert (jax.random.key_data(restored.rng) == jax.random.key_data(jax.random.key(8))).all()


@pytest.mark.slow  # subprocesses / 8 host devices, each compiling the step
def test_load_model_rebuilds_a_trained_run(tmp_path):
  import jax
  import jax.numpy as jnp

  from tests.conftest import load_config
  from vatt_jax import workdir as workdir_lib
  from vatt_jax.train import trainer

  config = load_config(ROOT / 'configs' / 'vatt_bbs.py', 'runlocal')
  config.total_steps, config.checkpoint_steps = 2, 1
  trainer.train(config, str(tmp_path))
  loaded, model, variables = workdir_lib.load_model(str(tmp_path))
  _, _, first = workdir_lib.load_model(str(tmp_path), step=1)
  assert loaded.model.to_dict() == json.loads(config.model.to_json_best_effort())
  now, before = jax.tree.leaves(variables['params']), jax.tree.leaves(first['params'])
  changed = [not np.array_equal(a, b) for a, b in zip(now, before, strict=True)]
  assert any(changed)  # step 2's parameters, not step 1's
  video = jnp.ones(model.example_batch(2)['video'].shape, jnp.float32)
  out = model.embed('video')(variables, video)
  assert out['va'].shape == (2, config.model.head.va_dim)
  assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
  with pytest.raises(FileNotFoundError, match='not a training workdir'):
    workdir_lib.load_model(str(tmp_path / 'nowhere'))
