"""The model contract: everything training, evaluation, export and the scripts may use of a model.

A registered model (`vatt_jax.models.MODELS`) is built from config.model into an object with the
members of `Model` below; nothing outside a model's own module reaches into its flax submodules.
A new method is one model module (a flax module and its `Model`), one loss module, one config and
a registry entry.

  inputs           {modality: InputSpec}: the batch fields the model reads, per example, with
                   dtype and value range (video [T, H, W, 3] float32 in [−1, 1], audio [S], text
                   [W] int32 ids with 0 = padding, …). Embedding, scoring and classification
                   functions take one modality's array [B, *shape]; the training batch carries
                   them all (text as [B, K, W]: K narrations).
  example_batch(b) jax.ShapeDtypeStruct of a batch of b examples of every input (init, FLOPs).
  init(rng, batch) {'params', 'batch_stats'} (boxed=True keeps flax's logical-partitioning
                   boxes, from which the trainer derives the parameter shardings).
  losses           the config loss.name values the model trains with.
  objective(loss_cfg)
                   (variables, batch, rng) → (loss, (terms {name: scalar}, model_state)): the
                   training objective on the global batch. It may run the model several times
                   (a second fusion pass over mined negatives) and transform the batch inside the
                   jitted step (masking); model_state holds the updated non-parameter collections
                   ({'batch_stats': …}, or {}).
  embeddings       {modality: (level, …)}: the pooled outputs [B, D] the model has per modality
                   (VATT: video 'input', 'agg', 'va', 'vt'; …).
  token_embeddings {modality: (level, …)}: outputs per token or frame, [B, N, D], each returned
                   with '<level>_mask' [B, N] (1 = valid).
  spaces           {(modality, modality): level}: the level at which two modalities are compared by
                   a cosine (VATT: ('video', 'text') → 'vt', ('video', 'audio') → 'va').
  embed(modality, levels)
                   (variables, x [B, …]) → {level: array} in evaluation mode (pure, jit-able).
  score            a PairScore for models that rank (video, text) pairs jointly, else None.
  num_classes      C for classifiers (0 otherwise), with classify() → (variables, {modality: x})
                   → logits [B, C].
  load_pretrained(params, pretrained)
                   this model's parameters filled by name from another run's (config init_from).

`FlaxModel` implements the common part for a flax module; `check_variables` and `describe_problems`
are the one place that compares a parameter tree with what a model expects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from vatt_jax import losses

Variables = dict[str, Any]  # {'params': …, 'batch_stats': …}
# (variables, batch, rng) → (loss, (terms, model_state))
Objective = Callable[[Variables, dict, jax.Array], tuple[jax.Array, tuple[dict, dict]]]
EmbedFn = Callable[[Variables, jax.Array], dict[str, jax.Array]]
MODALITIES = ('video', 'audio', 'text')


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """One example of one input: shape (no batch axis), dtype and value range (inclusive)."""

  shape: tuple[int, ...]
  dtype: str  # 'float32' or 'int32'
  low: float
  high: float
  padding_id: int | None = None  # integer inputs: the id that means "no token"

  def abstract(self, batch_size: int, *lead: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch_size, *lead, *self.shape), jnp.dtype(self.dtype))

  def describe(self) -> dict[str, Any]:
    """JSON form (bundle.json): shape with None for the batch axis."""
    out = dict(shape=[None, *self.shape], dtype=self.dtype, range=[self.low, self.high])
    if self.padding_id is not None:
      out['padding_id'] = self.padding_id
    return out

  def random(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
    """Inputs in range: floats uniform; ids uniform over the non-padding ids, each row padded
    after a random length ≥ 1."""
    shape = (batch_size, *self.shape)
    if self.dtype.startswith('float'):
      return rng.uniform(self.low, self.high, shape).astype(self.dtype)
    first = int(self.low) + (1 if self.padding_id == int(self.low) else 0)
    ids = rng.integers(first, int(self.high) + 1, shape).astype(self.dtype)
    if self.padding_id is None:
      return ids
    lengths = rng.integers(1, shape[-1] + 1, (*shape[:-1], 1))
    return np.where(np.arange(shape[-1]) < lengths, ids, self.padding_id).astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class PairScore:
  """How a model scores (video, text) pairs jointly (a fusion encoder, a one-stream transformer).

  video(variables, video [B, …]) and text(variables, text [B, W]) compute what can be computed once
  per gallery item (any pytree with a leading axis B: token embeddings, or the input itself);
  pairs(variables, video_features, text_features) → [B] float32, the score of row i's pair
  (higher: a better match). Retrieval scores every pair of a small gallery and re-ranks a first
  stage's top k of a large one.
  """

  video: Callable[[Variables, jax.Array], Any]
  text: Callable[[Variables, jax.Array], Any]
  pairs: Callable[[Variables, Any, Any], jax.Array]


@runtime_checkable
class Model(Protocol):
  """The contract (module docstring). `FlaxModel` is a base that implements most of it."""

  name: str
  config: ml_collections.ConfigDict
  inputs: Mapping[str, InputSpec]
  losses: Sequence[str]
  embeddings: Mapping[str, Sequence[str]]
  token_embeddings: Mapping[str, Sequence[str]]
  spaces: Mapping[tuple[str, str], str]
  score: PairScore | None
  num_classes: int

  def example_batch(self, batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]: ...

  def init(self, rng: jax.Array, batch: dict, *, boxed: bool = False) -> Variables: ...

  def objective(self, loss_cfg: ml_collections.ConfigDict) -> Objective: ...

  def embed(self, modality: str, levels: Sequence[str] | None = None) -> EmbedFn: ...

  def classify(self) -> Callable[[Variables, dict], jax.Array]: ...

  def load_pretrained(self, params: dict, pretrained: dict) -> tuple[dict, dict]: ...


def space(model: Model, a: str, b: str) -> str | None:
  """The level at which `model` compares modalities a and b by a cosine (either order), or None."""
  return model.spaces.get((a, b)) or model.spaces.get((b, a))


def abstract_variables(model: Model, sharding=None) -> Variables:
  """{'params', 'batch_stats'} of `model` as ShapeDtypeStructs (no FLOPs, no memory), with
  `sharding` when given."""
  shapes = jax.eval_shape(lambda b: model.init(jax.random.key(0), b), model.example_batch())
  shapes = {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}
  if sharding is None:
    return shapes
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def forward_objective(
  module: nn.Module,
  loss_fn: Callable[[dict, dict], tuple[jax.Array, dict]],
  *,
  rng_streams: Sequence[str] = ('dropout',),
  mutable: Sequence[str] = ('batch_stats',),
) -> Objective:
  """The objective of a model trained by one forward pass and a loss of its outputs:
  `loss_fn(module.apply(variables, batch, train=True), batch)`. The step's key is split into one
  key per RNG stream, in `rng_streams` order."""

  def objective(variables: Variables, batch: dict, rng: jax.Array):
    keys = jax.random.split(rng, len(rng_streams))
    out, state = module.apply(
      variables,
      batch,
      train=True,
      rngs=dict(zip(rng_streams, keys, strict=True)),
      mutable=list(mutable),
    )
    loss, terms = loss_fn(out, batch)
    return loss, (terms, dict(state))

  return objective


def agg_and_projected(levels: Sequence[str], representation, project: Callable[[], Any]) -> dict:
  """{'agg': representation, 'vt': project()} restricted to `levels`: the two pooled levels of a
  dual-encoder-style model (its representation, and its projection to the shared space, computed
  only when asked for)."""
  out = {}
  if 'agg' in levels:
    out['agg'] = representation
  if 'vt' in levels:
    out['vt'] = project()
  return out


def describe_problems(problems: Sequence[str], limit: int = 8) -> str:
  """The first `limit` problems joined, and how many more there are."""
  shown = '; '.join(problems[:limit])
  return shown + (f'; … {len(problems) - limit} more' if len(problems) > limit else '')


def _shape_dtype(x) -> tuple[tuple[int, ...], str]:
  return tuple(np.shape(x) if not hasattr(x, 'shape') else x.shape), str(np.dtype(x.dtype))


def check_variables(
  have: Mapping[str, Any], want: Mapping[str, Any], where: str, *, dtypes: bool = False
) -> None:
  """Raises ValueError naming every leaf that is missing, extra or of another shape (and dtype).

  have / want: flat {'path': array or ShapeDtypeStruct}, e.g. a checkpoint's or a bundle's
  variables against the model's `init` shapes. `where` names the culprit in the message.
  """
  problems = [f'{k}: missing' for k in sorted(want.keys() - have.keys())]
  problems += [f'{k}: not in this model' for k in sorted(have.keys() - want.keys())]
  for k in sorted(have.keys() & want.keys()):
    (hs, hd), (ws, wd) = _shape_dtype(have[k]), _shape_dtype(want[k])
    if hs != ws or (dtypes and hd != wd):
      problems.append(f'{k}: {hs} {hd}, the model wants {ws} {wd}')
  if problems:
    raise ValueError(f'{where} does not hold this model: {describe_problems(problems)}')


def flat_paths(tree: Mapping) -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested dict."""
  return {'/'.join(map(str, k)): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def load_by_name(
  params: dict,
  pretrained: dict,
  *,
  keep_init: Sequence[str] = (),
  adapt: Callable[[dict, dict], tuple[dict, dict]] | None = None,
) -> tuple[dict, dict]:
  """`params` with every leaf taken from `pretrained` under the same path and shape.

  keep_init: top-level names kept at their initialisation (a new head). adapt(pretrained, params)
  → (pretrained, {path: (old shape, new shape)}) may first reshape what a model knows how to
  (position tables for another input size). Leaves of `params` are only read for shape and dtype.

  Returns (params — numpy arrays where loaded, the given leaves elsewhere; report {'loaded':
  [path], 'resized': {path: (old, new)}, 'kept_init': [path], 'unused': [top-level names of
  `pretrained` nothing was loaded from]}). Raises ValueError naming every parameter that is
  missing from `pretrained` or has another shape there (a checkpoint of another model), and every
  leaf of a module the model loads that the model lacks (another architecture of that module).
  """
  resized = {}
  if adapt is not None:
    pretrained, resized = adapt(dict(pretrained), params)
  source = traverse_util.flatten_dict(dict(pretrained))
  problems, out = [], {}
  report = {'loaded': [], 'resized': {}, 'kept_init': [], 'unused': []}
  for path, leaf in traverse_util.flatten_dict(dict(params)).items():
    name = '/'.join(path)
    if path[0] in keep_init:
      out[path] = leaf
      report['kept_init'].append(name)
      continue
    if path not in source:
      problems.append(f'{name}: not in the checkpoint')
      continue
    (have, _), (want, _) = _shape_dtype(source[path]), _shape_dtype(leaf)
    if have != want:
      problems.append(f'{name}: checkpoint {have}, this model {want}')
      continue
    out[path] = np.asarray(source[path], dtype=leaf.dtype)
    report['loaded'].append(name)
    if name in resized:
      report['resized'][name] = resized[name]
  # A module the model takes from the checkpoint must be taken whole: a leaf of it the model lacks
  # means another architecture of that module (e.g. the official towers' position LayerNorm
  # pretrained, a fine-tuning config without it), which loading the rest would hide.
  used = {p.split('/')[0] for p in report['loaded']}
  taken = {tuple(n.split('/')) for n in report['loaded']}
  for path in source:
    if path[0] in used and path not in taken:
      problems.append(f'{"/".join(path)}: in the checkpoint, not in this model')
  if problems:
    raise ValueError(f'the checkpoint does not hold this model: {describe_problems(problems)}')
  report['unused'] = sorted(set(pretrained) - used)
  return traverse_util.unflatten_dict(out), report


class FlaxModel:
  """A base for models that are one flax module: the contract's bookkeeping, written once.

  A subclass sets `module`, `inputs`, `losses` and (for what it has) `embeddings`,
  `token_embeddings`, `spaces`, `score`, `num_classes`, and implements `_embed` (and `_classify`).
  The module's `__call__(batch, *, train)` must accept the example batch (init runs it once).
  """

  name: str = ''
  losses: Sequence[str] = ()
  embeddings: Mapping[str, Sequence[str]] = {}
  token_embeddings: Mapping[str, Sequence[str]] = {}
  spaces: Mapping[tuple[str, str], str] = {}
  score: PairScore | None = None
  num_classes: int = 0
  rng_streams: Sequence[str] = ('dropout',)

  def __init__(self, config: ml_collections.ConfigDict, module: nn.Module, inputs: dict):
    self.config, self.module, self.inputs = config, module, dict(inputs)
    self.name = config.get('name', self.name)

  def example_batch(self, batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    return {m: spec.abstract(batch_size) for m, spec in self.inputs.items()}

  def init(self, rng: jax.Array, batch: dict, *, boxed: bool = False) -> Variables:
    variables = self.module.init({'params': rng}, batch, train=False)
    return dict(variables if boxed else nn.meta.unbox(variables))

  def objective(self, loss_cfg: ml_collections.ConfigDict) -> Objective:
    return forward_objective(
      self.module, losses.build_loss(self.check_loss(loss_cfg)), rng_streams=self.rng_streams
    )

  def check_loss(self, loss_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The loss config, if this model trains with it; a ValueError naming both otherwise."""
    if loss_cfg.name not in self.losses:
      raise ValueError(
        f'config loss.name {loss_cfg.name!r} does not train model {self.name!r}: it trains with '
        f'{sorted(self.losses)}'
      )
    return loss_cfg

  def embed(self, modality: str, levels: Sequence[str] | None = None) -> EmbedFn:
    pooled = tuple(self.embeddings.get(modality, ()))
    tokens = tuple(self.token_embeddings.get(modality, ()))
    if not pooled and not tokens:
      raise ValueError(
        f'model {self.name!r} has no {modality} embedding (it has {self.modalities})'
      )
    levels = tuple(levels) if levels is not None else pooled
    unknown = [lv for lv in levels if lv not in pooled + tokens]
    if unknown:
      raise ValueError(
        f'model {self.name!r} has no {modality} level {unknown}: it has {pooled + tokens}'
      )
    return self._embed(modality, levels)

  @property
  def modalities(self) -> tuple[str, ...]:
    """Modalities with an embedding (pooled or per token)."""
    return tuple(m for m in MODALITIES if m in self.embeddings or m in self.token_embeddings)

  def _embed(self, modality: str, levels: tuple[str, ...]) -> EmbedFn:
    raise NotImplementedError

  def classify(self) -> Callable[[Variables, dict], jax.Array]:
    if not self.num_classes:
      raise ValueError(f'model {self.name!r} is not a classifier')
    return self._classify()

  def _classify(self) -> Callable[[Variables, dict], jax.Array]:
    raise NotImplementedError

  def load_pretrained(self, params: dict, pretrained: dict) -> tuple[dict, dict]:
    return load_by_name(params, pretrained)
