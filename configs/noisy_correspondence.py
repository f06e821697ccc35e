r"""The noisy-correspondence benchmark's recipe: one model, one budget, every method as a variant.

scripts/experiments/noisy_correspondence.py trains this config on demo data with injected
misalignment (caption swap / shift / irrelevant captions / audio swap) and compares the methods on
the clean held-out data (docs/results/noisy_correspondence.md):

  (none)       the MIL-NCE baseline: demo_tiny's VATT with one shared tiny backbone (VATT-MA, the
               harmonization paper's model), NCE + MIL-NCE, 900 steps of batch 32
  gr, cl       cross-modality gradient realignment / the gradient-alignment curriculum (Wu et al.,
               NeurIPS 2022; docs/HARMONIZATION.md); both: `gr,cl`
  monitor      the baseline's update, with the two losses' gradient cosine logged every step
  norton       Norton post-training (Lin et al., ICLR 2024; docs/NORTON.md): the last POST_STEPS of
               the budget, started from the baseline run's checkpoint at step TOTAL − POST_STEPS
               (config.init_from / init_from_step, set by the script), on batches of 8 videos × 4
               clips with the clip–caption and video–paragraph OT losses (video and text only)
  post_milnce  the same post-training with the plain contrastive loss: Norton's control
  runlocal     tiny model, synthetic data, no evaluations (runlocal_on_shards: the benchmark's test)

Every method sees the same data in the same order for a given config.seed (data.deterministic),
so the seeds pair runs across methods. The evaluations (at the end only) read the clean dataset's
per-segment shards (video linear probe, text→video retrieval) and its long test videos
(paragraph→video by optimal transport and by the mean similarity, caption→clip).

  python scripts/train.py --config=configs/noisy_correspondence.py:gr,cl --workdir=/tmp/nc \
      --config.data.path=demo/experiments/noisy_correspondence/data/caption_swap30/shards
"""

from configs import common, demo_tiny, norton_demo

# The :variants this file knows (configs/common.parse_arg refuses any other).
VARIANTS = ('runlocal', 'gr', 'cl', 'monitor', 'norton', 'post_milnce')
TOTAL_STEPS = 900  # the whole grid (162 runs) fits in 8 hours on 2 CPU cores
POST_STEPS = 300  # post-training methods: the last third of the budget
SEGMENTS = 4  # captions (and clips) per demo video: a Norton paragraph


def get_config(arg=None):
  args = common.parse_arg(arg, VARIANTS, __file__)
  post = sorted(args & {'norton', 'post_milnce'})
  if len(post) > 1 or (post and args & {'gr', 'cl', 'monitor'}):
    raise ValueError(f'--config=…:{arg}: norton / post_milnce are methods of their own')
  pretraining = ','.join(['ma', *sorted(args & {'gr', 'cl', 'monitor'})])
  if post:
    config = norton_demo.get_config('milnce' if post == ['post_milnce'] else None)
    config.total_steps = POST_STEPS
    config.checkpoint_steps = POST_STEPS
    config.init_from = ''  # the script names the baseline run and its step
    config.data.long_video = dict(clips=SEGMENTS, max_clips=SEGMENTS)
    if post == ['norton']:
      config.loss.length = SEGMENTS
    config.model.backbone, config.model.shared_size = 'modality_agnostic', 'tiny'
  else:
    config = demo_tiny.get_config(pretraining)
    config.total_steps = TOTAL_STEPS
    config.checkpoint_steps = POST_STEPS  # post-training starts from step TOTAL − POST
  config.data.path = ''  # set by the script: one noise kind and level
  config.keep_checkpoints = 3  # 300, 600, 900: the post-training methods start from 600
  config.evals = evaluations(bool(post))
  if 'runlocal' in args:
    common.runlocal(config)
    config.evals = {}  # they read the demo's shards; runlocal has synthetic data
  return config


def evaluations(post: bool) -> dict:
  """The benchmark's evaluations, all at the end of training, on the clean dataset (every
  data.path is set by the script): video linear probe and text→video retrieval over the
  per-segment shards, paragraph→video and caption→clip retrieval over the long test videos."""
  # Post-training reads long videos (data.long_video); the per-segment evaluations do not.
  segments = dict(path='', long_video=dict(clips=0)) if post else dict(path='')
  probe = dict(type='linear_probe', train_split='segments_train', test_split='segments_test',
               num_classes=10, steps=2000, num_clips=4, modality='video', log_steps=0)  # fmt: skip
  return dict(
    linear_probe=dict(probe, data=segments),
    retrieval=dict(
      type='retrieval', split='segments_test', num_clips=4, log_steps=0, data=segments
    ),  # fmt: skip
    long_video=dict(
      type='long_video_retrieval',
      split='test',
      batch_size=8,
      log_steps=0,
      data=dict(
        path='', modalities=('video', 'text'), long_video=dict(clips=SEGMENTS, max_clips=SEGMENTS)
      ),
    ),  # fmt: skip
  )


def runlocal_on_shards(config, post: bool):
  """A `runlocal` config made to read the benchmark's test-size demo shards and evaluate on them
  (scripts/experiments/noisy_correspondence.py --runlocal)."""
  config.data.name = 'shards'
  config.model.text.vocab_size = 1024
  config.model.audio.num_samples = 3200  # 4 frames at 10 fps: 0.4 s at 8 kHz
  config.total_steps = 2 if post else 4
  config.checkpoint_steps = 2
  config.evals = evaluations(post)
  for eval_cfg in config.evals.values():
    eval_cfg.num_clips = 1
  config.evals.linear_probe.steps = 50
  return config
