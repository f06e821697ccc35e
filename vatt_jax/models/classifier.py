"""Fine-tuning classifiers: one VATT tower, dropout, a linear head on the tower's AGG output.

  video (Kinetics):  video [B, T, H, W, 3] → video tower → AGG [B, D] → dropout → Dense → [B, C]
  audio (AudioSet):  audio [B, S] → audio tower → …
  image (ImageNet):  the image repeated into a clip of num_frames (the input pipeline does it), fed
                     to the video tower — the paper's "replicate the input image 4 times".

The tower is VATT's own (`VATT._tower`: tokenizer → dropout → DropToken → AGG → encoder), and its
parameters keep VATT's names — `video_tokenizer`, `video_agg`, `video_encoder` (or `shared_encoder`
for the modality-agnostic backbone) — so a pretraining checkpoint maps onto a classifier by name
(`load_pretrained_tower`). The head is `classifier` {kernel [D, C], bias [C]}; the official code
initialises it glorot-normal (video) or glorot-uniform with bias −log(C − 1) (audio), both with
dropout 0.5 before it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from vatt_jax.models.tokenizers import VoxelTokenizer, WaveformTokenizer, resize_positions
from vatt_jax.models.vatt import VATT

MODALITIES = ('video', 'audio', 'image')
HEAD = 'classifier'
KERNEL_INITS = {
  'glorot_normal': nn.initializers.glorot_normal(),
  'glorot_uniform': nn.initializers.glorot_uniform(),
  'zeros': nn.initializers.zeros_init(),
}


def tower_of(modality: str) -> str:
  """The VATT tower a classifier of `modality` uses (an image is a clip for the video tower)."""
  if modality not in MODALITIES:
    raise ValueError(f'config model.modality must be one of {MODALITIES}, got {modality!r}')
  return 'video' if modality == 'image' else modality


class Classifier(VATT):
  """A VATT with a single tower and a classification head (see the module docstring).

  The VATT attributes (specs, shared encoder, dropout rates, remat, dtype) describe the tower as in
  pretraining; only the spec of `tower` is read, the others may be None.

  Attributes:
    tower: 'video' or 'audio'.
    num_classes: C.
    classifier_dropout_rate: dropout on the AGG output before the head (official code: 0.5).
    kernel_init: 'glorot_normal', 'glorot_uniform' or 'zeros'.
    bias_init: constant initial bias (the official audio head: −log(C − 1)).
  """

  tower: str = 'video'
  num_classes: int = 400
  classifier_dropout_rate: float = 0.0
  kernel_init: str = 'glorot_normal'
  bias_init: float = 0.0

  def setup(self):
    if self.tower not in ('video', 'audio'):
      raise ValueError(f"Classifier tower must be 'video' or 'audio', got {self.tower!r}")
    width = self._width(self.tower)
    if self.tower == 'video':
      self.video_tokenizer = VoxelTokenizer(
        width=width,
        patch_size=tuple(self.video.patch_size),
        grid=tuple(self.video.grid),
        position_layernorm=self.video.position_layernorm,
        dtype=self.dtype,
      )
    else:
      self.audio_tokenizer = WaveformTokenizer(
        width=width,
        patch_size=self.audio.patch_size,
        num_patches=self.audio.num_patches,
        position_layernorm=self.audio.position_layernorm,
        dtype=self.dtype,
      )
    self.token_dropout = nn.Dropout(self.dropout_rate)
    agg_init = nn.with_logical_partitioning(
      nn.initializers.truncated_normal(stddev=0.02), ('embed',)
    )
    self.agg_tokens = {self.tower: self.param(f'{self.tower}_agg', agg_init, (width,))}
    if self.shared is not None:
      self.shared_encoder = self._make_encoder(self.shared)
    elif self.tower == 'video':
      self.video_encoder = self._make_encoder(self.video.size)
    else:
      self.audio_encoder = self._make_encoder(self.audio.size)
    self.head_dropout = nn.Dropout(self.classifier_dropout_rate)
    self.classifier = nn.Dense(
      self.num_classes,
      kernel_init=nn.with_logical_partitioning(KERNEL_INITS[self.kernel_init], ('embed', None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.constant(self.bias_init), (None,)),
      dtype=jnp.float32,
      name=HEAD,
    )

  def __call__(self, batch: dict[str, jax.Array], *, train: bool = False) -> dict[str, jax.Array]:
    """batch: "video" [B, T, H, W, 3] or "audio" [B, S] (other fields are ignored).

    Returns {"logits": [B, C] float32, "<tower>_agg": [B, D] float32}.
    """
    if self.tower not in batch:
      raise ValueError(
        f'a {self.tower} classifier needs batch[{self.tower!r}]; keys: {sorted(batch)}'
      )
    encode = self.encode_video if self.tower == 'video' else self.encode_audio
    features = encode(batch[self.tower], train=train)
    hidden = self.head_dropout(features, deterministic=not train)
    return {'logits': self.classifier(hidden), f'{self.tower}_agg': features}


def build_classifier(cfg: ml_collections.ConfigDict, backbone: VATT) -> Classifier:
  """config.model (a VATT model config plus modality, num_classes, classifier) → Classifier.

  backbone: the VATT that config.model describes (its specs give the tower's shapes).
  """
  if cfg.get('num_classes', 0) < 1:
    raise ValueError(f'config model.num_classes must be >= 1, got {cfg.get("num_classes")!r}')
  head = cfg.get('classifier', ml_collections.ConfigDict())
  kernel_init = head.get('kernel_init', 'glorot_normal')
  if kernel_init not in KERNEL_INITS:
    raise ValueError(
      f'config model.classifier.kernel_init must be one of {sorted(KERNEL_INITS)}, '
      f'got {kernel_init!r}'
    )
  dropout = head.get('dropout_rate', 0.0)
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'config model.classifier.dropout_rate must be in [0, 1), got {dropout}')
  tower = tower_of(cfg.get('modality', 'video'))
  return Classifier(
    video=backbone.video if tower == 'video' else None,
    audio=backbone.audio if tower == 'audio' else None,
    text=None,
    head=None,
    shared=backbone.shared,
    dropout_rate=backbone.dropout_rate,
    attention_dropout_rate=backbone.attention_dropout_rate,
    remat=backbone.remat,
    dtype=backbone.dtype,
    tower=tower,
    num_classes=int(cfg.num_classes),
    classifier_dropout_rate=float(dropout),
    kernel_init=kernel_init,
    bias_init=float(head.get('bias_init', 0.0)),
  )


# ---- initialisation from a pretraining checkpoint ----------------------------------------------

_POSITION_TABLES = {
  'video_tokenizer': ('temporal_position', 'horizontal_position', 'vertical_position'),
  'audio_tokenizer': ('position',),
}


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, 'shape') else tuple(np.shape(x))


def load_pretrained_tower(params: dict, pretrained: dict) -> tuple[dict, dict]:
  """A classifier's parameters with its tower taken from a pretraining run's parameters.

  Every parameter outside the head (`classifier`) must exist in `pretrained` under the same path
  (VATT's names) with the same shape, except position tables, which are resized cubically
  (`resize_positions`) when the patch grid changed (fine-tuning 224² → 320², another clip length
  or waveform length). The head keeps its initialisation.

  Args:
    params: the freshly initialised classifier parameters (arrays, nested dicts; only the shapes
      and dtypes of the tower's leaves are read, so they may be global arrays of several hosts).
    pretrained: the pretraining checkpoint's parameters (e.g. a VATT's, all three towers).
  Returns:
    (params with the tower replaced — numpy arrays where loaded, the given leaves elsewhere,
     report {'loaded': [path], 'resized': {path: (old shape, new shape)}, 'kept_init': [path]}).
  Raises:
    ValueError naming every tower parameter that is missing from the checkpoint or has another
    shape there (another size, patching or backbone: a checkpoint of another model).
  """
  pretrained = dict(pretrained)
  resize = {}
  for tokenizer, tables in _POSITION_TABLES.items():
    if tokenizer in params and tokenizer in pretrained:
      for table in tables:
        new, old = params[tokenizer].get(table), pretrained[tokenizer].get(table)
        if new is not None and old is not None and _shape(new) != _shape(old):
          resize[(tokenizer, table)] = (_shape(old), _shape(new))
  if resize:
    video = [resize.get(('video_tokenizer', t)) for t in _POSITION_TABLES['video_tokenizer']]
    audio = resize.get(('audio_tokenizer', 'position'))
    grid = None
    if any(video):
      grid = [_shape(params['video_tokenizer'][t])[0] for t in _POSITION_TABLES['video_tokenizer']]
    pretrained = resize_positions(
      pretrained,
      video_grid=grid,
      audio_patches=audio[1][0] if audio else None,
    )

  flat = traverse_util.flatten_dict(params)
  source = traverse_util.flatten_dict(pretrained)
  problems, out = [], {}
  report = {'loaded': [], 'resized': {}, 'kept_init': []}
  for path, leaf in flat.items():
    name = '/'.join(path)
    if path[0] == HEAD:
      out[path] = leaf
      report['kept_init'].append(name)
      continue
    if path not in source:
      problems.append(f'{name}: not in the checkpoint')
      continue
    if _shape(source[path]) != _shape(leaf):
      problems.append(f'{name}: checkpoint {_shape(source[path])}, this model {_shape(leaf)}')
      continue
    out[path] = np.asarray(source[path], dtype=leaf.dtype)
    report['loaded'].append(name)
    if path[:2] in resize:
      report['resized'][name] = resize[path[:2]]
  if problems:
    shown = '; '.join(problems[:8]) + (f'; … {len(problems) - 8} more' if len(problems) > 8 else '')
    raise ValueError(f"the checkpoint does not hold this classifier's tower: {shown}")
  return traverse_util.unflatten_dict(out), report
