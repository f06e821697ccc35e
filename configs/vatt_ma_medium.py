r"""VATT-MA-Medium pretraining: one modality-agnostic Medium transformer shared by video, audio, text.

Each modality keeps its own tokenizer, positions, AGG token (and the text its relative position
bias); the 12-layer, 1024-wide encoder is one set of weights. Same recipe as vatt_bbs.py.

  python scripts/train.py --config=configs/vatt_ma_medium.py --workdir=/tmp/vatt_ma

Hardware and time: as the paper's MBS run (256 TPU v3 cores, < 3 days).
Expected result (paper, after fine-tuning): Kinetics-400 top-1 79.9. Not yet reproduced here.
Variant `runlocal` shrinks it to a few CPU steps.

Variant `official`: the official code's modality-agnostic model (uvatt.py) and its released
VATT-MA-Medium checkpoint (common.official; docs/OFFICIAL.md): per-modality Dense + GELU
pre-projections, absolute text positions with a LayerNorm (no relative bias), a frozen 300-d word
table, per-modality Dense(1024) + GELU post-projections whose AGG row is the representation.
Without it, the modality-agnostic model is vatt-jax's (the paper's description: the towers' own
tokenizers and the text's relative bias around one shared encoder).

  python scripts/convert_official.py --checkpoint=DIR/ckpt-500000 \
    --config=configs/vatt_ma_medium.py:official --vocab=howto100m_en.txt --output_dir=/tmp/vatt_ma

Cross-modality gradient harmonization (Wu et al., NeurIPS 2022; docs/HARMONIZATION.md), the
paper's setting: `:gr` realigns conflicting video–audio / video–text gradients, `:cl` adds the
gradient-based curriculum (γ linear −0.2 → 0.1, calibrated on the demo: measure at scale with
`:monitor` first), `:gr,cl` both; `:monitor` only logs the gradients' cosine.

  python scripts/train.py --config=configs/vatt_ma_medium.py:gr,cl --workdir=/tmp/vatt_ma_grcl

Expected (paper, HowTo100M pretraining, VATT-MA-Medium): YouCook2 text→video R@10 17.1 (VATT) →
24.9 (GR), 26.0 (CL), 25.9 (GR+CL); MSR-VTT 16.7 → 19.2 / 23.9 / 24.5. Not reproduced here.
"""

from configs import common

# The :variants this file knows (configs/common.parse_arg refuses any other).
VARIANTS = ('runlocal', 'official', 'gr', 'cl', 'monitor')


def get_config(arg=None):
  config = common.pretraining_config(common.model_config(shared_size='medium'))
  args = common.parse_arg(arg, VARIANTS, __file__)
  common.harmonization_variants(config, args)
  if 'official' in args:
    common.official(config)
  if 'runlocal' in args:
    common.runlocal(config)
  return config
