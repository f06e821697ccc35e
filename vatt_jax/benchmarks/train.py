"""The training step's speed: step time, clips/s, XLA FLOPs and the achieved share of a matmul.

Every step here (and in the other benchmarks) is the trainer's: `build_program(config, mesh,
batch)` on a one-device mesh (`make_mesh(config.mesh, [device])`) and a synthetic batch of the
config's shapes (data.name='synthetic'; a classifier gets only its modality's fields and the
label, as its input pipeline gives them): the jitted, donating step (forward, backward, optimizer
update), lowered and compiled once for XLA's cost and memory analysis, then timed over windows
of --steps steps dispatched back to back; the fastest of the windows kept.

Models:
  video_base: the paper's video-Base classifier as the trainer trains it (configs/common.py
    pretraining_config + model_config + as_classifier(config, 'video', 400), softmax_xent, Adam):
    one VATT-Base video tower step on 32×224² clips in 4×16×16 patches, DropToken 0.5, dropout
    0.1, with a linear head. Goal on CPU: ratio ≥ 0.40 in float32.
  mbs: configs/vatt_mbs.py, the full VATT-MBS pretraining step (three towers, NCE + MIL-NCE).
    Goal: ≥ 35 % MFU in bfloat16 on an H100; on a known GPU the MFU against its nominal dense
    bf16 peak is reported too (labelled nominal).
ratio = achieved FLOP/s (XLA FLOPs per step × steps/s) ÷ FLOP/s of a large square matmul in the
same dtype, timed in the same run on the same device (timing.matmul_flops_per_s).
Defaults: batch 2 on CPU, on an accelerator 32 (video_base) or 16 (mbs); 2 steps a window on CPU,
20 on an accelerator; 3 windows.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp

import data_pipelines
from configs import common, vatt_mbs
from vatt_jax.benchmarks import timing
from vatt_jax.models import get_size
from vatt_jax.train import sharding
from vatt_jax.train.trainer import build_program

MODELS = ('video_base', 'mbs')
VIDEO_BASE_CLASSES = 400  # Kinetics-400's head
# Nominal dense bf16 peaks (datasheets), for an MFU reported beside the measured-matmul ratio.
NOMINAL_BF16_PEAK = (('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12))


def video_base_config(runlocal: bool = False):
  """The paper's video-Base classifier as the trainer trains it (runlocal: shrunk to tiny)."""

  config = common.pretraining_config(common.model_config())
  if runlocal:
    common.runlocal(config)
  common.as_classifier(config, 'video', VIDEO_BASE_CLASSES)
  config.loss = dict(name='softmax_xent')
  config.data.modalities = ('video',)
  return config


def model_config(name: str, runlocal: bool = False):
  """→ (config, what it is) for a train --model."""

  if name == 'video_base':
    what = 'configs/common.py video-Base classifier (as_classifier video, softmax_xent)'
    return video_base_config(runlocal), what
  if name == 'mbs':
    return vatt_mbs.get_config('runlocal' if runlocal else None), 'configs/vatt_mbs.py'
  raise ValueError(f'train model must be one of {MODELS}, got {name!r}')


def one_device_mesh(config):
  """The config's mesh over the first device only (the matmul reference runs on one device)."""

  return sharding.make_mesh(config.mesh, jax.devices()[:1])


def synthetic_batch(config, batch_size: int, mesh) -> dict:
  """A global batch of the config's shapes from the synthetic source, placed on the mesh; with
  config.data.modalities only those fields (and their masks and the label), as the shards give."""

  data = config.data.copy_and_resolve_references()
  data.name = 'synthetic'
  batch = next(data_pipelines.build(data, 'train', batch_size=batch_size))
  modalities = data.get('modalities')
  if modalities:
    batch = {
      k: v for k, v in batch.items() if k == 'label' or k.removesuffix('_mask') in modalities
    }
  return sharding.put_batch(batch, mesh)


@dataclasses.dataclass
class CompiledStep:
  """The trainer's step compiled for one batch, with a fresh state (the step donates it)."""

  step: Any  # compiled: (state, batch) → (state, metrics)
  state: Any
  flops: float  # XLA's cost analysis
  temp_bytes: int  # XLA's memory analysis
  compile_seconds: float  # build_program, lower and compile


def compile_step(config, mesh, batch: dict) -> CompiledStep:
  """build_program(config, mesh, batch) → its step compiled for `batch`, and an initial state."""

  with jax.set_mesh(mesh):
    start = time.perf_counter()
    program = build_program(config, mesh, batch)
    compiled = program.step.lower(program.abstract, batch).compile()
    seconds = time.perf_counter() - start
    state = program.init(jax.random.key(config.seed))
  return CompiledStep(
    compiled, state, timing.xla_flops(compiled), timing.temp_bytes(compiled), seconds
  )


def video_analytic_flops(video, batch_size: int) -> float:
  """Matmul FLOPs of a video tower's training step (config.model.video): 3× the forward (the patch
  projection 2×: no gradient w.r.t. the pixels); element-wise work, the head and the optimizer are
  left out."""

  size = get_size(video.size)
  d = size.width
  dims = (video.num_frames, video.frame_size, video.frame_size)
  patches = math.prod(-(-n // p) for n, p in zip(dims, video.patch_size, strict=True))
  patch_dim = math.prod(video.patch_size) * 3
  kept = max(1, int((1.0 - video.drop_token_rate) * patches + 1e-6)) + 1  # + the AGG token
  per_layer = kept * (8 * d * d + 4 * d * size.mlp_dim) + 4 * kept * kept * d
  return batch_size * (2 * 2 * patches * patch_dim * d + 3 * size.num_layers * per_layer)


def run(
  model: str = 'video_base',
  *,
  batch_size: int | None = None,
  dtype: str = 'float32',
  steps: int | None = None,
  repeats: int | None = None,
  runlocal: bool = False,
  matmul_size: int | None = None,
) -> dict:
  """The train benchmark (module docstring). None picks by model and device; runlocal shrinks the
  model to configs/common.py's runlocal towers (tests); matmul_size: the reference's side."""
  device = jax.devices()[0]
  on_cpu = device.platform == 'cpu'
  batch_size = batch_size or (2 if on_cpu else (32 if model == 'video_base' else 16))
  steps = steps or (2 if on_cpu else 20)
  repeats = repeats or 3
  config, what = model_config(model, runlocal)
  config.model.dtype = dtype
  mesh = one_device_mesh(config)
  batch = synthetic_batch(config, batch_size, mesh)
  step = compile_step(config, mesh, batch)
  with jax.set_mesh(mesh):
    window = timing.step_window(step.step, step.state, batch, steps)
    steps_per_s = timing.best_rate(window, repeats, 1, steps)
  matmul_dtype = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
  matmul = timing.matmul_flops_per_s(matmul_dtype, max(3, repeats), n=matmul_size)
  achieved = step.flops * steps_per_s
  result = {
    'what': 'train',
    'model': model,
    'config': what + (' (runlocal)' if runlocal else ''),
    'dtype': dtype,
    'batch_size': batch_size,
    'device': device.device_kind,
    'steps_per_window': steps,
    'windows': repeats,
    'step_seconds': 1.0 / steps_per_s,
    'clips_per_s': steps_per_s * batch_size,
    'flops_per_step': step.flops,
    'temp_bytes': step.temp_bytes,
    'compile_seconds': step.compile_seconds,
    'achieved_flops_per_s': achieved,
    'matmul_flops_per_s': matmul,
    'ratio': achieved / matmul,
    'goal': '>= 0.40' if model == 'video_base' else '>= 0.35 (MFU, H100 bf16)',
  }
  if model == 'video_base':
    result['analytic_flops_per_step'] = video_analytic_flops(config.model.video, batch_size)
  peak = next((p for k, p in NOMINAL_BF16_PEAK if k in device.device_kind), None)
  if peak and not on_cpu and dtype == 'bfloat16':
    result['nominal_peak_flops_per_s'] = peak
    result['nominal_mfu'] = achieved / peak
  return result


def table(r: dict) -> str:
  lines = [
    f'{r["model"]} train step ({r["config"]}), {r["dtype"]}, batch {r["batch_size"]}, '
    f'on {r["device"]}',
    f'{"step time":<28}{r["step_seconds"]:>12.3f} s',
    f'{"clips/s":<28}{r["clips_per_s"]:>12.2f}',
    f'{"FLOPs/step (XLA)":<28}{r["flops_per_step"] / 1e9:>12.1f} GFLOP',
  ]
  if 'analytic_flops_per_step' in r:
    lines.append(f'{"FLOPs/step (analytic)":<28}{r["analytic_flops_per_step"] / 1e9:>12.1f} GFLOP')
  lines += [
    f'{"temporary memory (XLA)":<28}{r["temp_bytes"] / 1e6:>12.1f} MB',
    f'{"compile":<28}{r["compile_seconds"]:>12.1f} s',
    f'{"achieved":<28}{r["achieved_flops_per_s"] / 1e9:>12.1f} GFLOP/s',
    f'{"large matmul, same device":<28}{r["matmul_flops_per_s"] / 1e9:>12.1f} GFLOP/s',
    f'ratio (achieved / matmul): {r["ratio"]:.3f}  (goal {r["goal"]})',
  ]
  if 'nominal_mfu' in r:
    lines.append(
      f'nominal MFU (vs datasheet {r["nominal_peak_flops_per_s"] / 1e12:.0f} TFLOP/s dense bf16): '
      f'{r["nominal_mfu"]:.3f}'
    )
  return '\n'.join(lines)
