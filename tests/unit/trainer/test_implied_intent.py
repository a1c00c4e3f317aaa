"""The implied intent: cluster masses of a global softmax head on the unprompted output."""

import numpy as np
import pytest
import tensorflow as tf  # conftest imports dnc_env first

from tests.unit.trainer.test_allpos import (
    ITEM_CLUSTER,
    OUTPUT_PROMPT,
    SMALL,
    K,
    L,
    N,
    _batch,
    _model,
    _random_batch,
    _vary_prompts,
)
from trainer.config import VARIANTS
from trainer.intent import cluster_mass, cluster_order
from trainer.model import RetrievalModel

RNG = np.random.default_rng(3)


def _softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("config", [SMALL, OUTPUT_PROMPT])
def test_implied_intent_is_the_cluster_mass_of_the_global_softmax(config):
    model = _model("dnc", intent_encoder="implied", config=config)
    _vary_prompts(model)
    history, _, _ = _random_batch()
    h = model.user_embedding(history, np.full(len(history), K)).numpy()
    items = model.candidate_embeddings(np.arange(N + 1)).numpy()
    probs = _softmax(h @ items[1:].T)  # PAD (id 0) is not a candidate
    want = np.stack([probs[:, ITEM_CLUSTER[1:] == k].sum(axis=1) for k in range(K)], axis=1)
    got = model.intent(history).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    # A serving graph's stored E^T, in the intent's item order, gives the same intent
    # (RetrievalModule.implied_items_t; the two matmul kernels may differ in the last bit).
    ordered = tf.constant(items[model.intent_item_order].T)
    stored = model.intent(history, item_embeddings_t=ordered).numpy()
    np.testing.assert_allclose(stored, got, rtol=1e-6, atol=1e-7)
    # The prompts play no part: the intent reads the NO_TASK output.
    _vary_prompts(model)
    np.testing.assert_allclose(model.intent(history).numpy(), got, rtol=1e-5, atol=1e-6)


def test_global_head_loss_against_numpy():
    model = _model("dnc", intent_encoder="implied", config=OUTPUT_PROMPT)
    h = RNG.normal(size=(7, SMALL.embedding_dim)).astype(np.float32)
    target = RNG.integers(1, N + 1, size=7).astype(np.int32)
    negatives = np.array([target[0], 3, 5, target[2], 11], np.int32)  # two accidental hits
    items = model.candidate_embeddings(np.arange(N + 1)).numpy()
    got = model.global_head_loss(h, target, negatives).numpy()
    pos = (h * items[target]).sum(-1)
    neg = h @ items[negatives].T
    neg = np.where(negatives[None, :] == target[:, None], -np.inf, neg)
    logits = np.concatenate([pos[:, None], neg], axis=1)
    mx = logits.max(axis=1)
    want = np.mean(mx + np.log(np.exp(logits - mx[:, None]).sum(axis=1)) - pos)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_global_head_loss_is_the_exact_softmax_with_as_many_negatives_as_items():
    model = RetrievalModel(
        VARIANTS["dnc"], OUTPUT_PROMPT, N, K, 5, loss="softmax", intent_encoder="implied",
        item_cluster=ITEM_CLUSTER, implied_negatives=N,
    )  # fmt: skip
    h = RNG.normal(size=(7, SMALL.embedding_dim)).astype(np.float32)
    target = RNG.integers(1, N + 1, size=7).astype(np.int32)
    items = model.candidate_embeddings(np.arange(N + 1)).numpy()
    logits = h @ items[1:].T
    mx = logits.max(axis=1)
    want = np.mean(
        mx + np.log(np.exp(logits - mx[:, None]).sum(axis=1)) - logits[np.arange(7), target - 1]
    )
    # Deterministic (no draw): the same value twice.
    np.testing.assert_allclose(model.global_head_loss(h, target).numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(model.global_head_loss(h, target).numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("config", [SMALL, OUTPUT_PROMPT])
def test_all_position_loss_adds_the_weighted_global_head_loss(config):
    """One shared pass (output prompts) or two (input prompts): the same loss."""
    model = _model("dnc", loss="softmax", intent_encoder="implied", config=config)
    _vary_prompts(model)
    history, target_cluster, mask = _random_batch()
    target = np.where(mask > 0, RNG.integers(1, N + 1, size=history.shape), 0).astype(np.int32)
    target_cluster = np.where(mask > 0, ITEM_CLUSTER[np.maximum(target, 0)], 0).astype(np.int32)
    tf.random.set_seed(5)
    got = model.compute_loss(_batch(history, target, target_cluster, mask)).numpy()
    where = np.argwhere(mask > 0)
    user = model.sequence_user_embeddings(history, target_cluster, mask)
    h = model.user_tower.encode_sequence(history, np.full(len(history), K))
    retrieval = model._retrieval_loss(
        tf.gather_nd(user, where), target[mask > 0], target_cluster[mask > 0], None, None, None
    )
    tf.random.set_seed(5)
    head = model.global_head_loss(tf.gather_nd(h, where), target[mask > 0])
    np.testing.assert_allclose(got, (retrieval + model.intent_weight * head).numpy(), rtol=1e-5)
    assert head.numpy() > 0


def test_implied_intent_needs_clusters_and_a_sequence_tower():
    with pytest.raises(ValueError, match="needs item_cluster"):
        RetrievalModel(VARIANTS["dnc"], SMALL, N, K, 5, intent_encoder="implied")
    with pytest.raises(ValueError, match="sequence tower"):
        RetrievalModel(
            VARIANTS["mf"], SMALL, N, K, 5, intent_encoder="implied", item_cluster=ITEM_CLUSTER
        )


def test_sequence_intent_equals_per_prefix_implied_intent():
    model = _model("dnc", intent_encoder="implied", config=OUTPUT_PROMPT)
    history, _, mask = _random_batch()
    got = model.sequence_intent(history).numpy()
    rows, cols = np.nonzero(mask)
    for r, j in zip(rows, cols, strict=True):
        prefix = np.zeros(L, np.int32)
        prefix[L - 1 - j :] = history[r, : j + 1]
        want = model.intent(prefix[None]).numpy()[0]
        np.testing.assert_allclose(got[r, j], want, rtol=1e-4, atol=1e-6)


def test_cluster_order_groups_items_and_keeps_their_order():
    item_cluster = np.array([-1, 2, 0, 2, 1, 0, 7, -3, 1], np.int32)  # 7 and -3: no cluster
    order, segments = cluster_order(item_cluster, 3)
    np.testing.assert_array_equal(order, [2, 5, 4, 8, 1, 3, 6, 7])
    np.testing.assert_array_equal(segments, [0, 0, 1, 1, 2, 2, 3, 3])


def test_cluster_mass_against_numpy_with_items_in_no_cluster():
    item_cluster = np.array([-1, 2, 0, 2, 1, 0, 7, -3, 1], np.int32)
    order, segments = cluster_order(item_cluster, 3)
    logits = RNG.normal(size=(4, 8)).astype(np.float32)  # item ids 1..8
    probs = _softmax(logits)
    want = np.stack([probs[:, item_cluster[1:] == k].sum(1) for k in range(3)], axis=1)
    got = cluster_mass(tf.constant(logits[:, order - 1]), tf.constant(segments), 3).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # The two items in no cluster keep their share of the normaliser out of every mass.
    np.testing.assert_allclose(got.sum(1), 1 - probs[:, 5:7].sum(1), rtol=1e-6)


def test_cluster_mass_keeps_empty_last_clusters_and_a_static_k():
    item_cluster = np.array([-1, 0, 1, 0, 1], np.int32)  # clusters 2 and 3 are empty
    order, segments = cluster_order(item_cluster, 4)
    logits = RNG.normal(size=(3, 4)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)])
    def mass(x):
        return cluster_mass(x, tf.constant(segments), 4)

    assert mass.get_concrete_function().structured_outputs.shape.as_list() == [None, 4]
    got = mass(tf.constant(logits[:, order - 1])).numpy()
    probs = _softmax(logits)
    np.testing.assert_allclose(
        got[:, :2], np.stack([probs[:, [0, 2]].sum(1), probs[:, [1, 3]].sum(1)], 1), rtol=1e-6
    )
    np.testing.assert_array_equal(got[:, 2:], 0.0)
