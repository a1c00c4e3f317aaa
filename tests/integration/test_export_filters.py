"""``retrieve_filtered``: cluster-restricted retrieval and per-request exclusions.

The tiny catalogue has 200 items, so with ``max_num_results = 200`` the unrestricted
``retrieve`` list is the whole unseen catalogue in merged order: every filtered list can be
checked against a cut of it.
"""

import numpy as np
import pytest
import tensorflow as tf

from serving.export import export_model, load_exported
from tests.integration.test_export import _train, raw_requests
from trainer import data

ALL = 200
EXPORT = dict(index="brute-force", max_num_results=ALL, default_num_results=10, max_history=100,
              max_exclude=5)  # fmt: skip
M = 12


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("filters")
    model_dir = _train(tiny_data, root / "model", "dnc")
    ev = data.evaluation_data(tiny_data, "test", 10, max_users=20, seed=1)
    items = data.load_items(tiny_data)
    raw = raw_requests(ev.exclude, items)
    models = {
        merge: load_exported(
            export_model(model_dir, tiny_data, str(root / merge), merge=merge, alpha=1.0, **EXPORT)
        )
        for merge in ("score", "quota")
    }
    return {"models": models, "raw": raw, "k": items.num_clusters, "tiny_data": tiny_data}


def _retrieve(model, raw, m):
    out = model.signatures["retrieve"](
        history=tf.constant(raw, tf.string), alpha=tf.constant(1.0), num_results=tf.constant(m)
    )
    return {k: v.numpy() for k, v in out.items()}


def _filtered(model, raw, m, clusters, exclude):
    out = model.signatures["retrieve_filtered"](
        history=tf.constant(raw, tf.string),
        alpha=tf.constant(1.0),
        num_results=tf.constant(m),
        clusters=tf.constant(clusters, tf.int32),
        exclude=tf.constant(exclude, tf.string),
    )
    return {k: v.numpy() for k, v in out.items()}


def _no_filter(raw):
    return np.full((len(raw), 1), -1, np.int32), np.full((len(raw), 1), "", dtype=object)


@pytest.mark.parametrize("merge", ["score", "quota"])
def test_no_filter_equals_retrieve(setup, merge):
    model, raw = setup["models"][merge], setup["raw"]
    plain = _retrieve(model, raw, M)
    filtered = _filtered(model, raw, M, *_no_filter(raw))
    for key in ("item_ids", "scores", "clusters"):
        np.testing.assert_array_equal(filtered[key], plain[key])


def test_clusters_cut_the_score_merged_ranking(setup):
    model, raw, k = setup["models"]["score"], setup["raw"], setup["k"]
    full = _retrieve(model, raw, ALL)  # whole unseen catalogue, merged order
    rng = np.random.default_rng(0)
    clusters = np.full((len(raw), 2), -1, np.int32)
    for row in range(len(raw)):  # one or two clusters per row; row 0 keeps padding only
        if row:
            clusters[row, : 1 + row % 2] = rng.choice(k, 1 + row % 2, replace=False)
    out = _filtered(model, raw, M, clusters, _no_filter(raw)[1])
    for row in range(len(raw)):
        wanted = set(clusters[row][clusters[row] >= 0]) or set(range(k))
        keep = np.isin(full["clusters"][row], list(wanted))
        np.testing.assert_array_equal(out["item_ids"][row], full["item_ids"][row][keep][:M])
        np.testing.assert_array_equal(out["scores"][row], full["scores"][row][keep][:M])
        assert set(out["clusters"][row]) <= wanted


def test_quota_merge_shares_the_slots_among_the_given_clusters(setup):
    model, raw = setup["models"]["quota"], setup["raw"]
    clusters = np.tile(np.array([[1, 3]], np.int32), (len(raw), 1))
    out = _filtered(model, raw, M, clusters, _no_filter(raw)[1])
    assert set(out["clusters"].ravel()) <= {1, 3}
    assert b"" not in out["item_ids"].ravel().tolist()  # both clusters have >= M unseen items
    assert len({tuple(row) for row in out["item_ids"].tolist()}) > 1  # still personal


@pytest.mark.parametrize("merge", ["score", "quota"])
def test_exclude_removes_items_and_changes_no_score(setup, merge):
    model, raw = setup["models"][merge], setup["raw"]
    longer = _retrieve(model, raw, M + 5)
    exclude = np.full((len(raw), 6), "", dtype=object)
    exclude[:, :3] = longer["item_ids"][:, [0, 2, 4]]  # three of each row's top items
    exclude[:, 3] = "not-an-item"  # unknown ids are ignored
    out = _filtered(model, raw, M, _no_filter(raw)[0], exclude)
    for row in range(len(raw)):
        dropped = set(exclude[row, :3].tolist())
        if merge == "score":  # a pure filter on the same joint scores
            keep = [i for i, item in enumerate(longer["item_ids"][row]) if item not in dropped]
            np.testing.assert_array_equal(out["item_ids"][row], longer["item_ids"][row][keep][:M])
            np.testing.assert_array_equal(out["scores"][row], longer["scores"][row][keep][:M])
        assert not dropped & set(out["item_ids"][row].tolist())
        assert b"" not in out["item_ids"][row].tolist()


def test_bad_filters_are_invalid_arguments(setup):
    model, raw = setup["models"]["score"], setup["raw"][:2]
    clusters, exclude = _no_filter(raw)
    with pytest.raises(tf.errors.InvalidArgumentError, match="clusters must be cluster ids"):
        _filtered(model, raw, M, np.array([[setup["k"]], [0]], np.int32), exclude)
    with pytest.raises(tf.errors.InvalidArgumentError, match="clusters must be cluster ids"):
        _filtered(model, raw, M, np.array([[-2], [0]], np.int32), exclude)
    with pytest.raises(tf.errors.InvalidArgumentError, match="one row per history"):
        _filtered(model, raw, M, clusters[:1], exclude)
    too_many = np.full((2, 6), "x", dtype=object)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_exclude=5"):
        _filtered(model, raw, M, clusters, too_many)


def test_plain_variant_restricts_the_global_list(setup, tmp_path):
    model_dir = _train(setup["tiny_data"], tmp_path / "sasrec", "sasrec", steps=2)
    version = export_model(model_dir, setup["tiny_data"], str(tmp_path / "out"), **EXPORT)
    model = load_exported(version)
    raw = setup["raw"]
    full = _retrieve(model, raw, ALL)
    clusters = np.full((len(raw), 1), 2, np.int32)
    out = _filtered(model, raw, M, clusters, _no_filter(raw)[1])
    for row in range(len(raw)):
        keep = full["clusters"][row] == 2
        np.testing.assert_array_equal(out["item_ids"][row], full["item_ids"][row][keep][:M])
