"""A self-contained bundle of a trained model, and the loader that turns it back into encoders.

  from vatt_jax.export import load_bundle
  encoders = load_bundle('export/bundle')
  v = encoders.video(frames)      # [B, T, H, W, 3] float32 in [-1, 1] → {'input', 'agg', 'va', 'vt'}
  t = encoders.text(['a seven drifts to the left'])  # strings, or int32 ids [B, W] → {…, 'vt'}
  scores = v['vt'] @ t['vt'].T    # video–text similarity (and v['va'] with encoders.audio(x)['va'])

Any model of the contract with embeddings exports (vatt_jax/models/contract.py): one encoder per
modality it embeds, returning its pooled levels (Model.embeddings; VATT: video 'input', 'agg',
'va', 'vt'; audio 'input', 'agg', 'va'; text 'input', 'agg', 'vt'), computed by Model.embed.

Layout of `bundle/` (no pickle: JSON and safetensors / msgpack are read without running code):
  params.safetensors   every variable, key '<collection>/<module>/…/<name>' ('params/…' and
                       'batch_stats/…'); or params.msgpack (flax.serialization) with the same tree
  config.json          the run's resolved config (model section rebuilds the model)
  tokenizer.model      the run's tokenizer, when it had one (synthetic-data runs do not): a
                       sentencepiece model or a DMVR word vocabulary, whatever its original name
  bundle.json          format version, input shapes / dtypes / ranges, output names and widths, the
                       preprocessing spec, every tensor's shape and dtype, sha256 of the
                       parameter and tokenizer files
The loader checks the files' checksums, then every tensor's name and shape against the model that
config.json describes, before any array reaches a device: a bundle of another model, a truncated or
edited file fails with an error naming the culprit.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import serialization, traverse_util

from data_pipelines.options import TOKENIZER_FILENAME, file_sha256, tokenizer_path
from vatt_jax.models import Model, build_model
from vatt_jax.models.contract import abstract_variables, check_variables, flat_paths

FORMAT = 'vatt-jax-bundle'
FORMAT_VERSION = 1
BUNDLE_DIR = 'bundle'
PARAMS_FILES = {'safetensors': 'params.safetensors', 'msgpack': 'params.msgpack'}


def check_exportable(model: Model) -> None:
  """A model exports when it has an embedding of at least one modality."""
  if not any(model.embeddings.get(m) for m in model.inputs):
    raise ValueError(
      f'model {model.name!r} has no embedding function (Model.embeddings): nothing to export'
    )


def outputs(model: Model) -> dict[str, tuple[str, ...]]:
  """The encoders an export has: modality → the pooled levels it returns."""
  return {m: tuple(model.embeddings[m]) for m in model.inputs if model.embeddings.get(m)}


def input_spec(model: Model) -> dict[str, dict[str, Any]]:
  """Per exported modality: shape (None = any batch), dtype and value range the encoders take."""
  return {m: model.inputs[m].describe() for m in outputs(model)}


def run_tokenizer_path(config: ml_collections.ConfigDict) -> str | None:
  """The run's tokenizer, a sentencepiece model or a word vocabulary
  (data_pipelines.options.tokenizer_path), or None when the run had none (synthetic data)."""
  path = tokenizer_path(config.get('data', ml_collections.ConfigDict()))
  return path if path and os.path.isfile(path) else None


def _flatten(variables: dict) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(variables)
  bad = ['/'.join(map(str, k)) for k in flat if any('/' in str(part) for part in k)]
  if bad:
    raise ValueError(f"variable names may not contain '/': {bad[:5]}")
  return {'/'.join(k): np.ascontiguousarray(jax.device_get(v)) for k, v in flat.items()}


def _read_tokenizer(path: str):
  """data_pipelines.text.Tokenizer of `path` (either kind; it refuses a padding id other than 0)."""
  # (imports TensorFlow: only when a tokenizer is bundled)
  from data_pipelines.text import Tokenizer

  return Tokenizer(path)


def write_bundle(
  config: ml_collections.ConfigDict,
  variables: dict,
  output_dir: str,
  tokenizer_path: str | None = None,
  *,
  fmt: str = 'safetensors',
  step: int | None = None,
) -> str:
  """Writes `output_dir/bundle/` (see the module docstring) and returns its path.

  Args:
    config: the run's config (load_model's); its model section must describe `variables`.
    variables: {'params': …, 'batch_stats': …} of arrays.
    output_dir: the bundle goes into its `bundle/` subdirectory, which must not hold files yet.
    tokenizer_path: the run's tokenizer, a sentencepiece model or a word vocabulary
      (run_tokenizer_path(config)), or None.
    fmt: 'safetensors' or 'msgpack' for the parameters.
    step: the checkpoint step, recorded in bundle.json.
  """
  if fmt not in PARAMS_FILES:
    raise ValueError(f'bundle format must be one of {sorted(PARAMS_FILES)}, got {fmt!r}')
  path = os.path.join(output_dir, BUNDLE_DIR)
  if os.path.isdir(path) and os.listdir(path):
    raise FileExistsError(f'{path} already holds files; export into an empty directory')
  model = build_model(config.model)
  check_exportable(model)
  flat = _flatten(variables)
  abstract = flat_paths(abstract_variables(model))
  check_variables(flat, abstract, 'the variables to export', dtypes=True)
  tokenizer_kind = None
  if tokenizer_path is not None:
    if not os.path.isfile(tokenizer_path):
      raise FileNotFoundError(f'tokenizer {tokenizer_path} does not exist')
    if 'text' not in outputs(model):
      raise ValueError(f'model {model.name!r} embeds no text: a tokenizer has nothing to do')
    tokenizer = _read_tokenizer(tokenizer_path)
    tokenizer_kind, vocab_size = tokenizer.kind, int(model.inputs['text'].high) + 1
    if tokenizer.vocab_size > vocab_size:
      raise ValueError(
        f'tokenizer {tokenizer_path} has {tokenizer.vocab_size} ids, more than the {vocab_size} '
        "the model's text input takes: it is not the tokenizer of this model"
      )

  os.makedirs(path, exist_ok=True)
  params_file = os.path.join(path, PARAMS_FILES[fmt])
  if fmt == 'safetensors':
    from safetensors.numpy import save_file

    save_file(flat, params_file, metadata={'format': FORMAT, 'format_version': str(FORMAT_VERSION)})
    os.chmod(params_file, 0o666 & ~_umask())  # (safetensors creates it owner-only)
  else:
    with open(params_file, 'wb') as f:
      f.write(serialization.msgpack_serialize(traverse_util.unflatten_dict(flat, sep='/')))
  resolved = json.loads(config.to_json_best_effort())
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(resolved, f, indent=2, sort_keys=True)
  files = {'params': PARAMS_FILES[fmt], 'config': 'config.json'}
  if tokenizer_path is not None:
    shutil.copyfile(tokenizer_path, os.path.join(path, TOKENIZER_FILENAME))
    files['tokenizer'] = TOKENIZER_FILENAME

  shapes = traverse_util.unflatten_dict(abstract, sep='/')
  widths = {
    m: jax.eval_shape(model.embed(m, levels), shapes, model.inputs[m].abstract(1))
    for m, levels in outputs(model).items()
  }
  data = config.get('data', ml_collections.ConfigDict())
  info = {
    'format': FORMAT,
    'format_version': FORMAT_VERSION,
    'vatt_jax_version': _package_version(),
    'step': step,
    'files': files,
    # config.json is left editable (e.g. dtype='bfloat16' for inference): the shape check guards it
    'sha256': {n: file_sha256(os.path.join(path, f)) for n, f in files.items() if n != 'config'},
    'model': model.name,
    'inputs': input_spec(model),
    'outputs': {m: {k: int(v.shape[-1]) for k, v in w.items()} for m, w in widths.items()},
    'preprocessing': preprocessing(model, data, tokenizer_kind),
    'tensors': {k: {'shape': list(v.shape), 'dtype': str(v.dtype)} for k, v in flat.items()},
    'num_parameters': int(sum(v.size for k, v in flat.items() if k.startswith('params/'))),
  }
  with open(os.path.join(path, 'bundle.json'), 'w') as f:
    json.dump(info, f, indent=2)
  return path


def preprocessing(
  model: Model, data: ml_collections.ConfigDict, tokenizer_kind: str | None = None
) -> dict[str, Any]:
  """How raw media become the encoders' inputs (bundle.json), as the training pipeline makes them.
  tokenizer_kind: data_pipelines.text.Tokenizer.kind of the bundled tokenizer, or None."""
  out = {}
  inputs = input_spec(model)
  if 'video' in inputs:
    num_frames, height, width = inputs['video']['shape'][1:4]
    out.update(fps=data.get('fps'), num_frames=num_frames, frame_size=[height, width],
               video='RGB, central crop resized (bilinear) to frame_size, x / 127.5 - 1')  # fmt: skip
  if 'audio' in inputs:
    out.update(sample_rate=data.get('sample_rate'), num_samples=inputs['audio']['shape'][1],
               audio='mono waveform at sample_rate in [-1, 1], zero-padded to num_samples')  # fmt: skip
  if 'text' in inputs:
    out.update(max_words=inputs['text']['shape'][1],
               text='sentencepiece ids (tokenizer.model), truncated or padded with 0 to max_words')  # fmt: skip
    if tokenizer_kind == 'words':
      out['text'] = ('word ids (tokenizer.model, a DMVR word vocabulary: ASCII punctuation removed, '
                     'ASCII letters lower-cased, split on whitespace, unknown words <unk>), '
                     "truncated or padded with <pad> (id 0) to max_words")  # fmt: skip
    if tokenizer_kind is not None:
      out['tokenizer'] = tokenizer_kind
  return out


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _package_version() -> str | None:
  from importlib import metadata

  try:
    return metadata.version('vatt-jax')
  except metadata.PackageNotFoundError:
    return None


class Encoders:
  """One encoder per modality the model embeds; each call runs one jitted function (Model.embed).

  Attributes:
    config: the run's config; model: the model (contract); variables: {'params', 'batch_stats'}
    on the default device; info: bundle.json (or None when built from memory); tokenizer_path:
    the run's tokenizer (a sentencepiece model or a word vocabulary, data_pipelines.text.Tokenizer
    tells them apart), or None (then `text` takes ids only).
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    model: Model,
    variables: dict,
    *,
    info: dict | None = None,
    tokenizer_path: str | None = None,
  ):
    self.config, self.model, self.info = config, model, info
    self.variables = jax.device_put(variables)
    self.tokenizer_path = tokenizer_path
    self._tokenizer = None
    self._spec = input_spec(model)
    self._functions = {m: jax.jit(model.embed(m, levels)) for m, levels in outputs(model).items()}

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(self._functions)

  def _check(self, modality: str, x) -> np.ndarray:
    if modality not in self._spec:
      raise ValueError(f'model {self.model.name!r} has no {modality} encoder ({self.modalities})')
    spec = self._spec[modality]
    x = np.asarray(x)
    want = tuple(spec['shape'][1:])
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
      raise ValueError(
        f'{modality} input has shape {x.shape}, the model takes [B, {", ".join(map(str, want))}]'
        + (' (add a batch axis: x[None])' if tuple(x.shape) == want else '')
      )
    if spec['dtype'].startswith('float'):
      if not np.issubdtype(x.dtype, np.floating):
        low, high = spec['range']
        raise ValueError(
          f'{modality} input is {x.dtype}; the model takes {spec["dtype"]} in [{low:g}, {high:g}] '
          '(e.g. uint8 frames / 127.5 - 1)'
        )
      return x.astype(spec['dtype'])
    if not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f'{modality} input is {x.dtype}: pass strings or {spec["dtype"]} token ids')
    low, high = spec['range']
    if x.size and (x.min() < low or x.max() > high):
      raise ValueError(f"{modality} ids must lie in [{low}, {high}] (the model's vocabulary)")
    return x.astype(spec['dtype'])

  def embed(self, modality: str, x) -> dict[str, jax.Array]:
    """One modality's array [B, …] → {level: [B, D]} (the model's pooled levels)."""
    x = self._check(modality, x)
    return self._functions[modality](self.variables, x)

  def video(self, video) -> dict[str, jax.Array]:
    """video: [B, T, H, W, 3] float32 in [-1, 1] → {level: [B, D]}."""
    return self.embed('video', video)

  def audio(self, audio) -> dict[str, jax.Array]:
    """audio: [B, S] float32 in [-1, 1] → {level: [B, D]}."""
    return self.embed('audio', audio)

  def text(self, text: str | Sequence[str] | np.ndarray) -> dict[str, jax.Array]:
    """A string, a list of B strings or int32 ids [B, W] (0 = padding) → {level: [B, D]}. Strings
    need the bundle's tokenizer."""
    if isinstance(text, str | bytes):
      text = [text]
    if isinstance(text, np.ndarray) and text.dtype.kind in 'USO':
      text = text.tolist()
    if isinstance(text, list | tuple) and text and all(isinstance(t, str | bytes) for t in text):
      text = self.tokenize(text)
    return self.embed('text', text)

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """[B] strings → [B, max_words] int32 ids, exactly as the training pipeline tokenizes."""
    if 'text' not in self._spec:
      raise ValueError(f'model {self.model.name!r} has no text encoder ({self.modalities})')
    if self.tokenizer_path is None:
      raise ValueError(
        'this bundle has no tokenizer.model (the run had none, e.g. synthetic data): pass int32 '
        'token ids [B, W] to text(), or re-export with the tokenizer'
      )
    if self._tokenizer is None:
      from data_pipelines.text import Tokenizer  # (imports TensorFlow: only when strings are used)

      self._tokenizer = Tokenizer(self.tokenizer_path)
    return self._tokenizer.encode(texts, self._spec['text']['shape'][1])


def _read_json(path: str, what: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: not a complete vatt-jax bundle ({what})')
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is corrupt: {e}') from None


def _read_params(path: str, fmt_file: str) -> dict[str, np.ndarray]:
  try:
    if fmt_file.endswith('.safetensors'):
      from safetensors.numpy import load_file

      return load_file(path)
    with open(path, 'rb') as f:
      return _flatten(serialization.msgpack_restore(f.read()))
  except Exception as e:  # safetensors and msgpack raise their own types for malformed data
    raise ValueError(f'{path} cannot be read ({type(e).__name__}: {e}); re-export it') from None


def load_bundle(path: str) -> Encoders:
  """Encoders from a bundle directory written by write_bundle (`O/bundle`, or `O` itself).

  Raises FileNotFoundError for a missing file, ValueError for a corrupt one, a bundle of a newer
  format, or parameters that do not fit the model its config.json describes.
  """
  if not os.path.isfile(os.path.join(path, 'bundle.json')) and os.path.isfile(
    os.path.join(path, BUNDLE_DIR, 'bundle.json')
  ):
    path = os.path.join(path, BUNDLE_DIR)
  info = _read_json(os.path.join(path, 'bundle.json'), 'its index')
  if info.get('format') != FORMAT:
    raise ValueError(f'{path}/bundle.json is not a {FORMAT} index (format {info.get("format")!r})')
  if info.get('format_version', 0) > FORMAT_VERSION:
    raise ValueError(
      f'{path} is bundle format {info["format_version"]}; this vatt-jax reads up to '
      f'{FORMAT_VERSION}: upgrade vatt-jax'
    )
  files = info.get('files') or {}
  if not {'params', 'config'} <= files.keys():
    raise ValueError(f'{path}/bundle.json lists no params or config file: it is corrupt')
  for name, file in files.items():
    full = os.path.join(path, file)
    if not os.path.isfile(full):
      raise FileNotFoundError(f'{full} is missing: the bundle is incomplete')
    if info.get('sha256', {}).get(name) not in (None, file_sha256(full)):
      raise ValueError(f'{full} is corrupt: its sha256 differs from the one in bundle.json')
  config = ml_collections.ConfigDict(
    _read_json(os.path.join(path, files['config']), 'the run config')
  )
  model = build_model(config.model)
  check_exportable(model)
  params_path = os.path.join(path, files['params'])
  flat = _read_params(params_path, files['params'])
  check_variables(flat, flat_paths(abstract_variables(model)), params_path, dtypes=True)
  variables = traverse_util.unflatten_dict(flat, sep='/')
  variables.setdefault('batch_stats', {})
  tokenizer = os.path.join(path, files['tokenizer']) if 'tokenizer' in files else None
  return Encoders(config, model, variables, info=info, tokenizer_path=tokenizer)
