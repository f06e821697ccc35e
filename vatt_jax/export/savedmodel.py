"""A model's encoders as a TensorFlow SavedModel (jax2tf native serialization), and a parity check.

  import tensorflow as tf
  encoders = tf.saved_model.load('export/saved_model')
  out = encoders.signatures['video'](video=tf.zeros([2, T, H, W, 3]))  # {'input', 'agg', 'va', 'vt'}

One signature per modality the model embeds, named after it, with one input of the same name
(batch dimension free; the others fixed by the model's inputs) and its pooled levels as outputs
(Model.embeddings; the bundle loader's names, vatt_jax.export.bundle.outputs), all float32. VATT:
  video  video: float32 [None, T, H, W, 3] in [-1, 1]  →  input, agg [B, Dv], va [B, va], vt [B, vt]
  audio  audio: float32 [None, S] in [-1, 1]           →  input, agg [B, Da], va [B, va]
  text   text:  int32 [None, W], 0 = padding           →  input, agg [B, Dt], vt [B, vt]

How: each encoder is `jax2tf.convert`ed with a polymorphic batch dimension; the JAX computation is
serialized as StableHLO inside one `XlaCallModule` op per signature (the only jax2tf mode since JAX
0.9), lowered for `platforms` (CPU and CUDA by default: one module holds both, TF picks at run
time). Parameters are non-trainable tf.Variables (in `variables/`, the standard TF checkpoint
format): the serialized modules stay small and the weights can be read or swapped from TF. No
gradient is exported (inference only). The run's tokenizer (a sentencepiece model or a word
vocabulary, data_pipelines.text.Tokenizer reads either), when given, is attached as an asset
(`assets/tokenizer.model`, also `loaded.tokenizer_model.asset_path`); tokenization itself is not in
the graph: feed ids.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np

from data_pipelines.options import TOKENIZER_FILENAME
from vatt_jax.export.bundle import check_exportable, input_spec, outputs
from vatt_jax.models import Model

SAVED_MODEL_DIR = 'saved_model'
DEFAULT_PLATFORMS = ('cpu', 'cuda')


def export_saved_model(
  model: Model,
  variables: dict,
  output_dir: str,
  *,
  tokenizer_path: str | None = None,
  platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
) -> str:
  """Writes `output_dir/saved_model/` with one signature per embedded modality; returns its path.

  Args:
    model, variables: the run's model and {'params', 'batch_stats'} (workdir.load_model).
    output_dir: the SavedModel goes into its `saved_model/` subdirectory, which must be empty.
    tokenizer_path: the run's tokenizer (either kind), attached as an asset when given.
    platforms: jax2tf native_serialization_platforms, a subset of cpu, cuda, rocm, tpu.
  """
  import tensorflow as tf
  from jax.experimental import jax2tf

  check_exportable(model)
  path = os.path.join(output_dir, SAVED_MODEL_DIR)
  if os.path.isdir(path) and os.listdir(path):
    raise FileExistsError(f'{path} already holds files; export into an empty directory')
  spec = input_spec(model)
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), variables)
  module = tf.Module()
  module.weights = tf.nest.map_structure(lambda x: tf.Variable(x, trainable=False), host)
  signatures = {}
  for modality, levels in outputs(model).items():
    converted = jax2tf.convert(
      model.embed(modality, levels),
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
      asset = os.path.join(scratch, TOKENIZER_FILENAME)
      shutil.copyfile(tokenizer_path, asset)
      module.tokenizer_model = tf.saved_model.Asset(asset)
    tf.saved_model.save(module, path, signatures=signatures)
  return path


def _bind(converted, module):
  """x → converted(module.weights, x): the signature's one argument (weights are captured)."""
  return lambda x: converted(module.weights, x)


def random_inputs(model: Model, batch_size: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
  """Inputs of every exported modality in the encoders' ranges (InputSpec.random: floats uniform,
  ids uniform over the non-padding ids with random lengths ≥ 1 and padding)."""
  rng = np.random.default_rng(seed)
  return {m: model.inputs[m].random(rng, batch_size) for m in outputs(model)}


def jax_embeddings(model: Model, variables: dict, inputs: dict[str, np.ndarray]) -> dict[str, dict]:
  """{modality: {level: array}} of the JAX model (Model.embed, jitted), as numpy arrays."""
  levels = outputs(model)
  return {
    m: jax.tree.map(np.asarray, jax.jit(model.embed(m, levels[m]))(variables, x))
    for m, x in inputs.items()
  }


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
  for m, levels in want.items():
    for name, reference in levels.items():
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
  saved_model_dir: str, model: Model, variables: dict, *, batch_size: int = 2, seed: int = 0
) -> dict[str, float]:
  """Max relative error per output between the SavedModel and the JAX model on random inputs
  (random_inputs(model, batch_size, seed)); see relative_errors."""
  inputs = random_inputs(model, batch_size, seed)
  return relative_errors(
    saved_model_embeddings(saved_model_dir, inputs), jax_embeddings(model, variables, inputs)
  )
