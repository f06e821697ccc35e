r"""Prints the devices, the hosts and the mesh a training config gets on this machine (or pod).

  python scripts/print_topology.py [--config=configs/vatt_mbs.py] [--config.mesh.fsdp=2]
      [--distributed | --coordinator_address=host0:1234 --num_processes=N --process_id=I]

Run it as the training job would be run (same launcher, same flags) to see how the mesh axes lie
over devices and hosts, and whether the global batch divides over them.
"""

from __future__ import annotations

import os

from absl import app
from ml_collections import config_flags

from vatt_jax import cli
from vatt_jax.train import distributed, sharding

_CONFIG = config_flags.DEFINE_config_file(
  'config', os.path.join(os.path.dirname(__file__), '..', 'configs', 'demo_tiny.py'),
  'Config file whose mesh (and batch size) to show.',
)  # fmt: skip


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  distributed.initialize_from_flags()
  import jax

  config = _CONFIG.value
  print(f'JAX {jax.__version__}, backend {jax.default_backend()}')
  print(f'processes: {jax.process_count()} (this is {jax.process_index()})')
  print(f'devices: {jax.device_count()} in all, {jax.local_device_count()} here')
  for device in jax.local_devices():
    print(f'  {device.platform}:{device.id} {device.device_kind} (process {device.process_index})')
  mesh = sharding.make_mesh(config.mesh)
  print(sharding.describe(mesh))
  per_replica = config.batch_size / sharding.data_parallel_size(mesh)
  print(f'global batch {config.batch_size}: {per_replica:g} per data-parallel device, '
        f'{config.batch_size // jax.process_count()} per process')  # fmt: skip
  sharding.check_batch_size(config.batch_size, mesh)


if __name__ == '__main__':
  cli.run(main)
