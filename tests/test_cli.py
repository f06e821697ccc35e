"""The entry points' one-line errors (vatt_jax/cli.py)."""

from __future__ import annotations

import errno

import pytest

from vatt_jax import cli


def _run_guarded(main, monkeypatch, capsys, traceback=False):
  if traceback:
    monkeypatch.setenv(cli.TRACEBACK_ENV, '1')
  else:
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  with pytest.raises(SystemExit) as exit_info:
    cli.guard(main)(['prog'])
  return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
  'error, line',
  [
    (cli.UserError('config batch_size=0 must be positive'), 'config batch_size=0 must be positive'),
    (ValueError('bad\n  value'), 'bad value'),
    (OSError(errno.ENOSPC, 'No space left on device', '/w/ckpt'), 'no space left on the device: /w/ckpt'),
    (PermissionError(errno.EACCES, 'Permission denied', '/ro/out'), 'permission denied: /ro/out'),
    (FileNotFoundError(errno.ENOENT, 'No such file or directory', 'x.jsonl'),
     'No such file or directory: x.jsonl'),
  ],
)  # fmt: skip
def test_expected_errors_end_in_one_line(error, line, monkeypatch, capsys):
  def main(argv):
    raise error

  code, err = _run_guarded(main, monkeypatch, capsys)
  assert code == cli.EXIT_ERROR
  assert err.strip().splitlines()[-1] == f'error: {line}'
  assert 'Traceback' not in err


def test_bugs_keep_their_traceback(monkeypatch, capsys):
  def main(argv):
    raise TypeError('a bug')

  with pytest.raises(TypeError):
    cli.guard(main)(['prog'])


def test_traceback_on_request(monkeypatch):
  def main(argv):
    raise ValueError('shown with its traceback')

  monkeypatch.setenv(cli.TRACEBACK_ENV, '1')
  with pytest.raises(ValueError):
    cli.guard(main)(['prog'])


def test_tensorflow_errors_are_one_line(monkeypatch, capsys):
  tf = pytest.importorskip('tensorflow')

  def main(argv):
    raise tf.errors.DataLossError(None, None, 'corrupted record at 12 in /d/train-00001.tfrecord')

  code, err = _run_guarded(main, monkeypatch, capsys)
  assert code == cli.EXIT_ERROR
  assert err.strip().splitlines()[-1] == 'error: corrupted record at 12 in /d/train-00001.tfrecord'


@pytest.mark.slow
@pytest.mark.parametrize(
  'arg, line',
  [
    ('--config=configs/demo_tiny.py:runloacl',
     "error: --config=configs/demo_tiny.py:runloacl: unknown variant 'runloacl'; "
     'configs/demo_tiny.py knows cl, gr, ma, monitor, runlocal'),
    ('--config.batch_sizee=3',
     "error: a --config.* override names no field of the config: 'batch_sizee' Did you mean "
     '"batch_size" instead of "batch_sizee"?'),
  ],
)  # fmt: skip
def test_config_mistakes_on_the_command_line_are_one_line(arg, line, tmp_path):
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = ['--config=configs/demo_tiny.py:runlocal', arg] if arg.startswith('--config.') else [arg]
  env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
  out = subprocess.run(
    [sys.executable, 'scripts/train.py', *args, f'--workdir={tmp_path / "run"}'],
    cwd=root, capture_output=True, text=True, env=env,
  )  # fmt: skip
  assert out.returncode == cli.EXIT_ERROR, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == line and 'Traceback' not in out.stderr
  assert not (tmp_path / 'run').exists()
