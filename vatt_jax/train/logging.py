"""What a run reports: clu metric writers (TensorBoard event files), metrics.jsonl, a console line.

Only process 0 writes files; every process logs its console line (absl) so each host's log shows
its own input wait.
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import logging
from clu import metric_writers

METRICS_FILENAME = 'metrics.jsonl'
# Gradient harmonization's per-step values (vatt_jax.optim.harmonization): every step goes to
# GRADIENTS_FILENAME; each record carries their means over its window.
GRADIENTS_FILENAME = 'gradients.jsonl'
PER_STEP = ('grad_cosine', 'grad_conflict', 'grad_skipped')


def quiet_libraries() -> None:
  """Keeps orbax's per-save INFO chatter (a dozen lines per checkpoint) out of the run's log."""
  import logging as std_logging

  def keep(record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname

  handler = logging.get_absl_handler()
  if keep not in handler.filters:
    handler.addFilter(keep)
  std_logging.getLogger('absl').addFilter(keep)


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
