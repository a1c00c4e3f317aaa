"""The trainer's input pipeline against NumPy references."""

import numpy as np
import pytest
import tensorflow as tf

from trainer import data
from trainer.config import PAD_ID
from trainer.intent import PooledHistoryEncoder


def _windows_reference(items, max_len):
    rows = []
    for t in range(1, len(items)):
        history = items[:t][-max_len:]
        rows.append([PAD_ID] * (max_len - len(history)) + list(history))
    return np.array(rows)


@pytest.mark.parametrize("n,max_len", [(2, 3), (5, 3), (7, 7), (9, 4)])
def test_prefix_windows_match_numpy(n, max_len):
    items = np.arange(11, 11 + n, dtype=np.int32)
    got = data.prefix_windows(tf.constant(items), max_len).numpy()
    np.testing.assert_array_equal(got, _windows_reference(items, max_len))


def test_expanded_samples_pair_each_prefix_with_the_next_item_and_its_cluster():
    record = {
        data.USER: tf.constant(4),
        "items": tf.constant([5, 6, 7, 8], tf.int32),
        "clusters": tf.constant([0, 1, 1, 2], tf.int32),
    }
    samples = list(data._expand_user(record, 2).as_numpy_iterator())
    assert [s[data.TARGET] for s in samples] == [6, 7, 8]
    assert [s[data.TARGET_CLUSTER] for s in samples] == [1, 1, 2]
    assert [s[data.HISTORY].tolist() for s in samples] == [[0, 5], [5, 6], [6, 7]]
    assert {int(s[data.USER]) for s in samples} == {4}


def test_pooled_intent_encoder_ignores_padding_and_round_trips_config():
    layer = PooledHistoryEncoder(max_len=4, dim=3)
    embeddings = tf.random.stateless_normal([1, 4, 5], seed=[1, 2])
    history = tf.constant([[0, 0, 3, 4]])
    out = layer(history, embeddings)
    # Padding positions carry arbitrary vectors here: they must not matter.
    changed = tf.concat([tf.ones([1, 2, 5]) * 100.0, embeddings[:, 2:]], axis=1)
    np.testing.assert_allclose(layer(history, changed).numpy(), out.numpy(), rtol=1e-6)
    clone = PooledHistoryEncoder.from_config(layer.get_config())
    assert (clone.max_len, clone.dim) == (4, 3)
    with pytest.raises(ValueError, match="max_len and dim"):
        PooledHistoryEncoder(max_len=0, dim=3)


def test_pooled_intent_encoder_recency_prior_weights_recent_items_more():
    tf.keras.utils.set_random_seed(0)  # the dense init; atol below covers outputs near 0
    layer = PooledHistoryEncoder(max_len=4, dim=3, recency=0.5)
    logits = layer.position_logits.numpy()
    np.testing.assert_allclose(logits, [-1.5, -1.0, -0.5, 0.0])
    # With a recency prior the output follows the last item more than a plain mean does.
    weights = np.exp(logits) / np.exp(logits).sum()
    embeddings = tf.random.stateless_normal([1, 4, 5], seed=[3, 4])
    pooled = np.einsum("l,ld->d", weights, embeddings.numpy()[0])
    want = layer.dense(pooled[None]).numpy()
    np.testing.assert_allclose(
        layer(tf.constant([[1, 2, 3, 4]]), embeddings).numpy(), want, rtol=1e-5, atol=1e-6
    )
    clone = PooledHistoryEncoder.from_config(layer.get_config())
    assert clone.recency == 0.5
    with pytest.raises(ValueError, match="recency"):
        PooledHistoryEncoder(max_len=4, dim=3, recency=-1.0)
