r"""Trains a sentencepiece tokenizer on the captions of a shard set.

  python scripts/train_tokenizer.py --input_dir=demo/shards/train \
      --output=demo/shards/tokenizer --vocab_size=65536

Writes OUTPUT.model and OUTPUT.vocab; id 0 is padding (what the models mask), 1 is unknown.
Configs name the .model file in data.tokenizer. A corpus too small for vocab_size gets the largest
vocabulary it supports (with a warning). An existing OUTPUT.model or OUTPUT.vocab is refused unless
--overwrite (runs trained since the workdir record keep their own copy, WORKDIR/tokenizer.model, so
replacing the file does not change their results); the files are replaced only once complete.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

from absl import app, flags, logging

from data_pipelines import schema
from vatt_jax import cli

_INPUT = flags.DEFINE_string('input_dir', None, 'Folder of *.tfrecord shards.')
_OUTPUT = flags.DEFINE_string('output', None, 'Model prefix: writes OUTPUT.model and OUTPUT.vocab.')
_VOCAB = flags.DEFINE_integer('vocab_size', 2**16, 'Vocabulary size (an upper bound).')
_TYPE = flags.DEFINE_enum(
  'model_type', 'unigram', ['unigram', 'bpe', 'word', 'char'], 'Model type.'
)
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing OUTPUT.model / .vocab.')
flags.mark_flags_as_required(['input_dir', 'output'])


def _captions(files):
  import tensorflow as tf

  tf.config.set_visible_devices([], 'GPU')
  for path in files:
    for serialized in tf.data.TFRecordDataset(path):
      for caption in schema.parse(serialized)['captions'].numpy():
        yield caption.decode('utf-8', 'replace')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from data_pipelines import text

  files = sorted(glob.glob(os.path.join(_INPUT.value, '*.tfrecord')))
  if not files:
    raise app.UsageError(f'no *.tfrecord under --input_dir={_INPUT.value}')
  prefix = os.path.abspath(_OUTPUT.value)
  targets = [prefix + '.model', prefix + '.vocab']
  existing = [p for p in targets if os.path.exists(p)]
  if existing and not _OVERWRITE.value:
    raise cli.UserError(
      f'{existing[0]} exists (a run may read it): pass --overwrite to replace it, or pick another '
      '--output'
    )
  directory = os.path.dirname(prefix)
  os.makedirs(directory, exist_ok=True)
  staging = tempfile.mkdtemp(prefix='.tokenizer-', dir=directory)
  try:
    staged = text.train_tokenizer(
      _captions(files), os.path.join(staging, 'tokenizer'), _VOCAB.value, model_type=_TYPE.value
    )
    for suffix, target in zip(('.model', '.vocab'), targets, strict=True):
      os.replace(staged[: -len('.model')] + suffix, target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  path = targets[0]
  tokenizer = text.Tokenizer(path)
  logging.info('wrote %s: %d pieces from %d shards', path, tokenizer.vocab_size, len(files))
  print(path)


if __name__ == '__main__':
  cli.run(main)
