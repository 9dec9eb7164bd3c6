"""Distribution metrics against hand-computed values, and the stratified bootstrap."""
import math

import numpy as np
import pytest

from fastfair import distribution as D


def test_frequencies_and_counts_leave_out_abstentions():
    codes = np.array([0, 0, 1, -1, 0])
    assert D.counts(codes, 2).tolist() == [3, 1]
    np.testing.assert_allclose(D.frequencies(codes, 2), [0.75, 0.25])
    assert np.isnan(D.frequencies(np.array([-1, -1]), 2)).all()
    assert D.encode(["male", None, "female", float("nan")], ["male", "female"]).tolist() == [0, -1, 1, -1]
    with pytest.raises(ValueError, match="not one of the classes"):
        D.encode(["man"], ["male", "female"])
    with pytest.raises(ValueError, match="out of range"):
        D.counts(np.array([2]), 2)


def test_dft_bias_hand_values():
    # binary: |0.8 - 0.2| = 0.6
    assert D.dft_bias([0.8, 0.2]) == pytest.approx(0.6)
    # 4 classes: pairs (.4,.3) .1 (.4,.2) .2 (.4,.1) .3 (.3,.2) .1 (.3,.1) .2 (.2,.1) .1 -> 1.0 / 6
    assert D.dft_bias([0.4, 0.3, 0.2, 0.1]) == pytest.approx(1.0 / 6)
    # balanced is 0; one class only is 2/K
    assert D.dft_bias([0.25] * 4) == pytest.approx(0.0)
    assert D.dft_bias([1, 0, 0, 0]) == pytest.approx(0.5)
    # gender x race (8 joint classes) as DFT computes it, over ordered pairs == unordered pairs
    f = np.array([0.3, 0.2, 0.1, 0.0, 0.2, 0.1, 0.05, 0.05])
    ordered = np.mean([abs(f[i] - f[j]) for i in range(8) for j in range(8) if i != j])
    assert D.dft_bias(f) == pytest.approx(ordered)
    # batched over leading axes
    np.testing.assert_allclose(D.dft_bias([[0.8, 0.2], [0.5, 0.5]]), [0.6, 0.0])


def test_delta_kl_gap_risk_difference_hand_values():
    assert D.delta([0.8, 0.2]) == pytest.approx(0.6)       # |0.8 - 0.5| / 0.5
    assert D.delta([0.2, 0.8]) == pytest.approx(0.6)
    assert D.delta([0.5, 0.5]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="binary"):
        D.delta([0.2, 0.3, 0.5])
    assert D.kl_to_uniform([0.5, 0.5]) == pytest.approx(0.0)
    assert D.kl_to_uniform([1.0, 0.0]) == pytest.approx(math.log(2))          # 0 log 0 = 0
    assert D.kl_to_uniform([0.75, 0.25]) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))  # 0.130812
    assert D.kl_to_uniform([0.75, 0.25]) == pytest.approx(0.1308120, abs=1e-7)
    assert D.kl_to_uniform([0.5, 0.25, 0.25, 0.0]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(1.0))
    # DFT's age gap: (|f_young - 0.75| + |f_old - 0.25|) / 2
    assert D.target_gap([0.9, 0.1], [0.75, 0.25]) == pytest.approx(0.15)
    assert D.target_gap([0.75, 0.25], [0.75, 0.25]) == pytest.approx(0.0)
    assert D.target_gap([0.5, 0.3, 0.2], [1 / 3] * 3) == pytest.approx((1 / 6 + 1 / 30 + 2 / 15) / 3)
    assert D.risk_difference([0.8, 0.2]) == pytest.approx(0.6)
    assert D.risk_difference([0.1, 0.6, 0.3], 0, 1) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="different classes"):
        D.risk_difference([0.5, 0.5], 0, 0)
    with pytest.raises(ValueError, match="one entry per class"):
        D.target_gap([0.5, 0.5], [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        D.dft_bias([0.5, 0.6])
    with pytest.raises(ValueError, match="at least 2 classes"):
        D.dft_bias([1.0])


def test_bootstrap_matches_an_explicit_loop_and_is_reproducible():
    rng = np.random.default_rng(3)
    groups = [rng.random(7), rng.random(5), rng.random(9)]
    est, lo, hi = D.bootstrap_ci(groups, D.mean_statistic, n_boot=200, seed=11)
    # explicit: same generator, same draw order (group by group, (B, n) indices each)
    r = np.random.default_rng(11)
    per_group = []
    for g in groups:
        idx = r.integers(0, g.size, size=(200, g.size))
        per_group.append(np.array([g[i].mean() for i in idx]))
    dist = np.mean(per_group, axis=0)
    exp_lo, exp_hi = np.percentile(dist, [2.5, 97.5])
    assert est == pytest.approx(np.mean([g.mean() for g in groups]))
    assert (lo, hi) == (pytest.approx(exp_lo), pytest.approx(exp_hi))
    assert D.bootstrap_ci(groups, D.mean_statistic, n_boot=200, seed=11) == (est, lo, hi)
    assert D.bootstrap_ci(groups, D.mean_statistic, n_boot=200, seed=12) != (est, lo, hi)
    assert lo <= est <= hi


def test_bootstrap_degenerate_and_empty():
    assert D.bootstrap_ci([np.full(6, 0.4)], D.mean_statistic) == (pytest.approx(0.4),) * 3
    est, lo, hi = D.bootstrap_ci([np.array([])], D.mean_statistic)
    assert math.isnan(est) and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="level"):
        D.bootstrap_ci([np.ones(3)], D.mean_statistic, level=1.5)


def test_frequency_statistic_over_bootstrap_resamples():
    # all 'male' in one prompt, balanced in another: DFT bias 1.0 and 0.0, macro mean 0.5
    codes = [np.array([0, 0, 0, 0]), np.array([0, 1, 0, 1])]
    stat = D.frequency_statistic(2, D.dft_bias)
    assert stat(codes[0][None])[0] == pytest.approx(1.0)
    assert stat(codes[1][None])[0] == pytest.approx(0.0)
    est, lo, hi = D.bootstrap_ci(codes, stat, n_boot=300, seed=0)
    assert est == pytest.approx(0.5)
    assert 0.5 <= hi <= 1.0 and lo == pytest.approx(0.5)  # resampling can only unbalance the second prompt
    # a prompt whose images were all abstained on gives NaN and is left out of the macro mean
    est2, _, _ = D.bootstrap_ci(codes + [np.array([-1, -1])], stat, n_boot=50)
    assert est2 == pytest.approx(0.5)
