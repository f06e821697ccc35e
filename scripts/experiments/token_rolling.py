r"""Temporal token rolling vs. no rolling vs. flatten: allinone_demo trained three ways.

  python scripts/experiments/token_rolling.py --workdir=demo/experiments/token_rolling \
      [--seeds=0,1] [--steps=N] [--num_train=192] [--num_test=48]

1. Data: the demo videos with caption multiple-choice questions on the held-out test videos
   (make_demo_data.py --mc_splits=test: one direction question, 4 captions differing only in the
   direction, and one appearance question, 5 differing only in the digit, per test segment); one
   record per captioned segment (prepare_data.py on retrieval_{train,test}.jsonl →
   shards/segments_{train,test}); a 1024-piece tokenizer on the training captions.
2. For every seed, the same config, batches and step budget: allinone_demo with temporal token
   rolling ('roll', All-in-one), without ('none', the paper's time-average baseline: the same
   per-frame sequences) and with one flattened sequence of the text and every frame ('flatten').
3. A random init with the same seeds (the roll model, untrained), through the same evaluators.
4. results.json and results.md: direction and appearance multiple-choice accuracy by the VTM head
   (`mc_*/accuracy_score`) and by the unimodal cosine (`mc_*/accuracy`), text→video and
   video→text R@5 (unimodal cosine, and re-ranked by the VTM head), the linear probe's top-1 on
   the segments' digits, all at the last step; the training throughput (the trainer's
   clips_per_second, the median over the log windows without an evaluation in them, and the step
   time it implies) and the joint pass's GFLOPs per video–text pair
   (vatt_jax.models.summary.summarize_allinone at the demo shapes). Mean and range over seeds,
   and a paragraph of the numbers (the reading is for a person to write).

Every stage resumes: the data steps are rerun (each keeps what it finished), a finished run (its
metrics.jsonl has the last step's evaluations) is kept, an unfinished one resumes through
train.py's own resume, a random init's results are kept in random_init_seed{s}.json.
"""

from __future__ import annotations

import json
import os
import statistics

from absl import flags
from runs import cell as _cell
from runs import run as _run  # scripts/experiments/runs.py

from configs import allinone_demo
from data_pipelines.options import TOKENIZER_FILENAME
from vatt_jax import cli
from vatt_jax import workdir as workdir_lib
from vatt_jax.evaluation import build_evaluator
from vatt_jax.evaluation.retrieval import chance_recall
from vatt_jax.models.summary import summarize_allinone
from vatt_jax.plots import read_metrics

_WORKDIR = flags.DEFINE_string('workdir', 'demo/experiments/token_rolling', 'Output directory.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'Training seeds (the table: mean and range).')
_STEPS = flags.DEFINE_integer('steps', 0, 'Training steps (0: the config default).')
_NUM_TRAIN = flags.DEFINE_integer('num_train', 192, 'Training videos (3–4 segments each).')
_NUM_TEST = flags.DEFINE_integer('num_test', 48, 'Held-out test videos (the questions).')
_METHODS = flags.DEFINE_list(
  'methods', ['roll', 'none', 'flatten'], 'Temporal modelling (config model.temporal) to compare.'
)

CONFIG = 'configs/allinone_demo.py'
ARGS = {'roll': '', 'none': ':none', 'flatten': ':flatten'}
LABELS = {
  'roll': 'token rolling (All-in-one)',
  'none': 'no rolling (time average)',
  'flatten': 'flatten (one joint sequence)',
  'random': 'random init (no training)',
}
PREPARE = ['--short_side=64', '--sample_rate=8000', '--num_shards=2']  # the Makefile's demo-shards
QUESTIONS = {'mc_direction': 'direction', 'mc_appearance': 'appearance'}
# Table column → the metrics.jsonl key of the run's evaluation (config evals of allinone_demo).
METRICS = {
  'direction_vtm': 'mc_direction/accuracy_score',
  'direction_cosine': 'mc_direction/accuracy',
  'appearance_vtm': 'mc_appearance/accuracy_score',
  'appearance_cosine': 'mc_appearance/accuracy',
  't2v_R5_cosine': 'retrieval/t2v/R5',
  'v2t_R5_cosine': 'retrieval/v2t/R5',
  't2v_R5_reranked': 'retrieval_rerank/t2v/R5',
  'v2t_R5_reranked': 'retrieval_rerank/v2t/R5',
  'probe_top1': 'linear_probe/top1',
}
HEADERS = {
  'direction_vtm': 'direction MC, VTM',
  'direction_cosine': 'direction MC, cosine',
  'appearance_vtm': 'appearance MC, VTM',
  'appearance_cosine': 'appearance MC, cosine',
  't2v_R5_cosine': 't→v R@5, cosine',
  'v2t_R5_cosine': 'v→t R@5, cosine',
  't2v_R5_reranked': 't→v R@5, re-ranked',
  'v2t_R5_reranked': 'v→t R@5, re-ranked',
  'probe_top1': 'linear probe top-1',
}


def make_data(workdir: str) -> tuple[str, dict[str, str]]:
  """(shards dir: segments_train, segments_test and the tokenizer; {eval name: questions file})."""
  media, shards = os.path.join(workdir, 'data', 'media'), os.path.join(workdir, 'data', 'shards')
  # make_demo_data.py keeps a finished dataset of the same arguments and refuses other ones.
  _run(['scripts/make_demo_data.py', f'--output_dir={media}', f'--num_train={_NUM_TRAIN.value}',
        '--num_val=0', f'--num_test={_NUM_TEST.value}', '--mc_splits=test'])  # fmt: skip
  for split in ('train', 'test'):  # prepare_data.py converts only the shards still missing
    manifest = os.path.join(media, f'retrieval_{split}.jsonl')
    _run(['scripts/prepare_data.py', f'--manifest={manifest}',
          f'--output_dir={os.path.join(shards, f"segments_{split}")}', *PREPARE])  # fmt: skip
  if not os.path.exists(os.path.join(shards, TOKENIZER_FILENAME)):
    _run(['scripts/train_tokenizer.py', f'--input_dir={os.path.join(shards, "segments_train")}',
          f'--output={os.path.join(shards, "tokenizer")}', '--vocab_size=1024'])  # fmt: skip
  questions = {name: os.path.join(media, f'{name}_test.json') for name in QUESTIONS}
  for path in questions.values():
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path}: make_demo_data.py --mc_splits=test wrote no questions')
  return shards, questions


def _run_dir(workdir: str, method: str, seed: int) -> str:
  return os.path.join(workdir, 'runs', f'{method}_seed{seed}')


def _total_steps() -> int:
  return _STEPS.value or allinone_demo.get_config().total_steps


def _final(run: str) -> dict | None:
  """The record of the run's last step when it holds every evaluation, else None."""
  path = os.path.join(run, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  last = [r for r in read_metrics(path) if r.get('step') == _total_steps()]
  return last[-1] if last and all(key in last[-1] for key in METRICS.values()) else None


def throughput(run: str) -> dict[str, float]:
  """The trainer's clips_per_second and data_wait_fraction: medians over the log windows without
  an evaluation (an evaluation's time falls in its step's window), and the step time implied."""
  config = workdir_lib.read_config(run)
  evals = tuple(f'{name}/' for name in config.get('evals', {}))
  records = [r for r in read_metrics(os.path.join(run, 'metrics.jsonl')) if 'clips_per_second' in r]
  clean = [r for r in records if not any(k.startswith(evals) for k in r)]
  if not clean:
    return {}
  clips = statistics.median(r['clips_per_second'] for r in clean)
  return {
    'clips_per_second': clips,
    'step_ms': 1000.0 * config.batch_size / clips,
    'data_wait_fraction': statistics.median(r['data_wait_fraction'] for r in clean),
    'windows': len(clean),
  }


def train(workdir: str, shards: str, questions: dict, method: str, seed: int) -> dict:
  run = _run_dir(workdir, method, seed)
  if _final(run) is None:
    args = [f'--config={CONFIG}{ARGS[method]}', f'--workdir={run}',
            f'--config.data.path={shards}', f'--config.seed={seed}',
            *[f'--config.evals.{name}.questions={path}' for name, path in questions.items()]]  # fmt: skip
    if _STEPS.value:  # evaluations at the last step only (the trainer always runs them there)
      evals = allinone_demo.get_config().evals
      args += [f'--config.total_steps={_STEPS.value}',
               f'--config.log_steps={max(1, _STEPS.value // 10)}',
               *[f'--config.evals.{name}.log_steps=0' for name in evals]]  # fmt: skip
    _run(['scripts/train.py', *args])
  record = _final(run)
  if record is None:
    raise ValueError(
      f'{run}/metrics.jsonl has no record of step {_total_steps()} with every evaluation '
      f'({", ".join(METRICS.values())}): the run ended early or its config changed'
    )
  return {**{k: record[key] for k, key in METRICS.items()}, **throughput(run)}


def random_init(workdir: str, method: str, seed: int) -> dict:
  """The evaluations of the trained run's model (its config, data and questions), freshly
  initialised from `seed`; with the chance levels of the same test data."""
  path = os.path.join(workdir, f'random_init_seed{seed}.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config, model, variables, _ = workdir_lib.load(
    _run_dir(workdir, method, seed), random_init=True, seed=seed
  )
  record, chance = {}, {}
  for name in sorted({key.split('/')[0] for key in METRICS.values()}):
    if name not in config.evals:
      raise ValueError(f'config evals.{name} is missing from {CONFIG}: the table reads it')
    evaluator = build_evaluator(config.evals[name], config, model)
    result = evaluator.run(variables)
    record.update({f'{name}/{k}': float(v) for k, v in result.items()})
    if name in QUESTIONS:
      with open(config.evals[name].questions) as f:
        chance[f'{QUESTIONS[name]}_questions'] = len(json.load(f))
      chance[f'{QUESTIONS[name]}_vtm'] = chance[f'{QUESTIONS[name]}_cosine'] = result['chance']
    elif name == 'retrieval':
      correct = evaluator.last['embeddings']['correct']  # [captions, videos]
      chance['t2v_R5'] = chance_recall(correct, 5)
      chance['v2t_R5'] = chance_recall(correct.T[correct.T.any(axis=1)], 5)
    elif name == 'linear_probe':
      chance['probe_top1'] = 100.0 / evaluator.last['num_classes']
  result = {k: record[key] for k, key in METRICS.items()}
  result['chance'] = chance
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  return result


def _chance_row(chance: dict) -> dict[str, float]:
  row = {k: chance[k] for k in METRICS if k in chance}
  for direction in ('t2v', 'v2t'):
    row[f'{direction}_R5_cosine'] = row[f'{direction}_R5_reranked'] = chance[f'{direction}_R5']
  return row


def _cells(runs: list[dict], keys, fmt: str = '.1f') -> list[str]:
  return [_cell([r[k] for r in runs], fmt) if all(k in r for r in runs) else '–' for k in keys]


def table(results: dict, chance: dict, cost: dict) -> str:
  """The accuracy table (percent, mean and range over seeds) and the cost table."""
  lines = [
    f'| temporal modelling | {" | ".join(HEADERS.values())} |',
    '|---' * (len(HEADERS) + 1) + '|',
    '| chance | ' + ' | '.join(_cells([_chance_row(chance)], METRICS)) + ' |',
  ]
  for method, runs in results.items():
    lines.append(f'| {LABELS[method]} | ' + ' | '.join(_cells(runs, METRICS)) + ' |')
  lines += [
    '',
    '| temporal modelling | joint pass GFLOPs / pair | attention GFLOPs / pair | parameters '
    '| clips/s | ms / step | input wait % |',
    '|---|---|---|---|---|---|---|',
  ]
  for method, runs in results.items():
    if method == 'random':
      continue
    joint = cost[method]
    waits = [{'wait': 100 * r['data_wait_fraction']} for r in runs if 'data_wait_fraction' in r]
    lines.append(
      f'| {LABELS[method]} | {joint["gflops"]:.4g} | {joint["attention_gflops"]:.4g} | '
      f'{joint["params"]:,} | {_cells(runs, ["clips_per_second"])[0]} | '
      f'{_cells(runs, ["step_ms"])[0]} | {_cells(waits, ["wait"], ".0f")[0] if waits else "–"} |'
    )
  return '\n'.join(lines) + '\n'


def _mean(runs: list[dict], key: str) -> str:
  values = [r[key] for r in runs if key in r]
  return f'{sum(values) / len(values):.1f}' if len(values) == len(runs) and values else '–'


def note(results: dict, chance: dict, cost: dict, settings: dict) -> str:
  """One paragraph of the numbers (means over seeds), without a reading of them."""
  trained = [m for m in results if m != 'random']

  def listing(key: str) -> str:
    return ', '.join(f'{m} {_mean(results[m], key)}' for m in trained)

  parts = [
    f'allinone_demo, {settings["steps"]} steps of batch {settings["batch_size"]}, seeds '
    f'{", ".join(map(str, settings["seeds"]))} (means over seeds); '
    f'{chance.get("direction_questions", "?")} direction and '
    f'{chance.get("appearance_questions", "?")} appearance questions on the held-out segments.',
    f'Direction MC by the VTM head: {listing("direction_vtm")} (random init '
    f'{_mean(results["random"], "direction_vtm")}, chance {chance["direction_vtm"]:.1f}); by the '
    f'cosine: {listing("direction_cosine")}.',
    f'Appearance MC by the VTM head: {listing("appearance_vtm")} (random init '
    f'{_mean(results["random"], "appearance_vtm")}, chance {chance["appearance_vtm"]:.1f}); by the '
    f'cosine: {listing("appearance_cosine")}.',
    f't→v R@5 by the cosine: {listing("t2v_R5_cosine")}; re-ranked: {listing("t2v_R5_reranked")} '
    f'(chance {chance["t2v_R5"]:.1f}); v→t R@5 by the cosine: {listing("v2t_R5_cosine")}; '
    f're-ranked: {listing("v2t_R5_reranked")} (chance {chance["v2t_R5"]:.1f}).',
    f'Linear probe top-1: {listing("probe_top1")} (random init '
    f'{_mean(results["random"], "probe_top1")}).',
    'Joint pass GFLOPs per pair: '
    + ', '.join(f'{m} {cost[m]["gflops"]:.4g}' for m in trained)
    + '; ms per training step: '
    + ', '.join(f'{m} {_mean(results[m], "step_ms")}' for m in trained)
    + '.',
  ]
  return ' '.join(parts) + '\n'


def main(argv):
  del argv
  methods = list(dict.fromkeys(_METHODS.value))
  if unknown := [m for m in methods if m not in ARGS]:
    raise ValueError(f'--methods {",".join(unknown)}: each must be one of {sorted(ARGS)}')
  seeds = [int(s) for s in _SEEDS.value]
  if not methods or not seeds:
    raise ValueError('--methods and --seeds must name at least one each')
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  shards, questions = make_data(workdir)
  results = {m: [train(workdir, shards, questions, m, s) for s in seeds] for m in methods}
  # The random init: the first method's model (roll by default) before any step.
  randoms = [random_init(workdir, methods[0], s) for s in seeds]
  chance = randoms[0]['chance']
  results = {'random': [{k: v for k, v in r.items() if k != 'chance'} for r in randoms], **results}
  demo = allinone_demo.get_config()
  summary = summarize_allinone(demo.model)
  cost = {m: summary['joint'][m] for m in methods}
  settings = {
    'config': CONFIG,
    'methods': methods,
    'seeds': seeds,
    'steps': _total_steps(),
    'batch_size': workdir_lib.read_config(_run_dir(workdir, methods[0], seeds[0])).batch_size,
    'num_train_videos': _NUM_TRAIN.value,
    'num_test_videos': _NUM_TEST.value,
    'random_init_model': methods[0],
  }
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(
      {'settings': settings, 'chance': chance, 'cost': cost, 'summary': summary,
       'results': results}, f, indent=1,
    )  # fmt: skip
  text = table(results, chance, cost) + '\n' + note(results, chance, cost, settings)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  cli.run(main)
