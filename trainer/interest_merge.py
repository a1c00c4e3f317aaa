"""Merging the per-interest lists of multi-interest models (``mind``, ``comirec-sa``).

Each of a user's I interest vectors retrieves its own top list; the paper's protocol (and
ComiRec's) merges them:

* by score (the default): the union of the lists, each item scored by the best interest
  that returned it, best first, duplicates dropped. This equals the global top-M of
  ``max_k v_k . e_i`` over the unseen items (an item of that top-M is in its best interest's
  own top-M), which is what ``trainer.evaluation`` computes exactly;
* ComiRec's controllable aggregation (``lam > 0``): greedy selection from the same union of
  ``argmax_i f(i) + lam * #{j in S : cluster(j) != cluster(i)}`` (Cen et al., KDD 2020,
  Eq. 11, with the item clusters as categories), trading accuracy for diversity.

``interest_merge`` (NumPy) and ``interest_merge_tf`` (the exported graph) are tested equal.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import tensorflow as tf

from trainer.config import PAD_ID


def _check(scores: np.ndarray, ids: np.ndarray, m: int) -> None:
    if scores.shape != ids.shape or scores.ndim != 3:
        raise ValueError(f"scores {scores.shape} and ids {ids.shape} must both be [B, I, W]")
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")


def _union(scores: np.ndarray, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``[B, I * W]`` union, best first (ties: smaller id), each id once at its best score;
    dropped duplicates and empty slots become ``PAD_ID`` / ``-inf`` at the end."""
    b = scores.shape[0]
    flat_s = scores.reshape(b, -1).astype(np.float64)
    flat_i = ids.reshape(b, -1).astype(np.int64)
    order = np.lexsort((flat_i, -flat_s), axis=-1)
    flat_s = np.take_along_axis(flat_s, order, -1)
    flat_i = np.take_along_axis(flat_i, order, -1)
    first = np.ones_like(flat_i, dtype=bool)
    for row in range(b):
        _, where = np.unique(flat_i[row], return_index=True)
        keep = np.zeros(flat_i.shape[1], bool)
        keep[where] = True
        first[row] = keep
    first &= (flat_i != PAD_ID) & np.isfinite(flat_s)
    moved = np.argsort(~first, axis=-1, kind="stable")
    flat_i = np.where(first, flat_i, PAD_ID)
    flat_s = np.where(first, flat_s, -np.inf)
    return np.take_along_axis(flat_s, moved, -1), np.take_along_axis(flat_i, moved, -1)


def interest_merge(scores: np.ndarray, ids: np.ndarray, m: int) -> Tuple[np.ndarray, np.ndarray]:
    """Top-m of the union of per-interest lists by score.

    Args:
        scores: ``[B, I, W]`` per-interest scores (``-inf`` for excluded or empty slots).
        ids: ``[B, I, W]`` matching model item ids (``PAD_ID`` for empty slots).
        m: list length.

    Returns:
        ``(ids [B, m], scores [B, m])`` best first; ``PAD_ID`` / ``-inf`` where the union
        holds fewer than m items.
    """
    scores, ids = np.asarray(scores), np.asarray(ids)
    _check(scores, ids, m)
    s, i = _union(scores, ids)
    pad = max(0, m - s.shape[1])
    s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)[:, :m]
    i = np.pad(i, ((0, 0), (0, pad)), constant_values=PAD_ID)[:, :m]
    return i, s.astype(np.float32)


def diversity_merge(
    scores: np.ndarray, ids: np.ndarray, item_cluster: np.ndarray, m: int, lam: float
) -> np.ndarray:
    """ComiRec's controllable aggregation of per-interest lists (see the module docstring).

    Args:
        scores, ids: ``[B, I, W]`` per-interest lists, as for :func:`interest_merge`.
        item_cluster: ``[N + 1]`` cluster (category) of each model item id.
        m: list length.
        lam: diversity weight (>= 0; 0 is the merge by score).

    Returns:
        ``[B, m]`` ids in selection order; ``PAD_ID`` where fewer are available.
    """
    scores, ids = np.asarray(scores), np.asarray(ids)
    _check(scores, ids, m)
    if not lam >= 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    s, i = _union(scores, ids)
    b, c = i.shape
    clusters = np.asarray(item_cluster)[i]
    num_clusters = int(np.asarray(item_cluster).max()) + 1
    available = i != PAD_ID
    counts = np.zeros((b, num_clusters), np.int64)
    out = np.full((b, m), PAD_ID, np.int64)
    rows = np.arange(b)
    for step in range(min(m, c)):
        same = np.take_along_axis(counts, np.maximum(clusters, 0), -1)
        gain = np.where(available, s + lam * (step - same), -np.inf)
        pick = np.argmax(gain, axis=-1)
        ok = available[rows, pick]
        out[rows[ok], step] = i[rows[ok], pick[ok]]
        counts[rows[ok], clusters[rows[ok], pick[ok]]] += 1
        available[rows, pick] = False
    return out


def interest_merge_tf(scores: tf.Tensor, ids: tf.Tensor, width: int) -> Tuple[tf.Tensor, tf.Tensor]:
    """Graph version of :func:`interest_merge`: ``(scores, ids)`` ``[B, width]``.

    ``width`` is static (the serving graph's result width); the caller cuts it to the
    request's ``num_results``.
    """
    b = tf.shape(scores)[0]
    flat_s = tf.reshape(tf.cast(scores, tf.float32), [b, -1])
    flat_i = tf.reshape(tf.cast(ids, tf.int32), [b, -1])
    # Best score first, then smaller id (a stable sort by id, then a stable sort by score).
    by_id = tf.argsort(flat_i, axis=-1, stable=True)
    flat_s, flat_i = tf.gather(flat_s, by_id, batch_dims=1), tf.gather(flat_i, by_id, batch_dims=1)
    by_score = tf.argsort(flat_s, axis=-1, direction="DESCENDING", stable=True)
    flat_s = tf.gather(flat_s, by_score, batch_dims=1)
    flat_i = tf.gather(flat_i, by_score, batch_dims=1)
    # An id's first occurrence in this order is its best score: group equal ids (stable,
    # so each group keeps score order) and keep the head of each group.
    grouped = tf.argsort(flat_i, axis=-1, stable=True)
    g_ids = tf.gather(flat_i, grouped, batch_dims=1)
    head = tf.concat([tf.ones_like(g_ids[:, :1], tf.bool), g_ids[:, 1:] != g_ids[:, :-1]], 1)
    first = tf.scatter_nd(
        tf.stack([tf.repeat(tf.range(b), tf.shape(g_ids)[1]), tf.reshape(grouped, [-1])], 1),
        tf.reshape(head, [-1]),
        tf.shape(g_ids),
    )
    keep = first & (flat_i != PAD_ID) & tf.math.is_finite(flat_s)
    moved = tf.argsort(tf.cast(keep, tf.int32), axis=-1, direction="DESCENDING", stable=True)
    flat_s = tf.gather(tf.where(keep, flat_s, -np.inf), moved, batch_dims=1)
    flat_i = tf.gather(tf.where(keep, flat_i, PAD_ID), moved, batch_dims=1)
    pad = tf.maximum(width - tf.shape(flat_s)[1], 0)
    flat_s = tf.pad(flat_s, [[0, 0], [0, pad]], constant_values=-np.inf)[:, :width]
    flat_i = tf.pad(flat_i, [[0, 0], [0, pad]], constant_values=PAD_ID)[:, :width]
    return flat_s, flat_i
