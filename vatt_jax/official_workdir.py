"""The converted official VATT model (vatt_jax/official.py reads and maps the checkpoint): written as
a vatt-jax training workdir, and its outputs on given inputs (scripts/convert_official.py
--embed_inputs / --embed_outputs)."""

from __future__ import annotations

import json
import math
import os
import shutil

import jax
import ml_collections
import numpy as np
import optax

from data_pipelines.manifest import check_output_dir
from vatt_jax import provenance
from vatt_jax import workdir as workdir_lib
from vatt_jax.cli import UserError
from vatt_jax.optim import build_optimizer
from vatt_jax.train import checkpoint as ckpt
from vatt_jax.train.state import TrainState


def total_size(variables: dict) -> int:
  return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(variables))


# The seven outputs --embed_outputs writes: (name, modality, embedding level).
OUTPUTS = (
  ('video_agg', 'video', 'agg'),
  ('audio_agg', 'audio', 'agg'),
  ('text_agg', 'text', 'agg'),
  ('video_va', 'video', 'va'),
  ('video_vt', 'video', 'vt'),
  ('audio_va', 'audio', 'va'),
  ('text_vt', 'text', 'vt'),
)


def check_new_workdir(path: str) -> None:
  """Refuses an output directory that exists and is not empty (nothing there is ever replaced)."""
  check_output_dir(path)
  if os.path.isdir(path) and os.listdir(path):
    raise UserError(f'--output_dir={path} is not empty: give a new directory for the workdir')
  if os.path.lexists(path) and not os.path.isdir(path):
    raise UserError(f'--output_dir={path} is a file, not a directory')


def write_workdir(
  config: ml_collections.ConfigDict,
  variables: dict,
  output_dir: str,
  *,
  step: int,
  source: dict,
) -> None:
  """A vatt-jax training workdir holding `variables` at `step`: config.json, the checkpoint (the
  optimizer state fresh: the official Adam moments are not carried over), provenance.json and
  the tokenizer's copy (config.data.tokenizer), converted.json (`source`). Written beside
  `output_dir` and renamed into place when complete: an interrupted conversion leaves no
  half-written workdir."""
  output_dir = os.path.abspath(output_dir)
  staging = f'{output_dir}.converting-{os.getpid()}'
  tx, _ = build_optimizer(config.optimizer, config.total_steps)
  params = jax.tree.map(np.asarray, variables['params'])
  # The learning rate follows optax's count of applied updates (optim.learning_rate): the schedule
  # goes on at `step`, while Adam's moments (and their bias correction) start afresh.
  opt_state = optax.tree_utils.tree_set(
    tx.init(params),
    lambda path, _: getattr(path[-1], 'tuple_name', '') == 'ScaleByScheduleState',
    count=np.asarray(step, np.int32),
  )
  state = TrainState(
    step=np.asarray(step, np.int32),
    params=params,
    batch_stats=jax.tree.map(np.asarray, variables.get('batch_stats', {})),
    opt_state=opt_state,
    rng=jax.random.split(jax.random.key(config.seed))[1],  # as init_train_state's state key
    nonfinite_steps=np.zeros((), np.int32),
    nonfinite_run=np.zeros((), np.int32),
  )
  os.makedirs(staging)
  try:
    checkpointer = ckpt.Checkpointer(staging, save_steps=1, keep=config.keep_checkpoints)
    checkpointer.save(step, state, {}, force=True)
    checkpointer.close()
    workdir_lib.save_config(config, staging)
    provenance.record(config, staging)
    with open(os.path.join(staging, 'converted.json'), 'w', encoding='utf-8') as f:
      json.dump(source, f, indent=1, sort_keys=True)
    if os.path.isdir(output_dir):
      os.rmdir(output_dir)  # empty (check_new_workdir)
    os.rename(staging, output_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def read_inputs(path: str, model) -> dict[str, np.ndarray]:
  """--embed_inputs: an .npz with `video` [B, T, H, W, 3] float in [-1, 1], `audio` [B, S] float,
  `text` [B, L] int32 word ids (0 = padding); any subset. Shapes are checked against the model."""
  try:
    with np.load(path) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise UserError(f'--embed_inputs={path}: not a readable .npz ({e})') from None
  unknown = sorted(set(arrays) - {'video', 'audio', 'text'})
  if unknown or not arrays:
    raise UserError(
      f'--embed_inputs={path} holds {sorted(arrays)}; it takes video, audio and/or text'
    )
  out = {}
  for name, value in arrays.items():
    spec = model.inputs[name]
    if value.ndim != len(spec.shape) + 1 or tuple(value.shape[1:]) != tuple(spec.shape):
      raise UserError(
        f'--embed_inputs={path}: {name} is {value.shape}, the model takes [B, '
        + ', '.join(map(str, spec.shape))
        + ']'
      )
    if name == 'text':
      if not np.issubdtype(value.dtype, np.integer):
        raise UserError(f'--embed_inputs={path}: text must be integer word ids, got {value.dtype}')
      if value.min() < 0 or value.max() > spec.high:
        raise UserError(
          f'--embed_inputs={path}: text ids must be in [0, {spec.high}], got '
          f'[{value.min()}, {value.max()}]'
        )
      out[name] = value.astype(np.int32)
    else:
      out[name] = value.astype(np.float32)
  return out


def embed(model, variables: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The converted model's outputs (OUTPUTS) on `inputs`, in inference, through the model's
  embedding functions."""
  out = {}
  for modality in ('video', 'audio', 'text'):
    if modality not in inputs:
      continue
    levels = tuple(level for _, m, level in OUTPUTS if m == modality)
    result = jax.jit(model.embed(modality, levels))(variables, inputs[modality])
    for name, m, level in OUTPUTS:
      if m == modality:
        out[name] = np.asarray(result[level], np.float32)
  return out
