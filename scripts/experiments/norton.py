r"""Norton vs. MIL-NCE post-training on the demo's long videos with injected caption noise.

  python scripts/experiments/norton.py --workdir=demo/experiments/norton

1. A demo_tiny VATT is pretrained on the short demo videos (3–4 segments; data seed 1) — or
   --pretrained names an existing pretraining run (e.g. demo/run of `make demo`) and its shards.
2. Long videos (--segments of ~2 s, one caption each, 4 by default; data seed 0) are made clean and, for every
   noise level, with a fraction of captions moved onto a neighbouring segment (caption_shift: the
   clip anchored on it shows the wrong digit) and a fraction replaced by irrelevant text
   (caption_irrelevant). The tokenizer is the pretraining run's.
3. For every noise level the pretrained model is post-trained with the same seed, batches and
   budget twice: Norton's losses (configs/norton_demo.py) and the plain contrastive loss
   (norton_demo.py:milnce).
4. Everything — and the pretrained model without post-training — is evaluated on the *clean* long
   test videos: paragraph→video retrieval by optimal transport (and by the mean similarity) and
   caption→clip retrieval (vatt_jax/evaluation/long_video.py).

Every stage resumes (finished data and runs are kept). Writes WORKDIR/results.json and
WORKDIR/results.md (the README's table).
"""

from __future__ import annotations

import json
import os

from absl import flags
from runs import cell as _cell
from runs import run as _run  # scripts/experiments/runs.py
from runs import tag as _tag

from configs import norton_demo
from data_pipelines.options import TOKENIZER_FILENAME
from vatt_jax import cli
from vatt_jax import workdir as workdir_lib
from vatt_jax.evaluation.long_video import LongVideoRetrievalEvaluator
from vatt_jax.plots import read_metrics

_WORKDIR = flags.DEFINE_string('workdir', 'demo/experiments/norton', 'Output directory.')
_PRETRAINED = flags.DEFINE_string(
  'pretrained', '', 'A demo_tiny pretraining workdir (default: pretrain one in WORKDIR/pretrain).'
)
_PRETRAINED_SHARDS = flags.DEFINE_string(
  'pretrained_shards', '', "Shards of --pretrained (its tokenizer.model is the experiment's)."
)
_NOISE = flags.DEFINE_list(
  'noise', ['0', '0.3'], 'Noise levels: fraction of captions shifted and of captions irrelevant.'
)
_IRRELEVANT = flags.DEFINE_float(
  'irrelevant_ratio', 0.5, 'caption_irrelevant = this × the noise level (shift = the level).'
)
_METHODS = flags.DEFINE_list('methods', ['milnce', 'norton'], 'Post-training losses.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Post-training seeds (the table: mean and range).')
_STEPS = flags.DEFINE_integer('steps', 0, 'Post-training steps (0: the config default).')
_NUM_TEST = flags.DEFINE_integer('num_test', 96, 'Long test videos.')
_NUM_TRAIN = flags.DEFINE_integer('num_train', 192, 'Long training videos.')
_SEGMENTS = flags.DEFINE_integer(
  'segments', 4, 'Segments (captions) per long video: config data.long_video.clips.'
)

ARGS = {'milnce': 'milnce', 'norton': ''}
LABELS = {'milnce': 'MIL-NCE', 'norton': 'Norton', 'pretrained': 'pretrained (no post-training)'}
PREPARE = ['--short_side=64', '--sample_rate=8000']


def _make(media: str, shards: str, splits: list[str], flags_: list[str]) -> None:
  if not os.path.exists(os.path.join(media, 'dataset_info.json')):
    _run(['scripts/make_demo_data.py', f'--output_dir={media}', *flags_])
  for split in splits:
    if not os.path.isdir(os.path.join(shards, split)) or not os.listdir(
      os.path.join(shards, split)
    ):
      _run(['scripts/prepare_data.py', f'--manifest={os.path.join(media, split + ".jsonl")}',
            f'--output_dir={os.path.join(shards, split)}', '--num_shards=4', *PREPARE])  # fmt: skip


def pretrain(workdir: str) -> tuple[str, str]:
  """(pretraining run, its shards)."""
  if _PRETRAINED.value:
    return _PRETRAINED.value, _PRETRAINED_SHARDS.value
  media, shards = (os.path.join(workdir, 'data', 'short', d) for d in ('media', 'shards'))
  _make(media, shards, ['train'], ['--seed=1'])
  if not os.path.exists(os.path.join(shards, TOKENIZER_FILENAME)):
    _run(['scripts/train_tokenizer.py', f'--input_dir={os.path.join(shards, "train")}',
          f'--output={os.path.join(shards, "tokenizer")}', '--vocab_size=1024'])  # fmt: skip
  run = os.path.join(workdir, 'pretrain')
  if not _finished(run, 1500):
    _run(['scripts/train.py', '--config=configs/demo_tiny.py', f'--workdir={run}',
          f'--config.data.path={shards}', '--config.evals={}'])  # fmt: skip
  return run, shards


def long_data(workdir: str, noise: float, tokenizer: str) -> str:
  """Long-video shards at one noise level (test split: always the clean one) → shards dir."""
  base = os.path.join(workdir, 'data', f'long_{_tag(noise)}')
  media, shards = os.path.join(base, 'media'), os.path.join(base, 'shards')
  n = _SEGMENTS.value
  flags_ = [f'--segments={n},{n}', f'--num_test={_NUM_TEST.value}', '--num_val=0',
            f'--num_train={_NUM_TRAIN.value}']  # fmt: skip
  if noise:
    flags_ += [f'--caption_shift={noise}', f'--caption_irrelevant={_IRRELEVANT.value * noise}']
  _make(media, shards, ['train'] if noise else ['train', 'test'], flags_)
  links = {TOKENIZER_FILENAME: tokenizer}
  if noise:
    links['test'] = os.path.join(workdir, 'data', 'long_noise00', 'shards', 'test')
  for name, target in links.items():
    link = os.path.join(shards, name)
    if not os.path.lexists(link):
      os.symlink(os.path.abspath(target), link)
  return shards


def _finished(run: str, steps: int) -> bool:

  path = os.path.join(run, 'metrics.jsonl')
  return os.path.exists(path) and any(r.get('step', 0) >= steps for r in read_metrics(path))


def post_train(
  workdir: str, shards: str, pretrained: str, noise: float, method: str, seed: int
) -> str:
  name = f'{_tag(noise)}_{method}' + (f'_seed{seed}' if seed else '')
  run = os.path.join(workdir, 'runs', name)
  if not _final(run):
    args = [f'--config=configs/norton_demo.py:{ARGS[method]}', f'--workdir={run}',
            f'--config.data.path={shards}', f'--config.init_from={pretrained}',
            f'--config.seed={seed}', f'--config.data.long_video.clips={_SEGMENTS.value}']  # fmt: skip
    if method == 'norton':
      args.append(f'--config.loss.length={_SEGMENTS.value}')
    if _STEPS.value:
      args += [f'--config.total_steps={_STEPS.value}', '--config.evals.long_video.log_steps=0']
    _run(['scripts/train.py', *args])
  return run


def _final(run: str) -> dict | None:

  path = os.path.join(run, 'metrics.jsonl')
  records = (
    [r for r in read_metrics(path) if 'long_video/p2v_ot/R1' in r] if os.path.exists(path) else []
  )
  return records[-1] if records else None


def evaluate_pretrained(workdir: str, pretrained: str, shards: str) -> dict:
  """The long-video evaluation of the pretrained model itself (no post-training)."""
  path = os.path.join(workdir, 'pretrained_eval.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)

  config = norton_demo.get_config()
  config.data.path = shards
  _, model, variables = workdir_lib.load_model(pretrained)
  evaluator = LongVideoRetrievalEvaluator(config.evals.long_video, config, model)
  result = {f'long_video/{k}': v for k, v in evaluator.run(variables).items()}
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  return result


def summarise(record: dict) -> dict:
  keys = ('p2v_ot/R1', 'p2v_ot/R5', 'p2v_ot/MedR', 'p2v_mean/R1', 'p2v_mean/R5',
          't2c/R1', 't2c/R5', 't2c/R10', 't2c/MedR')  # fmt: skip
  return {k: record[f'long_video/{k}'] for k in keys}


def table(results: dict) -> str:
  """results[noise label][method] = [per-seed summaries]."""
  lines = [
    '| captions shifted / irrelevant | post-training | paragraph→video R@1 (OT) | R@5 (OT) | '
    'R@1 (mean sim.) | caption→clip R@1 | R@5 | R@10 | MedR |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  keys = ('p2v_ot/R1', 'p2v_ot/R5', 'p2v_mean/R1', 't2c/R1', 't2c/R5', 't2c/R10')
  for tag, by_method in results.items():
    for method, runs in by_method.items():
      cells = [_cell([r[k] for r in runs]) for k in keys]
      cells.append(_cell([r['t2c/MedR'] for r in runs], 'g'))
      lines.append(f'| {tag} | {LABELS[method]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  pretrained, pretrained_shards = pretrain(workdir)
  tokenizer = os.path.join(pretrained_shards, TOKENIZER_FILENAME)
  noises = [float(n) for n in _NOISE.value]
  shards = {n: long_data(workdir, n, tokenizer) for n in sorted(noises)}  # clean one first
  if 0.0 not in shards:
    shards[0.0] = long_data(workdir, 0.0, tokenizer)
  before = summarise(evaluate_pretrained(workdir, pretrained, shards[0.0]))
  results = {'–': {'pretrained': [before]}}
  for noise in noises:
    label = f'{round(100 * noise)} % / {round(100 * _IRRELEVANT.value * noise)} %'
    results[label] = {}
    for method in _METHODS.value:
      results[label][method] = [
        summarise(_final(post_train(workdir, shards[noise], pretrained, noise, method, int(seed))))
        for seed in _SEEDS.value
      ]
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(table(results))
  print(table(results))


if __name__ == '__main__':
  cli.run(main)
