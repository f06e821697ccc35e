r"""A test-only experiment: the bag-of-patches dual encoder of tests/toy_models.py, registered from
outside the package, pretrained and evaluated by the unchanged trainer, evaluators and scripts.

  PYTHONPATH=. python scripts/train.py --config=tests/toy_config.py --workdir=/tmp/toy \
      --config.data.path=SHARDS

Arguments: `pairs` (the pair-scoring model, evaluated by retrieval through its pair score).
"""

from configs import common
from tests import toy_models

VARIANTS = ('pairs',)


def get_config(arg=None):
  args = common.parse_arg(arg, VARIANTS, __file__)
  name = 'pair_scorer' if 'pairs' in args else 'bag_of_patches'
  config = common.pretraining_config(toy_models.model_config(name))
  config.loss = dict(name='toy_nce', temperature=0.1)
  config.batch_size = 4
  config.total_steps = 3
  config.log_steps = 1
  config.checkpoint_steps = 3
  config.optimizer.warmup_steps = 1
  config.optimizer.learning_rate = 1e-3
  config.data.fps = 10.0
  config.data.shuffle_buffer = 8
  probe = dict(type='linear_probe', modality='video', train_split='segments_train',
               test_split='segments_test', steps=20, num_clips=2, batch_size=4)  # fmt: skip
  config.evals = dict(
    linear_probe=probe,
    retrieval=dict(type='retrieval', split='segments_test', num_clips=2, batch_size=4),
  )
  return config
