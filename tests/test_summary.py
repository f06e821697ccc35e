"""scripts/model_summary.py reproduces the VATT paper's parameter counts and DropToken FLOPs, and
All-in-one's parameter groups and the cost of its joint pass with and without token rolling."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import pytest

from tests.conftest import ROOT, load_config
from vatt_jax.models import build_model
from vatt_jax.models.summary import (
  ALLINONE_GROUPS,
  check_supported,
  count_allinone_parameters,
  summarize,
  summarize_allinone,
)

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


# ---- All-in-one ----------------------------------------------------------------------------------

# The slides' All-in-one-Ti / -S / -B (BERT's 30522-row word table, tied MLM decoder).
SLIDES_ALLINONE_PARAMS = {'tiny': 12e6, 'small': 33e6, 'base': 110e6}


def _abstract_params(model_cfg):
  model = build_model(model_cfg)
  return jax.eval_shape(lambda b: model.init(jax.random.key(0), b), model.example_batch(1))[
    'params'
  ]


def _leaves(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def allinone_runlocal():
  model_cfg = load_config(ROOT / 'configs' / 'allinone_base.py', 'runlocal').model
  return model_cfg, summarize_allinone(model_cfg)


def test_allinone_attention_flops_by_hand(allinone_runlocal):
  model_cfg, summary = allinone_runlocal
  # The premises of the hand computation: 2 blocks of width 64; 4 frames of 32² in 8² patches
  # (1 + 16 tokens a frame); 8 ids + [CLS] + [SEP] = 10 text tokens.
  assert (model_cfg.num_layers, model_cfg.width, model_cfg.video.num_frames) == (2, 64, 4)
  assert (model_cfg.video.frame_size, model_cfg.video.patch_size) == (32, 8)
  assert model_cfg.text.max_words == 8
  assert summary['shape']['frame_tokens'] == 17 and summary['shape']['text_tokens'] == 10
  joint = summary['joint']
  # roll / none: 4 sequences of 10 + 17 = 27 tokens; 2 blocks × 4 × (QKᵀ 2·27²·64 + AV 2·27²·64).
  for temporal in ('roll', 'none'):
    assert (joint[temporal]['sequences'], joint[temporal]['tokens_per_sequence']) == (4, 27)
    assert joint[temporal]['attention_gflops'] * 1e9 == pytest.approx(2 * 4 * 4 * 729 * 64)
    assert joint[temporal]['frame_attention_gflops'] * 1e9 == pytest.approx(2 * 4 * 4 * 289 * 64)
  # flatten: one sequence of 10 + 4 · 17 = 78 tokens (frame tokens alone: 68).
  assert (joint['flatten']['sequences'], joint['flatten']['tokens_per_sequence']) == (1, 78)
  assert joint['flatten']['attention_gflops'] * 1e9 == pytest.approx(2 * 4 * 78**2 * 64)
  assert joint['flatten']['frame_attention_gflops'] * 1e9 == pytest.approx(2 * 4 * 68**2 * 64)
  ratios = summary['ratios']
  assert ratios['attention']['roll/flatten'] == pytest.approx(4 * 27**2 / 78**2)
  assert ratios['frame_attention']['roll/flatten'] == pytest.approx(1 / 4)  # 1/T
  assert ratios['attention']['roll/none'] == ratios['frame_attention']['roll/none'] == 1.0


def test_allinone_xla_flops_roll_none_flatten(allinone_runlocal):
  _, summary = allinone_runlocal
  joint = summary['joint']
  # Rolling moves tokens between frames (slices and concatenations): XLA counts no FLOPs for it.
  assert joint['roll']['gflops'] == joint['none']['gflops'] > 0
  assert summary['ratios']['total']['roll/none'] == 1.0
  assert joint['flatten']['attention_gflops'] > joint['roll']['attention_gflops']
  for j in joint.values():  # the whole pass holds the attention (and the QKV, MLP, embeddings)
    assert j['gflops'] > j['attention_gflops']
  assert summary['ratios']['total']['roll/flatten'] == pytest.approx(
    joint['roll']['gflops'] / joint['flatten']['gflops']
  )


@pytest.mark.parametrize('arg', ['runlocal', 'runlocal,flatten', 'runlocal,untied'])
def test_allinone_parameter_groups_count_every_parameter(arg, allinone_runlocal):
  model_cfg = load_config(ROOT / 'configs' / 'allinone_base.py', arg).model
  params = _abstract_params(model_cfg)
  counts = count_allinone_parameters(params)
  assert counts['total'] == _leaves(params)
  groups = sum(counts[g] for g in ALLINONE_GROUPS)
  assert groups == counts['total'] == counts['without_vocab'] + counts['vocab']
  # By hand: width D = 64, vocabulary rows V + 3, unimodal space E = 16, 8² × 3 pixels a patch.
  d, rows, e = 64, model_cfg.text.vocab_size + 3, model_cfg.embed_dim
  assert e == 16
  assert counts['vocab'] == rows * d
  flatten = 4 * d if 'flatten' in arg else 0  # a temporal position per frame
  assert counts['embeddings'] == 10 * d + 2 * d + 2 * d + (8 * 8 * 3 * d + d) + d + 17 * d + flatten
  assert counts['pooler'] == d * d + d and counts['vtm'] == 2 * d + 2
  decoder = rows * d if 'untied' in arg else 0
  assert counts['mlm'] == (d * d + d) + 2 * d + rows + decoder
  assert counts['projections'] == 2 * (d * e + e)
  # 2 blocks (MLP width 128): two LayerNorms, Q, K, V and out with biases, fc1 and fc2; then the
  # final LayerNorm.
  m = model_cfg.mlp_dim
  assert m == 128
  block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)
  assert counts['blocks'] == 2 * block + 2 * d
  if arg == 'runlocal':  # the summary reports the same counts
    assert allinone_runlocal[1]['params'] == counts


def test_allinone_unknown_parameter_is_refused():
  with pytest.raises(ValueError, match="'new_table'"):
    count_allinone_parameters({'new_table': jax.ShapeDtypeStruct((2, 3), 'float32')})


@pytest.mark.parametrize('size', sorted(SLIDES_ALLINONE_PARAMS))
def test_allinone_parameters_near_the_slides(size):
  arg = None if size == 'base' else size  # allinone_base is All-in-one-B
  model_cfg = load_config(ROOT / 'configs' / 'allinone_base.py', arg).model
  assert model_cfg.size == size
  model_cfg.text.vocab_size = 30519  # + [CLS], [SEP], [MASK]: BERT's 30522 rows
  counts = count_allinone_parameters(_abstract_params(model_cfg))
  assert counts['vocab'] == 30522 * {'tiny': 192, 'small': 384, 'base': 768}[size]
  # Ours: 11.70 M, 34.12 M, 111.28 M (the slides round; their Small is 1 M under ours).
  assert counts['total'] == pytest.approx(SLIDES_ALLINONE_PARAMS[size], rel=0.04)


def test_summary_refuses_other_models():
  with pytest.raises(ValueError, match="'allinone' or 'vatt', got 'svitt'"):
    check_supported(load_config(ROOT / 'configs' / 'svitt_ego_demo.py', 'runlocal').model)
  result = subprocess.run(
      [sys.executable, 'scripts/model_summary.py', '--config=configs/svitt_ego_demo.py:runlocal'],
      cwd=ROOT, capture_output=True, text=True,
  )  # fmt: skip
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('error: the model summary supports')


def test_cli_allinone_json():
  out = subprocess.run(
      [sys.executable, 'scripts/model_summary.py', '--config=configs/allinone_base.py:runlocal',
       '--json'],
      cwd=ROOT, capture_output=True, text=True, check=True,
  ).stdout  # fmt: skip
  summary = json.loads(out.strip().splitlines()[-1])
  assert set(summary) == {
    'model', 'temporal', 'shape', 'params', 'joint', 'ratios', 'attention_formula'
  }  # fmt: skip
  assert summary['model'] == 'allinone' and summary['temporal'] == 'roll'
  assert set(summary['joint']) == {'roll', 'none', 'flatten'}
  for j in summary['joint'].values():
    assert set(j) == {
      'sequences', 'tokens_per_sequence', 'params', 'attention_gflops',
      'frame_attention_gflops', 'gflops',
    }  # fmt: skip
  assert set(summary['ratios']) == {'attention', 'frame_attention', 'total'}
  for ratio in summary['ratios'].values():
    assert set(ratio) == {'roll/flatten', 'roll/none'}
  assert set(summary['params']) == {*ALLINONE_GROUPS, 'heads', 'total', 'without_vocab'}
