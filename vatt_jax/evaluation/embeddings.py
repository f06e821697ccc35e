"""A model's embeddings of media and text: jitted per-modality encoders and passes over eval sources.

Every modality gives four outputs, named as in the model:
  input  the tokenizer's output (patch/word projection + positions) mean-pooled over the tokens
         (padding excluded): the "input space" of VATT's Fig. 3
  agg    the backbone's AGG token (the linear-probe feature)
  va/vt  the common-space embeddings (video: va and vt; audio: va; text: vt), before normalisation

Evaluation sources (data_pipelines.build with a split other than 'train') give each record as k
clips ([B, k, …]); `embed_source` encodes every clip and averages each output over the k clips of
a record (VATT: "average of the embeddings of k uniformly sampled clips").
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

OUTPUTS = {
  'video': ('input', 'agg', 'va', 'vt'),
  'audio': ('input', 'agg', 'va'),
  'text': ('input', 'agg', 'vt'),
}


def _input_space(modality: str):
  """A module method: the tokenizer's tokens of `x`, mean-pooled (masked for text)."""

  def method(module, x):
    if modality == 'text':
      tokens, mask = module.text_tokenizer(x)
      weights = mask.astype(jnp.float32)[..., None]
      return (tokens.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    tokens = getattr(module, f'{modality}_tokenizer')(x)
    return tokens.astype(jnp.float32).mean(1)

  return method


def _make_encoder(model, modality: str):
  def encode(variables, x):
    batch = {modality: x[:, None] if modality == 'text' else x}  # text: one narration per row
    out = model.apply(variables, batch, train=False)
    result = {'input': model.apply(variables, x, method=_input_space(modality))}
    for name in OUTPUTS[modality][1:]:
      value = out[f'{modality}_{name}']
      result[name] = value[:, 0] if modality == 'text' else value
    return result

  return jax.jit(encode)


class Embedder:
  """Encodes arrays of one modality with fixed-size jitted batches (the last one padded).

  Args:
    model: a VATT module (vatt_jax.models.build_model).
    variables: {'params', 'batch_stats'}, on one device or sharded over a mesh (the inputs are
      then replicated over the same mesh).
    batch_size: rows per call; one compilation per modality.
  """

  def __init__(self, model, variables: dict, *, batch_size: int = 32):
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    self.model, self.batch_size = model, batch_size
    self.variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
    self._encoders = {}
    leaf = jax.tree.leaves(self.variables['params'])[0]
    sharding = getattr(leaf, 'sharding', None)
    self._input_sharding = None
    if isinstance(sharding, jax.sharding.NamedSharding):
      self._input_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())

  def __call__(self, modality: str, x) -> dict[str, np.ndarray]:
    """x: [N, …] (video [N, T, H, W, 3], audio [N, S], text ids [N, W]) → {output: [N, D]}."""
    if modality not in OUTPUTS:
      raise ValueError(f'modality must be one of {sorted(OUTPUTS)}, got {modality!r}')
    x = np.asarray(x)
    if modality not in self._encoders:
      self._encoders[modality] = _make_encoder(self.model, modality)
    encode = self._encoders[modality]
    pieces = collections.defaultdict(list)
    for lo in range(0, len(x), self.batch_size):
      chunk = x[lo : lo + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
      if self._input_sharding is not None:
        chunk = jax.device_put(chunk, self._input_sharding)
      for name, value in jax.device_get(encode(self.variables, chunk)).items():
        pieces[name].append(np.asarray(value[:n], np.float32))
    return {
      name: np.concatenate(pieces[name]) if pieces[name] else np.zeros((0, 0), np.float32)
      for name in OUTPUTS[modality]
    }


def embed_source(
  source: Iterable[dict], embedder: Embedder, modalities: Iterable[str], *, max_batches=None
) -> dict[str, np.ndarray]:
  """Passes over a finite evaluation source; per record, each output averaged over its clips.

  Returns {'{modality}/{output}': [N, D] float32, 'label': [N] int, 'media_id': [N] str,
  'audio_mask': [N] (when audio is asked for: 0 where the record has no usable audio)}.
  Records come in the source's order; `max_batches` stops early.
  """
  modalities = tuple(modalities)
  for m in modalities:
    if m not in ('video', 'audio'):
      raise ValueError(f"embed_source encodes 'video' or 'audio' clips, got {m!r}")
  parts = collections.defaultdict(list)
  count = 0
  for b, batch in enumerate(source):
    if max_batches is not None and b >= max_batches:
      break
    first = batch[modalities[0]]
    n = first.shape[0]
    for m in modalities:
      clips = batch[m]
      if clips.ndim != (6 if m == 'video' else 3):
        raise ValueError(
          f'{m} batch of shape {clips.shape} has no clip axis: read the split in evaluation mode '
          "(any split but 'train')"
        )
      k = clips.shape[1]
      out = embedder(m, clips.reshape(n * k, *clips.shape[2:]))
      for name, value in out.items():
        parts[f'{m}/{name}'].append(value.reshape(n, k, -1).mean(1))
    parts['label'].append(np.asarray(batch.get('label', np.full(n, -1)), np.int64))
    ids = batch.get('media_id')
    ids = [f'{count + i}' for i in range(n)] if ids is None else [_text(i) for i in ids]
    parts['media_id'].append(np.asarray(ids, dtype=object))
    if 'audio' in modalities:
      parts['audio_mask'].append(np.asarray(batch.get('audio_mask', np.ones(n)), np.float32))
    count += n
  if not count:
    raise ValueError('the evaluation source gave no records')
  logging.info('embedded %d records (%s)', count, ', '.join(modalities))
  return {k: np.concatenate(v) for k, v in parts.items()}


def _text(value) -> str:
  return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)


def l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def load(workdir: str, *, step: int | None = None, random_init: bool = False, seed: int = 0):
  """(config, model, variables, description) of a training workdir: its checkpoint (latest unless
  `step`), or with random_init the same model freshly initialised from `seed` (the baseline)."""
  from vatt_jax.train import checkpoint

  if not random_init:
    config, model, variables = checkpoint.load_model(workdir, step)
    used = step if step is not None else checkpoint.latest_step(workdir)
    return config, model, variables, f'{workdir} step {used}'
  from vatt_jax.models import build_model, init_variables
  from vatt_jax.models.summary import example_inputs

  config = checkpoint.read_config(workdir)
  model = build_model(config.model)
  example = {k: jnp.zeros(s.shape, s.dtype) for k, s in example_inputs(config.model).items()}
  variables = jax.jit(lambda key: init_variables(model, key, example))(jax.random.key(seed))
  return config, model, variables, f'random init (seed {seed}) of the model of {workdir}'
