r"""Linear probe of a pretrained model's frozen features (VATT §4.3: UCF101, HMDB51, ESC50).

  python scripts/linear_probe.py --workdir=RUN --data_path=SHARDS --train_split=train \
      --test_split=test --modality=video [--feature=agg|va|vt] [--classifier=low_rank|svm]
  python scripts/linear_probe.py --workdir=RUN --tfds_name=ucf101/ucf101_1 --stored_fps=25 \
      --train_split=train --test_split=test --modality=video
  python scripts/linear_probe.py --workdir=RUN ... --random_init   # the untrained baseline

Features (the AGG output by default; --feature=va/vt for VATT's common space, or any pooled level
the run's model has) are extracted in
evaluation mode (--num_clips uniformly spaced clips per record, central crops, averaged) and
cached under --cache_dir (default RUN/features), keyed by checkpoint and data settings. The
classifier is VATT's low-rank one (n = 128 components, 10 % sampled per step, Adam 5e-4, batch
64) or a linear SVM. Prints a table and writes the results as JSON (--output).
"""

from __future__ import annotations

import json
import os

import ml_collections
from absl import app, flags, logging

from vatt_jax import cli, provenance
from vatt_jax import workdir as workdir_lib
from vatt_jax.evaluation.linear_probe import LinearProbeEvaluator

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (config.json + checkpoints).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_RANDOM = flags.DEFINE_bool('random_init', False, 'Probe the same model, randomly initialised.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random initialisation and the classifier.')
_DATA_PATH = flags.DEFINE_string('data_path', None, 'Record shards {path}/{split}/*.tfrecord.')
_TFDS = flags.DEFINE_string('tfds_name', None, 'A TFDS dataset instead of shards (ucf101, …).')
_TFDS_DIR = flags.DEFINE_string('tfds_data_dir', None, 'TFDS data_dir.')
_STORED_FPS = flags.DEFINE_float('stored_fps', 25.0, 'TFDS videos: the frame rate they store.')
_TRAIN = flags.DEFINE_string('train_split', 'train', 'Split the classifier is trained on.')
_TEST = flags.DEFINE_string('test_split', 'test', 'Split it is evaluated on.')
_MODALITY = flags.DEFINE_enum('modality', 'video', ['video', 'audio'], 'Which tower to probe.')
_FEATURE = flags.DEFINE_string(
  'feature',
  None,
  "The model's embedding level (VATT: agg, va, vt, input; default agg or its first).",
)
_CLASSIFIER = flags.DEFINE_enum('classifier', 'low_rank', ['low_rank', 'svm'], 'Classifier.')
_STEPS = flags.DEFINE_integer('steps', 2000, 'Low-rank classifier training steps.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 0, '0: the largest label + 1.')
_CLIPS = flags.DEFINE_integer('num_clips', 4, 'Clips per record, features averaged.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Records per embedding batch.')
_CACHE = flags.DEFINE_string('cache_dir', None, 'Feature cache (default WORKDIR/features).')
_OUTPUT = flags.DEFINE_string('output', None, 'JSON results (default WORKDIR/linear_probe.json).')
flags.mark_flags_as_required(['workdir'])


def eval_config(flag_values) -> dict:
  """The config.evals entry these flags describe."""
  if bool(_DATA_PATH.value) == bool(_TFDS.value):
    raise app.UsageError('give exactly one of --data_path (shards) and --tfds_name')
  if _DATA_PATH.value:
    data = dict(name='shards', path=_DATA_PATH.value)
  else:
    data = dict(
        name='tfds', tfds_name=_TFDS.value, tfds_data_dir=_TFDS_DIR.value or '',
        stored_fps=_STORED_FPS.value, modality=_MODALITY.value, label_key='label',
        video_key='video', audio_key='audio',
    )  # fmt: skip
  return dict(
      type='linear_probe', modality=_MODALITY.value, feature=_FEATURE.value or '',
      train_split=_TRAIN.value, test_split=_TEST.value, num_classes=_NUM_CLASSES.value,
      classifier=_CLASSIFIER.value, steps=_STEPS.value, num_clips=_CLIPS.value,
      batch_size=_BATCH.value, seed=_SEED.value, data=data,
  )  # fmt: skip


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  eval_cfg = ml_collections.ConfigDict(eval_config(flags.FLAGS))
  workdir = _WORKDIR.value
  config, model, variables, what = workdir_lib.load(
    workdir, step=_STEP.value, random_init=_RANDOM.value, seed=_SEED.value
  )
  evaluator = LinearProbeEvaluator(
    eval_cfg, config, model,
    cache_dir=_CACHE.value or os.path.join(workdir, 'features'), cache_key=what,
  )  # fmt: skip
  provenance.check_reads(workdir, evaluator.data, [_TRAIN.value, _TEST.value])
  result = evaluator.run(variables)
  (x_train, _), (x_test, _) = evaluator.last['train'], evaluator.last['test']
  record = {
    'model': what,
    **eval_cfg.to_dict(),
    'num_classes': evaluator.last['num_classes'],
    'train_examples': len(x_train),
    'test_examples': len(x_test),
    'feature_dim': x_train.shape[1],
    'chance_top1': 100.0 / evaluator.last['num_classes'],
    **result,
  }
  print(f'\nlinear probe · {what}')
  print(f'  {_MODALITY.value} {evaluator.feature} features [{x_train.shape[1]}], '
        f'{_CLASSIFIER.value} on {len(x_train)} train / {len(x_test)} test records, '
        f'{record["num_classes"]} classes')  # fmt: skip
  print(f'  top-1 {result["top1"]:6.2f} %   top-5 {result["top5"]:6.2f} %   '
        f'(chance top-1 {record["chance_top1"]:.2f} %)')  # fmt: skip
  output = _OUTPUT.value or os.path.join(workdir, 'linear_probe.json')
  with open(output, 'w') as f:
    json.dump(record, f, indent=2)
  print(f'  → {output}')


if __name__ == '__main__':
  cli.run(main)
