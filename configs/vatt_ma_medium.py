r"""VATT-MA-Medium pretraining: one modality-agnostic Medium transformer shared by video, audio, text.

Each modality keeps its own tokenizer, positions, AGG token (and the text its relative position
bias); the 12-layer, 1024-wide encoder is one set of weights. Same recipe as vatt_bbs.py.

  python scripts/train.py --config=configs/vatt_ma_medium.py --workdir=/tmp/vatt_ma

Hardware and time: as the paper's MBS run (256 TPU v3 cores, < 3 days).
Expected result (paper, after fine-tuning): Kinetics-400 top-1 79.9. Not yet reproduced here.
Variant `runlocal` shrinks it to a few CPU steps.
"""

from configs import common


def get_config(arg=None):
  config = common.pretraining_config(common.model_config(shared_size='medium'))
  if 'runlocal' in common.parse_arg(arg):
    common.runlocal(config)
  return config
