"""Per-cluster quotas and the merge of per-cluster top lists (divide-and-conquer serving).

``M_k = M * p_k^alpha / sum_k' p_k'^alpha``, made integer and capacity-aware:

1. ``target = min(M, sum_k capacity_k)``; every quota starts at 0.
2. A round hands out ``R = target - sum_k q_k`` among the clusters with spare
   capacity ``S = {k: q_k < capacity_k}``: weights ``w = softmax_S(alpha * log p)``
   (log-space, so large alpha is stable). Conventions: ``alpha = 0`` gives equal
   weights even where ``p = 0`` (``0^0 = 1``); ``alpha = inf`` gives equal weights
   to the clusters of ``S`` with the largest ``p`` and 0 to the others; when every
   cluster of ``S`` has weight 0 (``p = 0``, ``alpha > 0``), ``S`` shares equally.
   Negative ``p`` counts as 0, and a denormal ``alpha`` as 0.
3. Largest-remainder rounding: ``floor(R * w_k)`` each, and the leftover units one
   each to the clusters of ``S`` ranked by fractional part, then weight, then
   lowest cluster id. (Fractions and weights are compared on a 1e-9 grid so the
   NumPy and TensorFlow versions agree despite last-ulp differences.)
4. Each allocation is capped by the spare capacity; whatever was cut goes to the
   next round (re-normalised over the clusters still with spare capacity). A
   round either places everything or saturates a cluster, so K rounds suffice.

``compute_quotas``/``merge_per_cluster``/``cluster_capacity`` are the NumPy
reference; the ``*_tf`` versions are graph-compatible and match them exactly.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import tensorflow as tf

from trainer.alpha import check_alpha
from trainer.config import PAD_ID

_GRID = 1e9  # fractions/weights are compared after flooring on this grid
_SNAP = 1e-9  # R * w within this of an integer counts as that integer
_TINY = float(np.finfo(np.float64).tiny)  # smaller (denormal) alpha counts as 0, as TF's FTZ does

ArrayLike = Union[np.ndarray, tf.Tensor]


# ----------------------------------------------------------------------------- NumPy


def _check_quota_inputs(p: np.ndarray, m: int, alpha: float, capacity: np.ndarray) -> None:
    if p.ndim != 2:
        raise ValueError(f"p must be [B, K], got shape {p.shape}")
    if capacity.shape != p.shape:
        raise ValueError(f"capacity shape {capacity.shape} != p shape {p.shape}")
    if int(m) < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    alpha = check_alpha(alpha)
    if (capacity < 0).any():
        raise ValueError(f"capacity must be >= 0, got min {capacity.min()}")


def _round_np(
    p: np.ndarray, log_p: np.ndarray, alpha: float, q: np.ndarray, cap: np.ndarray, target
) -> np.ndarray:
    spare = cap - q
    remaining = (target - q.sum(-1)).astype(np.float64)
    s = spare > 0
    if np.isinf(alpha):
        pmax = np.where(s, p, -1.0).max(-1, keepdims=True)
        logit = np.where(s & (p == pmax), 0.0, -np.inf)
    elif alpha == 0:
        logit = np.where(s, 0.0, -np.inf)
    else:
        with np.errstate(invalid="ignore"):
            logit = np.where(s, alpha * log_p, -np.inf)
    mx = logit.max(-1, keepdims=True)
    none = np.isneginf(mx)
    logit = np.where(none, np.where(s, 0.0, -np.inf), logit)
    mx = np.where(none, 0.0, mx)
    e = np.where(s, np.exp(logit - mx), 0.0)
    w = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    a = remaining[:, None] * w
    fl = np.floor(a + _SNAP)
    frac = np.maximum(a - fl, 0.0)
    extra = remaining - fl.sum(-1)
    fq = np.floor(frac * _GRID).astype(np.int64)
    wq = np.floor(w * _GRID).astype(np.int64)
    # beats[b, j, k]: cluster j is ranked before cluster k.
    sj, sk = s[:, :, None], s[:, None, :]
    fj, fk = fq[:, :, None], fq[:, None, :]
    wj, wk = wq[:, :, None], wq[:, None, :]
    idx = np.arange(p.shape[-1])
    lower = (idx[:, None] < idx[None, :])[None]
    beats = (sj & ~sk) | (
        (sj == sk) & ((fj > fk) | ((fj == fk) & ((wj > wk) | ((wj == wk) & lower))))
    )
    rank = beats.sum(1)
    alloc = fl.astype(np.int64) + (rank < extra[:, None]).astype(np.int64)
    return q + np.minimum(alloc, spare)


def compute_quotas(p: np.ndarray, m: int, alpha: float, capacity: np.ndarray) -> np.ndarray:
    """Integer per-cluster quotas (see the module docstring for the exact rules).

    Args:
        p: [B, K] cluster probabilities (any non-negative weights).
        m: list size M.
        alpha: sharpness >= 0; ``0`` equal quotas, ``inf`` top cluster first.
        capacity: [B, K] ints, how many items each cluster can return.

    Returns:
        [B, K] int32 quotas with ``0 <= q <= capacity`` and
        ``sum_k q = min(m, sum_k capacity)``.
    """
    p = np.maximum(np.asarray(p, np.float64), 0.0)
    capacity = np.asarray(capacity).astype(np.int64)
    alpha = float(alpha)
    _check_quota_inputs(p, m, alpha, capacity)
    alpha = 0.0 if alpha < _TINY else alpha
    target = np.minimum(int(m), capacity.sum(-1))
    with np.errstate(divide="ignore"):
        log_p = np.log(p)
    q = np.zeros_like(capacity)
    for _ in range(p.shape[-1] + 1):
        if (q.sum(-1) >= target).all():
            break
        q = _round_np(p, log_p, alpha, q, capacity, target)
    if (q.sum(-1) != target).any():  # pragma: no cover - would be a bug
        raise RuntimeError("quota redistribution did not converge")
    return q.astype(np.int32)


def merge_per_cluster(
    scores: np.ndarray, ids: np.ndarray, quotas: np.ndarray, m: Optional[int] = None
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merges the first ``quotas[b, k]`` entries of each cluster's sorted list.

    Args:
        scores: [B, K, M_max] per-cluster top scores, sorted descending.
        ids: [B, K, M_max] the matching item ids.
        quotas: [B, K] ints in ``0..M_max``.
        m: output width (None: the largest row sum of ``quotas``).

    Returns:
        ``(ids [B, m], scores [B, m] float32, clusters [B, m] int32)`` sorted by score
        descending (ties: lower cluster, then earlier rank, first). Rows with fewer
        than ``m`` selected entries are padded with ``PAD_ID``, ``-inf`` and ``-1``.
        Ids are unique when the clusters' lists are disjoint (valid inputs).
    """
    scores = np.asarray(scores, np.float32)
    ids = np.asarray(ids)
    quotas = np.asarray(quotas).astype(np.int64)
    if scores.ndim != 3 or ids.shape != scores.shape:
        raise ValueError(f"scores/ids must be equal [B, K, M_max], got {scores.shape}, {ids.shape}")
    b, k, m_max = scores.shape
    if quotas.shape != (b, k):
        raise ValueError(f"quotas must be [B, K] = {(b, k)}, got {quotas.shape}")
    if (quotas < 0).any() or (quotas > m_max).any():
        raise ValueError(f"quotas must be in [0, {m_max}], got {quotas.min()}..{quotas.max()}")
    width = int(quotas.sum(-1).max(initial=0)) if m is None else int(m)
    if not 0 <= width <= k * m_max:
        raise ValueError(f"m={width} must be in [0, K * M_max = {k * m_max}]")
    selected = (np.arange(m_max)[None, None, :] < quotas[:, :, None]).reshape(b, -1)
    flat_scores = scores.reshape(b, -1)
    flat_ids = ids.reshape(b, -1)
    flat_clusters = np.broadcast_to(np.arange(k)[:, None], (k, m_max)).reshape(-1)
    position = np.broadcast_to(np.arange(k * m_max), (b, k * m_max))
    order = np.lexsort((position, -flat_scores, ~selected), axis=-1)[:, :width]
    keep = np.take_along_axis(selected, order, -1)
    out_ids = np.where(keep, np.take_along_axis(flat_ids, order, -1), PAD_ID)
    out_scores = np.where(keep, np.take_along_axis(flat_scores, order, -1), -np.inf)
    out_clusters = np.where(keep, flat_clusters[order], -1)
    return out_ids.astype(ids.dtype), out_scores.astype(np.float32), out_clusters.astype(np.int32)


def cluster_capacity(
    history: np.ndarray, cluster_of_id: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """[B, K] cluster sizes minus the distinct non-pad history items of each cluster.

    Args:
        history: [B, L] model ids, ``PAD_ID``-padded.
        cluster_of_id: [N + 1] cluster of each model id (``ClusterTable.cluster_of_id``).
        sizes: [K] cluster sizes.
    """
    history = np.asarray(history)
    sizes = np.asarray(sizes, np.int64)
    k = sizes.shape[0]
    s = np.sort(history, axis=-1)
    first = np.concatenate([np.ones_like(s[:, :1], bool), s[:, 1:] != s[:, :-1]], -1)
    counted = first & (s != PAD_ID)
    c = np.asarray(cluster_of_id)[s]
    seen = (np.eye(k, dtype=np.int64)[np.where(counted, c, 0)] * counted[..., None]).sum(1)
    return (sizes[None, :] - seen).astype(np.int32)


# ----------------------------------------------------------------------------- TensorFlow


def _f64(x: ArrayLike) -> tf.Tensor:
    # dtype_hint keeps Python floats in float64 (a plain cast would go via float32).
    return tf.cast(tf.convert_to_tensor(x, dtype_hint=tf.float64), tf.float64)


def _round_tf(p, log_p, alpha, q, cap, target):
    neg_inf = tf.fill(tf.shape(p), tf.constant(-np.inf, tf.float64))
    zeros = tf.zeros_like(p)
    spare = cap - q
    remaining = tf.cast(target - tf.reduce_sum(q, -1), tf.float64)
    s = spare > 0
    pmax = tf.reduce_max(tf.where(s, p, zeros - 1.0), -1, keepdims=True)
    logit_inf = tf.where(s & tf.equal(p, pmax), zeros, neg_inf)
    logit_zero = tf.where(s, zeros, neg_inf)
    logit_fin = tf.where(s, alpha * log_p, neg_inf)
    logit = tf.where(
        tf.math.is_inf(alpha), logit_inf, tf.where(tf.equal(alpha, 0.0), logit_zero, logit_fin)
    )
    mx = tf.reduce_max(logit, -1, keepdims=True)
    none = tf.math.is_inf(mx) & (mx < 0)
    logit = tf.where(none, logit_zero, logit)
    mx = tf.where(none, tf.zeros_like(mx), mx)
    e = tf.where(s, tf.exp(logit - mx), zeros)
    w = e / tf.maximum(tf.reduce_sum(e, -1, keepdims=True), 1e-300)
    a = remaining[:, None] * w
    fl = tf.floor(a + _SNAP)
    frac = tf.maximum(a - fl, 0.0)
    extra = remaining - tf.reduce_sum(fl, -1)
    fq = tf.cast(tf.floor(frac * _GRID), tf.int64)
    wq = tf.cast(tf.floor(w * _GRID), tf.int64)
    sj, sk = s[:, :, None], s[:, None, :]
    fj, fk = fq[:, :, None], fq[:, None, :]
    wj, wk = wq[:, :, None], wq[:, None, :]
    idx = tf.range(tf.shape(p)[-1])
    lower = (idx[:, None] < idx[None, :])[None]
    beats = (sj & ~sk) | (
        tf.equal(sj, sk)
        & ((fj > fk) | (tf.equal(fj, fk) & ((wj > wk) | (tf.equal(wj, wk) & lower))))
    )
    rank = tf.reduce_sum(tf.cast(beats, tf.float64), 1)
    alloc = tf.cast(fl, tf.int64) + tf.cast(rank < extra[:, None], tf.int64)
    return q + tf.minimum(alloc, spare)


def compute_quotas_tf(p: ArrayLike, m: ArrayLike, alpha: ArrayLike, capacity: ArrayLike):
    """TensorFlow version of ``compute_quotas`` (graph-compatible, same result).

    ``m`` and ``alpha`` may be scalar tensors; K must be static. Returns [B, K] int32.
    """
    p = tf.maximum(_f64(p), 0.0)
    if p.shape.rank != 2 or p.shape[-1] is None:
        raise ValueError(f"p must be [B, K] with static K, got shape {p.shape}")
    capacity = tf.cast(capacity, tf.int64)
    alpha = _f64(alpha)
    alpha = tf.where(alpha < _TINY, tf.zeros_like(alpha), alpha)
    target = tf.minimum(tf.cast(m, tf.int64), tf.reduce_sum(capacity, -1))
    log_p = tf.math.log(p)

    def cond(i, q):
        return (i <= p.shape[-1]) & tf.reduce_any(tf.reduce_sum(q, -1) < target)

    def body(i, q):
        return i + 1, _round_tf(p, log_p, alpha, q, capacity, target)

    _, q = tf.while_loop(cond, body, (tf.constant(0), tf.zeros_like(capacity)))
    return tf.cast(q, tf.int32)


def merge_per_cluster_tf(
    scores: ArrayLike, ids: ArrayLike, quotas: ArrayLike, m: Optional[int] = None
) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """TensorFlow version of ``merge_per_cluster``; K and M_max must be static.

    Quotas are clipped to ``[0, M_max]`` (the NumPy version raises instead).
    """
    scores = tf.cast(scores, tf.float32)
    ids = tf.convert_to_tensor(ids)
    if scores.shape.rank != 3 or scores.shape[1] is None or scores.shape[2] is None:
        raise ValueError(f"scores must be [B, K, M_max] with static K, M_max, got {scores.shape}")
    k, m_max = scores.shape[1], scores.shape[2]
    if m is not None and not 0 <= int(m) <= k * m_max:
        raise ValueError(f"m={m} must be in [0, K * M_max = {k * m_max}]")
    quotas = tf.clip_by_value(tf.cast(quotas, tf.int32), 0, m_max)
    b = tf.shape(scores)[0]
    selected = tf.reshape(tf.range(m_max)[None, None, :] < quotas[:, :, None], [b, k * m_max])
    flat_scores = tf.reshape(scores, [b, k * m_max])
    flat_ids = tf.reshape(ids, [b, k * m_max])
    flat_clusters = tf.reshape(tf.tile(tf.range(k)[:, None], [1, m_max]), [-1])
    # Stable sorts: by score (ties keep position order), then selected first.
    by_score = tf.argsort(flat_scores, axis=-1, direction="DESCENDING", stable=True)
    sel_sorted = tf.cast(tf.gather(selected, by_score, batch_dims=1), tf.int32)
    by_sel = tf.argsort(sel_sorted, axis=-1, direction="DESCENDING", stable=True)
    order = tf.gather(by_score, by_sel, batch_dims=1)
    width = tf.reduce_max(tf.reduce_sum(quotas, -1)) if m is None else int(m)
    order = order[:, :width]
    keep = tf.gather(selected, order, batch_dims=1)
    out_ids = tf.where(keep, tf.gather(flat_ids, order, batch_dims=1), tf.cast(PAD_ID, ids.dtype))
    out_scores = tf.where(
        keep, tf.gather(flat_scores, order, batch_dims=1), tf.constant(-np.inf, tf.float32)
    )
    out_clusters = tf.where(keep, tf.gather(flat_clusters, order), tf.constant(-1, tf.int32))
    return out_ids, out_scores, out_clusters


def cluster_capacity_tf(history: ArrayLike, cluster_of_id: ArrayLike, sizes: ArrayLike):
    """TensorFlow version of ``cluster_capacity``; returns [B, K] int32."""
    sizes = tf.cast(sizes, tf.int32)
    k = tf.shape(sizes)[0]
    s = tf.sort(tf.cast(history, tf.int32), axis=-1)
    first = tf.concat([tf.ones_like(s[:, :1], tf.bool), tf.not_equal(s[:, 1:], s[:, :-1])], -1)
    counted = first & tf.not_equal(s, PAD_ID)
    c = tf.gather(tf.cast(cluster_of_id, tf.int32), s)
    onehot = tf.one_hot(tf.where(counted, c, 0), k, dtype=tf.int32)
    seen = tf.reduce_sum(onehot * tf.cast(counted, tf.int32)[..., None], 1)
    return sizes[None, :] - seen
