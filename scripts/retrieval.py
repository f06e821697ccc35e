r"""Zero-shot text→video and video→text retrieval (VATT §4.2: YouCook2, MSR-VTT).

  python scripts/retrieval.py --workdir=RUN --data_path=SHARDS --split=youcook2_val
  python scripts/retrieval.py --workdir=RUN --data_path=SHARDS --split=test --random_init

The split is record shards made by scripts/prepare_data.py from a retrieval manifest: YouCook2
style (one row per segment: media, start, end, its caption) or MSR-VTT style (one row per clip with
all its captions); see docs/EVALUATION.md. Video embeddings average --num_clips uniformly spaced
clips in the video–text space; captions are the queries (duplicates merged, see
vatt_jax/evaluation/retrieval.py). A model that scores (video, text) pairs jointly ranks by its pair
score (--score, --rerank_top_k). Prints R@1/5/10, median and mean rank both ways, writes JSON.
"""

from __future__ import annotations

import json
import os

import ml_collections
from absl import app, flags, logging

from vatt_jax import cli, provenance
from vatt_jax import workdir as workdir_lib
from vatt_jax.evaluation.retrieval import RetrievalEvaluator

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (config.json + checkpoints).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_RANDOM = flags.DEFINE_bool('random_init', False, 'Evaluate the same model, randomly initialised.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random initialisation.')
_DATA_PATH = flags.DEFINE_string('data_path', None, 'Record shards {path}/{split}/*.tfrecord.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, "Default: the run's, else DATA_PATH's.")
_SPLIT = flags.DEFINE_string('split', 'test', 'The gallery split.')
_CLIPS = flags.DEFINE_integer('num_clips', 4, 'Clips per video, embeddings averaged.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Records per embedding batch.')
_SCORE = flags.DEFINE_enum(
  'score', 'auto', ['auto', 'cosine', 'pairs'], "Cosine of embeddings or the model's pair score."
)
_TOP_K = flags.DEFINE_integer(
  'rerank_top_k', 16, "Pair scoring: re-rank each query's top k by cosine (0: every pair)."
)
_OUTPUT = flags.DEFINE_string('output', None, 'JSON results (default WORKDIR/retrieval.json).')
flags.mark_flags_as_required(['workdir', 'data_path'])


def format_table(results: dict) -> str:
  lines = ['            R@1     R@5    R@10    MedR   MeanR  queries']
  for direction, r in results.items():
    lines.append(
      f'  {direction}  {r["R1"]:6.2f}  {r["R5"]:6.2f}  {r["R10"]:6.2f}  {r["MedR"]:6.1f}  '
      f'{r["MeanR"]:6.1f}  {r["queries"]:7d}'
    )
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  workdir = _WORKDIR.value
  config, model, variables, what = workdir_lib.load(
    workdir, step=_STEP.value, random_init=_RANDOM.value, seed=_SEED.value
  )
  data = dict(name='shards', path=_DATA_PATH.value)
  if _TOKENIZER.value:
    data['tokenizer'] = _TOKENIZER.value
  elif not config.data.get('tokenizer') or not os.path.exists(config.data.tokenizer):
    data['tokenizer'] = ''  # the shards' own tokenizer.model
  eval_cfg = ml_collections.ConfigDict(
    dict(type='retrieval', split=_SPLIT.value, num_clips=_CLIPS.value, batch_size=_BATCH.value,
         score=_SCORE.value, rerank_top_k=_TOP_K.value, data=data)
  )  # fmt: skip
  evaluator = RetrievalEvaluator(eval_cfg, config, model)
  provenance.check_reads(workdir, evaluator.data, [_SPLIT.value])
  evaluator.run(variables)
  results = evaluator.last['results']
  videos = len(evaluator.last['embeddings']['media_id'])
  print(f'\nzero-shot retrieval · {what}\n  {_DATA_PATH.value}/{_SPLIT.value}: {videos} videos, '
        f'{_CLIPS.value} clips each; {evaluator.last["scoring"]}')  # fmt: skip
  print(format_table(results))
  output = _OUTPUT.value or os.path.join(workdir, 'retrieval.json')
  with open(output, 'w') as f:
    json.dump({'model': what, **eval_cfg.to_dict(), 'videos': videos, **results}, f, indent=2)
  print(f'  → {output}')


if __name__ == '__main__':
  cli.run(main)
