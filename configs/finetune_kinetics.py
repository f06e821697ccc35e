r"""Kinetics-400 fine-tuning of a pretrained VATT video tower (paper appendix A.2.5).

The recipe: the video Transformer of a VATT-BBS pretraining run (configs/vatt_bbs.py), its position
tables resized cubically from the 8 + 14 + 14 buckets of 32 × 224² to the 8 + 20 + 20 of 32 × 320²,
fine-tuned end to end without DropToken; 32 frames at 25 fps with a temporal stride of 2 (12.5 fps,
2.56 s), random resized crop + flip + colour jitter as in pretraining; a linear head on the AGG
output after dropout 0.5 (official code); SGD momentum 0.9, learning rate 0.005, 2.5k warm-up steps,
then a half-period cosine to 0 at 100k steps; batch 64; label smoothing 0.1; gradient clipping at
global norm 0.75 (official code). Test: 4 clips uniformly over the video × 3 crops along the long
side = 12 views, logits averaged.

  python scripts/train.py --config=configs/finetune_kinetics.py --workdir=runs/k400_bbs \
      --config.init_from=runs/vatt_bbs --config.data.path=data/kinetics400
  python scripts/evaluate.py --workdir=runs/k400_bbs            # the 12-view test again

Data: record shards (scripts/prepare_data.py on a Kinetics manifest with one label per video:
docs/DATA.md) under data.path/train and data.path/val. `init_from` is the pretraining workdir
(`:scratch` trains from random initialisation instead: the paper's 26.4 % top-1 baseline).
Variants: `medium` / `large` for MBS / LBS checkpoints, `runlocal` for a few CPU steps.
Hardware and time: the paper fine-tuned on TPU v3; not run here (no Kinetics on this machine).
Expected result (paper, Table 1): top-1 79.6 / top-5 94.9 (BBS), 81.1 (MBS), 82.1 (LBS).
"""

from configs import common

# The :variants this file knows (configs/common.parse_arg refuses any other).
VARIANTS = ('runlocal', 'scratch', 'medium', 'large')


def get_config(arg=None):
  args = common.parse_arg(arg, VARIANTS, __file__)
  size = 'large' if 'large' in args else 'medium' if 'medium' in args else 'base'
  config = common.pretraining_config(common.model_config(video_size=size))
  m = common.as_classifier(config, 'video', 400)
  m.classifier = dict(dropout_rate=0.5, kernel_init='glorot_normal', bias_init=0.0)
  m.video.frame_size = 320  # 20 × 20 patches; positions resized from the 14 × 14 of pretraining
  m.video.drop_token_rate = 0.0  # the paper fine-tunes without DropToken
  config.total_steps = 100_000
  config.batch_size = 64
  config.log_steps = 100
  config.checkpoint_steps = 5000
  # The pretraining workdir (--config.init_from=...): configs/vatt_{bbs,mbs,lbs}.py's run.
  config.init_from = {'base': 'runs/vatt_bbs', 'medium': 'runs/vatt_mbs', 'large': 'runs/vatt_lbs'}[
    size
  ]
  config.init_from_step = -1  # its latest checkpoint
  d = config.data
  d.path = 'data/kinetics400'
  d.modalities = ('video',)  # no audio, text or tokenizer needed
  d.fps = 12.5  # 25 fps with a temporal stride of 2
  d.eval_clips, d.eval_crops = 4, 3
  d.shuffle_buffer = 1024
  config.loss = dict(name='softmax_xent', label_smoothing=0.1)
  config.optimizer = common.finetuning_optimizer(0.005, 2500, 0.75)
  config.mixup = dict(alpha=0.0)
  config.evals = dict(val=common.classification_eval('val', 10_000, 16))
  common.finetuning_variants(config, args, 'val')
  return config
