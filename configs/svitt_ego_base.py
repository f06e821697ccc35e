r"""svitt_ego_base: SViTT-Ego pretraining on EgoClip (seed 003; SViTT, Li et al. CVPR 2023).

BEiT-B/16 video encoder over 4 frames at 224² (784 patch tokens) with edge sparsity (block-sparse
attention: blocks of G = 56 tokens, w = 1 local and R = 3 random blocks) and node sparsity (after
blocks 3, 6, 9 keep 70 % of the patch tokens by CLS attention: 784 → 549 → 385 → 270); BERT-base
text encoder whose last 3 layers (from fusion_layer 9) cross-attend to the video tokens, keeping
10 % of them after the second fusion layer; 256-d dual-encoder heads trained with EgoNCE
(τ = 0.05, positives share a noun and a verb, scene-aware negatives within 60 s), plus video–text
matching with hard negatives and masked language modelling (weights 1, 1, 1).

  python scripts/prepare_data.py --manifest=egoclip.csv --media_root=ego4d/chunks \
      --taxonomy=taxonomy.json --output_dir=data/egoclip/train --num_shards=1024
  python scripts/train_tokenizer.py --input_dir=data/egoclip/train --output=data/egoclip/tokenizer
  python scripts/train.py --config=configs/svitt_ego_base.py --workdir=runs/svitt_ego \
      --config.data.path=data/egoclip --config.data.num_nouns=582 --config.data.num_verbs=118

Recipe (SViTT's configs/pretrain_webvid.yaml and the SViTT-Ego paper): AdamW lr 3e-5, betas
(0.9, 0.999), weight decay 0.02, cosine to 1 % of the peak with one epoch of warm-up over 10
epochs; batch 64 (8 per GPU × 8 GPUs of 12 GB, fp16 there; bfloat16 here by --config.model.dtype).
The paper's figures (EgoMCQ, 4 frames at inference): EgoNCE 53.0 % intra-video / 89.4 % inter-video
against InfoNCE's 43.3 % / 89.0 % in its short ablation; not reproduced here (no EgoClip on this
machine). Hardware and time of a full run: expected, not measured (8 × 12 GB GPUs in the paper).

Temporal sparse expansion (SViTT): continue a 4-frame run at 8 frames and keep rate 0.6
(`:frames8`, with --config.init_from=<the 4-frame run>): the relative position tables are
expanded (svitt_position.expand_temporal) and 1568 patch tokens go 941 → 565 → 339.

Arguments (comma-separated): dense (no edge or node sparsity), edge (edge sparsity only), node
(node sparsity only), infonce (InfoNCE instead of EgoNCE, no scene negatives), frames8 (the
temporal expansion above), runlocal (tiny and synthetic, for tests).
"""

import ml_collections

from configs import common

VARIANTS = ('runlocal', 'dense', 'edge', 'node', 'infonce', 'frames8')


def model_config() -> ml_collections.ConfigDict:
  """SViTT-Ego: BEiT-B/16 + BERT-base with fusion from layer 9 (vatt_jax/models/svitt.py)."""
  return ml_collections.ConfigDict(
    dict(
      name='svitt',
      video=dict(
        size='base',  # svitt_video.SVITT_VIDEO_PRESETS
        num_frames=4,
        frame_size=224,
        patch_size=16,  # square patches of each frame
        attention='block_sparse',  # edge sparsity; 'dense' without
        block_size=56,
        local_blocks=1,
        random_blocks=3,
        keep_rate=0.7,  # node sparsity; 1.0 without
        token_drop_loc=(3, 6, 9),
        drop_path_rate=0.1,
      ),
      text=dict(
        size='base',  # transformer.SIZES: BERT-base is 'base' (768, 12 layers, 12 heads)
        num_layers=0,  # 0: the size's
        vocab_size=2**15,  # the tokenizer's; the model adds [CLS], [SEP], [MASK]
        max_words=30,  # + [CLS] and [SEP]: SViTT's max_txt_l 32
        num_narrations=1,
        fusion_layer=9,
        video_keep_rate=0.1,  # multimodal node sparsity
        prune_layer=1,  # after the second fusion layer's cross-attention
        pooling='cls',  # the text representation: [CLS] (SViTT) or 'mean' of the tokens
      ),
      embed_dim=256,
      dropout_rate=0.1,  # BERT's hidden and attention dropout (BEiT's are 0: the video encoder's)
      attention_dropout_rate=0.1,
      dtype='float32',
      remat='none',
    )
  )


def loss_config(name: str = 'egonce') -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      name=name,
      temperature=0.05,  # EgoVLP's EgoNCE
      use_noun=True,
      use_verb=True,
      vtm_weight=1.0,
      mlm_weight=1.0,
      mlm_probability=0.15,  # BERT / the issue; SViTT's webvid config masks 0.5
    )
  )


def apply_variants(config: ml_collections.ConfigDict, args: set[str]) -> None:
  """The sparsity ablations and the objective switch, shared with svitt_ego_demo."""
  v = config.model.video
  if 'dense' in args or 'node' in args:
    v.attention = 'dense'
  if 'dense' in args or 'edge' in args:
    v.keep_rate = 1.0
    config.model.text.video_keep_rate = 1.0
  if 'infonce' in args:
    config.loss = loss_config('infonce')
    config.data.scene_negative_window = 0.0


def get_config(arg=None):
  args = common.parse_arg(arg, VARIANTS, __file__)
  config = common.pretraining_config(model_config())
  config.batch_size = 64
  config.total_steps = 600_000  # 10 epochs of 3.8M clips at 64
  config.checkpoint_steps = 5000
  config.loss = loss_config()
  config.optimizer.update(
    name='adamw',
    learning_rate=3e-5,
    end_learning_rate=3e-7,
    warmup_steps=60_000,  # one epoch
    schedule='cosine',
    b1=0.9,
    b2=0.999,
    eps=1e-8,  # torch AdamW's
    weight_decay=0.02,
  )
  config.data.modalities = ('video', 'text')
  config.data.fps = 30.0  # EgoClip clips are ~1 s: frames are sampled from the clip's span
  config.data.caption_clips = True  # each example is one narration's clip (EgoClip)
  config.data.scene_negative_window = 60.0
  config.data.num_nouns = 582  # EgoVLP's noun / verb taxonomy
  config.data.num_verbs = 118
  config.data.crop_area_range = (0.5, 1.0)  # SViTT's RandomResizedCrop(scale=(0.5, 1.0))
  config.data.crop_aspect_range = (0.75, 1.33)
  apply_variants(config, args)
  if 'runlocal' in args:
    runlocal(config)
  if 'frames8' in args:  # (after runlocal, which would set 4 frames)
    config.model.video.num_frames = 8
    if config.model.video.keep_rate < 1.0:  # (not with :dense or :edge)
      config.model.video.keep_rate = 0.6
  return config


def runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Tiny and synthetic: 4 frames of 32² (16 patch tokens), a 4-layer text encoder fusing from
  layer 1."""
  common.runlocal(config)
  m = config.model
  m.video.frame_size = 32
  m.video.block_size = 4
  m.video.token_drop_loc = (0, 1, 2)
  m.text.num_layers = 4
  m.text.fusion_layer = 1  # 3 fusion layers, as Base: the third sees the pruned video tokens
  m.text.num_narrations = 1
  m.text.max_words = 8
  m.embed_dim = 16
  config.data.name = 'synthetic'
  config.data.num_nouns = min(config.data.num_nouns, 8) if config.data.num_nouns else 0
  config.data.num_verbs = min(config.data.num_verbs, 6) if config.data.num_verbs else 0
  config.evals = {}
  return config
