r"""Converts a released VATT checkpoint (the official TF2 code's ckpt-500000) into a vatt-jax workdir.

  python scripts/convert_official.py --checkpoint=DIR/ckpt-500000 \
      --config=configs/vatt_bbs.py:official [--config.model.…=… overrides] \
      --vocab=howto100m_en.txt --output_dir=/tmp/vatt_bbs \
      [--embed_inputs=IN.npz --embed_outputs=OUT.npz] [--step=N]

The checkpoint is read by its object-graph keys (Adam's slots are not read); every tensor is
checked against the model of --config (an `:official` preset, docs/OFFICIAL.md) before anything is
written, and what is missing, extra or of another shape is named. The workdir (config.json, the
checkpoint at the official optimizer step unless --step, the tokenizer's copy, provenance.json,
converted.json) is what every script takes: linear_probe.py, retrieval.py,
extract_embeddings.py, export.py, fine-tuning (`--config.init_from=W`) and resumed pretraining
(`scripts/train.py --workdir=W --config.total_steps=…` beyond the stored step). --vocab is the
word-level vocabulary the checkpoint's frozen word2vec table goes with (the official misc/
howto100m_en.txt); it becomes the run's tokenizer.

With --embed_inputs=IN.npz (`video` [B, T, H, W, 3] float in [−1, 1], `audio` [B, S] float,
`text` [B, L] int32 word ids, 0 = padding) the converted model runs in inference on them and
--embed_outputs=OUT.npz gets video_agg, audio_agg, text_agg, video_va, video_vt, audio_va, text_vt.
--output_dir may then be omitted (nothing is written but OUT.npz).
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines.manifest import check_output_dir
from vatt_jax import cli, official, official_workdir
from vatt_jax.models import build_model
from vatt_jax.models.contract import abstract_variables
from vatt_jax.provenance import file_sha256

_CHECKPOINT = flags.DEFINE_string(
  'checkpoint', None, 'The official checkpoint: DIR/ckpt-500000 (or its directory: the latest).'
)
_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'The preset of that architecture (configs/vatt_*.py:official).'
)
_VOCAB = flags.DEFINE_string(
  'vocab', None, "Word-level vocabulary (howto100m_en.txt) of the checkpoint's word table."
)
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'The new workdir (absent or empty).')
_STEP = flags.DEFINE_integer(
  'step', None, "Step to store the checkpoint at (default: the checkpoint's optimizer step)."
)
_EMBED_INPUTS = flags.DEFINE_string('embed_inputs', None, 'Inputs .npz to run the model on.')
_EMBED_OUTPUTS = flags.DEFINE_string('embed_outputs', None, 'Where the outputs .npz goes.')
flags.mark_flags_as_required(['checkpoint', 'config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  import jax

  from data_pipelines import text as text_ops

  config = _CONFIG.value
  output_dir, inputs_path, outputs_path = _OUTPUT_DIR.value, _EMBED_INPUTS.value, None
  if bool(inputs_path) != bool(_EMBED_OUTPUTS.value):
    raise cli.UserError('--embed_inputs and --embed_outputs go together')
  if inputs_path:
    outputs_path = os.path.abspath(_EMBED_OUTPUTS.value)
  if not output_dir and not inputs_path:
    raise cli.UserError('give --output_dir (the workdir), --embed_inputs/--embed_outputs, or both')
  if _STEP.value is not None and _STEP.value < 0:
    raise cli.UserError(f'--step={_STEP.value} must be >= 0')

  # Everything that can refuse the command runs before anything is written.
  if output_dir:
    official_workdir.check_new_workdir(output_dir)
  if outputs_path:
    if os.path.exists(outputs_path):
      raise cli.UserError(f'--embed_outputs={outputs_path} exists; give a new file')
    check_output_dir(os.path.dirname(outputs_path), '--embed_outputs')
  official.check_official(config.model)
  if _VOCAB.value:
    tokenizer = text_ops.Tokenizer(_VOCAB.value)
    if tokenizer.vocab_size > config.model.text.vocab_size:
      raise cli.UserError(
        f"--vocab={_VOCAB.value} has {tokenizer.vocab_size} ids, more than the model's "
        f'{config.model.text.vocab_size} (config model.text.vocab_size)'
      )
    config.data.tokenizer = os.path.abspath(_VOCAB.value)
  elif output_dir:
    logging.warning(
      'no --vocab: the workdir has no tokenizer; text can only be given as word ids '
      '(retrieval and text datasets need the vocabulary: give --vocab)'
    )
  model = build_model(config.model)
  checkpoint = official.read_checkpoint(_CHECKPOINT.value)
  variables = official.convert(checkpoint, config.model, abstract_variables(model))
  inputs = official_workdir.read_inputs(inputs_path, model) if inputs_path else None
  step = _STEP.value if _STEP.value is not None else (checkpoint.step or 0)
  logging.info(
    'read %d tensors (%d values) of %s, optimizer step %s',
    len(checkpoint.variables),
    official_workdir.total_size(variables),
    checkpoint.path,
    checkpoint.step,
  )

  if inputs is not None:
    outputs = official_workdir.embed(model, jax.device_put(variables), inputs)
    np.savez(outputs_path, **outputs)
    print(
      f'wrote {", ".join(outputs)} of {len(next(iter(inputs.values())))} examples to {outputs_path}'
    )
  if output_dir:
    source = {
      'checkpoint': os.path.abspath(checkpoint.path),
      'optimizer_step': checkpoint.step,
      'index_sha256': file_sha256(checkpoint.path + '.index'),
      'vocab': config.data.get('tokenizer') or None,
    }
    official_workdir.write_workdir(config, variables, output_dir, step=step, source=source)
    print(f'wrote the workdir {output_dir} (step {step})')
  return 0


if __name__ == '__main__':
  cli.run(main)
