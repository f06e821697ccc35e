"""Exporting a trained run: a self-contained bundle (bundle.py) and a TF SavedModel (savedmodel.py).

`export_run(workdir, output_dir)` is what scripts/export.py does: load the run, write both, check
them against the JAX model on random inputs and record the figures in `output_dir/export.json`.
Everything is written into a staging directory beside `output_dir` first and moved into place only
when complete and within tolerance, so a failed export (a bad workdir, a parity failure, an
interrupted run) never leaves a half-written `output_dir` or destroys an earlier export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np
from absl import logging

from vatt_jax import workdir as workdir_lib
from vatt_jax.export.bundle import (
  Encoders,
  _package_version,
  _umask,
  input_spec,
  load_bundle,
  outputs,
  run_tokenizer_path,
  write_bundle,
)
from vatt_jax.export.savedmodel import (
  DEFAULT_PLATFORMS,
  export_saved_model,
  jax_embeddings,
  parity,
  random_inputs,
  relative_errors,
  saved_model_embeddings,
)

__all__ = [
  'DEFAULT_PLATFORMS',
  'Encoders',
  'ParityError',
  'check_output_dir',
  'export_run',
  'export_saved_model',
  'input_spec',
  'jax_embeddings',
  'load_bundle',
  'outputs',
  'parity',
  'random_inputs',
  'relative_errors',
  'run_tokenizer_path',
  'saved_model_embeddings',
  'write_bundle',
]

EXPORT_REPORT = 'export.json'


class ParityError(RuntimeError):
  """An export whose outputs differ from the JAX model's by more than the tolerance."""


# Everything an export writes into its output_dir (what --overwrite may replace).
EXPORT_ENTRIES = ('bundle', 'saved_model', EXPORT_REPORT)


def check_output_dir(output_dir: str, overwrite: bool, workdir: str | None = None) -> None:
  """Refuses (before any work) an output_dir that is a file, holds or is the workdir, or is not
  empty; with overwrite, a non-empty one is accepted only if it holds an earlier export."""
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise FileExistsError(f'output_dir {output_dir} exists and is not a directory')
  if workdir is not None:
    workdir = os.path.abspath(workdir)
    if os.path.commonpath([output_dir, workdir]) == output_dir:
      raise ValueError(f'output_dir {output_dir} holds the workdir {workdir}: pick another one')
  if not (os.path.isdir(output_dir) and os.listdir(output_dir)):
    return
  if not overwrite:
    raise FileExistsError(
      f'output_dir {output_dir} is not empty; pass --overwrite to replace an earlier export there'
    )
  if not os.path.isfile(os.path.join(output_dir, EXPORT_REPORT)):
    raise FileExistsError(
      f'output_dir {output_dir} holds no {EXPORT_REPORT}: it is not an earlier export, and '
      '--overwrite replaces only those'
    )
  others = sorted(set(os.listdir(output_dir)) - set(EXPORT_ENTRIES))
  if others:
    raise FileExistsError(
      f'output_dir {output_dir} holds an earlier export and also {", ".join(others[:5])}'
      f'{" …" if len(others) > 5 else ""}, which no export writes; --overwrite would delete '
      'them: move them away or pick another --output_dir'
    )


def export_run(
  workdir: str,
  output_dir: str,
  *,
  step: int | None = None,
  fmt: str = 'safetensors',
  saved_model: bool = True,
  check_parity: bool = True,
  overwrite: bool = False,
  tokenizer_path: str | None = None,
  platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
  tolerance: float = 1e-4,
  batch_size: int = 2,
  seed: int = 0,
) -> dict:
  """Exports the run in `workdir` (checkpoint `step`, latest if None) into `output_dir`.

  Writes output_dir/bundle/, output_dir/saved_model/ (if saved_model) and output_dir/export.json:
  the step, the files, and with check_parity the max relative error of every output of the
  SavedModel and of the reloaded bundle against the JAX model on random inputs (batch_size, seed).
  tokenizer_path defaults to the run's (run_tokenizer_path). Returns the report.

  Raises FileExistsError for a non-empty output_dir without overwrite (with it, only an earlier
  export is replaced), ParityError when an error exceeds `tolerance` (the export is then left in a
  '<output_dir>.failed-*' directory for inspection and output_dir is untouched).
  """
  check_output_dir(output_dir, overwrite, workdir)
  step = step if step is not None else workdir_lib.latest_step(workdir)
  config, model, variables = workdir_lib.load_model(workdir, step)
  if tokenizer_path is None and 'text' in outputs(model):
    tokenizer_path = run_tokenizer_path(config)
  output_dir = os.path.abspath(output_dir)
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=os.path.basename(output_dir) + '.partial-', dir=parent)
  os.chmod(staging, 0o777 & ~_umask())  # (mkdtemp makes it private; the export is not)
  try:
    started = time.time()
    write_bundle(config, variables, staging, tokenizer_path, fmt=fmt, step=step)
    logging.info('bundle of step %s written (%.1f s)', step, time.time() - started)
    if saved_model:
      export_saved_model(
        model, variables, staging, tokenizer_path=tokenizer_path, platforms=platforms
      )
      logging.info('SavedModel written for %s (%.1f s)', platforms, time.time() - started)
    report = {
      'workdir': os.path.abspath(workdir),
      'step': step,
      'bundle': 'bundle',
      'params_format': fmt,
      'saved_model': 'saved_model' if saved_model else None,
      'platforms': list(platforms) if saved_model else None,
      'tokenizer': tokenizer_path,
      'model': model.name,
      'inputs': input_spec(model),
      'versions': _versions(saved_model),
      'export_seconds': round(time.time() - started, 1),
    }
    if check_parity:
      inputs = random_inputs(model, batch_size, seed)
      reference = jax_embeddings(model, variables, inputs)
      bundle = load_bundle(os.path.join(staging, 'bundle'))
      errors = {'bundle': relative_errors(_encode_all(bundle, inputs), reference)}
      if saved_model:
        got = saved_model_embeddings(os.path.join(staging, 'saved_model'), inputs)
        errors['saved_model'] = relative_errors(got, reference)
      logging.info('parity checked (%.1f s)', time.time() - started)
      worst = max(v for group in errors.values() for v in group.values())
      report['parity'] = {
        'batch_size': batch_size,
        'seed': seed,
        'metric': 'max |export - jax| / max |jax| per output',
        'tolerance': tolerance,
        'max_relative_error': worst,
        'passed': worst <= tolerance,
        **errors,
      }
    with open(os.path.join(staging, EXPORT_REPORT), 'w') as f:
      json.dump(report, f, indent=2)
    if check_parity and not report['parity']['passed']:
      failed = tempfile.mkdtemp(prefix=os.path.basename(output_dir) + '.failed-', dir=parent)
      os.replace(staging, failed)  # (an empty directory is replaced atomically on POSIX)
      raise ParityError(
        f'export differs from the JAX model by {report["parity"]["max_relative_error"]:.3g} '
        f'relative (tolerance {tolerance:g}); output_dir left untouched, export kept in {failed}'
      )
    _install(staging, output_dir)
    return report
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging, ignore_errors=True)


def _encode_all(encoders: Encoders, inputs: dict) -> dict:
  return {m: {k: np.asarray(v) for k, v in encoders.embed(m, x).items()} for m, x in inputs.items()}


def _install(staging: str, output_dir: str) -> None:
  """Moves the finished export into output_dir; an old one is removed only after this succeeds."""
  if not os.path.exists(output_dir):
    os.replace(staging, output_dir)
    return
  old = output_dir + '.old-' + os.path.basename(staging).rsplit('-', 1)[-1]
  os.replace(output_dir, old)
  try:
    os.replace(staging, output_dir)
  except OSError:
    os.replace(old, output_dir)
    raise
  shutil.rmtree(old, ignore_errors=True)


def _versions(saved_model: bool) -> dict:
  out = {'vatt_jax': _package_version(), 'jax': jax.__version__}
  if saved_model:
    import tensorflow as tf

    out['tensorflow'] = tf.__version__
    out['calling_convention_version'] = jax.config.jax_export_calling_convention_version
  return out
