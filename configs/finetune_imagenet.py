r"""ImageNet fine-tuning of a pretrained VATT video tower, an image as a clip (appendix A.3.1).

The recipe: the video Transformer of a VATT-BBS pretraining run, unchanged; each image is replicated
into a clip of 4 frames, so with 4×16×16 patches the network sees a single-frame clip and attends
over space only ("we replicate the input image 4 times"). At 384² the patch grid is 1 × 24 × 24: the
temporal table shrinks from 8 rows to 1 and the spatial ones grow from 14 to 24, cubically. SGD
momentum 0.9, learning rate 0.08, cosine decay to 0, label smoothing 0.1, no weight decay, batch
512 for 50 epochs (1,281,167 images: 125,113 steps); random resized crop, flip and colour jitter as
in pretraining; test on the central square. The paper gives no warm-up or classifier dropout:
2.5k warm-up steps and dropout 0.5 are the official code's fine-tuning defaults.

  python scripts/train.py --config=configs/finetune_imagenet.py --workdir=runs/imagenet_bbs \
      --config.init_from=runs/vatt_bbs --config.data.tfds_data_dir=~/tensorflow_datasets

Data: TFDS imagenet2012 (its archives are downloaded by hand, as TFDS explains). Variants:
`scratch` (no pretraining: the paper's 64.7 % top-1), `runlocal` (a few CPU steps, synthetic).
Hardware and time: the paper fine-tuned on TPU v3; not run here (no ImageNet on this machine).
Expected result (paper, Table 3): top-1 78.7, top-5 93.9.
"""

from configs import common

TRAIN_IMAGES = 1_281_167


# The :variants this file knows (configs/common.parse_arg refuses any other).
VARIANTS = ('runlocal', 'scratch')


def get_config(arg=None):
  args = common.parse_arg(arg, VARIANTS, __file__)
  config = common.pretraining_config(common.model_config())
  m = common.as_classifier(config, 'image', 1000)
  m.classifier = dict(dropout_rate=0.5, kernel_init='glorot_normal', bias_init=0.0)
  m.video.num_frames = 4  # the image repeated 4 times: one temporal patch
  m.video.frame_size = 384
  m.video.drop_token_rate = 0.0
  config.batch_size = 512
  config.total_steps = TRAIN_IMAGES * 50 // config.batch_size  # 50 epochs
  config.log_steps = 100
  config.checkpoint_steps = 5000
  config.init_from = 'runs/vatt_bbs'
  config.init_from_step = -1
  config.data = dict(
    name='tfds',
    tfds_name='imagenet2012',
    tfds_data_dir='',
    modality='image',
    image_key='image',
    label_key='label',
    num_frames=m.video.get_ref('num_frames'),
    frame_size=m.video.get_ref('frame_size'),
    crop_area_range=(0.08, 1.0),
    crop_aspect_range=(0.5, 2.0),
    eval_clips=1,
    eval_crops=1,
    shuffle_buffer=10_000,
    deterministic=True,  # False: not replayable
    # Fields the other sources read (synthetic at runlocal); unused by TFDS images.
    fps=10.0,
    num_samples=m.audio.get_ref('num_samples'),
    max_words=m.text.get_ref('max_words'),
    num_narrations=m.text.get_ref('num_narrations'),
    vocab_size=m.text.get_ref('vocab_size'),
    synthetic=dict(num_classes=16, noise=0.3, missing_text_rate=0.0, missing_audio_rate=0.0),
  )
  config.loss = dict(name='softmax_xent', label_smoothing=0.1)
  config.optimizer = common.finetuning_optimizer(0.08, 2500, 0.0)
  config.mixup = dict(alpha=0.0)
  config.evals = dict(validation=common.classification_eval('validation', 10_000, 64))
  common.finetuning_variants(config, args, 'validation')
  return config
