"""Tests of preprocessing.clustering with real gensim / scikit-learn on small data."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
import random
import subprocess
import sys
from typing import Dict, List, Tuple

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from preprocessing import clustering
from preprocessing.clustering import ClusterAssignment, fit_clusters
from preprocessing.config import ClusteringConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]
# Small, fast item2vec; no downsampling (on 46 items every item would be "frequent").
SMALL = ClusteringConfig(num_clusters=4, embedding_dim=16, window=3, epochs=10, sample=0.0, seed=3)
GROUP_SIZES = (12, 10, 10, 10)  # group 0 is the largest


def planted(seed: int = 0) -> Tuple[List[List[str]], List[str], Dict[str, int]]:
    """Sequences of users that each stay within one of 4 disjoint item groups."""
    rng = random.Random(seed)
    groups = [[f"g{g}_i{j}" for j in range(n)] for g, n in enumerate(GROUP_SIZES)]
    sequences = [
        [rng.choice(groups[g]) for _ in range(30)] for g in range(len(groups)) for _ in range(40)
    ]
    rng.shuffle(sequences)
    items = [item for group in groups for item in group]
    return sequences, items, {item: int(item[1]) for item in items}


def check_complete(assignment: ClusterAssignment, items: List[str]) -> None:
    assert set(assignment.item_to_cluster) == set(items)
    assert len(assignment.item_to_cluster) == len(items)
    assert set(assignment.item_to_cluster.values()) == set(range(assignment.num_clusters))
    assert len(assignment.names) == assignment.num_clusters
    assert sum(assignment.assignment_source.values()) == len(items)


@pytest.fixture(scope="module")
def planted_fit() -> Tuple[List[List[str]], List[str], Dict[str, int], ClusterAssignment]:
    sequences, items, group = planted()
    return sequences, items, group, fit_clusters(sequences, items, {}, {}, SMALL)


def test_kmeans_recovers_planted_groups(planted_fit) -> None:
    _, items, group, assignment = planted_fit
    check_complete(assignment, items)
    assert assignment.method == "kmeans"
    assert assignment.names == ["c00", "c01", "c02", "c03"]
    assert assignment.assignment_source == {"kmeans": len(items)}
    labels = [assignment.item_to_cluster[item] for item in items]
    assert adjusted_rand_score([group[item] for item in items], labels) > 0.95


def test_kmeans_is_deterministic_and_ignores_user_order(planted_fit) -> None:
    sequences, items, _, assignment = planted_fit
    again = fit_clusters(sequences, items, {}, {}, SMALL)
    shuffled = list(sequences)
    random.Random(1).shuffle(shuffled)
    reordered = fit_clusters(shuffled, list(reversed(items)), {}, {}, SMALL)
    assert again == assignment
    assert reordered.item_to_cluster == assignment.item_to_cluster


@pytest.mark.parametrize("hash_seed", ["1", "987"])
def test_kmeans_is_deterministic_across_processes(planted_fit, hash_seed: str) -> None:
    _, _, _, assignment = planted_fit
    script = (
        "import json, dataclasses\n"
        "from preprocessing.clustering import fit_clusters\n"
        "from tests.unit.preprocessing.test_clustering import SMALL, planted\n"
        "sequences, items, _ = planted()\n"
        "print(json.dumps(fit_clusters(sequences, items, {}, {}, SMALL).item_to_cluster))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == assignment.item_to_cluster


def test_kmeans_fallbacks(planted_fit) -> None:
    sequences, items, group, base = planted_fit
    cluster_of_group = {group[item]: base.item_to_cluster[item] for item in items}
    categories = {item: f"cat{group[item]}" for item in items}
    categories.update({"by_category": "cat1", "new_category": "never_in_train"})
    contexts = {
        "by_category": ["g2_i0", "g2_i1"],  # the category wins over the context
        "by_context": ["g2_i0", "g2_i3", "g2_i5", "unknown"],
        "new_category": ["g3_i1", "g3_i2"],
        "nothing": ["unknown"],
    }
    unseen = ["by_category", "by_context", "new_category", "nothing", "no_context"]
    assignment = fit_clusters(sequences, items + unseen, categories, contexts, SMALL)
    check_complete(assignment, items + unseen)
    assert {item: assignment.item_to_cluster[item] for item in items} == base.item_to_cluster
    assert assignment.item_to_cluster["by_category"] == cluster_of_group[1]
    assert assignment.item_to_cluster["by_context"] == cluster_of_group[2]
    assert assignment.item_to_cluster["new_category"] == cluster_of_group[3]
    # Group 0 has the most items, hence the largest cluster.
    assert assignment.item_to_cluster["nothing"] == cluster_of_group[0]
    assert assignment.item_to_cluster["no_context"] == cluster_of_group[0]
    assert assignment.assignment_source == {
        "kmeans": len(items),
        "category_majority_fallback": 1,
        "context_centroid_fallback": 2,
        "largest_cluster_fallback": 2,
    }


def test_kmeans_reduces_k_to_distinct_train_items(caplog) -> None:
    sequences = [["a", "b", "c", "a"], ["c", "b"]]
    config = dataclasses.replace(SMALL, num_clusters=5)
    with caplog.at_level(logging.WARNING, logger=clustering.__name__):
        assignment = fit_clusters(sequences, ["a", "b", "c", "d"], {}, {}, config)
    assert assignment.num_clusters == 3
    assert assignment.requested_num_clusters == 5
    check_complete(assignment, ["a", "b", "c", "d"])
    assert assignment.assignment_source == {"kmeans": 3, "largest_cluster_fallback": 1}
    assert "using K=3" in caplog.text


CATEGORY_SEQUENCES = [
    ["a1"] * 6 + ["a2"] * 4,  # A: 10 interactions
    ["c1"] * 8,  # C: 8
    ["d1"] * 3 + ["e1"],  # D: 3, E: 1
    ["b1"] * 8 + ["u1"],  # B: 8; u1 (no category) is preceded by b1
]
CATEGORIES = {"a1": "A", "a2": "A", "b1": "B", "c1": "C", "d1": "D", "e1": "E", "zz": "Z"}


def test_category_merges_least_interacted_into_other() -> None:
    items = ["a1", "a2", "b1", "c1", "d1", "e1", "u1", "x1", "x2", "x3"]
    contexts = {"x1": ["a1", "b1", "a2"], "x2": [], "x3": ["b1", "a1", "zz", "nope"]}
    config = ClusteringConfig(method="category", num_clusters=3)
    assignment = fit_clusters(CATEGORY_SEQUENCES, items, CATEGORIES, contexts, config)
    # A (10) and B (8, ties with C by name) keep their clusters; C, D, E become "other".
    assert assignment.names == ["A", "B", "other"]
    assert assignment.item_to_cluster == {
        "a1": 0,
        "a2": 0,
        "b1": 1,
        "c1": 2,
        "d1": 2,
        "e1": 2,
        "u1": 1,  # context (preceding train items) all B
        "x1": 0,  # context majority A
        "x2": 2,  # no context: largest cluster ("other", 3 categorised items)
        "x3": 0,  # A and B tie (zz's category Z is no cluster): the smaller id
    }
    assert assignment.assignment_source == {
        "category": 6,
        "context_majority_fallback": 3,
        "largest_cluster_fallback": 1,
    }
    assert assignment.num_clusters == 3 and assignment.method == "category"


def test_category_with_fewer_categories_than_k(caplog) -> None:
    items = ["a1", "a2", "b1"]
    config = ClusteringConfig(method="category", num_clusters=5)
    with caplog.at_level(logging.WARNING, logger=clustering.__name__):
        assignment = fit_clusters([["a1", "b1", "a2", "a1"]], items, CATEGORIES, {}, config)
    assert assignment.names == ["A", "B"]
    assert assignment.item_to_cluster == {"a1": 0, "a2": 0, "b1": 1}
    assert assignment.num_clusters == 2 and assignment.requested_num_clusters == 5
    assert "only 2 categories" in caplog.text


def test_to_json(planted_fit) -> None:
    sequences, items, _, assignment = planted_fit
    counts = collections.Counter(item for seq in sequences for item in seq)
    summary = assignment.to_json(counts)
    json.dumps(summary)
    assert summary["method"] == "kmeans" and summary["num_clusters"] == 4
    assert summary["assignment_source"] == {"kmeans": len(items)}
    clusters = summary["clusters"]
    assert [c["id"] for c in clusters] == [0, 1, 2, 3]
    assert [c["name"] for c in clusters] == assignment.names
    assert sum(c["size"] for c in clusters) == len(items)
    assert sum(c["train_interactions"] for c in clusters) == sum(counts.values())
    for cluster in clusters:
        top = cluster["top_items"]
        assert len(top) == min(10, cluster["size"])
        assert [t["count"] for t in top] == sorted((t["count"] for t in top), reverse=True)
        assert all(assignment.item_to_cluster[t["item_id"]] == cluster["id"] for t in top)
        assert all(t["count"] == counts[t["item_id"]] for t in top)
        members = [i for i, c in assignment.item_to_cluster.items() if c == cluster["id"]]
        assert top[0]["count"] == max(counts[i] for i in members)


def test_long_sequences_are_split_and_order_fixed() -> None:
    corpus = clustering._corpus([["b"] * 3, ["a"] * 25_000, []], seed=1)
    again = clustering._corpus([["a"] * 25_000, ["b"] * 3], seed=1)
    assert corpus == again
    assert sorted(len(s) for s in corpus) == [3, 5_000, 10_000, 10_000]
    assert all(isinstance(s, tuple) for s in corpus)


@pytest.mark.parametrize(
    ("args", "config", "message"),
    [
        (([["a"]], [], {}, {}), SMALL, "all_items is empty"),
        (([["a", "b"]], ["a"], {}, {}), SMALL, r"missing from all_items, e.g. \['b'\]"),
        (([[]], ["a"], {}, {}), SMALL, "needs training sequences"),
        (([["a"]], ["a"], {}, {}), dataclasses.replace(SMALL, embedding_dim=0), "embedding_dim"),
        (([["a"]], ["a"], {}, {}), dataclasses.replace(SMALL, sample=-1.0), "sample"),
        (([["a"]], ["a"], {"b": "B"}, {}), ClusteringConfig(method="category"), "known category"),
    ],
)
def test_invalid_inputs(args, config: ClusteringConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_clusters(*args, config)


def test_unknown_method_is_rejected() -> None:
    config = ClusteringConfig()
    object.__setattr__(config, "method", "spectral")
    with pytest.raises(ValueError, match="spectral"):
        fit_clusters([["a"]], ["a"], {}, {}, config)


def test_bisecting_recovers_planted_groups() -> None:
    sequences, items, group = planted()
    config = dataclasses.replace(SMALL, kmeans_strategy="bisecting")
    assignment = fit_clusters(sequences, items, {}, {}, config)
    check_complete(assignment, items)
    labels = [assignment.item_to_cluster[item] for item in items]
    assert adjusted_rand_score([group[item] for item in items], labels) > 0.95


def test_bisecting_splits_the_largest_cluster() -> None:
    """Four overlapping groups of 1,000, 100, 100 and 100 points: K-means keeps the big
    group whole (the shape of item2vec's one giant cluster on Amazon Beauty); the bisecting
    strategy splits it, so its largest cluster is about half as big."""
    rng = np.random.default_rng(0)
    groups = [
        rng.normal(0, 1, (1, 8)) * 2 + rng.normal(0, 1, (n, 8)) for n in (1000, 100, 100, 100)
    ]
    points = np.concatenate(groups)
    largest = {}
    for strategy in ("kmeans", "bisecting"):
        config = ClusteringConfig(num_clusters=4, seed=0, kmeans_strategy=strategy)
        estimator = clustering._kmeans_estimator(4, config)
        largest[strategy] = np.bincount(estimator.fit(points).labels_).max()
    assert largest["kmeans"] >= 950
    assert largest["bisecting"] < 600


def test_unknown_kmeans_strategy_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown kmeans_strategy 'balanced'"):
        ClusteringConfig(kmeans_strategy="balanced")


@pytest.mark.parametrize(
    ("tokens", "budget", "expected"),
    [
        (1_000_000, 20_000_000, 10),  # every public data set here: all 10 epochs
        (2_000_000, 20_000_000, 10),
        (5_000_000, 20_000_000, 4),
        (20_141_835, 20_000_000, 1),  # KuaiRand's size: one epoch, never zero
        (10**9, 20_000_000, 1),
        (10**9, 0, 10),  # 0: no bound
        (0, 20_000_000, 10),
    ],
)
def test_item2vec_epochs_follow_the_token_budget(tokens: int, budget: int, expected: int) -> None:
    config = ClusteringConfig(epochs=10, token_budget=budget)
    assert clustering.item2vec_epochs(tokens, config) == expected


def test_token_budget_cuts_the_epochs_of_a_real_fit(caplog) -> None:
    sequences, items, group = planted()
    tokens = sum(len(s) for s in sequences)
    config = dataclasses.replace(SMALL, token_budget=3 * tokens + 1)
    with caplog.at_level(logging.INFO, logger="preprocessing.clustering"):
        assignment = fit_clusters(sequences, items, {}, {}, config)
    assert f"item2vec: training 3 of 10 epochs on {tokens} tokens" in caplog.text
    check_complete(assignment, items)
    labels = [assignment.item_to_cluster[item] for item in items]
    assert adjusted_rand_score([group[item] for item in items], labels) > 0.9


def test_negative_token_budget_is_rejected() -> None:
    with pytest.raises(ValueError, match="token_budget must be >= 0, got -1"):
        ClusteringConfig(token_budget=-1)
