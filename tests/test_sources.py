"""Every data source speaks data_pipelines.Source: a JSON position that resumes the same stream."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import NamedTuple

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tensorflow_datasets.testing.mocking  # noqa: F401 (at collection; see tests/conftest.py)
from etils import epath

import data_pipelines
from tests import test_classification, test_long_video, test_pipeline
from tests.conftest import ROOT, load_config
from tests.test_pipeline import tokenizer_path  # noqa: F401 (a fixture)


class Case(NamedTuple):
  config: ml_collections.ConfigDict
  batch_size: int
  source_class: str  # the class data_pipelines.build must pick for it
  context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@pytest.fixture(scope='module')
def shard_root(tmp_path_factory):
  """A few tiny records: plain ones (test_pipeline) and caption-rich ones (test_long_video)."""
  root = tmp_path_factory.mktemp('sources')
  test_pipeline._write(
    root / 'plain' / 'train' / 'a.tfrecord', map(test_pipeline._record, range(3))
  )
  test_pipeline._write(
    root / 'plain' / 'train' / 'b.tfrecord', map(test_pipeline._record, range(3, 6))
  )
  long = [test_long_video._record(i, 3 + i % 2) for i in range(6)]
  test_pipeline._write(root / 'long' / 'train' / 'a.tfrecord', long[0::2])
  test_pipeline._write(root / 'long' / 'train' / 'b.tfrecord', long[1::2])
  return root


def _synthetic(request) -> Case:
  return Case(load_config(ROOT / 'configs' / 'vatt_bbs.py', 'runlocal').data, 2, 'SyntheticSource')


def _shards(request) -> Case:
  root, tokenizer = request.getfixturevalue('shard_root'), request.getfixturevalue('tokenizer_path')
  return Case(test_pipeline._config(root / 'plain', tokenizer), 2, 'ShardSource')


def _long_video(request) -> Case:
  root, tokenizer = request.getfixturevalue('shard_root'), request.getfixturevalue('tokenizer_path')
  cfg = test_long_video._config(root / 'long', tokenizer, clips=2, max_clips=4)
  return Case(cfg, 4, 'LongVideoSource')


def _tfds(request) -> Case:
  cfg = test_classification._config(
    tfds_name='imagenet2012', modality='image', image_key='image', num_frames=2, frame_size=16
  )
  return Case(cfg, 2, 'TfdsSource', lambda: tfds.testing.mock_data(num_examples=5))


# Test data per SOURCES key ('key:variant' for another class behind the same key). A new source
# fails test_source_protocol_and_resume until it has a case here.
CASES = {
  'synthetic': _synthetic,
  'shards': _shards,
  'shards:long_video': _long_video,
  'tfds': _tfds,
}


def _take(source, n: int) -> list[dict[str, np.ndarray]]:
  return [next(source) for _ in range(n)]


@pytest.mark.parametrize('name', sorted({*data_pipelines.SOURCES, *CASES}))
def test_source_protocol_and_resume(name, request):
  assert name.split(':')[0] in data_pipelines.SOURCES, f'case {name!r} names no source'
  if name not in CASES:
    pytest.fail(
      f'data_pipelines.SOURCES[{name!r}] has no test data: add it to CASES in tests/test_sources.py'
    )
  case = CASES[name](request)

  def build():
    source = data_pipelines.build(case.config, 'train', batch_size=case.batch_size, seed=3)
    assert type(source).__name__ == case.source_class
    assert isinstance(source, data_pipelines.Source)
    assert iter(source) is source
    return source

  with case.context():
    source = build()
    try:
      start = json.loads(json.dumps(source.get_state()))
      _take(source, 2)
      saved = json.loads(json.dumps(source.get_state()))  # as a checkpoint stores it
      assert saved != start
      expected = _take(source, 2)
    finally:
      source.close()
    fresh = build()
    try:
      fresh.set_state(saved)
      resumed = _take(fresh, 2)
    finally:
      fresh.close()

  for step, (want, got) in enumerate(zip(expected, resumed, strict=True)):
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f'batch {step}, field {key}')


class NumberedImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """40 small textured images (label i: image i) in 4 files, for the real TFDS reader: mock_data
  ignores shuffle_files and read_config, and swaps the filesystem while it loads (a race with any
  other thread using files, e.g. orbax's checkpoint threads in a training run)."""

  VERSION = tfds.core.Version('1.0.0')
  # TFDS looks for the builder's code as a package resource, which fails for a test module.
  code_path = epath.Path(__file__)

  def _info(self):
    features = {
      'image': tfds.features.Image(shape=(None, None, 3)),
      'label': tfds.features.ClassLabel(num_classes=40),
    }
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(40):
      texture = np.random.default_rng(i).integers(0, 256, (12 + i % 5, 16, 3), dtype=np.uint8)
      yield i, {'image': texture, 'label': i}


@pytest.fixture(scope='module')
def numbered_images(tmp_path_factory) -> tuple[str, str]:
  """(tfds name, data_dir) of NumberedImages, prepared in 4 files."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = NumberedImages(data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=4))
  assert builder.info.splits['train'].num_shards == 4
  return builder.name, data_dir


def test_tfds_resume_over_shuffled_files_and_epochs(numbered_images):
  name, data_dir = numbered_images
  cfg = test_classification._config(
    tfds_name=name, tfds_data_dir=data_dir, modality='image', image_key='image', num_frames=2,
    frame_size=8, shuffle_buffer=3,
  )  # fmt: skip

  def source(state=None):
    s = data_pipelines.build(cfg, 'train', batch_size=4, seed=5)
    if state is not None:
      s.set_state(state)
    return s

  first = source()
  head = _take(first, 3)
  state = first.get_state()
  tail = _take(first, 12)  # past the end of the 10-batch epoch: the files are shuffled again
  first.close()
  labels = np.concatenate([b['label'] for b in head + tail]).tolist()
  assert len(set(labels)) == 40 and labels[:40] != list(range(40))  # all of them, shuffled
  resumed = source(state)
  again = _take(resumed, 12)
  resumed.close()
  for want, got in zip(tail, again, strict=True):
    np.testing.assert_array_equal(got['label'], want['label'])
    np.testing.assert_array_equal(got['video'], want['video'])
