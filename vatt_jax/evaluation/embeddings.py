"""A model's embeddings of media and text, through its contract (Model.embed), in fixed-size jitted
batches, and passes over evaluation sources.

The levels are the model's own (Model.embeddings; VATT's:
  input  the tokenizer's output (patch/word projection + positions) mean-pooled over the tokens
         (padding excluded): the "input space" of VATT's Fig. 3
  agg    the backbone's AGG token (the linear-probe feature)
  va/vt  the common-space embeddings (video: va and vt; audio: va; text: vt), before normalisation)
and token levels (Model.token_embeddings) come with their '<level>_mask'.

Evaluation sources (data_pipelines.build with a split other than 'train') give each record as k
clips ([B, k, …]); `embed_source` encodes every clip and averages each output over the k clips of
a record (VATT: "average of the embeddings of k uniformly sampled clips").
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from absl import logging

from vatt_jax.models import Model


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  return (
    np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)]) if len(x) < size else x
  )


def batched_apply(fn, variables: dict, arrays: tuple, batch_size: int, input_sharding=None):
  """fn(variables, *rows) over the rows of `arrays` (pytrees of arrays with one leading axis N) in
  batches of exactly batch_size rows (the last one zero-padded, so one compilation serves all);
  returns fn's outputs (a pytree) for the N rows, as numpy arrays."""
  n = len(jax.tree.leaves(arrays)[0])
  parts = []
  for lo in range(0, n, batch_size):
    chunk = jax.tree.map(functools.partial(_rows, lo=lo, size=batch_size), arrays)
    if input_sharding is not None:
      chunk = jax.device_put(chunk, input_sharding)
    count = min(batch_size, n - lo)
    out = jax.device_get(fn(variables, *chunk))
    parts.append(jax.tree.map(functools.partial(_first, count=count), out))
  if not parts:
    return None
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def _rows(x, *, lo: int, size: int) -> np.ndarray:
  return _pad_rows(np.asarray(x)[lo : lo + size], size)


def _first(x, *, count: int) -> np.ndarray:
  return np.asarray(x)[:count]


class Embedder:
  """Encodes arrays of one modality with fixed-size jitted batches (the last one padded).

  Args:
    model: a model of the contract (vatt_jax.models.build_model).
    variables: {'params', 'batch_stats'}, on one device or sharded over a mesh (the inputs are
      then replicated over the same mesh).
    batch_size: rows per call; one compilation per modality and set of levels.
  """

  def __init__(self, model: Model, variables: dict, *, batch_size: int = 32):
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    self.model, self.batch_size = model, batch_size
    self.variables = {
      'params': variables['params'],
      'batch_stats': variables.get('batch_stats', {}),
    }
    self._functions = {}
    leaf = jax.tree.leaves(self.variables['params'])[0]
    sharding = getattr(leaf, 'sharding', None)
    self._input_sharding = None
    if isinstance(sharding, jax.sharding.NamedSharding):
      self._input_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())

  def levels(self, modality: str) -> tuple[str, ...]:
    """The pooled levels the model has for `modality` (what a call returns by default)."""
    return tuple(self.model.embeddings.get(modality, ()))

  def _function(self, modality: str, levels: tuple[str, ...]):
    key = (modality, levels)
    if key not in self._functions:
      self._functions[key] = jax.jit(self.model.embed(modality, levels))
    return self._functions[key]

  def __call__(
    self, modality: str, x, levels: Sequence[str] | None = None
  ) -> dict[str, np.ndarray]:
    """x: [N, …] (video [N, T, H, W, 3], audio [N, S], text ids [N, W]) → {level: [N, …]}
    (float32; `levels` default: the model's pooled ones for the modality)."""
    levels = self.levels(modality) if levels is None else tuple(levels)
    encode = self._function(modality, levels)  # (the model names a missing modality or level)
    out = batched_apply(
      encode, self.variables, (np.asarray(x),), self.batch_size, self._input_sharding
    )
    if out is None:  # no rows: every level empty
      return {name: np.zeros((0, 0), np.float32) for name in levels}
    return {name: value.astype(np.float32) for name, value in out.items()}


def embed_source(
  source: Iterable[dict],
  embedder: Embedder,
  modalities: Iterable[str],
  *,
  max_batches: int | None = None,
  pair_features: dict | None = None,
) -> dict[str, np.ndarray]:
  """Passes over a finite evaluation source; per record, each output averaged over its clips.

  pair_features: {modality: fn(clips [n, k, …]) → a pytree of arrays [n, k, …]}: per-clip
  features kept as they are (a pair-scoring model's, vatt_jax/evaluation/retrieval.py), under
  '{modality}/pair'.

  Returns {'{modality}/{level}': [N, D] float32 for every pooled level the model has, 'label': [N]
  int, 'media_id': [N] str, 'audio_mask': [N] (when audio is asked for: 0 where the record has no
  usable audio)}. Records come in the source's order; `max_batches` stops early.
  """
  modalities = tuple(modalities)
  pair_features = pair_features or {}
  for m in modalities:
    if m not in ('video', 'audio'):
      raise ValueError(f"embed_source encodes 'video' or 'audio' clips, got {m!r}")
    if not embedder.levels(m) and m not in pair_features:
      raise ValueError(f'model {embedder.model.name!r} has no {m} embedding')
  parts = collections.defaultdict(list)
  count = 0
  for b, batch in enumerate(source):
    if max_batches is not None and b >= max_batches:
      break
    n = batch[modalities[0]].shape[0]
    for m in modalities:
      clips = batch[m]
      if clips.ndim != (6 if m == 'video' else 3):
        raise ValueError(
          f'{m} batch of shape {clips.shape} has no clip axis: read the split in evaluation mode '
          "(any split but 'train')"
        )
      k = clips.shape[1]
      if embedder.levels(m):
        out = embedder(m, clips.reshape(n * k, *clips.shape[2:]))
        for name, value in out.items():
          parts[f'{m}/{name}'].append(value.reshape(n, k, *value.shape[1:]).mean(1))
      if m in pair_features:
        parts[f'{m}/pair'].append(pair_features[m](clips))
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
  return {k: jax.tree.map(lambda *xs: np.concatenate(xs), *v) for k, v in parts.items()}


def _text(value) -> str:
  return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)


def l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
