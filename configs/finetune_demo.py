r"""finetune_demo: fine-tunes demo_tiny's video tower to name the digit of a demo segment, on CPU.

The Kinetics recipe (configs/finetune_kinetics.py) at demo size: the video tower of a `make demo`
pretraining run (configs/demo_tiny.py, 8 frames of 32² in 2×8×8 patches), fine-tuned at 48² (its
4 × 4 spatial position tables resized cubically to 6 × 6, as 224² → 320² is in the paper) to
classify the 10 digits; one record per 2 s captioned segment, labelled with its digit (the segment
shards of `make demo-shards`). SGD momentum 0.9 at lr 0.1 (at 0.01–0.05 the tiny classifier stayed
at chance), warm-up then half-period cosine to 0, label smoothing 0.1, no dropout before the head,
no DropToken, batch 32, 600 steps; test on the segments of the test split,
4 clips per segment (the demo's frames are square, so 3 crops would be 3 identical views), logits
averaged.

  make demo                                  # media, shards, segment shards, demo/run
  python scripts/train.py --config=configs/finetune_demo.py --workdir=demo/finetune
  python scripts/evaluate.py --workdir=demo/finetune
  # the baseline without pretraining:
  python scripts/train.py --config=configs/finetune_demo.py:scratch --workdir=demo/finetune_scratch

Hardware and time: 2 CPU cores, 3.5–6 minutes for the 600 steps and 3 test passes (measured; 6 when
another job shared the cores).
Measured (docs/FINETUNING.md has the table): top-1 on the 86 test segments (10 digits, chance 10 %)
54.7 and 53.5 (seeds 0 and 1) from demo/run, 33.7 and 41.9 from scratch (`:scratch`).
Variant `runlocal`: a few CPU steps on synthetic data (no demo files needed).
"""

from configs import common, demo_tiny

# The :variants this file knows (configs/common.parse_arg refuses any other).
VARIANTS = ('runlocal', 'scratch')


def get_config(arg=None):
  args = common.parse_arg(arg, VARIANTS, __file__)
  config = demo_tiny.get_config()  # the pretraining run's model and data, then the changes below
  m = common.as_classifier(config, 'video', 10)
  # No dropout before the head: the tiny tower's AGG output is only 64 wide (the paper's: 0.5).
  m.classifier = dict(dropout_rate=0.0, kernel_init='glorot_normal', bias_init=0.0)
  m.video.frame_size = 48  # 6 × 6 patches of 8: positions resized from the 4 × 4 of pretraining
  m.video.drop_token_rate = 0.0
  config.total_steps = 600
  config.batch_size = 32
  config.log_steps = 50
  config.checkpoint_steps = 300
  config.init_from = 'demo/run'  # the workdir `make demo` pretrains into
  config.init_from_step = -1
  d = config.data
  d.modalities = ('video',)
  d.split_folders = dict(train='segments_train')  # train on the one-record-per-segment shards
  d.eval_clips, d.eval_crops = 4, 1
  config.loss = dict(name='softmax_xent', label_smoothing=0.1)
  config.optimizer = common.finetuning_optimizer(0.1, 50, 0.75)
  config.mixup = dict(alpha=0.0)
  config.evals = dict(test=common.classification_eval('segments_test', 200, 16))
  common.finetuning_variants(config, args, 'test')
  return config
