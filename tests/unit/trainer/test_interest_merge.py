"""Merging per-interest lists: by score (NumPy == graph == global top of the max score)
and ComiRec's diversity aggregation; the evaluation of multi-interest scorers."""

import numpy as np
import pytest
import tensorflow as tf  # conftest imports dnc_env first

from trainer import evaluation, metrics
from trainer.config import PAD_ID
from trainer.interest_merge import diversity_merge, interest_merge, interest_merge_tf

RNG = np.random.default_rng(5)
N, NI, D, K = 40, 3, 5, 4


def _per_interest_lists(b=6, width=8, excluded=None):
    """Each interest's exact top-``width`` over items 1..N, and the max-score reference."""
    interests = RNG.normal(size=(b, NI, D)).astype(np.float32)
    items = RNG.normal(size=(N + 1, D)).astype(np.float32)
    scores = np.einsum("bid,nd->bin", interests, items)
    scores[:, :, PAD_ID] = -np.inf
    if excluded is not None:
        scores[excluded[:, None, :].repeat(NI, 1)] = -np.inf
    cols = np.arange(N + 1)
    ids = np.zeros((b, NI, width), np.int64)
    top = np.zeros((b, NI, width), np.float32)
    for i in range(NI):
        ids[:, i], top[:, i] = metrics.top_k_exact(scores[:, i], cols, width)
    return ids, top, scores.max(axis=1)


def test_score_merge_is_the_global_top_of_the_best_interest_score():
    excluded = RNG.random((6, N + 1)) < 0.2
    ids, top, best = _per_interest_lists(excluded=excluded)
    got, got_scores = interest_merge(top, ids, 8)
    want, want_scores = metrics.top_k_exact(best, np.arange(N + 1), 8)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-6)
    assert not excluded[np.arange(6)[:, None], got].any()


@pytest.mark.parametrize("width", [3, 8, 30])
def test_graph_merge_equals_numpy(width):
    ids, top, _ = _per_interest_lists(width=8)
    ids[0, 1, 5:] = PAD_ID  # empty slots
    top[0, 1, 5:] = -np.inf
    ids[1, 2, :] = ids[1, 0, :]  # a duplicated list with other scores
    top[1, 2, :] = top[1, 0, :] - 0.5
    want_ids, want_scores = interest_merge(top, ids, width)
    s, i = interest_merge_tf(tf.constant(top), tf.constant(ids, tf.int32), width)
    np.testing.assert_array_equal(i.numpy(), want_ids)
    np.testing.assert_allclose(s.numpy(), want_scores, atol=1e-6)
    for row in i.numpy():
        real = row[row != PAD_ID]
        assert len(set(real.tolist())) == len(real)  # no duplicates


def test_duplicates_keep_their_best_score():
    ids = np.array([[[7, 3], [3, 9]]])
    scores = np.array([[[5.0, 1.0], [4.0, 2.0]]])
    got_ids, got_scores = interest_merge(scores, ids, 4)
    np.testing.assert_array_equal(got_ids, [[7, 3, 9, PAD_ID]])
    np.testing.assert_allclose(got_scores, [[5, 4, 2, -np.inf]])


def test_diversity_merge_trades_score_for_clusters():
    item_cluster = np.array([-1, 0, 0, 0, 1, 2])
    ids = np.array([[[1, 2, 3], [4, 5, 1]]])
    scores = np.array([[[3.0, 2.9, 2.8], [1.0, 0.5, 0.0]]])
    np.testing.assert_array_equal(
        diversity_merge(scores, ids, item_cluster, 3, 0.0), interest_merge(scores, ids, 3)[0]
    )
    # lam = 2: after item 1 (cluster 0), item 4 gains 1.0 + 2 > 2.9 + 0 (item 2); then item 2
    # gains 2.9 + 2 > 2.8 + 2 (item 3) > 0.5 + 4 (item 5).
    np.testing.assert_array_equal(diversity_merge(scores, ids, item_cluster, 3, 2.0), [[1, 4, 2]])
    # lam = 10: every pick is a new cluster while one is left.
    np.testing.assert_array_equal(diversity_merge(scores, ids, item_cluster, 3, 10.0), [[1, 4, 5]])
    with pytest.raises(ValueError, match="lambda"):
        diversity_merge(scores, ids, item_cluster, 3, -1.0)


class _InterestScorer:
    """A NumPy multi-interest scorer: fixed interests per user index (row of history[:, -1])."""

    def __init__(self, interests, items):
        self.interests, self.items, self.num_tasks = interests, items, K
        self.num_interests = interests.shape[1]

    def item_embeddings(self):
        return self.items

    def user_embeddings(self, history, task):
        raise AssertionError("multi-interest scorers are read through interest_embeddings")

    def interest_embeddings(self, history):
        return self.interests[history[:, -1]]

    def intent(self, history):
        return None


def test_evaluation_of_a_multi_interest_scorer_merges_by_the_best_interest():
    users = 50
    items = RNG.normal(size=(N + 1, D)).astype(np.float32)
    interests = RNG.normal(size=(N + 1, NI, D)).astype(np.float32)
    histories = np.zeros((users, 4), np.int32)
    histories[:, -1] = RNG.integers(1, N + 1, size=users)
    histories[:, -2] = RNG.integers(1, N + 1, size=users)
    item_cluster = np.concatenate([[-1], RNG.integers(0, K, size=N)])
    scorer = _InterestScorer(interests, items)
    best = np.einsum("bid,nd->bin", interests[histories[:, -1]], items).max(axis=1)
    best[:, PAD_ID] = -np.inf
    best[np.arange(users)[:, None], histories] = -np.inf
    top, _ = metrics.top_k_exact(best, np.arange(N + 1), 10)
    targets = top[:, 4]  # in every user's top-10, never in its top-3
    result = evaluation.evaluate(
        scorer, histories, targets, None, item_cluster, m_values=(3, 10), merged=False
    )
    assert result.recall == {3: 0.0, 10: 1.0}
    diverse = evaluation.evaluate(
        scorer, histories, targets, None, item_cluster, m_values=(10,), merged=False,
        diversity_lambda=100.0,
    )  # fmt: skip
    assert diverse.clusters_covered[10] >= result.clusters_covered[10]
    assert diverse.diversity_lambda == 100.0 and "diversity_lambda" in diverse.to_json()
