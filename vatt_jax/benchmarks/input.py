"""The input pipeline's speed against what the training step consumes.

Decoded + augmented clips/s (and frames/s per core) of the shard pipeline for the demo_tiny config
(on the demo's shards: `make demo-shards`) and for the paper's 32×224² config (on eight temporary
10 s records of 256×340 JPEG frames made here); each the fastest of `repeats` windows after five
warm-up batches. The demo_tiny train step (train.compile_step: the trainer's build_program on a
synthetic batch, no input cost) is timed the same way.
ratio = demo input clips/s ÷ clips/s that the demo_tiny train step consumes (goal ≥ 3).
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np

from configs import common, demo_tiny
from data_pipelines import schema
from vatt_jax.benchmarks import timing
from vatt_jax.benchmarks.train import compile_step, one_device_mesh, synthetic_batch


def _rate(iterator, batches: int, batch_size: int, repeats: int) -> float:
  """Clips per second of the input stream, after five warm-up batches (autotuning settles)."""
  for _ in range(5):
    next(iterator)
  return timing.best_rate(lambda: next(iterator), repeats, batches, batch_size)


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
  from data_pipelines.pretrain import ShardSource

  repeats = repeats or 3
  cores = os.cpu_count() or 1
  demo = demo_tiny.get_config()
  demo.data.path = shards
  demo.data.deterministic = False
  results = {}
  source = ShardSource(demo.data, 'train', batch_size=demo.batch_size)
  try:
    clips = _rate(source, batches, demo.batch_size, repeats)
  finally:
    source.close()
  results['demo'] = {
    'clips_per_s': clips,
    'frames_per_s_per_core': clips * demo.data.num_frames / cores,
  }

  paper = common.pretraining_config(common.model_config())
  with tempfile.TemporaryDirectory() as root:
    paper.data.path = root
    paper.data.tokenizer = _paper_shards(root)
    paper.data.shuffle_buffer = 16
    source = ShardSource(paper.data, 'train', batch_size=8)
    try:
      clips = _rate(source, max(2, batches // 4), 8, repeats)
    finally:
      source.close()
  results['paper_32x224'] = {
    'clips_per_s': clips,
    'frames_per_s_per_core': clips * paper.data.num_frames / cores,
  }
  train = train_rate(demo_tiny.get_config(), batches, repeats)
  return {
    'what': 'input',
    'cores': cores,
    'input': results,
    'train_step_clips_per_s': train,
    'ratio': results['demo']['clips_per_s'] / train,
    'goal': '>= 3',
  }


def table(r: dict) -> str:
  lines = [f'{"pipeline":<16}{"clips/s":>10}{"frames/s/core":>16}   ({r["cores"]} cores)']
  for name, p in r['input'].items():
    lines.append(f'{name:<16}{p["clips_per_s"]:>10.1f}{p["frames_per_s_per_core"]:>16.1f}')
  lines += [
    f'demo_tiny train step consumes {r["train_step_clips_per_s"]:.1f} clips/s',
    f'ratio (demo input / train step): {r["ratio"]:.2f}  (goal {r["goal"]})',
  ]
  return '\n'.join(lines)
