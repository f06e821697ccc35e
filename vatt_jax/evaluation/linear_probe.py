"""Linear probes on frozen features (VATT appendix): low-rank softmax and linear SVM classifiers,
and the evaluator that extracts the features from a model and fits them.

Low-rank classifier: logits = ((x - mean) / std) @ U @ V + b with U [d, n], V [n, classes]. At
each training step a fraction (10 %) of the n components is sampled uniformly without replacement
and only those are used, like dropout on the n-dim bottleneck. We use *inverted* scaling: the kept
components are multiplied by n / k during training, so the expected training logits equal the
evaluation logits (all components, no scaling). Each step draws its batch uniformly *with
replacement*, so N < batch_size needs no special case and the run is a pure function of
`config.seed`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

import data_pipelines
from vatt_jax import provenance
from vatt_jax.evaluation import embeddings, metrics, retrieval
from vatt_jax.models import Model

__all__ = [
  'LowRankConfig',
  'SVMModel',
  'component_mask',
  'evaluate',
  'low_rank_logits',
  'low_rank_loss',
  'num_kept',
  'predict_low_rank',
  'predict_svm',
  'train_low_rank',
  'train_svm',
]


@dataclasses.dataclass
class LowRankConfig:
  components: int = 128
  sample_fraction: float = 0.1
  learning_rate: float = 5e-4
  batch_size: int = 64
  steps: int = 2000
  seed: int = 0
  standardize: bool = True


def num_kept(components: int, sample_fraction: float) -> int:
  """k = max(1, round(fraction * components)): the components used at each training step."""
  return max(1, int(round(sample_fraction * components)))


def component_mask(rng: jax.Array, components: int, sample_fraction: float) -> jnp.ndarray:
  """A [components] float32 mask with exactly k ones, chosen uniformly without replacement."""
  k = num_kept(components, sample_fraction)
  chosen = jax.random.permutation(rng, components)[:k]
  return jnp.zeros((components,), jnp.float32).at[chosen].set(1.0)


def low_rank_logits(weights: dict, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """Logits of standardised features x; with `mask`, only its components, scaled by n / k."""
  h = x @ weights['u']
  if mask is not None:
    h = h * (mask * (mask.shape[0] / jnp.sum(mask)))
  return h @ weights['v'] + weights['b']


def low_rank_loss(weights: dict, x: jnp.ndarray, y: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Mean softmax cross-entropy of the masked (training-mode) logits: the train step's loss."""
  logits = low_rank_logits(weights, x, mask)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _check_features(features, name: str) -> np.ndarray:
  x = np.asarray(features)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f'{name} must be a non-empty [N, d] array, got shape {x.shape}')
  if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
    raise ValueError(f'{name} must be finite numbers')
  return x.astype(np.float32)


def _check_labels(labels, n: int, num_classes: int, name: str = 'labels') -> np.ndarray:
  y = np.asarray(labels)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'{name} must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}')
  if y.shape[0] != n:
    raise ValueError(f'{name} has length {y.shape[0]} but features have {n} rows')
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f'{name} must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]')
  return y.astype(np.int32)


def _check_num_classes(num_classes) -> int:
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f'num_classes must be an integer >= 2, got {num_classes!r}')
  return int(num_classes)


def _check_config(config: LowRankConfig) -> None:
  if config.components < 1:
    raise ValueError(f'config.components must be >= 1, got {config.components}')
  if not 0.0 < config.sample_fraction <= 1.0:
    raise ValueError(f'config.sample_fraction must be in (0, 1], got {config.sample_fraction}')
  if config.batch_size < 1:
    raise ValueError(f'config.batch_size must be >= 1, got {config.batch_size}')
  if config.steps < 0:
    raise ValueError(f'config.steps must be >= 0, got {config.steps}')


@functools.partial(jax.jit, static_argnames=('steps', 'batch_size', 'fraction', 'learning_rate'))
def _fit(weights, x, y, key, *, steps, batch_size, fraction, learning_rate):
  opt = optax.adam(learning_rate)
  n = weights['u'].shape[1]

  def step(i, carry):
    weights, opt_state = carry
    batch_key, mask_key = jax.random.split(jax.random.fold_in(key, i))
    idx = jax.random.randint(batch_key, (batch_size,), 0, x.shape[0])
    mask = component_mask(mask_key, n, fraction)
    grads = jax.grad(low_rank_loss)(weights, x[idx], y[idx], mask)
    updates, opt_state = opt.update(grads, opt_state, weights)
    return optax.apply_updates(weights, updates), opt_state

  weights, _ = jax.lax.fori_loop(0, steps, step, (weights, opt.init(weights)))
  return weights


def train_low_rank(features, labels, num_classes: int, config: LowRankConfig | None = None) -> dict:
  """Trains the low-rank classifier; returns {'u', 'v', 'b', 'mean', 'std'} (numpy arrays)."""
  config = config or LowRankConfig()
  _check_config(config)
  num_classes = _check_num_classes(num_classes)
  x = _check_features(features, 'features')
  y = _check_labels(labels, x.shape[0], num_classes)
  if config.standardize:
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
  else:
    mean, std = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
  d, n = x.shape[1], config.components
  init_key, train_key = jax.random.split(jax.random.PRNGKey(config.seed))
  u_key, v_key = jax.random.split(init_key)
  weights = {
    'u': jax.random.normal(u_key, (d, n), jnp.float32) / np.sqrt(d),
    'v': jax.random.normal(v_key, (n, num_classes), jnp.float32) / np.sqrt(n),
    'b': jnp.zeros((num_classes,), jnp.float32),
  }
  weights = _fit(
    weights,
    jnp.asarray((x - mean) / std),
    jnp.asarray(y),
    train_key,
    steps=int(config.steps),
    batch_size=int(config.batch_size),
    fraction=float(config.sample_fraction),
    learning_rate=float(config.learning_rate),
  )
  params = {k: np.asarray(v) for k, v in weights.items()}
  return {**params, 'mean': mean.astype(np.float32), 'std': std}


def predict_low_rank(params: dict, features) -> np.ndarray:
  """Evaluation logits [N, classes]: all components, training-set standardisation applied."""
  x = _check_features(features, 'features')
  if x.shape[1] != params['u'].shape[0]:
    raise ValueError(f'features have dim {x.shape[1]}, classifier expects {params["u"].shape[0]}')
  weights = {k: jnp.asarray(params[k]) for k in ('u', 'v', 'b')}
  return np.asarray(low_rank_logits(weights, jnp.asarray((x - params['mean']) / params['std'])))


@dataclasses.dataclass
class SVMModel:
  scaler: StandardScaler
  svm: LinearSVC
  num_classes: int


def train_svm(features, labels, C: float = 1.0, seed: int = 0, *, num_classes=None) -> SVMModel:
  """One-vs-rest LinearSVC on standardised features; num_classes defaults to max(labels) + 1."""
  if not C > 0:
    raise ValueError(f'C must be > 0, got {C}')
  x = _check_features(features, 'features')
  y = np.asarray(labels)
  if num_classes is None and y.ndim == 1 and y.size and np.issubdtype(y.dtype, np.integer):
    num_classes = max(2, int(y.max()) + 1)
  num_classes = _check_num_classes(num_classes)
  y = _check_labels(y, x.shape[0], num_classes)
  if np.unique(y).size < 2:
    raise ValueError('labels must contain at least 2 distinct classes for the SVM')
  scaler = StandardScaler().fit(x)
  svm = LinearSVC(C=C, random_state=seed, dual='auto', max_iter=5000).fit(scaler.transform(x), y)
  return SVMModel(scaler=scaler, svm=svm, num_classes=num_classes)


def predict_svm(model: SVMModel, features) -> np.ndarray:
  """Decision scores [N, num_classes]; classes absent from training get -inf."""
  x = _check_features(features, 'features')
  scores = np.asarray(model.svm.decision_function(model.scaler.transform(x)), np.float64)
  if scores.ndim == 1:  # Binary: the score is for classes_[1]; expand to one column per class.
    scores = np.stack([-scores, scores], axis=1)
  out = np.full((x.shape[0], model.num_classes), -np.inf)
  out[:, model.svm.classes_] = scores
  return out


def evaluate(
  train_features,
  train_labels,
  test_features,
  test_labels,
  num_classes: int,
  *,
  classifier: str = 'low_rank',
  config: LowRankConfig | None = None,
  svm_c: float = 1.0,
) -> dict[str, float]:
  """Fits the classifier on train, returns {'top1': %, 'top5': %} on test."""
  if classifier not in ('low_rank', 'svm'):
    raise ValueError(f"classifier must be 'low_rank' or 'svm', got {classifier!r}")
  num_classes = _check_num_classes(num_classes)
  x_train = _check_features(train_features, 'train_features')
  x_test = _check_features(test_features, 'test_features')
  if x_test.shape[1] != x_train.shape[1]:
    raise ValueError(
      f'test_features dim {x_test.shape[1]} != train_features dim {x_train.shape[1]}'
    )
  y_train = _check_labels(train_labels, x_train.shape[0], num_classes, 'train_labels')
  y_test = _check_labels(test_labels, x_test.shape[0], num_classes, 'test_labels')
  config = config or LowRankConfig()
  if classifier == 'low_rank':
    logits = predict_low_rank(train_low_rank(x_train, y_train, num_classes, config), x_test)
  else:
    model = train_svm(x_train, y_train, C=svm_c, seed=config.seed, num_classes=num_classes)
    logits = predict_svm(model, x_test)
  return metrics.topk_accuracy(logits, y_test, ks=(1, 5))


class LinearProbeEvaluator:
  """config.evals entry: dict(type='linear_probe', modality='video' | 'audio', feature='agg'
  (any pooled level the model has for the modality, e.g. VATT's 'va' / 'vt'; default 'agg', or
  the model's first), train_split=…, test_split=…, num_classes=0 (0: from the
  labels), classifier='low_rank' | 'svm', steps=…, data=dict(path=… or name='tfds', tfds_name=…),
  num_clips=…, batch_size=32, log_steps=…).

  Features of each record are averaged over its clips (evaluation mode: uniformly spaced clips,
  central crops). run(variables) → {'top1', 'top5'}; `last` keeps features and labels.
  `cache(key)` (the scripts) stores features as .npz under cache_dir, keyed by model and split.
  """

  def __init__(self, eval_cfg, config, model: Model, *, cache_dir=None, cache_key=None):
    self.eval_cfg, self.model = eval_cfg, model
    self.data = retrieval.eval_data_config(config, eval_cfg)
    self.modality = eval_cfg.get('modality', 'video')
    levels = tuple(model.embeddings.get(self.modality, ()))
    self.feature = eval_cfg.get('feature') or ('agg' if 'agg' in levels else (levels or ('',))[0])
    if self.modality not in ('video', 'audio') or self.feature not in levels:
      raise ValueError(
        f'linear probe: modality must be video or audio and feature one of the levels model '
        f'{model.name!r} has for it ({dict(model.embeddings)}), got {self.modality!r} / '
        f'{self.feature!r}'
      )
    self.cache_dir, self.cache_key = cache_dir, cache_key
    self.config = LowRankConfig(
      components=eval_cfg.get('components', 128),
      sample_fraction=eval_cfg.get('sample_fraction', 0.1),
      learning_rate=eval_cfg.get('learning_rate', 5e-4),
      batch_size=eval_cfg.get('probe_batch_size', 64),
      steps=eval_cfg.get('steps', 2000),
      seed=eval_cfg.get('seed', 0),
    )
    self.last = None

  def _cache_path(self, split: str, variables) -> str | None:
    """The cache file of a split's features: keyed by the checkpoint (its name and the bytes of its
    variables), the data settings and the full content of the shards read (a repaired or replaced
    shard is a new key, never a stale hit)."""
    if not self.cache_dir or self.cache_key is None:
      return None
    weights = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(variables)):
      weights.update(np.ascontiguousarray(leaf).tobytes())
    shards = provenance.split_files(self.data, split)
    spec = json.dumps(
      [self.cache_key, weights.hexdigest(), provenance.content_sha256(shards), self.data.to_dict(),
       split, self.modality],
      sort_keys=True, default=str,
    )  # fmt: skip
    name = f'{split}_{self.modality}_{hashlib.sha256(spec.encode()).hexdigest()[:16]}.npz'
    return os.path.join(self.cache_dir, name)

  def features(self, variables, split: str) -> dict[str, np.ndarray]:
    """{'{modality}/{output}', 'label', 'media_id'} of a split, from the cache when there."""
    path = self._cache_path(split, variables)
    if path and os.path.exists(path):
      logging.info('linear probe: %s features of %r from the cache %s', self.modality, split, path)
      with np.load(path, allow_pickle=False) as f:
        return dict(f)
    batch_size = self.eval_cfg.get('batch_size', 32)
    source = data_pipelines.build(self.data, split, batch_size=batch_size)
    try:
      out = embeddings.embed_source(
        source,
        embeddings.Embedder(self.model, variables, batch_size=batch_size),
        [self.modality],
      )
    finally:
      if hasattr(source, 'close'):
        source.close()
    out['media_id'] = out['media_id'].astype(str)
    if path:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = path + '.tmp.npz'
      np.savez(tmp, **out)
      os.replace(tmp, path)  # a cache file is whole or absent
    return out

  def _usable(self, f: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    keep = f['label'] >= 0
    if self.modality == 'audio' and 'audio_mask' in f:
      keep &= f['audio_mask'] > 0
    if not keep.any():
      raise ValueError(f'linear probe: no labelled {self.modality} records in split {split!r}')
    if (~keep).any():
      logging.warning('linear probe: %d of %d records of %r skipped (no label or no %s)',
                      int((~keep).sum()), len(keep), split, self.modality)  # fmt: skip
    return f[f'{self.modality}/{self.feature}'][keep], f['label'][keep]

  def run(self, variables) -> dict[str, float]:
    train_split = self.eval_cfg.get('train_split', 'train')
    test_split = self.eval_cfg.get('test_split', 'test')
    x_train, y_train = self._usable(self.features(variables, train_split), train_split)
    x_test, y_test = self._usable(self.features(variables, test_split), test_split)
    num_classes = self.eval_cfg.get('num_classes', 0) or int(max(y_train.max(), y_test.max())) + 1
    result = evaluate(
        x_train, y_train, x_test, y_test, num_classes,
        classifier=self.eval_cfg.get('classifier', 'low_rank'), config=self.config,
        svm_c=self.eval_cfg.get('svm_c', 1.0),
    )  # fmt: skip
    self.last = {'train': (x_train, y_train), 'test': (x_test, y_test), 'num_classes': num_classes}
    return result
