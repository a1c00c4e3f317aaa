"""The score merge: NumPy reference, TensorFlow version, and the distribution it claims."""

import math

import numpy as np
import pytest
import tensorflow as tf

from trainer import candidate_lists, evaluation, merge_selection, merges, score_merge
from trainer.config import PAD_ID
from trainer.reference_scorer import MeanPoolScorer


def _lists(rng, b=6, k=4, length=7, empty_tail=True):
    scores = np.sort(rng.normal(size=(b, k, length)).astype(np.float32), axis=-1)[..., ::-1]
    ids = rng.permutation(np.arange(1, b * k * length + 1)).reshape(b, k, length)
    if empty_tail:  # some clusters run out of candidates
        scores[0, 1, 3:] = -np.inf
        ids[0, 1, 3:] = PAD_ID
        scores[2, 3, :] = -np.inf
        ids[2, 3, :] = PAD_ID
    log_z = rng.normal(size=(b, k)) + 3.0
    p = rng.dirichlet(np.ones(k), size=b)
    return np.ascontiguousarray(scores), ids, log_z, p


def test_joint_scores_follow_the_formula():
    rng = np.random.default_rng(0)
    scores, _, log_z, p = _lists(rng, empty_tail=False)
    for alpha in (0.0, 0.5, 1.0, 3.0):
        got = score_merge.joint_scores(scores, log_z, p, alpha)
        want = scores - log_z[..., None] + alpha * np.log(p)[..., None]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_score_merge_is_the_top_m_of_the_union_by_joint_score():
    rng = np.random.default_rng(1)
    scores, ids, log_z, p = _lists(rng)
    m = 9
    out_ids, out_scores, out_clusters = score_merge.score_merge(scores, ids, log_z, p, 1.0, m)
    joint = score_merge.joint_scores(scores, log_z, p, 1.0)
    for row in range(scores.shape[0]):
        flat = joint[row].ravel()
        best = np.argsort(-flat, kind="stable")[:m]
        np.testing.assert_array_equal(out_ids[row], ids[row].ravel()[best])
        np.testing.assert_allclose(out_scores[row], flat[best], rtol=1e-6)
        np.testing.assert_array_equal(out_clusters[row], best // scores.shape[2])


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.5, math.inf])
@pytest.mark.parametrize("m", [0, 5, 28])
def test_tensorflow_score_merge_equals_numpy(alpha, m):
    rng = np.random.default_rng(2)
    scores, ids, log_z, p = _lists(rng)
    want = score_merge.score_merge(scores, ids, log_z, p, alpha, m)
    got = score_merge.score_merge_tf(
        tf.constant(scores), tf.constant(ids), tf.constant(log_z), tf.constant(p), alpha, m
    )
    np.testing.assert_array_equal(got[0].numpy(), want[0])
    np.testing.assert_allclose(got[1].numpy(), want[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[2].numpy(), want[2])


def test_log_partition_matches_numpy_and_skips_excluded_items():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(4, 9)).astype(np.float32) * 5
    excluded = rng.random((4, 9)) < 0.3
    excluded[3] = True  # nothing left: -inf
    want = [
        np.log(np.exp(row[~ex].astype(np.float64)).sum()) if (~ex).any() else -np.inf
        for row, ex in zip(s, excluded, strict=True)
    ]
    np.testing.assert_allclose(score_merge.log_partition(s, excluded), want, rtol=1e-9)
    got = score_merge.log_partition_tf(tf.constant(s), tf.constant(excluded)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_joint_score_is_a_distribution_over_the_unseen_catalogue():
    """alpha = 1: exp(joint) over every unseen item of every cluster sums to 1."""
    num_items, k = 30, 3
    scorer = MeanPoolScorer.random(num_items=num_items, num_tasks=k, dim=4, seed=5)
    rng = np.random.default_rng(5)
    item_cluster = np.concatenate([[-1], rng.integers(0, k, num_items)])
    histories = np.zeros((8, 5), np.int64)
    for row in histories:
        n = rng.integers(1, 6)
        row[-n:] = rng.choice(np.arange(1, num_items + 1), n, replace=False)
    data = candidate_lists.prepare(scorer, histories, None, None, item_cluster)
    (batch,) = candidate_lists.batches(scorer, data, num_items, True, 64, False, 2**30)
    ids, joint, _ = score_merge.score_merge(
        batch.scores, batch.ids, batch.log_z, batch.intent, 1.0, num_items
    )
    for row, history in enumerate(histories):
        unseen = set(range(1, num_items + 1)) - set(history.tolist())
        returned = ids[row][ids[row] != PAD_ID]
        assert set(returned.tolist()) == unseen
        total = np.exp(joint[row][ids[row] != PAD_ID].astype(np.float64)).sum()
        assert total == pytest.approx(1.0, abs=1e-5)


def test_evaluation_score_merge_beats_nothing_and_reports_the_merge():
    """evaluate(merge="score") runs the score merge: its lists equal score_merge's."""
    num_items, k = 40, 4
    scorer = MeanPoolScorer.random(num_items=num_items, num_tasks=k, dim=6, seed=7)
    rng = np.random.default_rng(7)
    item_cluster = np.concatenate([[-1], rng.integers(0, k, num_items)])
    histories = rng.integers(1, num_items + 1, size=(20, 6))
    lists = evaluation.retrieve(scorer, histories, None, item_cluster, m=10, merge="score")
    data = candidate_lists.prepare(scorer, histories, None, None, item_cluster)
    (batch,) = candidate_lists.batches(scorer, data, 10, True, 64, False, 2**30)
    want, _, _ = score_merge.score_merge(
        batch.scores, batch.ids, batch.log_z, batch.intent, merges.DEFAULT_ALPHA, 10
    )
    np.testing.assert_array_equal(lists, want)
    result = evaluation.evaluate(
        scorer, histories, lists[:, 0], None, item_cluster, m_values=(10,), merge="score"
    )
    assert result.merge == "score" and result.recall[10] == 1.0


def test_merge_selection_covers_both_merges():
    num_items, k = 40, 4
    scorer = MeanPoolScorer.random(num_items=num_items, num_tasks=k, dim=6, seed=8)
    rng = np.random.default_rng(8)
    item_cluster = np.concatenate([[-1], rng.integers(0, k, num_items)])
    histories = rng.integers(1, num_items + 1, size=(30, 6))
    targets = rng.integers(1, num_items + 1, size=30)
    sel = merge_selection.select_merge(scorer, histories, targets, None, item_cluster, m=10)
    assert {g for g, _, _ in sel.recalls} == {"quota", "score"}
    assert sel.recalls[(sel.merge, sel.alpha, sel.prompt_weight)] == max(sel.recalls.values())
    assert {w for g, _, w in sel.recalls if g == "quota"} == {1.0}
    weights = [w for g, _, w in sel.recalls if g == "score"]
    assert set(weights) == set(merges.PROMPT_WEIGHT_GRID) and weights.count(0.0) == 1
    keys = sel.to_json()
    assert "recall@10[alpha=1]" in keys and "recall@10[score,alpha=1]" in keys
    assert "recall@10[score,alpha=1,w=0.5]" in keys
    assert merge_selection.selection_grids("score", 2.0) == {"score": (2.0,)}
    with pytest.raises(ValueError, match="unknown merge"):
        merge_selection.selection_grids("best")


def test_every_merge_has_a_validation_grid():
    assert tuple(merges.MERGE_GRIDS) == score_merge.MERGES
    with pytest.raises(ValueError, match="unknown merge"):
        merges.check_merge("best")


def test_blended_joint_scores_weight_the_offsets():
    rng = np.random.default_rng(9)
    scores, _, log_z, p = _lists(rng, empty_tail=False)
    for w in (0.0, 0.3, 1.0):
        got = score_merge.joint_scores(scores, log_z, p, 2.0, w)
        want = scores + w * (2.0 * np.log(p) - log_z)[..., None]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="prompt_weight"):
        score_merge.joint_scores(scores, log_z, p, 1.0, 1.5)


@pytest.mark.parametrize("w", [0.0, 0.4, 1.0])
def test_tensorflow_blend_equals_numpy(w):
    rng = np.random.default_rng(10)
    prompted = rng.normal(size=(3, 4, 5)).astype(np.float32)
    plain = rng.normal(size=(3, 5)).astype(np.float32)
    want = score_merge.blend_queries(prompted, plain, w)
    np.testing.assert_allclose(want[:, 2], w * prompted[:, 2] + (1 - w) * plain, rtol=1e-6)
    got = score_merge.blend_queries_tf(tf.constant(prompted), tf.constant(plain), w).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    scores, ids, log_z, p = _lists(rng)
    want = score_merge.score_merge(scores, ids, log_z, p, 1.0, 9, w)
    got = score_merge.score_merge_tf(
        tf.constant(scores), tf.constant(ids), tf.constant(log_z), tf.constant(p), 1.0, 9, w
    )
    np.testing.assert_array_equal(got[0].numpy(), want[0])
    np.testing.assert_allclose(got[1].numpy(), want[1], rtol=1e-5, atol=1e-5)


def test_prompt_weight_zero_is_the_unprompted_global_ranking():
    """w = 0: every cluster is queried by u_K with no offsets, so the merged list is the
    plain model's global top-M; w = 1 is the score merge of the prompted queries."""
    num_items, k = 50, 4
    scorer = MeanPoolScorer.random(num_items=num_items, num_tasks=k, dim=6, seed=11)
    rng = np.random.default_rng(11)
    item_cluster = np.concatenate([[-1], rng.integers(0, k, num_items)])
    histories = rng.integers(1, num_items + 1, size=(25, 6))
    blended = evaluation.retrieve(
        scorer, histories, None, item_cluster, m=12, merge="score", prompt_weight=0.0
    )
    plain = evaluation.retrieve(scorer, histories, None, item_cluster, m=12, merged=False)
    np.testing.assert_array_equal(blended, plain)
    full = evaluation.retrieve(scorer, histories, None, item_cluster, m=12, merge="score")
    assert not np.array_equal(full, plain)  # the prompts and the intent do move items
    with pytest.raises(ValueError, match="needs the score merge"):
        evaluation.retrieve(scorer, histories, None, item_cluster, m=5, prompt_weight=0.5)


def test_blended_joint_score_lists_match_the_brute_force_blend():
    """w = 0.5 in evaluation: each cluster's list ranks by the blended query's scores."""
    num_items, k, w = 40, 3, 0.5
    scorer = MeanPoolScorer.random(num_items=num_items, num_tasks=k, dim=5, seed=12)
    rng = np.random.default_rng(12)
    item_cluster = np.concatenate([[-1], rng.integers(0, k, num_items)])
    histories = rng.integers(1, num_items + 1, size=(10, 4))
    data = candidate_lists.prepare(scorer, histories, None, None, item_cluster)
    (batch,) = candidate_lists.batches(scorer, data, 5, True, 64, False, 2**30, prompt_weight=w)
    items = scorer.item_embeddings()
    for row, history in enumerate(histories):
        tasks = np.arange(k + 1)
        u = scorer.user_embeddings(np.repeat(history[None], k + 1, 0), tasks)
        for c in range(k):
            q = w * u[c] + (1 - w) * u[k]
            cols = [i for i in np.flatnonzero(item_cluster == c) if i not in set(history)]
            s = items[cols] @ q
            best = np.asarray(cols)[np.argsort(-s, kind="stable")[:5]]
            np.testing.assert_array_equal(batch.ids[row, c, : len(best)], best)
            z = np.log(np.exp(s.astype(np.float64)).sum())
            assert batch.log_z[row, c] == pytest.approx(z, rel=1e-5)


def test_evaluating_several_prompt_weights_at_once_equals_one_at_a_time():
    """evaluate_weights (one tower pass, the training monitor's path) gives each weight the
    result evaluate gives it alone, and runs the towers once per user batch."""
    num_items, k = 60, 4
    scorer = MeanPoolScorer.random(num_items=num_items, num_tasks=k, dim=6, seed=13)
    rng = np.random.default_rng(13)
    item_cluster = np.concatenate([[-1], rng.integers(0, k, num_items)])
    histories = rng.integers(1, num_items + 1, size=(40, 6))
    targets = rng.integers(1, num_items + 1, size=40)
    weights = (1.0, 0.0, 0.5)
    calls = []
    user_embeddings = scorer.user_embeddings
    scorer.user_embeddings = lambda *a, **kw: calls.append(1) or user_embeddings(*a, **kw)
    together = evaluation.evaluate_weights(
        scorer, histories, targets, None, item_cluster, m_values=(5, 10), merge="score",
        batch_size=16, prompt_weights=weights,
    )  # fmt: skip
    assert len(calls) == 3  # 40 users in batches of 16: one tower call per batch
    assert [r.recall for r in together] != [together[0].recall] * 3  # the weights differ
    for w, got in zip(weights, together, strict=True):
        alone = evaluation.evaluate(
            scorer, histories, targets, None, item_cluster, m_values=(5, 10), merge="score",
            batch_size=16, prompt_weight=w,
        )  # fmt: skip
        assert got.recall == alone.recall
        assert got.within_cluster_recall == alone.within_cluster_recall
        assert got.intent_top1 == alone.intent_top1
        for m in (5, 10):
            np.testing.assert_array_equal(got.hits[m], alone.hits[m])
    with pytest.raises(ValueError, match="at least one"):
        evaluation.evaluate_weights(
            scorer, histories, targets, None, item_cluster, prompt_weights=()
        )
