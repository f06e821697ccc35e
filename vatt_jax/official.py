"""The official VATT TF2 checkpoints (google-research `vatt/`): read by their object-graph keys,
mapped onto a vatt-jax model of the `:official` presets (vatt_jax/official_workdir.py writes it as
a vatt-jax workdir).

A released checkpoint is `tf.train.Checkpoint(model=MMRLModel, optimizer=Adam)` saved as
`ckpt-500000.{index,data-*}`. Its keys are object-graph paths such as

  model/layer_with_weights-0/_base_layer/vid_backbone/_base/tx/layers/0/mha/q/kernel/.ATTRIBUTES/VARIABLE_VALUE

(Adam's slots hang off each variable under `.OPTIMIZER_SLOT/optimizer/{m,v}`; the optimizer's own
variables live under `optimizer/`). Each model variable is found by the part of its path after
its module's anchor (`ANCHORS`: the video, audio and text backbones, the modality-agnostic
backbone, the bridge head), whatever precedes it, so the keys of the released files and those the
official code writes today (its Keras version names the outer objects differently) both read.

`convert(checkpoint, config)` returns the model's variables after checking every tensor: what the
model needs and the checkpoint lacks, what the checkpoint has and the model does not use, and
every shape — all named before anything is written. Names that differ on purpose:

- the official `vertical_position_embeddings` index the frame's rows (H) and
  `horizontal_position_embeddings` its columns (W); vatt-jax's `horizontal_position` has one row
  per patch row (H) and `vertical_position` one per patch column (W) (the paper's words);
- the official attention kernels are [D, H·d] / [H·d, D], vatt-jax's [D, H, d] / [H, d, D];
  the Conv3D / Conv1D patch kernels [t, h, w, 3, D] / [k, 1, D], vatt-jax's [t·h·w·3, D] / [k, D].

The released models are the `:official` presets of configs/vatt_{bbs,mbs,lbs,ma_medium}.py
(docs/OFFICIAL.md); scripts/convert_official.py is the command.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import ml_collections
import numpy as np
from flax import traverse_util

from vatt_jax.cli import UserError
from vatt_jax.models.transformer import get_size

SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'
# Where each module's variables start in a key: the first match wins, the rest of the key is the
# variable's local name in that module.
ANCHORS = (
  ('video', 'vid_backbone/_base/'),
  ('audio', 'aud_backbone/_base/'),
  ('text', 'txt_backbone/'),
  ('unified', 'unified_backbone/unified_transformer/'),
  ('head', '_bridge_heads/0/'),
)


@dataclasses.dataclass
class Checkpoint:
  """A TF checkpoint's model variables by (module, local name), and its optimizer step."""

  path: str
  variables: dict[tuple[str, str], str]  # (module, local name) → full key
  step: int | None
  reader: object
  shapes: dict[str, list[int]]  # full key → shape

  def shape(self, key: tuple[str, str]) -> tuple[int, ...]:
    return tuple(self.shapes[self.variables[key]])

  def get(self, key: tuple[str, str]) -> np.ndarray:
    name = self.variables[key]
    try:
      return np.asarray(self.reader.get_tensor(name + SUFFIX))
    except Exception as e:  # a truncated or damaged data file
      why = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise UserError(f'--checkpoint={self.path}: cannot read {name} ({why})') from None


def _checkpoint_prefix(path: str) -> str:
  """DIR/ckpt-500000 (or DIR/ckpt-500000.index, or DIR: its latest) → the checkpoint prefix."""
  import tensorflow as tf

  if path.endswith('.index'):
    path = path[: -len('.index')]
  if os.path.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise UserError(
        f'--checkpoint={path}: a directory without a TF checkpoint (no "checkpoint" file)'
      )
    return latest
  if not os.path.exists(path + '.index'):
    raise UserError(
      f'--checkpoint={path}: no {os.path.basename(path)}.index beside it (give DIR/ckpt-500000)'
    )
  return path


def read_checkpoint(path: str) -> Checkpoint:
  """The model variables of an official checkpoint (Adam slots, the optimizer's variables and
  the save counter are left out). Raises UserError for an unreadable file or a key of no known
  module."""
  from data_pipelines.decode import _hide_gpus_from_tensorflow

  _hide_gpus_from_tensorflow()
  import tensorflow as tf

  prefix = _checkpoint_prefix(path)
  try:
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
  except Exception as e:  # a truncated index, a missing data shard
    raise UserError(
      f'--checkpoint={prefix}: not a readable TF checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})'
    ) from None
  variables, unknown, step = {}, [], None
  for key in sorted(shapes):
    if key == 'optimizer/iter' + SUFFIX:
      step = int(reader.get_tensor(key))
    if not key.endswith(SUFFIX) or '.OPTIMIZER_SLOT' in key:
      continue
    name = key[: -len(SUFFIX)]
    if name.startswith(('optimizer/', 'save_counter')):
      continue
    for module, anchor in ANCHORS:
      if anchor in name:
        local = name[name.index(anchor) + len(anchor) :]
        if (module, local) in variables:
          raise UserError(f'--checkpoint={prefix}: two variables of {module} named {local!r}')
        variables[module, local] = name
        break
    else:
      unknown.append(name)
  if unknown:
    raise UserError(
      f'--checkpoint={prefix}: {len(unknown)} variables of no VATT module ({_some(unknown)}); '
      'not an official VATT pretraining checkpoint'
    )
  if not variables:
    raise UserError(f'--checkpoint={prefix}: no VATT model variable in it')
  return Checkpoint(
    prefix, variables, step, reader, {name: shapes[name + SUFFIX] for name in variables.values()}
  )


def _some(names: list[str], limit: int = 6) -> str:
  shown = ', '.join(names[:limit])
  return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')


# ---- the map: vatt-jax parameter path → (module, official local name, how the shape differs) ----

# How an official tensor's shape relates to vatt-jax's (all are reshapes of the same values).
SAME, HEADS_IN, HEADS_OUT, HEADS_BIAS, CONV = 'same', 'heads_in', 'heads_out', 'heads_bias', 'conv'


def official_shape(ours: tuple[int, ...], how: str, conv: tuple[int, ...] = ()) -> tuple[int, ...]:
  """The official tensor's shape for a vatt-jax tensor of shape `ours`."""
  if how == HEADS_IN:  # [D, H, d] ← [D, H·d]
    return (ours[0], ours[1] * ours[2])
  if how == HEADS_OUT:  # [H, d, D] ← [H·d, D]
    return (ours[0] * ours[1], ours[2])
  if how == HEADS_BIAS:  # [H, d] ← [H·d]
    return (ours[0] * ours[1],)
  if how == CONV:  # [k·…·c, D] ← [k…, c, D]
    return (*conv, ours[-1])
  return tuple(ours)


def _encoder(ours: str, module: str, off: str, layers: int, *, t5: bool) -> Iterator[tuple]:
  """The blocks of one encoder: (our path, module, official name, how)."""
  for i in range(layers):
    ob, ol = f'{ours}/block_{i:02d}', f'{off}layers/{i}'
    if t5:
      attn = f'{ol}/self_attention/attention'
      yield f'{ob}/norm_attention/scale', module, f'{ol}/self_attention/layer_norm/weight', SAME
    else:
      attn = f'{ol}/mha'
      yield f'{ob}/norm_attention/scale', module, f'{ol}/layer_norm/gamma', SAME
      yield f'{ob}/norm_attention/bias', module, f'{ol}/layer_norm/beta', SAME
    for ours_name, theirs in (('query', 'q'), ('key', 'k'), ('value', 'v')):
      yield f'{ob}/attention/{ours_name}/kernel', module, f'{attn}/{theirs}/kernel', HEADS_IN
      yield f'{ob}/attention/{ours_name}/bias', module, f'{attn}/{theirs}/bias', HEADS_BIAS
    yield f'{ob}/attention/out/kernel', module, f'{attn}/o/kernel', HEADS_OUT
    yield f'{ob}/attention/out/bias', module, f'{attn}/o/bias', SAME
    yield f'{ob}/norm_mlp/scale', module, f'{ol}/feed_forward/layer_norm/gamma', SAME
    yield f'{ob}/norm_mlp/bias', module, f'{ol}/feed_forward/layer_norm/beta', SAME
    for ours_name, theirs in (('fc1', 'wi'), ('fc2', 'wo')):
      yield f'{ob}/mlp/{ours_name}/kernel', module, f'{ol}/feed_forward/mlp/{theirs}/kernel', SAME
      yield f'{ob}/mlp/{ours_name}/bias', module, f'{ol}/feed_forward/mlp/{theirs}/bias', SAME
  if t5:
    yield f'{ours}/final_norm/scale', module, f'{off}final_layer_norm/weight', SAME
  else:
    yield f'{ours}/final_norm/scale', module, f'{off}final_layer_norm/gamma', SAME
    yield f'{ours}/final_norm/bias', module, f'{off}final_layer_norm/beta', SAME


def _positions(ours: str, module: str, off: str, names: dict[str, str]) -> Iterator[tuple]:
  for mine, theirs in names.items():
    yield f'{ours}/{mine}', module, f'{off}{theirs}_position_embeddings/embeddings', SAME
  yield f'{ours}/position_norm/scale', module, f'{off}layernorm/gamma', SAME
  yield f'{ours}/position_norm/bias', module, f'{off}layernorm/beta', SAME


# vatt-jax's video position tables ← the official ones (see the module docstring).
VIDEO_POSITIONS = {
  'temporal_position': 'temporal',
  'horizontal_position': 'vertical',  # one row per patch row (H)
  'vertical_position': 'horizontal',  # one row per patch column (W)
}


def _head() -> Iterator[tuple]:
  h = 'head'
  yield 'params/head/video_va_1_dense/kernel', h, 'vid_to_hid/kernel', SAME
  for ours, theirs in (('video_va_1_bn', 'hid_to_va/pre_bn'), ('video_va_2_bn', 'hid_to_va/bn'),
                       ('video_vt_bn', 'va_to_vat/bn')):  # fmt: skip
    yield f'params/head/{ours}/scale', h, f'{theirs}/gamma', SAME
    yield f'params/head/{ours}/bias', h, f'{theirs}/beta', SAME
    yield f'batch_stats/head/{ours}/mean', h, f'{theirs}/moving_mean', SAME
    yield f'batch_stats/head/{ours}/var', h, f'{theirs}/moving_variance', SAME
  yield 'params/head/video_va_2_dense/kernel', h, 'hid_to_va/dense/kernel', SAME
  yield 'params/head/video_vt_dense/kernel', h, 'va_to_vat/dense/kernel', SAME
  for ours, theirs in (('audio_va_dense', 'aud_to_va'), ('text_vt_dense', 'txt_to_vat')):
    yield f'params/head/{ours}/kernel', h, f'{theirs}/kernel', SAME
    yield f'params/head/{ours}/bias', h, f'{theirs}/bias', SAME


def rules(cfg: ml_collections.ConfigDict) -> Iterator[tuple]:
  """(vatt-jax variable path, official module, official local name, how) for every variable of an
  `:official` VATT model config (config.model), modality-specific or agnostic."""
  agnostic = cfg.get('backbone') == 'modality_agnostic'
  p = 'params'
  if not agnostic:
    for modality, size in (('video', cfg.video.size), ('audio', cfg.audio.size)):
      t = f'{p}/{modality}_tower'
      yield f'{t}/agg', modality, 'agg_embedding', SAME
      patch = 'voxel_to_patch' if modality == 'video' else 'wave_to_patch'
      yield f'{t}/tokenizer/patch/kernel', modality, f'{patch}/kernel', CONV
      yield f'{t}/tokenizer/patch/bias', modality, f'{patch}/bias', SAME
      names = VIDEO_POSITIONS if modality == 'video' else {'position': 'temporal'}
      yield from _positions(f'{t}/tokenizer', modality, 'pos_embedding_lookup/', names)
      yield from _encoder(f'{t}/encoder', modality, 'tx/', get_size(size).num_layers, t5=False)
    t = f'{p}/text_tower'
    yield f'{t}/agg', 'text', 'agg_embedding', SAME
    yield f'{t}/tokenizer/vocabulary/embedding', 'text', 'embedding/embeddings', SAME
    yield f'{t}/input_projection/kernel', 'text', 'pre_proj/kernel', SAME
    layers = get_size(cfg.text.size).num_layers
    yield from _encoder(f'{t}/encoder', 'text', 'base_lm/', layers, t5=True)
    bias = 'base_lm/layers/0/self_attention/attention/relative_attention_bias/embeddings'
    yield f'{t}/relative_bias/rel_embedding', 'text', bias, SAME  # T5: layer 0's, shared
  else:
    u = 'unified'
    aggs = {'video': 'vid_agg_embedding', 'audio': 'aud_agg_embedding', 'text': 'txt_agg_embedding'}
    for modality in ('video', 'audio', 'text'):
      t = f'{p}/{modality}_tower'
      yield f'{t}/agg', u, aggs[modality], SAME
      if modality == 'text':
        yield f'{t}/tokenizer/vocabulary/embedding', u, 'raw_to_embeddings/text/embeddings', SAME
      else:
        yield f'{t}/tokenizer/patch/kernel', u, f'raw_to_embeddings/{modality}/kernel', CONV
        yield f'{t}/tokenizer/patch/bias', u, f'raw_to_embeddings/{modality}/bias', SAME
      for leaf in ('kernel', 'bias'):
        yield f'{t}/tokenizer/pre_projection/{leaf}', u, f'pre_proj/{modality}/{leaf}', SAME
        yield f'{t}/output_projection/{leaf}', u, f'post_proj/{modality}/{leaf}', SAME
      names = VIDEO_POSITIONS if modality == 'video' else {'position': 'temporal'}
      off = f'pos_embedding_lookup/{modality}/'
      yield from _positions(f'{t}/tokenizer', u, off, names)
    layers = get_size(cfg.shared_size).num_layers
    yield from _encoder(f'{p}/shared_encoder', u, 'tx/', layers, t5=False)
  yield from _head()


def _conv_shape(path: str, cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  if 'video_tower' in path:
    return (*cfg.video.patch_size, 3)
  return (cfg.audio.patch_size, 1)


def check_official(cfg: ml_collections.ConfigDict) -> None:
  """Refuses a model config the official checkpoints cannot fill (not an `:official` preset)."""
  t, h = cfg.text, cfg.head
  need = {
    'position_layernorm': (cfg.position_layernorm, True),
    'head.relu_before_vt': (h.relu_before_vt, True),
    'head.audio_text_bn': (h.get('audio_text_bn', True), False),
    'text.trainable_embedding': (t.get('trainable_embedding', True), False),
  }
  if cfg.get('backbone') == 'modality_agnostic':
    need.update({
      'pre_projection': (cfg.get('pre_projection', False), True),
      'text.positions': (t.get('positions', 'relative'), 'absolute'),
    })  # fmt: skip
    if not cfg.get('post_projection'):
      need['post_projection'] = (0, "the checkpoint's width (1024)")
  else:
    need.update({
      'text.norm_type': (t.norm_type, 'rmsnorm'),
      'text.mlp_norm_type': (t.get('mlp_norm_type', ''), 'layernorm'),
      'text.use_bias': (t.get('use_bias', True), False),
      'text.scale_logits': (t.scale_logits, False),
      'text.bias_all_layers': (t.bias_all_layers, True),
      'pre_projection': (cfg.get('pre_projection', False), False),
      'post_projection': (cfg.get('post_projection', 0), 0),
    })  # fmt: skip
    if not t.get('embedding_dim', 0):
      need['text.embedding_dim'] = (0, "the word table's width (300)")
  wrong = [f'model.{k}={v!r} (official: {want!r})' for k, (v, want) in need.items() if v != want]
  if wrong:
    raise UserError(
      'the config is not the official architecture: '
      + ', '.join(wrong)
      + "; use a preset's :official variant (e.g. --config=configs/vatt_bbs.py:official)"
    )


def convert(ckpt: Checkpoint, cfg: ml_collections.ConfigDict, abstract: dict) -> dict:
  """The variables {'params', 'batch_stats'} (numpy float32) of the model of `cfg` (config.model)
  from an official checkpoint; `abstract` is the model's variable tree of shapes. Every mismatch
  is collected and reported in one UserError before any value is read."""
  flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(abstract).items()}
  plan, missing, mismatched = {}, [], []
  for path, module, name, how in rules(cfg):
    if path not in flat:  # e.g. the T5 tower's biases: the model has none (nor has the checkpoint)
      continue
    want = official_shape(
      tuple(flat[path].shape), how, _conv_shape(path, cfg) if how == CONV else ()
    )
    if (module, name) not in ckpt.variables:
      missing.append(f'{module}:{name} {want}')
      continue
    have = ckpt.shape((module, name))
    if have != want:
      mismatched.append(f'{module}:{name} is {have}, the model needs {want} (for {path})')
    plan[path] = (module, name)
  used = set(plan.values())
  extra = sorted(f'{m}:{n} {ckpt.shape((m, n))}' for (m, n) in ckpt.variables if (m, n) not in used)
  no_rule = sorted(set(flat) - set(plan) - {p for p, *_ in rules(cfg)})
  problems = []
  if mismatched:
    problems.append(f'{len(mismatched)} shapes differ: {_some(mismatched, 4)}')
  if missing:
    problems.append(
      f'{len(missing)} tensors the model needs are not in the checkpoint: {_some(missing)}'
    )
  if extra:
    problems.append(
      f'{len(extra)} tensors in the checkpoint the model does not use: {_some(extra)}'
    )
  if no_rule:
    problems.append(
      f'{len(no_rule)} model variables with no official counterpart: {_some(no_rule)}'
    )
  if problems:
    raise UserError(
      f'--checkpoint={ckpt.path} does not fit the model of the config: '
      + '; '.join(problems)
      + ' (another size or vocabulary: --config.model.… overrides; another architecture: another preset)'
    )
  out = {}
  for path, key in plan.items():
    value = ckpt.get(key).astype(np.float32)
    out[tuple(path.split('/'))] = value.reshape(flat[path].shape)
  variables = traverse_util.unflatten_dict(out)
  variables.setdefault('batch_stats', {})
  return variables
