"""Exporting a trained tiny model as a TF Serving SavedModel, reloading it and serving."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from serving.export import (
    METADATA_DIR,
    METADATA_FILE,
    ExportConfig,
    export_model,
    load_exported,
    next_version,
)
from trainer import data, evaluation
from trainer.config import ModelConfig, TrainConfig
from trainer.train import ModelScorer, load_model, train

SMALL = ModelConfig(embedding_dim=16, max_len=10, num_blocks=1, dropout=0.0)
USERS = 60
# Brute force: max_history covers every tiny history, so it matches the exact path.
BRUTE = dict(index="brute-force", max_num_results=20, default_num_results=10, max_history=100)
# ScaNN on the ~40-item clusters: k = 10 + 20 (+ no exclusions) < cluster size, so the
# tree is used.
SCANN = dict(index="scann", max_num_results=10, default_num_results=10, max_history=20,
             max_exclude=0)  # fmt: skip


def _train(tiny_data, output, variant, steps=5, **overrides):
    """Trains a tiny model for ``steps`` steps (``overrides``: other TrainConfig fields)."""
    settings = dict(model=SMALL, epochs=1, batch_size=32, eval_users=40, eval_m=(5, 10))
    settings.update(overrides)
    config = TrainConfig(
        data=tiny_data, output=str(output), variant=variant, steps_per_epoch=steps, **settings
    )
    train(config, verbose=0)
    return str(output)


def raw_requests(exclude, items) -> np.ndarray:
    """Raw-id request rows [U, width] of model-id histories ``exclude`` ("" pads the right)."""
    width = max(len(h) for h in exclude)
    raw = np.full((len(exclude), width), "", dtype=object)
    for row, history in enumerate(exclude):
        raw[row, : len(history)] = items.item_ids[history - 1]
    return raw


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    """A trained dnc model exported twice into one BASE/NAME: brute force (1), ScaNN (2)."""
    root = tmp_path_factory.mktemp("export")
    model_dir = _train(tiny_data, root / "model", "dnc")
    output = str(root / "serving" / "dnc")
    brute = export_model(model_dir, tiny_data, output, merge="quota", **BRUTE)
    with open(os.path.join(brute, METADATA_DIR, METADATA_FILE)) as f:
        alpha = json.load(f)["alpha"]
    alpha = float(alpha)
    scann = export_model(
        model_dir, tiny_data, output, alpha=alpha, merge="quota", scann_min_size=16, **SCANN
    )
    return {
        "model_dir": model_dir,
        "output": output,
        "alpha": alpha,
        "brute": brute,
        "scann": scann,
        "brute_model": load_exported(brute),
        "scann_model": load_exported(scann),
    }


@pytest.fixture(scope="module")
def requests(tiny_data):
    """Test-split histories: model ids (full, oldest first) and raw-id request tensors."""
    items = data.load_items(tiny_data)
    ev = data.evaluation_data(tiny_data, "test", SMALL.max_len, max_users=USERS, seed=1)
    return {"items": items, "ev": ev, "raw": raw_requests(ev.exclude, items)}


def _serve(loaded, history, alpha=None, num_results=None, signature="retrieve"):
    fn = loaded.signatures[signature]
    if signature == "retrieve":
        out = fn(
            history=tf.constant(history, tf.string),
            alpha=tf.constant(alpha, tf.float32),
            num_results=tf.constant(num_results, tf.int32),
        )
    else:
        out = fn(history=tf.constant(history, tf.string))
    return {key: value.numpy() for key, value in out.items()}


def _to_model_ids(items, raw_ids):
    index = {item.encode(): i + 1 for i, item in enumerate(items.item_ids)}
    return np.vectorize(lambda x: index.get(x, 0), otypes=[np.int64])(raw_ids)


def _reference(
    tiny_data, exported, requests, m, max_history, merge="quota", alpha=None, prompt_weight=1.0
):
    model, _ = load_model(exported["model_dir"], tiny_data)
    ev = requests["ev"]
    return evaluation.retrieve(
        ModelScorer(model),
        ev.histories,
        [h[-max_history:] for h in ev.exclude],
        requests["items"].item_cluster,
        m=m,
        alpha=exported["alpha"] if alpha is None else alpha,
        progress=False,
        merge=merge,
        prompt_weight=prompt_weight,
    )


def _check_lists(out, history_ids, m):
    ids = out["item_ids"]
    assert ids.shape == out["scores"].shape == out["clusters"].shape == (len(history_ids), m)
    for row, history in zip(ids, history_ids, strict=True):
        history = [x if isinstance(x, bytes) else x.encode() for x in history]
        assert b"" not in row.tolist()
        assert len(set(row.tolist())) == m  # no duplicates
        assert not set(row.tolist()) & (set(history) - {b""})  # history never returned


def test_brute_force_export_matches_the_exact_evaluation_path(tiny_data, exported, requests):
    m = BRUTE["max_num_results"]
    out = _serve(exported["brute_model"], requests["raw"], exported["alpha"], m)
    _check_lists(out, requests["raw"], m)
    served = _to_model_ids(requests["items"], out["item_ids"])
    reference = _reference(tiny_data, exported, requests, m, BRUTE["max_history"])
    for row in range(USERS):
        assert set(served[row]) == set(reference[row]), row
    item_cluster = requests["items"].item_cluster
    np.testing.assert_array_equal(out["clusters"], item_cluster[served])
    assert np.all(np.diff(out["scores"], axis=1) <= 0)  # best first


@pytest.mark.parametrize("alpha,weight", [(1.0, 1.0), (0.0, 1.0), (1.0, 0.5), (2.0, 0.0)])
def test_score_merge_export_matches_the_exact_evaluation_path(
    tiny_data, exported, requests, tmp_path, alpha, weight
):
    """The SavedModel's score merge (exact log-partitions in the graph, blended queries at
    prompt weights below 1) = evaluation's."""
    path = export_model(
        exported["model_dir"], tiny_data, str(tmp_path / "dnc"), merge="score", alpha=alpha,
        prompt_weight=weight, **BRUTE,
    )  # fmt: skip
    with open(os.path.join(path, METADATA_DIR, METADATA_FILE)) as f:
        metadata = json.load(f)
    assert metadata["merge"] == "score" and metadata["prompt_weight"] == weight
    m = BRUTE["max_num_results"]
    out = _serve(load_exported(path), requests["raw"], alpha, m)
    _check_lists(out, requests["raw"], m)
    served = _to_model_ids(requests["items"], out["item_ids"])
    reference = _reference(
        tiny_data, exported, requests, m, BRUTE["max_history"], "score", alpha, weight
    )
    np.testing.assert_array_equal(served, reference)  # same items, same order
    assert np.all(np.diff(out["scores"], axis=1) <= 0)
    # The exact log-partitions' item tables (a brute-force matmul per request) are kept
    # only where the offsets count: prompt weight > 0.
    stored = [n for n, _ in tf.train.list_variables(os.path.join(path, "variables", "variables"))]
    assert any(n.startswith("cluster_tables/") for n in stored) == (weight > 0), stored
    if weight == 0.0:  # the unprompted global ranking: the plain path's lists
        model, _ = load_model(exported["model_dir"], tiny_data)
        ev = requests["ev"]
        plain = evaluation.retrieve(
            ModelScorer(model), ev.histories, [h[-BRUTE["max_history"] :] for h in ev.exclude],
            requests["items"].item_cluster, m=m, merged=False, progress=False,
        )  # fmt: skip
        np.testing.assert_array_equal(served, plain)
    if (
        alpha == 1.0 and weight == 1.0
    ):  # log-probabilities of a distribution over the unseen catalogue
        assert np.all(np.exp(out["scores"].astype(np.float64)).sum(-1) <= 1.0 + 1e-5)


def test_scann_export_recalls_the_exact_lists(tiny_data, exported, requests):
    m = SCANN["default_num_results"]
    out = _serve(exported["scann_model"], requests["raw"], signature="serving_default")
    history = np.array([row[-SCANN["max_history"] :] for row in _compact(requests["raw"])])
    _check_lists(out, history, m)
    served = _to_model_ids(requests["items"], out["item_ids"])
    exact = _reference(tiny_data, exported, requests, m, SCANN["max_history"])
    recall = np.mean([len(set(a) & set(b)) / m for a, b in zip(served, exact, strict=True)])
    print(f"ScaNN recall@{m} vs exact: {recall:.4f}")
    assert recall >= 0.95


def _compact(raw):
    """Right-aligned rows of the non-empty entries (the same width)."""
    width = max(int((row != "").sum()) for row in raw)
    out = np.full((len(raw), width), "", dtype=object)
    for i, row in enumerate(raw):
        kept = row[row != ""]
        out[i, width - len(kept) :] = kept
    return out.astype(bytes)


def test_long_histories_are_excluded_up_to_max_history(exported, requests):
    items = requests["items"]
    ids = np.array([x.encode() for x in items.item_ids], dtype=object)
    # 90 items >> max_len = 10: the tower sees the last 10, all 90 are excluded.
    out = _serve(exported["brute_model"], ids[None, :90], exported["alpha"], 20)
    _check_lists(out, ids[None, :90], 20)
    # 150 items > max_history = 100: only the most recent 100 are excluded.
    out = _serve(exported["brute_model"], ids[None, :150], exported["alpha"], 20)
    _check_lists(out, ids[None, 50:150], 20)


def test_unknown_item_ids_are_ignored(exported, requests):
    raw = requests["raw"][:8]
    noisy = np.full((8, raw.shape[1] + 3), "", dtype=object)
    noisy[:, 0] = "not-an-item"
    noisy[:, 2 : 2 + raw.shape[1]] = raw
    noisy[:, -1] = "unknown-too"
    for key in ("brute_model", "scann_model"):
        clean = _serve(exported[key], raw, signature="serving_default")
        dirty = _serve(exported[key], noisy, signature="serving_default")
        np.testing.assert_array_equal(clean["item_ids"], dirty["item_ids"])
        np.testing.assert_allclose(clean["scores"], dirty["scores"], rtol=1e-6)


def test_num_results_above_the_maximum_raises(exported, requests):
    loaded = exported["brute_model"]
    out = _serve(loaded, requests["raw"][:2], 1.0, 3)
    assert out["item_ids"].shape == (2, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_num_results"):
        _serve(loaded, requests["raw"][:2], 1.0, BRUTE["max_num_results"] + 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="alpha"):
        _serve(loaded, requests["raw"][:2], -1.0, 3)


def test_versions_increase_and_appear_atomically(exported):
    output = exported["output"]
    assert exported["brute"] == os.path.join(output, "1")
    assert exported["scann"] == os.path.join(output, "2")
    assert sorted(os.listdir(output)) == ["1", "2"]  # no staging directory left
    assert next_version(output) == 3
    for version in ("1", "2"):
        assert os.path.exists(os.path.join(output, version, "saved_model.pb"))


def test_metadata_describes_the_export(tiny_data, exported):
    with open(os.path.join(exported["scann"], METADATA_DIR, METADATA_FILE)) as f:
        meta = json.load(f)
    items = data.load_items(tiny_data)
    assert meta["variant"] == "dnc" and meta["num_clusters"] == items.num_clusters == 5
    assert sum(meta["cluster_sizes"]) == items.num_items
    assert meta["index"]["kind"] == "scann"
    for size, plan in zip(meta["cluster_sizes"], meta["index"]["plans"], strict=True):
        # k = max_num_results + max_history + max_exclude = 30; clusters it covers are
        # searched exactly.
        assert plan["k"] == min(30, size) and plan["size"] == size
        assert plan["kind"] == ("scann" if size > 30 else "brute-force")
        if plan["kind"] == "scann":
            assert 1 <= plan["num_leaves_to_search"] <= plan["num_leaves"]
    assert any(p["kind"] == "scann" for p in meta["index"]["plans"])
    assert meta["max_num_results"] == 10 and meta["max_history"] == 20 and meta["version"] == 2
    assert meta["max_exclude"] == 0
    assert len(meta["data_fingerprint"]) == 64
    assert "val_recall@5" in meta["validation_metrics"]
    assert meta["exported_at"] and float(meta["alpha"]) == exported["alpha"]


def test_example_signature_matches_serving_default(exported, requests):
    raw = requests["raw"][:6]
    examples = []
    for row in raw:
        history = [x.encode() for x in row if x]
        feature = {"history": tf.train.Feature(bytes_list=tf.train.BytesList(value=history))}
        examples.append(tf.train.Example(features=tf.train.Features(feature=feature)))
    serialized = tf.constant([e.SerializeToString() for e in examples])
    for key in ("brute_model", "scann_model"):
        loaded = exported[key]
        direct = _serve(loaded, raw, signature="serving_default")
        via = {
            k: v.numpy()
            for k, v in loaded.signatures["predict_examples"](examples=serialized).items()
        }
        for name in ("item_ids", "clusters"):
            np.testing.assert_array_equal(direct[name], via[name])
        np.testing.assert_allclose(direct["scores"], via["scores"], rtol=1e-6)


def test_embedding_and_intent_signatures_match_the_model(tiny_data, exported, requests):
    model, _ = load_model(exported["model_dir"], tiny_data)
    scorer = ModelScorer(model)
    ev = requests["ev"]
    loaded = exported["brute_model"]
    tasks = np.arange(USERS, dtype=np.int32) % 6  # 5 = no task
    got = loaded.signatures["user_embedding"](
        history=tf.constant(requests["raw"].astype(bytes)), cluster=tf.constant(tasks)
    )["embedding"].numpy()
    np.testing.assert_allclose(got, scorer.user_embeddings(ev.histories, tasks), atol=1e-5)
    p = loaded.signatures["intent"](history=tf.constant(requests["raw"].astype(bytes)))
    np.testing.assert_allclose(p["probabilities"].numpy(), scorer.intent(ev.histories), atol=1e-5)


def test_invalid_settings_and_mf_are_rejected(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="annoy"):
        ExportConfig("m", tiny_data, "o", index="annoy")
    with pytest.raises(ValueError, match="default_num_results=30"):
        ExportConfig("m", tiny_data, "o", max_num_results=20, default_num_results=30)
    with pytest.raises(ValueError, match="alpha"):
        ExportConfig("m", tiny_data, "o", alpha=-1.0)
    model_dir = _train(tiny_data, tmp_path / "mf", "mf", steps=1)
    with pytest.raises(ValueError, match="'mf'"):
        export_model(model_dir, tiny_data, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "1")


def test_plain_variant_serves_the_global_top_m(tiny_data, tmp_path, requests):
    model_dir = _train(tiny_data, tmp_path / "sasrec", "sasrec", steps=2)
    version = export_model(model_dir, tiny_data, str(tmp_path / "out"), **BRUTE)
    out = _serve(load_exported(version), requests["raw"], 3.0, 15)
    _check_lists(out, requests["raw"], 15)
    model, _ = load_model(model_dir, tiny_data)
    ev = requests["ev"]
    reference = evaluation.retrieve(
        ModelScorer(model), ev.histories, ev.exclude, requests["items"].item_cluster, m=15,
        merged=False, progress=False,
    )  # fmt: skip
    served = _to_model_ids(requests["items"], out["item_ids"])
    for row in range(USERS):
        assert set(served[row]) == set(reference[row]), row


def test_implied_intent_export_matches_the_exact_evaluation_path(tiny_data, requests, tmp_path):
    """Output prompts + the implied intent (a global softmax head) in the graph = evaluation."""
    model_dir = _train(
        tiny_data,
        tmp_path / "model",
        "dnc",
        steps=4,
        model=dataclasses.replace(SMALL, prompt_position="output"),
        training="all-positions",
        loss="sampled-softmax",
        num_negatives=8,
        intent_encoder="implied",
        intent_weight=1.0,
        batch_size=16,
    )
    path = export_model(model_dir, tiny_data, str(tmp_path / "dnc"), merge="score", alpha=1.0,
                        **BRUTE)  # fmt: skip
    m = BRUTE["max_num_results"]
    out = _serve(load_exported(path), requests["raw"], 1.0, m)
    _check_lists(out, requests["raw"], m)
    served = _to_model_ids(requests["items"], out["item_ids"])
    reference = _reference(
        tiny_data, {"model_dir": model_dir}, requests, m, BRUTE["max_history"],
        merge="score", alpha=1.0,
    )  # fmt: skip
    np.testing.assert_array_equal(served, reference)
    intent = (
        load_exported(path)
        .signatures["intent"](history=tf.constant(requests["raw"], tf.string))["probabilities"]
        .numpy()
    )
    np.testing.assert_allclose(intent.sum(axis=1), 1.0, rtol=1e-5)  # cluster masses
    # The quota merge computes its quotas from the same intent in the graph (static K).
    path = export_model(model_dir, tiny_data, str(tmp_path / "dnc-quota"), merge="quota",
                        alpha=1.0, **BRUTE)  # fmt: skip
    out = _serve(load_exported(path), requests["raw"], 1.0, m)
    reference = _reference(
        tiny_data, {"model_dir": model_dir}, requests, m, BRUTE["max_history"],
        merge="quota", alpha=1.0,
    )  # fmt: skip
    served = _to_model_ids(requests["items"], out["item_ids"])
    for row in range(USERS):  # quota lists: the same items (served best first)
        assert set(served[row]) == set(reference[row]), row
