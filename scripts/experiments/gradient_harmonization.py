r"""Gradient harmonization on the demo with injected misalignment: baseline / GR / CL / GR+CL.

For each noise level p, the demo dataset is generated with a fraction p of training videos whose
captions are rotated among their segments (caption_swap: every caption describes another segment)
and, independently, a fraction p whose audio track comes from another video (audio_swap). The model
(demo_tiny with the modality-agnostic backbone, `ma`) is pretrained with the same seed and budget
four ways — the plain sum (`monitor`: per-loss gradients only logged), realignment (`gr`),
curriculum (`cl`), both (`gr,cl`) — and evaluated on the *clean* segment shards of the noise-free
dataset (the same videos: their content does not depend on the noise): video linear probe and
zero-shot text→video retrieval, at the end of training.

  python scripts/experiments/gradient_harmonization.py --workdir=demo/experiments/harmonization

Stages, each resumable (finished data and runs are kept): data (make_demo_data → prepare_data;
the tokenizer and the evaluation shards are those of the clean dataset), training runs, then
WORKDIR/results.json, WORKDIR/results.md (the table) and WORKDIR/harmonization.png.
Time: about 6 minutes per run on 2 CPU cores (12 runs by default), a few minutes of data.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from runs import run as _run  # scripts/experiments/runs.py
from runs import tag as _tag

from data_pipelines.options import TOKENIZER_FILENAME
from vatt_jax import cli, plots
from vatt_jax.plots import read_metrics

_WORKDIR = flags.DEFINE_string('workdir', 'demo/experiments/harmonization', 'Output directory.')
_NOISE = flags.DEFINE_list(
  'noise', ['0', '0.3', '0.6'], 'Misalignment fractions (captions, audio).'
)
_METHODS = flags.DEFINE_list('methods', ['baseline', 'gr', 'cl', 'gr_cl'], 'Which methods.')
_SEED = flags.DEFINE_integer('seed', 0, 'Training seed (the data always uses seed 0).')
_STEPS = flags.DEFINE_integer('steps', 0, 'Training steps (0: the config default).')
_ONLY_REPORT = flags.DEFINE_bool('only_report', False, 'Skip data and training; tabulate only.')

# config arguments of configs/demo_tiny.py per method
METHODS = {'baseline': 'ma,monitor', 'gr': 'ma,gr', 'cl': 'ma,cl', 'gr_cl': 'ma,gr,cl'}
LABELS = {'baseline': 'baseline', 'gr': 'GR', 'cl': 'CL', 'gr_cl': 'GR+CL'}
EVAL_SPLITS = ('segments_train', 'segments_test')


def make_data(workdir: str, noise: float, clean_shards: str | None) -> str:
  """Media and training shards of one noise level → its shards directory."""
  base = os.path.join(workdir, 'data', _tag(noise))
  media, shards = os.path.join(base, 'media'), os.path.join(base, 'shards')
  if not os.path.exists(os.path.join(media, 'dataset_info.json')):
    _run(['scripts/make_demo_data.py', f'--output_dir={media}', f'--caption_swap={noise}',
          f'--audio_swap={noise}'])  # fmt: skip
  prepare = ['--num_shards=4', '--short_side=64', '--sample_rate=8000']
  splits = [('train', 'train.jsonl')]
  if clean_shards is None:  # the clean dataset also makes the evaluation shards
    splits += [(s, f'retrieval_{s.split("_")[1]}.jsonl') for s in EVAL_SPLITS]
  for split, manifest in splits:
    _run(['scripts/prepare_data.py', f'--manifest={os.path.join(media, manifest)}',
          f'--output_dir={os.path.join(shards, split)}', *prepare])  # fmt: skip
  tokenizer = os.path.join(shards, TOKENIZER_FILENAME)
  if clean_shards is None and not os.path.exists(tokenizer):
    _run(['scripts/train_tokenizer.py', f'--input_dir={os.path.join(shards, "train")}',
          f'--output={os.path.join(shards, "tokenizer")}', '--vocab_size=1024'])  # fmt: skip
  if clean_shards is not None:  # same tokenizer, clean evaluation data
    for name in (TOKENIZER_FILENAME, *EVAL_SPLITS):
      link = os.path.join(shards, name)
      if not os.path.lexists(link):
        os.symlink(os.path.abspath(os.path.join(clean_shards, name)), link)
  return shards


def train(workdir: str, shards: str, noise: float, method: str) -> str:
  run = os.path.join(workdir, 'runs', f'{_tag(noise)}_{method}')
  if _final(run) is None:
    args = ['scripts/train.py', f'--config=configs/demo_tiny.py:{METHODS[method]}',
            f'--workdir={run}', f'--config.data.path={shards}', f'--config.seed={_SEED.value}']  # fmt: skip
    # Evaluate once, at the end (the in-training evaluations would only cost time here).
    args += [f'--config.evals.{name}.log_steps=0' for name in ('linear_probe', 'retrieval')]
    args += ['--config.evals.linear_probe_audio.log_steps=0']
    if _STEPS.value:
      args.append(f'--config.total_steps={_STEPS.value}')
    _run(args)
  return run


def _records(path: str) -> list[dict]:

  return read_metrics(path) if os.path.exists(path) else []


def _final(run: str) -> dict | None:
  """The last record of a finished run (one holding the end-of-training evaluations)."""
  records = [r for r in _records(os.path.join(run, 'metrics.jsonl')) if 'retrieval/t2v/R5' in r]
  return records[-1] if records else None


def summarise(run: str) -> dict:
  final = _final(run)
  if final is None:
    raise RuntimeError(f'{run} has not finished')
  steps = {r['step']: r for r in _records(os.path.join(run, 'gradients.jsonl'))}
  cosines = [r['grad_cosine'] for r in steps.values()]
  return {
    'probe_top1': final['linear_probe/top1'],
    'audio_probe_top1': final['linear_probe_audio/top1'],
    't2v_R1': final['retrieval/t2v/R1'],
    't2v_R5': final['retrieval/t2v/R5'],
    't2v_R10': final['retrieval/t2v/R10'],
    't2v_MedR': final['retrieval/t2v/MedR'],
    'v2t_R5': final['retrieval/v2t/R5'],
    'loss_va': final['loss_va'],
    'loss_vt': final['loss_vt'],
    'mean_cosine': sum(cosines) / max(len(cosines), 1),
    'conflict_fraction': sum(c < 0 for c in cosines) / max(len(cosines), 1),
    'skipped_fraction': final.get('skipped_steps', 0.0) / final['step'],
    'steps': final['step'],
  }


def table(results: dict) -> str:
  lines = [
    '| misaligned | method | video probe top-1 | t→v R@1 | t→v R@5 | t→v R@10 | t→v MedR | '
    'v→t R@5 | conflicting steps | skipped steps |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for tag, by_method in results.items():
    for method, r in by_method.items():
      lines.append(
        f'| {tag} | {LABELS[method]} | {r["probe_top1"]:.1f} | {r["t2v_R1"]:.1f} | '
        f'{r["t2v_R5"]:.1f} | {r["t2v_R10"]:.1f} | {r["t2v_MedR"]:g} | {r["v2t_R5"]:.1f} | '
        f'{100 * r["conflict_fraction"]:.0f} % | {100 * r["skipped_fraction"]:.0f} % |'
      )
  return '\n'.join(lines) + '\n'


def plot(results: dict, workdir: str, noises: list[float]) -> str:
  from matplotlib.figure import Figure

  fig = Figure(figsize=(13.5, 3.4), layout='constrained')
  panels = [('t2v_R5', 'text→video R@5 (%)'), ('probe_top1', 'video linear probe top-1 (%)')]
  x = [100 * n for n in noises]
  for j, (key, name) in enumerate(panels):
    ax = fig.add_subplot(1, 3, j + 1)
    for method in _METHODS.value:
      ys = [results[_label(n)][method][key] for n in noises]
      ax.plot(x, ys, 'o-', label=LABELS[method])
    ax.set_xlabel('misaligned captions and audio (%)')
    ax.set_title(name, fontsize=10)
    ax.legend(fontsize=7)
  ax = fig.add_subplot(1, 3, 3)
  for n in noises:
    path = os.path.join(workdir, 'runs', f'{_tag(n)}_baseline', 'gradients.jsonl')
    cos = [r['grad_cosine'] for r in _records(path)]
    if cos:
      ax.hist(cos, bins=40, histtype='step', density=True, label=f'{_label(n)} misaligned')
  ax.axvline(0.0, color='grey', lw=0.8, ls=':')
  ax.set_xlabel('cos(g_va, g_vt), every step of the baseline')
  ax.set_title('gradient alignment (baseline runs)', fontsize=10)
  ax.legend(fontsize=7)
  out = os.path.join(workdir, 'harmonization.png')
  plots._save(fig, out)
  runs = {
    f'{_label(n)} {LABELS[m]}': os.path.join(workdir, 'runs', f'{_tag(n)}_{m}', 'gradients.jsonl')
    for n in noises
    for m in _METHODS.value
    if m in ('baseline', 'gr_cl')
  }
  plots.gradient_cosines(runs, os.path.join(workdir, 'gradient_cosines.png'))
  return out


def _label(noise: float) -> str:
  return f'{round(100 * noise)} %'


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value)
  noises = [float(n) for n in _NOISE.value]
  unknown = set(_METHODS.value) - set(METHODS)
  if unknown or not noises or any(not 0 <= n <= 1 for n in noises):
    raise app.UsageError(f'--methods from {sorted(METHODS)}, --noise fractions in [0, 1]')
  if not _ONLY_REPORT.value:
    clean = make_data(workdir, 0.0, None)
    for noise in noises:
      shards = clean if noise == 0 else make_data(workdir, noise, clean)
      for method in _METHODS.value:
        train(workdir, shards, noise, method)
  results = {
    _label(n): {
      m: summarise(os.path.join(workdir, 'runs', f'{_tag(n)}_{m}')) for m in _METHODS.value
    }
    for n in noises
  }
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  text = table(results)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text)
  print(text)
  print('plot:', plot(results, workdir, noises))


if __name__ == '__main__':
  cli.run(main)
