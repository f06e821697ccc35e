"""All-in-one's parameter-free temporal token rolling (Wang et al., CVPR 2023; seed 001): each
frame's tokens exchange a fold with the previous and the next frame (vatt_jax/models/allinone.py
rolls the frame tokens before every block of its joint pass).

Difference from the reference code (showlab/all-in-one), on purpose: with fold = l // n_div = 0
(fewer than n_div frame tokens) the reference's `out[:, :, -0:]` selects EVERY token and rolls the
whole frame (CLS included) to the next frame; here nothing is rolled (no tokens to roll).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def temporal_roll(x: jax.Array, num_frames: int, n_div: int = 8) -> jax.Array:
  """All-in-one's temporal token rolling of frame tokens.

  Args:
    x: [B·T, l, c], the T frames of each example consecutive (row b·T + t); token 0 of each
      frame is its CLS.
    num_frames: T. n_div: fold = l // n_div tokens roll each way.
  Returns:
    [B·T, l, c]: in frame t, tokens 1 … fold are frame t−1's, the last fold tokens frame t+1's
    (circular in time); the CLS and the middle tokens stay. fold = 0: x unchanged. A fold whose
    two slices would overlap (2·fold + 1 > l: n_div ≤ 2) is a ValueError.
  """
  rows, length, _ = x.shape
  if rows % num_frames:
    raise ValueError(f'temporal_roll: {rows} rows are not a multiple of {num_frames} frames')
  fold = length // n_div
  if 2 * fold + 1 > length:
    raise ValueError(
      f'temporal_roll: n_div {n_div} rolls {fold} tokens each way, which overlap in {length} '
      'tokens (n_div must be >= 3)'
    )
  if fold == 0 or num_frames == 1:
    return x
  x = x.reshape(rows // num_frames, num_frames, *x.shape[1:])
  previous = jnp.roll(x[:, :, 1 : fold + 1], 1, axis=1)
  following = jnp.roll(x[:, :, length - fold :], -1, axis=1)
  out = jnp.concatenate([x[:, :, :1], previous, x[:, :, fold + 1 : length - fold], following], 2)
  return out.reshape(rows, *out.shape[2:])
