r"""norton_demo: Norton post-training (Lin et al., ICLR 2024) of the demo's pretrained VATT on long
videos, with the clip–caption and video–paragraph optimal-transport losses.

Starts from a demo_tiny pretraining run (config init_from, `make demo` writes demo/run) and trains
its video and text towers on long videos: batches of V = 8 videos × C = 4 consecutive clips, each
clip anchored on one caption (data.long_video); the video–paragraph loss aligns each video's 4
captions with its 4 clips by a bucket Sinkhorn plan (docs/NORTON.md). The demo's "long" videos have
4 segments (Norton's paragraphs have 8 clips: loss.length = 8 in norton_loss(); with 8-segment
demo videos every paragraph names 8 of the same 10 digits and paragraphs are hard to tell apart).

  python scripts/make_demo_data.py --output_dir=demo/long --segments=4,4 \
      --caption_shift=0.3 --caption_irrelevant=0.15      # long videos with noisy captions
  python scripts/prepare_data.py ...   # (scripts/experiments/noisy_correspondence.py does it all)
  python scripts/train.py --config=configs/norton_demo.py --workdir=demo/norton \
      --config.data.path=demo/long/shards --config.init_from=demo/run

Arguments (comma-separated):
  milnce     the baseline: the same post-training with the plain contrastive (MIL-NCE) loss
  layernorm  only the layer norms train (Norton post-trains VideoCLIP this way)
  runlocal   tiny and synthetic (tests; no init_from, no evals)

Norton's own recipe (HowTo100M features, VideoCLIP init): Adam (0.9, 0.98), 1e-5, 1000 warm-up
steps, polynomial decay, clip norm 2.0, batches of clip_per_video 8 × length 8, ε 0.1 for the
paragraph plan, ε 1 and β 0.3 for the faulty-negative targets, 0.1 for the paragraph term. This
demo keeps the losses' values and scales the schedule to a short CPU run.
"""

import dataclasses

import ml_collections

from configs import common, demo_tiny
from vatt_jax.losses import NortonOptions


def norton_loss() -> ml_collections.ConfigDict:
  """Norton's loss with its defaults (vatt_jax.losses.NortonOptions, where each is explained)."""
  return ml_collections.ConfigDict(dict(name='norton', **dataclasses.asdict(NortonOptions())))


# The :variants this file knows (configs/common.parse_arg refuses any other).
VARIANTS = ('runlocal', 'milnce', 'layernorm')


def get_config(arg=None):
  args = common.parse_arg(arg, VARIANTS, __file__)
  config = demo_tiny.get_config()
  config.init_from = 'demo/run'  # the pretraining run of `make demo`
  config.init_from_step = -1
  m = config.model
  m.token_outputs = True
  m.video.drop_token_rate = 0.0  # every temporal position keeps its tokens (frame features)
  config.data.path = 'demo/long/shards'
  config.data.modalities = ('video', 'text')
  config.data.long_video = dict(clips=4, max_clips=8)
  config.batch_size = 32  # 8 videos × 4 clips
  config.total_steps = 1000
  config.log_steps = 100
  config.checkpoint_steps = 500
  config.optimizer.learning_rate = 1e-4
  config.optimizer.end_learning_rate = 1e-5
  config.optimizer.warmup_steps = 30
  config.optimizer.b2 = 0.98
  config.optimizer.grad_clip_norm = 2.0
  config.loss = norton_loss()
  config.loss.length = 4  # a paragraph: one demo video's 4 captions
  # Checked: a paragraph may not straddle two videos.
  config.loss.clips_per_video = config.data.long_video.get_ref('clips')
  config.evals = dict(
    long_video=dict(type='long_video_retrieval', split='test', batch_size=8, log_steps=1000)
  )
  if 'milnce' in args:  # plain contrastive post-training on the same batches (no audio term)
    config.loss = ml_collections.ConfigDict(
      dict(name='vatt', temperature=0.07, weight_va=0.0, weight_vt=1.0)
    )
  if 'layernorm' in args:
    config.optimizer.trainable = 'layernorm'
  if 'runlocal' in args:
    common.runlocal(config)
    config.init_from = ''
    config.data.long_video.max_clips = 4
    config.evals = {}
  return config
