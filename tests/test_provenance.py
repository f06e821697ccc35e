"""What a run depends on is recorded in its workdir and checked by its readers (vatt_jax/provenance)."""

from __future__ import annotations

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from data_pipelines import text as text_ops
from tests.test_pipeline import _record, _write, tokenizer_path  # noqa: F401 (a fixture)
from vatt_jax import provenance
from vatt_jax.cli import UserError
from vatt_jax.export import check_output_dir


@pytest.fixture
def shards(tmp_path, tokenizer_path):  # noqa: F811
  root = tmp_path / 'shards'
  _write(root / 'train' / 'a.tfrecord', [_record(i) for i in range(3)])
  _write(root / 'test' / 'a.tfrecord', [_record(i, static=True) for i in range(3, 6)])
  shutil.copyfile(tokenizer_path, root / 'tokenizer.model')
  return root


def _config(shards):
  return ml_collections.ConfigDict(
    dict(
      data=dict(name='shards', path=str(shards), tokenizer=''),
      evals=dict(retrieval=dict(type='retrieval', split='test')),
    )
  )


def _other_tokenizer(path):
  words = ['zebra', 'quartz', 'violin', 'meadow', 'copper', 'lantern', 'harbor', 'orchid']
  prefix = os.path.join(os.path.dirname(path), 'other')
  made = text_ops.train_tokenizer([f'{a} {b}' for a in words for b in words] * 3, prefix, 48)
  os.replace(made, path)


def test_record_copies_the_tokenizer_and_fingerprints_every_split_read(shards, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = _config(shards)
  described = provenance.describe(config)
  assert os.listdir(workdir) == []  # describing writes nothing
  provenance.record(config, str(workdir), described)
  stored = json.loads((workdir / provenance.PROVENANCE_FILENAME).read_text())
  assert stored['tokenizer']['sha256'] == provenance.file_sha256(shards / 'tokenizer.model')
  assert (workdir / 'tokenizer.model').read_bytes() == (shards / 'tokenizer.model').read_bytes()
  assert set(stored['splits']) == {str(shards / 'train'), str(shards / 'test')}
  assert stored['splits'][str(shards / 'train')]['files'] == 1
  assert stored['versions']['jax']


def test_fingerprint_sees_a_replaced_shard_of_the_same_size(shards):
  data = _config(shards).data
  before = provenance.split_fingerprint(data, 'test')
  path = shards / 'test' / 'a.tfrecord'
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0xFF  # one byte in the middle of a small shard
  path.write_bytes(bytes(raw))
  after = provenance.split_fingerprint(data, 'test')
  assert after['bytes'] == before['bytes'] and after['sha256'] != before['sha256']
  assert provenance.split_fingerprint(data, 'nothing_here') is None
  assert (
    provenance.split_fingerprint(ml_collections.ConfigDict(dict(name='synthetic')), 'x') is None
  )


def test_readers_use_the_runs_tokenizer_after_the_file_is_overwritten(shards, tmp_path, caplog):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = _config(shards)
  provenance.record(config, str(workdir))
  recorded = provenance.file_sha256(shards / 'tokenizer.model')
  _other_tokenizer(str(shards / 'tokenizer.model'))  # scripts/train_tokenizer.py --overwrite
  with caplog.at_level('WARNING'):
    used = provenance.run_config(str(workdir), config)
  assert used.data.tokenizer == str(workdir / 'tokenizer.model')
  assert provenance.file_sha256(used.data.tokenizer) == recorded
  assert 'has changed since the run trained' in caplog.text
  assert config.data.tokenizer == ''  # the caller's config is left as it was
  # The copy itself edited: refused by name.
  (workdir / 'tokenizer.model').write_bytes(b'not the tokenizer')
  with pytest.raises(UserError, match='not the tokenizer the run recorded'):
    provenance.run_config(str(workdir), config)
  (workdir / 'tokenizer.model').unlink()
  with pytest.raises(UserError, match='tokenizer.model is missing'):
    provenance.run_config(str(workdir), config)


def test_a_workdir_without_a_record_reads_as_before(shards, tmp_path):
  config = _config(shards)
  assert provenance.run_config(str(tmp_path), config) is config
  assert provenance.check_reads(str(tmp_path), config.data, ['test']) == []


def test_resume_refuses_another_tokenizer_and_warns_about_other_shards(shards, tmp_path, caplog):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = _config(shards)
  provenance.record(config, str(workdir))
  provenance.check_resume(config, str(workdir), provenance.describe(config))  # unchanged: fine
  _write(shards / 'train' / 'a.tfrecord', [_record(i) for i in range(2)])  # a shard replaced
  with caplog.at_level('WARNING'):
    provenance.check_resume(config, str(workdir), provenance.describe(config))
  assert f'the shards in {shards / "train"} differ' in caplog.text
  _other_tokenizer(str(shards / 'tokenizer.model'))
  with pytest.raises(UserError, match='is not the one this run started with'):
    provenance.check_resume(config, str(workdir), provenance.describe(config))
  # A resumed run keeps the record of its start: the tokenizer's hash and copy.
  first = json.loads((workdir / provenance.PROVENANCE_FILENAME).read_text())['tokenizer']
  provenance.record(config, str(workdir))
  again = json.loads((workdir / provenance.PROVENANCE_FILENAME).read_text())['tokenizer']
  assert again == first


def test_evaluation_warns_about_shards_the_run_did_not_record(shards, tmp_path, caplog):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = _config(shards)
  provenance.record(config, str(workdir))
  assert provenance.check_evals(str(workdir), config) == []
  _write(shards / 'test' / 'a.tfrecord', [_record(i, static=True) for i in range(3, 5)])
  with caplog.at_level('WARNING'):
    changed = provenance.check_evals(str(workdir), config)
  assert changed == [str(shards / 'test')] and 'results are not comparable' in caplog.text


def test_content_key_changes_with_any_byte(shards):
  files = provenance.split_files(_config(shards).data, 'train')
  before = provenance.content_sha256(files)
  raw = bytearray(open(files[0], 'rb').read())
  raw[-1] ^= 1
  open(files[0], 'wb').write(bytes(raw))
  assert provenance.content_sha256(files) != before


def test_export_overwrite_refuses_a_directory_with_other_files(tmp_path):
  out = tmp_path / 'export'
  (out / 'bundle').mkdir(parents=True)
  (out / 'export.json').write_text('{}')
  check_output_dir(str(out), overwrite=True)  # an earlier export alone: replaceable
  (out / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError, match=r'also notes\.txt, which no export writes'):
    check_output_dir(str(out), overwrite=True)
  assert (out / 'notes.txt').read_text() == 'mine'


def test_linear_probe_cache_is_keyed_by_shard_content_and_weights(shards, tmp_path):
  from tests import toy_config
  from vatt_jax.evaluation.linear_probe import LinearProbeEvaluator
  from vatt_jax.models import build_model

  config = toy_config.get_config()
  config.data.path = str(shards)
  model = build_model(config.model)
  eval_cfg = ml_collections.ConfigDict(dict(type='linear_probe', modality='video'))
  probe = LinearProbeEvaluator(eval_cfg, config, model, cache_dir=str(tmp_path), cache_key='run 3')
  variables = {'params': {'w': np.zeros(3, np.float32)}}
  first = probe._cache_path('test', variables)
  assert probe._cache_path('test', variables) == first
  assert probe._cache_path('test', {'params': {'w': np.ones(3, np.float32)}}) != first
  _write(shards / 'test' / 'a.tfrecord', [_record(i, static=True) for i in range(4, 7)])
  assert probe._cache_path('test', variables) != first


def test_sampled_fingerprint_of_a_large_split_sees_a_rewritten_shard(shards, monkeypatch):
  monkeypatch.setattr(provenance, '_FULL_HASH_BYTES', 0)
  data = _config(shards).data
  before = provenance.split_fingerprint(data, 'train')
  assert before['method'].startswith('16 blocks')
  _write(shards / 'train' / 'a.tfrecord', [_record(i) for i in (0, 2, 1)])  # the same, reordered
  assert provenance.split_fingerprint(data, 'train')['sha256'] != before['sha256']


@pytest.mark.slow
def test_train_tokenizer_refuses_to_overwrite(shards, tmp_path):
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  before = (shards / 'tokenizer.model').read_bytes()
  command = [sys.executable, 'scripts/train_tokenizer.py', f'--input_dir={shards / "train"}',
             f'--output={shards / "tokenizer"}', '--vocab_size=40']  # fmt: skip
  refused = subprocess.run(command, cwd=root, capture_output=True, text=True)
  assert refused.returncode == 1, refused.stderr[-2000:]
  assert (
    refused.stderr.strip()
    .splitlines()[-1]
    .startswith(f'error: {shards / "tokenizer.model"} exists (a run may read it): pass --overwrite')
  )
  assert (shards / 'tokenizer.model').read_bytes() == before
  assert sorted(os.listdir(shards)) == ['test', 'tokenizer.model', 'train']
  done = subprocess.run([*command, '--overwrite'], cwd=root, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  assert (shards / 'tokenizer.model').read_bytes() != before
  assert sorted(os.listdir(shards)) == ['test', 'tokenizer.model', 'tokenizer.vocab', 'train']
