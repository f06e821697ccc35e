"""vatt_jax.benchmarks: the shared timing helpers on a fake clock, XLA's FLOPs of a matmul of known
size, and the train benchmark end to end at runlocal size through the trainer's build_program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from vatt_jax.benchmarks import timing, train


class FakeClock:
  """A clock that moves only when told: run functions advance it by their 'duration'."""

  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now

  def spend(self, seconds: float) -> None:
    self.now += seconds


def test_interleaved_best_keeps_each_fastest_and_interleaves():
  clock, calls = FakeClock(), []
  durations = {'a': iter([3.0, 1.0, 2.0]), 'b': iter([5.0, 6.0, 4.0])}

  def runner(name):
    def run():
      calls.append(name)
      clock.spend(next(durations[name]))

    return run

  best = timing.interleaved_best({'a': runner('a'), 'b': runner('b')}, 3, clock)
  assert best == {'a': 1.0, 'b': 4.0}
  assert calls == ['a', 'b'] * 3  # one of each per round
  assert timing.best_seconds(runner('a'), 0, clock) == float('inf')


def test_best_rate_is_the_fastest_window():
  clock, count = FakeClock(), [0]
  durations = iter([0.5, 0.5, 0.1, 0.1, 0.3, 0.3])  # windows of 2 calls: 1.0, 0.2, 0.6 s

  def run_one():
    count[0] += 1
    clock.spend(next(durations))

  rate = timing.best_rate(run_one, windows=3, per_window=2, items_per_call=4, clock=clock)
  assert count[0] == 6
  assert rate == pytest.approx(2 * 4 / 0.2)


def test_step_window_carries_the_state_and_warms_up():
  calls = []

  def step(state, batch):
    calls.append(int(state))
    return state + batch, {'loss': state}

  window = timing.step_window(step, jnp.int32(0), jnp.int32(1), steps=3, warmup=2)
  assert calls == [0, 1]  # the warm-up steps ran, the state carried on
  window()
  assert calls == [0, 1, 2, 3, 4]
  window(1)
  assert calls[-1] == 5


def test_xla_flops_of_a_matmul():
  m, k, n = 64, 32, 16
  compiled = (
    jax.jit(jnp.matmul)
    .lower(jnp.zeros((m, k), jnp.float32), jnp.zeros((k, n), jnp.float32))
    .compile()
  )
  assert timing.xla_flops(compiled) == 2 * m * n * k
  assert timing.temp_bytes(compiled) >= 0


def test_matmul_flops_per_s():
  assert timing.matmul_flops_per_s(jnp.float32, repeats=1, n=64, calls=2) > 0


def test_train_benchmark_runlocal():
  """The video_base benchmark at runlocal size: the trainer's classifier step, 1 step, 1 window."""
  r = train.run('video_base', batch_size=4, steps=1, repeats=1, runlocal=True, matmul_size=128)
  assert r['what'] == 'train' and r['model'] == 'video_base' and r['batch_size'] == 4
  assert 'runlocal' in r['config'] and r['steps_per_window'] == 1 and r['windows'] == 1
  assert r['step_seconds'] > 0 and r['compile_seconds'] > 0
  assert r['clips_per_s'] == pytest.approx(4 / r['step_seconds'])
  # XLA counts the whole step (element-wise work, head, loss, optimizer too): at least the tower's
  # matmuls (about 1.35× them at this size; a step that skipped the encoder blocks: about 0.7×).
  assert r['flops_per_step'] >= r['analytic_flops_per_step'] > 0
  assert r['achieved_flops_per_s'] == pytest.approx(r['flops_per_step'] / r['step_seconds'])
  assert r['ratio'] == r['achieved_flops_per_s'] / r['matmul_flops_per_s']
