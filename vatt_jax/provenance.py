"""What a training run's results depend on, recorded in its workdir and checked by whoever reads it.

When a run is accepted, `record(config, workdir)` writes

  WORKDIR/tokenizer.model   a copy of the tokenizer the run reads (sentencepiece model or word
                            vocabulary; its bytes)
  WORKDIR/provenance.json   the tokenizer's sha256 and origin, a fingerprint of every shard split the
                            run reads (training and config.evals), the package versions

so that nothing outside the workdir can change a result later without a word:

- Every command that loads a run (`run_config`, used by workdir.load / load_model: retrieval, the
  linear probe, report, export, embedding extraction, init_from) reads text with the run's copy of
  the tokenizer; if the file the config names has changed since, it says so and keeps the copy.
- A resumed run refuses a tokenizer whose bytes differ from the recorded ones, and warns when a
  split's shards differ from the recorded fingerprint (`check_resume`).
- Evaluation warns when the shards it reads differ from what the run recorded for that folder
  (`check_reads`).

A split's fingerprint (`split_fingerprint`) is cheap at any dataset size: per shard file its name,
size, the sha256 of its converter record (`*.done.json`: counts, options, the manifest's sha256)
and of its bytes — all of them for a split of up to 256 MiB, else 16 blocks of 64 KiB spread over
each file (a rewritten shard differs nearly everywhere after its first change); plus the
manifests' sha256 the converter recorded. The linear
probe's feature cache is keyed by the full content instead (`content_sha256`: it reads every byte
anyway). Workdirs written before this module have no record: their readers behave as before.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Iterable

import ml_collections
from absl import logging

from data_pipelines.options import TOKENIZER_FILENAME, file_sha256, tokenizer_path
from vatt_jax.cli import UserError

PROVENANCE_FILENAME = 'provenance.json'
_FULL_HASH_BYTES = 1 << 28  # a split up to 256 MiB is fingerprinted by its full content
_SAMPLE, _SAMPLES = 1 << 16, 16  # beyond: 16 blocks of 64 KiB spread over each file
_PACKAGES = (
  'jax',
  'jaxlib',
  'flax',
  'optax',
  'orbax-checkpoint',
  'tensorflow-cpu',
  'sentencepiece',
)


def split_files(data: ml_collections.ConfigDict, split: str) -> list[str]:
  """The record files a split of a shard data config reads (`{path}/{split}/*.tfrecord`); [] for
  other sources (synthetic, TFDS)."""
  if data.get('name') != 'shards' or not data.get('path'):
    return []
  return sorted(glob.glob(os.path.join(data.path, split, '*.tfrecord')))


def _done_json(shard: str) -> str:
  return shard[: -len('.tfrecord')] + '.done.json'


def split_fingerprint(data: ml_collections.ConfigDict, split: str) -> dict | None:
  """{'directory', 'files', 'bytes', 'manifest_sha256', 'sha256'} of a split's shards (None when
  the split is not read from shard files or has none)."""
  files = split_files(data, split)
  if not files:
    return None
  sizes = [os.path.getsize(path) for path in files]
  full = sum(sizes) <= _FULL_HASH_BYTES
  digest, manifests = hashlib.sha256(), set()
  for path, size in zip(files, sizes, strict=True):
    digest.update(f'{os.path.basename(path)}\0{size}\0'.encode())
    if full:
      digest.update(bytes.fromhex(file_sha256(path)))
    else:
      with open(path, 'rb') as f:
        for k in range(_SAMPLES):  # evenly spread blocks, the first and the last included
          f.seek((size - _SAMPLE) * k // (_SAMPLES - 1) if size > _SAMPLE else 0)
          digest.update(f.read(_SAMPLE))
    done = _done_json(path)
    if os.path.exists(done):
      with open(done, 'rb') as f:
        raw = f.read()
      digest.update(hashlib.sha256(raw).digest())
      try:
        manifest = json.loads(raw).get('manifest_sha256')
      except (ValueError, AttributeError):
        manifest = None
      if manifest:
        manifests.add(manifest)
  return {
    'directory': os.path.abspath(os.path.join(data.path, split)),
    'files': len(files),
    'bytes': sum(sizes),
    'method': 'full' if full else f'{_SAMPLES} blocks of {_SAMPLE} bytes per file',
    'manifest_sha256': sorted(manifests),
    'sha256': digest.hexdigest(),
  }


def content_sha256(paths: Iterable[str]) -> str:
  """One sha256 over the names and full bytes of files (the feature cache's key)."""
  digest = hashlib.sha256()
  for path in paths:
    digest.update(os.path.basename(path).encode() + b'\0')
    digest.update(bytes.fromhex(file_sha256(path)))
  return digest.hexdigest()


def _reads(
  config: ml_collections.ConfigDict, evals: Iterable[str] | None = None, train: bool = True
) -> list[tuple[ml_collections.ConfigDict, str]]:
  """(data config, split) of what a run reads: the train split and config.evals' (all, or those
  named in `evals`)."""
  reads = [(config.data, 'train')] if train else []
  for name, eval_cfg in (config.get('evals') or {}).items():
    if evals is not None and name not in evals:
      continue
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.update(eval_cfg.get('data', {}))
    for key in ('split', 'train_split', 'test_split'):
      if eval_cfg.get(key):
        reads.append((data, eval_cfg[key]))
  return reads


def describe(config: ml_collections.ConfigDict) -> dict:
  """The record of a run about to start (provenance.json's content; nothing is written)."""
  record: dict = {'tokenizer': None, 'splits': {}, 'versions': {}}
  path = tokenizer_path(config.data) if 'data' in config else ''
  if path and os.path.isfile(path):
    record['tokenizer'] = {'source': os.path.abspath(path), 'sha256': file_sha256(path)}
  if 'data' in config:
    for data, split in _reads(config):
      fingerprint = split_fingerprint(data, split)
      if fingerprint is not None:
        record['splits'][fingerprint['directory']] = fingerprint
  for package in _PACKAGES:
    try:
      record['versions'][package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return record


def read(workdir: str) -> dict | None:
  """A workdir's provenance.json (None: a workdir from before the record, or not a run)."""
  path = os.path.join(workdir, PROVENANCE_FILENAME)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is not readable ({e}); it records what the run depends on') from None


def record(config: ml_collections.ConfigDict, workdir: str, described: dict | None = None) -> dict:
  """Writes WORKDIR/tokenizer.model (a copy of the run's tokenizer) and WORKDIR/provenance.json;
  `described` is `describe(config)` when the caller computed it already. A resumed run keeps the
  record of its start (the copy and the tokenizer hash) and refreshes the split fingerprints."""
  described = describe(config) if described is None else described
  earlier = read(workdir)
  copy = os.path.join(workdir, TOKENIZER_FILENAME)
  if earlier is not None and earlier.get('tokenizer'):
    described['tokenizer'] = earlier['tokenizer']
  elif described['tokenizer'] is not None:
    tmp = copy + '.tmp'
    shutil.copyfile(described['tokenizer']['source'], tmp)
    if file_sha256(tmp) != described['tokenizer']['sha256']:
      os.remove(tmp)
      raise UserError(f'tokenizer {described["tokenizer"]["source"]} changed while it was copied')
    os.replace(tmp, copy)
  if described['tokenizer'] is not None:
    described['tokenizer']['copy'] = TOKENIZER_FILENAME
  path = os.path.join(workdir, PROVENANCE_FILENAME)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(described, f, indent=1, sort_keys=True)
  os.replace(tmp, path)
  return described


def check_resume(config: ml_collections.ConfigDict, workdir: str, described: dict) -> None:
  """Before a resume is accepted: refuses a tokenizer other than the one the run started with;
  warns about shards that differ from the record."""
  earlier = read(workdir)
  if earlier is None:
    return
  theirs, ours = earlier.get('tokenizer'), described.get('tokenizer')
  if theirs and ours and theirs['sha256'] != ours['sha256']:
    raise UserError(
      f'tokenizer {ours["source"]} is not the one this run started with (sha256 '
      f'{ours["sha256"][:12]}…, the run recorded {theirs["sha256"][:12]}…): restore it, or '
      f'resume with --config.data.tokenizer={os.path.join(workdir, TOKENIZER_FILENAME)} (the '
      "run's copy)"
    )
  _warn_splits(earlier, described['splits'].values(), f'resuming {workdir}')


def _warn_splits(earlier: dict, fingerprints: Iterable[dict], what: str) -> list[str]:
  changed = []
  recorded = earlier.get('splits', {})
  for now in fingerprints:
    then = recorded.get(now['directory'])
    if then is not None and then['sha256'] != now['sha256']:
      changed.append(now['directory'])
      logging.warning(
        '%s: the shards in %s differ from those the run recorded (%d files, %d bytes, manifest '
        '%s then; %d files, %d bytes, manifest %s now): results are not comparable with the '
        "run's own", what, now['directory'], then['files'], then['bytes'],
        _short(then['manifest_sha256']), now['files'], now['bytes'],
        _short(now['manifest_sha256']),
      )  # fmt: skip
  return changed


def _short(hashes: list[str]) -> str:
  return ','.join(h[:12] for h in hashes) or 'unknown'


def check_reads(workdir: str, data: ml_collections.ConfigDict, splits: Iterable[str]) -> list[str]:
  """Evaluation: warns for each split whose shards differ from the run's record of that folder;
  returns the folders that differ."""
  earlier = read(workdir)
  if earlier is None:
    return []
  fingerprints = [f for f in (split_fingerprint(data, s) for s in splits) if f is not None]
  return _warn_splits(earlier, fingerprints, f'evaluating {workdir}')


def check_evals(
  workdir: str, config: ml_collections.ConfigDict, names: Iterable[str] | None = None
) -> list[str]:
  """check_reads for the splits of config.evals (those named, or all)."""
  changed = []
  for data, split in _reads(config, names, train=False):
    changed += check_reads(workdir, data, [split])
  return changed


def run_config(workdir: str, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run's config as its readers must use it: text tokenized with the run's copy of the
  tokenizer (saying so when the file the config names has changed or gone since)."""
  earlier = read(workdir)
  if earlier is None or not earlier.get('tokenizer'):
    return config
  copy = os.path.join(workdir, earlier['tokenizer'].get('copy', TOKENIZER_FILENAME))
  if not os.path.isfile(copy):
    raise UserError(
      f"{copy} is missing: the run's copy of its tokenizer (see {PROVENANCE_FILENAME})"
    )
  if file_sha256(copy) != earlier['tokenizer']['sha256']:
    raise UserError(
      f'{copy} is not the tokenizer the run recorded (sha256 {earlier["tokenizer"]["sha256"][:12]}'
      '…): it was modified'
    )
  named = tokenizer_path(config.data)
  if named and os.path.abspath(named) != os.path.abspath(copy):
    if not os.path.isfile(named):
      logging.warning("tokenizer %s is gone; using the run's copy %s", named, copy)
    elif file_sha256(named) != earlier['tokenizer']['sha256']:
      logging.warning(
        "tokenizer %s has changed since the run trained with it; using the run's copy %s",
        named, copy,
      )  # fmt: skip
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.tokenizer = copy
  return config
