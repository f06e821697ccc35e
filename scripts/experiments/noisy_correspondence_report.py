"""The noisy-correspondence grid's statistics, tables and plots (noisy_correspondence.py).

Per cell (method × noise kind × level) the mean and Student-t 95 % interval over seeds; per method
the paired difference from the baseline, and for a method with a control (CONTROLS: Norton and the
same post-training with the plain loss) the paired difference from its control. Pooled over the
grid's conditions (each once; clean once), the same paired difference over every (condition, seed)
pair: an average effect across the conditions, with n = conditions × seeds.
"""

from __future__ import annotations

import os

from vatt_jax import plots
from vatt_jax.evaluation import statistics

LABELS = {
  'baseline': 'MIL-NCE (baseline)',
  'gr': 'GR',
  'cl': 'CL',
  'gr_cl': 'GR+CL',
  'norton': 'Norton post-training',
  'post_milnce': 'MIL-NCE post-training',
}
# method → the run that differs from it only in what the method adds (the same post-training
# schedule, data and batches with the plain loss): compared paired, like the baseline.
CONTROLS = {'norton': 'post_milnce'}
KIND_LABELS = {
  'caption_swap': 'captions swapped',
  'caption_shift': 'captions shifted',
  'caption_irrelevant': 'captions irrelevant',
  'audio_swap': 'audio swapped',
}
# result key → (metrics.jsonl name, label, higher is better)
METRICS = {
  'probe_top1': ('linear_probe/top1', 'video linear probe top-1 (%)', True),
  't2v_R1': ('retrieval/t2v/R1', 'text→video R@1 (%)', True),
  't2v_R5': ('retrieval/t2v/R5', 'text→video R@5 (%)', True),
  't2v_R10': ('retrieval/t2v/R10', 'text→video R@10 (%)', True),
  't2v_MedR': ('retrieval/t2v/MedR', 'text→video median rank', False),
  'p2v_ot_R1': ('long_video/p2v_ot/R1', 'paragraph→video R@1, OT (%)', True),
  'p2v_ot_R5': ('long_video/p2v_ot/R5', 'paragraph→video R@5, OT (%)', True),
  'p2v_mean_R5': ('long_video/p2v_mean/R5', 'paragraph→video R@5, mean sim. (%)', True),
  't2c_R5': ('long_video/t2c/R5', 'caption→clip R@5 (%)', True),
}
HEADLINE = ('probe_top1', 't2v_R5', 'p2v_ot_R5')


def condition(kind: str, level: float) -> str:
  """A data condition's name: 'clean' at level 0, else e.g. caption_swap30."""
  return 'clean' if level == 0 else f'{kind}{round(100 * level):02d}'


def _paired(runs: dict, reference: dict, key: str, higher: bool) -> dict | None:
  seeds = [s for s in sorted(runs) if s in reference and key in reference[s]]
  if not seeds:
    return None
  diff = statistics.paired_difference(
    [runs[s][key] for s in seeds], [reference[s][key] for s in seeds], higher_is_better=higher
  )
  return {**diff, 'seeds': seeds}


def entries(grid, found: dict) -> list[dict]:
  """One entry per method × noise kind × level (level 0: the clean runs, under every kind)."""
  out = []
  for kind in grid.kinds:
    for level in grid.levels:
      name = condition(kind, level)
      for method in grid.methods:
        runs = found.get((name, method), {})
        if not runs:
          continue
        seeds = sorted(runs)
        entry = {'method': method, 'noise_kind': kind, 'noise_level': level,
                 'condition': name, 'seeds': seeds, 'metrics': {}}  # fmt: skip
        references = {  # diff_vs_{what} → the reference method's runs in this condition
          what: found.get((name, reference), {})
          for what, reference in (('baseline', 'baseline'), ('control', CONTROLS.get(method)))
          if reference is not None and reference != method
        }
        for key in (*METRICS, 'conflict_fraction', 'skipped_fraction'):
          if not all(key in runs[s] for s in seeds):
            continue
          values = [runs[s][key] for s in seeds]
          cell = {'values': values, **statistics.interval(values)}
          higher = METRICS[key][2] if key in METRICS else False
          for what, reference_runs in references.items():
            diff = _paired(runs, reference_runs, key, higher)
            if diff is not None:
              cell[f'diff_vs_{what}'] = diff
          entry['metrics'][key] = cell
        out.append(entry)
  return out


def comparisons(grid) -> list[tuple[str, str, str]]:
  """(method, reference, entry key) of every paired comparison the tables show."""
  out = [(m, 'baseline', 'diff_vs_baseline') for m in grid.methods if m != 'baseline']
  return out + [
    (m, c, 'diff_vs_control')
    for m, c in CONTROLS.items()
    if m in grid.methods and c in grid.methods
  ]


def pooled(grid, results_entries: list[dict]) -> list[dict]:
  """Per comparison and metric, the paired difference over every (condition, seed) pair of the
  grid, each condition once: {'method', 'reference', 'metric', 'conditions', **interval, call}."""
  out = []
  for method, reference, field in comparisons(grid):
    for key, (_, _, higher) in METRICS.items():
      diffs, conditions = [], []
      for entry in results_entries:
        cell = entry['metrics'].get(key, {}).get(field)
        if entry['method'] != method or cell is None or entry['condition'] in conditions:
          continue
        conditions.append(entry['condition'])
        diffs += cell['values']
      if diffs:
        # The differences are already method − reference: compare them against zeros.
        diff = statistics.paired_difference(diffs, [0.0] * len(diffs), higher_is_better=higher)
        out.append({'method': method, 'reference': reference, 'metric': key,
                    'conditions': conditions, **diff})  # fmt: skip
  return out


def _fmt(cell: dict, signed: bool = False) -> str:
  mean = f'{cell["mean"]:+.1f}' if signed else f'{cell["mean"]:.1f}'
  if cell['ci95'] is None:
    return mean
  return f'{mean} ± {(cell["ci95"][1] - cell["ci95"][0]) / 2:.1f}'


def _diff_cell(d: dict | None) -> str:
  if d is None:
    return '–'
  mark = {'better': ' ▲', 'worse': ' ▼'}.get(d['call'], '')
  text_ = _fmt(d, signed=True) + mark
  return f'**{text_}**' if mark else text_


def markdown(grid, results: dict) -> str:
  """The tables: per metric, mean ± 95 % half-interval per method and condition, then the paired
  differences from the baseline and of each method from its control, with the pooled column
  (**bold ▲/▼** where the interval excludes 0); the share of steps with conflicting gradients."""
  columns = [(k, p) for k in grid.kinds for p in grid.levels if p > 0]
  if 0.0 in grid.levels:
    columns.insert(0, (grid.kinds[0], 0.0))
  by = {(e['method'], e['condition']): e for e in results['entries']}
  pool = {(p['method'], p['reference'], p['metric']): p for p in results.get('pooled', [])}
  head = ['clean' if p == 0 else f'{KIND_LABELS[k]} {round(100 * p)} %' for k, p in columns]
  lines = [f'Command: `{results["command"]}`', '', results['setup'], '']
  for key in (*HEADLINE, *(k for k in METRICS if k not in HEADLINE)):
    label = METRICS[key][1]
    lines += [f'**{label}**', '', '| method | ' + ' | '.join(head) + ' |',
              '|---|' + '---|' * len(head)]  # fmt: skip
    for method in grid.methods:
      cells = []
      for kind, level in columns:
        entry = by.get((method, condition(kind, level)))
        cell = entry['metrics'].get(key) if entry else None
        cells.append(f'{_fmt(cell)} (n={cell["n"]})' if cell else '–')
      lines.append(f'| {LABELS[method]} | ' + ' | '.join(cells) + ' |')
    lines += ['', f'**{label}**, paired differences (over seeds; pooled: over conditions × seeds)',
              '', '| method | ' + ' | '.join(head) + ' | pooled |',
              '|---|' + '---|' * (len(head) + 1)]  # fmt: skip
    for method, reference, field in comparisons(grid):
      cells = []
      for kind, level in columns:
        entry = by.get((method, condition(kind, level)))
        cell = entry['metrics'].get(key) if entry else None
        cells.append(_diff_cell(cell.get(field) if cell else None))
      cells.append(_diff_cell(pool.get((method, reference, key))))
      name = (
        LABELS[method] if reference == 'baseline' else f'{LABELS[method]} − {LABELS[reference]}'
      )
      lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  conflict = [m for m in grid.methods if any('conflict_fraction' in e['metrics']
                                             for e in results['entries'] if e['method'] == m)]  # fmt: skip
  if conflict:
    lines += ['**Steps with conflicting gradients (cos(g_va, g_vt) < 0), %**', '',
              '| method | ' + ' | '.join(head) + ' |', '|---|' + '---|' * len(head)]  # fmt: skip
    for method in conflict:
      cells = []
      for kind, level in columns:
        entry = by.get((method, condition(kind, level)))
        cell = entry['metrics'].get('conflict_fraction') if entry else None
        cells.append(f'{100 * cell["mean"]:.0f}' if cell else '–')
      lines.append(f'| {LABELS[method]} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  return '\n'.join(lines)


def plot(grid, results: dict, out_dir: str) -> list[str]:
  """One figure per headline metric: a panel per noise kind, methods × level with 95 % intervals."""
  from matplotlib.figure import Figure

  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for key in HEADLINE:
    fig = Figure(figsize=(3.4 * len(grid.kinds), 3.2), layout='constrained')
    axes = fig.subplots(1, len(grid.kinds), sharey=True, squeeze=False)[0]
    for ax, kind in zip(axes, grid.kinds, strict=True):
      for j, method in enumerate(grid.methods):
        xs, ys, errs = [], [], []
        for level in grid.levels:
          entry = next((e for e in results['entries'] if e['method'] == method
                        and e['noise_kind'] == kind and e['noise_level'] == level), None)  # fmt: skip
          cell = entry['metrics'].get(key) if entry else None
          if cell is None:
            continue
          xs.append(100 * level + (j - (len(grid.methods) - 1) / 2) * 1.2)
          ys.append(cell['mean'])
          errs.append(0.0 if cell['ci95'] is None else (cell['ci95'][1] - cell['ci95'][0]) / 2)
        if xs:
          ax.errorbar(xs, ys, yerr=errs, marker='o', ms=4, capsize=2, label=LABELS[method])
      ax.set_title(KIND_LABELS[kind], fontsize=10)
      ax.set_xlabel('noise level (%)')
      ax.set_xticks([100 * p for p in grid.levels])
    axes[0].set_ylabel(METRICS[key][1])
    axes[-1].legend(fontsize=7)
    path = os.path.join(out_dir, f'{key}.png')
    plots._save(fig, path)
    paths.append(path)
  return paths
