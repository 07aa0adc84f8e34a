"""Intervals over seeds against hand computations and a coverage simulation."""
import math

import numpy as np
import pytest

from fedpft_lab.stats import mean_ci, paired_diff, share_above, t_quantile


@pytest.mark.parametrize("df, table", [(1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)])
def test_t_quantile_matches_printed_tables(df, table):
    assert t_quantile(0.95, df) == pytest.approx(table, abs=5e-4)


def test_mean_ci_by_hand():
    r = mean_ci([1, 2, 3, 4, 5])
    sd = math.sqrt(2.5)                   # sum of squared deviations 10, over n - 1 = 4
    half = 2.7764 * sd / math.sqrt(5)     # t_{0.975, 4} from a printed table
    assert (r["n"], r["mean"]) == (5, 3.0) and r["sd"] == pytest.approx(sd)
    assert r["ci"] == pytest.approx([3 - half, 3 + half], abs=1e-4)
    assert r["values"] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_one_value_has_no_spread_rather_than_zero():
    r = mean_ci([0.8])
    assert r["mean"] == 0.8 and r["sd"] is None and r["ci"] is None


def test_equal_values_have_a_zero_width_interval():
    assert mean_ci([0.5, 0.5, 0.5])["ci"] == [0.5, 0.5]


def test_empty_is_an_error():
    with pytest.raises(ValueError):
        mean_ci([])


def test_intervals_cover_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    samples = rng.normal(2.0, 3.0, size=(4000, 4))   # 4 seeds per experiment, as a small compare
    cover = [lo <= 2.0 <= hi for lo, hi in (mean_ci(s)["ci"] for s in samples)]
    assert np.mean(cover) == pytest.approx(0.95, abs=0.012)   # 3.5 binomial sd


def test_paired_diff_pairs_by_seed_not_by_order():
    a = {0: 0.80, 1: 0.70, 2: 0.90}
    b = {2: 0.80, 0: 0.75, 1: 0.70}                # other insertion order
    r = paired_diff(a, b)
    half = 4.3027 * 0.05 / math.sqrt(3)          # diffs 0.05, 0, 0.1: sd 0.05; t_{0.975, 2}
    assert r["seeds"] == [0, 1, 2] and r["values"] == pytest.approx([0.05, 0.0, 0.1])
    assert r["mean"] == pytest.approx(0.05) and r["sd"] == pytest.approx(0.05)
    assert r["ci"] == pytest.approx([0.05 - half, 0.05 + half], abs=1e-4)


def test_paired_interval_is_narrow_when_seeds_move_both_methods():
    seed_effect = np.array([0.60, 0.75, 0.90, 0.70])       # the split moves both methods a lot
    a = dict(enumerate(seed_effect + 0.02))
    b = dict(enumerate(seed_effect + np.array([0.0, 0.001, -0.001, 0.0])))
    paired = paired_diff(a, b)
    lo, hi = paired["ci"]
    assert 0 < lo < 0.02 < hi < 0.03                          # clearly positive when paired ...
    unpaired = mean_ci(list(a.values()))["ci"]
    assert unpaired[1] - unpaired[0] > 10 * (hi - lo)         # ... invisible in either method's own interval


def test_paired_diff_needs_the_same_seeds():
    with pytest.raises(ValueError, match="same seeds"):
        paired_diff({0: 1.0, 1: 1.0}, {0: 1.0})


def test_share_above_counts_strictly_greater():
    assert share_above([(1, 0), (0, 1), (1, 1), (2, 1)]) == {"above": 2, "points": 4, "fraction": 0.5}
    assert share_above([]) == {"above": 0, "points": 0, "fraction": None}
