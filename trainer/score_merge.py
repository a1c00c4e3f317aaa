"""The score merge: per-cluster lists ranked by one calibrated joint score.

The quota merge (``trainer.quotas``) decides *how many* items each cluster
contributes before looking at any item score, so a wrong intent costs whole
slots. The score merge instead reads the model as a hierarchical softmax,

    log p(i | u) = log p(k | u) + log p(i | u, k),      k = cluster of i,

where ``p(k | u)`` is the intent head and ``p(i | u, k)`` the in-cluster
softmax of the cluster's prompted user vector over the cluster's candidates
(the distribution that the in-cluster softmax loss trains):

    log p(i | u, k) = s_uk(i) - log Z_uk,   log Z_uk = logsumexp_{j in C_k, unseen} s_uk(j).

With ``alpha = 1`` the joint score is a distribution over the whole unseen
catalogue (it sums to 1, tested). ``alpha`` scales the intent term, as the quota
exponent does: ``0`` ranks by the in-cluster probability alone, large ``alpha``
takes clusters in intent order. The merged list is the top-M of the union of
the per-cluster lists by the joint score, which is exact whenever every cluster
list holds at least M candidates (evaluation and the exported graph both
ensure it).

The prompt weight ``w`` (``prompt_weight``) blends this with the plain global ranking
of the unprompted output ``u_K`` (task ``K``): each cluster is searched with

    q_k = (1 - w) u_K + w u_k,     joint(i) = q_k . e_i + w * (alpha log p_k - log Z_k(q_k)),

so ``w = 1`` is the score merge above and ``w = 0`` the global top-M of ``u_K`` (every
cluster queried by the same vector, no offsets: the union's top-M is the global one).
In between, the prompts and the intent move items by a fraction of their full effect;
``w`` is selected on validation with ``alpha`` (``trainer.merge_selection.select_merge``).

``log Z`` is computed exactly over each cluster's unseen items: in evaluation
from the exact scores, in the SavedModel from one matmul per cluster against
the cluster's embedding table (``N * d`` multiply-adds a request, the cost of
one brute-force pass; see docs/merge.md for the trade-off at a million items).

NumPy functions are the reference; the ``*_tf`` versions are graph-compatible
and tested equal.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from trainer.alpha import check_alpha
from trainer.quotas import merge_per_cluster, merge_per_cluster_tf

MERGES = ("quota", "score")
# alpha = inf stands for this weight on the centred log-probability: it orders whole
# clusters by intent while the top cluster's scores keep their float32 precision.
MAX_ALPHA = 1e4
# Intent probabilities are floored so that log p stays finite.
MIN_PROBABILITY = 1e-30
# w = 1: the full score merge (no unprompted query needed).
DEFAULT_PROMPT_WEIGHT = 1.0


def check_prompt_weight(value: float, merge: Optional[str] = None) -> float:
    """``value`` as a float in [0, 1], else ValueError; with a ``merge`` given, also a
    ValueError for a weight below 1 on another merge than ``score`` (only it blends)."""
    w = float(value)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"prompt_weight must be in [0, 1], got {value}")
    if merge is not None and merge != "score" and w != 1.0:
        raise ValueError(f"prompt_weight={w} needs the score merge, not {merge!r}")
    return w


def blend_queries(prompted: np.ndarray, unprompted: np.ndarray, weight: float) -> np.ndarray:
    """``(1 - w) u_K + w u_k``: prompted [B, K, d], unprompted [B, d] -> [B, K, d]."""
    w = check_prompt_weight(weight)
    prompted = np.asarray(prompted, np.float32)
    if w == 1.0:
        return prompted
    unprompted = np.asarray(unprompted, np.float32)
    if unprompted.shape != (prompted.shape[0], prompted.shape[2]):
        raise ValueError(
            f"unprompted must be [B, d] = {(prompted.shape[0], prompted.shape[2])}, "
            f"got {unprompted.shape}"
        )
    return (w * prompted + (1.0 - w) * unprompted[:, None, :]).astype(np.float32)


def searches_one_global_index(merge: str, prompt_weight: float) -> bool:
    """Whether ``merge`` at ``prompt_weight`` ranks every item by its unprompted score
    alone (the score merge at weight 0), so that one index over all items returns the
    merged list of an unrestricted request (``dnc export`` adds that index)."""
    return merge == "score" and float(prompt_weight) == 0.0


def check_merge(merge: str) -> str:
    """Returns ``merge`` or raises ValueError naming the accepted merges."""
    if merge not in MERGES:
        raise ValueError(f"unknown merge {merge!r}; expected one of {MERGES}")
    return merge


def log_partition(scores: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """``logsumexp`` of each row's non-excluded scores (``-inf`` for an empty row).

    Args:
        scores: [B, n] scores of one cluster's items.
        excluded: [B, n] bool, items left out (seen ones).

    Returns:
        [B] float64.
    """
    s = np.where(excluded, -np.inf, np.asarray(scores, np.float64))
    mx = s.max(axis=-1, initial=-np.inf)
    safe = np.where(np.isfinite(mx), mx, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.exp(s - safe[:, None]).sum(-1))


def _prior(log_p: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha * log p``; an infinite alpha is ``MAX_ALPHA * (log p - max log p)``."""
    alpha = check_alpha(alpha)
    if alpha == 0:
        return np.zeros_like(log_p)
    if np.isinf(alpha):
        return MAX_ALPHA * (log_p - log_p.max(axis=-1, keepdims=True))
    return alpha * log_p


def joint_scores(
    scores: np.ndarray,
    log_z: np.ndarray,
    p: np.ndarray,
    alpha: float,
    prompt_weight: float = DEFAULT_PROMPT_WEIGHT,
) -> np.ndarray:
    """``s + w * (alpha * log p_k - log Z_k)`` of every candidate; ``-inf`` stays ``-inf``.

    Args:
        scores: [B, K, L] per-cluster candidate scores (``-inf`` for empty slots).
        log_z: [B, K] in-cluster log-partitions.
        p: [B, K] intent probabilities.
        alpha: intent exponent >= 0; ``inf`` orders whole clusters by intent
            (``MAX_ALPHA * (log p - max log p)``).
        prompt_weight: ``w`` in [0, 1], the weight of the offsets (the scores must come
            from the blended queries of the same ``w``: :func:`blend_queries`).
    """
    w = check_prompt_weight(prompt_weight)
    scores = np.asarray(scores, np.float64)
    log_z = np.asarray(log_z, np.float64)
    p = np.asarray(p, np.float64)
    if scores.ndim != 3 or log_z.shape != scores.shape[:2] or p.shape != log_z.shape:
        raise ValueError(
            f"scores must be [B, K, L] with log_z and p [B, K], got {scores.shape}, "
            f"{log_z.shape}, {p.shape}"
        )
    prior = _prior(np.log(np.maximum(p, MIN_PROBABILITY)), alpha)
    finite_z = np.where(np.isfinite(log_z), log_z, 0.0)
    out = scores + w * (prior - finite_z)[..., None]
    return np.where(np.isneginf(scores), -np.inf, out)


def score_merge(
    scores: np.ndarray,
    ids: np.ndarray,
    log_z: np.ndarray,
    p: np.ndarray,
    alpha: float,
    m: int,
    prompt_weight: float = DEFAULT_PROMPT_WEIGHT,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``m`` of the union of the per-cluster lists by joint score.

    Args:
        scores: [B, K, L] per-cluster candidate scores, each list sorted descending.
        ids: [B, K, L] their item ids (``PAD_ID`` with ``-inf`` for empty slots).
        log_z, p, alpha, prompt_weight: as in :func:`joint_scores`.
        m: list size.

    Returns:
        ``(ids [B, m], joint scores [B, m] float32, clusters [B, m] int32)``, best
        first; short rows padded with ``PAD_ID``, ``-inf`` and ``-1``.
    """
    joint = joint_scores(scores, log_z, p, alpha, prompt_weight)
    b, k, length = joint.shape
    m = int(m)
    if not 0 <= m <= k * length:
        raise ValueError(f"m={m} must be in [0, K * L = {k * length}]")
    available = (~np.isneginf(joint)).sum(-1).astype(np.int64)
    return merge_per_cluster(joint.astype(np.float32), ids, available, m)


# ----------------------------------------------------------------------------- TensorFlow


def log_partition_tf(scores: tf.Tensor, excluded: tf.Tensor) -> tf.Tensor:
    """TensorFlow version of :func:`log_partition` (float32 in, float32 out)."""
    neg_inf = tf.constant(-np.inf, scores.dtype)
    s = tf.where(excluded, neg_inf, scores)
    mx = tf.reduce_max(s, axis=-1)
    safe = tf.where(tf.math.is_finite(mx), mx, tf.zeros_like(mx))
    return safe + tf.math.log(tf.reduce_sum(tf.exp(s - safe[:, None]), axis=-1))


def blend_queries_tf(prompted: tf.Tensor, unprompted: tf.Tensor, weight: float) -> tf.Tensor:
    """TensorFlow version of :func:`blend_queries` (``weight`` a Python float)."""
    w = check_prompt_weight(weight)
    if w == 1.0:
        return prompted
    return w * prompted + (1.0 - w) * unprompted[:, None, :]


def score_merge_tf(scores, ids, log_z, p, alpha, m: tf.Tensor, prompt_weight: float = 1.0):
    """TensorFlow version of :func:`score_merge`; K and L must be static.

    ``alpha`` and ``m`` may be tensors (``m`` <= K * L); ``prompt_weight`` is a float.
    """
    w = check_prompt_weight(prompt_weight)
    scores = tf.cast(scores, tf.float32)
    log_z = tf.cast(log_z, tf.float32)
    alpha = tf.cast(alpha, tf.float32)
    log_p = tf.math.log(tf.maximum(tf.cast(p, tf.float32), MIN_PROBABILITY))
    centred = MAX_ALPHA * (log_p - tf.reduce_max(log_p, axis=-1, keepdims=True))
    prior = tf.where(
        tf.math.is_inf(alpha),
        centred,
        tf.where(alpha > 0, alpha * log_p, tf.zeros_like(log_p)),
    )
    finite_z = tf.where(tf.math.is_finite(log_z), log_z, tf.zeros_like(log_z))
    joint = scores + w * (prior - finite_z)[..., None]
    neg_inf = tf.constant(-np.inf, tf.float32)
    joint = tf.where(tf.math.is_inf(scores) & (scores < 0), neg_inf, joint)
    available = tf.reduce_sum(tf.cast(~(tf.math.is_inf(joint) & (joint < 0)), tf.int32), -1)
    width = scores.shape[1] * scores.shape[2]
    out_ids, out_scores, out_clusters = merge_per_cluster_tf(joint, ids, available, m=width)
    m = tf.cast(m, tf.int32)
    return out_ids[:, :m], out_scores[:, :m], out_clusters[:, :m]
