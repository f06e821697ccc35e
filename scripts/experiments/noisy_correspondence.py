r"""One benchmark for noisy correspondence: every method on the same data, budget, seeds and order.

  python scripts/experiments/noisy_correspondence.py                 # the full grid (< 4 h, 2 CPUs)
  python scripts/experiments/noisy_correspondence.py --quick         # caption swap, 0 / 60 %, 2 seeds
  python scripts/experiments/noisy_correspondence.py --only_report   # tables of what has finished

Data (the demo generator, scripts/make_demo_data.py): 192 training and 96 test videos of 4
captioned 2-s segments (one digit moving in one direction each), at 64 px and 8 kHz. The videos are
the same in every condition (data seed 0); only the training split's correspondence is corrupted,
at each level p (default 30 % and 60 %) of one noise kind:
  caption_swap        a fraction p of the videos have their captions rotated among their segments
  caption_shift       a fraction p of the captions moved onto the neighbouring segment
  caption_irrelevant  a fraction p of the captions replaced by text that names nothing shown
  audio_swap          a fraction p of the videos have another video's audio
Level 0 is the clean dataset, shared by every kind; its held-out splits are the evaluation data.

Methods (configs/noisy_correspondence.py, one variant each; demo_tiny's VATT-MA, NCE + MIL-NCE,
900 steps of batch 32): `baseline` (MIL-NCE; the gradient cosine logged), `gr`, `cl`, `gr_cl`
(Wu et al.), `norton` (Norton post-training for the last 300 of the 900 steps, from the baseline's
step-600 checkpoint), and `post_milnce` (the same post-training with the plain contrastive loss:
Norton's control). For a seed, every method starts from the same initialisation and reads the
same batches in the same order, so methods are compared by paired differences over seeds.

Evaluation (clean held-out data, at the end of training): video linear probe top-1 (768 training
and 384 test segments, 10 digits), text→video retrieval over the 384 test segments, paragraph→video
retrieval over the 96 test videos (by optimal transport and by the mean similarity) and
caption→clip retrieval.

Statistics (vatt_jax.evaluation.statistics; noisy_correspondence_report.py): per cell the mean and
a Student-t 95 % interval over seeds; per method the paired difference from the baseline (and
Norton's from its control) with its interval, called better or worse only when the interval
excludes 0; the same pooled over every (condition, seed) pair.

Every stage resumes (finished data and runs are kept; a killed run resumes from its checkpoint).
Writes WORKDIR/results.json (one entry per method × noise kind × level), WORKDIR/results.md and a
plot per metric in WORKDIR/plots/ (methods × noise level with intervals). `--runlocal` does the same
at test size in a few minutes (tests/test_noisy_correspondence.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import sys
import time

import jax
from absl import flags, logging

# scripts/experiments/noisy_correspondence_report.py: the statistics, tables and plots
from noisy_correspondence_report import METRICS, condition, entries, markdown, plot, pooled

from configs import noisy_correspondence as nc_config
from data_pipelines import decode, demo, demo_noise, ingest, manifest, text
from data_pipelines.ingest_shard import write_json_atomic
from data_pipelines.options import TOKENIZER_FILENAME
from vatt_jax import cli
from vatt_jax.plots import read_metrics
from vatt_jax.train import trainer

KINDS = ('caption_swap', 'caption_shift', 'caption_irrelevant', 'audio_swap')
# method → configs/noisy_correspondence.py variant ('' = the plain baseline).
METHODS = {
  'baseline': 'monitor',
  'gr': 'gr',
  'cl': 'cl',
  'gr_cl': 'gr,cl',
  'norton': 'norton',
  'post_milnce': 'post_milnce',
}
DEFAULT_METHODS = ('baseline', 'gr', 'cl', 'gr_cl', 'norton', 'post_milnce')
QUICK_METHODS = ('baseline', 'gr', 'cl', 'gr_cl', 'norton')
POST = ('norton', 'post_milnce')  # post-training methods: they start from the baseline run
SIZES = {  # videos per split, frame side (px), shards per split
  'full': dict(num_videos={'train': 192, 'val': 0, 'test': 96}, size=64, shards=4, workers=2),
  'runlocal': dict(num_videos={'train': 8, 'val': 0, 'test': 4}, size=32, shards=1, workers=1),
}
SAMPLE_RATE = 8000
EVAL_SPLITS = {'test': 'test.jsonl', 'segments_train': 'retrieval_train.jsonl',
               'segments_test': 'retrieval_test.jsonl'}  # fmt: skip

_WORKDIR = flags.DEFINE_string(
  'workdir', 'demo/experiments/noisy_correspondence', 'Output directory.'
)
_KINDS = flags.DEFINE_list('kinds', list(KINDS), f'Noise kinds, from {", ".join(KINDS)}.')
_LEVELS = flags.DEFINE_list('levels', ['0', '0.3', '0.6'], 'Noise levels (fractions; 0: clean).')
_METHODS = flags.DEFINE_list('methods', list(DEFAULT_METHODS), f'From {", ".join(METHODS)}.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Training seeds (init and data order).')
_QUICK = flags.DEFINE_bool(
  'quick',
  False,
  'One noise kind (caption_swap), levels 0 and 0.6, seeds 0 and 1, without '
  'post_milnce (under an hour).',
)
_RUNLOCAL = flags.DEFINE_bool('runlocal', False, 'Test size: tiny data, model and step counts.')
_ONLY_REPORT = flags.DEFINE_bool(
  'only_report', False, 'Train nothing: tabulate the finished runs (cells may have fewer seeds).'
)


@dataclasses.dataclass(frozen=True)
class Grid:
  kinds: tuple[str, ...]
  levels: tuple[float, ...]
  methods: tuple[str, ...]
  seeds: tuple[int, ...]
  runlocal: bool = False

  def conditions(self) -> list[str]:
    """Data conditions in order: 'clean' (level 0, shared by every kind) first."""
    names = ['clean'] if 0.0 in self.levels else []
    return names + [condition(k, p) for k in self.kinds for p in self.levels if p > 0]

  def runs(self) -> list[tuple[int, str, str]]:
    """(seed, condition, method) in training order: seed-major, so an interrupted grid has whole
    seeds; the baseline first in each condition (post-training starts from it)."""
    return [(s, c, m) for s in self.seeds for c in self.conditions() for m in self.methods]


def grid_from_flags() -> Grid:
  kinds, levels, seeds = _KINDS.value, _LEVELS.value, _SEEDS.value
  methods = _METHODS.value
  if _QUICK.value:
    kinds, levels, seeds = ['caption_swap'], ['0', '0.6'], ['0', '1']
    methods = [m for m in methods if m in QUICK_METHODS]
  methods = list(dict.fromkeys(['baseline', *methods]))  # the baseline always runs
  bad = [k for k in kinds if k not in KINDS] + [m for m in methods if m not in METHODS]
  if bad:
    raise cli.UserError(
      f'unknown noise kind or method {", ".join(bad)}: kinds are {", ".join(KINDS)}, methods '
      f'{", ".join(METHODS)}'
    )
  try:
    levels_f = tuple(sorted({float(p) for p in levels}))
    seeds_i = tuple(dict.fromkeys(int(s) for s in seeds))
  except ValueError as e:
    raise cli.UserError(f'--levels are fractions and --seeds integers: {e}') from None
  if not levels_f or not all(0 <= p <= 1 for p in levels_f) or not seeds_i:
    raise cli.UserError(f'--levels must be fractions in [0, 1], got {",".join(levels)}')
  return Grid(tuple(kinds), levels_f, tuple(methods), seeds_i, _RUNLOCAL.value)


# --- data ---------------------------------------------------------------------------------------


def make_data(workdir: str, name: str, runlocal: bool) -> str:
  """The media and shards of one data condition (resumable) → its shards directory. The clean one
  also has the evaluation splits and the tokenizer (sentencepiece on its training captions)."""
  size = SIZES['runlocal' if runlocal else 'full']
  base = os.path.join(workdir, 'data', name)
  media, shards = os.path.join(base, 'media'), os.path.join(base, 'shards')
  noise = demo_noise.NoiseConfig()
  if name != 'clean':
    kind = next(k for k in KINDS if name.startswith(k))
    noise = demo_noise.NoiseConfig(**{kind: int(name[len(kind) :]) / 100})
  demo.generate(
    media, num_videos=size['num_videos'], seed=0, size=size['size'], sample_rate=SAMPLE_RATE,
    noise=noise, num_segments=(nc_config.SEGMENTS, nc_config.SEGMENTS), tags=False,
    workers=size['workers'],
  )  # fmt: skip
  splits = {'train': 'train.jsonl', **(EVAL_SPLITS if name == 'clean' else {})}
  options = decode.Options(short_side=size['size'], sample_rate=SAMPLE_RATE)
  for split, manifest_name in splits.items():
    ingest.convert(os.path.join(media, manifest_name), os.path.join(shards, split), size['shards'],
                   options, workers=size['workers'], progress=False)  # fmt: skip
  tokenizer = os.path.join(shards, TOKENIZER_FILENAME)
  if name == 'clean' and not os.path.exists(tokenizer):
    rows = manifest.read_manifest(os.path.join(media, 'train.jsonl'))
    staged = text.train_tokenizer(
      (c.text for row in rows for c in row.captions), os.path.join(shards, '.tokenizer'), 1024
    )
    os.replace(staged, tokenizer)
  return shards


# --- runs ---------------------------------------------------------------------------------------


def run_dir(workdir: str, seed: int, name: str, method: str) -> str:
  return os.path.join(workdir, 'runs', name, method, f'seed{seed}')


def run_config(grid: Grid, workdir: str, seed: int, name: str, method: str):
  """The config of one run: the method's variant on the condition's shards, evaluated on the
  clean ones."""
  variant = ','.join(v for v in (METHODS[method], 'runlocal' if grid.runlocal else '') if v)
  config = nc_config.get_config(variant)
  if grid.runlocal:
    nc_config.runlocal_on_shards(config, method in POST)
  clean = os.path.join(workdir, 'data', 'clean', 'shards')
  config.seed = seed
  config.data.path = os.path.join(workdir, 'data', name, 'shards')
  config.data.tokenizer = os.path.join(clean, TOKENIZER_FILENAME)
  config.data.random_flip = False  # a mirrored clip contradicts its caption's direction
  for eval_cfg in config.evals.values():
    eval_cfg.data.path = clean
  if method in POST:
    baseline = run_config(grid, workdir, seed, name, 'baseline')
    config.init_from = run_dir(workdir, seed, name, 'baseline')
    config.init_from_step = baseline.total_steps - config.total_steps
  return config


def summarise(run: str) -> dict:
  """A finished run's figures: the METRICS, the gradient statistics and the steps."""
  records = read_metrics(os.path.join(run, 'metrics.jsonl'))
  final = [r for r in records if METRICS['t2v_R5'][0] in r]
  if not final:
    raise RuntimeError(f'{run}: no end-of-training evaluation in metrics.jsonl')
  final = final[-1]
  summary = {key: float(final[name]) for key, (name, _, _) in METRICS.items()}
  summary['steps'] = final['step']
  gradients = os.path.join(run, 'gradients.jsonl')
  cosines = [r['grad_cosine'] for r in read_metrics(gradients)] if os.path.exists(gradients) else []
  if cosines:
    summary['conflict_fraction'] = sum(c < 0 for c in cosines) / len(cosines)
    summary['mean_cosine'] = sum(cosines) / len(cosines)
  summary['skipped_fraction'] = final.get('skipped_steps', 0.0) / max(final['step'], 1)
  return summary


@contextlib.contextmanager
def locked(workdir: str, what: str):
  """Holds WORKDIR/locks/WHAT.lock (an flock, released when the process ends, however): a second
  process of the grid on the same workdir waits here instead of writing the same files."""
  os.makedirs(os.path.join(workdir, 'locks'), exist_ok=True)
  with open(os.path.join(workdir, 'locks', f'{what}.lock'), 'w') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info('waiting for another process of the grid to finish %s', what)
      fcntl.flock(f, fcntl.LOCK_EX)
    yield


def train(grid: Grid, workdir: str, seed: int, name: str, method: str) -> dict:
  """Trains (or resumes) one run and returns its summary; a finished run is only read. A run
  another process is training is waited for; post-training first has its baseline finished."""
  if method in POST:
    train(grid, workdir, seed, name, 'baseline')
  with locked(workdir, f'{name}_{method}_seed{seed}'):
    return _train(grid, workdir, seed, name, method)


def _train(grid: Grid, workdir: str, seed: int, name: str, method: str) -> dict:
  run = run_dir(workdir, seed, name, method)
  path = os.path.join(run, 'summary.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config = run_config(grid, workdir, seed, name, method)
  steps = [r['step'] for r in trainer.train(config, run) if 'step' in r]
  if steps and max(steps) < config.total_steps:  # SIGTERM / Ctrl-C: its checkpoint is saved
    sys.exit(
      f'stopped by a signal at step {max(steps)} of {config.total_steps} in {run} (checkpoint '
      'saved): rerun the same command to resume'
    )
  summary = summarise(run)
  write_json_atomic(path, summary)
  jax.clear_caches()  # each run compiles its own programs; the next one needs none of them
  return summary


def cost(grid: Grid, method: str) -> float:
  """A run's relative cost for the ETA: its steps, plus the evaluation (~300 steps' time)."""
  config = run_config(grid, '', 0, 'clean', method)
  return config.total_steps + 0.2 * nc_config.TOTAL_STEPS


def run_grid(grid: Grid, workdir: str) -> None:
  runs = grid.runs()
  todo = [r for r in runs if not os.path.exists(os.path.join(run_dir(workdir, *r), 'summary.json'))]
  total = sum(cost(grid, m) for _, _, m in todo)
  done, start = 0.0, time.time()
  logging.info('%d runs, %d to train', len(runs), len(todo))
  for i, (seed, name, method) in enumerate(todo):
    train(grid, workdir, seed, name, method)
    done += cost(grid, method)
    elapsed = time.time() - start
    eta = elapsed / done * (total - done)
    message = (
      f'[{i + 1}/{len(todo)}] {name} {method} seed {seed} done; elapsed {elapsed / 60:.1f} min, '
      f'ETA {eta / 60:.1f} min'
    )
    logging.info(message)
    print(message, flush=True)


# --- report -------------------------------------------------------------------------------------


def collect(grid: Grid, workdir: str) -> dict:
  """{(condition, method): {seed: summary}} of every finished run of the grid."""
  found = {}
  for seed, name, method in grid.runs():
    path = os.path.join(run_dir(workdir, seed, name, method), 'summary.json')
    if os.path.exists(path):
      with open(path) as f:
        found.setdefault((name, method), {})[seed] = json.load(f)
  return found


def setup_text(grid: Grid) -> str:
  config = run_config(grid, '', 0, 'clean', 'baseline')
  size = SIZES['runlocal' if grid.runlocal else 'full']['num_videos']
  return (
    f'Setup: demo videos of {nc_config.SEGMENTS} segments ({size["train"]} training, '
    f'{size["test"]} test); configs/noisy_correspondence.py, {config.total_steps} steps of batch '
    f'{config.batch_size} per method (post-training methods: the last {nc_config.POST_STEPS} '
    f'of them); seeds {", ".join(map(str, grid.seeds))}, paired across methods. Cells: mean ± the '
    'half-width of the Student-t 95 % interval over seeds (n = seeds); differences: paired per '
    'seed, **bold ▲/▼** where the interval excludes 0.'
  )


def report(grid: Grid, workdir: str) -> dict:
  results = {
    'command': ' '.join(shlex.quote(a) for a in ['python', *sys.argv]),
    'setup': setup_text(grid),
    'grid': dataclasses.asdict(grid),
    'metrics': {
      k: {'name': n, 'label': label, 'higher_is_better': h} for k, (n, label, h) in METRICS.items()
    },  # fmt: skip
    'entries': entries(grid, collect(grid, workdir)),
  }
  results['pooled'] = pooled(grid, results['entries'])
  write_json_atomic(os.path.join(workdir, 'results.json'), results)
  text_ = markdown(grid, results)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text_)
  print(text_)
  print('plots:', ', '.join(plot(grid, results, os.path.join(workdir, 'plots'))))
  return results


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  grid = grid_from_flags()
  workdir = os.path.abspath(_WORKDIR.value)
  if not _ONLY_REPORT.value:
    os.makedirs(workdir, exist_ok=True)
    # Runs of one method differ only in their data and seed, both program inputs: every program
    # compiles once per grid, and the other runs read it from this disk cache (identical code).
    if not jax.config.jax_compilation_cache_dir:  # unless the environment names one
      jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'jax_cache'))
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
      jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
    with locked(workdir, 'data'):
      for name in (
        grid.conditions() if 'clean' in grid.conditions() else ['clean', *grid.conditions()]
      ):
        make_data(workdir, name, grid.runlocal)
    run_grid(grid, workdir)
  report(grid, workdir)


if __name__ == '__main__':
  cli.run(main)
