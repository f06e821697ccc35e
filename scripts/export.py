r"""Exports a trained run: a self-contained bundle and a TF SavedModel of its three encoders.

  python scripts/export.py --workdir=demo/run --output_dir=demo/export \
      [--step=1500] [--format=safetensors|msgpack] [--saved_model=false] [--overwrite]

Writes into OUTPUT_DIR (see docs/EXPORT.md):
  bundle/        params.safetensors, config.json, tokenizer.model (if the run had one), bundle.json;
                 `vatt_jax.export.load_bundle(path)` turns it back into jitted encoders
  saved_model/   signatures 'video', 'audio', 'text' (jax2tf), batch dimension free
  export.json    step, files, versions and the parity figures
With --check_parity (default) the SavedModel and the reloaded bundle are run on random inputs
(batch 2) beside the JAX model; the export fails (exit status 1, OUTPUT_DIR untouched, the export
kept in OUTPUT_DIR.failed-*) if any output differs by more than --tolerance (1e-4) relative.
A non-empty OUTPUT_DIR is refused unless --overwrite, which replaces only an earlier export, and
only once the new one is complete.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from vatt_jax import cli, export

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (config.json + checkpoints/).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where the export goes.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')
_FORMAT = flags.DEFINE_enum(
  'format', 'safetensors', ['safetensors', 'msgpack'], 'File format of the bundle parameters.'
)
_SAVED_MODEL = flags.DEFINE_bool('saved_model', True, 'Also write the TF SavedModel.')
_CHECK_PARITY = flags.DEFINE_bool(
  'check_parity', True, 'Compare the exports with the JAX model on random inputs.'
)
_TOLERANCE = flags.DEFINE_float('tolerance', 1e-4, 'Largest accepted relative error.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an earlier export in --output_dir.')
_TOKENIZER = flags.DEFINE_string(
  'tokenizer',
  None,
  "Tokenizer to bundle: a sentencepiece model or a word vocabulary (default: the run's).",
)
_PLATFORMS = flags.DEFINE_list(
  'platforms', ['cpu', 'cuda'], 'Platforms the SavedModel is lowered for (cpu, cuda, rocm, tpu).'
)
flags.mark_flags_as_required(['workdir', 'output_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  try:
    export.check_output_dir(_OUTPUT_DIR.value, _OVERWRITE.value, _WORKDIR.value)
    report = export.export_run(
      _WORKDIR.value,
      _OUTPUT_DIR.value,
      step=_STEP.value,
      fmt=_FORMAT.value,
      saved_model=_SAVED_MODEL.value,
      check_parity=_CHECK_PARITY.value,
      overwrite=_OVERWRITE.value,
      tokenizer_path=_TOKENIZER.value,
      platforms=tuple(_PLATFORMS.value),
      tolerance=_TOLERANCE.value,
    )
  except (FileExistsError, FileNotFoundError, ValueError, export.ParityError) as e:
    logging.error('%s', e)
    print(f'export failed: {e}', file=sys.stderr)
    return 1
  if not report['tokenizer']:
    logging.warning('the run has no tokenizer: the bundle text encoder takes token ids only')
  print(f'exported step {report["step"]} of {_WORKDIR.value} to {_OUTPUT_DIR.value}')
  if 'parity' in report:
    parity = report['parity']
    print(json.dumps({k: parity[k] for k in ('bundle', 'saved_model') if k in parity}, indent=2))
    print(
      f'max relative error {parity["max_relative_error"]:.3g} (tolerance {parity["tolerance"]:g})'
    )
  return 0


if __name__ == '__main__':
  cli.run(main)
