"""MIND and ComiRec-SA: train -> save -> load -> export; the graph's merge of the interests'
lists equals the exact evaluation path, and the interests survive the round trip."""

import numpy as np
import pytest
import tensorflow as tf

from serving.client import PredictClient
from serving.export import export_model, load_exported
from tests.integration.serving_process import dnc_serve
from tests.integration.test_export import (
    BRUTE,
    SMALL,
    USERS,
    _check_lists,
    _serve,
    _to_model_ids,
    _train,
    requests,  # noqa: F401  (a fixture)
)
from trainer import evaluation
from trainer.train import ModelScorer, load_model


@pytest.fixture(scope="module", params=["mind", "comirec-sa"])
def multi(request, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = _train(
        tiny_data, root / "model", request.param, steps=4, training="all-positions",
        loss="sampled-softmax", num_negatives=8, batch_size=16,
    )  # fmt: skip
    base = str(root / "serving" / request.param)
    version = export_model(model_dir, tiny_data, base, **BRUTE)
    model, _ = load_model(model_dir, tiny_data)
    return {
        "variant": request.param,
        "base": base,
        "loaded": load_exported(version),
        "model": model,
    }


def test_served_lists_equal_the_evaluation_merge_of_the_interests(multi, requests):  # noqa: F811
    m = BRUTE["max_num_results"]
    out = _serve(multi["loaded"], requests["raw"], 0.0, m)
    _check_lists(out, requests["raw"], m)
    ev = requests["ev"]
    reference = evaluation.retrieve(
        ModelScorer(multi["model"]), ev.histories, ev.exclude, requests["items"].item_cluster,
        m=m, merged=False, progress=False,
    )  # fmt: skip
    served = _to_model_ids(requests["items"], out["item_ids"])
    # Scores are each item's best interest score, best first; the lists agree up to the
    # order of equal scores (float32 ties between graph and NumPy).
    interests = multi["model"].interest_embeddings(tf.constant(ev.histories)).numpy()
    items = multi["model"].candidate_embeddings(tf.range(multi["model"].num_items + 1)).numpy()
    best = np.einsum("bid,nd->bin", interests, items).max(axis=1)
    np.testing.assert_allclose(out["scores"], np.take_along_axis(best, served, 1), atol=1e-4)
    np.testing.assert_allclose(
        np.take_along_axis(best, served, 1), np.take_along_axis(best, reference, 1), atol=1e-4
    )
    assert (served == reference).mean() > 0.95
    assert (np.diff(out["scores"], axis=1) <= 1e-6).all()


def test_user_embedding_signature_returns_the_interests(multi, requests):  # noqa: F811
    out = (
        multi["loaded"]
        .signatures["user_embedding"](
            history=tf.constant(requests["raw"][:5], tf.string),
            cluster=tf.zeros([5], tf.int32),
        )["embedding"]
        .numpy()
    )
    want = multi["model"].interest_embeddings(tf.constant(requests["ev"].histories[:5])).numpy()
    assert out.shape == (5, multi["model"].model_config.num_interests, SMALL.embedding_dim)
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_evaluation_reports_every_metric(multi, requests):  # noqa: F811
    """The trained model scores like any plain variant (recall, diversity, merge column)."""
    ev = requests["ev"]
    ev = evaluation.evaluate(
        ModelScorer(multi["model"]), ev.histories, ev.targets, ev.exclude,
        requests["items"].item_cluster, m_values=(5, 10), merged=False, progress=False,
    )  # fmt: skip
    assert ev.users == USERS and ev.merged_recall is not None
    assert 0 <= ev.recall[5] <= ev.recall[10] <= 1
    assert ev.clusters_covered[10] >= 1


@pytest.mark.parametrize("multi", ["comirec-sa"], indirect=True)
def test_dnc_serve_answers_like_the_saved_model(multi, requests):  # noqa: F811
    """``dnc serve`` over gRPC (the real stub) returns the SavedModel's own lists (one
    variant: the server path does not depend on the tower)."""
    rows = [[x for x in row if x] for row in requests["raw"][:5]]
    with dnc_serve(multi["base"], "multi") as server:
        with PredictClient(server["grpc"], "multi") as client:
            served = [client.retrieve(row, num_results=10, alpha=0.0) for row in rows]
    for row, got in zip(rows, served, strict=True):
        want = _serve(multi["loaded"], np.array([row], dtype=object), 0.0, 10)
        np.testing.assert_array_equal(got["item_ids"].reshape(-1), want["item_ids"][0])
        np.testing.assert_allclose(got["scores"].reshape(-1), want["scores"][0], atol=1e-5)
