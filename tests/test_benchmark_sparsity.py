"""scripts/benchmark.py --what sparsity on the SViTT video encoder's tiny preset: the four variants'
training steps compile from abstract inputs, their XLA memory and FLOPs come back as ratios to
dense, and the pruned token counts follow ceil(keep_rate · N) at each pruning block."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from vatt_jax.benchmarks import sparsity

VARIANTS = {'dense', 'edge', 'node', 'edge_node'}


def expected_counts(num_patches: int, depth: int, prune_after: tuple[int, ...]) -> list[int]:
  """Patch tokens entering each block and leaving the last, pruning ceil(0.6 · n) after the blocks
  of prune_after (integer arithmetic: ceil(6n / 10))."""
  counts = [num_patches]
  for i in range(depth):
    n = counts[-1]
    counts.append(-(-6 * n // 10) if i in prune_after else n)
  return counts


def check_result(result: dict, patch_tokens: int, batch_size: int) -> None:
  assert result['what'] == 'sparsity' and result['preset'] == 'tiny'
  assert result['patch_tokens'] == patch_tokens and result['batch_size'] == batch_size
  assert set(result['variants']) == VARIANTS
  variants = result['variants']
  dense = variants['dense']
  for step in variants.values():
    assert step['temp_bytes'] > 0 and step['flops'] > 0
    for key in ('memory_ratio', 'flops_ratio'):
      assert math.isfinite(step[key]) and step[key] > 0
    assert step['memory_ratio'] == step['temp_bytes'] / dense['temp_bytes']
    assert step['flops_ratio'] == step['flops'] / dense['flops']
  assert dense['memory_ratio'] == dense['flops_ratio'] == 1.0
  assert result['ratio'] == variants['edge_node']['temp_bytes'] / dense['temp_bytes']
  assert result['flops_ratio'] == variants['edge_node']['flops'] / dense['flops']
  assert result['goal'] == 0.40
  # Pruning removes tokens from every later block: less work, forward and backward.
  assert variants['node']['flops'] < dense['flops']
  assert variants['edge_node']['flops'] < variants['edge']['flops']

  depth, prune_after = result['depth'], tuple(result['token_drop_loc'])
  assert prune_after == (0, 1, 2)  # the tiny preset's
  unpruned = [patch_tokens] * (depth + 1)
  pruned = expected_counts(patch_tokens, depth, prune_after)
  for name, step in variants.items():
    counts = pruned if name in ('node', 'edge_node') else unpruned
    assert step['kept_patch_counts'] == counts, name
    assert step['output_tokens'] == 1 + counts[-1], name  # the CLS and the kept patches


@pytest.mark.slow
def test_tiny_preset_through_run():
  # 8 frames × 64² in 16×16 patches: 128 patch tokens in 8 blocks of 16, so that the block-sparse
  # pattern (w = 1, R = 3) attends to half the key blocks, not all of them.
  result = sparsity.run('tiny', batch_size=1)
  check_result(result, patch_tokens=128, batch_size=1)
  assert result['variants']['node']['kept_patch_counts'][:5] == [128, 77, 47, 29, 29]
  # Half the key blocks per query block: fewer attention FLOPs than dense.
  assert result['variants']['edge']['flops'] < result['variants']['dense']['flops']
  assert 'edge_node' in sparsity.table(result)


@pytest.mark.slow  # a subprocess that imports the benchmarks and compiles four steps (~15 s)
def test_script_json():
  args = ['scripts/benchmark.py', '--what=sparsity', '--sparsity_preset=tiny',
          '--sparsity_frames=4', '--sparsity_image=32', '--sparsity_batch=2', '--json']  # fmt: skip
  out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  check_result(result, patch_tokens=4 * 2 * 2, batch_size=2)
  assert (result['num_frames'], result['image_size']) == (4, 32)


def test_bad_arguments_name_the_culprit():
  with pytest.raises(ValueError, match='sparsity preset'):
    sparsity.run('huge')
  with pytest.raises(ValueError, match='sparsity variant'):
    sparsity.encoder_for('tiny', 'sparse', num_frames=8, image_size=64)
  with pytest.raises(ValueError, match='sparsity remat'):
    sparsity.encoder_for('tiny', 'dense', num_frames=8, image_size=64, remat='all')
