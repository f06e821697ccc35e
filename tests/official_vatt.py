"""An independent float64 numpy model of the official VATT TF2 networks, plus a writer for TF2
object-based checkpoints laid out like the official ones (test support; no tests in here).

Written from the official code (google-research/google-research, vatt/): modeling/common/transformers.py,
backbones/video/vitx3d.py, backbones/audio/autx1d.py, backbones/text/{factory,t5}.py,
backbones/unified/{uvatt,factory}.py, backbones/multimodal.py, heads/{bridge,mlp_lib,factory}.py,
modeling/factory.py, configs/*.py, utils/train/restore.py, experiments/{base,pretrain}.py. It shares
no code with vatt_jax and never imports it: it is the yardstick the converter and the JAX models are
held to. TensorFlow is imported only by `write_checkpoint`.

Two kinds of model:
  'bbs'  modality-specific towers (AudioTextVideoFusion): ViTx3D video, AuTx1D waveform audio, T5
         text (frozen word embedding, AGG in the embedding space, bias-free GELU pre-projection),
         FAC bridge head.
  'ma'   one shared UniversalVATT (UnifiedFusion) + FAC head.

Inference mode throughout: no dropout, no DropToken (random_patch_sampling only acts in training),
no token masking (use_masking=False in every official config), BN with moving statistics.

Weights are `{group: {anchor-relative key: array}}` (groups 'video', 'audio', 'text', 'head' for
'bbs'; 'unified', 'head' for 'ma'). A key is the official object-graph path of the variable without
'/.ATTRIBUTES/VARIABLE_VALUE'; `official_keys` prefixes them into full checkpoint keys:

  BACKBONE_PREFIX + ANCHORS[group] + key     for backbone groups
  HEAD_PREFIX + key                          for 'head'

Where the names come from (object-based checkpoints name a variable by the attribute path through
which it is first reached, breadth first):
  * the checkpoint is tf.train.Checkpoint(model=keras_model, optimizer=optimizer) saved by a
    CheckpointManager at checkpoint_number=step (experiments/base.py); keras_model is a *functional*
    tf.keras.Model wrapped around MMRLModel (experiments/pretrain.py), so MMRLModel is
    'model/layer_with_weights-0' (the Input layers carry no weights), its backbone attribute is
    '_base_layer' and its HeadStack attribute '_head_layer' (whose list '_bridge_heads' holds the
    FACHead at index 0). restore.py's regexes confirm the backbone half:
    'model/layer_with_weights-0/_base_layer/vid_backbone/_base/...'.
  * AGG vectors are made with add_weight(name='agg_embedding') before being assigned to
    `self.agg_token_embd`, so the add_weight name is the one reached first.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np
from scipy.special import erf

# The official checkpoint's object-graph prefixes (see the module docstring for the derivation).
BACKBONE_PREFIX = 'model/layer_with_weights-0/_base_layer/'
HEAD_PREFIX = 'model/layer_with_weights-0/_head_layer/_bridge_heads/0/'
VARIABLE_SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'
ANCHORS = {
  'video': 'vid_backbone/_base/',  # AudioTextVideoFusion.vid_backbone (VideoModel)._base (ViTx3D)
  'audio': 'aud_backbone/_base/',  # .aud_backbone (AudioModel)._base (AuTx1D)
  'text': 'txt_backbone/',  # .txt_backbone (LanguageModel)
  'unified': 'unified_backbone/unified_transformer/',  # UnifiedFusion.unified_backbone (UnifiedModule).unified_transformer
}
GROUPS = {'bbs': ('video', 'audio', 'text', 'head'), 'ma': ('unified', 'head')}
OUTPUTS = ('video_agg', 'audio_agg', 'text_agg', 'video_va', 'video_vt', 'audio_va', 'text_vt')


# ----------------------------------------------------------------------------------------- sizes


@dataclasses.dataclass(frozen=True)
class Tower:
  """Transformer sizes of one tower."""

  d_model: int = 64
  d_kv: int = 16
  num_heads: int = 4
  d_ff: int = 128
  num_layers: int = 2


class _Grids:
  """The token grids of a tiny official model's inputs."""

  @property
  def video_grid(self) -> tuple[int, int, int]:
    return (
      self.frames // self.temporal_patch,
      self.height // self.spatial_patch,
      self.width // self.spatial_patch,
    )

  @property
  def audio_buckets(self) -> int:
    return self.audio_samples // self.audio_patch


@dataclasses.dataclass(frozen=True)
class TinyOfficial(_Grids):
  """A tiny modality-specific ('bbs') official model. The position tables are exactly as large as
  the token grid of inputs of these sizes: the official ExpandableEmbedding spline-interpolates a
  table whose size differs from the grid, which this reference does not implement (it refuses)."""

  frames: int = 4
  height: int = 32
  width: int = 48  # H and W grids differ (2 vs 3) on purpose: tells the two tables apart
  channels: int = 3
  temporal_patch: int = 2
  spatial_patch: int = 16
  audio_samples: int = 2048
  audio_patch: int = 128  # kernel size = stride (official WaT: 128 / 128)
  num_words: int = 8
  vocab_size: int = 50
  d_embedding: int = 300  # word2vec width
  video: Tower = Tower()
  audio: Tower = Tower()
  text: Tower = Tower()
  num_relative_buckets: int = 32
  max_relative_distance: int = 64
  d_va: int = 32  # FAC vid_to_aud_txt / aud_to_vid_txt d_model (official 512)
  d_vt: int = 16  # FAC txt_to_vid_aud d_model (official 256)
  layer_norm_epsilon: float = 1e-6
  bn_epsilon: float = 1e-5


@dataclasses.dataclass(frozen=True)
class TinyOfficialMA(_Grids):
  """A tiny UniversalVATT ('ma'). The official model has ONE max_vid_spatial_buckets for both the
  vertical and the horizontal table (uvatt.py), so frames are square here (grid (2, 2, 2)); a grid
  with H != W would make the official code interpolate one table, which this reference refuses."""

  frames: int = 4
  height: int = 32
  width: int = 32
  channels: int = 3
  temporal_patch: int = 2
  spatial_patch: int = 16
  audio_samples: int = 2048
  audio_patch: int = 128
  num_words: int = 8  # = max_txt_temporal_buckets
  vocab_size: int = 50
  d_embedding: int = 300  # txt_embedding_dim
  tower: Tower = Tower()
  d_post_proj: int = 48
  d_va: int = 32
  d_vt: int = 16
  layer_norm_epsilon: float = 1e-6
  bn_epsilon: float = 1e-5

  @property
  def max_vid_spatial_buckets(self) -> int:
    _, h, w = self.video_grid
    if h != w:
      raise ValueError(
        f'UniversalVATT has one spatial table size for H and W; grid {h}x{w} is not square'
      )
    return h


def default_config(kind: str):
  return {'bbs': TinyOfficial, 'ma': TinyOfficialMA}[kind]()


# ---------------------------------------------------------------------------------- random weights


class _Init:
  """Random values for every variable, float32 (like the official checkpoints), scaled so that
  activations stay O(1): kernels N(0, 1/fan_in) (the brief's 0.5·normal, rescaled by fan-in),
  tables / AGG vectors 0.5·N, LN/BN gamma 1 + 0.2·N, beta / bias 0.2·N, BN moving_mean 0.3·N,
  moving_variance U(0.5, 1.5)."""

  def __init__(self, rng):
    self.rng = np.random.default_rng(rng)

  def _f32(self, x):
    return np.asarray(x, np.float32)

  def kernel(self, shape, fan_in=None):
    fan_in = int(np.prod(shape[:-1])) if fan_in is None else fan_in
    return self._f32(self.rng.standard_normal(shape) / np.sqrt(fan_in))

  def table(self, shape):
    return self._f32(0.5 * self.rng.standard_normal(shape))

  def gamma(self, n):
    return self._f32(1.0 + 0.2 * self.rng.standard_normal(n))

  def beta(self, n):
    return self._f32(0.2 * self.rng.standard_normal(n))

  bias = beta

  def layer_norm(self, w, prefix, n):  # tf.keras.layers.LayerNormalization
    w[prefix + 'gamma'] = self.gamma(n)
    w[prefix + 'beta'] = self.beta(n)

  def dense(self, w, prefix, n_in, n_out, use_bias=True):
    w[prefix + 'kernel'] = self.kernel((n_in, n_out))
    if use_bias:
      w[prefix + 'bias'] = self.bias(n_out)

  def batch_norm(self, w, prefix, n):  # tf.keras.layers.(Sync)BatchNormalization, scale=True
    w[prefix + 'gamma'] = self.gamma(n)
    w[prefix + 'beta'] = self.beta(n)
    w[prefix + 'moving_mean'] = self._f32(0.3 * self.rng.standard_normal(n))
    w[prefix + 'moving_variance'] = self._f32(self.rng.uniform(0.5, 1.5, n))


def _encoder_weights(init: _Init, w, prefix: str, t: Tower):
  """transformers.TransformerEncoder (pre_norm=True, use_bias=True, activation='gelu')."""
  inner = t.num_heads * t.d_kv
  for i in range(t.num_layers):
    p = f'{prefix}layers/{i}/'
    init.layer_norm(w, p + 'layer_norm/', t.d_model)
    for name in 'qkv':
      init.dense(w, f'{p}mha/{name}/', t.d_model, inner)
    init.dense(w, p + 'mha/o/', inner, t.d_model)
    init.layer_norm(w, p + 'feed_forward/layer_norm/', t.d_model)
    init.dense(w, p + 'feed_forward/mlp/wi/', t.d_model, t.d_ff)
    init.dense(w, p + 'feed_forward/mlp/wo/', t.d_ff, t.d_model)
  init.layer_norm(w, prefix + 'final_layer_norm/', t.d_model)


def _video_conv(init: _Init, w, prefix, cfg, d_model):
  t, s = cfg.temporal_patch, cfg.spatial_patch
  w[prefix + 'kernel'] = init.kernel((t, s, s, cfg.channels, d_model))
  w[prefix + 'bias'] = init.bias(d_model)


def _audio_conv(init: _Init, w, prefix, cfg, d_model):
  w[prefix + 'kernel'] = init.kernel((cfg.audio_patch, 1, d_model))
  w[prefix + 'bias'] = init.bias(d_model)


def _video_weights(init: _Init, cfg: TinyOfficial):
  """ViTx3D (configs/video.py ViTBase: pre_projection=False, post_projection=False, use_masking=False)."""
  d = cfg.video.d_model
  tg, hg, wg = cfg.video_grid
  w = {}
  _video_conv(init, w, 'voxel_to_patch/', cfg, d)
  pe = 'pos_embedding_lookup/'
  w[pe + 'temporal_position_embeddings/embeddings'] = init.table((tg, d))
  w[pe + 'vertical_position_embeddings/embeddings'] = init.table((hg, d))
  w[pe + 'horizontal_position_embeddings/embeddings'] = init.table((wg, d))
  init.layer_norm(w, pe + 'layernorm/', d)
  _encoder_weights(init, w, 'tx/', cfg.video)
  w['agg_embedding'] = init.table((d,))
  return w


def _audio_weights(init: _Init, cfg: TinyOfficial):
  """AuTx1D (configs/audio.py WaTBase)."""
  d = cfg.audio.d_model
  w = {}
  _audio_conv(init, w, 'wave_to_patch/', cfg, d)
  pe = 'pos_embedding_lookup/'
  w[pe + 'temporal_position_embeddings/embeddings'] = init.table((cfg.audio_buckets, d))
  init.layer_norm(w, pe + 'layernorm/', d)
  _encoder_weights(init, w, 'tx/', cfg.audio)
  w['agg_embedding'] = init.table((d,))
  return w


def _text_weights(init: _Init, cfg: TinyOfficial):
  """LanguageModel around T5Encoder (configs/text.py T5Base: d_pre_proj=d_model, no post_proj,
  use_agg_token=True, activation='gelu'; T5Encoder built without its own embeddings)."""
  t = cfg.text
  inner = t.num_heads * t.d_kv
  w = {'embedding/embeddings': init.table((cfg.vocab_size, cfg.d_embedding))}
  w['pre_proj/kernel'] = init.kernel((cfg.d_embedding, t.d_model))  # use_bias=False
  for i in range(t.num_layers):
    p = f'base_lm/layers/{i}/'
    w[p + 'self_attention/layer_norm/weight'] = init.gamma(t.d_model)  # T5LayerNorm
    for name in 'qkv':  # AttentionLayer.attention (MultiHeadAttention), Dense(use_bias=False)
      w[f'{p}self_attention/attention/{name}/kernel'] = init.kernel((t.d_model, inner))
    w[p + 'self_attention/attention/o/kernel'] = init.kernel((inner, t.d_model))
    if i == 0:  # relative_buckets = [num_relative_buckets] + [None] * (num_layers - 1)
      w[p + 'self_attention/attention/relative_attention_bias/embeddings'] = init.table(
        (cfg.num_relative_buckets, t.num_heads)
      )
    init.layer_norm(w, p + 'feed_forward/layer_norm/', t.d_model)  # a Keras LayerNormalization
    w[p + 'feed_forward/mlp/wi/kernel'] = init.kernel((t.d_model, t.d_ff))
    w[p + 'feed_forward/mlp/wo/kernel'] = init.kernel((t.d_ff, t.d_model))
  w['base_lm/final_layer_norm/weight'] = init.gamma(t.d_model)
  w['agg_embedding'] = init.table((cfg.d_embedding,))
  return w


def _head_weights(init: _Init, cfg, d_video, d_audio, d_text):
  """bridge.FACHead with mlp_lib.ReluDenseBN blocks."""
  va, vt = cfg.d_va, cfg.d_vt
  w = {}
  init.dense(w, 'vid_to_hid/', d_video, va, use_bias=False)
  init.batch_norm(w, 'hid_to_va/pre_bn/', va)
  init.dense(w, 'hid_to_va/dense/', va, va, use_bias=False)
  init.batch_norm(w, 'hid_to_va/bn/', va)
  init.dense(w, 'aud_to_va/', d_audio, va)
  init.dense(w, 'va_to_vat/dense/', va, vt, use_bias=False)
  init.batch_norm(w, 'va_to_vat/bn/', vt)
  init.dense(w, 'txt_to_vat/', d_text, vt)
  return w


def _unified_weights(init: _Init, cfg: TinyOfficialMA):
  """UniversalVATT (configs/unified.py UniTBase)."""
  t = cfg.tower
  d = t.d_model
  tg, _, _ = cfg.video_grid
  sp = cfg.max_vid_spatial_buckets
  w = {}
  _video_conv(init, w, 'raw_to_embeddings/video/', cfg, d)
  _audio_conv(init, w, 'raw_to_embeddings/audio/', cfg, d)
  w['raw_to_embeddings/text/embeddings'] = init.table((cfg.vocab_size, cfg.d_embedding))
  init.dense(w, 'pre_proj/video/', d, d)
  init.dense(w, 'pre_proj/audio/', d, d)
  init.dense(w, 'pre_proj/text/', cfg.d_embedding, d)
  pe = 'pos_embedding_lookup/'
  w[pe + 'video/temporal_position_embeddings/embeddings'] = init.table((tg, d))
  w[pe + 'video/vertical_position_embeddings/embeddings'] = init.table((sp, d))
  w[pe + 'video/horizontal_position_embeddings/embeddings'] = init.table((sp, d))
  init.layer_norm(w, pe + 'video/layernorm/', d)
  w[pe + 'audio/temporal_position_embeddings/embeddings'] = init.table((cfg.audio_buckets, d))
  init.layer_norm(w, pe + 'audio/layernorm/', d)
  w[pe + 'text/temporal_position_embeddings/embeddings'] = init.table((cfg.num_words, d))
  init.layer_norm(w, pe + 'text/layernorm/', d)
  _encoder_weights(init, w, 'tx/', t)
  for m in ('video', 'audio', 'text'):
    init.dense(w, f'post_proj/{m}/', d, cfg.d_post_proj)
  for name in ('vid_agg_embedding', 'aud_agg_embedding', 'txt_agg_embedding'):
    w[name] = init.table((d,))
  return w


def random_weights(kind: str, cfg=None, rng=0) -> dict[str, dict[str, np.ndarray]]:
  """Random float32 values for every variable of the official model of `kind` ('bbs' or 'ma'),
  as {group: {anchor-relative key: array}}; `rng` is a seed or a numpy Generator."""
  cfg = default_config(kind) if cfg is None else cfg
  init = _Init(rng)
  if kind == 'bbs':
    out = {
      'video': _video_weights(init, cfg),
      'audio': _audio_weights(init, cfg),
      'text': _text_weights(init, cfg),
    }
    out['head'] = _head_weights(init, cfg, cfg.video.d_model, cfg.audio.d_model, cfg.text.d_model)
    return out
  if kind == 'ma':
    out = {'unified': _unified_weights(init, cfg)}
    p = cfg.d_post_proj
    out['head'] = _head_weights(init, cfg, p, p, p)
    return out
  raise ValueError(f'unknown kind {kind!r}')


def official_keys(
  weights: Mapping[str, Mapping[str, np.ndarray]],
  backbone_prefix: str = BACKBONE_PREFIX,
  head_prefix: str = HEAD_PREFIX,
) -> dict[str, np.ndarray]:
  """{full checkpoint key (no '/.ATTRIBUTES/VARIABLE_VALUE'): array} from grouped weights."""
  flat = {}
  for group, ws in weights.items():
    prefix = head_prefix if group == 'head' else backbone_prefix + ANCHORS[group]
    for k, v in ws.items():
      flat[prefix + k] = v
  return flat


def group_official_keys(
  flat: Mapping[str, np.ndarray],
  kind: str,
  backbone_prefix: str = BACKBONE_PREFIX,
  head_prefix: str = HEAD_PREFIX,
) -> dict[str, dict[str, np.ndarray]]:
  """Inverse of `official_keys`: takes checkpoint keys (with or without the VARIABLE_VALUE suffix),
  keeps the model variables of `kind` and drops everything else (optimizer, slots, save_counter)."""
  out = {g: {} for g in GROUPS[kind]}
  for key, v in flat.items():
    if '.OPTIMIZER_SLOT' in key:
      continue
    if key.endswith(VARIABLE_SUFFIX):
      key = key[: -len(VARIABLE_SUFFIX)]
    for g in GROUPS[kind]:
      prefix = head_prefix if g == 'head' else backbone_prefix + ANCHORS[g]
      if key.startswith(prefix):
        out[g][key[len(prefix) :]] = np.asarray(v)
        break
  return out


# ---------------------------------------------------------------------------------- numpy layers


def gelu(x):
  """tf.keras.activations.gelu (approximate=False): exact, erf-based."""
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def layer_norm(x, gamma, beta, eps):
  """tf.keras.layers.LayerNormalization over the last axis (biased variance, eps inside the sqrt)."""
  mean = x.mean(-1, keepdims=True)
  var = np.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * gamma + beta


def t5_layer_norm(x, weight, eps):
  """t5.T5LayerNorm: no mean subtraction, no bias."""
  return weight * (x / np.sqrt(np.square(x).mean(-1, keepdims=True) + eps))


def batch_norm(x, gamma, beta, moving_mean, moving_variance, eps):
  """Keras BatchNormalization at inference: moving statistics."""
  return (x - moving_mean) / np.sqrt(moving_variance + eps) * gamma + beta


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def relative_position_bucket(relative_position, num_buckets=32, max_distance=64):
  """t5.MultiHeadAttention._relative_position_bucket, bidirectional (the encoder's), numpy int.
  `relative_position` = memory_position - context_position. The log term is computed in float32
  like the TF code (then truncated toward zero by the int32 cast; it is >= 0 where used)."""
  n = -np.asarray(relative_position, np.int64)
  num_buckets //= 2
  ret = (n < 0).astype(np.int64) * num_buckets
  n = np.abs(n)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  safe = np.maximum(n, 1).astype(np.float32)
  large = (
    np.log(safe / np.float32(max_exact))
    / np.float32(np.log(max_distance / max_exact))
    * np.float32(num_buckets - max_exact)
  )
  val_if_large = max_exact + large.astype(np.int64)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


def _split_heads(x, num_heads):
  b, length, inner = x.shape
  return x.reshape(b, length, num_heads, inner // num_heads).transpose(0, 2, 1, 3)


def _join_heads(x):
  b, h, length, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b, length, h * d)


def _dense(x, w, prefix, use_bias=True):
  y = x @ w[prefix + 'kernel']
  return y + w[prefix + 'bias'] if use_bias else y


def _attention(x, w, prefix, num_heads, additive, scale, use_bias):
  """MultiHeadAttention: scores = q·k (/ sqrt(d_kv) if `scale`) + additive; softmax; ·v; o."""
  q = _split_heads(_dense(x, w, prefix + 'q/', use_bias), num_heads)
  k = _split_heads(_dense(x, w, prefix + 'k/', use_bias), num_heads)
  v = _split_heads(_dense(x, w, prefix + 'v/', use_bias), num_heads)
  scores = np.einsum('bnqd,bnkd->bnqk', q, k)
  if scale:
    scores = scores / np.sqrt(k.shape[-1])
  if additive is not None:
    scores = scores + additive
  return _dense(_join_heads(softmax(scores) @ v), w, prefix + 'o/', use_bias)


def _mask_bias(mask):
  """[B, L] 1/0 -> additive [B, 1, 1, L]: (1 - mask) * -1e9."""
  return (1.0 - np.asarray(mask, np.float64))[:, None, None, :] * -1e9


def _transformer_encoder(x, w, prefix, num_heads, eps, mask=None):
  """transformers.TransformerEncoder, pre_norm=True, use_bias=True, gelu."""
  additive = None if mask is None else _mask_bias(mask)
  i = 0
  while f'{prefix}layers/{i}/layer_norm/gamma' in w:
    p = f'{prefix}layers/{i}/'
    h = layer_norm(x, w[p + 'layer_norm/gamma'], w[p + 'layer_norm/beta'], eps)
    x = x + _attention(h, w, p + 'mha/', num_heads, additive, scale=True, use_bias=True)
    h = layer_norm(
      x, w[p + 'feed_forward/layer_norm/gamma'], w[p + 'feed_forward/layer_norm/beta'], eps
    )
    x = x + _dense(gelu(_dense(h, w, p + 'feed_forward/mlp/wi/')), w, p + 'feed_forward/mlp/wo/')
    i += 1
  return layer_norm(
    x, w[prefix + 'final_layer_norm/gamma'], w[prefix + 'final_layer_norm/beta'], eps
  )


def _check_table(table, n, what):
  if table.shape[0] != n:
    raise NotImplementedError(
      f'{what}: table has {table.shape[0]} buckets but the input has {n}; the official '
      'ExpandableEmbedding would spline-interpolate it, which this reference does not implement'
    )


def _voxel_to_patch(video, w, prefix):
  """Conv3D, kernel = stride, 'valid': [B,T,H,W,C] -> [B, T', H', W', D]."""
  kernel = w[prefix + 'kernel']
  t, h, s, c, d = kernel.shape
  video = np.asarray(video, np.float64)
  b, tt, hh, ww, cc = video.shape
  if cc != c:
    raise ValueError(f'video has {cc} channels, kernel expects {c}')
  gt, gh, gw = tt // t, hh // h, ww // s  # 'valid' drops any remainder
  x = video[:, : gt * t, : gh * h, : gw * s].reshape(b, gt, t, gh, h, gw, s, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, gt, gh, gw, t * h * s * c)
  return x @ kernel.reshape(t * h * s * c, d) + w[prefix + 'bias']


def _wave_to_patch(audio, w, prefix):
  """Conv1D on [B, S, 1], kernel = stride, 'valid': -> [B, S', D]."""
  kernel = w[prefix + 'kernel']
  k, cin, d = kernel.shape
  audio = np.asarray(audio, np.float64)
  if audio.ndim == 2:
    audio = audio[..., None]  # the official input is [B, S, 1]
  b, s, c = audio.shape
  if c != cin:
    raise ValueError(f'audio has {c} channels, kernel expects {cin}')
  n = s // k
  x = audio[:, : n * k].reshape(b, n, k * c)
  return x @ kernel.reshape(k * cin, d) + w[prefix + 'bias']


def _spatio_temporal(x5, w, prefix, eps):
  """SpatioTemporalEmbeddings on conv output [B, T', H', W', D] -> flattened tokens + LN(pos)."""
  b, gt, gh, gw, d = x5.shape
  tt = w[prefix + 'temporal_position_embeddings/embeddings']
  vt = w[prefix + 'vertical_position_embeddings/embeddings']
  ht = w[prefix + 'horizontal_position_embeddings/embeddings']
  _check_table(tt, gt, 'temporal')
  _check_table(vt, gh, 'vertical (H)')
  _check_table(ht, gw, 'horizontal (W)')
  pos = tt[:, None, None, :] + vt[None, :, None, :] + ht[None, None, :, :]  # ids in (t, h, w) order
  pos = layer_norm(
    pos.reshape(gt * gh * gw, d), w[prefix + 'layernorm/gamma'], w[prefix + 'layernorm/beta'], eps
  )
  return x5.reshape(b, gt * gh * gw, d) + pos[None]


def _temporal(x, w, prefix, eps):
  """TemporalEmbeddings on [B, L, D]."""
  table = w[prefix + 'temporal_position_embeddings/embeddings']
  _check_table(table, x.shape[1], 'temporal')
  pos = layer_norm(table, w[prefix + 'layernorm/gamma'], w[prefix + 'layernorm/beta'], eps)
  return x + pos[None]


def _prepend(x, agg):
  return np.concatenate([np.broadcast_to(agg, (x.shape[0], 1, agg.shape[-1])), x], axis=1)


def _text_ids(text):
  ids = np.asarray(text)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'text must be [B, L] integer ids, got {ids.dtype} {ids.shape}')
  return ids


def _heads(w, video_agg, audio_agg, text_agg, eps):
  """FACHead at inference."""

  def bn(x, p):
    return batch_norm(
      x, w[p + 'gamma'], w[p + 'beta'], w[p + 'moving_mean'], w[p + 'moving_variance'], eps
    )

  hid = video_agg @ w['vid_to_hid/kernel']
  va = bn(
    np.maximum(bn(hid, 'hid_to_va/pre_bn/'), 0.0) @ w['hid_to_va/dense/kernel'], 'hid_to_va/bn/'
  )
  vt = bn(np.maximum(va, 0.0) @ w['va_to_vat/dense/kernel'], 'va_to_vat/bn/')
  return {
    'video_va': va,
    'video_vt': vt,
    'audio_va': _dense(audio_agg, w, 'aud_to_va/'),
    'text_vt': _dense(text_agg, w, 'txt_to_vat/'),
  }


def _f64(ws):
  return {k: np.asarray(v, np.float64) for k, v in ws.items()}


def _bbs_forward(weights, cfg, video, audio, text):
  eps = cfg.layer_norm_epsilon
  out, feats = {}, {}
  # ViTx3D: conv -> (identity pre_proj) -> + LN(positions) -> [AGG; tokens] -> Tx -> row 0.
  w = _f64(weights['video'])
  x = _spatio_temporal(
    _voxel_to_patch(video, w, 'voxel_to_patch/'), w, 'pos_embedding_lookup/', eps
  )
  x = _transformer_encoder(_prepend(x, w['agg_embedding']), w, 'tx/', cfg.video.num_heads, eps)
  out['video_agg'], feats['video_features'] = x[:, 0], x[:, 1:]
  # AuTx1D.
  w = _f64(weights['audio'])
  x = _temporal(_wave_to_patch(audio, w, 'wave_to_patch/'), w, 'pos_embedding_lookup/', eps)
  x = _transformer_encoder(_prepend(x, w['agg_embedding']), w, 'tx/', cfg.audio.num_heads, eps)
  out['audio_agg'], feats['audio_features'] = x[:, 0], x[:, 1:]
  # LanguageModel + T5Encoder.
  w = _f64(weights['text'])
  ids = _text_ids(text)
  x = w['embedding/embeddings'][ids]  # [B, L, d_embedding]
  mask = (ids != 0).astype(np.float64)
  x = _prepend(x, w['agg_embedding'])  # AGG in the word-embedding space, before pre_proj
  mask = np.concatenate([np.ones((ids.shape[0], 1)), mask], axis=1)
  x = gelu(x @ w['pre_proj/kernel'])  # Dense(use_bias=False, activation='gelu')
  heads = cfg.text.num_heads
  length = x.shape[1]
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # memory - context, [q, k]
  table = w['base_lm/layers/0/self_attention/attention/relative_attention_bias/embeddings']
  bias = table[
    relative_position_bucket(rel, table.shape[0], cfg.max_relative_distance)
  ]  # [q, k, H]
  position_bias = bias.transpose(2, 0, 1)[None] + _mask_bias(mask)  # layer 0's, reused by all
  i = 0
  while f'base_lm/layers/{i}/self_attention/layer_norm/weight' in w:
    p = f'base_lm/layers/{i}/'
    h = t5_layer_norm(x, w[p + 'self_attention/layer_norm/weight'], eps)
    x = x + _attention(
      h, w, p + 'self_attention/attention/', heads, position_bias, scale=False, use_bias=False
    )
    h = layer_norm(
      x, w[p + 'feed_forward/layer_norm/gamma'], w[p + 'feed_forward/layer_norm/beta'], eps
    )
    x = x + gelu(h @ w[p + 'feed_forward/mlp/wi/kernel']) @ w[p + 'feed_forward/mlp/wo/kernel']
    i += 1
  x = t5_layer_norm(x, w['base_lm/final_layer_norm/weight'], eps)
  out['text_agg'], feats['text_features'] = x[:, 0], x[:, 1:]
  return out, feats


def _ma_forward(weights, cfg, video, audio, text):
  eps = cfg.layer_norm_epsilon
  w = _f64(weights['unified'])
  heads = cfg.tower.num_heads
  out, feats = {}, {}

  def finish(x, modality, agg, mask=None):
    x = _transformer_encoder(_prepend(x, w[agg]), w, 'tx/', heads, eps, mask)
    x = gelu(_dense(x, w, f'post_proj/{modality}/'))  # Dense(d_post_proj, activation='gelu')
    return x[:, 0], x[:, 1:]

  # UniversalVATT._modality_call: raw_to_embeddings -> pre_proj (Dense+gelu) -> flatten ->
  # + LN(positions) -> [AGG; tokens] -> Tx -> post_proj -> row 0.
  x = gelu(_dense(_voxel_to_patch(video, w, 'raw_to_embeddings/video/'), w, 'pre_proj/video/'))
  x = _spatio_temporal(x, w, 'pos_embedding_lookup/video/', eps)
  out['video_agg'], feats['video_features'] = finish(x, 'video', 'vid_agg_embedding')
  x = gelu(_dense(_wave_to_patch(audio, w, 'raw_to_embeddings/audio/'), w, 'pre_proj/audio/'))
  x = _temporal(x, w, 'pos_embedding_lookup/audio/', eps)
  out['audio_agg'], feats['audio_features'] = finish(x, 'audio', 'aud_agg_embedding')
  ids = _text_ids(text)
  x = gelu(_dense(w['raw_to_embeddings/text/embeddings'][ids], w, 'pre_proj/text/'))
  x = _temporal(x, w, 'pos_embedding_lookup/text/', eps)
  mask = np.concatenate([np.ones((ids.shape[0], 1)), (ids != 0).astype(np.float64)], axis=1)
  out['text_agg'], feats['text_features'] = finish(x, 'text', 'txt_agg_embedding', mask)
  return out, feats


def forward(
  kind: str, weights, cfg=None, video=None, audio=None, text=None, return_features=False
) -> dict:
  """The official model's inference in float64. video [B, T, H, W, 3], audio [B, S] (or [B, S, 1]),
  text [B, L] int ids (0 = padding). Returns OUTPUTS: video_agg / audio_agg / text_agg (each
  backbone's features_pooled), video_va (FAC video 'toaud'), video_vt ('totxt'), audio_va (audio
  'tovid'), text_vt (text 'tovid'); with return_features also the token-level features
  ({modality}_features, AGG row excluded, flattened)."""
  cfg = default_config(kind) if cfg is None else cfg
  if kind == 'bbs':
    out, feats = _bbs_forward(weights, cfg, video, audio, text)
  elif kind == 'ma':
    out, feats = _ma_forward(weights, cfg, video, audio, text)
  else:
    raise ValueError(f'unknown kind {kind!r}')
  out.update(
    _heads(
      _f64(weights['head']), out['video_agg'], out['audio_agg'], out['text_agg'], cfg.bn_epsilon
    )
  )
  out = {k: out[k] for k in OUTPUTS}
  if return_features:
    out.update(feats)
  return out


def random_inputs(cfg, batch=2, rng=1, num_pad=(0, 3)):
  """Inputs of the sizes of `cfg`: video ~ U(-1, 1), audio ~ U(-1, 1), text with the last
  num_pad[i] words of row i set to padding (id 0) and the rest drawn from 1..vocab-1."""
  rng = np.random.default_rng(rng)
  video = rng.uniform(-1, 1, (batch, cfg.frames, cfg.height, cfg.width, cfg.channels)).astype(
    np.float32
  )
  audio = rng.uniform(-1, 1, (batch, cfg.audio_samples)).astype(np.float32)
  text = rng.integers(1, cfg.vocab_size, (batch, cfg.num_words)).astype(np.int32)
  for i in range(batch):
    n = num_pad[i % len(num_pad)]
    if n:
      text[i, -n:] = 0
  return video, audio, text


# ---------------------------------------------------------------------------------- checkpoints


def is_trainable(key: str) -> bool:
  """Whether the official model trains the variable (and so whether Adam keeps slots for it):
  BN moving statistics and the frozen word embeddings (trainable_embeddings=False,
  txt_embedding_trainable=False) are not."""
  key = key[: -len(VARIABLE_SUFFIX)] if key.endswith(VARIABLE_SUFFIX) else key
  return not (
    key.endswith(('/moving_mean', '/moving_variance'))
    or key.endswith('txt_backbone/embedding/embeddings')
    or key.endswith('raw_to_embeddings/text/embeddings')
  )


def write_checkpoint(
  flat: Mapping[str, np.ndarray],
  directory,
  step: int = 500000,
  *,
  slots: bool = True,
  float32: bool = True,
) -> str:
  """Write a TF2 object-based checkpoint `{directory}/ckpt-{step}.{index,data-*}` whose
  tf.train.list_variables keys are '<full key>/.ATTRIBUTES/VARIABLE_VALUE' for every entry of
  `flat` (full keys such as official_keys() gives; a trailing VARIABLE_VALUE suffix is accepted),
  saved the way the official run saves: tf.train.Checkpoint(model=..., optimizer=...) through a
  CheckpointManager(checkpoint_name='ckpt').save(checkpoint_number=step).

  Optimizer state as the official run has it: 'optimizer/iter' (int64 = step) and, with `slots`,
  Adam slots for every trainable variable ('<key>/.OPTIMIZER_SLOT/optimizer/{m,v}/...'), made by a
  real tf.compat.v1.train.AdamOptimizer applied once in eager mode (which also leaves its
  'optimizer/beta1_power' and 'optimizer/beta2_power'). The slots are then set to m = -value and
  v = value**2, so that a loader which mistakes a slot for the value is caught. Float arrays are
  stored as float32 unless `float32` is False. Returns the checkpoint prefix."""
  import tensorflow as tf

  auto = tf.__internal__.tracking.AutoTrackable
  roots: dict[str, object] = {}
  nodes: dict[tuple[str, ...], object] = {}  # object-graph path -> AutoTrackable
  variables = {}
  for key, value in flat.items():
    if key.endswith(VARIABLE_SUFFIX):
      key = key[: -len(VARIABLE_SUFFIX)]
    parts = tuple(key.split('/'))
    if len(parts) < 2 or parts[0] in ('optimizer', 'save_counter') or not all(parts):
      raise ValueError(
        f'bad key {key!r}: needs a root other than optimizer/save_counter and no empty parts'
      )
    if parts in nodes or any(parts[:i] in variables for i in range(1, len(parts))):
      raise ValueError(f'{key!r} is both a variable and a parent of one')
    value = np.asarray(value)
    if float32 and np.issubdtype(value.dtype, np.floating):
      value = value.astype(np.float32)
    if parts[:1] not in nodes:
      nodes[parts[:1]] = roots[parts[0]] = auto()
    for i in range(2, len(parts)):
      if parts[:i] not in nodes:
        parent = nodes[parts[: i - 1]]
        if hasattr(parent, parts[i - 1]):
          raise ValueError(f'{key!r}: {parts[i - 1]!r} clashes with an attribute of AutoTrackable')
        nodes[parts[:i]] = auto()
        setattr(parent, parts[i - 1], nodes[parts[:i]])
    parent = nodes[parts[:-1]]
    if parts in variables or hasattr(parent, parts[-1]):
      raise ValueError(
        f'duplicate key, or {parts[-1]!r} clashes with an attribute of AutoTrackable: {key!r}'
      )
    var = tf.Variable(value, trainable=is_trainable(key))
    setattr(parent, parts[-1], var)
    variables[parts] = (var, value)

  if slots:
    optimizer = tf.compat.v1.train.AdamOptimizer()
    trainable = [v for v, _ in variables.values() if v.trainable]
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in trainable])
    for var, value in variables.values():
      if var.trainable:
        optimizer.get_slot(var, 'm').assign(-value)
        optimizer.get_slot(var, 'v').assign(np.square(value))
    optimizer._track_trackable(tf.Variable(np.int64(step), dtype=tf.int64), name='iter')  # pylint: disable=protected-access
  else:
    optimizer = auto()
    optimizer.iter = tf.Variable(np.int64(step), dtype=tf.int64)
  for var, value in variables.values():  # bit-exact values whatever the optimizer did
    var.assign(value)

  checkpoint = tf.train.Checkpoint(optimizer=optimizer, **roots)
  manager = tf.train.CheckpointManager(
    checkpoint, directory=os.fspath(directory), max_to_keep=None, checkpoint_name='ckpt'
  )
  return manager.save(checkpoint_number=step)


def read_checkpoint(path) -> dict[str, np.ndarray]:
  """{key without the VARIABLE_VALUE suffix: array} of every model variable of a checkpoint (no
  slots, no optimizer state, no save_counter)."""
  import tensorflow as tf

  reader = tf.train.load_checkpoint(os.fspath(path))
  out = {}
  for key, _ in tf.train.list_variables(os.fspath(path)):
    if (
      not key.endswith(VARIABLE_SUFFIX)
      or '.OPTIMIZER_SLOT' in key
      or key.startswith('optimizer/')
      or key.startswith('save_counter/')
    ):
      continue
    out[key[: -len(VARIABLE_SUFFIX)]] = reader.get_tensor(key)
  return out
