r"""EgoNCE vs. InfoNCE: svitt_ego_demo pretrained both ways, scored on EgoMCQ-format questions.

  python scripts/experiments/egonce.py --workdir=demo/experiments/egonce

1. Demo videos of 5–8 segments (so that intra-video questions have 5 segments of one video), with
   the demo taxonomy (nouns: digits; verbs: directions) tagging every caption, and EgoMCQ-format
   questions on the held-out test videos (make_demo_data.py --egomcq_splits=test): inter-video
   (the 5 choices from 5 videos) and intra-video (5 segments of one video).
2. For every seed, the same config, batches and step budget: InfoNCE (svitt_ego_demo:infonce, no
   scene negatives: B samples a step), InfoNCE with scene negatives and EgoNCE with scene
   negatives (svitt_ego_demo; both 2B samples a step); all with VTM and MLM.
3. EgoMCQ accuracy (dual-encoder cosine, and VTM re-scoring) of every run, of a random init with
   the same seeds, against chance (20 %).

Every stage resumes (finished data and runs are kept). Writes WORKDIR/results.json and
WORKDIR/results.md (the README's table).
"""

from __future__ import annotations

import json
import os

import jax
from absl import flags
from runs import cell as _cell
from runs import run as _run  # scripts/experiments/runs.py

from configs import svitt_ego_demo
from data_pipelines.options import TOKENIZER_FILENAME
from vatt_jax import cli
from vatt_jax.evaluation.multiple_choice import MultipleChoiceEvaluator
from vatt_jax.models import build_model
from vatt_jax.plots import read_metrics

_WORKDIR = flags.DEFINE_string('workdir', 'demo/experiments/egonce', 'Output directory.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'Training seeds (the table: mean and range).')
_STEPS = flags.DEFINE_integer('steps', 0, 'Training steps (0: the config default).')
_NUM_TRAIN = flags.DEFINE_integer('num_train', 96, 'Training videos (5–8 segments each).')
_NUM_TEST = flags.DEFINE_integer('num_test', 24, 'Held-out test videos (the questions).')
_METHODS = flags.DEFINE_list(
  'methods', ['infonce', 'infonce_scene', 'egonce'], 'Contrastive losses to compare.'
)

ARGS = {'infonce': 'infonce', 'infonce_scene': 'infonce', 'egonce': ''}
# Overrides per method: InfoNCE with EgoNCE's scene negatives (the same 2B samples per step) tells
# the loss's tag positives apart from the appended clips.
OVERRIDES = {'infonce_scene': ['--config.data.scene_negative_window=60']}
LABELS = {
  'infonce': 'InfoNCE',
  'infonce_scene': 'InfoNCE + scene negatives',
  'egonce': 'EgoNCE + scene negatives',
  'random': 'random init (no training)',
}
PREPARE = ['--short_side=64', '--sample_rate=8000', '--num_shards=4']
METRICS = ('inter_accuracy', 'intra_accuracy', 'inter_accuracy_score', 'intra_accuracy_score')


def make_data(workdir: str) -> tuple[str, str]:
  """(shards dir with train/test and the tokenizer, the EgoMCQ questions file)."""
  media, shards = os.path.join(workdir, 'data', 'media'), os.path.join(workdir, 'data', 'shards')
  if not os.path.exists(os.path.join(media, 'dataset_info.json')):
    _run(['scripts/make_demo_data.py', f'--output_dir={media}', '--segments=5,8',
          f'--num_train={_NUM_TRAIN.value}', '--num_val=0', f'--num_test={_NUM_TEST.value}',
          '--egomcq_splits=test'])  # fmt: skip
  taxonomy = os.path.join(media, 'taxonomy.json')
  for split in ('train', 'test'):
    out = os.path.join(shards, split)
    if not os.path.isdir(out) or not os.listdir(out):
      _run(['scripts/prepare_data.py', f'--manifest={os.path.join(media, split + ".jsonl")}',
            f'--output_dir={out}', f'--taxonomy={taxonomy}', *PREPARE])  # fmt: skip
  if not os.path.exists(os.path.join(shards, TOKENIZER_FILENAME)):
    _run(['scripts/train_tokenizer.py', f'--input_dir={os.path.join(shards, "train")}',
          f'--output={os.path.join(shards, "tokenizer")}', '--vocab_size=1024'])  # fmt: skip
  return shards, os.path.join(media, 'egomcq_test.json')


def _eval_overrides(questions: str) -> list[str]:
  return [f'--config.evals.egomcq.questions={questions}', '--config.evals.egomcq.use_score=True']


def _final(run: str) -> dict | None:
  path = os.path.join(run, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  records = [r for r in read_metrics(path) if 'egomcq/intra_accuracy' in r]
  return records[-1] if records else None


def train(workdir: str, shards: str, questions: str, method: str, seed: int) -> dict:
  run = os.path.join(workdir, 'runs', f'{method}_seed{seed}')
  if _final(run) is None:
    args = [f'--config=configs/svitt_ego_demo.py:{ARGS[method]}', f'--workdir={run}',
            f'--config.data.path={shards}', f'--config.seed={seed}',
            *_eval_overrides(questions), *OVERRIDES.get(method, [])]  # fmt: skip
    if _STEPS.value:
      args += [f'--config.total_steps={_STEPS.value}', '--config.evals.egomcq.log_steps=0']
    _run(['scripts/train.py', *args])
  record = _final(run)
  return {k: record[f'egomcq/{k}'] for k in METRICS if f'egomcq/{k}' in record}


def random_init(workdir: str, shards: str, questions: str, seed: int) -> dict:
  path = os.path.join(workdir, f'random_init_seed{seed}.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config = svitt_ego_demo.get_config()
  config.data.path = shards
  config.evals.egomcq.questions = questions
  config.evals.egomcq.use_score = True
  model = build_model(config.model)
  batch = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), model.example_batch(1))
  variables = jax.jit(model.init)(jax.random.key(seed), batch)
  result = MultipleChoiceEvaluator(config.evals.egomcq, config, model).run(variables)
  result = {k: float(result[k]) for k in METRICS if k in result}
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  return result


def table(results: dict, counts: dict) -> str:
  lines = [
    f'| dual-encoder loss | EgoMCQ inter-video acc. % ({counts.get("inter", "?")} questions) | '
    f'intra-video acc. % ({counts.get("intra", "?")}) | inter, VTM-scored | intra, VTM-scored |',
    '|---|---|---|---|---|',
    '| chance | 20.0 | 20.0 | 20.0 | 20.0 |',
  ]
  for method, runs in results.items():
    cells = [_cell([r[k] for r in runs]) if all(k in r for r in runs) else '–' for k in METRICS]
    lines.append(f'| {LABELS[method]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  shards, questions = make_data(workdir)
  seeds = [int(s) for s in _SEEDS.value]
  results = {'random': [random_init(workdir, shards, questions, s) for s in seeds]}
  for method in _METHODS.value:
    results[method] = [train(workdir, shards, questions, method, s) for s in seeds]
  with open(questions) as f:
    types = [q.get('types') for q in json.load(f).values()]
  counts = {'inter': sum(str(t) == '1' for t in types), 'intra': sum(str(t) == '2' for t in types)}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump({'counts': counts, 'results': results}, f, indent=1)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(table(results, counts))
  print(table(results, counts))


if __name__ == '__main__':
  cli.run(main)
