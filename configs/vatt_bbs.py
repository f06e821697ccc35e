r"""VATT-BBS pretraining: video Base, audio Base, text Small, modality-specific towers.

The paper's recipe (Akbari et al. 2021, appendix A.2): 32 frames at 10 fps, 224², patches 4×16×16;
3.2 s of 48 kHz audio in patches of 128; 16 words; DropToken 0.5; Adam 1e-4, 10k warm-up,
quarter-period cosine to 5e-5 at 500k steps; batch 2048; NCE + MIL-NCE, τ = 0.07.

  python scripts/train.py --config=configs/vatt_bbs.py --workdir=/tmp/vatt_bbs

Hardware and time: the paper trained on 256 TPU v3 cores (MBS: < 3 days at batch 2048).
Expected result (paper, after fine-tuning): Kinetics-400 top-1 79.6. Not yet reproduced here.
Backbones: 192.4 M parameters without the text vocabulary (paper: 197 M); see model_summary.py.
Variant `runlocal` shrinks it to a few CPU steps.

Variant `official`: the architecture of the official code and its released checkpoint
(common.official; docs/OFFICIAL.md): what scripts/convert_official.py converts into, e.g.

  python scripts/convert_official.py --checkpoint=DIR/ckpt-500000 \
    --config=configs/vatt_bbs.py:official --vocab=howto100m_en.txt --output_dir=/tmp/vatt_bbs
"""

from configs import common

# The :variants this file knows (configs/common.parse_arg refuses any other).
VARIANTS = ('runlocal', 'official')


def get_config(arg=None):
  config = common.pretraining_config(common.model_config(video_size='base'))
  args = common.parse_arg(arg, VARIANTS, __file__)
  if 'official' in args:
    common.official(config)
  if 'runlocal' in args:
    common.runlocal(config)
  return config
