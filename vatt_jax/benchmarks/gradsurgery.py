"""The cost of cross-modal gradient realignment (GR) over the plain training step.

GR (config optimizer.harmonization.realign): per-loss gradients from one forward pass, then
Algorithm 1 (vatt_jax/optim/harmonization.py). The trainer's step (train.compile_step:
build_program on a one-device mesh) is built three times from one config on one synthetic batch:
plain (harmonization off), GR, and GR + curriculum (CL, for information); each gets its step time
(the variants' windows interleaved, so that a load on a shared machine hits them alike; the
fastest of each kept), XLA FLOPs, temporary memory and compile time.
ratio = GR step time ÷ plain step time (goal ≤ 1.35); flops_ratio the same for FLOPs.

Models:
  demo_ma (default on CPU): configs/demo_tiny.py:ma (one tiny modality-agnostic backbone), batch
    32; on CPU 10 windows of 5 steps (about 3 min on 2 cores, most of it compiling).
  ma_medium_small: configs/vatt_ma_medium.py on 8×112² video and 1 s (48000 samples) of audio,
    batch 2 on CPU, 2 windows of 1 step (on 2 shared cores: 2–5 min to compile each variant,
    10–35 s a step, about 15 GB of memory with the three states alive).
  ma_medium (default on an accelerator): the paper-size VATT-MA-Medium (32×224², 153600 samples),
    batch 16 (2 on CPU, very slow there).
On an accelerator 3 windows of 20 steps.
"""

from __future__ import annotations

import jax

from configs import demo_tiny, vatt_ma_medium
from vatt_jax.benchmarks import timing
from vatt_jax.benchmarks.train import compile_step, one_device_mesh, synthetic_batch

MODELS = ('demo_ma', 'ma_medium_small', 'ma_medium')
# config.optimizer.harmonization switches of each variant (the rest stays off).
VARIANTS = {
  'plain': {},
  'gr': {'realign': True},
  'gr_cl': {'realign': True, 'curriculum': True},
}


def model_config(name: str):
  """→ (config, what it is) for a gradsurgery --model."""

  if name == 'demo_ma':
    return demo_tiny.get_config('ma'), 'configs/demo_tiny.py:ma'
  if name not in MODELS:
    raise ValueError(f'gradsurgery model must be one of {MODELS}, got {name!r}')
  config = vatt_ma_medium.get_config()
  if name == 'ma_medium':
    return config, 'configs/vatt_ma_medium.py'
  v, a = config.model.video, config.model.audio
  v.num_frames, v.frame_size, a.num_samples = 8, 112, 48_000  # the data shapes follow
  return config, 'configs/vatt_ma_medium.py with 8×112² video and 48000 audio samples'


def run(
  model: str | None = None,
  *,
  batch_size: int | None = None,
  dtype: str = 'float32',
  steps: int | None = None,
  repeats: int | None = None,
) -> dict:
  """The gradsurgery benchmark (module docstring); None picks by model and device."""
  device = jax.devices()[0]
  on_cpu = device.platform == 'cpu'
  model = model or ('demo_ma' if on_cpu else 'ma_medium')
  base, what = model_config(model)
  small = model == 'demo_ma'
  batch_size = batch_size or (base.batch_size if small else (2 if on_cpu else 16))
  steps = steps or ((5 if small else 1) if on_cpu else 20)
  repeats = repeats or ((10 if small else 2) if on_cpu else 3)
  base.model.dtype = dtype
  mesh = one_device_mesh(base)
  batch = synthetic_batch(base, batch_size, mesh)
  results, windows = {}, {}
  for variant, switches in VARIANTS.items():
    config = base.copy_and_resolve_references()
    config.optimizer.harmonization.update(realign=False, curriculum=False, monitor=False)
    config.optimizer.harmonization.update(switches)
    step = compile_step(config, mesh, batch)
    with jax.set_mesh(mesh):
      windows[variant] = timing.step_window(step.step, step.state, batch, steps)
    results[variant] = {
      'flops_per_step': step.flops,
      'temp_bytes': step.temp_bytes,
      'compile_seconds': step.compile_seconds,
    }
  with jax.set_mesh(mesh):
    seconds = timing.interleaved_best(windows, repeats)
  for variant, r in results.items():
    r['step_seconds'] = seconds[variant] / steps
  plain, gr, gr_cl = results['plain'], results['gr'], results['gr_cl']
  return {
    'what': 'gradsurgery',
    'model': model,
    'config': what,
    'dtype': dtype,
    'batch_size': batch_size,
    'device': device.device_kind,
    'steps_per_window': steps,
    'windows': repeats,
    'variants': results,
    'ratio': gr['step_seconds'] / plain['step_seconds'],
    'flops_ratio': gr['flops_per_step'] / plain['flops_per_step'],
    'gr_cl_ratio': gr_cl['step_seconds'] / plain['step_seconds'],
    'gr_cl_flops_ratio': gr_cl['flops_per_step'] / plain['flops_per_step'],
    'goal': '<= 1.35',
  }


def table(r: dict) -> str:
  lines = [
    f'{r["model"]} ({r["config"]}), {r["dtype"]}, batch {r["batch_size"]}, on {r["device"]}',
    f'{"train step":<10}{"s/step":>10}{"GFLOP/step":>12}{"temp MB":>10}{"compile s":>11}'
    f'{"time ×":>8}{"FLOPs ×":>9}',
  ]
  plain = r['variants']['plain']
  for variant, s in r['variants'].items():
    lines.append(
      f'{variant:<10}{s["step_seconds"]:>10.4f}{s["flops_per_step"] / 1e9:>12.2f}'
      f'{s["temp_bytes"] / 1e6:>10.1f}{s["compile_seconds"]:>11.1f}'
      f'{s["step_seconds"] / plain["step_seconds"]:>8.3f}'
      f'{s["flops_per_step"] / plain["flops_per_step"]:>9.3f}'
    )
  lines.append(
    f'ratio (GR / plain step time): {r["ratio"]:.3f}  (goal {r["goal"]}); '
    f'FLOPs ratio {r["flops_ratio"]:.3f}'
  )
  return '\n'.join(lines)
