"""An in-memory synthetic source of video–audio–text batches that a model can learn from.

Each example belongs to one of `num_classes` concepts. The concept fixes a coarse spatio-temporal
colour pattern in the video, a two-tone chord in the audio and a word subset in the text; every example
adds its own noise, brightness, phase and word choice. Matching pairs therefore share structure a
contrastive model can find, and the loss falls as it does. Used by tests and by the training script
until the raw-media pipelines exist; it speaks the same interface (data_pipelines.Source).

EgoNCE fields, as the shard pipeline gives them (data_pipelines/pretrain.py): with data.num_nouns /
num_verbs > 0 each example carries noun / verb multi-hots: its concept's own noun and verb (fixed
per concept, distinct nouns while there are at least as many nouns as concepts), plus now and then
one random extra tag. With data.scene_negative_window > 0 it also carries a scene negative, another
example drawn from its own generator (seeded by the example's, independent of the batch):
neg_video, neg_text, neg_noun / neg_verb and neg_mask (1 for about 90 % of examples; 0 with zeros
in the other neg_ fields).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import ml_collections
import numpy as np

from data_pipelines.options import frame_hw

_SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 2}


class SyntheticSource:
  """Yields numpy batch dicts; position = number of batches yielded (checkpointable).

  Example i of global batch s is drawn from its own generator, seeded by (seed, split, s, i); a host
  yields its slice of the global batch, so the global batch is the same for any number of hosts.

  Batch: video [B, T, H, W, 3] f32 in [-1, 1], audio [B, S] f32 in [-1, 1], text [B, K, W] int32
  (0 = padding), video_mask / audio_mask / text_mask [B] f32, label [B] int32; noun [B, num_nouns]
  / verb [B, num_verbs] f32 and neg_video, neg_text, neg_noun, neg_verb, neg_mask [B] f32 when the
  config asks for them (module docstring).
  """

  def __init__(
    self,
    cfg: ml_collections.ConfigDict,
    split: str,
    *,
    batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if split not in _SPLIT_IDS:
      raise ValueError(f'split must be one of {sorted(_SPLIT_IDS)}, got {split!r}')
    self.cfg, self.concepts = cfg, cfg.synthetic
    num_classes = self.concepts.num_classes
    if cfg.vocab_size < 2 * num_classes + 2:
      raise ValueError(
        f'config data.vocab_size={cfg.vocab_size} is too small for {num_classes} classes '
        '(config data.synthetic.num_classes)'
      )
    self.local_batch_size = batch_size // process_count
    self._stream = (seed, _SPLIT_IDS[split])
    self._first = process_index * self.local_batch_size  # this host's first global example
    self._step = 0
    height, width = frame_hw(cfg.frame_size)
    self._frame_shape = (cfg.num_frames, height, width, 3)
    rng = np.random.default_rng([seed, 12345])  # the concepts: identical on every host and split
    coarse = (max(1, cfg.num_frames // 4), max(1, height // 8), max(1, width // 8), 3)
    self._video_templates = rng.uniform(-0.8, 0.8, (num_classes, *coarse))
    self._tones = rng.uniform(0.002, 0.05, (num_classes, 2))  # cycles per sample
    # Words 1 .. vocab-1: each class owns a disjoint slice; the rest are shared filler words.
    per_class = max(2, (cfg.vocab_size - 1) // (2 * num_classes))
    self._class_words = 1 + np.arange(num_classes * per_class).reshape(num_classes, -1)
    # After every draw above, so that the concepts' media do not depend on these options.
    self.num_nouns, self.num_verbs = int(cfg.get('num_nouns', 0)), int(cfg.get('num_verbs', 0))
    self.scene_negatives = float(cfg.get('scene_negative_window', 0.0)) > 0
    # Each concept's noun and verb: a random permutation, so concepts share one only when there
    # are fewer classes than concepts.
    self._concept_tags = [
      rng.permutation(max(size, num_classes))[:num_classes] % size if size else None
      for size in (self.num_nouns, self.num_verbs)
    ]

  def get_state(self) -> dict:
    return {'step': self._step}

  def set_state(self, state: dict) -> None:
    self._step = int(state['step'])

  def close(self) -> None:
    """Nothing to release: the source holds no reader."""

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    examples = []
    for i in range(self.local_batch_size):
      key = [*self._stream, self._step, self._first + i]
      example = self._example(np.random.default_rng(key))
      if self.scene_negatives:
        # Its own generator: the examples stay what they are without negatives.
        negative = np.random.default_rng([*key, 1])
        has_negative = negative.random() >= 0.1
        other = self._example(negative)
        for name in ('video', 'text', 'noun', 'verb'):
          if name in other:
            example['neg_' + name] = other[name] * np.asarray(has_negative, other[name].dtype)
        example['neg_mask'] = np.float32(has_negative)
      examples.append(example)
    self._step += 1
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  def _upsample(self, coarse: np.ndarray) -> np.ndarray:
    out = coarse
    for axis, size in enumerate(self._frame_shape[:3]):
      out = np.repeat(out, math.ceil(size / out.shape[axis]), axis=axis)
    t, h, w = self._frame_shape[:3]
    return out[:t, :h, :w]

  def _example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    cfg, concepts = self.cfg, self.concepts
    label = int(rng.integers(0, concepts.num_classes))
    video = self._upsample(self._video_templates[label]) + rng.uniform(-0.2, 0.2)  # brightness
    video = video + concepts.noise * rng.standard_normal(video.shape)

    t = np.arange(cfg.num_samples)
    phase = rng.uniform(0, 2 * np.pi, (2, 1))
    tones = np.sin(2 * np.pi * self._tones[label][:, None] * t + phase).mean(axis=0)
    audio = 0.8 * tones + concepts.noise * rng.standard_normal(cfg.num_samples)

    text = np.zeros((cfg.num_narrations, cfg.max_words), np.int32)
    for k in range(cfg.num_narrations):
      # Its own caption names its concept; each neighbour does so only half the time.
      concept = label if (k == 0 or rng.random() < 0.5) else rng.integers(concepts.num_classes)
      length = rng.integers(max(1, cfg.max_words // 2), cfg.max_words + 1)
      words = rng.choice(self._class_words[concept], length)
      filler = rng.random(length) < 0.3
      words[filler] = rng.integers(1, cfg.vocab_size, filler.sum())
      text[k, :length] = words

    has_audio = rng.random() >= concepts.missing_audio_rate
    has_text = rng.random() >= concepts.missing_text_rate
    # Missing media arrive as zeros, flagged by the mask.
    out = {
      'video': np.clip(video, -1.0, 1.0).astype(np.float32),
      'audio': (np.clip(audio, -1.0, 1.0) * has_audio).astype(np.float32),
      'text': text * has_text,
      'video_mask': np.float32(1.0),
      'audio_mask': np.float32(has_audio),
      'text_mask': np.float32(has_text),
      'label': np.int32(label),
    }
    # Drawn last: the fields above are the same with or without tags.
    for name, size, own in zip(
      ('noun', 'verb'), (self.num_nouns, self.num_verbs), self._concept_tags, strict=True
    ):
      if size:
        hot = np.zeros(size, np.float32)
        hot[own[label]] = 1.0
        if rng.random() < 0.3:  # an extra tag now and then, as real captions name more things
          hot[rng.integers(size)] = 1.0
        out[name] = hot
    return out
