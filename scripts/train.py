r"""Pretrains a model from a config file; resumes from the workdir's latest checkpoint.

  python scripts/train.py --config=configs/demo_tiny.py --workdir=/tmp/demo \
      [--config.total_steps=100 ...] [--profile_steps=10:15]

Several processes (hosts): on TPU pods and under SLURM `jax.distributed.initialize()` finds its
peers by itself (--distributed); elsewhere name them:
  python scripts/train.py ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0

Writes the resolved config (config.json), metrics.jsonl, TensorBoard event files and checkpoints
(checkpoints/<step>/) into the workdir, and nothing before the run is accepted: a refused or failing
run leaves the workdir as it was (docs/failures_train.md). SIGTERM or Ctrl-C saves a checkpoint and
exits cleanly; bad input ends in one line, `error: …`.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from vatt_jax import cli
from vatt_jax.train import distributed, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:variant]).')
_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Directory for the config, metrics and checkpoints.'
)
_PROFILE = flags.DEFINE_string(
  'profile_steps', None, 'FIRST:LAST: a jax.profiler trace of these steps into WORKDIR/profile.'
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  distributed.initialize_from_flags()
  history = trainer.train(_CONFIG.value, _WORKDIR.value, profile_steps=_PROFILE.value)
  if len(history) >= 2:
    logging.info(
      'loss: %.4f at step %d → %.4f at step %d',
      history[0]['loss'],
      history[0]['step'],
      history[-1]['loss'],
      history[-1]['step'],
    )


if __name__ == '__main__':
  cli.run(main)
