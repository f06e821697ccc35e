"""vatt_jax.evaluation.statistics against a float64 numpy reference with the t quantiles written out."""

import numpy as np
import pytest

from vatt_jax.evaluation import statistics

# Student-t 0.975 quantiles (two-sided 95 %), by degrees of freedom, from published tables.
T975 = {1: 12.706204736174698, 2: 4.302652729749464, 3: 3.182446305284263, 4: 2.776445105197793,
        9: 2.262157162798205}  # fmt: skip


def reference(values):
  x = np.asarray(values, np.float64)
  n = len(x)
  half = T975[n - 1] * x.std(ddof=1) / np.sqrt(n)
  return x.mean(), (x.mean() - half, x.mean() + half)


@pytest.mark.parametrize('n', [2, 3, 4, 5, 10])
def test_interval_matches_the_t_reference(n):
  values = np.random.default_rng(n).normal(40.0, 7.0, size=n).tolist()
  got = statistics.interval(values)
  mean, ci = reference(values)
  assert got['n'] == n
  np.testing.assert_allclose(got['mean'], mean, rtol=1e-12)
  np.testing.assert_allclose(got['ci95'], ci, rtol=1e-9)
  np.testing.assert_allclose(got['std'], np.std(values, ddof=1), rtol=1e-12)


def test_one_seed_has_no_interval_and_none_is_an_error():
  assert statistics.interval([3.5]) == {'n': 1, 'mean': 3.5, 'std': None, 'ci95': None}
  with pytest.raises(ValueError, match='no values'):
    statistics.interval([])


def test_equal_values_give_a_zero_width_interval():
  got = statistics.interval([2.0, 2.0, 2.0])
  assert got['ci95'] == [2.0, 2.0]


def test_paired_difference_is_the_interval_of_the_per_seed_differences():
  rng = np.random.default_rng(7)
  base = rng.normal(30, 10, size=3)
  shared = rng.normal(0, 10, size=3)  # a seed effect both methods share: pairing removes it
  method = base + shared + np.array([4.0, 5.0, 6.0])
  base = base + shared
  got = statistics.paired_difference(method.tolist(), base.tolist())
  mean, ci = reference(method - base)
  np.testing.assert_allclose(got['values'], method - base, rtol=1e-12)
  np.testing.assert_allclose(got['mean'], mean, rtol=1e-12)
  np.testing.assert_allclose(got['ci95'], ci, rtol=1e-9)
  assert got['call'] == 'better'  # 5 ± 4.30: the interval [0.70, 9.30] excludes 0
  # The unpaired intervals overlap: only the pairing shows the difference.
  a, b = statistics.interval(method.tolist()), statistics.interval(base.tolist())
  assert a['ci95'][0] < b['ci95'][1]


@pytest.mark.parametrize(
  ('diffs', 'higher', 'expected'),
  [
    ([2.0, 2.5, 3.0], True, 'better'),
    ([-2.0, -2.5, -3.0], True, 'worse'),
    ([-2.0, -2.5, -3.0], False, 'better'),  # a median rank going down
    ([2.0, 2.5, 3.0], False, 'worse'),
    ([-1.0, 1.0, 0.5], True, 'no difference'),
    ([4.0], True, 'too few seeds'),
  ],
)
def test_the_call_needs_an_interval_that_excludes_zero(diffs, higher, expected):
  got = statistics.paired_difference(diffs, [0.0] * len(diffs), higher_is_better=higher)
  assert got['call'] == expected


@pytest.mark.parametrize('n', [2, 3])
def test_identical_differences_are_not_called_whatever_their_sign(n):
  # Recalls over 96 items: every seed 1/96 below its baseline (differences equal to rounding).
  base = [20 / 96 * 100, 31 / 96 * 100, 7 / 96 * 100][:n]
  method = [b - 100 / 96 for b in base]
  got = statistics.paired_difference(method, base)
  assert got['call'] == 'no spread'
  np.testing.assert_allclose(got['ci95'], [-100 / 96] * 2, atol=1e-9)  # the interval is reported
  assert statistics.paired_difference([x + 1.0 for x in base], base)['call'] == 'no spread'
  # The smallest real spread is called as usual.
  method[0] -= 100 / 96
  assert statistics.paired_difference(method, base)['call'] in ('worse', 'no difference')


def test_an_interval_touching_zero_is_no_difference():
  assert statistics.call([0.0, 1.0]) == 'no difference'
  assert statistics.call([-1.0, 0.0]) == 'no difference'


def test_paired_difference_refuses_unpaired_lengths():
  with pytest.raises(ValueError, match='paired'):
    statistics.paired_difference([1.0, 2.0], [1.0])
