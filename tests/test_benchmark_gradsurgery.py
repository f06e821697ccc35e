"""scripts/benchmark.py --what gradsurgery end to end on the demo_tiny:ma model at a small batch: it
builds the plain, GR and GR + CL train steps through the trainer's program and reports their times,
FLOPs and ratios."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow  # three train-step compiles in a subprocess (30–100 s)
def test_gradsurgery_json():
  args = ['scripts/benchmark.py', '--what=gradsurgery', '--model=demo_ma', '--batch_size=4',
          '--steps=1', '--repeats=1', '--json']  # fmt: skip
  out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['what'] == 'gradsurgery' and result['batch_size'] == 4
  assert set(result['variants']) == {'plain', 'gr', 'gr_cl'}
  for step in result['variants'].values():
    assert step['step_seconds'] > 0 and step['flops_per_step'] > 0
  plain, gr = result['variants']['plain'], result['variants']['gr']
  assert result['ratio'] == gr['step_seconds'] / plain['step_seconds']
  # Per-loss gradients cost an extra backward pass through the shared backbone, and more.
  assert result['flops_ratio'] == gr['flops_per_step'] / plain['flops_per_step'] > 1.0
