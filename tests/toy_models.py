"""Two test-only models, registered from outside the package the way a user's would be
(config model.register_from='tests.toy_models'), to show that the trainer, the evaluators, the
report and the export need nothing of a model but its contract (vatt_jax/models/contract.py).

  bag_of_patches   a dual encoder: a clip is the mean of its linearly projected patches, a caption
                   the mean of its word embeddings; trained with a symmetric NCE ('toy_nce').
  pair_scorer      the same two encoders, ranked jointly: score(v, t) = w · tanh(W [f(v); g(t)]),
                   no common space of its own unless `with_space` (then its embeddings are
                   offered for a first stage too).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from data_pipelines.options import frame_hw
from vatt_jax import losses
from vatt_jax.models import FlaxModel, InputSpec, PairScore, register_model


class BagOfPatches(nn.Module):
  width: int
  patch: int
  vocab_size: int
  scorer: bool = False

  def setup(self):
    self.video_proj = nn.Dense(self.width)
    self.words = nn.Embed(self.vocab_size, self.width)
    if self.scorer:
      self.fuse, self.out = nn.Dense(self.width), nn.Dense(1)

  def video(self, video):  # [B, T, H, W, 3] → [B, D]
    b, t, h, w, c = video.shape
    patches = video.reshape(b, t, h // self.patch, self.patch, w // self.patch, self.patch, c)
    patches = patches.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, -1, self.patch**2 * c)
    return self.video_proj(patches).mean(1)

  def text(self, ids):  # [..., W] → [..., D]: the mean over the non-padding words
    mask = (ids > 0)[..., None].astype(jnp.float32)
    words = self.words(ids)
    return (words * mask).sum(-2) / jnp.maximum(mask.sum(-2), 1.0)

  def score(self, v, t):  # [B, D], [B, D] → [B]
    return self.out(jnp.tanh(self.fuse(jnp.concatenate([v, t], -1))))[:, 0]

  def __call__(self, batch, *, train=False):
    v, t = self.video(batch['video']), self.text(batch['text'])
    if self.scorer and self.is_initializing():
      self.score(v, t.reshape(-1, t.shape[-1])[: v.shape[0]])
    return {'video': v, 'text': t}


def _toy_nce(cfg):
  def loss_fn(out, batch):
    text = out['text'] if out['text'].ndim == 2 else out['text'][:, 0]
    loss = losses.nce(out['video'], text, batch.get('text_mask'), temperature=cfg.temperature)
    return loss, {'loss_nce': loss}

  return loss_fn


losses.register_loss('toy_nce', _toy_nce)


class _Toy(FlaxModel):
  losses = ('toy_nce',)

  def __init__(self, cfg: ml_collections.ConfigDict):
    module = BagOfPatches(
      cfg.width, cfg.video.patch_size, cfg.text.vocab_size, scorer=cfg.name == 'pair_scorer'
    )
    inputs = {
      'video': InputSpec(
        (cfg.video.num_frames, *frame_hw(cfg.video.frame_size), 3), 'float32', -1, 1
      ),
      'text': InputSpec((cfg.text.max_words,), 'int32', 0, cfg.text.vocab_size - 1, padding_id=0),
    }
    super().__init__(cfg, module, inputs)

  def _apply(self, method):
    return lambda variables, *x: self.module.apply(variables, *x, method=method)


class BagOfPatchesModel(_Toy):
  embeddings = {'video': ('joint',), 'text': ('joint',)}
  spaces = {('video', 'text'): 'joint'}

  def _embed(self, modality, levels):
    encode = self._apply(getattr(BagOfPatches, modality))
    return lambda variables, x: {'joint': encode(variables, x)}


class PairScorerModel(_Toy):
  def __init__(self, cfg):
    super().__init__(cfg)
    if cfg.get('with_space'):
      self.embeddings = {'video': ('joint',), 'text': ('joint',)}
      self.spaces = {('video', 'text'): 'joint'}
    self.score = PairScore(
      video=self._apply(BagOfPatches.video),
      text=self._apply(BagOfPatches.text),
      pairs=self._apply(BagOfPatches.score),
    )

  _embed = BagOfPatchesModel._embed


register_model('bag_of_patches', BagOfPatchesModel)
register_model('pair_scorer', PairScorerModel)


def model_config(name: str = 'bag_of_patches', **overrides) -> ml_collections.ConfigDict:
  """config.model of a toy model: 4 frames of 16², 4×4 patches, 8 words of a 64-word vocabulary."""
  cfg = dict(
    name=name,
    register_from='tests.toy_models',
    width=16,
    video=dict(num_frames=4, frame_size=16, patch_size=4),
    text=dict(vocab_size=64, max_words=8, num_narrations=1),
  )
  return ml_collections.ConfigDict({**cfg, **overrides})
