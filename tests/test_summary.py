"""scripts/model_summary.py reproduces the VATT paper's parameter counts and DropToken FLOPs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, load_config
from vatt_jax.models.summary import summarize

# Paper Table 7: video backbone parameters (tokenizer + positions + AGG + transformer + norm).
TABLE7_VIDEO_PARAMS = {'small': 20.9e6, 'base': 87.9e6, 'medium': 155.0e6, 'large': 306.1e6}
# Paper §4.1: BBS / MBS / LBS backbone totals, text vocabulary excluded.
PAPER_TOTALS = {'vatt_bbs': 197e6, 'vatt_mbs': 264e6, 'vatt_lbs': 415e6}
# Paper Table 5: VATT-MBS multimodal GFLOPs by DropToken rate.
TABLE5_GFLOPS = {0.0: 784.8, 0.25: 574.2, 0.5: 375.4, 0.75: 188.1}


@pytest.mark.parametrize('size', sorted(TABLE7_VIDEO_PARAMS))
def test_video_backbone_parameters_match_table7(size):
  config = load_config(ROOT / 'configs' / 'vatt_bbs.py')
  config.model.video.size = size
  params = summarize(config.model, 0.0)['backbones']['video']['params']
  assert params == pytest.approx(TABLE7_VIDEO_PARAMS[size], rel=0.025)


@pytest.mark.parametrize('name', sorted(PAPER_TOTALS))
def test_backbone_totals_match_paper(name):
  summary = summarize(load_config(ROOT / 'configs' / f'{name}.py').model, 0.0)
  assert summary['total_params'] == pytest.approx(PAPER_TOTALS[name], rel=0.03)
  assert summary['vocab_params'] == 2**16 * 512  # the text Small vocabulary, reported apart
  assert summary['total_params'] == sum(b['params'] for b in summary['backbones'].values())


@pytest.mark.slow
def test_droptoken_flops_follow_table5():
  model = load_config(ROOT / 'configs' / 'vatt_mbs.py').model
  gflops = {rate: summarize(model, rate)['total_gflops'] for rate in TABLE5_GFLOPS}
  for rate in (0.25, 0.5, 0.75):
    ours, paper = gflops[rate] / gflops[0.0], TABLE5_GFLOPS[rate] / TABLE5_GFLOPS[0.0]
    assert ours == pytest.approx(paper, abs=0.03), f'rate {rate}: {ours:.3f} vs paper {paper:.3f}'
  # And the absolute count is the paper's order of magnitude (XLA counts 2 FLOPs per MAC).
  assert 0.9 < gflops[0.0] / TABLE5_GFLOPS[0.0] < 1.2


@pytest.mark.slow
def test_modality_agnostic_counts_the_shared_encoder_once():
  summary = summarize(load_config(ROOT / 'configs' / 'vatt_ma_medium.py').model, 0.0)
  shared = summary['shared_encoder']['params']
  assert shared == pytest.approx(151.2e6, rel=0.01)  # 12 Medium layers + final norm
  assert summary['total_params'] == shared + sum(b['params'] for b in summary['backbones'].values())
  # The official VATT-MA-Medium (uvatt.py, measured by building the official code's model): its
  # trainable backbone without the word table (per-modality patch / word embedding, pre- and
  # post-projections, positions, AGG tokens, the shared encoder). The default's word table is
  # 1024 wide (trainable), so its text pre-projection is 1024 × 1024, not 300 × 1024; and it has
  # no LayerNorm on the three modalities' positions (the paper's; official: 3 × 2 × 1024).
  official = summarize(load_config(ROOT / 'configs' / 'vatt_ma_medium.py', 'official').model, 0.0)
  assert official['total_params'] == 161_283_072
  assert summary['total_params'] == 161_283_072 + (1024 - 300) * 1024 - 3 * 2 * 1024
  earlier = summarize(
    load_config(ROOT / 'configs' / 'vatt_ma_medium.py', 'shared_encoder_only').model, 0.0
  )
  assert earlier['total_params'] == pytest.approx(155.0e6, rel=0.025)  # the paper's Medium size


def test_cli_json_format():
  out = subprocess.run(
      [sys.executable, 'scripts/model_summary.py', '--config=configs/vatt_bbs.py:runlocal',
       '--drop_token_rate=0.5', '--json'],
      cwd=ROOT, capture_output=True, text=True, check=True,
  ).stdout  # fmt: skip
  summary = json.loads(out.strip().splitlines()[-1])
  assert set(summary['backbones']) == {'video', 'audio', 'text'}
  for backbone in summary['backbones'].values():
    assert backbone['params'] > 0 and backbone['gflops'] > 0
  for key in ('vocab_params', 'total_params', 'total_gflops'):
    assert summary[key] > 0
