"""Export: the bundle round trip and its loader's refusals, SavedModel parity, scripts/export.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipelines.text import Tokenizer, train_tokenizer
from tests.conftest import ROOT, load_config
from vatt_jax import export
from vatt_jax.models import build_model
from vatt_jax.train import trainer
from vatt_jax.workdir import load_model

CAPTIONS = [
  f'a {digit} drifts to the {side} over a {texture} background'
  for digit in ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
  for side in ('left', 'right', 'top', 'bottom')
  for texture in ('striped', 'dotted', 'plain')
]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A 2-step runlocal demo_tiny run whose config names a tiny sentencepiece tokenizer."""
  root = tmp_path_factory.mktemp('export')
  tokenizer = train_tokenizer(CAPTIONS, str(root / 'spm'), vocab_size=64)
  config = load_config(ROOT / 'configs' / 'demo_tiny.py', 'runlocal')
  config.total_steps, config.checkpoint_steps = 2, 2
  config.data.tokenizer = tokenizer  # (the synthetic source ignores it; the export picks it up)
  workdir = root / 'run'
  trainer.train(config, str(workdir))
  config, model, variables = load_model(str(workdir))
  return dict(root=root, workdir=str(workdir), config=config, model=model, variables=variables)


@pytest.fixture(scope='module')
def exported(run):
  output_dir = run['root'] / 'out'
  report = export.export_run(run['workdir'], str(output_dir))
  return output_dir, report


@pytest.fixture(scope='module')
def fresh(run):
  """Inputs the export's own parity check did not see (another seed and batch size) and the
  model's embeddings of them."""
  inputs = export.random_inputs(run['model'], batch_size=3, seed=7)
  return inputs, _reference(run, inputs)


def _reference(run, inputs):
  """The VATT flax module (jitted) on each modality alone, its outputs named as the encoders
  name them: '<modality>_<level>' and the tokenizer's mean-pooled output as 'input'."""
  module = run['model'].module
  apply = jax.jit(lambda variables, batch: module.apply(variables, batch, train=False))
  pooled = jax.jit(
    lambda variables, x, modality: module.apply(variables, modality, x, method='input_space'),
    static_argnums=2,
  )
  out = {}
  for modality, x in inputs.items():
    full = apply(run['variables'], {modality: x})
    out[modality] = {
      level: np.asarray(
        pooled(run['variables'], x, modality) if level == 'input' else full[f'{modality}_{level}']
      )
      for level in export.outputs(run['model'])[modality]
    }
  return out


@pytest.mark.slow
def test_export_writes_bundle_saved_model_and_report(run, exported):
  output_dir, report = exported
  assert sorted(os.listdir(output_dir)) == ['bundle', 'export.json', 'saved_model']
  assert json.loads((output_dir / 'export.json').read_text()) == json.loads(json.dumps(report))
  assert report['step'] == 2 and report['tokenizer'] == run['config'].data.tokenizer
  parity = report['parity']
  assert parity['passed'] and parity['max_relative_error'] <= 1e-4, parity
  assert (
    set(parity['saved_model'])
    == set(parity['bundle'])
    == {f'{m}/{k}' for m, names in export.outputs(run['model']).items() for k in names}
    == {'video/input', 'video/agg', 'video/va', 'video/vt', 'audio/input', 'audio/agg',
        'audio/va', 'text/input', 'text/agg', 'text/vt'}
  )  # fmt: skip
  info = json.loads((output_dir / 'bundle' / 'bundle.json').read_text())
  m = run['config'].model
  assert info['model'] == 'vatt' and report['model'] == 'vatt'
  assert info['inputs']['video']['shape'] == [None, m.video.num_frames, 32, 32, 3]
  assert info['outputs']['video'] == {
    'input': 64,
    'agg': 64,
    'va': m.head.va_dim,
    'vt': m.head.vt_dim,
  }
  assert info['preprocessing']['frame_size'] == [32, 32]
  assert info['preprocessing']['max_words'] == m.text.max_words
  assert info['preprocessing']['sample_rate'] == run['config'].data.sample_rate
  assert info['files']['tokenizer'] == 'tokenizer.model'
  assert info['num_parameters'] == sum(x.size for x in jax.tree.leaves(run['variables']['params']))


def test_bundle_round_trip(exported, fresh):
  encoders = export.load_bundle(str(exported[0]))  # the export dir or its bundle/ both work
  inputs, want = fresh
  got = {m: jax.tree.map(np.asarray, getattr(encoders, m)(x)) for m, x in inputs.items()}
  errors = export.relative_errors(got, want)
  assert len(errors) == 10 and max(errors.values()) <= 1e-6, errors
  with pytest.raises(ValueError, match=r'add a batch axis'):
    encoders.video(inputs['video'][0])
  with pytest.raises(ValueError, match=r'float32 in \[-1, 1\]'):
    encoders.video((inputs['video'] * 127 + 128).astype(np.uint8))
  with pytest.raises(ValueError, match=r'text ids must lie in \[0, 127\]'):
    encoders.text(np.full((1, 8), 500, np.int32))


def test_bundle_text_strings_use_the_bundled_tokenizer(run, exported):
  encoders = export.load_bundle(str(exported[0] / 'bundle'))
  captions = ['a seven drifts to the left', 'a two drifts to the top over a dotted background']
  ids = Tokenizer(run['config'].data.tokenizer).encode(captions, run['config'].model.text.max_words)
  assert (ids[0] > 0).sum() >= 3
  from_strings, from_ids = encoders.text(captions), encoders.text(ids)
  for name in ('input', 'agg', 'vt'):
    np.testing.assert_array_equal(np.asarray(from_strings[name]), np.asarray(from_ids[name]))
  one = encoders.text(captions[0])['vt']  # (batch 1 compiles apart: equal to rounding)
  np.testing.assert_allclose(np.asarray(one), from_ids['vt'][:1], rtol=1e-5, atol=1e-6)


def test_bundle_without_tokenizer_takes_ids_only(run, tmp_path):
  export.write_bundle(run['config'], run['variables'], str(tmp_path), None, fmt='msgpack')
  assert sorted(os.listdir(tmp_path / 'bundle')) == ['bundle.json', 'config.json', 'params.msgpack']
  encoders = export.load_bundle(str(tmp_path / 'bundle'))
  with pytest.raises(ValueError, match='no tokenizer.model'):
    encoders.text(['a seven'])
  ids = export.random_inputs(run['model'], 2)['text']
  want = _reference(run, {'text': ids})['text']['vt']
  np.testing.assert_allclose(np.asarray(encoders.text(ids)['vt']), want, rtol=1e-6, atol=1e-6)
  with pytest.raises(FileExistsError, match='already holds files'):
    export.write_bundle(run['config'], run['variables'], str(tmp_path))


@pytest.fixture(scope='module')
def video_only(tmp_path_factory):
  """The Kinetics classifier at runlocal (it embeds video only, at level 'agg'), randomly
  initialised, exported as a bundle and a CPU SavedModel."""
  config = load_config(ROOT / 'configs' / 'finetune_kinetics.py', 'runlocal')
  model = build_model(config.model)
  example = {k: np.zeros(s.shape, s.dtype) for k, s in model.example_batch(1).items()}
  variables = jax.jit(lambda key: model.init(key, example))(jax.random.key(3))
  output_dir = tmp_path_factory.mktemp('video_only')
  export.write_bundle(config, variables, str(output_dir), None, step=5)
  export.export_saved_model(model, variables, str(output_dir), platforms=('cpu',))
  return dict(output_dir=output_dir, config=config, model=model, variables=variables)


def test_export_of_a_model_without_text_has_only_its_video_encoder(video_only, tmp_path):
  model, variables = video_only['model'], video_only['variables']
  output_dir = video_only['output_dir']
  assert export.outputs(model) == {'video': ('agg',)}
  assert sorted(os.listdir(output_dir / 'bundle')) == [
    'bundle.json',
    'config.json',
    'params.safetensors',
  ]
  info = json.loads((output_dir / 'bundle' / 'bundle.json').read_text())
  m = video_only['config'].model
  width = np.shape(variables['params']['video_tower']['agg'])[-1]
  assert info['model'] == 'classifier' and info['step'] == 5
  assert info['inputs'] == {
    'video': {
      'shape': [None, m.video.num_frames, 32, 32, 3],
      'dtype': 'float32',
      'range': [-1.0, 1.0],
    }
  }
  assert info['outputs'] == {'video': {'agg': width}}
  assert info['preprocessing']['frame_size'] == [32, 32]
  assert not {'max_words', 'text', 'sample_rate', 'audio'} & set(info['preprocessing'])
  # The classifier module's own forward pass is the reference (its '<tower>_agg' output).
  inputs = export.random_inputs(model, batch_size=3, seed=7)
  assert set(inputs) == {'video'}
  full = jax.jit(lambda v, x: model.module.apply(v, {'video': x}))(variables, inputs['video'])
  want = {'video': {'agg': np.asarray(full['video_agg'])}}
  encoders = export.load_bundle(str(output_dir))
  assert encoders.modalities == ('video',)
  got = {'video': jax.tree.map(np.asarray, encoders.video(inputs['video']))}
  errors = export.relative_errors(got, want)
  assert list(errors) == ['video/agg'] and errors['video/agg'] <= 1e-6, errors
  import tensorflow as tf

  path = str(output_dir / 'saved_model')
  loaded = tf.saved_model.load(path)
  assert sorted(loaded.signatures) == ['video']
  assert sorted(loaded.signatures['video'].structured_outputs) == ['agg']
  errors = export.relative_errors(export.saved_model_embeddings(path, inputs), want)
  assert list(errors) == ['video/agg'] and errors['video/agg'] <= 1e-4, errors
  # A tokenizer has nothing to do in a bundle without a text encoder.
  (tmp_path / 'tokenizer.model').write_bytes(b'not read')
  with pytest.raises(ValueError, match="model 'classifier' embeds no text"):
    export.write_bundle(
      video_only['config'], variables, str(tmp_path), str(tmp_path / 'tokenizer.model')
    )
  assert not (tmp_path / 'bundle').exists()


@pytest.mark.parametrize('kind', ['ids', 'strings'])
def test_bundle_without_a_text_encoder_refuses_text(video_only, kind):
  encoders = export.load_bundle(str(video_only['output_dir'] / 'bundle'))
  text = np.ones((2, 8), np.int32) if kind == 'ids' else ['a seven drifts to the left']
  with pytest.raises(ValueError, match="model 'classifier' has no text encoder"):
    encoders.text(text)
  with pytest.raises(ValueError, match="model 'classifier' has no audio encoder"):
    encoders.audio(np.zeros((2, 2048), np.float32))


def test_loader_refuses_a_bundle_of_another_model(exported, tmp_path):
  bundle = tmp_path / 'bundle'
  shutil.copytree(exported[0] / 'bundle', bundle)
  config = json.loads((bundle / 'config.json').read_text())
  config['model']['head']['va_dim'] = 48
  (bundle / 'config.json').write_text(json.dumps(config))
  with pytest.raises(
    ValueError, match=r'does not hold this model: .*head/audio_va_bn/mean: \(32,\).*\(48,\)'
  ):
    export.load_bundle(str(bundle))


def test_loader_names_missing_and_corrupt_files(exported, tmp_path):
  bundle = tmp_path / 'bundle'
  shutil.copytree(exported[0] / 'bundle', bundle)
  params = bundle / 'params.safetensors'
  data = params.read_bytes()
  params.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r'params.safetensors is corrupt: its sha256'):
    export.load_bundle(str(bundle))
  info = json.loads((bundle / 'bundle.json').read_text())
  del info['sha256']  # without checksums the reader itself must fail clearly
  (bundle / 'bundle.json').write_text(json.dumps(info))
  with pytest.raises(ValueError, match=r'params.safetensors cannot be read'):
    export.load_bundle(str(bundle))
  params.unlink()
  with pytest.raises(FileNotFoundError, match=r'params.safetensors is missing'):
    export.load_bundle(str(bundle))
  (bundle / 'bundle.json').unlink()
  with pytest.raises(FileNotFoundError, match=r'bundle.json is missing'):
    export.load_bundle(str(bundle))


def test_saved_model_parity_on_fresh_inputs(run, exported):
  import tensorflow as tf

  path = str(exported[0] / 'saved_model')
  inputs = export.random_inputs(run['model'], batch_size=3, seed=7)  # another batch size
  errors = export.relative_errors(
    export.saved_model_embeddings(path, inputs), _reference(run, inputs)
  )
  assert len(errors) == 10 and max(errors.values()) <= 1e-4, errors
  loaded = tf.saved_model.load(path)
  assert sorted(loaded.signatures) == ['audio', 'text', 'video']
  spec = loaded.signatures['text'].structured_input_signature[1]['text']
  assert spec.shape.as_list() == [None, 8] and spec.dtype == tf.int32
  assert sorted(loaded.signatures['video'].structured_outputs) == ['agg', 'input', 'va', 'vt']
  assert os.path.basename(loaded.tokenizer_model.asset_path.numpy().decode()) == 'tokenizer.model'


@pytest.mark.slow
def test_parity_failure_leaves_output_dir_untouched(run, exported, tmp_path):
  output_dir = tmp_path / 'out'
  shutil.copytree(exported[0], output_dir)
  before = sorted(p.name for p in output_dir.iterdir())
  with pytest.raises(export.ParityError, match='left untouched'):  # every error exceeds -1
    export.export_run(
      run['workdir'], str(output_dir), saved_model=False, overwrite=True, tolerance=-1.0
    )
  assert sorted(p.name for p in output_dir.iterdir()) == before
  (failed,) = [p for p in tmp_path.iterdir() if p.name.startswith('out.failed-')]
  assert not json.loads((failed / 'export.json').read_text())['parity']['passed']
  assert not [p for p in tmp_path.iterdir() if '.partial-' in p.name or '.old-' in p.name]
  report = export.export_run(run['workdir'], str(output_dir), saved_model=False, overwrite=True)
  assert report['parity']['passed'] and report['saved_model'] is None
  assert sorted(p.name for p in output_dir.iterdir()) == ['bundle', 'export.json']


def test_script_refuses_to_overwrite(run, exported, tmp_path):
  output_dir = exported[0]
  before = {p: p.stat().st_mtime_ns for p in output_dir.rglob('*')}
  script = [sys.executable, str(ROOT / 'scripts' / 'export.py'), f'--workdir={run["workdir"]}']
  result = subprocess.run([*script, f'--output_dir={output_dir}'], capture_output=True, text=True)
  assert result.returncode == 1 and 'pass --overwrite' in result.stderr, result.stderr[-2000:]
  (tmp_path / 'notes.txt').write_text('not an export')
  result = subprocess.run(
    [*script, f'--output_dir={tmp_path}', '--overwrite'],
    capture_output=True,
    text=True,
  )
  assert result.returncode == 1 and 'not an earlier export' in result.stderr, result.stderr[-2000:]
  assert (tmp_path / 'notes.txt').read_text() == 'not an export'
  assert {p: p.stat().st_mtime_ns for p in output_dir.rglob('*')} == before
  # An earlier export with a file of the user's beside it: --overwrite would delete it, so refused.
  (output_dir / 'notes.txt').write_text('mine')
  before = {p: p.stat().st_mtime_ns for p in output_dir.rglob('*')}
  result = subprocess.run(
    [*script, f'--output_dir={output_dir}', '--overwrite'], capture_output=True, text=True
  )
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'also notes.txt, which no export writes' in result.stderr.strip().splitlines()[-1]
  assert {p: p.stat().st_mtime_ns for p in output_dir.rglob('*')} == before


@pytest.mark.slow
def test_script_end_to_end(run, tmp_path):
  output_dir = tmp_path / 'export'
  script = [sys.executable, str(ROOT / 'scripts' / 'export.py'), f'--workdir={run["workdir"]}']
  command = [*script, f'--output_dir={output_dir}', '--platforms=cpu']
  result = subprocess.run(command, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((output_dir / 'export.json').read_text())
  assert report['parity']['passed'] and report['platforms'] == ['cpu']
  assert 'max relative error' in result.stdout
