"""Loss layers: sampled BCE (the paper / SASRec), sampled softmax with log-Q, full softmax
(optionally in-cluster), intent CE.

Every layer returns the weighted mean over samples (``reduction="mean"``:
``sum(w * l) / max(sum(w), eps)``, ``w = 1`` without ``sample_weight``) or the
per-sample weighted losses ``w * l`` of shape [B] (``reduction="none"``, e.g. for
``tf.nn.compute_average_loss`` under ``tf.distribute``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import tensorflow as tf

REDUCTIONS = ("mean", "none")
_EPS = 1e-9


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def _reduce(per_sample: tf.Tensor, sample_weight: Optional[tf.Tensor], reduction: str) -> tf.Tensor:
    if sample_weight is None:
        weighted = per_sample
        total = tf.cast(tf.size(per_sample), per_sample.dtype)
    else:
        w = tf.cast(sample_weight, per_sample.dtype)
        weighted = per_sample * w
        total = tf.reduce_sum(w)
    if reduction == "none":
        return weighted
    return tf.reduce_sum(weighted) / tf.maximum(total, _EPS)


def _valid_mask(negative_logits: tf.Tensor, valid: Optional[tf.Tensor]) -> tf.Tensor:
    if valid is None:
        return tf.ones_like(negative_logits, tf.bool)
    return tf.cast(valid, tf.bool)


class SampledBinaryCrossEntropy(tf.keras.layers.Layer):
    """SASRec's loss: ``-log s(pos) - sum_valid log(1 - s(neg))`` per positive.

    With ``negative_reduction="sum"`` (SASRec, default) the valid negatives of a
    positive are summed; ``"mean"`` averages them (0 when none is valid). Both are
    identical with one negative. Invalid negatives (accidental hits) contribute
    nothing.

    Args:
        negative_reduction: ``sum`` or ``mean`` over a positive's valid negatives.
        reduction: ``mean`` over samples, or ``none`` for per-sample [B] losses.
    """

    def __init__(self, negative_reduction: str = "sum", reduction: str = "mean", **kwargs) -> None:
        super().__init__(**kwargs)
        if negative_reduction not in ("sum", "mean"):
            raise ValueError(
                f"negative_reduction must be 'sum' or 'mean', got {negative_reduction!r}"
            )
        _check_reduction(reduction)
        self.negative_reduction = negative_reduction
        self.reduction = reduction

    def call(
        self,
        positive_logits: tf.Tensor,
        negative_logits: tf.Tensor,
        valid: Optional[tf.Tensor] = None,
        sample_weight: Optional[tf.Tensor] = None,
    ) -> tf.Tensor:
        """Args: positive_logits [B], negative_logits [B, N], valid [B, N], sample_weight [B]."""
        pos = tf.cast(positive_logits, tf.float32)
        neg = tf.cast(negative_logits, tf.float32)
        mask = _valid_mask(neg, valid)
        # -log s(x) = softplus(-x); -log(1 - s(x)) = softplus(x).
        neg_terms = tf.where(mask, tf.nn.softplus(neg), tf.zeros_like(neg))
        neg_loss = tf.reduce_sum(neg_terms, axis=-1)
        if self.negative_reduction == "mean":
            count = tf.reduce_sum(tf.cast(mask, tf.float32), axis=-1)
            neg_loss = tf.math.divide_no_nan(neg_loss, count)
        return _reduce(tf.nn.softplus(-pos) + neg_loss, sample_weight, self.reduction)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(negative_reduction=self.negative_reduction, reduction=self.reduction)
        return config


class SampledSoftmaxLoss(tf.keras.layers.Layer):
    """Softmax cross-entropy over ``[positive, negatives]`` with log-Q correction.

    Logits are divided by ``temperature``; then, with ``use_log_q``, ``log_q`` is
    subtracted from the negative logits (and ``positive_log_q`` from the positive
    logit when given), as in TFRS' ``Retrieval`` task. Invalid negatives (accidental
    hits) are masked to ``-inf``. Per sample: ``logsumexp(logits) - logits[0]``.

    Args:
        use_log_q: apply the log-Q correction when ``log_q`` is passed.
        temperature: logits are divided by it before the correction.
        reduction: ``mean`` over samples, or ``none`` for per-sample [B] losses.
    """

    def __init__(
        self, use_log_q: bool = True, temperature: float = 1.0, reduction: str = "mean", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        _check_reduction(reduction)
        self.use_log_q = bool(use_log_q)
        self.temperature = float(temperature)
        self.reduction = reduction

    def call(
        self,
        positive_logits: tf.Tensor,
        negative_logits: tf.Tensor,
        valid: Optional[tf.Tensor] = None,
        log_q: Optional[tf.Tensor] = None,
        positive_log_q: Optional[tf.Tensor] = None,
        sample_weight: Optional[tf.Tensor] = None,
    ) -> tf.Tensor:
        """Args: positive_logits [B], negative_logits [B, N], valid [B, N] bool,
        log_q [B, N], positive_log_q [B], sample_weight [B]."""
        pos = tf.cast(positive_logits, tf.float32) / self.temperature
        neg = tf.cast(negative_logits, tf.float32) / self.temperature
        if self.use_log_q and log_q is not None:
            neg = neg - tf.cast(log_q, tf.float32)
        if self.use_log_q and positive_log_q is not None:
            pos = pos - tf.cast(positive_log_q, tf.float32)
        neg = tf.where(_valid_mask(neg, valid), neg, tf.fill(tf.shape(neg), float("-inf")))
        logits = tf.concat([pos[:, None], neg], axis=-1)
        per_sample = tf.reduce_logsumexp(logits, axis=-1) - pos
        return _reduce(per_sample, sample_weight, self.reduction)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            use_log_q=self.use_log_q, temperature=self.temperature, reduction=self.reduction
        )
        return config


class FullSoftmaxLoss(tf.keras.layers.Layer):
    """Softmax cross-entropy over a full candidate set, optionally restricted per sample.

    Per sample: ``logsumexp(logits[allowed]) - logits[target]``. Entries outside
    ``allowed`` are replaced by ``-inf`` (``tf.where``), so they neither enter the
    normaliser nor receive any gradient. The in-cluster variants pass ``allowed =
    (cluster(item) == cluster(target))``: the in-cluster analogue of Eq. 3, normalised
    over the target's cluster only. ``allowed[b, target[b]]`` must be True.

    Args:
        reduction: ``mean`` over samples, or ``none`` for per-sample [B] losses.
    """

    def __init__(self, reduction: str = "mean", **kwargs) -> None:
        super().__init__(**kwargs)
        _check_reduction(reduction)
        self.reduction = reduction

    def call(
        self,
        logits: tf.Tensor,
        target: tf.Tensor,
        allowed: Optional[tf.Tensor] = None,
        sample_weight: Optional[tf.Tensor] = None,
    ) -> tf.Tensor:
        """Args: logits [B, C], target [B] column ints, allowed [B, C] bool, sample_weight [B]."""
        logits = tf.cast(logits, tf.float32)
        if allowed is not None:
            allowed = tf.broadcast_to(tf.cast(allowed, tf.bool), tf.shape(logits))
            logits = tf.where(allowed, logits, tf.fill(tf.shape(logits), float("-inf")))
        positive = tf.gather(logits, tf.cast(target, tf.int32), axis=1, batch_dims=1)
        per_sample = tf.reduce_logsumexp(logits, axis=-1) - positive
        return _reduce(per_sample, sample_weight, self.reduction)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(reduction=self.reduction)
        return config


class InClusterSoftmaxLoss(tf.keras.layers.Layer):
    """Full softmax over the target's cluster, computed one cluster at a time.

    Per sample: ``logsumexp_{j in C_k} u . e_j - u . e_target`` with ``k`` the target's
    cluster: exactly ``FullSoftmaxLoss`` with ``allowed = (cluster(j) == k)``, but the
    samples are partitioned by cluster and each part is scored against its own cluster's
    items only (``K`` matmuls ``[S_k, d] x [d, |C_k|]``), about ``1 / K`` of the work of
    scoring every item and masking (for balanced clusters).

    Args:
        item_cluster: [N + 1] cluster of each model item id (``-1`` for PAD_ID).
        num_clusters: K.
        reduction: ``mean`` over samples, or ``none`` for per-sample [S] losses.
    """

    def __init__(self, item_cluster, num_clusters: int, reduction: str = "mean", **kwargs):
        super().__init__(**kwargs)
        _check_reduction(reduction)
        item_cluster = np.asarray(item_cluster, np.int64)
        if item_cluster.ndim != 1 or num_clusters < 1 or item_cluster.max() >= num_clusters:
            raise ValueError(
                f"item_cluster must be [N + 1] ids below num_clusters={num_clusters}, "
                f"got shape {item_cluster.shape} and max {item_cluster.max()}"
            )
        self.item_cluster, self.num_clusters = item_cluster, int(num_clusters)
        self.reduction = reduction
        self._members = [
            tf.constant(np.flatnonzero(item_cluster == k), tf.int32) for k in range(num_clusters)
        ]

    def call(
        self,
        user: tf.Tensor,
        positive_logits: tf.Tensor,
        target_cluster: tf.Tensor,
        candidates: tf.Tensor,
    ) -> tf.Tensor:
        """Args: user [S, d], positive_logits [S] (``u . e_target``), target_cluster [S],
        candidates [N + 1, d] (row j: item id j)."""
        cluster = tf.cast(target_cluster, tf.int32)
        rows = tf.dynamic_partition(tf.range(tf.shape(cluster)[0]), cluster, self.num_clusters)
        parts = []
        for k, members in enumerate(self._members):
            logits = tf.matmul(
                tf.gather(user, rows[k]), tf.gather(candidates, members), transpose_b=True
            )
            parts.append(tf.reduce_logsumexp(logits, axis=-1))
        # Back to the samples' order: stitch each part's log-partition into its rows.
        log_z = tf.dynamic_stitch(rows, parts)
        per_sample = log_z - tf.cast(positive_logits, log_z.dtype)
        return _reduce(per_sample, None, self.reduction)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            item_cluster=self.item_cluster.tolist(),
            num_clusters=self.num_clusters,
            reduction=self.reduction,
        )
        return config


class IntentLoss(tf.keras.layers.Layer):
    """Sparse categorical cross-entropy of the intent distribution p [B, K].

    Args:
        from_logits: inputs are logits rather than probabilities.
        reduction: ``mean`` over samples, or ``none`` for per-sample [B] losses.
    """

    def __init__(self, from_logits: bool = False, reduction: str = "mean", **kwargs) -> None:
        super().__init__(**kwargs)
        _check_reduction(reduction)
        self.from_logits = bool(from_logits)
        self.reduction = reduction

    def call(
        self, p: tf.Tensor, target_cluster: tf.Tensor, sample_weight: Optional[tf.Tensor] = None
    ) -> tf.Tensor:
        """Args: p [B, K], target_cluster [B] ints in ``0..K-1``, sample_weight [B]."""
        per_sample = tf.keras.losses.sparse_categorical_crossentropy(
            tf.cast(target_cluster, tf.int32), tf.cast(p, tf.float32), from_logits=self.from_logits
        )
        return _reduce(per_sample, sample_weight, self.reduction)

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(from_logits=self.from_logits, reduction=self.reduction)
        return config
