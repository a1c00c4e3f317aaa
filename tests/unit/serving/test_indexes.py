"""The brute-force index with transposed candidates returns what tfrs's BruteForce does."""

import os

import numpy as np
import pytest
import tensorflow as tf  # conftest imports dnc_env first
import tensorflow_recommenders as tfrs

from serving.indexes import TransposedBruteForce, build_index, index_plan

RNG = np.random.default_rng(11)


def test_transposed_brute_force_equals_tfrs_brute_force():
    candidates = RNG.normal(size=(300, 16)).astype(np.float32)
    ids = tf.constant(np.arange(300, dtype=np.int32) * 7 + 1)
    queries = tf.constant(RNG.normal(size=(5, 16)).astype(np.float32))
    ours = TransposedBruteForce(k=20).index(candidates, ids)
    reference = tfrs.layers.factorized_top_k.BruteForce(k=20).index(candidates, ids)
    for k in (None, 1, 7, 300):
        got_scores, got_ids = ours(queries, k=k)
        want_scores, want_ids = reference(queries, k=k)
        np.testing.assert_array_equal(got_ids.numpy(), want_ids.numpy())
        np.testing.assert_allclose(got_scores.numpy(), want_scores.numpy(), rtol=1e-5, atol=1e-5)
    # The scores are the exact dot products against a NumPy reference.
    scores, top = ours(queries, k=3)
    rows = (top.numpy() - 1) // 7
    want = np.take_along_axis(queries.numpy() @ candidates.T, rows, axis=1)
    np.testing.assert_allclose(scores.numpy(), want, rtol=1e-5, atol=1e-5)


def test_transposed_brute_force_survives_a_saved_model_round_trip(tmp_path):
    candidates = RNG.normal(size=(50, 8)).astype(np.float32)
    plan = index_plan(50, 10, "brute-force")
    index = build_index(plan, candidates, np.arange(1, 51, dtype=np.int32), "index_0")
    assert isinstance(index, TransposedBruteForce)

    class Holder(tf.Module):
        def __init__(self):
            super().__init__()
            self.index = index

        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
        def search(self, q):
            return self.index(q)

    holder = Holder()
    queries = tf.constant(RNG.normal(size=(3, 8)).astype(np.float32))
    path = os.path.join(str(tmp_path), "m")
    tf.saved_model.save(holder, path)
    loaded = tf.saved_model.load(path)
    for a, b in zip(holder.search(queries), loaded.search(queries), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_transposed_brute_force_rejects_mismatched_identifiers():
    with pytest.raises(ValueError, match="5 candidate rows but 4 identifiers"):
        TransposedBruteForce(k=2).index(np.zeros((5, 3), np.float32), tf.range(4))
