"""Figures of a run, as PNG files (matplotlib, no display needed): VATT Fig. 3 and training curves.

tsne_grid            t-SNE (scikit-learn) of embeddings, one panel per (space, modality): the
                     tokenizer's input space on top, the common space below (Fig. 3 top)
similarity_histograms  distributions of positive vs. negative pair similarities (Fig. 3 bottom)
training_curves      loss terms, learning rate and evaluation metrics from metrics.jsonl
gradient_cosines     the distribution of cos(g_va, g_vt) over training, conflicts and skipped steps
                     (gradients.jsonl of a run with per-loss gradients)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.manifold import TSNE

from vatt_jax.evaluation.embeddings import l2_normalize

PLOTS_DIR = 'plots'


def _save(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=110, bbox_inches='tight')
  os.replace(tmp, path)  # a reader never sees half a file
  return path


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
  """[N, D] → [N, 2] t-SNE (PCA initialisation; perplexity min(30, (N − 1) / 3)). Features without
  spread (every row the same: e.g. an untrained model on near-identical clips) map to the origin:
  sklearn's PCA initialisation divides by their zero spread and the Barnes-Hut step then crashes
  the process."""
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or len(x) < 4:
    raise ValueError(f't-SNE needs [N >= 4, D] features, got shape {x.shape}')
  if not np.isfinite(x).all():
    raise ValueError('t-SNE of non-finite features')
  if x.std(axis=0).max() <= 1e-12 * max(1.0, np.abs(x).max()):
    return np.zeros((len(x), 2))
  perplexity = min(30.0, (len(x) - 1) / 3)
  return TSNE(2, perplexity=perplexity, init='pca', random_state=seed).fit_transform(x)


def tsne_grid(
  panels: Sequence[Sequence[tuple[str, np.ndarray, np.ndarray]]],
  path: str,
  *,
  title: str = '',
  class_names: Sequence[str] | None = None,
) -> str:
  """panels: rows of (title, features [N, D], labels [N]) → one t-SNE scatter each, coloured by
  label."""
  rows, cols = len(panels), max(len(r) for r in panels)
  fig = Figure(figsize=(3.6 * cols, 3.4 * rows), layout='constrained')
  labels_seen = set()
  for i, row in enumerate(panels):
    for j, (name, x, labels) in enumerate(row):
      ax = fig.add_subplot(rows, cols, i * cols + j + 1)
      points = tsne_2d(x)
      labels = np.asarray(labels)
      for c in np.unique(labels):
        sel = labels == c
        text = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
        ax.scatter(*points[sel].T, s=9, color=_colour(int(c)), label=text)
        labels_seen.add((int(c), text))
      ax.set_title(name, fontsize=10)
      ax.set_xticks([])
      ax.set_yticks([])
  handles = [
    Line2D([], [], marker='o', linestyle='', markersize=4, color=_colour(c), label=t)
    for c, t in sorted(labels_seen)
  ]
  fig.legend(handles=handles, loc='outside right center', fontsize=8, title='label')
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def _colour(c: int):
  from matplotlib import colormaps

  return colormaps['tab10' if c < 10 else 'tab20'](c % 20)


def similarity_histograms(
  pairs: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str, *, title: str = ''
) -> str:
  """pairs: (title, positive-pair similarities, negative-pair similarities) → overlaid histograms
  (densities), one panel each; the legend gives each distribution's mean."""
  fig = Figure(figsize=(4.2 * len(pairs), 3.2), layout='constrained')
  for j, (name, pos, neg) in enumerate(pairs):
    ax = fig.add_subplot(1, len(pairs), j + 1)
    pos, neg = np.ravel(pos), np.ravel(neg)
    lo, hi = float(min(pos.min(), neg.min())), float(max(pos.max(), neg.max()))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 40)
    ax.hist(neg, bins, density=True, alpha=0.55, label=f'negative (mean {neg.mean():.2f})')
    ax.hist(pos, bins, density=True, alpha=0.55, label=f'positive (mean {pos.mean():.2f})')
    ax.set_title(name, fontsize=10)
    ax.set_xlabel('cosine similarity')
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def pair_similarities(a: np.ndarray, b: np.ndarray, correct: np.ndarray | None = None):
  """Cosines of every (a_i, b_j): (positives, negatives). correct [Na, Nb] marks the positive pairs
  (default: the diagonal, pair i ↔ i)."""
  sim = l2_normalize(a) @ l2_normalize(b).T
  if correct is None:
    if sim.shape[0] != sim.shape[1]:
      raise ValueError(f'without `correct` the pairs are i ↔ i: need a square matrix, {sim.shape}')
    correct = np.eye(len(sim), dtype=bool)
  return sim[correct], sim[~correct]


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl (lines that do not parse, e.g. cut by a crash, are skipped)."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def training_curves(metrics_path: str, path: str, *, title: str = '') -> str:
  """Loss terms, learning rate and every evaluation metric ('name/metric' keys) over steps."""
  records = [r for r in read_metrics(metrics_path) if 'step' in r]
  if not records:
    raise ValueError(f'{metrics_path} has no records to plot')
  keys = sorted({k for r in records for k in r})
  losses = [k for k in keys if k.startswith('loss')]
  evals = sorted({k.split('/')[0] for k in keys if '/' in k})
  panels = [('loss', losses)] + [('learning rate', ['learning_rate'])] * ('learning_rate' in keys)
  # Evaluation panels show the percentages (R@k, top-k), not timings or ranks (other scales).
  percent = lambda k: not k.endswith(('/seconds', '/MedR', '/MeanR'))  # noqa: E731
  panels += [(name, [k for k in keys if k.startswith(name + '/') and percent(k)]) for name in evals]
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig = Figure(figsize=(4.4 * cols, 3.2 * rows), layout='constrained')
  for j, (name, series) in enumerate(panels):
    ax = fig.add_subplot(rows, cols, j + 1)
    for key in series:
      points = [(r['step'], r[key]) for r in records if key in r]
      steps, values = zip(*points, strict=True)
      ax.plot(steps, values, marker='.' if len(points) < 20 else None, label=key.split('/', 1)[-1])
    ax.set_title(name if name in ('loss', 'learning rate') else f'{name} (%)', fontsize=10)
    ax.set_xlabel('step')
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def gradient_cosines(runs: dict[str, str], path: str, *, bins: int = 10, title: str = '') -> str:
  """cos(g_va, g_vt) over training, one panel per run ({label: gradients.jsonl}): its distribution in
  `bins` consecutive phases of training (box plots: quartiles, whiskers at 5 and 95 %), the
  fraction of conflicting steps (cosine < 0) per phase, and the skipped steps of a curriculum
  (with the threshold γ where the run logged it)."""
  fig = Figure(figsize=(5.0 * len(runs), 3.4), layout='constrained')
  for j, (label, gradients_path) in enumerate(runs.items()):
    by_step = {r['step']: r for r in read_metrics(gradients_path) if 'grad_cosine' in r}
    if not by_step:
      raise ValueError(f'{gradients_path} has no per-step gradient cosines to plot')
    steps = np.array(sorted(by_step))
    cos = np.array([by_step[s]['grad_cosine'] for s in steps])
    phases = np.array_split(np.arange(len(steps)), min(bins, len(steps)))
    centres = [float(steps[p].mean()) for p in phases]
    width = 0.7 * (steps[-1] - steps[0] + 1) / len(phases)
    ax = fig.add_subplot(1, len(runs), j + 1)
    ax.boxplot([cos[p] for p in phases], positions=centres, widths=width, whis=(5, 95),
               showfliers=False, manage_ticks=False)  # fmt: skip
    ax.axhline(0.0, color='grey', lw=0.8, ls=':')
    skipped = np.array([by_step[s].get('grad_skipped', 0.0) > 0 for s in steps])
    if skipped.any():
      ax.plot(steps[skipped], cos[skipped], 'x', ms=3, color='tab:red', label='skipped')
    ax.set_xlabel('step')
    ax.set_ylabel('cos(g_va, g_vt)')
    twin = ax.twinx()
    twin.plot(centres, [float(np.mean(cos[p] < 0)) for p in phases], 'o-', color='tab:orange',
              ms=3, label='conflicting steps')  # fmt: skip
    twin.set_ylim(0, 1)
    twin.set_ylabel('fraction conflicting', color='tab:orange')
    ax.set_title(f'{label}: {np.mean(cos < 0):.0%} conflicting, {skipped.mean():.0%} skipped',
                 fontsize=9)  # fmt: skip
    if skipped.any():
      ax.legend(fontsize=7, loc='lower left')
  if title:
    fig.suptitle(title)
  return _save(fig, path)
