r"""Speed and memory benchmarks; each prints a table, or with --json one object whose `ratio` is the
figure its issue sets a goal on (raw numbers beside it). Ratios are measured in one run, one machine.

  python scripts/benchmark.py --what input [--shards demo/shards] [--json]

input: decoded + augmented clips/s (and frames/s, per core) of the shard pipeline for the demo_tiny
config and for the paper's 32×224² config (on temporary 256-px shards made here), and
ratio = demo input clips/s ÷ clips/s that the demo_tiny train step consumes (goal ≥ 3).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_WHAT = flags.DEFINE_enum('what', 'input', ['input'], 'Which benchmark.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object.')
_SHARDS = flags.DEFINE_string('shards', 'demo/shards', 'Shards of the demo (make demo makes them).')
_BATCHES = flags.DEFINE_integer('batches', 40, 'Batches (or steps) per timed window.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed windows per figure; the fastest is kept.')


def _best_rate(run_one, windows: int, per_window: int, items_per_call: int) -> float:
  """Items per second of the fastest of `windows` windows of `per_window` calls (timeit's rule:
  on a shared machine the fastest window is the one least disturbed)."""
  best = 0.0
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(per_window):
      run_one()
    best = max(best, per_window * items_per_call / (time.perf_counter() - start))
  return best


def _rate(iterator, batches: int, batch_size: int) -> float:
  """Clips per second of the input stream, after five warm-up batches (autotuning settles)."""
  for _ in range(5):
    next(iterator)
  return _best_rate(lambda: next(iterator), _REPEATS.value, batches, batch_size)


def _paper_shards(root: str, tokenizer_dir: str) -> str:
  """Eight 10 s records of 256×340 JPEG frames at 10 fps with 48 kHz audio and captions."""
  import numpy as np
  import tensorflow as tf

  from data_pipelines import schema
  from data_pipelines import text as text_ops

  os.makedirs(os.path.join(root, 'train'), exist_ok=True)
  rng = np.random.default_rng(0)
  base = rng.integers(0, 255, (256, 340, 3), dtype=np.uint8)
  with tf.io.TFRecordWriter(os.path.join(root, 'train', 'bench.tfrecord')) as writer:
    for i in range(8):
      frames = [
        tf.io.encode_jpeg(np.roll(base, 3 * k + i, axis=1), quality=90).numpy() for k in range(100)
      ]
      wave = rng.uniform(-0.5, 0.5, 480_000).astype(np.float32)
      captions = [schema.Caption(j, j + 2.0, f'step {j} of recipe {i}') for j in range(0, 10, 2)]
      writer.write(schema.encode(schema.Record(
          f'bench{i}', 10.0, 10.0, frames, 256, 340, wave, 48_000, captions,
      )))  # fmt: skip
  text_ops.train_tokenizer(
    [f'step {j} of recipe {i}' for i in range(8) for j in range(10)], f'{tokenizer_dir}/tok', 64
  )
  return f'{tokenizer_dir}/tok.model'


def _train_rate(config) -> float:
  """Clips/s the demo_tiny train step consumes on this machine (synthetic batches, no input cost)."""
  import jax
  import jax.numpy as jnp

  import data_pipelines
  from vatt_jax.losses import build_loss
  from vatt_jax.models import build_model
  from vatt_jax.optim import build_optimizer
  from vatt_jax.train.state import init_train_state
  from vatt_jax.train.step import make_train_step

  config.data.name = 'synthetic'
  batch = next(data_pipelines.build(config.data, 'train', batch_size=config.batch_size))
  model = build_model(config.model)
  tx, schedule = build_optimizer(config.optimizer, config.total_steps)
  init = jax.jit(lambda r: init_train_state(model, tx, batch, r))(jax.random.key(0))
  step = jax.jit(make_train_step(model, build_loss(config.loss), tx, schedule), donate_argnums=0)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  holder, steps = [init], max(10, _BATCHES.value // 2)

  def window(n=steps):  # dispatched back to back as the trainer does; done when the last is
    for _ in range(n):
      holder[0], metrics = step(holder[0], batch)
    jax.block_until_ready(metrics)

  window(2)
  return _best_rate(window, _REPEATS.value, 1, steps * config.batch_size)


def bench_input() -> dict:
  from configs import common, demo_tiny
  from data_pipelines.pretrain import ShardSource

  cores = os.cpu_count() or 1
  demo = demo_tiny.get_config()
  demo.data.path = _SHARDS.value
  demo.data.deterministic = False
  results = {}
  source = ShardSource(demo.data, 'train', batch_size=demo.batch_size)
  clips = _rate(source, _BATCHES.value, demo.batch_size)
  source.close()
  results['demo'] = {
    'clips_per_s': clips,
    'frames_per_s_per_core': clips * demo.data.num_frames / cores,
  }

  paper = common.pretraining_config(common.model_config())
  with tempfile.TemporaryDirectory() as root:
    paper.data.path = root
    paper.data.tokenizer = _paper_shards(root, root)
    paper.data.shuffle_buffer = 16
    source = ShardSource(paper.data, 'train', batch_size=8)
    clips = _rate(source, max(2, _BATCHES.value // 4), 8)
    source.close()
  results['paper_32x224'] = {
      'clips_per_s': clips, 'frames_per_s_per_core': clips * paper.data.num_frames / cores,
  }  # fmt: skip
  train = _train_rate(demo_tiny.get_config())
  return {
    'what': 'input',
    'cores': cores,
    'input': results,
    'train_step_clips_per_s': train,
    'ratio': results['demo']['clips_per_s'] / train,
    'goal': '>= 3',
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  result = {'input': bench_input}[_WHAT.value]()
  if _JSON.value:
    print(json.dumps(result))
    return
  print(f'{"pipeline":<16}{"clips/s":>10}{"frames/s/core":>16}   ({result["cores"]} cores)')
  for name, r in result['input'].items():
    print(f'{name:<16}{r["clips_per_s"]:>10.1f}{r["frames_per_s_per_core"]:>16.1f}')
  print(f'demo_tiny train step consumes {result["train_step_clips_per_s"]:.1f} clips/s')
  print(f'ratio (demo input / train step): {result["ratio"]:.2f}  (goal {result["goal"]})')


if __name__ == '__main__':
  app.run(main)
