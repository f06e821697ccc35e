"""What a run reports: clu metric writers (TensorBoard event files), metrics.jsonl, a console line.

Only process 0 writes files; every process logs its console line (absl) so each host's log shows
its own input wait.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging as std_logging
import os
import sys
import threading
import time

import jax
from absl import logging
from clu import metric_writers

from vatt_jax import cli

METRICS_FILENAME = 'metrics.jsonl'
# Gradient harmonization's per-step values (vatt_jax.optim.harmonization): every step goes to
# GRADIENTS_FILENAME; each record carries their means over its window.
GRADIENTS_FILENAME = 'gradients.jsonl'
PER_STEP = ('grad_cosine', 'grad_conflict', 'grad_skipped')


_ORBAX = f'{os.sep}orbax{os.sep}'


def _through_orbax(record: std_logging.LogRecord) -> bool:
  """Whether the record's traceback passes through orbax's code."""
  tb = record.exc_info[2] if record.exc_info else None
  while tb is not None:
    if _ORBAX in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


def _keep(record: std_logging.LogRecord) -> bool:
  """orbax's INFO chatter goes; so do the tracebacks orbax's background threads and asyncio's
  never-awaited futures log for one failed checkpoint read or write (about a hundred for one full
  disk): the failure itself reaches the trainer as an exception and ends the run in one line.
  VATT_TRACEBACK=1 keeps those tracebacks."""
  if _ORBAX in record.pathname and record.levelno < std_logging.WARNING:
    return False
  if record.exc_info and _through_orbax(record) and not os.environ.get(cli.TRACEBACK_ENV):
    return False
  return True


def _orphaned(exc: BaseException | None, tb) -> bool:
  """An error nobody awaits any more: a coroutine or callback of an orbax read or write that was
  abandoned when another part of it failed (the failure itself reached the caller)."""
  if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
    return True
  while tb is not None:
    if _ORBAX in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


@contextlib.contextmanager
def quiet_orphaned_errors():
  """While a run lasts: the errors Python prints for orbax's abandoned coroutines and TensorStore's
  late callbacks (one per array of a damaged checkpoint: "Exception ignored in: <coroutine …>",
  "RuntimeError: Event loop is closed") are not printed; other errors are, as before.
  VATT_TRACEBACK=1 prints them all."""
  if os.environ.get(cli.TRACEBACK_ENV):
    yield
    return
  unraisable, excepthook, thread_hook = sys.unraisablehook, sys.excepthook, threading.excepthook

  def on_unraisable(info):
    if not _orphaned(info.exc_value, info.exc_traceback):
      unraisable(info)

  def on_except(kind, value, tb):
    if not _orphaned(value, tb):
      excepthook(kind, value, tb)

  def on_thread(args):
    if not _orphaned(args.exc_value, args.exc_traceback):
      thread_hook(args)

  sys.unraisablehook, sys.excepthook, threading.excepthook = on_unraisable, on_except, on_thread
  try:
    yield
  finally:
    gc.collect()  # abandoned coroutines are finalised (and reported) now, while still quiet
    sys.unraisablehook, sys.excepthook, threading.excepthook = unraisable, excepthook, thread_hook


def quiet_libraries() -> None:
  """Keeps orbax's per-save INFO chatter (a dozen lines per checkpoint) and the tracebacks of its
  failed background reads and writes (reported once, by the trainer) out of the run's log."""
  handler = logging.get_absl_handler()
  for target in (handler, std_logging.getLogger('absl'), std_logging.getLogger('asyncio')):
    if _keep not in target.filters:
      target.addFilter(_keep)


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'


class MetricLogger:
  """Collects per-step metrics and writes one record every `log_steps` steps.

  A record: step, the loss terms, learning rate, gradient norm, rejected-step counts, clips/s and
  the fraction of wall time spent waiting for input over the window since the last record, and the
  ETA of the run at that pace. With per-loss gradients, also the window's mean gradient cosine and
  its fractions of conflicting and skipped steps (from `add_step`, called every step).
  """

  def __init__(self, workdir: str, *, total_steps: int, batch_size: int):
    self.total_steps, self.batch_size = total_steps, batch_size
    self.is_writer = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILENAME)
    # TensorBoard event files from process 0 (the console line below is ours, not clu's).
    self.writer = (
      metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
      if self.is_writer
      else metric_writers.MultiWriter([])
    )
    self._window_start = time.perf_counter()
    self._window_steps, self._wait = 0, 0.0
    self.history: list[dict] = []
    self._per_step: dict[int, dict[str, float]] = {}
    self._flushed = -1  # per-step values up to this step are written
    self.gradients_path = os.path.join(workdir, GRADIENTS_FILENAME)

  def add_wait(self, seconds: float) -> None:
    self._wait += seconds

  def step_done(self) -> None:
    self._window_steps += 1

  def add_step(self, step: int, metrics: dict) -> None:
    """Keeps one step's PER_STEP values (host scalars; others are ignored) until the next record."""
    values = {k: float(metrics[k]) for k in PER_STEP if k in metrics}
    if values and step > self._flushed:
      self._per_step[step] = values

  def _flush_steps(self, step: int, record: dict) -> None:
    self.add_step(step, record)
    window = sorted(s for s in self._per_step if s <= step)
    if not window:
      return
    rows = [{'step': s, **self._per_step.pop(s)} for s in window]
    for key, name in (('grad_cosine', 'grad_cosine_mean'), ('grad_conflict', 'grad_conflict_fraction'),
                      ('grad_skipped', 'grad_skipped_fraction')):  # fmt: skip
      values = [r[key] for r in rows if key in r]
      if values:
        record[name] = sum(values) / len(values)
    self._flushed = step
    if self.is_writer:
      with open(self.gradients_path, 'a') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in rows))

  def write(self, step: int, metrics: dict) -> dict:
    """metrics: host scalars of the step just finished. Returns the record written."""
    elapsed = time.perf_counter() - self._window_start
    record = {'step': step, **{k: float(v) for k, v in metrics.items()}}
    self._flush_steps(step, record)
    record['clips_per_second'] = self._window_steps * self.batch_size / elapsed
    record['data_wait_fraction'] = self._wait / elapsed
    seconds_per_step = elapsed / max(self._window_steps, 1)
    eta = (self.total_steps - step) * seconds_per_step
    self.history.append(record)
    terms = ' '.join(f'{k}={record[k]:.4f}' for k in sorted(record) if k.startswith('loss'))
    logging.info(
      'step %d/%d  %s  lr=%.3g  grad_norm=%.3g  %.1f clips/s  data-wait %.0f%%  ETA %s',
      step, self.total_steps, terms, record['learning_rate'], record['grad_norm'],
      record['clips_per_second'], 100 * record['data_wait_fraction'], _duration(eta),
    )  # fmt: skip
    if self.is_writer:
      self.writer.write_scalars(step, {k: v for k, v in record.items() if k != 'step'})
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    self._window_start, self._window_steps, self._wait = time.perf_counter(), 0, 0.0
    return record

  def write_summary(self, step: int, values: dict) -> None:
    """One-off scalars (compile time, memory estimates) for TensorBoard."""
    if self.is_writer:
      self.writer.write_scalars(step, values)

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()
