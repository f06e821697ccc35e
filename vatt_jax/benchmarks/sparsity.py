"""SViTT's edge and node sparsity: XLA's temporary memory and FLOPs of a training step of the
sparse video encoder (issue 17), as ratios to the dense encoder, all measured in one run.

One training step here is the gradient of the encoder alone: jax.value_and_grad of
mean(representation²) + mean(tokens²) (both outputs, so that no part of the encoder is dead code)
w.r.t. the parameters, in training mode (deterministic=False: stochastic depth, and a fresh
block-sparse pattern from the 'sparse' RNG stream, as the trainer runs it), jitted. No optimizer
update, no text tower. Each variant is lowered from abstract inputs (jax.ShapeDtypeStruct
parameters, frames and key) and compiled, never run: the figures are XLA's memory analysis
(temp_size_in_bytes: the temporaries of the step, without its arguments and outputs) and cost
analysis (FLOPs) of the compiled program, so Base at 8 × 224² needs no activation memory.

Variants (models/svitt_video.py's SvittVideoEncoder, everything else the preset's):
  dense      attention='dense',        keep_rate=1.0
  edge       attention='block_sparse', keep_rate=1.0   (G, w, R of the preset: 56, 1, 3 for Base)
  node       attention='dense',        keep_rate=0.6 after the blocks of token_drop_loc
  edge_node  attention='block_sparse', keep_rate=0.6
ratio = edge_node temporary memory ÷ dense temporary memory (goal ≤ 0.40).

Presets: 'base' (BEiT-B/16, the issue's setting: 8 frames × 224² = 1568 patch tokens, pruned after
blocks 3, 6, 9 at 0.6: 1568 → 941 → 565 → 339); 'tiny' (the encoder's test preset at 8 frames ×
64² = 128 patch tokens, blocks of 16, pruned after blocks 0, 1, 2: 128 → 77 → 47 → 29; seconds to
compile). Default batch 2 clips per step (figures are per step, not per clip). XLA's CPU and GPU
backends assign temporaries differently: a figure is for the device it was measured on.

Measured (python scripts/benchmark.py --what sparsity; XLA CPU, 2 cores, float32, batch 2):

  variant     temp MiB   GFLOP   mem ×  FLOPs ×
  dense        11622.9    2175   1.000    1.000
  edge          6100.0    1701   0.525    0.782
  node          5769.4    1248   0.496    0.574
  edge_node     3614.2    1042   0.311    0.479   ratio 0.311 (goal ≤ 0.40 met); batch 1: 0.306,
                                                  bfloat16: 0.297, --sparsity_remat dots: 0.317

What the temporaries are (the residuals kept for the backward pass, jax's saved_residuals): dense,
9.0 GiB of them, is dominated by the [B, H, L, L] float32 softmax (5.3 GiB over 12 blocks); with
edge + node (3.5 GiB) the largest are the exact GELU's [B, L, 4D] inputs (1.05 GiB), the gathered
key and value blocks [B, H, nb, w + R, G, d] (0.54 GiB) and the block softmax and its masked logits
(0.47 GiB). bfloat16 saves little because logits, bias and softmax stay float32.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from vatt_jax.benchmarks import timing
from vatt_jax.models.svitt_video import SVITT_VIDEO_PRESETS, SvittVideoEncoder, svitt_video_encoder
from vatt_jax.models.transformer import REMAT_POLICIES

PRESETS = ('base', 'tiny')
REMATS = tuple(REMAT_POLICIES)  # 'none', 'dots', 'full'
# (num_frames, image_size) of each preset here: Base at the 8 × 224².
PRESET_CLIP = {'base': (8, 224), 'tiny': (8, 64)}
KEEP_RATE = 0.6  # the 8-frame setting
DEFAULT_BATCH_SIZE = 2
GOAL = 0.40
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# SvittVideoEncoder attributes of each variant (the rest from the preset).
VARIANTS = {
  'dense': dict(attention='dense', keep_rate=1.0),
  'edge': dict(attention='block_sparse', keep_rate=1.0),
  'node': dict(attention='dense', keep_rate=KEEP_RATE),
  'edge_node': dict(attention='block_sparse', keep_rate=KEEP_RATE),
}


def encoder_for(
  preset: str,
  variant: str,
  *,
  num_frames: int,
  image_size: int,
  dtype: str = 'float32',
  remat: str = 'none',
  keep_rate: float = KEEP_RATE,
) -> SvittVideoEncoder:
  """The SvittVideoEncoder of one variant (VARIANTS; node sparsity at `keep_rate`)."""
  if preset not in PRESETS:
    raise ValueError(f'sparsity preset must be one of {PRESETS}, got {preset!r}')
  if variant not in VARIANTS:
    raise ValueError(f'sparsity variant must be one of {tuple(VARIANTS)}, got {variant!r}')
  if dtype not in DTYPES:
    raise ValueError(f'sparsity dtype must be one of {tuple(DTYPES)}, got {dtype!r}')
  if remat not in REMAT_POLICIES:
    raise ValueError(f'sparsity remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}')
  attrs = dict(VARIANTS[variant])
  if attrs['keep_rate'] < 1.0:
    attrs['keep_rate'] = keep_rate
  return svitt_video_encoder(
    preset,
    num_frames=num_frames,
    image_size=image_size,
    dtype=DTYPES[dtype],
    remat=remat,
    **attrs,
  )


def train_step_cost(encoder: SvittVideoEncoder, batch_size: int) -> dict:
  """XLA's cost of one training step of `encoder` on [batch_size, T, H, W, 3] frames (module
  docstring), compiled from abstract inputs only. → {'temp_bytes', 'flops', 'compile_seconds',
  'output_tokens' (1 + K of the output tokens), 'kept_patch_counts', 'num_parameters'}."""
  nt, (height, width) = encoder.num_frames, _pair(encoder.image_size)
  frames = jax.ShapeDtypeStruct((batch_size, nt, height, width, 3), jnp.float32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  params = jax.eval_shape(lambda k, f: nn.unbox(encoder.init(k, f)['params']), key, frames)

  def loss(params, frames, rng):
    dropout_rng, sparse_rng = jax.random.split(rng)
    out = encoder.apply(
      {'params': params},
      frames,
      deterministic=False,
      rngs={'dropout': dropout_rng, 'sparse': sparse_rng},
    )
    f32 = jnp.float32
    return jnp.mean(jnp.square(out.representation.astype(f32))) + jnp.mean(
      jnp.square(out.tokens.astype(f32))
    )

  out_shape = jax.eval_shape(lambda p, f: encoder.apply({'params': p}, f), params, frames)
  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, frames, key).compile()
  seconds = time.perf_counter() - start
  return {
    'temp_bytes': timing.temp_bytes(compiled),
    'flops': timing.xla_flops(compiled),
    'compile_seconds': seconds,
    'output_tokens': int(out_shape.tokens.shape[1]),
    'kept_patch_counts': list(encoder.kept_patch_counts()),
    'num_parameters': sum(x.size for x in jax.tree.leaves(params)),
  }


def _pair(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def run(
  preset: str = 'base',
  *,
  num_frames: int | None = None,
  image_size: int | None = None,
  batch_size: int | None = None,
  dtype: str = 'float32',
  remat: str = 'none',
  keep_rate: float = KEEP_RATE,
) -> dict:
  """The sparsity benchmark (module docstring); None picks the preset's clip (PRESET_CLIP) and
  batch 2."""
  if preset not in PRESETS:
    raise ValueError(f'sparsity preset must be one of {PRESETS}, got {preset!r}')
  default_frames, default_image = PRESET_CLIP[preset]
  num_frames = num_frames or default_frames
  image_size = image_size or default_image
  batch_size = batch_size or DEFAULT_BATCH_SIZE
  results = {}
  for variant in VARIANTS:
    encoder = encoder_for(
      preset,
      variant,
      num_frames=num_frames,
      image_size=image_size,
      dtype=dtype,
      remat=remat,
      keep_rate=keep_rate,
    )
    results[variant] = {**VARIANTS[variant], 'keep_rate': encoder.keep_rate}
    results[variant].update(train_step_cost(encoder, batch_size))
  dense = results['dense']
  for r in results.values():
    r['memory_ratio'] = r['temp_bytes'] / dense['temp_bytes']
    r['flops_ratio'] = r['flops'] / dense['flops']
  sizes = SVITT_VIDEO_PRESETS[preset]
  sparse = encoder_for(preset, 'edge_node', num_frames=num_frames, image_size=image_size)
  return {
    'what': 'sparsity',
    'preset': preset,
    'num_frames': num_frames,
    'image_size': image_size,
    'patch_tokens': sparse.kept_patch_counts()[0],
    'width': sizes['width'],
    'depth': sizes['depth'],
    'block_size': sparse.block_size,
    'local_blocks': sparse.local_blocks,
    'random_blocks': sparse.random_blocks,
    'token_drop_loc': list(sparse.token_drop_loc),
    'keep_rate': keep_rate,
    'batch_size': batch_size,
    'dtype': dtype,
    'remat': remat,
    'device': jax.devices()[0].device_kind,
    'variants': results,
    'ratio': results['edge_node']['memory_ratio'],
    'flops_ratio': results['edge_node']['flops_ratio'],
    'goal': GOAL,
  }


def _gflop(flops: float) -> str:
  gflop = flops / 1e9
  return f'{gflop:.1f}' if gflop >= 1 else f'{gflop:.4f}'


def table(r: dict) -> str:
  lines = [
    f'SViTT video encoder {r["preset"]} training step (value_and_grad), {r["num_frames"]} frames '
    f'× {r["image_size"]}² = {r["patch_tokens"]} patch tokens, batch {r["batch_size"]}, '
    f'{r["dtype"]}, remat {r["remat"]}, on {r["device"]}',
    f'edge: block-sparse G={r["block_size"]}, w={r["local_blocks"]}, R={r["random_blocks"]}; '
    f'node: keep {r["keep_rate"]} after blocks {tuple(r["token_drop_loc"])}',
    f'{"variant":<10}{"temp MiB":>10}{"GFLOP":>10}{"mem ×":>8}{"FLOPs ×":>9}{"compile s":>11}'
    '  patch tokens per block',
  ]
  for variant, s in r['variants'].items():
    counts = s['kept_patch_counts']
    # The counts change only at pruning layers: show the distinct steps.
    steps = [counts[0]] + [b for a, b in zip(counts, counts[1:], strict=False) if b != a]
    lines.append(
      f'{variant:<10}{s["temp_bytes"] / 2**20:>10.1f}{_gflop(s["flops"]):>10}'
      f'{s["memory_ratio"]:>8.3f}{s["flops_ratio"]:>9.3f}{s["compile_seconds"]:>11.1f}'
      f'  {" → ".join(map(str, steps))}'
    )
  verdict = 'met' if r['ratio'] <= r['goal'] else 'missed'
  if (r['preset'], r['num_frames'], r['image_size']) != ('base', *PRESET_CLIP['base']):
    verdict += '; the goal is set for base at 8 × 224²'
  lines.append(
    f'ratio (edge+node / dense temporary memory): {r["ratio"]:.3f}  (goal ≤ {r["goal"]:.2f}: '
    f'{verdict}); FLOPs ratio {r["flops_ratio"]:.3f}'
  )
  return '\n'.join(lines)
