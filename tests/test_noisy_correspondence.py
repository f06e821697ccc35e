"""scripts/experiments/noisy_correspondence.py: the grid, the statistics of its tables, and (slow)
the quick setting end to end at runlocal size."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from absl import flags

from tests.conftest import ROOT

# The script imports its report module as a sibling (scripts/experiments on the path when it runs).
sys.path.insert(0, str(ROOT / 'scripts' / 'experiments'))
import noisy_correspondence_report as report  # noqa: E402

_spec = importlib.util.spec_from_file_location(
  '_noisy_correspondence', ROOT / 'scripts' / 'experiments' / 'noisy_correspondence.py'
)
nc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = nc  # dataclasses look their module up
_before = set(flags.FLAGS)
_spec.loader.exec_module(nc)
# The script's flags (--workdir, …) leave the global registry: other tests load scripts that
# define flags of the same names in this process. The functions tested here read none of them.
for _name in set(flags.FLAGS) - _before:
  delattr(flags.FLAGS, _name)


def test_grid_runs_whole_seeds_first_and_the_baseline_before_post_training():
  grid = nc.Grid(('caption_swap', 'audio_swap'), (0.0, 0.3), ('baseline', 'gr', 'norton'), (0, 1))
  assert grid.conditions() == ['clean', 'caption_swap30', 'audio_swap30']
  runs = grid.runs()
  assert len(runs) == 2 * 3 * 3
  assert [s for s, _, _ in runs] == [0] * 9 + [1] * 9  # an interrupted grid has whole seeds
  for seed, name, method in runs:
    if method == 'norton':
      assert runs.index((seed, name, 'baseline')) < runs.index((seed, name, method))
  assert nc.condition('caption_shift', 0.6) == 'caption_shift60'
  assert nc.condition('audio_swap', 0.0) == 'clean'


def _summary(rng, offset=0.0):
  out = {key: float(rng.uniform(10, 60)) + offset for key in nc.METRICS}
  out['t2v_MedR'] = float(rng.integers(2, 40))
  return out


def test_entries_pair_each_method_with_the_baseline_of_its_seed_and_condition():
  rng = np.random.default_rng(0)
  grid = nc.Grid(('caption_swap', 'audio_swap'), (0.0, 0.6), ('baseline', 'gr'), (0, 1, 2))
  found = {}
  for name in grid.conditions():
    for seed in grid.seeds:
      base = _summary(rng)
      found.setdefault((name, 'baseline'), {})[seed] = base
      # GR: the baseline plus 5 ± 0.5 on every metric (a clear, paired improvement)
      gr = {k: v + 5 + float(rng.uniform(-0.5, 0.5)) for k, v in base.items()}
      found.setdefault((name, 'gr'), {})[seed] = gr
  del found[('audio_swap60', 'gr')][2]  # one unfinished run: that cell has two seeds
  entries = nc.entries(grid, found)
  assert len(entries) == 2 * 2 * 2  # method × kind × level; level 0 (clean) under each kind
  by = {(e['method'], e['noise_kind'], e['noise_level']): e for e in entries}
  assert by[('gr', 'caption_swap', 0.0)]['condition'] == by[('gr', 'audio_swap', 0.0)]['condition']
  cell = by[('gr', 'caption_swap', 0.6)]['metrics']['t2v_R5']
  values = [found[('caption_swap60', 'gr')][s]['t2v_R5'] for s in (0, 1, 2)]
  base = [found[('caption_swap60', 'baseline')][s]['t2v_R5'] for s in (0, 1, 2)]
  np.testing.assert_allclose(cell['mean'], np.mean(values), rtol=1e-12)
  diff = cell['diff_vs_baseline']
  np.testing.assert_allclose(diff['values'], np.subtract(values, base), rtol=1e-12)
  assert diff['call'] == 'better' and diff['seeds'] == [0, 1, 2]
  # A median rank that went up by 5 is worse.
  assert (
    by[('gr', 'caption_swap', 0.6)]['metrics']['t2v_MedR']['diff_vs_baseline']['call'] == 'worse'
  )
  partial = by[('gr', 'audio_swap', 0.6)]
  assert partial['seeds'] == [0, 1] and partial['metrics']['t2v_R5']['n'] == 2
  assert partial['metrics']['t2v_R5']['diff_vs_baseline']['seeds'] == [0, 1]
  assert 'diff_vs_baseline' not in by[('baseline', 'audio_swap', 0.6)]['metrics']['t2v_R5']


def test_tables_and_plots_of_the_results(tmp_path):
  rng = np.random.default_rng(1)
  grid = nc.Grid(('caption_swap',), (0.0, 0.6), ('baseline', 'gr', 'cl', 'norton'), (0, 1, 2))
  found = {}
  for name in grid.conditions():
    for seed in grid.seeds:
      base = _summary(rng)
      base['conflict_fraction'] = 0.2
      found.setdefault((name, 'baseline'), {})[seed] = base
      # GR: 10, 10.5, 11 above the baseline (10.5 ± 4.30 · 0.5 / √3 = ± 1.2); CL: exactly 2 above
      # on every seed, a difference without spread, which is not called.
      found.setdefault((name, 'gr'), {})[seed] = {k: v + 10 + 0.5 * seed for k, v in base.items()}
      found.setdefault((name, 'cl'), {})[seed] = {k: v + 2 for k, v in base.items()}
      found.setdefault((name, 'norton'), {})[seed] = _summary(rng)
  results = {'command': 'python x', 'setup': 'Setup.', 'entries': nc.entries(grid, found)}
  results['pooled'] = nc.pooled(grid, results['entries'])
  text = nc.markdown(grid, results)
  assert text.startswith('Command: `python x`')
  # Pooled over 2 conditions × 3 seeds: GR 10, 10.5, 11 twice (± 2.57 · 0.447 / √6 = ± 0.5).
  assert '| GR | **+10.5 ± 1.2 ▲** | **+10.5 ± 1.2 ▲** | **+10.5 ± 0.5 ▲** |' in text
  assert '| CL | +2.0 ± 0.0 | +2.0 ± 0.0 | +2.0 ± 0.0 |' in text
  assert '| method | clean | captions swapped 60 % |' in text
  assert '(n=3)' in text and 'Steps with conflicting gradients' in text
  assert '| method | clean | captions swapped 60 % | pooled |' in text
  paths = nc.plot(grid, results, str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == sorted(f'{k}.png' for k in report.HEADLINE)
  assert all(os.path.getsize(p) > 1000 for p in paths)


def test_a_method_is_paired_with_its_control_and_pooled_over_conditions_and_seeds():
  """Norton against post_milnce (its control) per condition, and every comparison pooled over
  (condition, seed) pairs with the clean runs counted once, against a float64 reference."""
  from scipy import stats

  rng = np.random.default_rng(2)
  grid = nc.Grid(('caption_swap', 'audio_swap'), (0.0, 0.3), ('baseline', 'norton', 'post_milnce'),
                 (0, 1, 2))  # fmt: skip
  found = {(name, m): {s: _summary(rng) for s in grid.seeds}
           for name in grid.conditions() for m in grid.methods}  # fmt: skip
  entries = nc.entries(grid, found)
  by = {(e['method'], e['condition']): e for e in entries}
  for name in grid.conditions():
    cell = by[('norton', name)]['metrics']['p2v_ot_R5']
    expected = [found[(name, 'norton')][s]['p2v_ot_R5'] - found[(name, 'post_milnce')][s]['p2v_ot_R5']
                for s in grid.seeds]  # fmt: skip
    np.testing.assert_allclose(cell['diff_vs_control']['values'], expected, rtol=1e-12)
    assert 'diff_vs_control' not in by[('post_milnce', name)]['metrics']['p2v_ot_R5']
  pools = {(p['method'], p['reference'], p['metric']): p for p in nc.pooled(grid, entries)}
  assert set(pools) == {(m, r, k) for m, r in (('norton', 'baseline'), ('post_milnce', 'baseline'),
                                               ('norton', 'post_milnce')) for k in nc.METRICS}  # fmt: skip
  for (method, reference, key), pool in pools.items():
    diffs = np.array([found[(c, method)][s][key] - found[(c, reference)][s][key]
                      for c in grid.conditions() for s in grid.seeds], np.float64)  # fmt: skip
    assert pool['conditions'] == grid.conditions() and pool['n'] == 9  # clean once, not per kind
    half = stats.t.ppf(0.975, 8) * diffs.std(ddof=1) / np.sqrt(9)
    np.testing.assert_allclose(pool['mean'], diffs.mean(), rtol=1e-12)
    np.testing.assert_allclose(pool['ci95'], [diffs.mean() - half, diffs.mean() + half], rtol=1e-9)
    lo, hi = pool['ci95']
    higher = nc.METRICS[key][2]
    assert pool['call'] == ('no difference' if lo <= 0 <= hi else
                            'better' if (lo > 0) == higher else 'worse')  # fmt: skip
  text = nc.markdown(grid, {'command': 'x', 'setup': 'S.', 'entries': entries,
                            'pooled': list(pools.values())})  # fmt: skip
  assert '| Norton post-training − MIL-NCE post-training |' in text


@pytest.mark.slow  # 8 tiny training runs with their evaluations, in a subprocess (~4 min)
def test_quick_setting_at_runlocal_size_runs_resumes_and_reports(tmp_path):
  command = [sys.executable, 'scripts/experiments/noisy_correspondence.py', '--quick',
             '--runlocal', '--methods=baseline,norton', f'--workdir={tmp_path}']  # fmt: skip
  subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=3600)
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['grid']['kinds'] == ['caption_swap'] and results['grid']['seeds'] == [0, 1]
  cells = {(e['method'], e['noise_level']): e for e in results['entries']}
  assert set(cells) == {(m, p) for m in ('baseline', 'norton') for p in (0.0, 0.6)}
  for (method, _), entry in cells.items():
    assert entry['seeds'] == [0, 1]
    for key in nc.METRICS:
      cell = entry['metrics'][key]
      assert len(cell['values']) == 2 and cell['ci95'][0] <= cell['mean'] <= cell['ci95'][1]
      if method == 'norton':
        assert len(cell['diff_vs_baseline']['ci95']) == 2
  # Norton post-trains from its baseline's checkpoint: the last POST steps of the same budget.
  config = json.loads((tmp_path / 'runs/clean/norton/seed1/config.json').read_text())
  assert config['init_from'] == str(tmp_path / 'runs/clean/baseline/seed1')
  assert config['init_from_step'] == 2 and config['seed'] == 1
  assert (tmp_path / 'results.md').read_text().count('(n=2)') > 0
  assert all((tmp_path / 'plots' / f'{k}.png').exists() for k in report.HEADLINE)
  # Everything finished: a second call trains nothing and reports the same figures.
  summary = tmp_path / 'runs/caption_swap60/baseline/seed0/summary.json'
  before = summary.stat().st_mtime_ns
  subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)
  assert summary.stat().st_mtime_ns == before
  again = json.loads((tmp_path / 'results.json').read_text())
  assert again['entries'] == results['entries']


def test_a_run_stopped_by_a_signal_ends_the_grid_with_one_line_and_no_summary(
  tmp_path, monkeypatch
):
  grid = nc.Grid(('caption_swap',), (0.0,), ('baseline',), (0,), runlocal=True)
  total = nc.run_config(grid, str(tmp_path), 0, 'clean', 'baseline').total_steps
  # What trainer.train returns when SIGTERM arrived at step 3: the records it logged.
  monkeypatch.setattr(nc.trainer, 'train', lambda config, workdir: [{'step': 1}, {'step': 3}])
  with pytest.raises(SystemExit, match=rf'stopped by a signal at step 3 of {total} in .*rerun'):
    nc.train(grid, str(tmp_path), 0, 'clean', 'baseline')
  assert not os.path.exists(
    os.path.join(nc.run_dir(str(tmp_path), 0, 'clean', 'baseline'), 'summary.json')
  )


def test_a_second_process_waits_for_what_the_first_holds(tmp_path):
  order = []

  def second():
    with nc.locked(str(tmp_path), 'clean_gr_seed0'):
      order.append('second')

  with nc.locked(str(tmp_path), 'clean_gr_seed0'):
    thread = threading.Thread(target=second)
    thread.start()
    thread.join(timeout=0.5)  # it cannot get in, however long it is given
    order.append('first')
  thread.join()
  assert order == ['first', 'second']


def test_post_training_has_its_baseline_finished_first(tmp_path, monkeypatch):
  grid = nc.Grid(('caption_swap',), (0.0,), ('baseline', 'norton'), (0,), runlocal=True)
  trained = []

  def fake_train(config, workdir):
    trained.append(os.path.relpath(workdir, tmp_path))
    os.makedirs(workdir)  # as the trainer makes it
    return [{'step': config.total_steps}]

  monkeypatch.setattr(nc.trainer, 'train', fake_train)
  monkeypatch.setattr(nc, 'summarise', lambda run: {'steps': 1})
  nc.train(grid, str(tmp_path), 0, 'clean', 'norton')  # the baseline is not there yet
  nc.train(grid, str(tmp_path), 0, 'clean', 'norton')  # both finished: only read
  assert trained == [os.path.join('runs', 'clean', m, 'seed0') for m in ('baseline', 'norton')]
