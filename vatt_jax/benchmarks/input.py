"""The input pipeline's speed against what the training step consumes.

Decoded + augmented clips/s (and frames/s per core) of the shard pipeline for the demo_tiny config
(on the demo's shards: `make demo-shards`) and for the paper's 32×224² config (on eight temporary
10 s records of 256×340 JPEG frames made here), each in the default deterministic mode and with
data.deterministic=False: per round every stream is built, warmed up (five batches), timed and
closed in turn (one source open at a time), and each figure is its fastest of `repeats` rounds.
The demo_tiny train step (train.compile_step: the trainer's build_program on a synthetic batch,
no input cost) is timed the same way.
ratio = demo input clips/s (deterministic, the default) ÷ clips/s that the demo_tiny train step
consumes (goal ≥ 3); ratio_nondeterministic the same for data.deterministic=False;
deterministic_cost = non-deterministic ÷ deterministic demo clips/s.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import jax
import numpy as np

from configs import common, demo_tiny
from data_pipelines import schema
from vatt_jax.benchmarks import timing
from vatt_jax.benchmarks.train import compile_step, one_device_mesh, synthetic_batch


def _rates(builders: dict, batches: int, batch_size: int, repeats: int) -> dict[str, float]:
  """{name: clips/s} of several streams (name → a function building its source): in each of
  `repeats` rounds every stream in turn is built, warmed up (five batches: autotuning settles),
  timed over `batches` batches and closed, so that no stream fills its buffers while another is
  timed; the fastest window of each."""
  best = dict.fromkeys(builders, math.inf)
  for _ in range(repeats):
    for name, build in builders.items():
      source = build()
      try:
        for _ in range(5):
          next(source)
        start = time.perf_counter()
        for _ in range(batches):
          next(source)
        best[name] = min(best[name], time.perf_counter() - start)
      finally:
        source.close()
  return {name: batches * batch_size / seconds for name, seconds in best.items()}


def _modes(data, batch_size: int) -> dict:
  """{'deterministic': …, 'nondeterministic': …}: builders of the same config's two modes."""
  from data_pipelines.pretrain import ShardSource

  def builder(deterministic: bool):
    def build():
      cfg = data.copy_and_resolve_references()
      cfg.deterministic = deterministic
      return ShardSource(cfg, 'train', batch_size=batch_size)

    return build

  return {'deterministic': builder(True), 'nondeterministic': builder(False)}


def _paper_shards(root: str) -> str:
  """Eight 10 s records of 256×340 JPEG frames at 10 fps with 48 kHz audio and captions under
  root/train, and a tokenizer of their captions → the tokenizer's path."""
  import tensorflow as tf

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
    [f'step {j} of recipe {i}' for i in range(8) for j in range(10)], f'{root}/tok', 64
  )
  return f'{root}/tok.model'


def train_rate(config, batches: int, repeats: int) -> float:
  """Clips/s the config's train step consumes on this machine (synthetic batches, no input cost):
  windows of max(10, batches // 2) steps after two warm-up steps."""

  mesh = one_device_mesh(config)
  batch = synthetic_batch(config, config.batch_size, mesh)
  step = compile_step(config, mesh, batch)
  steps = max(10, batches // 2)
  with jax.set_mesh(mesh):
    window = timing.step_window(step.step, step.state, batch, steps, warmup=2)
    return timing.best_rate(window, repeats, 1, steps * config.batch_size)


def run(shards: str = 'demo/shards', *, batches: int = 40, repeats: int | None = None) -> dict:
  """The input benchmark (module docstring): `batches` per timed window (a quarter of them for
  the paper config), the fastest of `repeats` (None: 3) windows."""
  repeats = repeats or 3
  cores = os.cpu_count() or 1
  demo = demo_tiny.get_config()
  demo.data.path = shards
  results = {}

  def record(name, rates, num_frames):
    for mode, clips in rates.items():
      results[name if mode == 'deterministic' else f'{name}_nondeterministic'] = {
        'deterministic': mode == 'deterministic',
        'clips_per_s': clips,
        'frames_per_s_per_core': clips * num_frames / cores,
      }

  rates = _rates(_modes(demo.data, demo.batch_size), batches, demo.batch_size, repeats)
  record('demo', rates, demo.data.num_frames)
  paper = common.pretraining_config(common.model_config())
  with tempfile.TemporaryDirectory() as root:
    paper.data.path = root
    paper.data.tokenizer = _paper_shards(root)
    paper.data.shuffle_buffer = 16
    rates = _rates(_modes(paper.data, 8), max(2, batches // 4), 8, repeats)
  record('paper_32x224', rates, paper.data.num_frames)
  train = train_rate(demo_tiny.get_config(), batches, repeats)
  return {
    'what': 'input',
    'cores': cores,
    'input': results,
    'train_step_clips_per_s': train,
    'ratio': results['demo']['clips_per_s'] / train,
    'ratio_nondeterministic': results['demo_nondeterministic']['clips_per_s'] / train,
    'deterministic_cost': (
      results['demo_nondeterministic']['clips_per_s'] / results['demo']['clips_per_s']
    ),
    'goal': '>= 3',
  }


def table(r: dict) -> str:
  lines = [
    f'{"pipeline":<30}{"deterministic":>14}{"clips/s":>10}{"frames/s/core":>16}   '
    f'({r["cores"]} cores)'
  ]
  for name, p in r['input'].items():
    lines.append(
      f'{name:<30}{str(p["deterministic"]):>14}{p["clips_per_s"]:>10.1f}'
      f'{p["frames_per_s_per_core"]:>16.1f}'
    )
  lines += [
    f'demo_tiny train step consumes {r["train_step_clips_per_s"]:.1f} clips/s',
    f'ratio (demo input, deterministic / train step): {r["ratio"]:.2f}  (goal {r["goal"]})',
    f'ratio with data.deterministic=False: {r["ratio_nondeterministic"]:.2f}  '
    f'(non-deterministic / deterministic input: {r["deterministic_cost"]:.2f})',
  ]
  return '\n'.join(lines)
