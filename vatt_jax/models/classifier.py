"""Fine-tuning classifiers: one VATT tower, dropout, a linear head on the tower's AGG output.

  video (Kinetics):  video [B, T, H, W, 3] → video tower → AGG [B, D] → dropout → Dense → [B, C]
  audio (AudioSet):  audio [B, S] → audio tower → …
  image (ImageNet):  the image repeated into a clip of num_frames (the input pipeline does it), fed
                     to the video tower — the paper's "replicate the input image 4 times".

The classifier composes VATT's `Tower` (vatt_jax/models/tower.py), built by the same function as
VATT's and under the same name — `video_tower` (or `audio_tower`; the modality-agnostic backbone's
encoder stays `shared_encoder`) — so a pretraining checkpoint maps onto a classifier by name
(`ClassifierModel.load_pretrained`). The head is `classifier` {kernel [D, C], bias [C]}; the
official code initialises it glorot-normal (video) or glorot-uniform with bias −log(C − 1)
(audio), both with dropout 0.5 before it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vatt_jax.models import contract
from vatt_jax.models.transformer import EncoderSize
from vatt_jax.models.vatt import make_encoder, make_tower
from vatt_jax.models.vatt_config import (
  AudioSpec,
  VideoSpec,
  audio_spec,
  media_inputs,
  shared_size,
  video_spec,
)
from vatt_jax.models.vatt_pretrained import adapt_positions

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


class Classifier(nn.Module):
  """One tower and a classification head (see the module docstring).

  Attributes:
    tower: 'video' or 'audio'; spec: that tower's VideoSpec or AudioSpec.
    shared: the modality-agnostic backbone's encoder size (its encoder is then `shared_encoder`).
    num_classes: C.
    classifier_dropout_rate: dropout on the AGG output before the head (official code: 0.5).
    kernel_init: 'glorot_normal', 'glorot_uniform' or 'zeros'.
    bias_init: constant initial bias (the official audio head: −log(C − 1)).
    dropout_rate, attention_dropout_rate, remat, dtype: the tower's, as in pretraining.
  """

  tower: str
  spec: VideoSpec | AudioSpec
  num_classes: int
  shared: EncoderSize | None = None
  shared_attention: str = 'dense'
  classifier_dropout_rate: float = 0.0
  kernel_init: str = 'glorot_normal'
  bias_init: float = 0.0
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  remat: str = 'none'
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    if self.tower not in ('video', 'audio'):
      raise ValueError(f"Classifier tower must be 'video' or 'audio', got {self.tower!r}")
    if self.shared is not None:
      self.shared_encoder = make_encoder(self, self.shared, self.shared_attention)
    setattr(self, f'{self.tower}_tower', make_tower(self, self.tower, self.spec))
    self.head_dropout = nn.Dropout(self.classifier_dropout_rate)
    self.classifier = nn.Dense(
      self.num_classes,
      kernel_init=nn.with_logical_partitioning(KERNEL_INITS[self.kernel_init], ('embed', None)),
      bias_init=nn.with_logical_partitioning(nn.initializers.constant(self.bias_init), (None,)),
      dtype=jnp.float32,
      name=HEAD,
    )

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """The tower's AGG output [B, D] float32."""
    return getattr(self, f'{self.tower}_tower')(x, train=train).agg

  def __call__(self, batch: dict[str, jax.Array], *, train: bool = False) -> dict[str, jax.Array]:
    """batch: "video" [B, T, H, W, 3] or "audio" [B, S] (other fields are ignored).

    Returns {"logits": [B, C] float32, "<tower>_agg": [B, D] float32}.
    """
    if self.tower not in batch:
      raise ValueError(
        f'a {self.tower} classifier needs batch[{self.tower!r}]; keys: {sorted(batch)}'
      )
    features = self.features(batch[self.tower], train=train)
    hidden = self.head_dropout(features, deterministic=not train)
    return {'logits': self.classifier(hidden), f'{self.tower}_agg': features}


def build_module(cfg: ml_collections.ConfigDict) -> Classifier:
  """config.model (a VATT model config plus modality, num_classes, classifier) → Classifier."""
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
    tower=tower,
    spec=video_spec(cfg) if tower == 'video' else audio_spec(cfg),
    num_classes=int(cfg.num_classes),
    shared=shared_size(cfg),
    shared_attention=cfg.get('shared_attention', 'dense'),
    classifier_dropout_rate=float(dropout),
    kernel_init=kernel_init,
    bias_init=float(head.get('bias_init', 0.0)),
    dropout_rate=cfg.dropout_rate,
    attention_dropout_rate=cfg.attention_dropout_rate,
    remat=cfg.get('remat', 'none'),
    dtype=jnp.bfloat16 if cfg.dtype == 'bfloat16' else jnp.float32,
  )


class ClassifierModel(contract.FlaxModel):
  """The classifier under the model contract: input its tower's modality, embedding level 'agg'
  (the tower's AGG output), classify() → logits; trains with softmax / sigmoid cross-entropy;
  loads a pretraining run's tower by name, its head kept at initialisation."""

  losses = ('softmax_xent', 'sigmoid_xent')
  rng_streams = ('dropout', 'droptoken')

  def __init__(self, cfg: ml_collections.ConfigDict):
    module = build_module(cfg)
    super().__init__(cfg, module, media_inputs(cfg, (module.tower,)))
    self.tower = module.tower
    self.num_classes = module.num_classes
    self.embeddings = {self.tower: ('agg',)}

  def _embed(self, modality: str, levels: tuple[str, ...]) -> contract.EmbedFn:
    def embed(variables, x):
      return {'agg': self.module.apply(variables, x, method=Classifier.features)}

    return embed

  def _classify(self):
    def classify(variables, inputs: dict):
      return self.module.apply(variables, inputs)['logits']

    return classify

  def load_pretrained(self, params: dict, pretrained: dict) -> tuple[dict, dict]:
    return contract.load_by_name(params, pretrained, keep_init=(HEAD,), adapt=adapt_positions)
