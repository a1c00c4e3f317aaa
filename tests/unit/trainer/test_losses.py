"""Loss layers against NumPy references."""

import numpy as np
import pytest
import tensorflow as tf  # conftest imports dnc_env first

from trainer.losses import (
    FullSoftmaxLoss,
    InClusterSoftmaxLoss,
    IntentLoss,
    SampledBinaryCrossEntropy,
    SampledSoftmaxLoss,
)

RNG = np.random.default_rng(0)
POS = RNG.normal(size=8).astype(np.float32)
NEG = RNG.normal(size=(8, 5)).astype(np.float32)
VALID = RNG.random((8, 5)) > 0.3
LOG_Q = np.log(RNG.uniform(0.01, 0.5, size=(8, 5))).astype(np.float32)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _bce_reference(pos, neg, valid):
    per = -_log_sigmoid(pos) - np.where(valid, _log_sigmoid(-neg), 0.0).sum(-1)
    return per


def test_bce_matches_numpy():
    loss = SampledBinaryCrossEntropy()(POS, NEG, VALID)
    np.testing.assert_allclose(loss.numpy(), _bce_reference(POS, NEG, VALID).mean(), rtol=1e-5)


def test_bce_ignores_masked_negatives():
    changed = np.where(VALID, NEG, 100.0).astype(np.float32)
    layer = SampledBinaryCrossEntropy()
    np.testing.assert_allclose(layer(POS, changed, VALID).numpy(), layer(POS, NEG, VALID).numpy())


def test_bce_single_negative_is_sasrec_and_reductions_agree():
    neg = NEG[:, :1]
    total = SampledBinaryCrossEntropy("sum")(POS, neg).numpy()
    mean = SampledBinaryCrossEntropy("mean")(POS, neg).numpy()
    sasrec = -(_log_sigmoid(POS) + _log_sigmoid(-neg[:, 0])).mean()
    np.testing.assert_allclose([total, mean], [sasrec, sasrec], rtol=1e-5)


def test_bce_negative_mean_and_sample_weight():
    w = np.array([1, 0, 1, 1, 0, 1, 1, 1], np.float32)
    count = VALID.sum(-1)
    per = -_log_sigmoid(POS) - np.divide(
        np.where(VALID, _log_sigmoid(-NEG), 0.0).sum(-1), count, where=count > 0
    ) * (count > 0)
    layer = SampledBinaryCrossEntropy("mean")
    got = layer(POS, NEG, VALID, sample_weight=w).numpy()
    np.testing.assert_allclose(got, (per * w).sum() / w.sum(), rtol=1e-5)
    none = SampledBinaryCrossEntropy(reduction="none")(POS, NEG, VALID, sample_weight=w)
    np.testing.assert_allclose(none.numpy(), _bce_reference(POS, NEG, VALID) * w, rtol=1e-5)


def _softmax_reference(pos, neg, valid, log_q, pos_log_q=None):
    p = pos - (0.0 if pos_log_q is None else pos_log_q)
    logits = np.concatenate([p[:, None], np.where(valid, neg - log_q, -np.inf)], -1)
    mx = logits.max(-1)
    lse = mx + np.log(np.exp(logits - mx[:, None]).sum(-1))
    return (lse - p).mean()


def test_sampled_softmax_with_log_q_matches_numpy():
    got = SampledSoftmaxLoss()(POS, NEG, VALID, log_q=LOG_Q).numpy()
    np.testing.assert_allclose(got, _softmax_reference(POS, NEG, VALID, LOG_Q), rtol=1e-5)
    pos_q = LOG_Q[:, 0]
    got = SampledSoftmaxLoss()(POS, NEG, VALID, LOG_Q, positive_log_q=pos_q).numpy()
    np.testing.assert_allclose(got, _softmax_reference(POS, NEG, VALID, LOG_Q, pos_q), rtol=1e-5)
    off = SampledSoftmaxLoss(use_log_q=False)(POS, NEG, VALID, log_q=LOG_Q).numpy()
    np.testing.assert_allclose(off, _softmax_reference(POS, NEG, VALID, 0.0), rtol=1e-5)


def test_sampled_softmax_masking_and_gradients_finite():
    all_invalid = np.zeros_like(VALID)
    pos = tf.Variable(POS)
    neg = tf.Variable(NEG)
    with tf.GradientTape() as tape:
        loss = SampledSoftmaxLoss()(pos, neg, all_invalid, log_q=LOG_Q)
    np.testing.assert_allclose(loss.numpy(), 0.0, atol=1e-6)
    grads = tape.gradient(loss, [pos, neg])
    assert all(np.isfinite(g.numpy()).all() for g in grads)
    changed = np.where(VALID, NEG, 50.0).astype(np.float32)
    layer = SampledSoftmaxLoss()
    np.testing.assert_allclose(
        layer(POS, changed, VALID, log_q=LOG_Q).numpy(), layer(POS, NEG, VALID, log_q=LOG_Q).numpy()
    )


def test_intent_loss_matches_numpy():
    logits = RNG.normal(size=(6, 4)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    target = np.array([0, 1, 2, 3, 1, 0])
    expected = -np.log(p[np.arange(6), target]).mean()
    np.testing.assert_allclose(IntentLoss()(p, target).numpy(), expected, rtol=1e-5)
    got = IntentLoss(from_logits=True)(logits, target).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize(
    "layer",
    [
        SampledBinaryCrossEntropy("mean", "none"),
        SampledSoftmaxLoss(False, 0.5),
        IntentLoss(True),
        InClusterSoftmaxLoss([-1, 0, 1, 1, 2], 3, reduction="none"),
    ],
)
def test_get_config_round_trip(layer):
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def _in_cluster_case(seed=1, num_items=40, num_clusters=4, samples=30, dim=8):
    rng = np.random.default_rng(seed)
    item_cluster = np.concatenate([[-1], rng.integers(0, num_clusters, num_items)])
    candidates = rng.normal(size=(num_items + 1, dim)).astype(np.float32)
    user = rng.normal(size=(samples, dim)).astype(np.float32)
    target = rng.integers(1, num_items + 1, samples)
    return item_cluster, candidates, user, target


def test_in_cluster_softmax_matches_numpy_and_the_masked_full_softmax():
    item_cluster, candidates, user, target = _in_cluster_case()
    logits = user @ candidates.T
    same = item_cluster[None, :] == item_cluster[target][:, None]
    masked = np.where(same, logits, -np.inf)
    top = masked.max(-1, keepdims=True)
    reference = (top[:, 0] + np.log(np.exp(masked - top).sum(-1))) - logits[
        np.arange(len(target)), target
    ]
    positive = logits[np.arange(len(target)), target]
    layer = InClusterSoftmaxLoss(item_cluster, 4, reduction="none")
    got = layer(user, positive, item_cluster[target], candidates).numpy()
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
    full = FullSoftmaxLoss(reduction="none")(logits, target, same).numpy()
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    mean = InClusterSoftmaxLoss(item_cluster, 4)(user, positive, item_cluster[target], candidates)
    np.testing.assert_allclose(mean.numpy(), reference.mean(), rtol=1e-5)


def test_in_cluster_softmax_gradients_equal_the_masked_full_softmax():
    item_cluster, candidates, user, target = _in_cluster_case(seed=2)
    same = tf.constant(item_cluster[None, :] == item_cluster[target][:, None])
    layer = InClusterSoftmaxLoss(item_cluster, 4)
    table = tf.Variable(candidates)
    u = tf.Variable(user)
    with tf.GradientTape(persistent=True) as tape:
        positive = tf.reduce_sum(u * tf.gather(table, target), -1)
        ours = layer(u, positive, item_cluster[target], table)
        masked = FullSoftmaxLoss()(tf.matmul(u, table, transpose_b=True), target, same)
    for var in (table, u):
        a, b = tape.gradient(ours, var), tape.gradient(masked, var)
        np.testing.assert_allclose(tf.convert_to_tensor(a), b, rtol=1e-4, atol=1e-6)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="negative_reduction"):
        SampledBinaryCrossEntropy("max")
    with pytest.raises(ValueError, match="reduction"):
        IntentLoss(reduction="sum")
    with pytest.raises(ValueError, match="temperature"):
        SampledSoftmaxLoss(temperature=0.0)
    with pytest.raises(ValueError, match="num_clusters=2"):
        InClusterSoftmaxLoss([-1, 0, 2], 2)
