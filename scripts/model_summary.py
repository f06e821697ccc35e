r"""Prints parameters and forward GFLOPs of a config's model (nothing is allocated or run).

  python scripts/model_summary.py --config=configs/vatt_mbs.py
  python scripts/model_summary.py --config=configs/vatt_mbs.py --drop_token_rate=0.5 --json
  python scripts/model_summary.py --config=configs/vatt_mbs.py --sweep   # the paper's Table 5 rates
  python scripts/model_summary.py --config=configs/allinone_base.py [--json]
  python scripts/model_summary.py --config=configs/allinone_base.py:tiny \
      --config.model.text.vocab_size=30519   # the slides' setting: BERT's 30522-row word table

VATT (model.name 'vatt'): per backbone. GFLOPs are XLA's cost analysis of one clip's
training-shaped forward pass (2 FLOPs per multiply-add) with --drop_token_rate applied to video and
audio (dropout off). Parameters of a backbone are tokenizer + positions + AGG + transformer + final
norm; the text vocabulary table is reported apart (vocab_params) and the common-space heads too
(heads_params).

All-in-one (model.name 'allinone'): parameters by group (the word table apart, the blocks, the
heads) and the joint pass of one video–text pair at the config's frames, frame size and text
length for temporal 'roll', 'none' and 'flatten' (vatt_jax/models/summary.py:
summarize_allinone): attention FLOPs counted analytically (4·n²·d per block and sequence of n
tokens), total GFLOPs by XLA's cost analysis of AllInOne.joint in evaluation mode, and the ratios
roll/flatten and roll/none (also of the frame tokens' attention alone: 1/T for roll/flatten).
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from vatt_jax import cli
from vatt_jax.models.summary import check_supported, summarize, summarize_allinone

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:variant]).')
_DROP = flags.DEFINE_float('drop_token_rate', 0.0, 'DropToken rate applied for the FLOP count.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
_SWEEP = flags.DEFINE_bool('sweep', False, 'GFLOPs at DropToken 0 / 0.25 / 0.5 / 0.75 vs Table 5.')
flags.mark_flag_as_required('config')

# VATT paper, Table 5: VATT-MBS multimodal GFLOPs by DropToken rate.
PAPER_TABLE5_GFLOPS = {0.0: 784.8, 0.25: 574.2, 0.5: 375.4, 0.75: 188.1}


def _table(summary: dict) -> str:
  rows = [f'{"backbone":<16}{"params (M)":>12}{"GFLOPs":>10}']
  for name, b in summary['backbones'].items():
    rows.append(f'{name:<16}{b["params"] / 1e6:>12.2f}{b["gflops"]:>10.1f}')
  if 'shared_encoder' in summary:
    rows.append(f'{"shared encoder":<16}{summary["shared_encoder"]["params"] / 1e6:>12.2f}{"":>10}')
  rows.append(
    f'{"total":<16}{summary["total_params"] / 1e6:>12.2f}{summary["total_gflops"]:>10.1f}'
  )
  rows.append(f'{"text vocabulary":<16}{summary["vocab_params"] / 1e6:>12.2f}')
  rows.append(f'{"common space":<16}{summary["heads_params"] / 1e6:>12.2f}')
  return '\n'.join(rows)


def _sweep(model_cfg) -> dict:
  results = {rate: summarize(model_cfg, rate)['total_gflops'] for rate in PAPER_TABLE5_GFLOPS}
  return {
    str(rate): {
      'gflops': gflops,
      'ratio': gflops / results[0.0],
      'paper_gflops': PAPER_TABLE5_GFLOPS[rate],
      'paper_ratio': PAPER_TABLE5_GFLOPS[rate] / PAPER_TABLE5_GFLOPS[0.0],
    }
    for rate, gflops in results.items()
  }


def _allinone_table(summary: dict) -> str:
  shape, params = summary['shape'], summary['params']
  height, width = shape['frame_size']
  rows = [
    f'All-in-one: {shape["layers"]} blocks of width {shape["width"]} ({shape["heads"]} heads, MLP '
    f'{shape["mlp_dim"]}); {shape["frames"]} frames of {height}×{width} in '
    f'{shape["patch_size"]}² patches ({shape["frame_tokens"]} tokens each); {shape["text_tokens"]} '
    f'text tokens; temporal {summary["temporal"]!r}',
    '',
    f'{"parameters":<34}{"(M)":>10}',
  ]
  names = [
    ('vocab', 'word table (text vocabulary)'),
    ('embeddings', 'embeddings (positions, patches, …)'),
    ('blocks', 'transformer blocks + final norm'),
    ('heads', 'heads'),
    ('pooler', '  pooler'),
    ('vtm', '  VTM'),
    ('mlm', '  MLM'),
    ('projections', '  projections (unimodal space)'),
    ('total', 'total'),
    ('without_vocab', 'total without the word table'),
  ]
  rows += [f'{label:<34}{params[key] / 1e6:>10.3f}' for key, label in names]
  rows += [
    '',
    'joint pass per video–text pair',
    f'{"temporal":<10}{"sequences × tokens":>20}{"params (M)":>12}{"attention GFLOPs":>18}'
    f'{"frame-token attn.":>19}{"total GFLOPs":>14}',
  ]
  for temporal, j in summary['joint'].items():
    layout = f'{j["sequences"]} × {j["tokens_per_sequence"]}'
    rows.append(
      f'{temporal:<10}{layout:>20}{j["params"] / 1e6:>12.3f}{j["attention_gflops"]:>18.3f}'
      f'{j["frame_attention_gflops"]:>19.3f}{j["gflops"]:>14.3f}'
    )
  rows += ['', f'{"ratio":<16}{"attention":>12}{"frame-token attn.":>19}{"total":>10}']
  ratios = summary['ratios']
  for pair in ('roll/flatten', 'roll/none'):
    rows.append(
      f'{pair:<16}{ratios["attention"][pair]:>12.3f}{ratios["frame_attention"][pair]:>19.3f}'
      f'{ratios["total"][pair]:>10.3f}'
    )
  rows += [
    '',
    f'attention: {summary["attention_formula"]}; frame-token attn.: frame tokens with frame '
    'tokens only;',
    "total: XLA's cost analysis of AllInOne.joint (evaluation mode; embeddings, the frames' "
    'rolling and the pooler included).',
  ]
  return '\n'.join(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  model_cfg = _CONFIG.value.model
  if check_supported(model_cfg) == 'allinone':
    if _SWEEP.value or _DROP.value:
      raise ValueError(
        "--sweep and --drop_token_rate are VATT's DropToken (config model.name vatt); "
        'model allinone has no DropToken'
      )
    summary = summarize_allinone(model_cfg)
    print(json.dumps(summary) if _JSON.value else _allinone_table(summary))
    return
  if _SWEEP.value:
    sweep = _sweep(model_cfg)
    if _JSON.value:
      print(json.dumps(sweep))
      return
    print(f'{"DropToken":<10}{"GFLOPs":>10}{"ratio":>8}{"paper GFLOPs":>14}{"paper ratio":>13}')
    for rate, r in sweep.items():
      print(
        f'{float(rate):<10.2f}{r["gflops"]:>10.1f}{r["ratio"]:>8.3f}'
        f'{r["paper_gflops"]:>14.1f}{r["paper_ratio"]:>13.3f}'
      )
    return
  summary = summarize(model_cfg, _DROP.value)
  print(json.dumps(summary) if _JSON.value else _table(summary))


if __name__ == '__main__':
  cli.run(main)
