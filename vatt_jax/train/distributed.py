"""Joining the processes of a multi-host run (flags shared by the entry points).

On TPU pods and under SLURM `jax.distributed.initialize()` finds its peers by itself (--distributed);
elsewhere each process names the coordinator, the process count and its own id. CPU devices of
different processes talk through gloo (JAX's default CPU collectives).
"""

from __future__ import annotations

from absl import app, flags

DISTRIBUTED = flags.DEFINE_bool(
  'distributed', False, 'Call jax.distributed.initialize() (auto-detects TPU pods and SLURM).'
)
COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'host:port of process 0 (multi-process without auto-detection).'
)
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'How many processes take part.')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0 … num_processes-1.')


def initialize_from_flags() -> None:
  """Call before anything touches a device (jax.distributed.initialize must come first)."""
  import jax

  explicit = (COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError(
        '--coordinator_address, --num_processes and --process_id go together (or use '
        '--distributed where they are detected)'
      )
    jax.distributed.initialize(
      coordinator_address=COORDINATOR.value,
      num_processes=NUM_PROCESSES.value,
      process_id=PROCESS_ID.value,
    )
  elif DISTRIBUTED.value:
    jax.distributed.initialize()
