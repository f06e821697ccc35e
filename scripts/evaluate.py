r"""Runs a fine-tuned run's evaluations (config.evals) on one of its checkpoints; prints JSON.

  python scripts/evaluate.py --workdir=runs/k400_bbs [--step=100000] [--evals=val] \
      [--data_path=/new/place/of/the/shards] [--output=results.json]

The run's stored config (config.json) names the model and the evaluations (multi-view
classification: clips × crops, logits averaged; top-1/5 or mAP / AUC / d′); the same evaluator
classes run during training. Results go to stdout and, as JSON, to --output (default
WORKDIR/eval_<step>.json).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging

from vatt_jax import cli, provenance
from vatt_jax import workdir as workdir_lib
from vatt_jax.evaluation import build_evaluator

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir (config.json + checkpoints/).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_EVALS = flags.DEFINE_list('evals', None, 'Names in config.evals to run (default: all).')
_DATA_PATH = flags.DEFINE_string('data_path', None, 'Overrides config.data.path.')
_OUTPUT = flags.DEFINE_string('output', None, 'JSON file (default: WORKDIR/eval_<step>.json).')
flags.mark_flags_as_required(['workdir'])


def evaluate(
  workdir: str,
  step: int | None = None,
  names: list[str] | None = None,
  data_path: str | None = None,
  output: str | None = None,
) -> dict:
  """{'workdir', 'step', 'results': {eval name: {metric: value}}}, also written to `output`."""
  if step is None:  # the latest finished checkpoint
    step = workdir_lib.latest_step(workdir)
  config, model, variables = workdir_lib.load_model(workdir, step)
  if data_path:
    config.data.path = data_path
  evals = dict(config.get('evals') or {})
  if not evals:
    raise ValueError(f'{workdir}/config.json has no evals (config.evals) to run')
  unknown = sorted(set(names or ()) - set(evals))
  if unknown:
    raise ValueError(f'--evals {unknown} not in config.evals ({sorted(evals)})')
  provenance.check_evals(workdir, config, names or sorted(evals))
  results = {}
  for name in names or sorted(evals):
    logging.info('running %s (%s) on %s step %d', name, evals[name].type, workdir, step)
    results[name] = build_evaluator(evals[name], config, model).run(variables)
  report = {'workdir': os.path.abspath(workdir), 'step': step, 'results': results}
  output = output or os.path.join(workdir, f'eval_{step}.json')
  with open(output, 'w') as f:
    json.dump(report, f, indent=2, sort_keys=True)
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  report = evaluate(_WORKDIR.value, _STEP.value, _EVALS.value, _DATA_PATH.value, _OUTPUT.value)
  print(json.dumps(report, indent=2, sort_keys=True))


if __name__ == '__main__':
  cli.run(main)
