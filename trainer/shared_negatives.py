"""Negatives shared by a whole batch, drawn inside the training step.

The default samplers (``trainer.samplers``, run in tf.data) draw ``num_negatives`` ids
for every target position: the step then gathers ``[S, n, d]`` embeddings and scores
them with a batched dot product, which is memory-bound and dominates an all-position
step (``S`` = batch * window positions). Here one set of ``G`` ids is drawn per step,
embedded once (``[G, d]``) and scored by one matmul ``[S, d] x [d, G]``:

* ``in_cluster`` (``dnc``): stratified, ``n`` uniform draws in every cluster
  (``G = K * n``); a position keeps the draws of its target's cluster, so it sees ``n``
  in-cluster negatives as with the per-position sampler, with the same log-Q
  ``-log |C_k|``. The same set also trains the global head of the ``implied`` intent,
  corrected by the stratified draw probability ``q_j = 1 / (K |C_k(j)|)``.
* ``global`` (``sasrec``): ``G = K * n`` uniform draws over all items (``q = 1 / N``),
  the same number of scored negatives per step as the stratified set.

Accidental hits (a draw equal to the position's target) are masked. Unlike the
per-position samplers, the user's history items are not masked: with shared draws a
history item is as likely a negative as any other item (as with TFRS in-batch
negatives), and checking every position's history would cost what sharing saves.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tensorflow as tf

SHARED_SAMPLERS = ("global", "in_cluster")


class SharedDraw(NamedTuple):
    """One step's shared negatives.

    Attributes:
        ids: [G] int32 model item ids.
        clusters: [G] int32 their clusters.
        log_q: [G] float32 log-probability used by the sampler's own loss (in-cluster:
            ``-log |C_k|``; global: ``-log N``).
        global_log_q: [G] float32 log-probability of the draw under the whole set
            (for a softmax over all items: ``-log(K |C_k|)`` stratified, ``-log N`` global).
    """

    ids: tf.Tensor
    clusters: tf.Tensor
    log_q: tf.Tensor
    global_log_q: tf.Tensor


class SharedNegativeSampler(tf.Module):
    """Draws the negatives one training step shares (see the module docstring).

    Args:
        item_cluster: [N + 1] cluster of each model item id (``-1`` for PAD_ID).
        num_clusters: K.
        mode: ``in_cluster`` (stratified, ``per_cluster`` draws in each cluster) or
            ``global`` (``K * per_cluster`` uniform draws).
        per_cluster: ``n``, draws per cluster (>= 1).
    """

    def __init__(
        self, item_cluster: np.ndarray, num_clusters: int, mode: str, per_cluster: int
    ) -> None:
        super().__init__(name="shared_negatives")
        if mode not in SHARED_SAMPLERS:
            raise ValueError(f"shared negatives need a sampler in {SHARED_SAMPLERS}, got {mode!r}")
        if int(per_cluster) < 1:
            raise ValueError(f"per_cluster must be >= 1, got {per_cluster}")
        item_cluster = np.asarray(item_cluster, np.int64)
        if item_cluster.ndim != 1 or item_cluster.size < 2:
            raise ValueError(f"item_cluster must be [N + 1], got shape {item_cluster.shape}")
        real = item_cluster[1:]
        if real.min() < 0 or real.max() >= num_clusters:
            raise ValueError(f"item_cluster values must be in [0, {num_clusters})")
        self.mode = mode
        self.per_cluster = int(per_cluster)
        self.num_clusters = int(num_clusters)
        self.num_items = int(real.size)
        sizes = np.bincount(real, minlength=num_clusters)
        order = np.argsort(real, kind="stable") + 1  # model ids grouped by cluster
        self._members = tf.constant(order.astype(np.int32))
        self._offsets = tf.constant(np.concatenate([[0], np.cumsum(sizes)[:-1]]), tf.int64)
        self._sizes = tf.constant(sizes, tf.int64)
        self._item_cluster = tf.constant(item_cluster.astype(np.int32))
        with np.errstate(divide="ignore"):
            self._log_size = tf.constant(np.log(sizes.astype(np.float64)), tf.float32)

    @property
    def size(self) -> int:
        """G, the ids drawn per step."""
        return self.num_clusters * self.per_cluster

    def sample(self) -> SharedDraw:
        """The step's ``G`` shared negatives (empty clusters' slots hold ids of cluster
        -1's stand-in: they are never valid for any target, see :meth:`valid`)."""
        g = self.size
        if self.mode == "global":
            ids = tf.random.uniform([g], 1, self.num_items + 1, dtype=tf.int32)
            clusters = tf.gather(self._item_cluster, ids)
            log_n = tf.fill([g], tf.constant(-np.log(self.num_items), tf.float32))
            return SharedDraw(ids, clusters, log_n, log_n)
        clusters = tf.repeat(tf.range(self.num_clusters, dtype=tf.int32), self.per_cluster)
        size = tf.gather(self._sizes, clusters)
        u = tf.random.uniform([g], 0, 2**62, dtype=tf.int64)
        pos = tf.gather(self._offsets, clusters) + tf.math.floormod(u, tf.maximum(size, 1))
        ids = tf.gather(self._members, tf.minimum(pos, self.num_items - 1))
        # An empty cluster has no draws: mark its slots with cluster -1 (never a target's).
        clusters = tf.where(size > 0, clusters, -tf.ones_like(clusters))
        log_size = tf.gather(self._log_size, tf.maximum(clusters, 0))
        log_k = float(np.log(self.num_clusters))
        return SharedDraw(ids, clusters, -log_size, -log_size - log_k)

    def valid(self, draw: SharedDraw, target: tf.Tensor, target_cluster: tf.Tensor) -> tf.Tensor:
        """[S, G] bool: the draws the sampler's own loss keeps for targets [S]: not the
        target, and (in-cluster) of the target's cluster."""
        target = tf.cast(target, tf.int32)
        keep = tf.not_equal(draw.ids[None, :], target[:, None])
        if self.mode == "in_cluster":
            same = tf.equal(draw.clusters[None, :], tf.cast(target_cluster, tf.int32)[:, None])
            keep &= same
        return keep

    def global_valid(self, draw: SharedDraw, target: tf.Tensor) -> tf.Tensor:
        """[S, G] bool: the draws a softmax over all items keeps (not the target)."""
        keep = tf.not_equal(draw.ids[None, :], tf.cast(target, tf.int32)[:, None])
        return keep & (draw.clusters >= 0)[None, :]


def in_cluster_loss(
    sampler: SharedNegativeSampler,
    per_sample_loss,
    user: tf.Tensor,
    positive_logits: tf.Tensor,
    target: tf.Tensor,
    target_cluster: tf.Tensor,
    draw: SharedDraw,
    vectors: tf.Tensor,
) -> tf.Tensor:
    """Mean in-cluster sampled softmax of positions [S] against the shared draw.

    The positions are partitioned by target cluster and each part scores only its own
    cluster's ``n`` draws (``K`` matmuls ``[S_k, d] x [d, n]``: ``1 / K`` of the work of
    scoring all ``G`` draws and masking the other clusters', with the same result).

    Args:
        sampler: the ``in_cluster`` sampler that made ``draw``.
        per_sample_loss: ``(positive_logits, negative_logits, valid, log_q) -> [S_k]``
            per-sample losses (the model's sampled softmax or BCE, unreduced).
        user: [S, d] prompted user vectors; positive_logits [S]; target, target_cluster [S].
        draw: the step's draw; vectors: [G, d] its item embeddings.
    """
    if sampler.mode != "in_cluster":
        raise ValueError(f"in_cluster_loss needs the in_cluster sampler, not {sampler.mode!r}")
    n, k = sampler.per_cluster, sampler.num_clusters
    cluster = tf.cast(target_cluster, tf.int32)
    rows = tf.dynamic_partition(tf.range(tf.shape(cluster)[0]), cluster, k)
    total = tf.constant(0.0, tf.float32)
    for c in range(k):
        part = rows[c]
        ids = draw.ids[c * n : (c + 1) * n]
        logits = tf.matmul(tf.gather(user, part), vectors[c * n : (c + 1) * n], transpose_b=True)
        valid = tf.not_equal(ids[None, :], tf.gather(tf.cast(target, tf.int32), part)[:, None])
        log_q = draw.log_q[c * n : (c + 1) * n]
        per_sample = per_sample_loss(tf.gather(positive_logits, part), logits, valid, log_q)
        total += tf.reduce_sum(per_sample)
    count = tf.cast(tf.maximum(tf.shape(cluster)[0], 1), tf.float32)
    return total / count
