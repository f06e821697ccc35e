"""`make demo`'s chain end to end at a tiny size: media → shards → validator → tokenizer → train."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def _run(*args):
  out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, f'{args[0]} failed:\n{out.stderr[-3000:]}'
  return out.stdout


def test_media_to_trained_model(tmp_path):
  media, shards, run = tmp_path / 'media', tmp_path / 'shards', tmp_path / 'run'
  _run('scripts/make_demo_data.py', f'--output_dir={media}', '--num_train=6', '--num_val=2',
       '--num_test=2', '--workers=1')  # fmt: skip
  for split in ('train', 'val'):
    _run('scripts/prepare_data.py', f'--manifest={media}/{split}.jsonl',
         f'--output_dir={shards}/{split}', '--num_shards=2', '--short_side=64',
         '--sample_rate=8000', '--workers=1')  # fmt: skip
  report = json.loads(_run('scripts/validate_shards.py', f'--input_dir={shards}/train', '--json'))
  assert report['records'] == 6 and report['bad_records'] == 0
  _run('scripts/train_tokenizer.py', f'--input_dir={shards}/train', f'--output={shards}/tokenizer',
       '--vocab_size=1024')  # fmt: skip
  _run('scripts/train.py', '--config=configs/demo_tiny.py', f'--workdir={run}',
       f'--config.data.path={shards}', '--config.total_steps=3', '--config.log_steps=1',
       '--config.batch_size=4', '--config.data.shuffle_buffer=8',
       '--config.optimizer.warmup_steps=1')  # fmt: skip
  records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [1, 2, 3]
  assert all(r['nonfinite_steps'] == 0 for r in records)
