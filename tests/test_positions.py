"""Position-table interpolation for fine-tuning at another input size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT, load_config
from vatt_jax.models import build_model
from vatt_jax.models.tokenizers import interpolate_positions
from vatt_jax.models.vatt_pretrained import resize_positions


def _reference(table: np.ndarray, length: int) -> np.ndarray:
  """float64 reference: Keys cubic (a = -1/2) over the linearly extended table, align-corners."""
  table = np.asarray(table, np.float64)
  n = len(table)
  if n == 1:
    return np.repeat(table, length, axis=0)

  def row(j: int) -> np.ndarray:  # the table, continued as a straight line past either end
    if j < 0:
      return table[0] + j * (table[1] - table[0])
    if j > n - 1:
      return table[-1] + (j - n + 1) * (table[-1] - table[-2])
    return table[j]

  def kernel(t: float) -> float:
    t = abs(t)
    if t <= 1:
      return 1.5 * t**3 - 2.5 * t**2 + 1
    if t < 2:
      return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return 0.0

  out = []
  for i in range(length):
    x = i * (n - 1) / (length - 1) if length > 1 else 0.0
    out.append(sum(kernel(x - j) * row(j) for j in range(int(np.floor(x)) - 2, int(x) + 4)))
  return np.stack(out)


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize(('n', 'length'), [(14, 20), (20, 14), (8, 8), (2, 5), (5, 1), (1, 4)])
def test_interpolation_matches_reference(seed, n, length):
  table = np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)
  got = np.asarray(interpolate_positions(jnp.asarray(table), length))
  np.testing.assert_allclose(got, _reference(table, length), rtol=1e-5, atol=1e-5)


def test_identity_and_linear_ramp():
  table = jnp.asarray(np.random.default_rng(0).normal(size=(14, 4)), jnp.float32)
  assert interpolate_positions(table, 14) is table
  slope, offset = np.array([1.0, -2.0, 0.5]), np.array([3.0, 0.0, -1.0])
  ramp = jnp.asarray(np.arange(14)[:, None] * slope + offset, jnp.float32)
  for length in (20, 7, 2):
    x = np.arange(length) * 13 / (length - 1)
    np.testing.assert_allclose(interpolate_positions(ramp, length), x[:, None] * slope + offset,
                               atol=2e-5)  # fmt: skip
  with pytest.raises(ValueError, match='length'):
    interpolate_positions(table, 0)


@pytest.mark.slow
def test_resized_params_run_a_model_at_another_size():
  config = load_config(ROOT / 'configs' / 'vatt_bbs.py', 'runlocal')
  small = build_model(config.model)
  batch = {'video': jnp.zeros((1, 4, 32, 32, 3)), 'audio': jnp.zeros((1, 2048)),
           'text': jnp.zeros((1, 2, 8), jnp.int32)}  # fmt: skip
  variables = small.init(jax.random.key(0), batch)
  config.model.video.frame_size = 48  # 16-px patches: a 2×2 grid becomes 3×3
  config.model.audio.num_samples = 4096  # 16 → 32 waveform patches
  large = build_model(config.model)
  params = resize_positions(variables['params'], video_grid=(2, 3, 3), audio_patches=32)
  assert params['video_tower']['tokenizer']['vertical_position'].shape[0] == 3
  assert params['audio_tower']['tokenizer']['position'].shape[0] == 32
  assert params['text_tower'] is variables['params']['text_tower']  # shared, not copied
  bigger = {'video': jnp.ones((1, 4, 48, 48, 3)), 'audio': jnp.ones((1, 4096)),
            'text': batch['text']}  # fmt: skip
  out = large.module.apply({**variables, 'params': params}, bigger, train=False)
  assert out['video_va'].shape == (1, config.model.head.va_dim)
  untouched = variables['params']['video_tower']['tokenizer']
  assert untouched['vertical_position'].shape[0] == 2
  with pytest.raises(ValueError, match='video_grid'):
    resize_positions(variables['params'], video_grid=(2, 3))
