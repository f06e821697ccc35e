r"""Speed and memory benchmarks (vatt_jax/benchmarks/); each prints a table, or with --json one
object whose `ratio` is the figure its issue sets a goal on (raw numbers beside it). Ratios are
measured in one run, one machine.

  python scripts/benchmark.py --what input [--shards demo/shards] [--json]
  python scripts/benchmark.py --what train [--model video_base|mbs] [--batch_size B]
      [--dtype float32|bfloat16] [--steps N] [--repeats R] [--json]
  python scripts/benchmark.py --what gradsurgery [--model demo_ma|ma_medium_small|ma_medium]
      [--batch_size B] [--dtype float32|bfloat16] [--steps N] [--repeats R] [--json]
  python scripts/benchmark.py --what sinkhorn [--sinkhorn_bucket 4096x9] [--sinkhorn_dense 1024]
      [--sinkhorn_tol 1e-3] [--repeats R] [--json]
  python scripts/benchmark.py --what sparsity [--sparsity_preset base|tiny] [--sparsity_frames 8]
      [--sparsity_image 224] [--sparsity_batch 2] [--dtype float32|bfloat16]
      [--sparsity_remat none|dots|full] [--json]

Every train step is the trainer's own (build_program on a one-device mesh and a synthetic batch).

input: decoded + augmented clips/s (and frames/s per core) of the shard pipeline for the demo_tiny
config and for the paper's 32×224² config (on temporary 256-px shards made here); ratio = demo
input clips/s ÷ clips/s that the demo_tiny train step consumes (goal ≥ 3). Details:
vatt_jax/benchmarks/input.py.

train: step time and clips/s of the training step (forward, backward, optimizer update), its
FLOPs from XLA's cost analysis, the achieved FLOP/s and ratio = achieved FLOP/s ÷ FLOP/s of a
large square matmul in the same dtype, timed in the same run on the same device. --model
video_base (default): one VATT-Base video tower step, the paper's video-Base classifier as the
trainer trains it (32×224², 4×16×16 patches, DropToken 0.5, dropout on, softmax_xent, Adam; goal
on CPU: ratio ≥ 0.40 in float32); mbs: configs/vatt_mbs.py, three towers, NCE + MIL-NCE (goal
≥ 35 % MFU in bfloat16 on an H100; on a known GPU the MFU against its nominal dense bf16 peak is
printed too). Default batch: 2 on CPU; on an accelerator 16 (video_base 32). Timing: the fastest
of --repeats windows of --steps steps dispatched back to back. Details:
vatt_jax/benchmarks/train.py.

gradsurgery: the trainer's step built plain, with gradient realignment (GR) and with GR +
curriculum from one config on one batch; ratio = GR step time ÷ plain step time (goal ≤ 1.35),
flops_ratio the same for XLA FLOPs. --model demo_ma (default on CPU: configs/demo_tiny.py:ma,
batch 32, 10 windows of 5 steps, about 3 min on 2 cores), ma_medium_small (VATT-MA-Medium on
8×112² video and 48000 audio samples; batch 2 on CPU, slow: minutes per compile, ~15 GB),
ma_medium (default on an accelerator: paper size, batch 16). Details:
vatt_jax/benchmarks/gradsurgery.py.

sinkhorn: vatt_jax.ot.sinkhorn (tolerance form) against ott-jax's Sinkhorn at equal marginal
error on --sinkhorn_bucket prompt-bucket problems (ε = 0.1) and one --sinkhorn_dense-sided dense
problem (ε = 0.01); ott-jax runs with threshold --sinkhorn_tol and its achieved error sets our
tolerance. ratio = the larger of the two time ratios ours ÷ ott-jax (goal ≤ 0.5); also the
gradient's temporary memory, unrolled vs implicit. Details: vatt_jax/benchmarks/sinkhorn.py.

sparsity: SViTT's video encoder (issue 17), one training step (value_and_grad of the encoder's
outputs w.r.t. its parameters) compiled from abstract inputs, never run: XLA's temporary memory
and FLOPs of dense, edge only (block-sparse attention), node only (keep 0.6 after blocks 3, 6, 9)
and edge + node, as ratios to dense. Default: the Base preset at 8 frames × 224² (1568 patch
tokens), batch 2; ratio = edge + node ÷ dense temporary memory (goal ≤ 0.40). --sparsity_preset
tiny: the encoder's test preset at 8 × 64² (seconds). Details: vatt_jax/benchmarks/sparsity.py.

Run it without XLA_FLAGS (tests set --xla_backend_optimization_level=0, which would understate
the step); a warning is printed when XLA_FLAGS is set.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from vatt_jax import cli
from vatt_jax.benchmarks import gradsurgery, sinkhorn, sparsity, train
from vatt_jax.benchmarks import input as input_bench

_WHAT = flags.DEFINE_enum(
  'what', 'input', ['input', 'train', 'gradsurgery', 'sinkhorn', 'sparsity'], 'Which benchmark.'
)
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object.')
_SHARDS = flags.DEFINE_string('shards', 'demo/shards', 'Shards of the demo (make demo makes them).')
_BATCHES = flags.DEFINE_integer('batches', 40, 'Batches (or steps) per timed window.')
_REPEATS = flags.DEFINE_integer(
  'repeats', 0, 'Timed windows per figure, the fastest kept; 0: 3 (gradsurgery: by model, device).'
)
_MODEL = flags.DEFINE_enum(
  'model',
  None,
  [*train.MODELS, *gradsurgery.MODELS],
  f'train: {"|".join(train.MODELS)} (default video_base); gradsurgery: '
  f'{"|".join(gradsurgery.MODELS)} (default demo_ma on CPU, ma_medium on an accelerator).',
)
_BATCH_SIZE = flags.DEFINE_integer(
  'batch_size', 0, 'train, gradsurgery: clips per step; 0 picks by model and device.'
)
_DTYPE = flags.DEFINE_enum(
  'dtype', 'float32', ['float32', 'bfloat16'], 'train, gradsurgery, sparsity: compute dtype.'
)
_STEPS = flags.DEFINE_integer(
  'steps', 0, 'train, gradsurgery: steps per timed window; 0 picks by model and device.'
)
_SINKHORN_BUCKET = flags.DEFINE_string(
  'sinkhorn_bucket', '4096x9', 'sinkhorn: BATCHxSIZE bucket problems (SIZE×SIZE before the bucket).'
)
_SINKHORN_DENSE = flags.DEFINE_integer(
  'sinkhorn_dense', 1024, 'sinkhorn: side of the dense problem.'
)
_SINKHORN_TOL = flags.DEFINE_float('sinkhorn_tol', 1e-3, "sinkhorn: ott-jax's threshold τ.")
_SPARSITY_PRESET = flags.DEFINE_enum(
  'sparsity_preset', 'base', list(sparsity.PRESETS), 'sparsity: SViTT video encoder preset.'
)
_SPARSITY_FRAMES = flags.DEFINE_integer(
  'sparsity_frames', 0, "sparsity: frames per clip; 0: the preset's (8)."
)
_SPARSITY_IMAGE = flags.DEFINE_integer(
  'sparsity_image', 0, "sparsity: frame side in pixels; 0: the preset's (base 224, tiny 64)."
)
_SPARSITY_BATCH = flags.DEFINE_integer(
  'sparsity_batch', 0, f'sparsity: clips per step; 0: {sparsity.DEFAULT_BATCH_SIZE}.'
)
_SPARSITY_REMAT = flags.DEFINE_enum(
  'sparsity_remat', 'none', list(sparsity.REMATS), 'sparsity: rematerialisation of each block.'
)

_MODULES = {
  'input': input_bench,
  'train': train,
  'gradsurgery': gradsurgery,
  'sinkhorn': sinkhorn,
  'sparsity': sparsity,
}


def _run(what: str) -> dict:
  """The flags → the benchmark's run(); 0 (a flag's default) becomes None: picked by the module."""
  repeats = _REPEATS.value or None
  step_args = dict(
    batch_size=_BATCH_SIZE.value or None,
    dtype=_DTYPE.value,
    steps=_STEPS.value or None,
    repeats=repeats,
  )
  if what == 'input':
    return input_bench.run(_SHARDS.value, batches=_BATCHES.value, repeats=repeats)
  if what == 'train':
    return train.run(_MODEL.value or 'video_base', **step_args)
  if what == 'gradsurgery':
    return gradsurgery.run(_MODEL.value, **step_args)
  if what == 'sparsity':
    return sparsity.run(
      _SPARSITY_PRESET.value,
      num_frames=_SPARSITY_FRAMES.value or None,
      image_size=_SPARSITY_IMAGE.value or None,
      batch_size=_SPARSITY_BATCH.value or None,
      dtype=_DTYPE.value,
      remat=_SPARSITY_REMAT.value,
    )
  return sinkhorn.run(
    bucket=_SINKHORN_BUCKET.value,
    dense=_SINKHORN_DENSE.value,
    tol=_SINKHORN_TOL.value,
    repeats=repeats,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _WHAT.value != 'input' and os.environ.get('XLA_FLAGS'):
    print(f'warning: XLA_FLAGS={os.environ["XLA_FLAGS"]!r} is set; figures may not be representative',
          file=sys.stderr)  # fmt: skip
  models = {'train': train.MODELS, 'gradsurgery': gradsurgery.MODELS}.get(_WHAT.value, ())
  if _MODEL.value and _MODEL.value not in models:
    raise app.UsageError(f'--what {_WHAT.value} takes --model {"|".join(models) or "(none)"}')
  result = _run(_WHAT.value)
  print(json.dumps(result) if _JSON.value else _MODULES[_WHAT.value].table(result))


if __name__ == '__main__':
  cli.run(main)
