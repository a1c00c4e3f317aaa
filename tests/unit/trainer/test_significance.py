"""Paired comparison of per-user hits (trainer.significance) against hand references."""

import math

import numpy as np
import pytest

from trainer import significance


def _exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar: twice the smaller binomial tail, capped at 1."""
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize("b,c", [(0, 0), (3, 0), (7, 2), (10, 10), (40, 25), (1, 30)])
def test_mcnemar_matches_the_binomial_tail(b, c):
    expected = 1.0 if b + c == 0 else _exact_mcnemar(b, c)
    assert significance.mcnemar_p(b, c) == pytest.approx(expected, rel=1e-9)


def _pair(n_both, only_a, only_b, neither, seed=0):
    a = np.array([1] * n_both + [1] * only_a + [0] * only_b + [0] * neither, dtype=bool)
    b = np.array([1] * n_both + [0] * only_a + [1] * only_b + [0] * neither, dtype=bool)
    order = np.random.default_rng(seed).permutation(a.size)
    return a[order], b[order]


def test_counts_recalls_and_relative_difference():
    a, b = _pair(30, 12, 4, 154)
    out = significance.paired_comparison(a, b, n_resamples=2000)
    assert (out.users, out.only_a, out.only_b) == (200, 12, 4)
    assert out.recall_a == pytest.approx(42 / 200) and out.recall_b == pytest.approx(34 / 200)
    assert out.relative == pytest.approx(42 / 34 - 1)
    assert out.ci_low < out.relative < out.ci_high
    assert out.p_value == pytest.approx(_exact_mcnemar(12, 4))


def test_bootstrap_interval_matches_a_numpy_resampling():
    a, b = _pair(300, 60, 40, 1600, seed=3)
    out = significance.paired_comparison(a, b, n_resamples=4000, seed=1)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, a.size, size=(4000, a.size))
    ref = a[idx].mean(1) / b[idx].mean(1) - 1
    lo, hi = np.percentile(ref, [2.5, 97.5])
    assert out.ci_low == pytest.approx(lo, abs=0.02) and out.ci_high == pytest.approx(hi, abs=0.02)


def test_identical_models_differ_by_nothing():
    a, _ = _pair(50, 0, 0, 150)
    out = significance.paired_comparison(a, a.copy(), n_resamples=500)
    assert out.relative == 0.0 and out.p_value == 1.0 and out.only_a == out.only_b == 0
    assert out.ci_low == pytest.approx(0.0) and out.ci_high == pytest.approx(0.0)


def test_the_interval_is_reproducible_and_narrows_with_more_users():
    small = significance.paired_comparison(*_pair(30, 12, 4, 154), n_resamples=1000)
    again = significance.paired_comparison(*_pair(30, 12, 4, 154), n_resamples=1000)
    big = significance.paired_comparison(*_pair(300, 120, 40, 1540), n_resamples=1000)
    assert (small.ci_low, small.ci_high) == (again.ci_low, again.ci_high)
    assert big.ci_high - big.ci_low < small.ci_high - small.ci_low


@pytest.mark.parametrize(
    "a,b,match",
    [
        (np.ones(3, bool), np.ones(4, bool), "two \\[users\\] arrays"),
        (np.ones((2, 2), bool), np.ones((2, 2), bool), "two \\[users\\] arrays"),
        (np.zeros(0, bool), np.zeros(0, bool), "at least one user"),
        (np.ones(3, bool), np.zeros(3, bool), "hits no user"),
    ],
)
def test_bad_pairs_are_rejected(a, b, match):
    with pytest.raises(ValueError, match=match):
        significance.paired_comparison(a, b, n_resamples=10)


def test_files_round_trip_and_compare(tmp_path):
    a, b = _pair(30, 12, 4, 154)
    users = np.arange(200) * 3
    pa, pb = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    significance.write_hits(pa, users, {20: a, 50: a | b}, variant="dnc", split="test")
    significance.write_hits(pb, users, {20: b, 50: b}, variant="sasrec", split="test")
    back = significance.read_hits(pa)
    assert np.array_equal(back.users, users) and np.array_equal(back.hits[20], a)
    assert back.meta == {"variant": "dnc", "split": "test"}
    out = significance.compare_files(pa, pb, n_resamples=500)
    assert sorted(out) == [20, 50]
    assert out[20].only_a == 12 and out[50].only_b == 0
    assert not (tmp_path / "a.npz.tmp").exists()


def test_files_of_different_users_are_not_compared(tmp_path):
    a, b = _pair(30, 12, 4, 154)
    significance.write_hits(str(tmp_path / "a.npz"), np.arange(200), {20: a})
    significance.write_hits(str(tmp_path / "b.npz"), np.arange(1, 201), {20: b})
    with pytest.raises(ValueError, match="different users"):
        significance.compare_files(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    with pytest.raises(ValueError, match="shape"):
        significance.write_hits(str(tmp_path / "c.npz"), np.arange(5), {20: a})


def test_one_seed_pooled_is_the_paired_comparison():
    a, b = _pair(30, 12, 4, 154)
    one = significance.pooled_comparison([(a, b)], n_resamples=1000)
    assert one == significance.paired_comparison(a, b, n_resamples=1000)


def test_seeds_pool_by_user_against_a_numpy_cluster_bootstrap():
    rng = np.random.default_rng(5)
    a = rng.random((600, 3)) < 0.25  # 600 users x 3 seeds
    b = rng.random((600, 3)) < 0.2
    out = significance.pooled_comparison(
        [(a[:, s], b[:, s]) for s in range(3)], n_resamples=4000, seed=2
    )
    assert out.seeds == 3 and out.users == 600 and out.p_value is None
    assert out.relative == pytest.approx(a.mean() / b.mean() - 1)
    assert out.only_a == int((a & ~b).sum())
    idx = rng.integers(0, 600, size=(4000, 600))  # users resampled with all their seeds
    ref = a.mean(1)[idx].mean(1) / b.mean(1)[idx].mean(1) - 1
    lo, hi = np.percentile(ref, [2.5, 97.5])
    assert out.ci_low == pytest.approx(lo, abs=0.02) and out.ci_high == pytest.approx(hi, abs=0.02)


def test_seed_files_must_hold_the_same_users(tmp_path):
    a, b = _pair(30, 12, 4, 154)
    paths = {}
    for name, users in (("a1", np.arange(200)), ("b1", np.arange(200)),
                        ("a2", np.arange(200)), ("b2", np.arange(200)),
                        ("a3", np.arange(1, 201)), ("b3", np.arange(1, 201))):  # fmt: skip
        paths[name] = str(tmp_path / f"{name}.npz")
        significance.write_hits(paths[name], users, {20: a if name[0] == "a" else b})
    both = significance.compare_seeds([(paths["a1"], paths["b1"]), (paths["a2"], paths["b2"])])
    assert both[20].seeds == 2 and both[20].relative == pytest.approx(42 / 34 - 1)
    with pytest.raises(ValueError, match="different users"):
        significance.compare_seeds([(paths["a1"], paths["b1"]), (paths["a3"], paths["b3"])])
