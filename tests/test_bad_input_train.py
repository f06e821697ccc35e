"""Training on bad input ends in one line and leaves the workdir as it was (docs/failures_train.md).

Nothing is written before a run is accepted: a refused resume, a failing run and a bad config leave
an existing workdir byte for byte, and a new one uncreated. A damaged latest checkpoint is skipped
for the one before it; a full disk at a checkpoint ends the run in one line naming the directory.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest

from tests.conftest import ROOT, load_config
from vatt_jax import cli
from vatt_jax.optim import build_schedule
from vatt_jax.train import checkpoint as ckpt
from vatt_jax.train import trainer


def _config(**fields):
  """demo_tiny at runlocal (the tiny model, synthetic data), with top-level fields changed."""
  config = load_config(ROOT / 'configs' / 'demo_tiny.py', 'runlocal')
  config.update(fields)
  return config


def _missing_shards(config, path):
  """The config reading record shards from `path` (which does not exist)."""
  config.data.name, config.data.path = 'shards', str(path)
  config.data.sample_rate = 5120  # runlocal's 2048 samples last its 4 frames at 10 fps
  return config


def _snapshot(root) -> dict[str, str]:
  """Every file and directory under `root` → the hash of its bytes ('dir' for a directory)."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(folder, name), root)] = 'dir'
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished 4-step run of demo_tiny:runlocal with checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  history = trainer.train(_config(total_steps=4, checkpoint_steps=2), str(workdir))
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4']
  return workdir, {r['step']: r['loss'] for r in history}


def _copy(trained, tmp_path):
  import shutil

  workdir = tmp_path / 'run'
  shutil.copytree(trained[0], workdir)
  return workdir


@pytest.mark.slow  # a 4-step run as fixture, then resumes (~30 s with the next test)
def test_refused_or_failing_resume_leaves_the_workdir_as_it_was(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  before = _snapshot(workdir)
  other = _config(total_steps=6, checkpoint_steps=2)
  other.model.head.va_dim = 48  # another model
  with pytest.raises(ValueError, match='model.head.va_dim: 32 in the stored run, 48 now'):
    trainer.train(other, str(workdir))
  assert _snapshot(workdir) == before
  broken = _config(total_steps=6, checkpoint_steps=2, seed=5)  # config.json would change
  _missing_shards(broken, tmp_path / 'no_such_shards')
  with pytest.raises((ValueError, OSError), match='no_such_shards'):
    trainer.train(broken, str(workdir))
  assert _snapshot(workdir) == before


@pytest.mark.parametrize(
  'change, match',
  [
    (dict(batch_size=0), 'config batch_size=0 must be a positive integer'),
    (dict(batch_size=-8), 'config batch_size=-8 must be a positive integer'),
    (dict(total_steps=0), 'config total_steps=0 must be a positive integer'),
    (dict(log_steps=0), 'config log_steps=0 must be a positive integer'),
    (dict(data_path='missing'), 'missing'),
  ],
)
def test_a_new_run_that_fails_creates_nothing(change, match, tmp_path):
  config = _config()
  if 'data_path' in change:
    _missing_shards(config, tmp_path / change.pop('data_path'))
  config.update(change)
  workdir = tmp_path / 'new' / 'run'
  with pytest.raises((ValueError, OSError), match=match):
    trainer.train(config, str(workdir))
  assert not (tmp_path / 'new').exists()


def test_unwritable_workdir_is_named_before_any_work(tmp_path, monkeypatch):
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(cli.UserError, match='a_file is a file; choose a directory'):
    trainer.check_workdir(str(tmp_path / 'a_file' / 'run'))
  locked = tmp_path / 'locked'
  locked.mkdir()
  real_access = os.access
  monkeypatch.setattr(os, 'access', lambda p, mode: str(p) != str(locked) and real_access(p, mode))
  with pytest.raises(cli.UserError, match=f'--workdir {locked} is not writable'):
    trainer.train(_config(), str(locked))
  with pytest.raises(cli.UserError, match=f'cannot be created: {locked} is not writable'):
    trainer.train(_config(), str(locked / 'run'))
  assert list(locked.iterdir()) == []


def test_warmup_longer_than_the_run_is_fitted_with_a_warning(caplog):
  optimizer = _config().optimizer
  optimizer.warmup_steps, optimizer.learning_rate = 30, 1.0
  with caplog.at_level(logging.WARNING):
    schedule = build_schedule(optimizer, 10)
  assert 'config optimizer.warmup_steps=30 does not end before total_steps=10' in caplog.text
  assert float(schedule(5)) == pytest.approx(1.0)  # the peak, after 5 warm-up steps
  assert float(schedule(2)) == pytest.approx(0.4)
  optimizer.warmup_steps = -1
  with pytest.raises(ValueError, match='optimizer.warmup_steps=-1'):
    build_schedule(optimizer, 10)


def _damage(step_dir):
  """Truncates the largest array data file of a checkpoint step (a torn or partial copy)."""
  files = [p for p in step_dir.rglob('*') if p.is_file() and p.parent.name == 'd']
  largest = max(files, key=lambda p: p.stat().st_size)
  with open(largest, 'r+b') as f:
    f.truncate(largest.stat().st_size // 3)


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_previous(trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  _damage(workdir / 'checkpoints' / '4')
  damaged_bytes = _snapshot(workdir / 'checkpoints' / '4')
  config = _config(total_steps=6, checkpoint_steps=2, keep_checkpoints=2)
  with caplog.at_level(logging.WARNING):
    history = trainer.train(config, str(workdir))
  warning = next(r.getMessage() for r in caplog.records if 'is damaged' in r.getMessage())
  assert f'checkpoint step 4 in {workdir}/checkpoints is damaged (' in warning
  assert 'resuming from step 2 instead' in warning and '\n' not in warning
  # Step 3 again, from step 2's parameters and input position: the first run's loss, bit for bit
  # (later steps differ: the learning-rate schedule follows total_steps).
  losses = {r['step']: r['loss'] for r in history}
  assert sorted(losses) == [3, 4, 5, 6]
  assert losses[3] == trained[1][3]
  # The damaged step is kept aside, byte for byte; the new steps 4 and 6 are the last two.
  names = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  assert names == ['4', '4.damaged', '6']
  assert _snapshot(workdir / 'checkpoints' / '4.damaged') == damaged_bytes


@pytest.mark.slow
def test_no_restorable_checkpoint_is_one_line_and_touches_nothing(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  for step in ('2', '4'):
    _damage(workdir / 'checkpoints' / step)
  before = _snapshot(workdir)
  with pytest.raises(cli.UserError, match='no checkpoint in .* can be restored') as error:
    trainer.train(_config(total_steps=6, checkpoint_steps=2), str(workdir))
  assert 'step 4: ' in str(error.value) and 'step 2: ' in str(error.value)
  assert '\n' not in str(error.value)
  assert _snapshot(workdir) == before


def test_full_disk_at_a_checkpoint_is_one_line(tmp_path, monkeypatch, capfd):
  async def full_disk(self, item, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / 'metadata'))

  monkeypatch.setattr(ocp.JsonCheckpointHandler, '_save_fn', full_disk)
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  workdir = tmp_path / 'run'
  with pytest.raises(ckpt.CheckpointWriteError) as error:
    trainer.train(_config(total_steps=4, checkpoint_steps=2), str(workdir))
  message = cli.describe(error.value)
  assert message.startswith(
    f'could not write the checkpoint of step 2 into {workdir}/checkpoints: no space left on the '
    'device'
  )
  assert '\n' not in message
  assert 'Traceback' not in capfd.readouterr().err
  assert not any(p.name.isdigit() for p in (workdir / 'checkpoints').iterdir())


@pytest.mark.slow  # subprocesses: the last line of stderr as a user sees it
@pytest.mark.parametrize(
  'args, line',
  [
    (['--config.batch_size=3'], "error: config batch_size=3 (global) does not divide over the 2 "
     "devices of the mesh axes ('data', 'fsdp')"),
    (['--config.batch_size=0'], 'error: config batch_size=0 must be a positive integer'),
  ],
)  # fmt: skip
def test_script_ends_in_one_line(args, line, tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
  env.pop(cli.TRACEBACK_ENV, None)
  out = subprocess.run(
    [sys.executable, 'scripts/train.py', '--config=configs/demo_tiny.py:runlocal',
     f'--workdir={tmp_path / "run"}', *args],
    cwd=ROOT, env=env, capture_output=True, text=True,
  )  # fmt: skip
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith(line), out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  assert not (tmp_path / 'run').exists()


def test_checkpointer_opens_nothing_until_the_run_is_accepted(tmp_path):
  saver = ckpt.Checkpointer(str(tmp_path / 'run'), save_steps=1, keep=1)
  assert saver.latest_step() is None and saver.all_steps() == []
  saver.close()
  assert not (tmp_path / 'run').exists()
  saver = ckpt.Checkpointer(str(tmp_path / 'run'), save_steps=1, keep=1)
  saver.open()
  saver.close()
  assert os.listdir(tmp_path / 'run' / 'checkpoints') == []
