"""The shard record format: one `tf.train.SequenceExample` per media file.

Context (per file):
  clip/media_id        bytes    a stable id: the manifest's media path, exactly as written there
  clip/duration        float    seconds
  image/frame_rate     float    frames per second as stored (after resampling on ingest)
  image/height, image/width  int64  stored frame size (0 when there are no frames)
  audio/sample_rate    int64    Hz; 0 when the file has no audio
  clip/label/index     int64[]  zero or more class labels
  flags/has_video, flags/has_audio, flags/has_captions  int64 0/1
  schema/version       int64    SCHEMA_VERSION (absent in the first format, read as 1)
Feature lists (per time step):
  image/encoded        bytes, one JPEG per frame
  audio/waveform       bytes, a single step: every mono sample as 16-bit PCM (little-endian int16,
                       value = sample · 32767); no steps without audio. Readers decode only the
                       span they need.
  caption/string       bytes, one UTF-8 caption per step
  caption/start, caption/end  float, one value per caption step (seconds)
  caption/noun, caption/verb  int64, one list per caption step (zero or more class indices >= 0 of
                       a noun / verb taxonomy, data_pipelines/taxonomy.py); optional: written
                       only when some caption has tags, and a record without them has none

A file without audio or captions is a valid record: its flags say so and the pipelines mask what is
missing. docs/DATA.md documents the same thing for people.

Why the noun and verb tags did not change SCHEMA_VERSION: they are two optional feature lists and
nothing else moved. Every version-2 record written before them parses as "no tags" (`parse` treats
a missing list as an empty tag set for every caption), and code from before them ignores lists it
does not ask for, so old shards and new ones are both version 2 and mix freely. Bumping the version
would only have made the pipeline refuse every existing shard (it reads one version).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

MEDIA_ID = 'clip/media_id'
DURATION = 'clip/duration'
FRAME_RATE = 'image/frame_rate'
HEIGHT = 'image/height'
WIDTH = 'image/width'
SAMPLE_RATE = 'audio/sample_rate'
LABELS = 'clip/label/index'
HAS_VIDEO = 'flags/has_video'
HAS_AUDIO = 'flags/has_audio'
HAS_CAPTIONS = 'flags/has_captions'
FRAMES = 'image/encoded'
WAVEFORM = 'audio/waveform'
CAPTION = 'caption/string'
CAPTION_START = 'caption/start'
CAPTION_END = 'caption/end'
CAPTION_NOUN = 'caption/noun'
CAPTION_VERB = 'caption/verb'
VERSION = 'schema/version'

# 2: the waveform as 16-bit PCM bytes instead of a float list: half the bytes, and a clip's span is
# decoded without parsing the rest (records read 4.5× faster).
SCHEMA_VERSION = 2
PCM_SCALE = 32767.0


@dataclasses.dataclass
class Caption:
  """A caption over [start, end] seconds; nouns / verbs: its class indices (>= 0, may be empty)."""

  start: float
  end: float
  text: str
  nouns: tuple[int, ...] = ()
  verbs: tuple[int, ...] = ()


@dataclasses.dataclass
class Record:
  """One media file, decoded. frames: JPEG bytes per frame; waveform: [S] float32 mono or None."""

  media_id: str
  duration: float
  frame_rate: float = 0.0
  frames: Sequence[bytes] = ()
  height: int = 0
  width: int = 0
  waveform: np.ndarray | None = None
  sample_rate: int = 0
  captions: Sequence[Caption] = ()
  labels: Sequence[int] = ()


def pcm16(waveform: np.ndarray) -> bytes:
  """Samples in [-1, 1] (clipped) → little-endian int16 bytes (round to nearest)."""
  samples = np.clip(np.asarray(waveform, np.float64), -1.0, 1.0) * PCM_SCALE
  return np.round(samples).astype('<i2').tobytes()


def encode(record: Record) -> bytes:
  """Serialises a Record to SequenceExample bytes (TensorFlow imported lazily)."""
  import tensorflow as tf

  def ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))

  def floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))

  def raw(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))

  has_audio = record.waveform is not None and len(record.waveform) > 0
  tagged = False
  for j, caption in enumerate(record.captions):
    for kind, tags in (('noun', caption.nouns), ('verb', caption.verbs)):
      if any(int(t) < 0 for t in tags):
        raise ValueError(
          f'{record.media_id}: caption {j} has a negative {kind} class index in {list(tags)}'
        )
      tagged = tagged or len(tags) > 0
  context = {
    MEDIA_ID: raw([record.media_id.encode()]),
    DURATION: floats([record.duration]),
    FRAME_RATE: floats([record.frame_rate]),
    HEIGHT: ints([record.height]),
    WIDTH: ints([record.width]),
    SAMPLE_RATE: ints([record.sample_rate if has_audio else 0]),
    LABELS: ints(record.labels),
    HAS_VIDEO: ints([int(len(record.frames) > 0)]),
    HAS_AUDIO: ints([int(has_audio)]),
    HAS_CAPTIONS: ints([int(len(record.captions) > 0)]),
    VERSION: ints([SCHEMA_VERSION]),
  }
  lists = {
    FRAMES: [raw([f]) for f in record.frames],
    WAVEFORM: [raw([pcm16(record.waveform)])] if has_audio else [],
    CAPTION: [raw([c.text.encode()]) for c in record.captions],
    CAPTION_START: [floats([c.start]) for c in record.captions],
    CAPTION_END: [floats([c.end]) for c in record.captions],
  }
  if tagged:  # untagged records keep the bytes they had before tags existed
    lists[CAPTION_NOUN] = [ints(c.nouns) for c in record.captions]
    lists[CAPTION_VERB] = [ints(c.verbs) for c in record.captions]
  example = tf.train.SequenceExample(
    context=tf.train.Features(feature=context),
    feature_lists=tf.train.FeatureLists(
      feature_list={k: tf.train.FeatureList(feature=v) for k, v in lists.items()}
    ),
  )
  return example.SerializeToString(deterministic=True)  # same record → same bytes (checksums)


def pcm16_to_float(data):
  """[k] strings of little-endian int16 → [total samples] float32 in [-1, 1]."""
  import tensorflow as tf

  samples = tf.io.decode_raw(data, tf.int16, little_endian=True)
  return tf.reshape(tf.cast(samples, tf.float32) / PCM_SCALE, [-1])


def parse(serialized):
  """Parses SequenceExample bytes (a scalar tf.string) into a dict of tensors.

  Returns: media_id (), duration (), frame_rate (), height (), width (), sample_rate () int64,
  labels [n] int64, has_video/has_audio/has_captions () int64, frames [F] string (JPEG),
  waveform [S] float32 in [-1, 1] (empty if none), waveform_bytes [0 or 1] string (the samples as
  stored, 16-bit PCM: `audio.cut_waveform_bytes` decodes only a clip's span), captions [C] string,
  caption_start/caption_end [C] float32, caption_noun/caption_verb [C, L] int64 (caption c's class
  indices in row c, padded with −1 to the record's longest list L; [C, 0] for a record without
  tags), version () int64. A record whose tag lists do not have one step per caption fails to
  parse (InvalidArgumentError).
  """
  import tensorflow as tf

  context_spec = {
    MEDIA_ID: tf.io.FixedLenFeature([], tf.string),
    DURATION: tf.io.FixedLenFeature([], tf.float32),
    FRAME_RATE: tf.io.FixedLenFeature([], tf.float32),
    HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    WIDTH: tf.io.FixedLenFeature([], tf.int64),
    SAMPLE_RATE: tf.io.FixedLenFeature([], tf.int64),
    LABELS: tf.io.VarLenFeature(tf.int64),
    HAS_VIDEO: tf.io.FixedLenFeature([], tf.int64),
    HAS_AUDIO: tf.io.FixedLenFeature([], tf.int64),
    HAS_CAPTIONS: tf.io.FixedLenFeature([], tf.int64),
    VERSION: tf.io.FixedLenFeature([], tf.int64, default_value=1),
  }
  sequence_spec = {
    FRAMES: tf.io.FixedLenSequenceFeature([], tf.string, allow_missing=True),
    WAVEFORM: tf.io.FixedLenSequenceFeature([], tf.string, allow_missing=True),
    CAPTION: tf.io.FixedLenSequenceFeature([], tf.string, allow_missing=True),
    CAPTION_START: tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True),
    CAPTION_END: tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True),
    CAPTION_NOUN: tf.io.VarLenFeature(tf.int64),
    CAPTION_VERB: tf.io.VarLenFeature(tf.int64),
  }
  context, sequence = tf.io.parse_single_sequence_example(
    serialized, context_features=context_spec, sequence_features=sequence_spec
  )
  num_captions = tf.shape(sequence[CAPTION], out_type=tf.int64)[0]
  return {
    'media_id': context[MEDIA_ID],
    'duration': context[DURATION],
    'frame_rate': context[FRAME_RATE],
    'height': context[HEIGHT],
    'width': context[WIDTH],
    'sample_rate': context[SAMPLE_RATE],
    'labels': tf.sparse.to_dense(context[LABELS]),
    'has_video': context[HAS_VIDEO],
    'has_audio': context[HAS_AUDIO],
    'has_captions': context[HAS_CAPTIONS],
    'frames': sequence[FRAMES],
    'waveform': pcm16_to_float(sequence[WAVEFORM]),
    'waveform_bytes': sequence[WAVEFORM],
    'captions': sequence[CAPTION],
    'caption_start': sequence[CAPTION_START],
    'caption_end': sequence[CAPTION_END],
    'caption_noun': _caption_tags(sequence[CAPTION_NOUN], num_captions, CAPTION_NOUN),
    'caption_verb': _caption_tags(sequence[CAPTION_VERB], num_captions, CAPTION_VERB),
    'version': context[VERSION],
  }


def _caption_tags(tags, num_captions, key: str):
  """A parsed tag list (SparseTensor [steps, L]) → [C, L] int64 padded with −1; [C, 0] when the
  record has no such list (written before tags existed, or without any)."""
  import tensorflow as tf

  dense = tf.sparse.to_dense(tags, default_value=-1)
  steps = tf.shape(dense, out_type=tf.int64)[0]
  check = tf.debugging.assert_equal(
    tf.logical_or(tf.equal(steps, 0), tf.equal(steps, num_captions)),
    True,
    message=f'{key} does not have one step per caption/string step',
  )
  with tf.control_dependencies([check]):
    return tf.cond(
      tf.equal(steps, 0),
      lambda: tf.zeros(tf.stack([num_captions, 0]), tf.int64),
      lambda: tf.identity(dense),
    )


def record_version(serialized: bytes) -> tuple[int, str] | None:
  """(format version, media id) of a vatt-jax record of any format version, None for bytes that are
  not one. Reads the protocol buffer itself: an older record may not parse as the current format
  (version 1 stored the waveform as floats). Records without schema/version are version 1."""
  import tensorflow as tf

  try:
    example = tf.train.SequenceExample.FromString(serialized)
  except Exception:  # google.protobuf.message.DecodeError: not a SequenceExample
    return None
  context = example.context.feature
  if MEDIA_ID not in context or not context[MEDIA_ID].bytes_list.value:
    return None
  versions = context[VERSION].int64_list.value if VERSION in context else [1]
  media_id = context[MEDIA_ID].bytes_list.value[0].decode('utf-8', 'replace')
  return int(versions[0]) if versions else 1, media_id
