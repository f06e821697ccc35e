"""The training loop: the side effects (I/O, checkpoints, signals, logging) around the pure step.

A run in a workdir that holds checkpoints resumes from the latest: parameters, optimizer state, step,
RNG and the input position, so the resumed run continues the same stream of batches and random
draws (bit-identical on CPU). SIGTERM or SIGINT (preemption, Ctrl-C) saves a checkpoint at the step
reached and returns cleanly; a second SIGINT interrupts at once.

Fine-tuning uses the same loop: `config.init_from` (a pretraining workdir; `init_from_step`, −1 for
its latest) fills a fresh run's tower from that checkpoint (position tables resized to the new
patch grid) while the head keeps its initialisation; a resumed run ignores it. `config.mixup.alpha`
> 0 mixes each training batch in the step. `config.evals` = {name: dict(type=…, log_steps=…, …)}
run every log_steps (0: only at the end) and at the last step; their metrics join that step's
record as '<name>/<metric>'.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

import data_pipelines
from vatt_jax import cli, provenance
from vatt_jax import workdir as workdir_lib
from vatt_jax.evaluation import build_evaluator
from vatt_jax.losses import loss_components
from vatt_jax.losses.classification import check_labels
from vatt_jax.models import Model, build_model, logical_specs
from vatt_jax.optim import build_optimizer, harmonized
from vatt_jax.train import checkpoint as ckpt
from vatt_jax.train import init_from, sharding
from vatt_jax.train.augment import build_augment
from vatt_jax.train.logging import PER_STEP, MetricLogger, quiet_libraries, quiet_orphaned_errors
from vatt_jax.train.state import init_train_state
from vatt_jax.train.step import make_train_step


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


class _StopSignal:
  """Remembers SIGTERM/SIGINT for the loop to act on between steps; a second SIGINT interrupts.

  With several processes, SIGTERM belongs to JAX's preemption notifier (set up by
  jax.distributed.initialize): every process learns of it at the same step through
  `reached_preemption_sync_point`; a Ctrl-C on one process is shared by an all-gather.
  """

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    signals = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals stay with whoever owns them
        pass
    return self

  def _handle(self, signum, frame):
    if self.received == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signum
    logging.warning('%s received: checkpointing at the end of this step', signal.strsignal(signum))

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self, step: int) -> bool:
    """True on every process once any process got a signal (all must save the same step)."""
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils

    preempted = multihost_utils.reached_preemption_sync_point(step)
    return preempted or bool(np.any(multihost_utils.process_allgather(np.array(local))))


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _parse_profile_steps(spec: str | None) -> tuple[int, int] | None:
  if not spec:
    return None
  try:
    first, last = (int(x) for x in spec.split(':'))
  except ValueError:
    raise ValueError(f'--profile_steps must be FIRST:LAST (e.g. 10:15), got {spec!r}') from None
  if not 0 < first <= last:
    raise ValueError(f'--profile_steps {spec!r}: need 0 < FIRST <= LAST')
  return first, last


@dataclasses.dataclass(frozen=True)
class Program:
  """What a run compiles, placed on a mesh.

  abstract: the TrainState as jax.ShapeDtypeStruct with shardings; init: rng → TrainState (jitted,
  placed); step: (state, global batch) → (state, metrics) (jitted, state donated); batch: the
  sharding of global batch arrays.
  """

  model: Model
  tx: optax.GradientTransformation
  schedule: Any
  shardings: Any
  abstract: Any
  init: Any
  step: Any
  batch: jax.sharding.NamedSharding


def build_program(config: ml_collections.ConfigDict, mesh, example_batch: dict) -> Program:
  """Model, loss and optimizer from the config; parameters and optimizer state sharded over `mesh`
  by config.mesh.rules. example_batch: any batch of the run (only shapes and dtypes are used)."""
  axis_rules = sharding.rules(config.mesh)
  model = build_model(config.model)
  objective = model.objective(config.loss)
  tx, schedule = build_optimizer(config.optimizer, config.total_steps)
  per_loss = loss_components(config.loss) if harmonized(config.optimizer) else None
  example = {k: jnp.zeros((2, *v.shape[1:]), v.dtype) for k, v in example_batch.items()}
  init = lambda rng: init_train_state(model, tx, example, rng)  # noqa: E731
  abstract = jax.eval_shape(init, jax.random.key(0))
  specs = logical_specs(model, example)
  shardings = sharding.state_shardings(
    abstract, specs['params'], specs.get('batch_stats', {}), tx, mesh, axis_rules
  )
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  batch = sharding.batch_sharding(mesh)
  step = jax.jit(
    make_train_step(
      objective,
      tx,
      schedule,
      axis_rules=axis_rules,
      augment=build_augment(config, model),
      per_loss=per_loss,
    ),
    in_shardings=(shardings, batch),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  return Program(
    model=model,
    tx=tx,
    schedule=schedule,
    shardings=shardings,
    abstract=abstract,
    init=jax.jit(init, out_shardings=shardings),
    step=step,
    batch=batch,
  )


def train(
  config: ml_collections.ConfigDict, workdir: str, *, profile_steps: str | None = None
) -> list[dict]:
  """Trains until config.total_steps (resuming from the workdir's latest checkpoint); returns the
  records logged by this call (also appended to metrics.jsonl).

  Nothing is written into the workdir before the run is accepted (`_accept`): the config is
  checked, a resumed run's model compared with the stored one, the first batch read, the program
  built, the state restored (or initialised) and the train step compiled first. A run refused or
  failing before that leaves the workdir as it was, and does not create a new one.
  """
  profile = _parse_profile_steps(profile_steps)
  quiet_libraries()
  check_config(config)
  check_workdir(workdir)
  with quiet_orphaned_errors():
    return _train(config, workdir, profile)


def _train(config: ml_collections.ConfigDict, workdir: str, profile) -> list[dict]:
  config_path = os.path.join(workdir, workdir_lib.CONFIG_FILENAME)
  checkpointer = ckpt.Checkpointer(  # reads only, until the run is accepted
    workdir,
    save_steps=config.checkpoint_steps,
    keep=config.keep_checkpoints,
    keep_period=config.get('keep_checkpoint_period', 0),
  )
  data = logger = error = None
  try:
    resume_step = checkpointer.latest_step()
    if resume_step is not None and os.path.exists(config_path):
      ckpt.check_resume_config(config, config_path)  # before anything is built or compiled
    # What the results depend on (the tokenizer, the shards): recorded at acceptance; a resumed
    # run must read the tokenizer it started with.
    described = provenance.describe(config) if jax.process_index() == 0 else None
    if resume_step is not None and described is not None:
      provenance.check_resume(config, workdir, described)

    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    logging.info('%s', sharding.describe(mesh))
    data = data_pipelines.build(
      config.data,
      'train',
      batch_size=config.batch_size,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    start_position = data.get_state()
    first = next(data)  # shapes only; the stream is rewound (or moved to the checkpoint) below
    local_batch = _batch_size(first)
    program = build_program(config, mesh, first)
    num_classes = program.model.num_classes
    if num_classes and 'label' in first:
      check_labels(first['label'], num_classes, 'the train input')
    abstract, shardings = program.abstract, program.shardings

    if resume_step is not None:
      state, data_state, resume_step = checkpointer.restore_latest(abstract)
      data.set_state(data_state or start_position)  # none stored: a converted checkpoint
      logging.info('resumed from %s/%d', checkpointer.directory, resume_step)
    else:
      state = program.init(jax.random.key(config.seed))
      if config.get('init_from'):
        state = init_from.init_from_pretrained(
          state, program, config.init_from, config.get('init_from_step', -1)
        )
      data.set_state(start_position)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    evaluators = {
      name: (build_evaluator(eval_cfg, config, program.model), _eval_every(name, eval_cfg))
      for name, eval_cfg in config.get('evals', {}).items()
    }

    global_batch = {
      k: jax.ShapeDtypeStruct((config.batch_size, *v.shape[1:]), v.dtype, sharding=program.batch)
      for k, v in first.items()
    }
    compile_start = time.perf_counter()
    with jax.set_mesh(mesh):
      train_step = program.step.lower(abstract, global_batch).compile()
    compile_seconds = time.perf_counter() - compile_start
    temp_bytes = getattr(train_step.memory_analysis(), 'temp_size_in_bytes', 0)
    per_device_state = sum(
      math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
      for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
    )
    logging.info(
      'model: %s parameters (%.1f MB); per device: state %.1f MB, activations and temporaries '
      '%.1f MB (XLA estimate); train step compiled in %.1f s',
      f'{num_params:,}', _bytes(state.params) / 1e6, per_device_state / 1e6,
      temp_bytes / 1e6, compile_seconds,
    )  # fmt: skip

    _accept(config, workdir, checkpointer, described)
    first_step = int(state.step)
    if first_step >= config.total_steps:
      logging.warning(
        'the workdir is at step %d, config total_steps=%d: nothing to train (raise '
        '--config.total_steps to go on)', first_step, config.total_steps,
      )  # fmt: skip
    logger = MetricLogger(workdir, total_steps=config.total_steps, batch_size=config.batch_size)
    logger.write_summary(
      first_step,
      {'compile_seconds': compile_seconds, 'state_mb_per_device': per_device_state / 1e6,
       'temp_mb_per_device': temp_bytes / 1e6},
    )  # fmt: skip
    max_nonfinite = config.get('max_nonfinite_steps', 0)
    step, pending = first_step, None
    with _StopSignal() as stop:
      while step < config.total_steps:
        if stop.agreed(step):
          checkpointer.save(step, state, data.get_state(), force=True)
          checkpointer.wait()
          logging.warning('stopped by signal at step %d; checkpoint saved', step)
          break
        wait_start = time.perf_counter()
        batch = next(data)
        logger.add_wait(time.perf_counter() - wait_start)
        if _batch_size(batch) != local_batch:
          raise ValueError(f'the input gave a batch of {_batch_size(batch)}, not {local_batch}')
        if num_classes and 'label' in batch:
          check_labels(batch['label'], num_classes, 'the train input')
        step += 1
        if profile and step == profile[0]:
          jax.profiler.start_trace(os.path.join(workdir, 'profile'))
        with jax.set_mesh(mesh):
          state, metrics = train_step(state, sharding.put_batch(batch, mesh))
        if profile and step == profile[1]:
          jax.block_until_ready(metrics)
          jax.profiler.stop_trace()
          logging.info('profile of steps %d–%d in %s/profile', *profile, workdir)
        logger.step_done()
        # The previous step's metrics are ready by now: reading them does not stall the device.
        if pending is not None:
          _check_nonfinite(*pending, max_nonfinite, checkpointer)
          per_step = {k: v for k, v in pending[1].items() if k in PER_STEP}
          if per_step:
            logger.add_step(pending[0], jax.device_get(per_step))
        pending = (step, metrics)
        last = step == config.total_steps
        due = [n for n, (_, every) in evaluators.items() if last or (every and step % every == 0)]
        if step % config.log_steps == 0 or last or due:
          record = jax.device_get(metrics)
          for name in due:  # the evaluations join this step's record
            record.update(_evaluate(name, evaluators[name][0], state))
          logger.write(step, record)
        checkpointer.save(step, state, data.get_state(), force=step == config.total_steps)
      if pending is not None:
        _check_nonfinite(*pending, max_nonfinite, checkpointer)
  except BaseException as e:
    error = e
    raise
  finally:
    _shut_down(error, checkpointer, logger, data)
  return logger.history


def check_config(config: ml_collections.ConfigDict) -> None:
  """The fields the loop itself reads, checked before any work (one line naming the field)."""
  sharding.check_batch_size(config.batch_size)
  for field in ('total_steps', 'log_steps'):
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise cli.UserError(f'config {field}={value!r} must be a positive integer')


def check_workdir(workdir: str) -> None:
  """Fails at once, naming it, when the workdir cannot be written: a file, or a directory (or for a
  new one, its nearest existing parent) this process may not write into. Creates nothing."""
  if not workdir:
    raise cli.UserError('--workdir is empty: name the directory for the run')
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = 'is a file' if existing == path else f'cannot be created: {existing} is a file'
    raise cli.UserError(f'--workdir {workdir} {where}; choose a directory')
  for directory in (existing, workdir_lib.checkpoint_dir(path)):
    if os.path.isdir(directory) and not os.access(directory, os.W_OK | os.X_OK):
      if existing != path:
        what = f'cannot be created: {directory} is not writable'
      elif directory == path:
        what = 'is not writable'
      else:
        what = f'holds a checkpoint directory that is not writable ({directory})'
      raise cli.UserError(
        f'--workdir {workdir} {what} (permission denied); choose a directory you can write to'
      )


def _accept(
  config: ml_collections.ConfigDict, workdir: str, checkpointer, described: dict | None
) -> None:
  """The run is accepted: everything that can refuse it has run (the config, a resumed run's model
  against the stored one, the first batch, the program, the restored or initialised state, the
  compiled step). Only from here on is anything written: the workdir (a new run's), config.json and
  the checkpoint directory (damaged steps moved aside, an interrupted save's leftovers removed),
  and what the results depend on (provenance.json and the tokenizer's copy, from `described`);
  metrics, TensorBoard events and checkpoints follow."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.save_config(config, workdir)
    provenance.record(config, workdir, described)
  checkpointer.open()


def _shut_down(error: BaseException | None, checkpointer, logger, data) -> None:
  """Closes what the run opened, all of it. While an error is on its way out, a failure here (an
  asynchronous save that failed too) is only logged: the first error is the one that ends the run."""
  closers = [('the checkpoints', checkpointer.close)]
  if logger is not None:
    closers.append(('the metric writers', logger.close))
  if data is not None:
    counts = getattr(data, 'counts', None)
    if counts:
      logging.info('input: %s', dict(counts))
    closers.append(('the input', data.close))
  first = None
  for name, close in closers:
    try:
      close()
    except Exception as e:
      if error is None and first is None:
        first = e
      elif type(e) is not type(error):
        logging.warning('closing %s failed too: %s', name, cli.describe(e))
  if first is not None:
    raise first


def _batch_size(batch: dict) -> int:
  """Examples in a batch (any field: video, audio or label, whatever the task reads)."""
  return len(next(iter(batch.values())))


def _eval_every(name: str, eval_cfg: ml_collections.ConfigDict) -> int:
  every = int(eval_cfg.get('log_steps', 0))
  if every < 0:
    raise ValueError(
      f'config evals.{name}.log_steps must be >= 0 (0: at the end only), got {every}'
    )
  return every


def _evaluate(name: str, evaluator, state) -> dict[str, float]:
  """Runs one evaluator on the current parameters → {'<name>/<metric>': value}."""
  start = time.perf_counter()
  result = evaluator.run({'params': state.params, 'batch_stats': state.batch_stats})
  record = {f'{name}/{k}': float(v) for k, v in result.items()}
  record[f'{name}/seconds'] = time.perf_counter() - start
  logging.info('eval %s: %s', name, '  '.join(f'{k}={v:.4g}' for k, v in sorted(record.items())))
  return record


def _check_nonfinite(step: int, metrics: dict, limit: int, checkpointer) -> None:
  run = int(jax.device_get(metrics['nonfinite_run']))
  if run:
    logging.warning(
      'step %d: non-finite loss or gradient, update not applied (%d in a row, %d in all)',
      step, run, int(jax.device_get(metrics['nonfinite_steps'])),
    )  # fmt: skip
  if limit and run >= limit:
    checkpointer.wait()
    last = checkpointer.latest_step()
    raise NonFiniteError(
      f'{run} consecutive steps up to {step} had a non-finite loss or gradient (config '
      f'max_nonfinite_steps={limit}); stopping. The last checkpoint, step {last}, holds the last '
      'good parameters (rejected steps change nothing).'
    )
