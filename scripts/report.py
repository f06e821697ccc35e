r"""Evaluates a run's `config.evals` (linear probe, retrieval) on its checkpoint and on a randomly
initialised copy of the model, prints a table, writes RUN/results.json and the plots RUN/plots/.

  python scripts/report.py --workdir=demo/run          # `make demo` ends with this

results.json: {"pretrained": {eval name: results}, "random_init": {…same keys…}, "chance": {…}}
(percentages), with "linear_probe": {"top1", "top5"} and "retrieval": {"t2v": {"R1", "R5",
"R10", "MedR", …}, "v2t": {…}} for evals of those names. Chance: 100 / classes for a probe's
top-1, and the expected R@5 of a random ranking (hypergeometric, per query) for retrieval.
Plots (pretrained model): t-SNE of each modality in the tokenizer's input space and in the
common space (VATT Fig. 3 top), positive vs. negative pair similarities (Fig. 3 bottom), and the
training curves of metrics.jsonl.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags, logging

from vatt_jax import cli, plots, provenance
from vatt_jax import workdir as workdir_lib
from vatt_jax.evaluation import build_evaluator, retrieval
from vatt_jax.evaluation.linear_probe import LinearProbeEvaluator
from vatt_jax.evaluation.retrieval import RetrievalEvaluator
from vatt_jax.models.contract import space
from vatt_jax.train.logging import GRADIENTS_FILENAME

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (config.json + checkpoints).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random-init baseline.')
_PLOTS = flags.DEFINE_bool('plots', True, 'Write RUN/plots/*.png.')
flags.mark_flags_as_required(['workdir'])


def evaluate(config, model, variables, *, cache_key: str, workdir: str):
  """{name: results} of every config.evals entry, and the evaluators (their `last` outputs)."""
  results, evaluators = {}, {}
  for name, eval_cfg in config.evals.items():
    if eval_cfg.type == 'linear_probe':
      evaluator = LinearProbeEvaluator(eval_cfg, config, model,
                                       cache_dir=os.path.join(workdir, 'features'),
                                       cache_key=cache_key)  # fmt: skip
      results[name] = evaluator.run(variables)
    elif eval_cfg.type == 'retrieval':
      evaluator = build_evaluator(eval_cfg, config, model)
      evaluator.run(variables, with_audio=True)
      results[name] = evaluator.last['results']
    elif eval_cfg.type == 'multiple_choice':  # EgoMCQ: inter- / intra-video accuracy
      evaluator = build_evaluator(eval_cfg, config, model)
      results[name] = {k: v for k, v in evaluator.run(variables).items() if k != 'seconds'}
    else:
      logging.info('report: eval %r of type %r is not part of the report', name, eval_cfg.type)
      continue
    evaluators[name] = evaluator
  return results, evaluators


def chance(config, evaluators) -> dict:
  out = {}
  for name, evaluator in evaluators.items():
    if config.evals[name].type == 'linear_probe':
      out[f'{name}_top1'] = 100.0 / evaluator.last['num_classes']
    elif config.evals[name].type == 'multiple_choice':
      out[f'{name}_accuracy'] = 100.0 / evaluator.last['similarity'].shape[1]
    else:
      prefix = '' if name == 'retrieval' else f'{name}_'
      correct = evaluator.last['embeddings']['correct']
      out[f'{prefix}t2v_R5'] = retrieval.chance_recall(correct, 5)
      out[f'{prefix}v2t_R5'] = retrieval.chance_recall(correct.T[correct.T.any(1)], 5)
  return out


def write_plots(workdir: str, evaluators: dict, title: str) -> list[str]:
  out_dir = os.path.join(workdir, plots.PLOTS_DIR)
  written = []
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics_path):
    written.append(plots.training_curves(metrics_path, os.path.join(out_dir, 'training.png'),
                                         title=title))  # fmt: skip
  gradients_path = os.path.join(workdir, GRADIENTS_FILENAME)
  if os.path.exists(gradients_path):  # a run with per-loss gradients (gradient harmonization)
    written.append(plots.gradient_cosines({title or 'run': gradients_path},
                                          os.path.join(out_dir, 'gradients.png')))  # fmt: skip
  found = [e for e in evaluators.values() if isinstance(e, RetrievalEvaluator)]
  if not found:
    logging.warning('no retrieval eval in config.evals: no t-SNE or similarity plots')
    return written
  evaluator = found[0]
  e = evaluator.last['embeddings']
  correct = e['correct']
  labels = {
    'video': e['label'],
    'audio': e['label'],
    'text': e['label'][np.argmax(correct, axis=1)],  # the label of the first video it describes
  }
  keep = {'video': slice(None), 'text': slice(None)}
  if 'audio_mask' in e:
    keep['audio'] = e['audio_mask'] > 0
  vt, va = evaluator.level, space(evaluator.model, 'video', 'audio')

  def panel(modality, level, what):
    key = f'{modality}/{level}'
    if level is None or key not in e or modality not in keep:
      return None
    return f'{modality} · {what}', e[key][keep[modality]], labels[modality][keep[modality]]

  rows = [
    [panel(m, 'input', 'input space') for m in ('video', 'audio', 'text')],
    [panel('video', vt, f'common space ({vt})'), panel('audio', va, f'common space ({va})'),
     panel('text', vt, f'common space ({vt})')],
  ]  # fmt: skip
  panels = [[p for p in row if p is not None] for row in rows]
  panels = [row for row in panels if row]
  if panels:
    written.append(plots.tsne_grid(panels, os.path.join(out_dir, 'tsne.png'), title=title))
  pairs = []
  if panel('video', vt, '') and panel('text', vt, ''):
    sims = plots.pair_similarities(e[f'text/{vt}'], e[f'video/{vt}'], correct)
    pairs.append((f'video–text ({vt} space)', *sims))
  if panel('video', va, '') and panel('audio', va, ''):
    audio = keep['audio']
    sims = plots.pair_similarities(e[f'video/{va}'][audio], e[f'audio/{va}'][audio])
    pairs.append((f'video–audio ({va} space)', *sims))
  if pairs:
    written.append(plots.similarity_histograms(pairs, os.path.join(out_dir, 'similarities.png'),
                                               title=title))  # fmt: skip
  return written


def table(results: dict, chance_figures: dict) -> str:
  rows = []
  for name in results['pretrained']:
    for metric, pre, rand in _flat(results['pretrained'][name], results['random_init'][name]):
      rows.append((f'{name} {metric}', pre, rand))
  width = max(len(r[0]) for r in rows) + 2
  lines = [f'{"":{width}}{"pretrained":>12}{"random init":>13}']
  lines += [f'{n:{width}}{p:12.2f}{r:13.2f}' for n, p, r in rows]
  lines.append('chance: ' + ', '.join(f'{k} {v:.2f}' for k, v in chance_figures.items()))
  return '\n'.join(lines)


def _flat(pre: dict, rand: dict, prefix: str = ''):
  for key, value in pre.items():
    if isinstance(value, dict):
      yield from _flat(value, rand[key], f'{prefix}{key} ')
    elif key not in ('queries', 'MeanR'):
      yield f'{prefix}{key}', float(value), float(rand[key])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  workdir = _WORKDIR.value
  results, described, evaluators = {}, {}, {}
  for tag, random_init in (('pretrained', False), ('random_init', True)):
    config, model, variables, what = workdir_lib.load(
      workdir, step=_STEP.value, random_init=random_init, seed=_SEED.value
    )
    if not config.get('evals'):
      raise app.UsageError(f'{workdir}/config.json has no config.evals to report')
    if not random_init:
      provenance.check_evals(workdir, config)
    results[tag], evaluators[tag] = evaluate(
      config, model, variables, cache_key=what, workdir=workdir
    )
    described[tag] = what
  chance_figures = chance(config, evaluators['pretrained'])
  report = {**results, 'chance': chance_figures, 'models': described}
  path = os.path.join(workdir, 'results.json')
  with open(path, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'\n{described["pretrained"]} vs. {described["random_init"]}')
  print(table(results, chance_figures))
  print(f'→ {path}')
  if _PLOTS.value:
    for plot in write_plots(workdir, evaluators['pretrained'], described['pretrained']):
      print(f'→ {plot}')


if __name__ == '__main__':
  cli.run(main)
