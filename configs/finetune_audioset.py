r"""AudioSet fine-tuning of a pretrained VATT audio tower (paper appendix A.3): multi-label, mixup.

The recipe: the waveform Transformer of a VATT-BBS pretraining run, fed 6.4 s of 24 kHz audio
(153,600 samples, as many patches of 128 as in pretraining: the 1200 position buckets carry over
unchanged); no DropToken; a linear head after dropout 0.5 with bias −log(C − 1) (official code);
sigmoid binary cross-entropy summed over the 527 classes, each example weighted by the inverse of
how often its labels occur in the batch (the paper's data balancing, as the official code does it);
mixup of waveforms and multi-hot targets with λ ~ Beta(5, 5); SGD momentum 0.9, 5k warm-up steps,
half-period cosine to 0 at 50k steps, batch 1024. The paper leaves the learning rate out
("an initial learning rate of, 5k warmup steps"); 0.005 is the official code's fine-tuning default.
Test: 4 windows per clip, logits averaged; mAP, AUC and d′ = √2·Φ⁻¹(AUC).

  python scripts/train.py --config=configs/finetune_audioset.py --workdir=runs/audioset_bbs \
      --config.init_from=runs/vatt_bbs --config.data.path=data/audioset
  python scripts/evaluate.py --workdir=runs/audioset_bbs

Data: record shards (scripts/prepare_data.py on an AudioSet manifest whose rows list every label:
docs/DATA.md) at 24 kHz (--sample_rate=24000) under data.path/train and data.path/eval.
Variants: `scratch` (no pretraining), `runlocal` (a few CPU steps on synthetic data).
Hardware and time: the paper fine-tuned on TPU v3; not run here (no AudioSet on this machine).
Expected result (paper, Table 2, BBS): mAP 39.4, AUC 97.1, d′ 2.895.
"""

import math

from configs import common

NUM_CLASSES = 527


# The :variants this file knows (configs/common.parse_arg refuses any other).
VARIANTS = ('runlocal', 'scratch')


def get_config(arg=None):
  args = common.parse_arg(arg, VARIANTS, __file__)
  config = common.pretraining_config(common.model_config())
  m = common.as_classifier(config, 'audio', NUM_CLASSES)
  m.classifier = dict(
    dropout_rate=0.5, kernel_init='glorot_uniform', bias_init=-math.log(NUM_CLASSES - 1)
  )
  m.audio.num_samples = 153_600  # 6.4 s at 24 kHz
  m.audio.drop_token_rate = 0.0
  config.total_steps = 50_000
  config.batch_size = 1024
  config.log_steps = 100
  config.checkpoint_steps = 5000
  config.init_from = 'runs/vatt_bbs'
  config.init_from_step = -1
  d = config.data
  d.path = 'data/audioset'
  d.modalities = ('audio',)  # no frames are decoded
  d.sample_rate = 24_000
  d.multi_label = True
  d.num_classes = m.get_ref('num_classes')
  d.eval_clips = 4
  d.shuffle_buffer = 4096
  config.loss = dict(name='sigmoid_xent', balance='inverse_frequency')
  config.optimizer = common.finetuning_optimizer(0.005, 5000, 0.75)
  config.mixup = dict(alpha=5.0)  # λ ~ Beta(5, 5)
  config.evals = dict(eval=common.classification_eval('eval', 5000, 64))
  common.finetuning_variants(config, args, 'eval')
  if 'runlocal' in args:
    m.classifier.bias_init = -math.log(m.num_classes - 1)
  return config
