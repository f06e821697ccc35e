r"""Pretrains a model from a config file.

  python scripts/train.py --config=configs/demo_tiny.py --workdir=/tmp/demo \
      [--config.total_steps=100 ...]

Writes the resolved config (config.json) and metrics.jsonl into the workdir.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vatt_jax.train import trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:variant]).')
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Directory for the config, metrics and checkpoints.'
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  history = trainer.train(_CONFIG.value, _WORKDIR.value)
  if len(history) >= 2:
    logging.info(
      'loss: %.4f at step %d → %.4f at step %d',
      history[0]['loss'],
      history[0]['step'],
      history[-1]['loss'],
      history[-1]['step'],
    )


if __name__ == '__main__':
  app.run(main)
