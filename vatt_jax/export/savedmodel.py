"""The three encoders as a TensorFlow SavedModel (jax2tf native serialization), and a parity check.

  import tensorflow as tf
  encoders = tf.saved_model.load('export/saved_model')
  out = encoders.signatures['video'](video=tf.zeros([2, T, H, W, 3]))  # {'agg', 'va', 'vt'}

Signatures (batch dimension free; the others fixed by config.model):
  video  video: float32 [None, T, H, W, 3] in [-1, 1]  →  agg [B, Dv], va [B, va], vt [B, vt]
  audio  audio: float32 [None, S] in [-1, 1]           →  agg [B, Da], va [B, va]
  text   text:  int32 [None, W], 0 = padding           →  agg [B, Dt], vt [B, vt]
The same names as the bundle loader (vatt_jax.export.bundle.OUTPUTS), all float32.

How: each encoder is `jax2tf.convert`ed with a polymorphic batch dimension; the JAX computation is
serialized as StableHLO inside one `XlaCallModule` op per signature (the only jax2tf mode since JAX
0.9), lowered for `platforms` (CPU and CUDA by default: one module holds both, TF picks at run
time). Parameters are non-trainable tf.Variables (in `variables/`, the standard TF checkpoint
format): the serialized modules stay small and the weights can be read or swapped from TF. No
gradient is exported (inference only). The run's tokenizer.model, when given, is attached as an
asset (`assets/tokenizer.model`, also `loaded.tokenizer_model.asset_path`); tokenization itself is
not in the graph: feed ids.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import ml_collections
import numpy as np

from vatt_jax.export.bundle import OUTPUTS, check_exportable, encode, input_spec

SAVED_MODEL_DIR = 'saved_model'
DEFAULT_PLATFORMS = ('cpu', 'cuda')


def export_saved_model(
  config: ml_collections.ConfigDict,
  model,
  variables: dict,
  output_dir: str,
  *,
  tokenizer_path: str | None = None,
  platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
) -> str:
  """Writes `output_dir/saved_model/` with signatures 'video', 'audio', 'text'; returns its path.

  Args:
    config: the run's config (its model section gives the input shapes).
    model, variables: load_model's module and {'params', 'batch_stats'}.
    output_dir: the SavedModel goes into its `saved_model/` subdirectory, which must be empty.
    tokenizer_path: attached as an asset when given.
    platforms: jax2tf native_serialization_platforms, a subset of cpu, cuda, rocm, tpu.
  """
  import tensorflow as tf
  from jax.experimental import jax2tf

  check_exportable(config.model)
  path = os.path.join(output_dir, SAVED_MODEL_DIR)
  if os.path.isdir(path) and os.listdir(path):
    raise FileExistsError(f'{path} already holds files; export into an empty directory')
  spec = input_spec(config.model)
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), variables)
  module = tf.Module()
  module.weights = tf.nest.map_structure(lambda x: tf.Variable(x, trainable=False), host)
  signatures = {}
  for modality in OUTPUTS:
    converted = jax2tf.convert(
      lambda v, x, m=modality: encode(model, m, v, x),
      polymorphic_shapes=[None, '(b, ...)'],
      with_gradient=False,
      native_serialization_platforms=tuple(platforms),
    )
    shape, dtype = spec[modality]['shape'], getattr(tf, spec[modality]['dtype'])
    function = tf.function(
      _bind(converted, module),
      input_signature=[tf.TensorSpec(shape, dtype, name=modality)],
      autograph=False,
      jit_compile=True,
    )
    # Only as signatures: attached as attributes too, save() would trace each function again.
    signatures[modality] = function.get_concrete_function()
  with tempfile.TemporaryDirectory() as scratch:
    if tokenizer_path is not None:  # (an asset keeps its file name)
      asset = os.path.join(scratch, 'tokenizer.model')
      shutil.copyfile(tokenizer_path, asset)
      module.tokenizer_model = tf.saved_model.Asset(asset)
    tf.saved_model.save(module, path, signatures=signatures)
  return path


def _bind(converted, module):
  """x → converted(module.weights, x): the signature's one argument (weights are captured)."""
  return lambda x: converted(module.weights, x)


def random_inputs(
  model_cfg: ml_collections.ConfigDict, batch_size: int = 2, seed: int = 0
) -> dict[str, np.ndarray]:
  """Inputs of every modality in the encoders' ranges: video and audio uniform in [-1, 1], text
  random ids in [1, vocab) with random lengths (≥ 1 word) and 0-padding."""
  rng = np.random.default_rng(seed)
  spec = input_spec(model_cfg)
  out = {
    m: rng.uniform(-1.0, 1.0, (batch_size, *spec[m]['shape'][1:])).astype(np.float32)
    for m in ('video', 'audio')
  }
  words, vocab = spec['text']['shape'][1], spec['text']['range'][1] + 1
  ids = rng.integers(1, vocab, (batch_size, words), dtype=np.int32)
  lengths = rng.integers(1, words + 1, (batch_size, 1))
  out['text'] = np.where(np.arange(words) < lengths, ids, 0).astype(np.int32)
  return out


def jax_embeddings(model, variables: dict, inputs: dict[str, np.ndarray]) -> dict[str, dict]:
  """{modality: {'agg', 'va'/'vt'}} of the JAX model, as numpy arrays."""
  return {m: jax.tree.map(np.asarray, encode(model, m, variables, x)) for m, x in inputs.items()}


def saved_model_embeddings(path: str, inputs: dict[str, np.ndarray]) -> dict[str, dict]:
  """The same from the SavedModel at `path` (through its signatures), as numpy arrays."""
  import tensorflow as tf

  loaded = tf.saved_model.load(path)
  out = {}
  for m, x in inputs.items():
    result = loaded.signatures[m](**{m: tf.constant(x)})
    out[m] = {k: v.numpy() for k, v in result.items()}
  return out


def relative_errors(got: dict[str, dict], want: dict[str, dict]) -> dict[str, float]:
  """'modality/output' → max |got - want| / max |want| (one scale per output array, so entries
  near zero do not blow the figure up; inf for non-finite values). Fails if an output is missing
  or has another shape."""
  errors = {}
  for m, outputs in want.items():
    for name, reference in outputs.items():
      value = got.get(m, {}).get(name)
      if value is None or value.shape != reference.shape:
        raise ValueError(
          f'{m}/{name}: expected shape {reference.shape}, got '
          + ('nothing' if value is None else str(value.shape))
        )
      diff = np.abs(value.astype(np.float64) - reference.astype(np.float64)).max()
      error = float(diff / max(np.abs(reference).max(), 1e-30))
      errors[f'{m}/{name}'] = error if np.isfinite(error) else float('inf')  # (NaN never passes)
  return errors


def parity(
  saved_model_dir: str,
  config: ml_collections.ConfigDict,
  model,
  variables: dict,
  *,
  batch_size: int = 2,
  seed: int = 0,
) -> dict[str, float]:
  """Max relative error per output between the SavedModel and the JAX model on random inputs
  (random_inputs(config.model, batch_size, seed)); see relative_errors."""
  inputs = random_inputs(config.model, batch_size, seed)
  return relative_errors(
    saved_model_embeddings(saved_model_dir, inputs), jax_embeddings(model, variables, inputs)
  )
