r"""VATT-MA-Medium pretraining: one modality-agnostic Medium transformer shared by video, audio, text.

The official code's modality-agnostic model (uvatt.py; docs/OFFICIAL.md): each modality keeps its
own patch / word embedding, a Dense + GELU pre-projection, its positions (text: learned absolute
positions, no relative bias) and AGG token; the 12-layer, 1024-wide encoder is one set of weights;
each modality has its own Dense(1024) + GELU post-projection, whose AGG row is the representation.
Same recipe as vatt_bbs.py.

  python scripts/train.py --config=configs/vatt_ma_medium.py --workdir=/tmp/vatt_ma

Hardware and time: as the paper's MBS run (256 TPU v3 cores, < 3 days).
Expected result (paper, after fine-tuning): Kinetics-400 top-1 79.9. Not yet reproduced here.
Backbones: 161.3 M parameters without the text vocabulary and the head (the official model's).
Variant `runlocal` shrinks it to a few CPU steps.

Variant `official`: also the official code's choices every model shares (common.official: a
frozen 300-d word table read with a word-level vocabulary, position LayerNorms, the head's Dense
layers with bias): the released VATT-MA-Medium checkpoint's architecture, what
scripts/convert_official.py converts into:

  python scripts/convert_official.py --checkpoint=DIR/ckpt-500000 \
    --config=configs/vatt_ma_medium.py:official --vocab=howto100m_en.txt --output_dir=/tmp/vatt_ma

Variant `shared_encoder_only`: vatt-jax's earlier modality-agnostic model — the towers' own
tokenizers (and the text's relative bias) feed the shared encoder directly, with no pre- or
post-projections (the paper's description read literally).

Cross-modality gradient harmonization (Wu et al., NeurIPS 2022; docs/HARMONIZATION.md), the
paper's setting: `:gr` realigns conflicting video–audio / video–text gradients, `:cl` adds the
gradient-based curriculum (γ linear −0.2 → 0.1, calibrated on the demo: measure at scale with
`:monitor` first), `:gr,cl` both; `:monitor` only logs the gradients' cosine.

  python scripts/train.py --config=configs/vatt_ma_medium.py:gr,cl --workdir=/tmp/vatt_ma_grcl

Expected (paper, HowTo100M pretraining, VATT-MA-Medium): YouCook2 text→video R@10 17.1 (VATT) →
24.9 (GR), 26.0 (CL), 25.9 (GR+CL); MSR-VTT 16.7 → 19.2 / 23.9 / 24.5. Not reproduced here.
"""

from configs import common
from vatt_jax import cli

# The :variants this file knows (configs/common.parse_arg refuses any other).
VARIANTS = ('runlocal', 'official', 'shared_encoder_only', 'gr', 'cl', 'monitor')


def get_config(arg=None):
  config = common.pretraining_config(common.model_config(shared_size='medium'))
  args = common.parse_arg(arg, VARIANTS, __file__)
  common.harmonization_variants(config, args)
  if 'shared_encoder_only' in args and 'official' in args:
    raise cli.UserError(
      '--config=configs/vatt_ma_medium.py: :official and :shared_encoder_only exclude each other'
    )
  if 'shared_encoder_only' not in args:
    common.agnostic_structure(config.model)
  if 'official' in args:
    common.official(config)
  if 'runlocal' in args:
    common.runlocal(config)
  return config
