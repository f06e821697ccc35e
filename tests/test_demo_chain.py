"""`make demo`'s chain end to end at a tiny size: media → shards → validator → tokenizer → train →
report (linear probe, retrieval, plots), and the standalone evaluation scripts on the result."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT


def _run(*args):
  out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, f'{args[0]} failed:\n{out.stderr[-3000:]}'
  return out.stdout


@pytest.mark.slow  # the whole demo chain through the scripts (~2 min)
def test_media_to_trained_model(tmp_path):
  media, shards, run = tmp_path / 'media', tmp_path / 'shards', tmp_path / 'run'
  _run('scripts/make_demo_data.py', f'--output_dir={media}', '--num_train=6', '--num_val=2',
       '--num_test=2', '--workers=1')  # fmt: skip
  manifests = {'train': 'train', 'val': 'val', 'segments_train': 'retrieval_train',
               'segments_test': 'retrieval_test'}  # fmt: skip
  for split, manifest in manifests.items():
    _run('scripts/prepare_data.py', f'--manifest={media}/{manifest}.jsonl',
         f'--output_dir={shards}/{split}', '--num_shards=2', '--short_side=64',
         '--sample_rate=8000', '--workers=1')  # fmt: skip
  report = json.loads(_run('scripts/validate_shards.py', f'--input_dir={shards}/train', '--json'))
  assert report['records'] == 6 and report['bad_records'] == 0
  _run('scripts/train_tokenizer.py', f'--input_dir={shards}/train', f'--output={shards}/tokenizer',
       '--vocab_size=1024')  # fmt: skip
  _run('scripts/train.py', '--config=configs/demo_tiny.py', f'--workdir={run}',
       f'--config.data.path={shards}', '--config.total_steps=3', '--config.log_steps=1',
       '--config.batch_size=4', '--config.data.shuffle_buffer=8',
       '--config.optimizer.warmup_steps=1', '--config.evals.linear_probe.steps=20',
       '--config.evals.linear_probe_audio.steps=20', '--config.evals.linear_probe.num_clips=2',
       '--config.evals.linear_probe_audio.num_clips=2', '--config.evals.retrieval.num_clips=2')  # fmt: skip
  records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
  steps = [r for r in records if 'loss' in r]
  assert [r['step'] for r in steps] == [1, 2, 3]
  assert all(r['nonfinite_steps'] == 0 for r in steps)

  # The report: both models, every eval, chance levels, plots.
  out = _run('scripts/report.py', f'--workdir={run}')
  assert 'pretrained' in out and 'random init' in out
  results = json.loads((run / 'results.json').read_text())
  for model in ('pretrained', 'random_init'):
    assert 0 <= results[model]['linear_probe']['top1'] <= 100
    assert 0 <= results[model]['linear_probe_audio']['top5'] <= 100
    t2v = results[model]['retrieval']['t2v']
    assert 0 <= t2v['R1'] <= t2v['R5'] <= t2v['R10'] <= 100 and t2v['MedR'] >= 1
  assert results['chance']['linear_probe_top1'] == 10.0 and 0 < results['chance']['t2v_R5'] < 100
  for plot in ('tsne.png', 'similarities.png', 'training.png'):
    assert (run / 'plots' / plot).read_bytes()[:4] == b'\x89PNG'
  assert list((run / 'features').glob('*.npz'))  # the probe's cached features

  # The standalone scripts agree with the report (the same evaluators, cached features).
  _run('scripts/linear_probe.py', f'--workdir={run}', f'--data_path={shards}',
       '--train_split=segments_train', '--test_split=segments_test', '--steps=20',
       '--num_clips=2', '--num_classes=10', f'--output={tmp_path}/probe.json')  # fmt: skip
  probe = json.loads((tmp_path / 'probe.json').read_text())
  assert probe['top1'] == results['pretrained']['linear_probe']['top1']
  _run('scripts/retrieval.py', f'--workdir={run}', f'--data_path={shards}',
       '--split=segments_test', '--num_clips=2', f'--output={tmp_path}/retrieval.json')  # fmt: skip
  retrieval = json.loads((tmp_path / 'retrieval.json').read_text())
  assert retrieval['t2v'] == results['pretrained']['retrieval']['t2v']

  # Embeddings of raw files and text; a file that is not media is skipped with its reason.
  listing = tmp_path / 'files.txt'
  videos = sorted((media / 'media' / 'test').glob('*.mp4'))
  (tmp_path / 'broken.mp4').write_text('not a video')
  listing.write_text('\n'.join([str(v) for v in videos] + ['broken.mp4']) + '\n')
  (tmp_path / 'captions.txt').write_text('the digit 3 moves left\n\na five drifts up\n')
  emb_dir = tmp_path / 'embeddings'
  _run('scripts/extract_embeddings.py', f'--workdir={run}', f'--media={listing}',
       f'--text={tmp_path}/captions.txt', f'--output_dir={emb_dir}', '--num_clips=2')  # fmt: skip
  index = [json.loads(line) for line in (emb_dir / 'index.jsonl').read_text().splitlines()]
  assert [i['source'] for i in index if i['modality'] == 'video'] == [str(v) for v in videos]
  assert np.load(emb_dir / 'video_vt.npy').shape == (len(videos), 32)
  assert np.load(emb_dir / 'text_vt.npy').shape == (2, 32)
  skipped = (emb_dir / 'skipped.jsonl').read_text()
  assert 'broken.mp4' in skipped and 'empty line' in skipped
