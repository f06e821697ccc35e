r"""allinone_base: All-in-one-B pretraining (seed 001; Wang et al., CVPR 2023; showlab/all-in-one).

ONE ViT-B/16 transformer (12 blocks, width 768, 12 heads) over 3 frames at 224² and 40 text tokens
([CLS] + 38 ids + [SEP]): per frame the sequence [text; 197 frame tokens], frame tokens rolled in
time before every block (temporal token rolling, n_div 8: 29 tokens each way), outputs averaged
over the frames; VTM on the pooled text [CLS] (half the pairs with another clip, as the
reference), MLM on the text positions (0.15, tied decoder), and the unimodal contrastive loss
between the text-only and video-only [CLS] rows in a 512-d space (the reference's ind_itc, τ 0.05)
— weights 1, 1, 1 (the reference's default task trains itm + mlm; ind_itc is its optional third).

  python scripts/prepare_data.py --manifest=webvid.csv --media_root=webvid --output_dir=data/webvid/train
  python scripts/train_tokenizer.py --input_dir=data/webvid/train --output=data/webvid/tokenizer
  python scripts/train.py --config=configs/allinone_base.py --workdir=runs/allinone_b \
      --config.data.path=data/webvid

Recipe (AllInOne/config.py and the slides): AdamW lr 1e-4, weight decay 0.01, 10 % linear warm-up
then linear decay to 0; batch 2048 for 400k steps (the slides; the config's default batch is 4096);
hidden dropout 0.1, stochastic depth 0.1 (timm's ViT), no attention dropout. Parameters (tied MLM
head, BERT's 30522-row table: --config.model.text.vocab_size=30519): scripts/model_summary.py.
Hardware and time of a full run: 128 A100 for 2 days in the paper (not measured here).

Arguments (comma-separated): tiny / small (All-in-one-Ti / -S: ViT-Ti/16, ViT-S/16), none (no
rolling: the time-average baseline), flatten (one joint sequence of text and every frame), hard
(SViTT-Ego's hard negatives for VTM instead of the reference's random half), untied (the
reference's own MLM decoder matrix), runlocal (tiny and synthetic, for tests).
"""

import ml_collections

from configs import common

VARIANTS = ('runlocal', 'tiny', 'small', 'none', 'flatten', 'hard', 'untied')


def model_config() -> ml_collections.ConfigDict:
  """All-in-one-B (vatt_jax/models/allinone.py)."""
  return ml_collections.ConfigDict(
    dict(
      name='allinone',
      size='base',  # allinone_config.SIZES: 'tiny' (ViT-Ti), 'small' (ViT-S), 'base' (ViT-B)
      num_layers=0,  # 0: the size's (overrides for small demos)
      width=0,
      mlp_dim=0,
      num_heads=0,
      temporal='roll',  # 'roll' (All-in-one), 'none' (time average), 'flatten'
      roll_div=8,  # fold = tokens // roll_div roll each way
      video=dict(num_frames=3, frame_size=224, patch_size=16),
      text=dict(
        vocab_size=2**15,  # the tokenizer's; the model adds [CLS], [SEP], [MASK]
        max_words=38,  # + [CLS] and [SEP]: the reference's max_text_len 40
        num_narrations=1,
      ),
      embed_dim=512,  # the reference's shared_embedding_dim
      dropout_rate=0.1,
      attention_dropout_rate=0.0,
      drop_path_rate=0.1,
      mlm_tied=True,
      pair_score='match_logit',  # the reference's rank_output; or 'log_odds'
      dtype='float32',
      remat='none',
    )
  )


def loss_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      name='allinone',
      temperature=0.05,  # the reference's ind_itc
      vtm_weight=1.0,
      mlm_weight=1.0,
      itc_weight=1.0,
      negatives='reference',  # or 'hard' (SViTT-Ego's sampler)
      mlm_probability=0.15,
    )
  )


def apply_variants(config: ml_collections.ConfigDict, args: set[str]) -> None:
  """The ablation switches, shared with allinone_demo."""
  m = config.model
  if 'none' in args and 'flatten' in args:
    raise ValueError('allinone variants none and flatten exclude each other')
  if 'none' in args:
    m.temporal = 'none'
  if 'flatten' in args:
    m.temporal = 'flatten'
  if 'hard' in args:
    config.loss.negatives = 'hard'
  if 'untied' in args:
    m.mlm_tied = False


def get_config(arg=None):
  args = common.parse_arg(arg, VARIANTS, __file__)
  config = common.pretraining_config(model_config())
  if 'tiny' in args and 'small' in args:
    raise ValueError('allinone variants tiny and small exclude each other')
  for size in ('tiny', 'small'):
    if size in args:
      config.model.size = size
  config.batch_size = 2048
  config.total_steps = 400_000
  config.checkpoint_steps = 5000
  config.loss = loss_config()
  config.optimizer.update(
    name='adamw',
    learning_rate=1e-4,
    end_learning_rate=0.0,
    warmup_steps=40_000,  # 10 %
    schedule='linear',
    b1=0.9,
    b2=0.999,
    eps=1e-8,  # torch AdamW's
    weight_decay=0.01,
  )
  config.data.modalities = ('video', 'text')
  config.data.caption_clips = True  # each example is one caption's clip
  apply_variants(config, args)
  if 'runlocal' in args:
    runlocal(config)
  return config


def runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Tiny and synthetic: a 2-block, 64-wide transformer over 4 frames of 32² (16 patches)."""
  common.runlocal(config)
  m = config.model
  m.size = 'tiny'
  m.num_layers, m.width, m.mlp_dim, m.num_heads = 2, 64, 128, 4
  m.video.frame_size = 32
  m.video.patch_size = 8
  m.text.num_narrations = 1
  m.embed_dim = 16
  config.data.name = 'synthetic'
  config.evals = {}
  return config
