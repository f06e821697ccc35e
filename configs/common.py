"""Pieces the configs share: the paper's VATT model and pretraining recipe, and the `runlocal` shrink.

A config file picks its towers and calls `pretraining_config`; the size presets themselves live in
vatt_jax/models/transformer.py (SIZES), never copied here. `pretraining_config` and `runlocal` read
and change only the model sections a model has (video / audio / text / head), so a model without
audio (or with other sections) uses them too.
"""

from __future__ import annotations

import os

import ml_collections

from vatt_jax import cli

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_arg(arg: str | None, known=None, path: str | None = None) -> set[str]:
  """`--config=configs/x.py:runlocal,foo` → {'runlocal', 'foo'}. With `known` (the variants the
  config file at `path` declares) an unknown or misspelled one is refused in one line that lists
  the known ones: it would otherwise be ignored without a word."""
  args = {a.strip() for a in (arg or '').split(',') if a.strip()}
  unknown = sorted(args - set(known)) if known is not None else []
  if unknown:
    name = os.path.relpath(path, _ROOT) if path else 'the config'
    name = path if name.startswith('..') else name  # a config file outside the repository
    raise cli.UserError(
      f'--config={name}:{arg}: unknown variant {", ".join(map(repr, unknown))}; {name} knows '
      + (', '.join(sorted(known)) or 'none (no :variant)')
    )
  return args


def model_config(
  *,
  video_size: str = 'base',
  audio_size: str = 'base',
  text_size: str = 'small',
  shared_size: str | None = None,
) -> ml_collections.ConfigDict:
  """The paper's VATT model: 32×224² video at 4×16×16, 3.2 s of 48 kHz audio at 128, 16 words."""
  return ml_collections.ConfigDict(
    dict(
      name='vatt',
      backbone='modality_agnostic' if shared_size else 'modality_specific',
      shared_size=shared_size or '',
      shared_attention='dense',  # the modality-agnostic encoder's attention
      video=dict(
        size=video_size,
        num_frames=32,
        frame_size=224,
        patch_size=(4, 16, 16),
        drop_token_rate=0.5,
        attention='dense',  # the encoder's attention (vatt_jax/models/attention.py ATTENTION)
      ),
      audio=dict(
        size=audio_size,
        num_samples=153_600,
        patch_size=128,
        drop_token_rate=0.5,
        attention='dense',
      ),
      text=dict(
        size=text_size,
        vocab_size=2**16,
        max_words=16,
        num_narrations=5,  # its own caption and 4 temporal neighbours (MIL-NCE positives)
        relative_buckets=32,
        relative_max_distance=64,
        bias_all_layers=False,  # paper: first layer only; official code/T5: all layers
        # The norm before each attention and at the end; before each MLP ('' = the same).
        norm_type='layernorm',  # official code (T5): 'rmsnorm'
        mlp_norm_type='',  # official code (T5): 'layernorm' (mean-centred, with offset)
        use_bias=True,  # biases in the attention and MLP projections; official code (T5): False
        scale_logits=True,  # official code (T5): False
        # The word table: 0 = the tower's width, trained (ours); official code: 300 (word2vec),
        # frozen, its AGG token in that space, then a bias-free Dense + GELU to the width.
        embedding_dim=0,
        trainable_embedding=True,  # official code: False
        positions='relative',  # T5 bias; official modality-agnostic model: 'absolute' (+ LN)
        attention='dense',
      ),
      head=dict(
        va_dim=512,
        vt_dim=256,
        relu_before_vt=False,  # official code: True
        audio_text_bn=True,  # audio→va / text→vt Dense + BN (paper); official: Dense+bias, no BN
        bn_momentum=0.9,
        bn_epsilon=1e-5,
      ),
      position_layernorm=False,  # official code: True
      # Per-modality Dense + GELU after the patch / word embedding, and Dense(post_projection) +
      # GELU after the encoder (its AGG row the representation): the official modality-agnostic
      # model (uvatt.py) has both (1024).
      pre_projection=False,
      post_projection=0,
      dropout_rate=0.1,
      attention_dropout_rate=0.1,
      dtype='float32',  # compute dtype: 'float32' or 'bfloat16' (parameters stay float32)
      remat='none',  # per encoder block: 'none', 'dots' (keep matmul outputs) or 'full'
      token_outputs=False,  # also per-frame / per-word vt embeddings (Norton's losses need them)
    )
  )


def agnostic_structure(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The official modality-agnostic model's structure around the shared encoder (uvatt.py): a
  Dense + GELU pre-projection per modality after its patch / word embedding, learned absolute text
  positions (no relative bias: the shared encoder's attention is the ordinary one), and a
  Dense(1024) + GELU post-projection per modality whose AGG row is the representation."""
  model.pre_projection, model.post_projection = True, 1024
  model.text.positions = 'absolute'
  return model


def official(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The architecture of the official VATT code and its released checkpoints (google-research
  `vatt/`), where it differs from the paper (docs/OFFICIAL.md lists every difference):

  - T5 text tower: RMSNorm before attention and at the end, a LayerNorm with offset before the
    MLP, no biases, no 1/√d scaling, the relative bias in every layer; a frozen 300-d word table
    (the word2vec vocabulary, read with a word-level tokenizer: data.tokenizer=<vocabulary.txt>)
    whose AGG token lives in that space, then a bias-free Dense + GELU to the width;
  - position tables summed, then a LayerNorm, before being added;
  - head: ReLU before the video→vt layer; audio→va and text→vt are Dense with bias, no BN;
  - modality-agnostic backbone (uvatt.py): per-modality Dense + GELU pre-projection, absolute text
    positions (no relative bias), per-modality Dense(1024) + GELU post-projection;
  - warm-up 5k steps (the paper: 10k).
  """
  m = config.model
  m.position_layernorm = True
  m.head.relu_before_vt = True
  m.head.audio_text_bn = False
  t = m.text
  t.norm_type, t.mlp_norm_type = 'rmsnorm', 'layernorm'
  t.use_bias = t.scale_logits = False
  t.bias_all_layers = True
  t.embedding_dim, t.trainable_embedding = 300, False
  if m.backbone == 'modality_agnostic':
    agnostic_structure(m)
  config.optimizer.warmup_steps = 5000
  return config


def pretraining_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The paper's pretraining recipe (appendix A.2): Adam 1e-4, 10k warm-up, quarter-period cosine to
  5e-5 at 500k steps, batch 2048, NCE + MIL-NCE at τ = 0.07 with weights 1 and 1."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 500_000
  config.batch_size = 2048
  config.log_steps = 100
  config.checkpoint_steps = 5000
  config.keep_checkpoints = 3
  config.model = model
  config.data = ml_collections.ConfigDict(
    dict(
      name='shards',  # record shards made by scripts/prepare_data.py
      path='',  # shards are read from {path}/{split}/*.tfrecord
      tokenizer='',  # sentencepiece .model; '' means {path}/tokenizer.model
      fps=10.0,  # clips are sampled at this rate, whatever rate was stored
      crop_area_range=(0.08, 1.0),  # random resized crop (paper A.2.1)
      crop_aspect_range=(0.5, 2.0),
      # A horizontal flip coin per training clip; False for direction tasks (left/right captions).
      random_flip=True,
      sample_rate=48_000,  # must be the rate the shards store (prepare_data --sample_rate)
      shuffle_buffer=2048,
      cycle_length=8,  # shards read round-robin at a time
      deterministic=True,  # the same seed gives the same batches; False: not replayable
      on_bad_input='skip',  # 'skip' (and count) or 'fatal'
      eval_clips=4,  # uniformly spaced clips per video in evaluation mode
      # EgoNCE / SViTT-Ego (docs/DATA.md): noun / verb multi-hots of the chosen caption (0: none;
      # must match the taxonomy.json beside the shards), clips anchored on one caption's span,
      # and scene negatives within ±window seconds of it (0: off; EgoVLP: 60; needs caption_clips).
      num_nouns=0,
      num_verbs=0,
      caption_clips=False,
      scene_negative_window=0.0,
      # The synthetic source (runlocal, tests): concepts a model can learn.
      synthetic=dict(num_classes=16, noise=0.3, missing_text_rate=0.1, missing_audio_rate=0.0),
    )
  )
  link_data_shapes(config.data, model)
  config.loss = ml_collections.ConfigDict(
    dict(name='vatt', temperature=0.07, weight_va=1.0, weight_vt=1.0)
  )
  config.optimizer = ml_collections.ConfigDict(
    dict(
      name='adam',
      learning_rate=1e-4,
      end_learning_rate=5e-5,
      warmup_steps=10_000,
      schedule='quarter_cosine',
      b1=0.9,
      b2=0.999,
      eps=1e-7,  # the official (Keras) default; optax's own is 1e-8
      weight_decay=0.0,
      grad_clip_norm=0.0,
      trainable='all',  # 'all', 'layernorm' (Norton's post-training) or a regex of param paths
      harmonization=harmonization_config(),
    )
  )
  # Mesh axes (one may be -1: the remaining devices): data = replicated parameters, fsdp = data
  # parallel with parameters and optimizer state split, model = heads / MLP / vocabulary split.
  # rules: logical axis → mesh axis; empty = vatt_jax.train.sharding.DEFAULT_RULES.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1, rules=()))
  # Evaluations during training (DESIGN.md): name → dict(type=…, log_steps=…, …), each type an
  # evaluator in vatt_jax.evaluation.EVALUATORS; scripts/report.py runs the same ones standalone.
  config.evals = ml_collections.ConfigDict()
  config.max_nonfinite_steps = 10  # stop after this many non-finite steps in a row (0: never)
  config.keep_checkpoint_period = 0  # also keep every this-many-th step's checkpoint for good
  return config


# config.data field ← config.model.<section>.<field> (the same name), per model section.
DATA_SHAPES = {
  'video': ('num_frames', 'frame_size'),
  'audio': ('num_samples',),
  'text': ('max_words', 'num_narrations', 'vocab_size'),
}
# What the data needs when the model has no such section (no audio: a clip's audio is not read).
DATA_DEFAULTS = dict(
  num_frames=8, frame_size=32, num_samples=6400, max_words=16, num_narrations=1, vocab_size=1024
)


def link_data_shapes(data: ml_collections.ConfigDict, model: ml_collections.ConfigDict) -> None:
  """The data shapes follow the model's, through references (override one and both move), for
  the sections the model has; data.modalities lists those sections."""
  for section, fields in DATA_SHAPES.items():
    for field in fields:
      if section in model and field in model[section]:
        data[field] = model[section].get_ref(field)
      else:
        data[field] = DATA_DEFAULTS[field]
  data.modalities = tuple(s for s in DATA_SHAPES if s in model)


def harmonization_config(**overrides) -> ml_collections.ConfigDict:
  """Cross-modality gradient harmonization (Wu et al., NeurIPS 2022; vatt_jax/optim/harmonization.py),
  off by default. realign: project conflicting video–audio / video–text gradients (GR);
  curriculum: skip steps whose gradient cosine is at most γ(t) (CL), γ going gamma_init → gamma_end
  along gamma_schedule ('constant', 'linear', 'cosine') over gamma_steps (0: the whole run);
  monitor: per-loss gradients only to log their cosine (the update stays the plain sum)."""
  cfg = dict(
    realign=False,
    domain='global',  # or 'per_leaf'
    curriculum=False,
    # γ: not given by the paper. Calibrated on the demo's baseline (`monitor`): cos(g_va, g_vt)
    # starts around 0 (47 % of steps conflicting, 5 % below −0.26) and rises to ≈ 0.24 by the end;
    # −0.2 → 0.1 skips the worst ~5–10 % of steps throughout. At another scale, measure first.
    gamma_schedule='linear',
    gamma_init=-0.2,
    gamma_end=0.1,
    gamma_steps=0,
    monitor=False,
  )
  return ml_collections.ConfigDict({**cfg, **overrides})


def harmonization_variants(config: ml_collections.ConfigDict, args: set[str]):
  """`gr` (realignment), `cl` (curriculum) and `monitor` switches of a pretraining config."""
  h = config.optimizer.harmonization
  h.realign = h.realign or 'gr' in args
  h.curriculum = h.curriculum or 'cl' in args
  h.monitor = h.monitor or 'monitor' in args
  return config


# runlocal: model fields shrunk wherever a model config has them (section → field → value).
RUNLOCAL_MODEL = {
  'video': dict(size='tiny', num_frames=4, frame_size=32, patch_size=(2, 16, 16)),
  'audio': dict(size='tiny', num_samples=2048, patch_size=128),
  'text': dict(size='tiny', vocab_size=128, max_words=8, num_narrations=2),
  'head': dict(va_dim=32, vt_dim=16),
}


def runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config to something that runs a few steps on a laptop CPU in seconds."""
  m = config.model
  for section, values in RUNLOCAL_MODEL.items():
    for field, value in values.items():
      # VATT's fields; a model whose field of that name is of another kind (SViTT's square
      # patch_size, an int, against VATT's (t, h, w) tubelet) shrinks it in its own runlocal.
      if section in m and field in m[section]:
        if isinstance(m[section][field], tuple) == isinstance(value, tuple):
          m[section][field] = value
  if m.get('backbone') == 'modality_agnostic':
    m.shared_size = 'tiny'
  if m.get('post_projection'):
    m.post_projection = 48
  config.batch_size = 8
  config.total_steps = 3
  config.log_steps = 1
  config.checkpoint_steps = 3
  config.optimizer.warmup_steps = 1
  config.data.name = 'synthetic'  # no shards needed on a laptop
  config.data.synthetic.num_classes = 4
  return config


def as_classifier(config: ml_collections.ConfigDict, modality: str, num_classes: int):
  """Turns a pretraining config's model into the fine-tuning classifier (one tower + a linear
  head) of `modality` ('video', 'audio' or 'image'); returns config.model for further changes."""
  m = config.model
  m.name = 'classifier'
  m.modality = modality
  m.num_classes = num_classes
  return m


def finetuning_optimizer(learning_rate: float, warmup_steps: int, grad_clip_norm: float = 0.75):
  """The paper's fine-tuning optimizer: SGD momentum 0.9, linear warm-up, half-period cosine to 0."""
  return ml_collections.ConfigDict(
    dict(
      name='sgd',
      momentum=0.9,
      learning_rate=learning_rate,
      end_learning_rate=0.0,
      warmup_steps=warmup_steps,
      schedule='cosine',
      grad_clip_norm=grad_clip_norm,
    )
  )


def classification_eval(split: str, log_steps: int, batch_size: int, num_examples: int = 0):
  """A config.evals entry: multi-view classification of `split` (num_examples 0: all of it)."""
  return dict(
    type='classification',
    split=split,
    log_steps=log_steps,
    batch_size=batch_size,
    num_examples=num_examples,
  )


def finetuning_variants(config: ml_collections.ConfigDict, args: set[str], eval_name: str):
  """`scratch` (no init_from) and `runlocal` (tiny, synthetic, its labels, a 16-example eval of
  the synthetic 'test' split under the config's eval name) for a fine-tuning config."""
  if 'scratch' in args:
    config.init_from = ''
  if 'runlocal' in args:
    runlocal(config)
    config.init_from = ''  # no pretraining run on a laptop; the tests build one themselves
    config.model.num_classes = config.data.synthetic.num_classes
    config.evals = {eval_name: classification_eval('test', 0, 8, 16)}
  return config
