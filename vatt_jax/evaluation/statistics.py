"""Statistics over seeds for experiment tables: a mean with its 95 % interval, and paired
differences between methods that share seeds (the same initialisation and data order per seed).

The interval is Student's t over the seeds (scipy.stats.t): mean ± t(0.975, n−1) · s / √n with the
sample standard deviation s (ddof 1). With one seed there is no interval (None). A paired difference
is the same interval over the per-seed differences `method − baseline`; `call` says 'better' or
'worse' only when that interval excludes 0 (for metrics where lower is better, such as a median
rank, 'better' means a negative difference), else 'no difference'.

Identical differences on every seed (a zero sample deviation, to rounding) give an interval of
zero width around them, which would call any nonzero difference. With metrics that move in steps
(a recall over 96 items moves by 1.04 points) two or three seeds often differ by the same step
by chance: such a difference is not called ('no spread'), whatever its sign. With three seeds a
sign test could not call it either (all three of one sign: p = 0.25).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as scipy_stats

CONFIDENCE = 0.95
# Differences whose sample deviation is below this (relative to their mean) count as identical.
SPREAD_TOLERANCE = 1e-9


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
  """{'n', 'mean', 'std', 'ci95': [lo, hi] or None (one value)} of per-seed values."""
  values = [float(v) for v in values]
  n = len(values)
  if n == 0:
    raise ValueError('interval of no values')
  mean = math.fsum(values) / n
  if n == 1:
    return {'n': 1, 'mean': mean, 'std': None, 'ci95': None}
  std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
  half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
  return {'n': n, 'mean': mean, 'std': std, 'ci95': [mean - half, mean + half]}


def paired_difference(
  values: Sequence[float],
  baseline: Sequence[float],
  *,
  higher_is_better: bool = True,
  confidence: float = CONFIDENCE,
) -> dict:
  """interval() of the per-seed differences values[i] − baseline[i] (the same seeds, in order),
  with 'values' (the differences) and 'call': 'better' / 'worse' when the interval excludes 0,
  'no difference' when it holds 0, 'too few seeds' with one seed, 'no spread' when the
  differences are identical (module docstring)."""
  if len(values) != len(baseline):
    raise ValueError(f'paired difference of {len(values)} against {len(baseline)} values')
  diffs = [float(a) - float(b) for a, b in zip(values, baseline, strict=True)]
  result = interval(diffs, confidence)
  result['values'] = diffs
  spread = result['std']
  if spread is not None and spread <= SPREAD_TOLERANCE * max(1.0, abs(result['mean'])):
    result['call'] = 'no spread'
  else:
    result['call'] = call(result['ci95'], higher_is_better)
  return result


def call(ci: Sequence[float] | None, higher_is_better: bool = True) -> str:
  """'better' / 'worse' when the interval of a difference excludes 0, else 'no difference'."""
  if ci is None:
    return 'too few seeds'
  lo, hi = ci
  if lo > 0 or hi < 0:
    return 'better' if (lo > 0) == higher_is_better else 'worse'
  return 'no difference'
