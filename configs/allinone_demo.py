r"""allinone_demo: All-in-one (allinone_base's model and objective) small enough for 2 CPU cores.

One 4-block transformer (width 64, 4 heads) over 3 frames of 64² in 16×16 patches (4×4 patches +
CLS = 17 tokens per frame: fold 17 // 8 = 2, patches 1–2 of the top row roll in from the previous
frame, the last two of the bottom row from the next) and 16 caption ids (18 text tokens):
per-frame joint sequences of 35 tokens (flatten: one of 69); 32-d unimodal space; VTM (the
reference's random half of negatives) + MLM + unimodal contrastive, weights 1, 1, 1. (8×8 patches,
65 tokens a frame, would make the joint sequences 2.4× longer; 16×16 keeps the three-way, two-seed
comparison of scripts/experiments/token_rolling.py to well under an hour on 2 cores.)

Data: the demo's segment shards (make demo-shards: one record per captioned 2 s segment), trained
without the horizontal flip (a mirrored "moves to the left" clip moves right: label noise for the
direction task), evaluated on the held-out segments:

  python scripts/make_demo_data.py --output_dir=demo/aio/media --mc_splits=test
  python scripts/prepare_data.py --manifest=demo/aio/media/retrieval_train.jsonl \
      --output_dir=demo/aio/shards/segments_train --short_side=64 --sample_rate=8000   # and test
  python scripts/train_tokenizer.py --input_dir=demo/aio/shards/segments_train \
      --output=demo/aio/shards/tokenizer --vocab_size=1024
  python scripts/train.py --config=configs/allinone_demo.py --workdir=demo/aio/run \
      --config.data.path=demo/aio/shards --config.evals.mc_direction.questions=… (and appearance)

Evaluations: multiple choice on the held-out segments (mc_direction: 4 captions differing only in
the direction, chance 25 %, which one frame cannot answer; mc_appearance: 5 captions differing
only in the digit, chance 20 %), by the unimodal cosine and by the VTM head (zero-shot);
text↔video retrieval by the unimodal embeddings and re-ranked by the VTM head over the top 8; a
linear probe of the video-only features on the segments' digits.
scripts/experiments/token_rolling.py compares roll / none / flatten (README).

Arguments: those of allinone_base (none, flatten, hard, untied) and runlocal.
"""

from configs import allinone_base, common

VARIANTS = ('runlocal', 'none', 'flatten', 'hard', 'untied')


def get_config(arg=None):
  args = common.parse_arg(arg, VARIANTS, __file__)
  config = allinone_base.get_config()
  m = config.model
  m.size = 'tiny'
  m.num_layers, m.width, m.mlp_dim, m.num_heads = 4, 64, 256, 4
  m.video.frame_size = 64
  m.video.patch_size = 16
  m.text.vocab_size = 1024
  m.text.max_words = 16
  m.embed_dim = 32
  m.dropout_rate = m.attention_dropout_rate = m.drop_path_rate = 0.0
  config.batch_size = 32
  config.total_steps = 1500
  config.log_steps = 100
  config.checkpoint_steps = 500
  config.optimizer.update(
    learning_rate=1e-3, end_learning_rate=1e-5, warmup_steps=100, weight_decay=0.01
  )
  config.data.path = 'demo/shards'
  config.data.split_folders = {'train': 'segments_train'}  # train on the segment records
  config.data.fps = 10.0
  config.data.sample_rate = 8000
  config.data.shuffle_buffer = 256
  config.data.random_flip = False
  # At 64 px the paper's 8–100 % crops would often miss the digit.
  config.data.crop_area_range = (0.5, 1.0)
  config.data.crop_aspect_range = (0.75, 1.33)
  # Evaluations read the segment folders by name, in evaluation mode (a split named 'train' is
  # read as training data).
  mc = dict(
    type='multiple_choice', split='segments_test', batch_size=32, use_score=True, log_steps=500
  )
  retrieval = dict(type='retrieval', split='segments_test', num_clips=1, log_steps=500)
  config.evals = dict(
    mc_direction=dict(mc, questions='demo/media/mc_direction_test.json'),
    mc_appearance=dict(mc, questions='demo/media/mc_appearance_test.json'),
    retrieval=dict(retrieval, score='cosine'),
    retrieval_rerank=dict(retrieval, score='pairs', rerank_top_k=8),
    linear_probe=dict(
      type='linear_probe',
      train_split='segments_train',
      test_split='segments_test',
      num_classes=10,
      steps=2000,
      num_clips=1,
      modality='video',
      log_steps=500,
    ),
  )
  allinone_base.apply_variants(config, args)
  if 'runlocal' in args:
    allinone_base.runlocal(config)
  return config
