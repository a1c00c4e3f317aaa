"""Batch-shared negatives: the draws, their log-Q, and the losses against NumPy."""

import numpy as np
import pytest
import tensorflow as tf  # conftest imports dnc_env first

from tests.unit.trainer.test_allpos import ITEM_CLUSTER, OUTPUT_PROMPT, SMALL, K, N
from trainer.config import VARIANTS, TrainConfig
from trainer.model import RetrievalModel
from trainer.shared_negatives import SharedNegativeSampler

RNG = np.random.default_rng(21)


def _model(variant, per_cluster=4, config=OUTPUT_PROMPT):
    return RetrievalModel(
        VARIANTS[variant], config, num_items=N, num_clusters=K, num_users=5,
        loss="sampled-softmax", intent_encoder="implied", item_cluster=ITEM_CLUSTER,
        shared_negatives=per_cluster,
    )  # fmt: skip


def _ce(pos, neg):
    """Mean softmax cross-entropy of [pos, neg...] rows (-inf = masked)."""
    logits = np.concatenate([pos[:, None], neg], axis=1).astype(np.float64)
    mx = logits.max(axis=1)
    return np.mean(mx + np.log(np.exp(logits - mx[:, None]).sum(axis=1)) - pos)


def test_in_cluster_draws_are_stratified_with_their_log_q():
    cluster = np.array([-1, 0, 0, 0, 2, 2, 0], np.int32)  # cluster 1 is empty
    sampler = SharedNegativeSampler(cluster, 3, "in_cluster", per_cluster=50)
    draw = sampler.sample()
    ids, clusters = draw.ids.numpy(), draw.clusters.numpy()
    assert ids.shape == (150,) and sampler.size == 150
    np.testing.assert_array_equal(cluster[ids[:50]], 0)  # the stratum of cluster 0
    np.testing.assert_array_equal(cluster[ids[100:]], 2)
    assert set(ids[:50].tolist()) == {1, 2, 3, 6}  # uniform over the cluster: all drawn
    np.testing.assert_array_equal(clusters[50:100], -1)  # the empty cluster's slots
    np.testing.assert_allclose(draw.log_q.numpy()[:50], -np.log(4.0), rtol=1e-6)
    np.testing.assert_allclose(draw.global_log_q.numpy()[100:], -np.log(3 * 2.0), rtol=1e-6)
    valid = sampler.valid(draw, tf.constant([2, 5]), tf.constant([0, 2])).numpy()
    assert not valid[:, 50:100].any()  # never valid, for any target
    np.testing.assert_array_equal(valid[0, :50], ids[:50] != 2)  # accidental hits masked
    assert not valid[0, 100:].any() and not valid[1, :50].any()  # other clusters masked
    everything = sampler.global_valid(draw, tf.constant([2])).numpy()[0]
    np.testing.assert_array_equal(everything, (clusters >= 0) & (ids != 2))


def test_global_draws_are_uniform_over_the_catalogue():
    sampler = SharedNegativeSampler(ITEM_CLUSTER, K, "global", per_cluster=200)
    draw = sampler.sample()
    ids = draw.ids.numpy()
    assert ids.shape == (K * 200,) and ids.min() >= 1 and ids.max() <= N
    np.testing.assert_array_equal(draw.clusters.numpy(), ITEM_CLUSTER[ids])
    np.testing.assert_allclose(draw.log_q.numpy(), -np.log(N), rtol=1e-6)
    with pytest.raises(ValueError, match="sampler"):
        SharedNegativeSampler(ITEM_CLUSTER, K, "mixed", per_cluster=2)


def test_in_cluster_shared_loss_against_numpy():
    """Each position scores the shared draws of its target's cluster, log-Q corrected."""
    model = _model("dnc")
    draw = model.shared_sampler.sample()
    vectors = model.candidate_embeddings(draw.ids)
    user = RNG.normal(size=(9, OUTPUT_PROMPT.embedding_dim)).astype(np.float32)
    target = RNG.integers(1, N + 1, size=9).astype(np.int32)
    target[0] = draw.ids.numpy()[0]  # an accidental hit
    cluster = ITEM_CLUSTER[target]
    got = model._retrieval_loss(user, target, cluster, None, None, None, (draw, vectors))
    items = model.candidate_embeddings(np.arange(N + 1)).numpy()
    ids, clusters, log_q = draw.ids.numpy(), draw.clusters.numpy(), draw.log_q.numpy()
    pos = (user * items[target]).sum(-1)
    neg = user @ items[ids].T - log_q[None, :]
    keep = (clusters[None, :] == cluster[:, None]) & (ids[None, :] != target[:, None])
    want = _ce(pos, np.where(keep, neg, -np.inf))
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_implied_head_on_the_shared_draw_against_numpy():
    model = _model("dnc")
    draw = model.shared_sampler.sample()
    vectors = model.candidate_embeddings(draw.ids)
    h = RNG.normal(size=(6, OUTPUT_PROMPT.embedding_dim)).astype(np.float32)
    target = RNG.integers(1, N + 1, size=6).astype(np.int32)
    got = model.global_head_loss(h, target, shared=(draw, vectors))
    items = model.candidate_embeddings(np.arange(N + 1)).numpy()
    ids, glq = draw.ids.numpy(), draw.global_log_q.numpy()
    pos = (h * items[target]).sum(-1)
    neg = np.where(ids[None, :] == target[:, None], -np.inf, h @ items[ids].T - glq[None, :])
    assert float(got) == pytest.approx(_ce(pos, neg), rel=1e-5)


@pytest.mark.parametrize("variant", ["dnc", "sasrec"])
def test_shared_negatives_train_all_positions_with_finite_gradients(variant):
    config = OUTPUT_PROMPT if variant == "dnc" else SMALL
    model = _model(variant, config=config)
    from tests.unit.trainer.test_allpos import _batch, _random_batch

    history, target_cluster, mask = _random_batch()
    target = np.where(mask > 0, RNG.integers(1, N + 1, size=mask.shape), 0).astype(np.int32)
    target_cluster = np.where(mask > 0, ITEM_CLUSTER[target], 0).astype(np.int32)
    with tf.GradientTape() as tape:
        loss = model.compute_loss(_batch(history, target, target_cluster, mask), training=True)
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(np.isfinite(tf.convert_to_tensor(g).numpy()).all() for g in grads if g is not None)
    embedding = model.item_embedding.trainable_variables[0]
    assert any(g is not None for g, v in zip(grads, model.trainable_variables, strict=True)
               if v is embedding)  # fmt: skip


def test_config_rejects_shared_negatives_without_a_sampled_loss():
    with pytest.raises(ValueError, match="sampled loss"):
        TrainConfig(data="d", output="o", variant="dnc", loss="softmax", shared_negatives=4)
    with pytest.raises(ValueError, match="mixed"):
        TrainConfig(
            data="d", output="o", variant="sasrec-mixed", loss="sampled-softmax",
            shared_negatives=4,
        )  # fmt: skip


def test_bce_on_the_shared_draw_against_numpy():
    """BCE: softplus(-pos) + the sum over the position's valid shared draws of softplus(neg)."""
    model = RetrievalModel(
        VARIANTS["sasrec"], SMALL, num_items=N, num_clusters=K, num_users=5, loss="bce",
        item_cluster=ITEM_CLUSTER, shared_negatives=3,
    )  # fmt: skip
    draw = model.shared_sampler.sample()
    vectors = model.candidate_embeddings(draw.ids)
    user = RNG.normal(size=(5, SMALL.embedding_dim)).astype(np.float32)
    target = RNG.integers(1, N + 1, size=5).astype(np.int32)
    got = model._retrieval_loss(user, target, ITEM_CLUSTER[target], None, None, None,
                                (draw, vectors))  # fmt: skip
    items = model.candidate_embeddings(np.arange(N + 1)).numpy()
    ids = draw.ids.numpy()
    pos = (user * items[target]).sum(-1)
    neg = np.logaddexp(0, user @ items[ids].T) * (ids[None, :] != target[:, None])
    want = np.mean(np.logaddexp(0, -pos) + neg.sum(1))
    assert float(got) == pytest.approx(want, rel=1e-5)
