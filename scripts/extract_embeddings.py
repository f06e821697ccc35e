r"""Embeddings of your own media and text with a trained model: .npy arrays plus an index.

  python scripts/extract_embeddings.py --workdir=RUN --media=videos.txt --output_dir=OUT
  python scripts/extract_embeddings.py --workdir=RUN --media=clips.jsonl --modalities=audio ...
  python scripts/extract_embeddings.py --workdir=RUN --text=captions.txt --output_dir=OUT

--media: a text file with one media path per line (relative to the file), or a manifest
(.jsonl / .csv, docs/DATA.md: windows with start/end are honoured). Every file goes through exactly
the training preprocessing: the converter (scripts/prepare_data.py: frames at the run's data.fps,
audio resampled to data.sample_rate, --short_side) and the pipeline's evaluation mode
(--num_clips uniformly spaced clips, central crops, averaged). Video files without audio give
video embeddings only; audio-only files are skipped (the pipeline reads clips of frames with their
audio). --text: one caption per line, tokenized with
the run's tokenizer (a sentencepiece model or a word vocabulary).

Writes OUT/{modality}_{output}.npy ([N, D] float32; outputs: input, agg and the common-space va
and/or vt, see vatt_jax/evaluation/embeddings.py) and OUT/index.jsonl, one line per row of each
array: {"modality", "row", "source"}; files that could not be used are listed in
OUT/skipped.jsonl with the reason (and counted on the console). Refuses a non-empty OUT.
"""

from __future__ import annotations

import json
import os
import tempfile

import ml_collections
import numpy as np
from absl import app, flags, logging

import data_pipelines
from data_pipelines import manifest
from data_pipelines.options import tokenizer_path as data_tokenizer_path
from vatt_jax import cli
from vatt_jax import workdir as workdir_lib
from vatt_jax.evaluation import embeddings as emb
from vatt_jax.evaluation.retrieval import read_captions

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (config.json + checkpoints).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_MEDIA = flags.DEFINE_string('media', None, 'A list of media files, or a manifest.')
_TEXT = flags.DEFINE_string('text', None, 'A text file, one caption per line.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where the arrays and the index go.')
_MODALITIES = flags.DEFINE_list('modalities', 'video,audio', 'Towers to run on the media.')
_CLIPS = flags.DEFINE_integer('num_clips', 4, 'Clips per file, embeddings averaged.')
_SHORT_SIDE = flags.DEFINE_integer('short_side', 256, 'Frames stored at this short side.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, "Default: the run's data.tokenizer.")
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Rows per embedding batch.')
flags.mark_flags_as_required(['workdir', 'output_dir'])


def media_manifest(path: str, directory: str) -> str:
  """A manifest for --media: manifests are used as they are; a plain list becomes a JSONL one."""
  if os.path.splitext(path)[1].lower() in manifest.JSONL_SUFFIXES + manifest.CSV_SUFFIXES:
    return path
  base = os.path.dirname(os.path.abspath(path))
  lines = manifest.read_utf8(path).splitlines()  # (a file that is not UTF-8: its line, named)
  files = [line.strip() for line in lines if line.strip() and not line.startswith('#')]
  if not files:
    raise app.UsageError(f'--media {path} lists no files')
  out = os.path.join(directory, 'media.jsonl')
  with open(out, 'w') as f:
    for name in files:
      f.write(json.dumps({'media': os.path.join(base, os.path.expanduser(name))}) + '\n')
  return out


def tokenizer_path(config) -> str:
  path = _TOKENIZER.value or data_tokenizer_path(config.data)
  if not path or not os.path.exists(path):
    raise app.UsageError(f"the run's tokenizer ({path or 'none'}) is not there: give --tokenizer")
  return path


def embed_media(config, model, variables, manifest_path: str, work: str, tokenizer: str):
  """Converts the media to a shard and embeds it; returns (arrays by name, ids, skipped)."""
  from data_pipelines import decode, ingest  # (TensorFlow, PyAV)

  modalities = [m for m in _MODALITIES.value if m]
  if not modalities or set(modalities) - {'video', 'audio'}:
    raise app.UsageError(f'--modalities must be video and/or audio, got {_MODALITIES.value}')
  missing = [m for m in modalities if not model.embeddings.get(m)]
  if missing:
    raise app.UsageError(f'model {model.name!r} has no {missing} embedding (--modalities)')
  options = decode.Options(
    fps=config.data.fps, short_side=_SHORT_SIDE.value, sample_rate=config.data.sample_rate
  )
  shards = os.path.join(work, 'shards')
  summary = ingest.convert(manifest_path, os.path.join(shards, 'media'), 1, options, workers=1)
  with open(os.path.join(shards, 'media', 'report.jsonl')) as f:
    skipped = [json.loads(line) for line in f if line.strip()]
  if not summary['written']:
    return {}, {}, skipped
  data = config.data.to_dict()
  data.update(name='shards', path=shards, tokenizer=tokenizer, eval_clips=_CLIPS.value,
              deterministic=True, on_bad_input='skip')  # fmt: skip
  source = data_pipelines.build(ml_collections.ConfigDict(data), 'media', batch_size=_BATCH.value)
  embedder = emb.Embedder(model, variables, batch_size=_BATCH.value * _CLIPS.value)
  try:
    out = emb.embed_source(
      source, embedder, ['video', *(['audio'] if 'audio' in modalities else [])]
    )
  finally:
    source.close()

  embedded = set(out['media_id'])
  skipped += [
    {'media': media_id, 'error': 'no video frames: the pipeline reads clips of frames (with their '
     'audio), so audio-only files are not embedded'}
    for media_id in read_captions(shards, 'media') if media_id not in embedded
  ]  # fmt: skip
  arrays, ids = {}, {}
  has_video = np.ones(len(out['media_id']), bool)  # records without frames were dropped
  for m in modalities:
    keep = has_video if m == 'video' else out['audio_mask'] > 0
    ids[m] = [str(i) for i in out['media_id'][keep]]
    for name, value in out.items():
      if name.startswith(f'{m}/'):
        arrays[name.replace('/', '_')] = value[keep]
  return arrays, ids, skipped


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _MEDIA.value and not _TEXT.value:
    raise app.UsageError('give --media and/or --text')
  logging.set_verbosity(logging.INFO)
  out_dir = _OUTPUT_DIR.value
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise app.UsageError(f'--output_dir {out_dir} is not empty; nothing was written')
  config, model, variables, what = workdir_lib.load(_WORKDIR.value, step=_STEP.value)
  tokenizer = tokenizer_path(config) if _TEXT.value or _MEDIA.value else None
  arrays, ids, skipped = {}, {}, []
  with tempfile.TemporaryDirectory() as work:
    if _MEDIA.value:
      media_list = media_manifest(_MEDIA.value, work)
      arrays, ids, skipped = embed_media(config, model, variables, media_list, work, tokenizer)
  if _TEXT.value:
    from data_pipelines import text as text_ops  # (TensorFlow)

    captions = manifest.read_utf8(_TEXT.value).splitlines()
    keep = [c for c in captions if c.strip()]
    skipped += [{'text_line': i + 1, 'error': 'empty line'} for i, c in enumerate(captions)
                if not c.strip()]  # fmt: skip
    if keep:
      if not model.embeddings.get('text'):
        raise app.UsageError(f'model {model.name!r} has no text embedding (--text)')
      token_ids = text_ops.Tokenizer(tokenizer).encode(keep, model.inputs['text'].shape[0])
      embedder = emb.Embedder(model, variables, batch_size=_BATCH.value)
      arrays.update({f'text_{k}': v for k, v in embedder('text', token_ids).items()})
      ids['text'] = keep
  os.makedirs(out_dir, exist_ok=True)
  for name, value in arrays.items():
    np.save(os.path.join(out_dir, f'{name}.npy'), value.astype(np.float32))
  with open(os.path.join(out_dir, 'index.jsonl'), 'w') as f:
    for modality, sources in ids.items():
      for row, source in enumerate(sources):
        f.write(json.dumps({'modality': modality, 'row': row, 'source': source}) + '\n')
  with open(os.path.join(out_dir, 'skipped.jsonl'), 'w') as f:
    f.writelines(json.dumps(s) + '\n' for s in skipped)
  print(f'{what}: ' + ', '.join(f'{m} {len(v)}' for m, v in ids.items()) +
        f'; {len(skipped)} skipped → {out_dir}')  # fmt: skip


if __name__ == '__main__':
  cli.run(main)
