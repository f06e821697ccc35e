"""Timing and cost helpers every benchmark shares.

Timing follows timeit's rule: on a shared machine the fastest of several windows is the one least
disturbed, so every figure is the best of its windows; figures compared with each other have their
windows interleaved, so that a load hits them alike. Costs come from XLA: the FLOPs of a compiled
program (cost analysis) and its temporary memory (memory analysis).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp


def interleaved_best(
  runs: Mapping[str, Callable[[], object]],
  repeats: int,
  clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
  """{name: seconds of its fastest call} over `repeats` rounds, each round calling every run once
  in order (interleaved: a load on a shared machine hits them alike)."""
  best = dict.fromkeys(runs, math.inf)
  for _ in range(repeats):
    for name, run in runs.items():
      start = clock()
      run()
      best[name] = min(best[name], clock() - start)
  return best


def best_seconds(
  run: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> float:
  """Seconds of the fastest of `repeats` calls of run()."""
  return interleaved_best({'run': run}, repeats, clock)['run']


def best_rate(
  run_one: Callable[[], object],
  windows: int,
  per_window: int,
  items_per_call: int,
  clock: Callable[[], float] = time.perf_counter,
) -> float:
  """Items per second of the fastest of `windows` windows of `per_window` calls of run_one()."""

  def window():
    for _ in range(per_window):
      run_one()

  return per_window * items_per_call / best_seconds(window, windows, clock)


def step_window(step, state, batch, steps: int, warmup: int = 1) -> Callable[..., None]:
  """A timing window: `steps` calls of the donating `step` (state, batch) → (state, metrics),
  dispatched back to back as the trainer does and done when the last one's metrics are. `warmup`
  steps run first (compilation, first touch of the buffers). The state is carried between calls."""
  holder = [state]

  def window(n: int = steps) -> None:
    for _ in range(n):
      holder[0], metrics = step(holder[0], batch)
    jax.block_until_ready(metrics)

  window(warmup)
  return window


def xla_flops(compiled) -> float:
  """FLOPs of a compiled program from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: a list of one dict
  return float(cost['flops'])


def temp_bytes(compiled) -> int:
  """Temporary memory of a compiled program (XLA's memory analysis; 0 where it has none)."""
  return int(getattr(compiled.memory_analysis(), 'temp_size_in_bytes', 0) or 0)


def matmul_flops_per_s(
  dtype=jnp.float32, repeats: int = 3, n: int | None = None, calls: int | None = None
) -> float:
  """FLOP/s of a jitted square matmul [n, n] @ [n, n] (2·n³ FLOPs) on the default device: the
  fastest of `repeats` windows of `calls` calls; the machine's practical peak in that dtype, not a
  datasheet figure. n, calls: 2048, 4 on CPU; 8192, 50 on an accelerator."""
  on_cpu = jax.devices()[0].platform == 'cpu'
  n = n or (2048 if on_cpu else 8192)
  calls = calls or (4 if on_cpu else 50)
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(jnp.matmul)

  def window():
    for _ in range(calls):
      out = matmul(a, b)
    jax.block_until_ready(out)

  window()  # compile
  return best_rate(window, repeats, 1, calls * 2 * n**3)
