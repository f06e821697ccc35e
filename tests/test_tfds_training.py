"""ImageNet fine-tuning's TFDS input through the real trainer: it trains, and resumes bit for bit.

The set is a real TFDS dataset prepared here (tests/test_sources.py NumberedImages: 40 images in 4
files), not tfds.testing.mock_data: the mock swaps the filesystem (tf.io.gfile and epath) while it
loads, and the trainer's orbax CheckpointManager cleans its directory in a background thread at that
moment, which then looks in the mock's temporary folder and fails (seen once in eight runs).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.conftest import ROOT, load_config
from tests.test_sources import numbered_images  # noqa: F401 (a fixture)
from vatt_jax.train import trainer
from vatt_jax.workdir import load_model


def _config(tfds_set: tuple[str, str], total_steps: int):
  """configs/finetune_imagenet.py at runlocal (the tiny model), reading the TFDS image set."""
  config = load_config(ROOT / 'configs' / 'finetune_imagenet.py', 'runlocal')
  config.data.name = 'tfds'
  config.data.tfds_name, config.data.tfds_data_dir = tfds_set
  config.data.modality = 'image'
  config.data.shuffle_buffer = 8
  config.model.num_classes = 40  # NumberedImages' labels
  config.evals = {}
  config.batch_size = 4
  config.total_steps = total_steps
  config.checkpoint_steps = 1
  config.log_steps = 1
  # The schedule depends on total_steps; without warm-up, step 1 runs at the peak rate in both the
  # 1-step and the 2-step run, so 1 step + 1 resumed step is the 2-step run exactly.
  config.optimizer.warmup_steps = 0
  return config


def _params(workdir) -> dict[str, np.ndarray]:
  """The final {'params', 'batch_stats'} leaves of a run, read back from its checkpoint."""
  _, _, variables = load_model(str(workdir))
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


@pytest.mark.slow
def test_finetune_from_tfds_trains_and_resumes_bit_for_bit(tmp_path, numbered_images):  # noqa: F811
  straight = trainer.train(_config(numbered_images, 2), str(tmp_path / 'straight'))
  assert [r['step'] for r in straight] == [1, 2]
  assert all(np.isfinite(r['loss']) for r in straight)

  first = trainer.train(_config(numbered_images, 1), str(tmp_path / 'resumed'))
  second = trainer.train(_config(numbered_images, 2), str(tmp_path / 'resumed'))  # from step 1
  assert [r['step'] for r in first] == [1] and [r['step'] for r in second] == [2]
  assert first[0]['loss'] == straight[0]['loss']
  assert second[0]['loss'] == straight[1]['loss']  # the second batch, on the same parameters

  want, got = _params(tmp_path / 'straight'), _params(tmp_path / 'resumed')
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
