r"""svitt_ego_demo: SViTT-Ego (svitt_ego_base's model and objective) small enough for 2 CPU cores.

A 4-block video encoder (width 32, 2 heads) over 4 frames of 64² (64 patch tokens in blocks of 8:
each block attends to 1 local + 3 random of 8 blocks; 70 % kept after blocks 0, 1, 2: 64 → 45 →
32 → 23) and a 4-layer text encoder (width 64) fusing from layer 1 (3 fusion layers) with 10 % of the video tokens
kept after the second fusion layer; 32-d heads; EgoNCE at τ = 0.05 with the demo's taxonomy
(nouns: the ten digits; verbs: the four directions, every motion verb of a direction one class),
scene negatives from the same video (every other segment lies within 60 s), VTM and MLM.

Data: the demo generator's videos with 5–8 segments (intra-video EgoMCQ questions need 5 segments
of one video), converted with the taxonomy; each example is one caption's segment:

  python scripts/make_demo_data.py --output_dir=demo/ego --segments=5,8 --egomcq_splits=test
  python scripts/prepare_data.py --manifest=demo/ego/train.jsonl --output_dir=demo/ego/shards/train \
      --taxonomy=demo/ego/taxonomy.json ...             # and test; scripts/experiments/egonce.py
  python scripts/train.py --config=configs/svitt_ego_demo.py --workdir=demo/svitt_ego

Evaluation: EgoMCQ-format questions on the held-out test videos (`multiple_choice`: inter-video
and intra-video accuracy, chance 20 %). scripts/experiments/egonce.py runs the InfoNCE / EgoNCE
comparison (README).

Arguments: those of svitt_ego_base (dense, edge, node, infonce) and runlocal.
"""

from configs import common, svitt_ego_base

VARIANTS = ('runlocal', 'dense', 'edge', 'node', 'infonce')


def get_config(arg=None):
  args = common.parse_arg(arg, VARIANTS, __file__)
  config = svitt_ego_base.get_config()
  m = config.model
  m.video.size = 'tiny'
  m.video.frame_size = 64
  m.video.block_size = 8
  m.video.token_drop_loc = (0, 1, 2)
  m.video.drop_path_rate = 0.0
  m.text.size = 'tiny'
  m.text.num_layers = 4
  m.text.fusion_layer = 1  # 3 fusion layers, as Base: the third sees the pruned video tokens
  m.text.vocab_size = 1024
  # From scratch (SViTT starts from pretrained BERT), a post-LN [CLS] after one text layer barely
  # depends on the caption (cosine 0.99999 between captions at init) and the contrastive loss sat
  # at chance for 1000+ steps; the mean over the caption's tokens learns from the first hundreds.
  m.text.pooling = 'mean'
  m.text.max_words = 16
  m.embed_dim = 32
  m.dropout_rate = m.attention_dropout_rate = 0.0
  config.batch_size = 32
  config.total_steps = 1500
  config.log_steps = 100
  config.checkpoint_steps = 500
  config.optimizer.update(
    learning_rate=1e-3, end_learning_rate=1e-5, warmup_steps=50, weight_decay=0.02
  )
  config.data.path = 'demo/ego/shards'
  config.data.fps = 10.0
  config.data.sample_rate = 8000
  config.data.shuffle_buffer = 256
  config.data.num_nouns = 10
  config.data.num_verbs = 4
  config.evals = dict(
    egomcq=dict(
      type='multiple_choice',
      questions='demo/ego/egomcq_test.json',
      split='test',
      batch_size=32,
      use_score=True,  # also the VTM head's pair score
      log_steps=500,
    )
  )
  svitt_ego_base.apply_variants(config, args)
  if 'runlocal' in args:
    svitt_ego_base.runlocal(config)
  return config
