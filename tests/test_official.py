"""The official VATT checkpoints (issue 16): conversion against an independent float64 reference.

Official-format checkpoints are built here (tests/official_vatt.py: TF variables under the official
object-graph keys, random values for every variable, Adam slots beside them), converted by
vatt_jax/official.py (or scripts/convert_official.py), and the converted model's seven outputs
compared with the float64 numpy forward of the official architecture, written from the official
code. Frames are 32 × 48 in the modality-specific case, so the official vertical (H) and horizontal
(W) position tables cannot be confused; the modality-agnostic model has one spatial table size in
the official code, so its frames are square.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import vatt_bbs, vatt_ma_medium
from tests import official_vatt as ov
from vatt_jax import official, official_workdir
from vatt_jax import workdir as workdir_lib
from vatt_jax.cli import UserError
from vatt_jax.models import build_model
from vatt_jax.models.contract import abstract_variables
from vatt_jax.models.vatt_config import ADDED_FIELDS
from vatt_jax.train import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5  # max |converted − reference| / max |reference|, per output


def official_config(kind: str, *, height: int = 32, width: int = 48):
  """The official reference's tiny sizes (MLP 256, as vatt-jax's 'tiny' encoder)."""
  if kind == 'bbs':
    tower = ov.Tower(d_ff=256)
    return ov.TinyOfficial(height=height, width=width, video=tower, audio=tower, text=tower)
  return ov.TinyOfficialMA(tower=ov.Tower(d_ff=256))


def jax_config(kind: str, ocfg) -> ml_collections.ConfigDict:
  """The `:official` preset (runlocal sizes) with the reference's input sizes."""
  module = vatt_bbs if kind == 'bbs' else vatt_ma_medium
  config = module.get_config('runlocal,official')
  m = config.model
  m.video.num_frames, m.video.patch_size = ocfg.frames, (ocfg.temporal_patch, 16, 16)
  if ocfg.height == ocfg.width:
    m.video.frame_size = ocfg.height
  else:  # (H, W): the typed field takes an int, so the section is rebuilt (tests only)
    m.video = ml_collections.ConfigDict(
      {**m.video.to_dict(), 'frame_size': (ocfg.height, ocfg.width)}
    )
  m.audio.num_samples, m.audio.patch_size = ocfg.audio_samples, ocfg.audio_patch
  m.text.vocab_size, m.text.max_words = ocfg.vocab_size, ocfg.num_words
  m.head.va_dim, m.head.vt_dim = ocfg.d_va, ocfg.d_vt
  if kind == 'ma':
    m.post_projection = ocfg.d_post_proj
  return config


def write_official(directory, kind: str, ocfg, seed: int, **kwargs) -> tuple[dict, str]:
  weights = ov.random_weights(kind, ocfg, rng=seed)
  ov.write_checkpoint(ov.official_keys(weights), str(directory), **kwargs)
  return weights, os.path.join(str(directory), 'ckpt-500000')


def convert(path: str, config) -> tuple:
  model = build_model(config.model)
  ckpt = official.read_checkpoint(path)
  return model, official.convert(ckpt, config.model, abstract_variables(model))


def relative_errors(got: dict, want: dict) -> dict[str, float]:
  return {
    k: float(np.abs(np.asarray(got[k], np.float64) - want[k]).max() / np.abs(want[k]).max())
    for k in ov.OUTPUTS
  }


@pytest.mark.parametrize(
  'kind, seed',
  [('bbs', 0), pytest.param('bbs', 1, marks=pytest.mark.slow), ('ma', 2),
   pytest.param('ma', 3, marks=pytest.mark.slow)],
)  # fmt: skip
def test_converted_model_matches_the_official_reference(tmp_path, kind, seed):
  ocfg = official_config(kind)
  weights, path = write_official(tmp_path, kind, ocfg, seed)
  model, variables = convert(path, jax_config(kind, ocfg))
  video, audio, text = ov.random_inputs(ocfg, batch=3, rng=seed + 10, num_pad=(0, 3, 7))
  want = ov.forward(kind, weights, ocfg, video, audio, text)
  got = official_workdir.embed(model, variables, {'video': video, 'audio': audio, 'text': text})
  assert sorted(got) == sorted(ov.OUTPUTS)
  for name in ov.OUTPUTS:
    assert got[name].shape == want[name].shape, name
  errors = relative_errors(got, want)
  assert max(errors.values()) < RTOL, errors


def test_position_tables_are_mapped_by_axis(tmp_path):
  """Swapping the official vertical (H, 2 rows) and horizontal (W, 3 rows) tables is refused by
  shape; on square frames a transposition would pass silently, so the values are checked too."""
  ocfg = official_config('bbs', height=32, width=32)
  weights, path = write_official(tmp_path, 'bbs', ocfg, 4)
  _, variables = convert(path, jax_config('bbs', ocfg))
  tokenizer = variables['params']['video_tower']['tokenizer']
  video = weights['video']
  np.testing.assert_array_equal(
    tokenizer['horizontal_position'],  # vatt-jax: one row per patch row (H)
    video['pos_embedding_lookup/vertical_position_embeddings/embeddings'],
  )
  np.testing.assert_array_equal(
    tokenizer['vertical_position'],  # one row per patch column (W)
    video['pos_embedding_lookup/horizontal_position_embeddings/embeddings'],
  )


def test_adam_slots_and_the_optimizer_are_not_read(tmp_path):
  """The reference's slots hold −value (m) and value² (v): a converter that read one of them would
  give other parameters. The optimizer step is read as the workdir's step."""
  ocfg = official_config('bbs')
  weights, path = write_official(tmp_path, 'bbs', ocfg, 5)
  ckpt = official.read_checkpoint(path)
  assert ckpt.step == 500000
  assert not any('OPTIMIZER_SLOT' in name for name in ckpt.variables.values())
  _, variables = convert(path, jax_config('bbs', ocfg))
  np.testing.assert_array_equal(
    variables['params']['text_tower']['tokenizer']['vocabulary']['embedding'],
    weights['text']['embedding/embeddings'],
  )
  np.testing.assert_array_equal(
    variables['batch_stats']['head']['video_va_1_bn']['var'],
    weights['head']['hid_to_va/pre_bn/moving_variance'],
  )


@pytest.fixture(scope='module')
def bbs_checkpoint(tmp_path_factory):
  ocfg = official_config('bbs')
  directory = tmp_path_factory.mktemp('bbs')
  weights, path = write_official(directory, 'bbs', ocfg, 6)
  return ocfg, weights, path


def test_refuses_another_vocabulary_and_size(bbs_checkpoint):
  ocfg, _, path = bbs_checkpoint
  config = jax_config('bbs', ocfg)
  config.model.text.vocab_size = 64
  with pytest.raises(UserError, match=r'text:embedding/embeddings is \(50, 300\), the model needs '
                     r'\(64, 300\)'):  # fmt: skip
    convert(path, config)
  config = jax_config('bbs', ocfg)
  config.model.video.size = 'small'  # 6 layers of 512: another size
  with pytest.raises(UserError, match=r'shapes differ: video:agg_embedding is \(64,\), the model '
                     r'needs \(512,\)') as error:  # fmt: skip
    convert(path, config)
  assert 'not in the checkpoint: video:tx/layers/2/' in str(error.value)


def test_refuses_a_checkpoint_of_another_model(tmp_path, bbs_checkpoint):
  ocfg, _, bbs_path = bbs_checkpoint
  ma_cfg = official_config('ma')
  _, ma_path = write_official(tmp_path, 'ma', ma_cfg, 7)
  with pytest.raises(UserError, match=r'not in the checkpoint: video:agg_embedding.*does not use: '
                     r'unified:'):  # fmt: skip
    convert(ma_path, jax_config('bbs', ocfg))
  with pytest.raises(UserError, match=r'not in the checkpoint: unified:.*does not use: audio:'):
    convert(bbs_path, jax_config('ma', ma_cfg))


def test_refuses_a_config_that_is_not_the_official_architecture():
  config = vatt_bbs.get_config('runlocal')  # the paper's architecture
  with pytest.raises(UserError, match=r'not the official architecture: model.position_layernorm='
                     r'False \(official: True\).*text.norm_type=.layernorm.*:official'):  # fmt: skip
    official.check_official(config.model)
  official.check_official(vatt_bbs.get_config('runlocal,official').model)
  official.check_official(vatt_ma_medium.get_config('official').model)
  config = vatt_ma_medium.get_config('official')
  config.model.text.positions = 'relative'
  with pytest.raises(UserError, match=r"model.text.positions='relative' \(official: 'absolute'\)"):
    official.check_official(config.model)


def test_refuses_unknown_variables_and_damaged_files(tmp_path):
  ocfg = official_config('bbs')
  weights = ov.random_weights('bbs', ocfg, rng=8)
  flat = ov.official_keys(weights)
  flat['model/layer_with_weights-0/_base_layer/classifier/kernel'] = np.zeros((2, 2), np.float32)
  ov.write_checkpoint(flat, str(tmp_path / 'extra'), slots=False)
  with pytest.raises(UserError, match=r'1 variables of no VATT module \(model/layer_with_weights-0'
                     r'/_base_layer/classifier/kernel\)'):  # fmt: skip
    official.read_checkpoint(str(tmp_path / 'extra' / 'ckpt-500000'))

  _, path = write_official(tmp_path / 'damaged', 'bbs', ocfg, 9, slots=False)
  data = [f for f in os.listdir(tmp_path / 'damaged') if '.data-' in f][0]
  with open(tmp_path / 'damaged' / data, 'r+b') as f:
    f.truncate(os.path.getsize(tmp_path / 'damaged' / data) // 2)
  with pytest.raises(UserError, match=r'cannot read model/'):
    convert(path, jax_config('bbs', ocfg))

  with pytest.raises(UserError, match=r'no ckpt-1.index beside it'):
    official.read_checkpoint(str(tmp_path / 'ckpt-1'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match=r'a directory without a TF checkpoint'):
    official.read_checkpoint(str(tmp_path / 'empty'))
  (tmp_path / 'garbage.index').write_bytes(b'not a checkpoint')
  with pytest.raises(UserError, match=r'not a readable TF checkpoint'):
    official.read_checkpoint(str(tmp_path / 'garbage'))


def test_a_directory_reads_its_latest_checkpoint(bbs_checkpoint):
  _, _, path = bbs_checkpoint
  assert official.read_checkpoint(os.path.dirname(path)).path == path
  assert official.read_checkpoint(path + '.index').path == path


# ---- the command ---------------------------------------------------------------------------------


def _convert_command(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, 'scripts', 'convert_official.py'), *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, 'PYTHONPATH': ROOT},
  )


def _cli_config_flags(ocfg) -> list[str]:
  """--config.* overrides giving the :official preset the reference's (square) sizes."""
  return [
    '--config=configs/vatt_bbs.py:runlocal,official',
    f'--config.model.video.num_frames={ocfg.frames}',
    f'--config.model.video.frame_size={ocfg.height}',
    f'--config.model.video.patch_size=({ocfg.temporal_patch},16,16)',
    f'--config.model.audio.num_samples={ocfg.audio_samples}',
    f'--config.model.text.vocab_size={ocfg.vocab_size}',
    f'--config.model.text.max_words={ocfg.num_words}',
    f'--config.model.head.va_dim={ocfg.d_va}',
    f'--config.model.head.vt_dim={ocfg.d_vt}',
  ]


def write_vocabulary(path, size: int) -> str:
  """A DMVR word vocabulary of `size` ids (pad 0, unk, bos, eos, then words)."""
  words = ['<pad>', '<unk>', '<bos>', '<eos>'] + [f'w{i}' for i in range(size - 4)]
  path.write_text('\n'.join(words) + '\n', encoding='utf-8')
  return str(path)


@pytest.mark.slow
def test_the_command_writes_outputs_and_a_workdir_and_refuses_before_writing(tmp_path):
  ocfg = official_config('bbs', height=32, width=32)
  weights, path = write_official(tmp_path / 'ckpt', 'bbs', ocfg, 11)
  video, audio, text = ov.random_inputs(ocfg, batch=2, rng=12)
  np.savez(tmp_path / 'in.npz', video=video, audio=audio, text=text)
  vocab = write_vocabulary(tmp_path / 'vocab.txt', ocfg.vocab_size)
  workdir = tmp_path / 'run'
  args = [f'--checkpoint={path}', *_cli_config_flags(ocfg), f'--vocab={vocab}']
  done = _convert_command(
    *args,
    f'--output_dir={workdir}',
    f'--embed_inputs={tmp_path / "in.npz"}',
    f'--embed_outputs={tmp_path / "out.npz"}',
  )
  assert done.returncode == 0, done.stderr[-3000:]
  with np.load(tmp_path / 'out.npz') as f:
    got = {k: f[k] for k in f.files}
  errors = relative_errors(got, ov.forward('bbs', weights, ocfg, video, audio, text))
  assert max(errors.values()) < RTOL, errors
  assert sorted(os.listdir(workdir)) == [
    'checkpoints', 'config.json', 'converted.json', 'provenance.json', 'tokenizer.model'
  ]  # fmt: skip
  assert os.listdir(workdir / 'checkpoints') == ['500000']
  assert (workdir / 'tokenizer.model').read_text() == (tmp_path / 'vocab.txt').read_text()

  # The workdir reads back through the workdir layer every script uses: the same outputs.
  config, model, variables = workdir_lib.load_model(str(workdir))
  again = official_workdir.embed(model, variables, {'video': video, 'audio': audio, 'text': text})
  for name in ov.OUTPUTS:
    np.testing.assert_allclose(again[name], got[name], rtol=1e-6, atol=1e-7)
  assert config.data.tokenizer == str(workdir / 'tokenizer.model')  # the run's copy of --vocab

  # Refusals come before anything is written: the workdir and the outputs stay as they are.
  before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(workdir) for p in fs}
  for extra, message in [
    ([f'--output_dir={workdir}'], 'is not empty'),
    ([f'--output_dir={tmp_path / "new"}', '--config.model.text.vocab_size=64'], 'the model needs'),
    ([f'--embed_inputs={tmp_path / "in.npz"}', f'--embed_outputs={tmp_path / "out.npz"}'],
     'exists; give a new file'),
  ]:  # fmt: skip
    failed = _convert_command(*args, *extra)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert message in failed.stderr.strip().splitlines()[-1]
  after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(workdir) for p in fs}
  assert after == before
  assert not (tmp_path / 'new').exists()
  assert not [p for p in os.listdir(tmp_path) if '.converting-' in p]


# ---- the options the official presets set -------------------------------------------------------


@pytest.mark.slow
def test_the_frozen_word_table_gets_no_gradient():
  """text.trainable_embedding=False: the official word2vec table takes no gradient (so Adam leaves
  it as it is), while the AGG token and the projection after it do."""
  config = vatt_bbs.get_config('runlocal,official')
  model = build_model(config.model)
  batch = {k: np.zeros(s.shape, s.dtype) for k, s in model.example_batch(2).items()}
  batch['text'] = np.random.default_rng(0).integers(1, 50, batch['text'].shape).astype(np.int32)
  variables = jax.jit(lambda b: model.init(jax.random.key(0), b))(batch)
  embed = model.embed('text', ('vt',))

  def loss(params):
    out = embed({'params': params, 'batch_stats': variables['batch_stats']}, batch['text'][:, 0])
    return (out['vt'] ** 2).sum()

  grads = jax.grad(loss)(variables['params'])['text_tower']
  assert not np.any(np.asarray(grads['tokenizer']['vocabulary']['embedding']))
  assert np.any(np.asarray(grads['agg'])) and np.any(
    np.asarray(grads['input_projection']['kernel'])
  )


def test_runs_written_before_the_new_model_fields_still_resume(tmp_path):
  """A run's config.json from before model.pre_projection, text.use_bias, … existed describes the
  same model as a config with their defaults (vatt_jax.models.vatt_config.ADDED_FIELDS)."""
  config = vatt_bbs.get_config('runlocal')
  stored = json.loads(config.to_json_best_effort())
  for name in ADDED_FIELDS:
    *sections, field = name.split('.')
    section = stored['model']
    for s in sections:
      section = section[s]
    del section[field]
  path = tmp_path / 'config.json'
  path.write_text(json.dumps(stored))
  ckpt.check_resume_config(config, str(path))  # the defaults: the same model
  official_config_ = vatt_bbs.get_config('runlocal,official')
  with pytest.raises(ValueError, match=r'model.text.use_bias: True in the stored run, False now'):
    ckpt.check_resume_config(official_config_, str(path))


# Measured by building the official code's models (docs/OFFICIAL.md): every model variable's
# elements (the frozen word table and the head's batch-norm statistics included), and the trainable.
OFFICIAL_COUNTS = {
  'vatt_bbs': (213_540_652, 193_877_292),
  'vatt_mbs': (280_569_132, 260_905_772),
  'vatt_lbs': (431_723_820, 412_060_460),
  'vatt_ma_medium': (182_653_696, 162_990_336),
}


@pytest.mark.parametrize(
  'name',
  [
    'vatt_bbs',
    'vatt_ma_medium',
    *(pytest.param(n, marks=pytest.mark.slow) for n in ('vatt_lbs', 'vatt_mbs')),
  ],
)
def test_presets_have_the_official_parameter_counts(config_loader, name):
  config = config_loader(os.path.join(ROOT, 'configs', f'{name}.py'), 'official')
  model = build_model(config.model)
  shapes = abstract_variables(model)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
  every = count(shapes)
  table = int(np.prod(shapes['params']['text_tower']['tokenizer']['vocabulary']['embedding'].shape))
  trainable = count(shapes['params']) - table  # the frozen word2vec table
  assert (every, trainable) == OFFICIAL_COUNTS[name]
