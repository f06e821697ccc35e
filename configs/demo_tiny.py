r"""demo_tiny: a VATT small enough to pretrain on 2 CPU cores in a few minutes.

Tiny towers (2 layers, width 64, 4 heads) on 8 frames of 32×32 in 2×8×8 patches (64 tokens),
6400 audio samples in patches of 128 (50 tokens) and one narration of 16 words; DropToken 0.5;
Adam 1e-3 with 30 warm-up steps and a quarter-period cosine over 1500 steps; NCE + MIL-NCE.

  make demo            # or, once demo/shards exists:
  python scripts/train.py --config=configs/demo_tiny.py --workdir=demo/run
  python scripts/report.py --workdir=demo/run      # pretrained vs. random init

Arguments: `ma` (one shared tiny backbone, as VATT-MA), and the gradient harmonization switches
`gr`, `cl`, `monitor` (docs/HARMONIZATION.md; scripts/experiments/noisy_correspondence.py
compares them on the demo with injected misalignment).

Data: the bundled real-media demo (scripts/make_demo_data.py → prepare_data.py at 64 px and 8 kHz →
train_tokenizer.py), read from demo/shards (--config.data.path); the evaluations (config.evals,
every 500 steps and by scripts/report.py) read its per-segment shards segments_train/_test. The
paper's augmentation applies, with crops of 50–100 % of the frame.
Hardware and time: 2 CPU cores; `make demo` from a fresh clone took 4 min 55 s with the install
(pip from its cache) on quiet cores, about 9 minutes on a slower or shared machine.
Measured (seed 0, fresh clone, commit ba88fe4): loss 4.52 at step 100, 3.00 at step 1500
(video–text 2.53, video–audio 3.46; chance log 64 ≈ 4.16); video linear probe 36.0 % top-1 (random
init 22.1 %, chance 10 %), text→video R@5 31.0 % over 86 held-out segments (random init 2.4 %,
chance 6.0 %). Seed 1 on the same shards: 52.3 % and 44.0 %; runs differ by about 10 points.
"""

from configs import common

# The :variants this file knows (configs/common.parse_arg refuses any other).
VARIANTS = ('runlocal', 'ma', 'gr', 'cl', 'monitor')


def get_config(arg=None):
  config = common.pretraining_config(common.model_config())
  m = config.model
  for tower in (m.video, m.audio, m.text):
    tower.size = 'tiny'
  m.video.num_frames, m.video.frame_size, m.video.patch_size = 8, 32, (2, 8, 8)
  m.audio.num_samples, m.audio.patch_size = 6400, 128  # 0.8 s at 8 kHz, with the 8 frames
  m.text.vocab_size = 1024
  # One narration: the caption overlapping the clip. A demo video's other captions describe other
  # segments (other digits), so MIL-NCE neighbours would be positives a model can only fit by
  # memorising the training videos; with them the demo's held-out retrieval stays at chance.
  m.text.num_narrations = 1
  m.head.va_dim, m.head.vt_dim = 64, 32
  m.dropout_rate = m.attention_dropout_rate = 0.0
  config.batch_size = 32
  config.total_steps = 1500  # the cross-modal signal of the real-media demo shows after ~800 steps
  config.log_steps = 100
  config.checkpoint_steps = 500
  config.optimizer.learning_rate = 1e-3
  config.optimizer.end_learning_rate = 1e-4
  config.optimizer.warmup_steps = 30
  config.data.path = 'demo/shards'  # make demo writes media, shards and tokenizer under demo/
  config.data.sample_rate = 8000  # the demo's tones sit below 3 kHz; prepare_data resamples
  config.data.shuffle_buffer = 256
  # The paper's crops keep 8–100 % of the frame; at 64 px most small crops would miss the digit.
  config.data.crop_area_range = (0.5, 1.0)
  config.data.crop_aspect_range = (0.75, 1.33)
  # The segment shards (make demo-shards): one record per captioned, labelled 2 s segment.
  probe = dict(type='linear_probe', train_split='segments_train', test_split='segments_test',
               num_classes=10, steps=2000, num_clips=4, log_steps=500)  # fmt: skip
  config.evals = dict(
    linear_probe=dict(probe, modality='video'),
    linear_probe_audio=dict(probe, modality='audio'),
    retrieval=dict(type='retrieval', split='segments_test', num_clips=4, log_steps=500),
  )
  args = common.parse_arg(arg, VARIANTS, __file__)
  if 'ma' in args:  # one shared tiny backbone: VATT-MA, the harmonization paper's model
    m.backbone, m.shared_size = 'modality_agnostic', 'tiny'
  common.harmonization_variants(config, args)
  if 'runlocal' in args:
    common.runlocal(config)
    config.evals = {}  # they read the demo's shards; runlocal has synthetic data
  return config
