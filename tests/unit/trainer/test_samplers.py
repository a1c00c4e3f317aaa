"""Negative samplers: cluster membership, accidental hits, uniformity, mixing, log_q."""

import numpy as np
import pytest
import tensorflow as tf  # conftest imports dnc_env first

from trainer.config import PAD_ID
from trainer.samplers import ClusterTable, NegativeSampler

# 30 items in 4 clusters of sizes 12, 9, 6, 3 (shuffled assignment).
_RNG = np.random.default_rng(0)
ITEM_CLUSTER = _RNG.permutation(np.repeat([0, 1, 2, 3], [12, 9, 6, 3]))


@pytest.fixture(scope="module")
def table():
    return ClusterTable(ITEM_CLUSTER)


def _batch(table, b=64, seed=1):
    rng = np.random.default_rng(seed)
    positives = rng.integers(1, table.num_items + 1, size=b).astype(np.int32)
    history = rng.integers(1, table.num_items + 1, size=(b, 5)).astype(np.int32)
    history[:, :2] = PAD_ID  # left padding
    return positives, table.cluster_of_id[positives], history


def test_cluster_table_csr(table):
    assert table.num_items == 30 and table.num_clusters == 4
    assert table.sizes.tolist() == [12, 9, 6, 3]
    assert table.offsets.tolist() == [0, 12, 21, 27, 30]
    assert sorted(table.members.tolist()) == list(range(1, 31))
    for k in range(4):
        block = table.members[table.offsets[k] : table.offsets[k + 1]]
        assert (ITEM_CLUSTER[block - 1] == k).all()
    assert table.cluster_of_id[0] == -1


def test_cluster_table_from_items_tsv(tmp_path, table):
    path = tmp_path / "items.tsv"
    rows = [f"it{i}\t{i}\t{c}" for i, c in enumerate(ITEM_CLUSTER)][::-1]
    path.write_text("item_id\titem_index\tcluster_id\n" + "\n".join(rows) + "\n")
    loaded = ClusterTable.from_items_tsv(str(path))
    assert np.array_equal(loaded.members, table.members)
    assert np.array_equal(loaded.cluster_of_id, table.cluster_of_id)


def test_cluster_table_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        ClusterTable(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="num_clusters"):
        ClusterTable(np.array([0, 3]), num_clusters=2)


def test_sampler_rejects_bad_config(table):
    with pytest.raises(ValueError, match="unknown sampler"):
        NegativeSampler(table, "popular")
    with pytest.raises(ValueError, match="ratio"):
        NegativeSampler(table, "mixed", ratio=1.5)
    with pytest.raises(ValueError, match="num_negatives"):
        NegativeSampler(table).sample(tf.constant([1]), num_negatives=0)


def test_in_cluster_negatives_stay_in_cluster_and_mask_hits(table):
    sampler = NegativeSampler(table, "in_cluster", seed=3)
    pos, clusters, history = _batch(table)
    neg, valid, log_q = (t.numpy() for t in sampler.sample(pos, clusters, history, 50))
    assert neg.shape == valid.shape == log_q.shape == (64, 50) and neg.dtype == np.int32
    assert (table.cluster_of_id[neg] == clusters[:, None]).all()
    hit = (neg == pos[:, None]) | (
        (neg[:, :, None] == history[:, None, :]) & (history[:, None, :] != PAD_ID)
    ).any(-1)
    assert np.array_equal(valid, ~hit)
    assert (~valid).any() and valid.any()
    assert not (neg == PAD_ID).any()


@pytest.mark.parametrize("streams", [1, 2])
def test_fewer_random_streams_draw_the_same_leading_streams(table, streams):
    # sample() draws only the streams its mode reads; seeded negatives must not change.
    sampler = NegativeSampler(table, "mixed")
    shape, seed = tf.constant([64, 9]), tf.constant([3, 4], tf.int64)
    few = sampler._random_ints(shape, seed, streams).numpy()
    assert few.shape == (streams, 64, 9)
    assert np.array_equal(few, sampler._random_ints(shape, seed, 3).numpy()[:streams])


def test_global_negatives_are_uniform(table):
    sampler = NegativeSampler(table, "global", seed=5)
    pos, clusters, _ = _batch(table, b=100)
    neg, _, log_q = sampler.sample(pos, clusters, None, 600)
    counts = np.bincount(neg.numpy().ravel(), minlength=31)
    assert counts[0] == 0
    expected = 60_000 / 30
    chi2 = ((counts[1:] - expected) ** 2 / expected).sum()
    assert chi2 < 70  # df = 29; P(chi2 > 70) ~ 3e-5
    np.testing.assert_allclose(log_q.numpy(), -np.log(30), rtol=1e-6)


def test_in_cluster_negatives_are_uniform_within_cluster(table):
    sampler = NegativeSampler(table, "in_cluster", seed=6)
    pos = table.members[table.offsets[0] : table.offsets[1]].repeat(10)  # all cluster 0
    neg = sampler.sample(pos, None, None, 300)[0].numpy()
    counts = np.bincount(neg.ravel(), minlength=31)[table.members[:12]]
    expected = neg.size / 12
    assert ((counts - expected) ** 2 / expected).sum() < 40  # df = 11


@pytest.mark.parametrize("ratio", [0.25, 0.8])
def test_mixed_ratio_and_log_q(table, ratio):
    sampler = NegativeSampler(table, "mixed", ratio=ratio, seed=7)
    pos, clusters, history = _batch(table, b=200)
    neg, _, log_q = (t.numpy() for t in sampler.sample(pos, clusters, history, 200))
    size = table.sizes[clusters][:, None]
    same = table.cluster_of_id[neg] == clusters[:, None]
    # P(same cluster) = ratio + (1 - ratio) * size_k / N.
    expected = (ratio + (1 - ratio) * size / 30.0).mean()
    assert abs(same.mean() - expected) < 0.01
    exact = np.log(ratio * same / size + (1 - ratio) / 30.0)
    np.testing.assert_allclose(log_q, exact, rtol=1e-6)


def test_in_cluster_log_q_is_cluster_size(table):
    sampler = NegativeSampler(table, "in_cluster", seed=8)
    pos, clusters, _ = _batch(table)
    log_q = sampler.sample(pos, clusters, None, 4)[2].numpy()
    np.testing.assert_allclose(log_q, -np.log(table.sizes[clusters])[:, None].repeat(4, 1))


def test_stateless_seed_is_reproducible_in_tf_function(table):
    sampler = NegativeSampler(table, "mixed", ratio=0.5)
    pos, clusters, history = _batch(table)

    @tf.function
    def draw(seed):
        return sampler.sample(pos, clusters, history, 8, seed=seed)

    a = draw(tf.constant([1, 2]))
    b = draw(tf.constant([1, 2]))
    c = draw(tf.constant([1, 3]))
    assert np.array_equal(a.negatives.numpy(), b.negatives.numpy())
    assert not np.array_equal(a.negatives.numpy(), c.negatives.numpy())


def test_generator_seed_is_reproducible(table):
    pos, clusters, history = _batch(table)
    first = NegativeSampler(table, "in_cluster", seed=11).sample(pos, clusters, history, 8)
    second = NegativeSampler(table, "in_cluster", seed=11).sample(pos, clusters, history, 8)
    assert np.array_equal(first.negatives.numpy(), second.negatives.numpy())
    assert NegativeSampler(table, "mixed", 0.3, seed=11).get_config() == {
        "mode": "mixed",
        "ratio": 0.3,
        "seed": 11,
    }
