"""MIND routing and ComiRec-SA pooling against NumPy references; read-out; model losses."""

import math

import numpy as np
import pytest
import tensorflow as tf  # conftest imports dnc_env first

from trainer import data
from trainer.config import VARIANTS, ModelConfig
from trainer.model import RetrievalModel
from trainer.multi_interest import (
    CapsuleRouting,
    MultiInterestEncoder,
    SelfAttentivePooling,
    squash,
)

N, K, L, D, NI = 25, 3, 7, 6, 4
RNG = np.random.default_rng(3)
ITEM_CLUSTER = np.concatenate([[-1], RNG.integers(0, K, size=N)]).astype(np.int32)


def _histories(b=4):
    history = RNG.integers(1, N + 1, size=(b, L)).astype(np.int32)
    for r, pad in enumerate([0, 2, L - 1, 4][:b]):
        history[r, :pad] = 0
    return history


def _np_squash(z):
    n2 = (z**2).sum(-1, keepdims=True)
    return z * n2 / (1 + n2) / np.sqrt(n2 + 1e-9)


def _np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _positions(history):
    valid = history != 0
    return np.maximum(np.cumsum(valid, 1) - 1, 0), valid


def _np_routing(layer, items, history):
    """MIND B2I routing of ONE output per row reading the whole history."""
    s = layer.bilinear.kernel.numpy()
    w_h, b_h = layer.h_layer.kernel.numpy(), layer.h_layer.bias.numpy()
    init = layer.initial_logits.numpy()
    positions, valid = _positions(history)
    out = []
    for row in range(len(history)):
        c = items[row] @ s  # [L, d]
        logits = init[positions[row]].copy()  # [L, NI]
        for step in range(layer.iterations):
            w = _np_softmax(logits, axis=1) * valid[row][:, None]
            u = _np_squash(w.T @ c)  # [NI, d]
            if step < layer.iterations - 1:
                logits += c @ u.T
        out.append(np.maximum(u @ w_h + b_h, 0))
    return np.stack(out)


def _np_self_attention(layer, keys, values, valid):
    w1, b1 = layer.hidden.kernel.numpy(), layer.hidden.bias.numpy()
    w2, b2 = layer.heads.kernel.numpy(), layer.heads.bias.numpy()
    out = []
    for row in range(len(keys)):
        logits = np.tanh(keys[row] @ w1 + b1) @ w2 + b2  # [L, NI]
        logits[~valid[row]] = -np.inf
        a = _np_softmax(logits, axis=0)
        a[~valid[row]] = 0
        out.append(a.T @ values[row])
    return np.stack(out)


def test_squash_matches_numpy_and_keeps_zero():
    z = RNG.normal(size=(5, 3, D)).astype(np.float32)
    z[0, 0] = 0
    np.testing.assert_allclose(squash(tf.constant(z)).numpy(), _np_squash(z), atol=1e-6)
    norms = np.linalg.norm(squash(tf.constant(z)).numpy(), axis=-1)
    assert norms.max() < 1 and norms[0, 0] == 0


def test_capsule_routing_matches_numpy_reference():
    history = _histories()
    items = RNG.normal(size=(len(history), L, D)).astype(np.float32) * (history != 0)[..., None]
    layer = CapsuleRouting(num_interests=NI, dim=D, max_len=L, iterations=3, seed=1)
    positions, valid = _positions(history)
    got = layer(tf.constant(items), tf.constant(positions), tf.constant(valid[:, None, :]))
    np.testing.assert_allclose(got.numpy()[:, 0], _np_routing(layer, items, history), atol=1e-5)


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_routing_iterations_change_the_interests(iterations):
    history = _histories()
    items = RNG.normal(size=(len(history), L, D)).astype(np.float32)
    layer = CapsuleRouting(num_interests=NI, dim=D, max_len=L, iterations=iterations, seed=1)
    positions, valid = _positions(history)
    sees = tf.constant(valid[:, None, :])
    got = layer(tf.constant(items), tf.constant(positions), sees).numpy()[:, 0]
    np.testing.assert_allclose(got, _np_routing(layer, items, history), atol=1e-5)
    if iterations > 1:
        layer.iterations = 1
        one = layer(tf.constant(items), tf.constant(positions), sees).numpy()[:, 0]
        assert not np.allclose(one, got, atol=1e-4)


def test_self_attentive_pooling_matches_numpy_reference():
    history = _histories()
    valid = history != 0
    keys = RNG.normal(size=(len(history), L, D)).astype(np.float32)
    values = RNG.normal(size=(len(history), L, D)).astype(np.float32)
    layer = SelfAttentivePooling(num_interests=NI, dim=D)
    got = layer(tf.constant(keys), tf.constant(values), tf.constant(valid[:, None, :]))
    np.testing.assert_allclose(
        got.numpy()[:, 0], _np_self_attention(layer, keys, values, valid), atol=1e-5
    )
    weights = layer.attention(tf.constant(keys), tf.constant(valid[:, None, :])).numpy()
    np.testing.assert_allclose(weights.sum(axis=2), 1.0, atol=1e-6)
    assert layer.attention_dim == 4 * D  # ComiRec's hidden size


@pytest.mark.parametrize("kind", ["mind", "comirec-sa"])
def test_encoder_end_to_end_matches_numpy(kind):
    history = _histories()
    enc = MultiInterestEncoder(kind, num_items=N, dim=D, max_len=L, num_interests=NI)
    got = enc(tf.constant(history)).numpy()
    assert got.shape == (len(history), NI, D)
    items = enc.item_embedding(tf.constant(history)).numpy()
    if kind == "mind":
        want = _np_routing(enc.extractor, items, history)
    else:
        positions, valid = _positions(history)
        keys = items + enc.position_embeddings.numpy()[positions] * valid[..., None]
        want = _np_self_attention(enc.extractor, keys, items, valid)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kind", ["mind", "comirec-sa"])
def test_every_prefix_equals_the_truncated_history(kind):
    history = _histories()
    enc = MultiInterestEncoder(kind, num_items=N, dim=D, max_len=L, num_interests=NI)
    seq = enc.encode_sequence(tf.constant(history)).numpy()  # [B, L, NI, D]
    for row in range(len(history)):
        for j in range(L):
            if history[row, j] == 0:
                continue
            cut = np.zeros(L, np.int32)
            cut[L - 1 - j :] = history[row, : j + 1]
            single = enc(tf.constant(cut[None])).numpy()[0]
            np.testing.assert_allclose(seq[row, j], single, atol=1e-5)


def test_hard_read_out_takes_the_closest_interest_and_soft_is_label_aware():
    interests = RNG.normal(size=(6, NI, D)).astype(np.float32)
    target = RNG.normal(size=(6, D)).astype(np.float32)
    dots = np.einsum("bkd,bd->bk", interests, target)
    hard = MultiInterestEncoder("comirec-sa", num_items=N, dim=D, max_len=L, num_interests=NI)
    got = hard.read_out(tf.constant(interests), tf.constant(target)).numpy()
    np.testing.assert_allclose(got, interests[np.arange(6), dots.argmax(1)], atol=1e-6)
    soft = MultiInterestEncoder(
        "mind", num_items=N, dim=D, max_len=L, num_interests=NI, readout="label-aware", power=2
    )
    w = _np_softmax(np.sign(dots) * np.abs(dots) ** 2, axis=1)
    got = soft.read_out(tf.constant(interests), tf.constant(target)).numpy()
    np.testing.assert_allclose(got, np.einsum("bk,bkd->bd", w, interests), atol=1e-5)


@pytest.mark.parametrize("kind", ["mind", "comirec-sa"])
def test_get_config_round_trip_and_weights_give_the_same_output(kind):
    enc = MultiInterestEncoder(
        kind,
        num_items=N,
        dim=D,
        max_len=L,
        num_interests=3,
        routing_iterations=2,
        readout="label-aware",
        power=3.0,
    )
    history = tf.constant(_histories())
    want = enc(history).numpy()
    config = enc.get_config()
    clone = MultiInterestEncoder.from_config(config)
    assert clone.get_config() == config
    clone(history)
    clone.set_weights(enc.get_weights())
    np.testing.assert_allclose(clone(history).numpy(), want, atol=1e-6)
    for layer_cls, layer in ((type(enc.extractor), enc.extractor),):
        assert layer_cls.from_config(layer.get_config()).get_config() == layer.get_config()


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown multi-interest tower"):
        MultiInterestEncoder("dr", num_items=N)
    with pytest.raises(ValueError, match="power"):
        MultiInterestEncoder("mind", num_items=N, power=-1)
    with pytest.raises(ValueError, match="readout"):
        MultiInterestEncoder("mind", num_items=N, readout="soft")
    with pytest.raises(ValueError, match="interest_power"):
        ModelConfig(interest_power=math.inf)
    with pytest.raises(ValueError, match="num_interests"):
        ModelConfig(num_interests=0)
    with pytest.raises(ValueError, match="implied intent"):
        _model("mind", intent_encoder="implied")


def _model(variant, loss="sampled-softmax", intent_encoder="pooled"):
    config = ModelConfig(embedding_dim=D, max_len=L, num_interests=NI, dropout=0.0)
    return RetrievalModel(
        VARIANTS[variant], config, num_items=N, num_clusters=K, num_users=3, loss=loss,
        intent_encoder=intent_encoder, item_cluster=ITEM_CLUSTER,
    )  # fmt: skip


@pytest.mark.parametrize("variant", ["mind", "comirec-sa"])
@pytest.mark.parametrize("loss", ["bce", "sampled-softmax", "softmax"])
def test_prefix_loss_scores_the_target_with_its_closest_interest(variant, loss):
    model = _model(variant, loss)
    history = _histories()
    target = RNG.integers(1, N + 1, size=len(history)).astype(np.int32)
    negatives = RNG.integers(1, N + 1, size=(len(history), 3)).astype(np.int32)
    batch = {
        data.HISTORY: history,
        data.TARGET: target,
        data.TARGET_CLUSTER: ITEM_CLUSTER[target],
        data.NEGATIVES: negatives,
        data.NEGATIVES_VALID: np.ones_like(negatives, bool),
        data.NEGATIVES_LOG_Q: np.zeros(negatives.shape, np.float32),
    }
    loss_value = float(model.compute_loss(batch))
    assert np.isfinite(loss_value)
    interests = model.interest_embeddings(tf.constant(history)).numpy()
    e = model.candidate_embeddings(tf.constant(target)).numpy()
    best = interests[np.arange(len(target)), np.einsum("bkd,bd->bk", interests, e).argmax(1)]
    user = model._interest_user(tf.constant(history), tf.constant(target)).numpy()
    np.testing.assert_allclose(user, best, atol=1e-6)
    with pytest.raises(ValueError, match="interest_embeddings"):
        model.user_embedding(tf.constant(history), tf.fill([len(history)], K))


@pytest.mark.parametrize("variant", ["mind", "comirec-sa"])
def test_all_position_read_out_uses_each_position_s_own_target(variant):
    model = _model(variant, "softmax")
    history = _histories()
    mask = (history != 0).astype(np.float32)
    target = np.where(mask > 0, RNG.integers(1, N + 1, size=history.shape), 0).astype(np.int32)
    user = model._interest_user(
        tf.constant(history), tf.constant(target), tf.constant(mask)
    ).numpy()
    for row in range(len(history)):
        for j in range(L):
            if not mask[row, j]:
                assert not user[row, j].any()
                continue
            cut = np.zeros((1, L), np.int32)
            cut[0, L - 1 - j :] = history[row, : j + 1]
            want = model._interest_user(tf.constant(cut), tf.constant(target[row, j : j + 1]))
            np.testing.assert_allclose(user[row, j], want.numpy()[0], atol=1e-5)
    batch = {
        data.HISTORY: history, data.TARGET: target, data.MASK: mask,
        data.TARGET_CLUSTER: np.maximum(ITEM_CLUSTER[target], 0),
    }  # fmt: skip
    assert np.isfinite(float(model.compute_loss(batch)))
