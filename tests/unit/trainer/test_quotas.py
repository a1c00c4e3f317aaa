"""Quota computation and per-cluster merge: NumPy reference and TF version."""

import numpy as np
import pytest
import tensorflow as tf  # conftest imports dnc_env first
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.quotas import (
    cluster_capacity,
    cluster_capacity_tf,
    compute_quotas,
    compute_quotas_tf,
    merge_per_cluster,
    merge_per_cluster_tf,
)


def _both(p, m, alpha, capacity):
    p = np.asarray(p, np.float64)
    capacity = np.asarray(capacity)
    ref = compute_quotas(p, m, alpha, capacity)
    got = compute_quotas_tf(p, m, alpha, capacity).numpy()
    assert np.array_equal(ref, got), (ref, got)
    return ref


def test_alpha_zero_gives_equal_shares():
    p = [[0.7, 0.1, 0.2, 0.0]]
    assert _both(p, 20, 0.0, [[100] * 4]).tolist() == [[5, 5, 5, 5]]


def test_alpha_zero_capped_cluster_redistributes():
    q = _both([[0.7, 0.1, 0.2, 0.0]], 20, 0.0, [[100, 2, 100, 100]])
    assert q.tolist() == [[6, 2, 6, 6]]


def test_equal_share_ties_break_by_cluster_id():
    assert _both([[0.25] * 3], 20, 0.0, [[100] * 3]).tolist() == [[7, 7, 6]]
    # Largest remainder wins the spare unit.
    assert _both([[0.3, 0.6, 0.1]], 1, 1.0, [[5] * 3]).tolist() == [[0, 1, 0]]


@pytest.mark.parametrize("alpha", [50.0, np.inf])
def test_large_alpha_gives_all_to_top_cluster_until_capped(alpha):
    p = [[0.2, 0.5, 0.3, 0.0]]
    assert _both(p, 20, alpha, [[100] * 4]).tolist() == [[0, 20, 0, 0]]
    assert _both(p, 20, alpha, [[100, 12, 3, 100]]).tolist() == [[5, 12, 3, 0]]


def test_alpha_one_is_proportional():
    assert _both([[0.4, 0.3, 0.2, 0.1]], 20, 1.0, [[100] * 4]).tolist() == [[8, 6, 4, 2]]
    assert _both([[0.4, 0.3, 0.2, 0.1]], 20, 1.0, [[2, 100, 100, 100]]).tolist() == [[2, 9, 6, 3]]


def test_total_capacity_below_m_and_zero_probabilities():
    assert _both([[0.5, 0.5, 0.0]], 20, 1.0, [[3, 4, 2]]).tolist() == [[3, 4, 2]]
    assert _both([[0.0, 0.0, 0.0]], 7, 2.0, [[9, 9, 9]]).sum() == 7
    assert _both([[0.0, 0.0]], 5, 1.0, [[0, 0]]).tolist() == [[0, 0]]


def test_compute_quotas_rejects_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        compute_quotas(np.ones((1, 2)), 5, -1.0, np.ones((1, 2), int))
    with pytest.raises(ValueError, match="capacity shape"):
        compute_quotas(np.ones((1, 2)), 5, 1.0, np.ones((1, 3), int))
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        compute_quotas(np.ones((1, 2)), 5, 1.0, -np.ones((1, 2), int))


def test_tf_quotas_in_graph_with_tensor_alpha():
    fn = tf.function(
        compute_quotas_tf,
        input_signature=[
            tf.TensorSpec([None, 3], tf.float32),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([None, 3], tf.int32),
        ],
    )
    p = np.array([[0.5, 0.3, 0.2]], np.float32)
    cap = np.array([[100, 100, 1]], np.int32)
    for alpha in (0.0, 1.0, np.inf):
        got = fn(p, 10, alpha, cap).numpy()
        assert np.array_equal(got, compute_quotas(p, 10, alpha, cap))


@st.composite
def _quota_case(draw):
    b = draw(st.integers(1, 4))
    k = draw(st.integers(1, 8))
    probs = st.one_of(st.just(0.0), st.floats(1e-6, 1.0), st.sampled_from([0.1, 0.25, 0.5]))
    p = np.array(draw(st.lists(probs, min_size=b * k, max_size=b * k))).reshape(b, k)
    cap = np.array(draw(st.lists(st.integers(0, 30), min_size=b * k, max_size=b * k)))
    m = draw(st.integers(0, 60))
    alpha = draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 50.0, np.inf]), st.floats(0, 10)))
    return p, m, alpha, cap.reshape(b, k)


@settings(max_examples=200, deadline=None)
@given(_quota_case())
def test_quota_properties(case):
    p, m, alpha, cap = case
    q = _both(p, m, alpha, cap)
    assert q.dtype == np.int32
    np.testing.assert_array_equal(q.sum(-1), np.minimum(m, cap.sum(-1)))
    assert (q >= 0).all() and (q <= cap).all()


def _lists(b, k, m_max, seed=0):
    rng = np.random.default_rng(seed)
    scores = -np.sort(-rng.normal(size=(b, k, m_max)), axis=-1).astype(np.float32)
    ids = rng.permutation(b * k * m_max).reshape(b, k, m_max).astype(np.int32) + 1
    return scores, ids


def test_merge_returns_m_unique_sorted_ids():
    scores, ids = _lists(3, 4, 20)
    quotas = compute_quotas(np.array([[0.4, 0.3, 0.2, 0.1]] * 3), 20, 1.0, np.full((3, 4), 20))
    out_ids, out_scores, clusters = merge_per_cluster(scores, ids, quotas)
    assert out_ids.shape == (3, 20)
    for b in range(3):
        assert len(set(out_ids[b].tolist())) == 20
        assert (np.diff(out_scores[b]) <= 0).all()
        for k in range(4):
            chosen = set(out_ids[b][clusters[b] == k].tolist())
            assert chosen == set(ids[b, k, : quotas[b, k]].tolist())
    tf_out = merge_per_cluster_tf(scores, ids, quotas)
    for ref, got in zip((out_ids, out_scores, clusters), tf_out, strict=True):
        np.testing.assert_array_equal(ref, got.numpy())


def test_merge_pads_short_rows_and_breaks_ties_by_position():
    scores = np.zeros((2, 2, 3), np.float32)
    ids = np.arange(1, 13).reshape(2, 2, 3)
    quotas = np.array([[2, 1], [1, 0]])
    for fn in (merge_per_cluster, merge_per_cluster_tf):
        out_ids, out_scores, clusters = (np.asarray(t) for t in fn(scores, ids, quotas, m=4))
        assert out_ids.tolist() == [[1, 2, 4, 0], [7, 0, 0, 0]]
        assert clusters.tolist() == [[0, 0, 1, -1], [0, -1, -1, -1]]
        assert np.isneginf(out_scores[1, 1:]).all()


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 8), st.integers(0, 10_000))
def test_merge_tf_matches_numpy(b, k, m_max, seed):
    scores, ids = _lists(b, k, m_max, seed)
    rng = np.random.default_rng(seed)
    scores = np.round(scores, 1)  # create ties
    quotas = rng.integers(0, m_max + 1, size=(b, k))
    ref = merge_per_cluster(scores, ids, quotas)
    got = merge_per_cluster_tf(scores, ids, quotas)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_array_equal(r, g.numpy())
        assert r.shape[1] == quotas.sum(-1).max()


def test_merge_rejects_bad_quotas():
    scores, ids = _lists(1, 2, 3)
    with pytest.raises(ValueError, match="quotas"):
        merge_per_cluster(scores, ids, np.array([[4, 0]]))


def test_cluster_capacity_counts_distinct_history_items():
    history = np.array([[0, 0, 1, 2, 2, 5], [3, 3, 3, 3, 3, 3]])
    cluster_of_id = np.array([-1, 0, 0, 1, 1, 2])
    sizes = np.array([2, 2, 1])
    expected = [[0, 2, 0], [2, 1, 1]]
    assert cluster_capacity(history, cluster_of_id, sizes).tolist() == expected
    assert cluster_capacity_tf(history, cluster_of_id, sizes).numpy().tolist() == expected
