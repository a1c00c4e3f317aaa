"""Negative samplers: global (Eq. 2), in-cluster (Eq. 3) and a mixture of both.

All sampling is done with TensorFlow ops, so a sampler can be called inside a
``tf.function`` / Keras ``train_step`` and under ``tf.distribute``.

Accidental hits are *masked*, not rejected: a drawn negative equal to the
positive or to a (non-pad) item of the user's history gets ``valid=False`` and
must be ignored by the loss. Conditional on being valid, a negative is uniform
over the allowed set (the cluster, or all items, minus the user's items), which
is what Eq. 3 asks for. The small bias of masking versus redrawing is in the
*number* of effective negatives: a positive whose cluster is mostly covered by
the user's history keeps fewer than ``num_negatives`` valid negatives (none at
all for a singleton cluster), so its negative term weighs a little less.
"""

from __future__ import annotations

import csv
from typing import Any, Dict, NamedTuple, Optional

import numpy as np
import tensorflow as tf

from trainer.config import PAD_ID, SAMPLERS


class ClusterTable:
    """Items grouped by cluster in CSR layout, for cheap uniform in-cluster draws.

    A uniform item of cluster ``k`` is ``members[offsets[k] + u]`` with ``u``
    uniform in ``[0, sizes[k])``.

    Attributes:
        num_items: N (model ids are ``1..N``).
        num_clusters: K.
        members: [N] int32 model item ids sorted by cluster (then by id).
        offsets: [K + 1] int32, cluster ``k`` is ``members[offsets[k]:offsets[k + 1]]``.
        sizes: [K] int32 cluster sizes (may contain zeros).
        cluster_of_id: [N + 1] int32 cluster of each model id; ``-1`` for ``PAD_ID``.
    """

    def __init__(self, item_cluster: np.ndarray, num_clusters: Optional[int] = None) -> None:
        """Builds the table.

        Args:
            item_cluster: [N] cluster id of each ``item_index`` ``0..N-1``.
            num_clusters: K; defaults to ``max(item_cluster) + 1``.
        """
        item_cluster = np.asarray(item_cluster)
        if item_cluster.ndim != 1 or item_cluster.size == 0:
            raise ValueError(
                f"item_cluster must be a non-empty 1-D array, got {item_cluster.shape}"
            )
        if not np.issubdtype(item_cluster.dtype, np.integer):
            raise ValueError(f"item_cluster must hold integers, got dtype {item_cluster.dtype}")
        if item_cluster.min() < 0:
            raise ValueError(f"cluster ids must be >= 0, got min {item_cluster.min()}")
        k = int(item_cluster.max()) + 1 if num_clusters is None else int(num_clusters)
        if k <= int(item_cluster.max()):
            raise ValueError(f"num_clusters={k} but item_cluster holds id {item_cluster.max()}")
        self.num_items = int(item_cluster.size)
        self.num_clusters = k
        order = np.argsort(item_cluster, kind="stable")
        self.members = (order + 1).astype(np.int32)
        self.sizes = np.bincount(item_cluster, minlength=k).astype(np.int32)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int32)
        self.cluster_of_id = np.concatenate([[-1], item_cluster]).astype(np.int32)

    @classmethod
    def from_items_tsv(cls, path: str, num_clusters: Optional[int] = None) -> ClusterTable:
        """Reads ``items.tsv`` (header ``item_id\\titem_index\\tcluster_id``)."""
        with tf.io.gfile.GFile(path, "r") as f:
            reader = csv.DictReader(f, delimiter="\t")
            missing = {"item_index", "cluster_id"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: header {reader.fieldnames} lacks {sorted(missing)}")
            rows = [(int(r["item_index"]), int(r["cluster_id"])) for r in reader]
        if not rows:
            raise ValueError(f"{path} holds no items")
        index = np.array([r[0] for r in rows])
        if sorted(index.tolist()) != list(range(len(rows))):
            raise ValueError(f"{path}: item_index is not a permutation of 0..{len(rows) - 1}")
        item_cluster = np.empty(len(rows), dtype=np.int64)
        item_cluster[index] = [r[1] for r in rows]
        return cls(item_cluster, num_clusters)


class SampledNegatives(NamedTuple):
    """Output of ``NegativeSampler.sample`` (a plain 3-tuple).

    Attributes:
        negatives: [B, N] int32 model item ids.
        valid: [B, N] bool, False for accidental hits (== positive or in history).
        log_q: [B, N] float32 log-probability of drawing that id under the sampler.
    """

    negatives: tf.Tensor
    valid: tf.Tensor
    log_q: tf.Tensor


class NegativeSampler(tf.Module):
    """Draws negatives globally, within the positive's cluster, or a mixture.

    Modes (``trainer.config.SAMPLERS``):

    * ``global``: uniform over ``1..N``; ``q = 1 / N``.
    * ``in_cluster``: uniform over the positive's cluster ``k``; ``q = 1 / size_k``.
    * ``mixed``: each negative in-cluster with probability ``ratio``, else global;
      ``q(j) = ratio * [cluster(j) == k] / size_k + (1 - ratio) / N``.

    Randomness comes from a ``tf.random.Generator`` seeded with ``seed`` (create
    the sampler under the ``tf.distribute`` strategy scope so each replica gets
    its own stream), or, when ``sample`` gets a ``seed`` tensor, from stateless
    ops (fully reproducible, e.g. ``[global_seed, step]``).

    Args:
        table: the item clusters.
        mode: one of ``SAMPLERS``.
        ratio: share of in-cluster negatives for ``mixed`` (ignored otherwise).
        seed: seed of the internal generator (None: non-deterministic).
    """

    def __init__(
        self,
        table: ClusterTable,
        mode: str = "global",
        ratio: float = 0.5,
        seed: Optional[int] = None,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name=name)
        if mode not in SAMPLERS:
            raise ValueError(f"unknown sampler mode {mode!r}; expected one of {SAMPLERS}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        self.table = table
        self.mode = mode
        self.ratio = float(ratio)
        self.seed = seed
        # Probability that one negative is drawn in-cluster.
        self._p_in = {"global": 0.0, "in_cluster": 1.0, "mixed": self.ratio}[mode]
        self._members = tf.constant(table.members, tf.int32)
        self._offsets = tf.constant(table.offsets[:-1], tf.int64)
        self._sizes = tf.constant(table.sizes, tf.int64)
        self._cluster_of_id = tf.constant(table.cluster_of_id, tf.int32)
        if seed is None:
            self.generator = tf.random.Generator.from_non_deterministic_state()
        else:
            self.generator = tf.random.Generator.from_seed(seed)

    def get_config(self) -> Dict[str, Any]:
        """Constructor arguments except the table."""
        return {"mode": self.mode, "ratio": self.ratio, "seed": self.seed}

    def cluster_of(self, item_ids: tf.Tensor) -> tf.Tensor:
        """Cluster id of model item ids (``-1`` for ``PAD_ID``)."""
        return tf.gather(self._cluster_of_id, tf.cast(item_ids, tf.int32))

    def log_prob(self, item_ids: tf.Tensor, positive_clusters: tf.Tensor) -> tf.Tensor:
        """log q of drawing ``item_ids`` [B, ...] for positives of ``positive_clusters`` [B]."""
        n = float(self.table.num_items)
        if self._p_in == 0.0:
            return tf.fill(tf.shape(item_ids), tf.constant(-np.log(n), tf.float32))
        k = tf.cast(positive_clusters, tf.int32)
        extra_dims = tf.rank(item_ids) - 1
        k = tf.reshape(k, tf.concat([tf.shape(k), tf.ones([extra_dims], tf.int32)], 0))
        size = tf.cast(tf.gather(self._sizes, k), tf.float64)
        same = tf.cast(tf.equal(self.cluster_of(item_ids), k), tf.float64)
        q = self._p_in * same / tf.maximum(size, 1.0) + (1.0 - self._p_in) / n
        return tf.cast(tf.math.log(q), tf.float32)

    def sample(
        self,
        positives: tf.Tensor,
        positive_clusters: Optional[tf.Tensor] = None,
        history: Optional[tf.Tensor] = None,
        num_negatives: int = 1,
        seed: Optional[tf.Tensor] = None,
    ) -> SampledNegatives:
        """Draws ``num_negatives`` negatives per positive.

        Args:
            positives: [B] model item ids.
            positive_clusters: [B] their clusters (None: looked up in the table).
            history: [B, L] the users' items, ``PAD_ID``-padded (None: no history check).
            num_negatives: negatives per positive (Python int >= 1).
            seed: optional stateless seed, shape [2] int; None uses the generator.

        Returns:
            ``SampledNegatives(negatives [B, N] int32, valid [B, N] bool, log_q [B, N] float32)``.
        """
        if int(num_negatives) < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        positives = tf.cast(positives, tf.int32)
        if positives.shape.rank is not None and positives.shape.rank != 1:
            raise ValueError(f"positives must be [B], got shape {positives.shape}")
        if positive_clusters is None:
            positive_clusters = self.cluster_of(positives)
        positive_clusters = tf.cast(positive_clusters, tf.int32)
        shape = tf.stack([tf.size(positives), int(num_negatives)])
        # Only the streams this mode reads: global 1, in-cluster 2, mixed 3 (a stream's
        # stateless draws do not depend on how many come after it).
        streams = 1 if self._p_in == 0.0 else (2 if self._p_in == 1.0 else 3)
        draws = self._random_ints(shape, seed, streams)
        n = tf.constant(self.table.num_items, tf.int64)
        global_ids = tf.cast(tf.math.floormod(draws[0], n) + 1, tf.int32)
        if self._p_in == 0.0:
            negatives = global_ids
        else:
            size = tf.gather(self._sizes, positive_clusters)[:, None]
            offset = tf.gather(self._offsets, positive_clusters)[:, None]
            pos = offset + tf.math.floormod(draws[1], tf.maximum(size, 1))
            cluster_ids = tf.gather(self._members, pos)
            if self._p_in == 1.0:
                negatives = cluster_ids
            else:
                # Top 52 of the 63 bits -> uniform float64 in [0, 1).
                u = tf.cast(tf.bitwise.right_shift(draws[2], 11), tf.float64) * 2.0**-52
                negatives = tf.where(u < self._p_in, cluster_ids, global_ids)
        valid = tf.not_equal(negatives, positives[:, None])
        if history is not None:
            history = tf.cast(history, tf.int32)
            hit = tf.equal(negatives[:, :, None], history[:, None, :]) & tf.not_equal(
                history[:, None, :], PAD_ID
            )
            valid &= ~tf.reduce_any(hit, axis=-1)
        log_q = self.log_prob(negatives, positive_clusters)
        return SampledNegatives(negatives, valid, log_q)

    def _random_ints(
        self, shape: tf.Tensor, seed: Optional[tf.Tensor], streams: int = 3
    ) -> tf.Tensor:
        """[streams, *shape] non-negative int64 draws (global, in-cluster, coin)."""
        full = tf.concat([[streams], shape], 0)
        if seed is None:
            bits = self.generator.uniform_full_int(full, dtype=tf.int64)
        else:
            bits = tf.random.stateless_uniform(
                full, seed=tf.cast(seed, tf.int64), minval=None, maxval=None, dtype=tf.int64
            )
        # Clear the sign bit: 63 uniform bits; floormod bias is < size / 2**63.
        return tf.bitwise.bitwise_and(bits, tf.constant(2**63 - 1, tf.int64))
