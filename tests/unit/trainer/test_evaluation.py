"""Exact offline evaluation against an independent brute-force reference."""

import dataclasses
import math

import numpy as np
import pytest

from trainer import metrics
from trainer.evaluation import (
    EvaluationResult,
    Scorer,
    evaluate,
    retrieve,
)
from trainer.merge_selection import select_alpha
from trainer.reference_scorer import MeanPoolScorer

PAD = 0


@pytest.fixture
def quotas():
    """The project's quota rule, used by the brute-force reference as well."""
    from trainer.quotas import compute_quotas

    return compute_quotas


class FixedScorer:
    """User vector depends only on the task; intent looked up by the last history item."""

    def __init__(self, items, users, intent_by_item=None):
        self._items = np.asarray(items, dtype=np.float32)
        self._users = np.asarray(users, dtype=np.float32)
        self._intent = None if intent_by_item is None else np.asarray(intent_by_item, float)
        self.num_tasks = self._users.shape[0] - 1

    def item_embeddings(self):
        return self._items

    def user_embeddings(self, history, task):
        return self._users[task]

    def intent(self, history):
        return None if self._intent is None else self._intent[history[:, -1]]


# ---------------------------------------------------------------- brute force


def _ranked(scorer, history, task, pool):
    """pool sorted by score (descending) then id, for the user tower on ``task``."""
    emb = scorer.item_embeddings()
    e = scorer.user_embeddings(history, np.array([task]))[0]
    return sorted(pool, key=lambda item: (-float(emb[item] @ e), item))


def _brute_lists(
    scorer, histories, exclude, item_cluster, m, merged, alpha, quota_fn, conditioned=True
):
    """Loop over users: sort every candidate (score desc, id asc), take top lists.

    merged lists use the tower conditioned on each cluster, or with
    ``conditioned=False`` the unconditioned one for every cluster (plain merge column).
    """
    emb = scorer.item_embeddings()
    k, n = scorer.num_tasks, emb.shape[0] - 1
    out = []
    for u in range(histories.shape[0]):
        h = histories[u : u + 1]
        banned = set(int(i) for i in exclude[u])
        cands = [i for i in range(1, n + 1) if i not in banned]

        def ranked(task, pool, h=h):
            return _ranked(scorer, h, task, pool)

        if not merged:
            out.append(ranked(k, cands)[:m])
            continue
        per = [
            ranked(c if conditioned else k, [i for i in cands if item_cluster[i] == c])
            for c in range(k)
        ]
        cap = np.array([[len(x) for x in per]])
        p = scorer.intent(h)
        p, a = (np.ones((1, k)), 0.0) if p is None else (p, alpha)
        q = np.asarray(quota_fn(p, m, a, cap))[0]
        out.append([i for c in range(k) for i in per[c][: q[c]]])
    return out


def _brute_within(scorer, histories, exclude, item_cluster, targets, m, merged):
    k = scorer.num_tasks
    found = 0
    for u, t in enumerate(targets):
        c = item_cluster[t]
        banned = set(int(i) for i in exclude[u])
        pool = [i for i in np.flatnonzero(item_cluster == c) if i not in banned]
        found += t in _ranked(scorer, histories[u : u + 1], c if merged else k, pool)[:m]
    return found / len(targets)


def _random_data(seed=0, users=60, n=40, k=4, max_len=5):
    rng = np.random.default_rng(seed)
    item_cluster = np.concatenate([[-1], rng.integers(0, k, size=n)])
    item_cluster[1:3] = k - 1  # cluster k-1 never empty ...
    item_cluster[3:] = np.where(item_cluster[3:] == k - 1, 0, item_cluster[3:])  # ... but tiny
    histories = np.zeros((users, max_len), dtype=np.int32)
    exclude, targets = [], []
    for u in range(users):
        seq = rng.permutation(np.arange(1, n + 1))[: rng.integers(0, 14) + 1]
        targets.append(int(seq[-1]))
        past = seq[:-1]
        exclude.append(past)  # may be longer than max_len
        tail = past[-max_len:]
        if tail.size:
            histories[u, -tail.size :] = tail
    return histories, np.array(targets), exclude, item_cluster


def _recall(lists, targets):
    return float(np.mean([t in lst for lst, t in zip(lists, targets, strict=True)]))


@pytest.fixture(scope="module")
def data():
    return _random_data()


@pytest.fixture(scope="module")
def scorer():
    return MeanPoolScorer.random(num_items=40, num_tasks=4, dim=8, seed=1)


def test_scorer_protocol(scorer):
    assert isinstance(scorer, Scorer)


@pytest.mark.parametrize("merged", [False, True])
def test_recall_and_within_match_brute_force(scorer, data, quotas, merged):
    histories, targets, exclude, item_cluster = data
    result = evaluate(
        scorer, histories, targets, exclude, item_cluster, (3, 10), alpha=1.0, merged=merged
    )
    for m in (3, 10):
        lists = _brute_lists(scorer, histories, exclude, item_cluster, m, merged, 1.0, quotas)
        assert result.recall[m] == pytest.approx(_recall(lists, targets))
        within = _brute_within(scorer, histories, exclude, item_cluster, targets, m, merged)
        assert result.within_cluster_recall[m] == pytest.approx(within)
        hit = np.array([t in row for t, row in zip(targets, lists, strict=True)])
        assert np.array_equal(result.hits[m], hit)  # per user, in the given order
        got = retrieve(scorer, histories, exclude, item_cluster, m, alpha=1.0, merged=merged)
        for row, ref in zip(got, lists, strict=True):
            assert sorted(row[row != PAD]) == sorted(ref)
    assert result.users == len(targets)
    assert 0.0 < result.recall[10] < 1.0


@pytest.mark.parametrize("merged", [False, True])
def test_lists_exclude_history_and_have_m_items(scorer, data, merged):
    histories, _, exclude, item_cluster = data
    m = 10
    got = retrieve(scorer, histories, exclude, item_cluster, m, alpha=2.0, merged=merged)
    assert got.shape == (len(exclude), m)
    for row, banned in zip(got, exclude, strict=True):
        items = row[row != PAD]
        assert not set(items) & set(banned.tolist())
        assert len(set(items)) == len(items) == min(m, 40 - len(banned))


@pytest.mark.parametrize("intent", [False, True])
def test_plain_merge_column(data, quotas, intent):
    histories, targets, exclude, item_cluster = data
    scorer = MeanPoolScorer.random(num_items=40, num_tasks=4, dim=8, seed=2, intent=intent)
    result = evaluate(scorer, histories, targets, exclude, item_cluster, (3, 10), 2.0, False)
    assert result.alpha == (2.0 if intent else 0.0)
    assert (result.intent_top1 is None) == (not intent)
    for m in (3, 10):
        ref = _brute_lists(
            scorer, histories, exclude, item_cluster, m, True, 2.0, quotas, conditioned=False
        )
        assert result.merged_recall[m] == pytest.approx(_recall(ref, targets))
    assert {"merged_recall@3", "recall@10", "intent_top1"} <= set(result.to_json())


def _hand_scorer(p=(0.75, 0.25)):
    # Items 1-4: cluster 0, items 5-8: cluster 1.
    items = [[0, 0], [4, 0], [3, 0], [2, 0], [1, 0], [0, 4], [0, 3], [0, 2], [0, 1]]
    users = [[1, 0], [0, 1], [1, 1.5]]  # task 0, task 1, unconditioned
    intent = np.tile(np.asarray(p, float), (9, 1))
    return FixedScorer(items, users, intent), np.array([-1, 0, 0, 0, 0, 1, 1, 1, 1])


def test_hand_merged_case():
    # History {1, 6}. Conditioned lists: cluster 0 -> [2, 3, 4], cluster 1 -> [5, 7, 8].
    # p = (0.75, 0.25):
    #   M=4, alpha=1   -> quotas (3, 1) -> {2, 3, 4, 5}
    #   M=4, alpha=0   -> quotas (2, 2) -> {2, 3, 5, 7}
    #   M=5, alpha=inf -> cluster 0 capped at 3, remainder 2 -> {2, 3, 4, 5, 7}
    #   M=10           -> only 6 candidates -> all of them, then padding.
    scorer, item_cluster = _hand_scorer()
    hist, excl = np.array([[1, 6]]), [np.array([1, 6])]

    def got(m, alpha):
        row = retrieve(scorer, hist, excl, item_cluster, m, alpha=alpha, merged=True)[0]
        return sorted(row[row != PAD].tolist()), row.shape

    assert got(4, 1.0) == ([2, 3, 4, 5], (4,))
    assert got(4, 0.0) == ([2, 3, 5, 7], (4,))
    assert got(5, math.inf) == ([2, 3, 4, 5, 7], (5,))
    assert got(10, 1.0) == ([2, 3, 4, 5, 7, 8], (10,))
    # Target 7: missed at alpha 1, found at alpha 0; 2nd of its cluster's list.
    r1 = evaluate(scorer, hist, np.array([7]), excl, item_cluster, (1, 2, 4), alpha=1.0)
    r0 = evaluate(scorer, hist, np.array([7]), excl, item_cluster, (4,), alpha=0.0)
    assert r1.recall[4] == 0.0 and r0.recall[4] == 1.0
    assert r1.within_cluster_recall == {1: 0.0, 2: 1.0, 4: 1.0}
    # {2, 3, 4, 5}: clusters (0, 0, 0, 1).
    assert r1.clusters_covered[4] == 2.0
    assert r1.entropy[4] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert r1.intent_top1 == 0.0 and r1.intent_top3 == 1.0


def test_hand_plain_case_tie_break():
    # Unconditioned (1, 1.5): scores 1:4 2:3 3:2 4:1 5:6 6:4.5 7:3 8:1.5. History {1, 6}.
    # Ranking: 5 (6), 2 (3), 7 (3; tie -> smaller id first), 3 (2), 8 (1.5), 4 (1).
    scorer, item_cluster = _hand_scorer()
    hist, excl = np.array([[1, 6]]), [np.array([1, 6])]
    row = retrieve(scorer, hist, excl, item_cluster, 3, merged=False)[0]
    assert row.tolist() == [5, 2, 7]
    res = evaluate(scorer, hist, np.array([7]), excl, item_cluster, (2, 3), merged=False)
    assert res.recall == {2: 0.0, 3: 1.0}
    # Within cluster 1 (unconditioned): 5, 7, 8.
    assert res.within_cluster_recall == {2: 1.0, 3: 1.0}
    # A target in the history can never be retrieved.
    res = evaluate(scorer, hist, np.array([6]), excl, item_cluster, (8,), merged=False)
    assert res.recall[8] == 0.0 and res.within_cluster_recall[8] == 0.0


def test_intent_accuracy():
    k = 4
    items = np.eye(5, 2)  # 4 items, one per cluster
    item_cluster = np.array([-1, 0, 1, 2, 3])
    intent = np.zeros((5, k))
    intent[1] = [0.4, 0.3, 0.2, 0.1]  # user keyed by item 1
    intent[2] = [0.1, 0.2, 0.3, 0.4]  # user keyed by item 2
    scorer = FixedScorer(items, np.ones((k + 1, 2)), intent)
    hist = np.array([[1], [2], [1]])
    targets = np.array([1, 2, 4])  # clusters 0 (top-1), 1 (rank 3), 3 (rank 4)
    res = evaluate(scorer, hist, targets, [[], [], []], item_cluster, (1,))
    assert res.intent_top1 == pytest.approx(1 / 3)
    assert res.intent_top3 == pytest.approx(2 / 3)


def test_diversity_hand_example():
    item_cluster = np.array([-1, 0, 0, 1, 2])
    lists = np.array([[1, 2, 3, PAD], [1, 2, PAD, PAD], [PAD, PAD, PAD, PAD], [1, 3, 4, 2]])
    covered, entropy = metrics.cluster_diversity(lists, item_cluster, 3)
    assert covered.tolist() == [2, 1, 0, 3]
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert entropy == pytest.approx(
        [h, 0.0, 0.0, -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))]
    )


def _alpha_case(correct):
    # K=2, 12 items per cluster, each task ranks its cluster by ascending id.
    # Correct intent: target 10th of its cluster -> only alpha=inf gives it quota 10 (M=10).
    # Wrong intent (0.6 on the other cluster): target 5th -> only the uniform alpha=0 hits.
    n = 24
    items = np.zeros((n + 1, 2))
    items[1:13, 0] = np.arange(12, 0, -1)
    items[13:, 1] = np.arange(12, 0, -1)
    item_cluster = np.array([-1] + [0] * 12 + [1] * 12)
    users = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    intent = np.zeros((n + 1, 2))
    intent[1] = [0.6, 0.4]  # key item 1: leans to cluster 0
    intent[13] = [0.4, 0.6]  # key item 13: leans to cluster 1
    rank = 9 if correct else 4
    key = [1, 13] if correct else [13, 1]
    targets = np.array([1 + rank, 13 + rank])
    hist = np.array([[key[0]], [key[1]]])
    return FixedScorer(items, users, intent), hist, targets, [[], []], item_cluster


@pytest.mark.parametrize("correct,best", [(True, math.inf), (False, 0.0)])
def test_select_alpha(correct, best):
    scorer, hist, targets, excl, item_cluster = _alpha_case(correct)
    sel = select_alpha(scorer, hist, targets, excl, item_cluster, m=10)
    assert sel.alpha == best
    assert list(sel.recalls) == [0.0, 0.5, 1.0, 2.0, 4.0, math.inf]
    assert sel.recalls[best] == 1.0
    assert sum(sel.recalls.values()) == 1.0
    assert "*" in sel.format_table()
    assert sel.to_json()["alpha"] == ("inf" if math.isinf(best) else "0")
    res = evaluate(scorer, hist, targets, excl, item_cluster, (10,), alpha=sel.alpha)
    assert res.recall[10] == 1.0


@pytest.mark.parametrize("merged", [False, True])
def test_batch_size_invariance(scorer, data, merged):
    histories, targets, exclude, item_cluster = data
    runs = [
        evaluate(scorer, histories, targets, exclude, item_cluster, (3, 10), 2.0, merged, bs)
        for bs in (1, 7, 256)
    ]
    tiny = evaluate(
        scorer, histories, targets, exclude, item_cluster, (3, 10), 2.0, merged,
        memory_budget=1,
    )  # fmt: skip
    for other in runs[1:] + [tiny]:
        assert other.to_json() == runs[0].to_json()


def test_result_json_and_table(scorer, data):
    histories, targets, exclude, item_cluster = data
    res = evaluate(scorer, histories, targets, exclude, item_cluster, (20, 50), math.inf)
    assert isinstance(res, EvaluationResult)
    js = res.to_json()
    for key in (
        "recall@20", "recall@50", "within_cluster_recall@20", "within_cluster_recall@50",
        "intent_top1", "intent_top3", "clusters_covered@20", "entropy@50", "alpha", "users",
    ):  # fmt: skip
        assert key in js
    assert js["alpha"] == "inf" and js["users"] == 60
    assert "merged_recall@20" not in js
    table = res.format_table()
    assert "within_cluster_recall" in table and "@50" in table
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.users = 3


def test_top_k_exact_ties_and_short_rows():
    scores = np.array([[1.0, 3.0, 3.0, -np.inf, 3.0], [-np.inf] * 5], dtype=np.float32)
    ids, sc = metrics.top_k_exact(scores, np.array([2, 4, 6, 8, 9]), 2)
    assert ids.tolist() == [[4, 6], [PAD, PAD]]
    ids, _ = metrics.top_k_exact(scores[:, :2], np.array([2, 4]), 3)
    assert ids.tolist() == [[4, 2, PAD], [PAD, PAD, PAD]]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"targets": np.array([1, 2])}, "targets"),
        ({"m_values": (0, 5)}, "M must be >= 1"),
        ({"m_values": ()}, "M must be >= 1"),
        ({"alpha": -1.0}, "alpha"),
        ({"exclude": [[1]]}, "exclude"),
        ({"item_cluster": np.array([-1, 0, 0])}, "item_cluster"),
        ({"item_cluster": np.array([-1, 0, 0, 1, 5])}, "item_cluster"),
        ({"batch_size": 0}, "batch_size"),
        ({"targets": np.array([0, 1, 2])}, "targets"),
    ],
)
def test_input_errors(kwargs, match):
    scorer = MeanPoolScorer.random(num_items=4, num_tasks=2, dim=3)
    args = {
        "histories": np.array([[0, 1], [1, 2], [3, 4]]),
        "targets": np.array([2, 3, 1]),
        "exclude": None,
        "item_cluster": np.array([-1, 0, 0, 1, 1]),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        evaluate(scorer, **args)


def test_select_alpha_needs_intent(data):
    histories, targets, exclude, item_cluster = data
    scorer = MeanPoolScorer.random(num_items=40, num_tasks=4, intent=False)
    with pytest.raises(ValueError, match="intent"):
        select_alpha(scorer, histories, targets, exclude, item_cluster, m=5)
