"""Logical axis names of the model's parameters and activations.

Every parameter is created boxed in `nn.LogicallyPartitioned` with one logical name per dimension;
the trainer's rules (`nn.logical_axis_rules`) map those names to mesh axes, so the sharding strategy
(data parallel, FSDP, a model axis for wide layers) is configuration, not model code.

Parameter axes:
  embed      model width d of a tower (attention in/out, MLP in/out, tokenizer output, positions'
             last dimension, AGG tokens, norms of width d)
  mlp        MLP hidden units
  heads      attention heads          kv     per-head width
  vocab      text vocabulary rows     patch  tokenizer input features (flattened voxel/waveform)
  positions  rows of position tables and relative-position buckets
  common     common-space (va / vt) features and their batch norm
Activation axes (sharding constraints): batch, length, embed_act.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn

EMBED, MLP, HEADS, KV = 'embed', 'mlp', 'heads', 'kv'
VOCAB, PATCH, POSITIONS, COMMON = 'vocab', 'patch', 'positions', 'common'
PARAM_AXES = (EMBED, MLP, HEADS, KV, VOCAB, PATCH, POSITIONS, COMMON)
BATCH, LENGTH, EMBED_ACT = 'batch', 'length', 'embed_act'
ACTIVATION_AXES = (BATCH, LENGTH, EMBED_ACT)


@flax.struct.dataclass
class _FlatInitPartitioned(nn.LogicallyPartitioned):
  """A box that skips the sharding constraint while its value does not have its final rank.

  nn.DenseGeneral calls its initializers on a flattened (in, out) shape, unboxes the result to
  reshape it and boxes it again. Unboxing applies the logical constraint when a mesh is set
  (`jax.set_mesh`), and a constraint of rank 3 on the rank-2 flat kernel is an error. The final,
  reshaped box constrains as usual.
  """

  def unbox(self, apply_constraint=True) -> Any:
    if getattr(self.value, 'ndim', len(self.names)) != len(self.names):
      return self.value
    return super().unbox(apply_constraint)


def partitioned_general(
  init: Callable[..., Any], names: tuple[str | None, ...]
) -> Callable[..., Any]:
  """`nn.with_logical_partitioning` for nn.DenseGeneral: kernels and biases whose features or
  contracted axes are several dimensions (initialised flat, then reshaped)."""

  def wrapper(*args, **kwargs):
    return _FlatInitPartitioned(init(*args, **kwargs), names)

  return wrapper


def attention_projections(x, num_heads: int, *, use_bias: bool = True, dtype=None):
  """q, k, v [B, N, H, D/H] of x [B, N, D]: the `query`, `key`, `value` DenseGenerals every
  self-attention of the project declares (so dense and sparse checkpoints interchange). Call from
  a compact module: the layers are its children."""
  width = x.shape[-1]
  if width % num_heads:
    raise ValueError(f'width {width} is not divisible by num_heads {num_heads}')

  def dense(name):
    return nn.DenseGeneral(
      features=(num_heads, width // num_heads),
      kernel_init=partitioned_general(nn.initializers.xavier_uniform(), ('embed', 'heads', 'kv')),
      bias_init=partitioned_general(nn.initializers.zeros_init(), ('heads', 'kv')),
      use_bias=use_bias,
      dtype=dtype,
      name=name,
    )

  return dense('query')(x), dense('key')(x), dense('value')(x)


def attention_output(out, width: int, *, use_bias: bool = True, dtype=None):
  """[B, N, H, D/H] → [B, N, width]: the `out` DenseGeneral after the heads."""
  return nn.DenseGeneral(
    features=width,
    axis=(-2, -1),
    kernel_init=partitioned_general(nn.initializers.xavier_uniform(), ('heads', 'kv', 'embed')),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
    use_bias=use_bias,
    dtype=dtype,
    name='out',
  )(out)
