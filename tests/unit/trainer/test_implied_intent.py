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
    # A serving graph's stored E^T gives the same intent (RetrievalModule.implied_items_t).
    stored = model.intent(history, item_embeddings_t=tf.constant(items.T)).numpy()
    np.testing.assert_allclose(stored, want, rtol=1e-5, atol=1e-6)
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
